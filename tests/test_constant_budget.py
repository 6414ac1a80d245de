"""A constant subgraph that would create a huge tensor is not evaluated at fold time."""

from __future__ import annotations

import resource

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

import bnfold
from bnfold.report import Reason


def _conv_with_a_bias_of_shape(length: int) -> onnx.ModelProto:
    """Conv whose bias is ConstantOfShape([length]) -> Slice to [4] (a 1 kB model) -> BN."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.normal(size=(4, 3, 1, 1)).astype(np.float32), "w"),
             numpy_helper.from_array(np.array([length], np.int64), "shape"),
             numpy_helper.from_array(np.array([0], np.int64), "start"),
             numpy_helper.from_array(np.array([4], np.int64), "end")]
    inits += [numpy_helper.from_array(v.astype(np.float32), n) for n, v in
              (("g", rng.uniform(0.5, 2, 4)), ("b", rng.normal(size=4)), ("m", rng.normal(size=4)),
               ("v", rng.uniform(0.5, 2, 4)))]
    nodes = [helper.make_node("ConstantOfShape", ["shape"], ["zeros"],
                              value=numpy_helper.from_array(np.zeros(1, np.float32))),
             helper.make_node("Slice", ["zeros", "start", "end"], ["bias"]),
             helper.make_node("Conv", ["x", "w", "bias"], ["c"]),
             helper.make_node("BatchNormalization", ["c", "g", "b", "m", "v"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 4, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 4, 4])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_a_small_computed_bias_folds():
    result = bnfold.fold(_conv_with_a_bias_of_shape(4))
    assert "BatchNormalization" not in {n.op_type for n in result.model.graph.node}


def test_a_huge_requested_constant_is_not_evaluated():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    result = bnfold.fold(_conv_with_a_bias_of_shape(500_000_000), verify=False)
    grown_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    assert [r.reason for r in result.report.skipped] == [Reason.WEIGHT_NOT_CONSTANT]
    assert grown_kb < 500_000  # evaluating it would hold 2 GB of zeros
