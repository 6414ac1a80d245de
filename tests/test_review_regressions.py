"""Regressions from an adversarial review: each was a silent wrong fold (or an unloadable output)
with verification switched off."""

from __future__ import annotations

import numpy as np
import onnx
from helpers import run
from onnx import TensorProto, helper, numpy_helper

import bnfold
from bnfold.report import Reason


def _value(name: str, shape=None, elem=TensorProto.FLOAT) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, elem, shape)


def _model(nodes, inputs, outputs, initializers) -> onnx.ModelProto:
    model = helper.make_model(helper.make_graph(nodes, "g", inputs, outputs, initializers),
                              opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def test_fold_that_would_overflow_float16_is_refused():
    weight = np.full((2, 2, 1, 1), 0.01, np.float16)
    weight[0, 0] = 40000.0  # times gamma 4 does not fit in float16
    params = [numpy_helper.from_array(np.array(v, np.float16), n) for n, v in
              [("g", [4.0, 1.0]), ("b", [0.0, 0.0]), ("m", [0.0, 0.0]), ("v", [1.0, 1.0])]]
    model = _model([helper.make_node("Conv", ["x", "W"], ["c"]),
                    helper.make_node("BatchNormalization", ["c", "g", "b", "m", "v"], ["y"], epsilon=0.0)],
                   [_value("x", [1, 2, 2, 2], TensorProto.FLOAT16)], [_value("y", [1, 2, 2, 2], TensorProto.FLOAT16)],
                   [numpy_helper.from_array(weight, "W"), *params])
    result = bnfold.fold(model, verify=False)
    assert not result.report.folded
    [skipped] = result.report.skipped
    assert skipped.reason == Reason.INVALID_PARAMS and "overflow" in skipped.detail
    feeds = {"x": np.full((1, 2, 2, 2), 1e-3, np.float16)}
    np.testing.assert_array_equal(run(result.model, feeds)[0], run(model, feeds)[0])


def test_subgraph_scopes_with_clashing_owner_names_keep_their_own_shapes():
    rng = np.random.default_rng(0)
    # If "Q": c = Conv(x) is [2,6,6,6]; Mul by k[6,1] scales rows (axis 2), never channels.
    body_a = helper.make_graph([helper.make_node("Conv", ["x", "W"], ["c"]), helper.make_node("Mul", ["c", "k"], ["o"])],
                               "a", [], [_value("o")])
    # An unnamed If whose OUTPUT is "Q": its body has a value "c" of rank 3.
    body_b = helper.make_graph([helper.make_node("Conv", ["x3", "W1"], ["c"]), helper.make_node("Relu", ["c"], ["o"])],
                               "b", [], [_value("o")])
    nodes = [helper.make_node("If", ["cond"], ["y1"], name="Q", then_branch=body_a, else_branch=body_a),
             helper.make_node("If", ["cond"], ["Q"], then_branch=body_b, else_branch=body_b)]
    weights = [numpy_helper.from_array(rng.standard_normal(s).astype(np.float32), n)
               for n, s in (("W", (6, 3, 3, 3)), ("k", (6, 1)), ("W1", (3, 3, 1)))]
    model = _model(nodes, [_value("x", [2, 3, 8, 8]), _value("x3", [2, 3, 8]), _value("cond", [], TensorProto.BOOL)],
                   [_value("y1", [2, 6, 6, 6]), _value("Q", [2, 3, 8])], weights)
    result = bnfold.fold(model, verify=False)
    assert not result.report.folded
    feeds = {"x": rng.standard_normal((2, 3, 8, 8)).astype(np.float32),
             "x3": rng.standard_normal((2, 3, 8)).astype(np.float32), "cond": np.array(True)}
    np.testing.assert_array_equal(run(result.model, feeds)[0], run(model, feeds)[0])


def test_all_ones_constant_on_a_tensor_of_unknown_rank_is_not_a_scalar():
    # Reshape to a runtime shape hides the rank; the Mul by k[1,1,1,1] may add axes to it.
    rng = np.random.default_rng(1)
    model = _model(
        [helper.make_node("Reshape", ["x0", "s"], ["x"]), helper.make_node("MatMul", ["x", "W"], ["c"]),
         helper.make_node("Mul", ["c", "k"], ["y"])],
        [_value("x0", [6, 5]), _value("s", ["r"], TensorProto.INT64)], [_value("y", ["a", "b", "c", "d"])],
        [numpy_helper.from_array(rng.standard_normal((5, 6)).astype(np.float32), "W"),
         numpy_helper.from_array(np.full((1, 1, 1, 1), 2.0, np.float32), "k")])
    result = bnfold.fold(model, verify=False)
    assert [n.op_type for n in result.model.graph.node] == ["Reshape", "MatMul", "Mul"]
    assert result.report.folded == []
    feeds = {"x0": rng.standard_normal((6, 5)).astype(np.float32), "s": np.array([6, 5])}
    assert run(result.model, feeds)[0].shape == run(model, feeds)[0].shape == (1, 1, 6, 6)


def test_added_bias_nodes_of_unnamed_matmuls_do_not_share_a_name():
    rng = np.random.default_rng(2)
    nodes, weights = [], []
    for i in (1, 2):
        nodes += [helper.make_node("MatMul", ["x", f"W{i}"], [f"c{i}"]), helper.make_node("Mul", [f"c{i}", f"k{i}"], [f"d{i}"]),
                  helper.make_node("Add", [f"d{i}", f"a{i}"], [f"y{i}"])]
        weights += [numpy_helper.from_array(rng.standard_normal(s).astype(np.float32), f"{n}{i}")
                    for n, s in (("W", (5, 6)), ("k", (6,)), ("a", (6,)))]
    model = _model(nodes, [_value("x", [2, 3, 5])], [_value("y1", [2, 3, 6]), _value("y2", [2, 3, 6])], weights)
    result = bnfold.fold(model)  # verification loads the folded model in onnxruntime
    assert [n.op_type for n in result.model.graph.node] == ["MatMul", "Add", "MatMul", "Add"]
    names = [n.name for n in result.model.graph.node if n.name]
    assert len(names) == len(set(names))
    assert result.report.verification.passed
