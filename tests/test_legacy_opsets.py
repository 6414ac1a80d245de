"""Old exports: opset-6 BatchNormalization and Gemm (no onnxruntime kernels: verified by onnx's reference
evaluator), IR 3 initializers listed as graph inputs, and opset-6 Mul's legacy broadcast/axis."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper
from onnx.reference import ReferenceEvaluator

import bnfold
from benchmarks.graph_builder import GraphBuilder


def _opset6_model() -> onnx.ModelProto:
    """Conv -> BN-6 (is_test) -> Flatten -> Gemm-6 (broadcast=1) -> BN-6, IR 3: all initializers
    listed as graph inputs, as old model-zoo files are."""
    g = GraphBuilder(opset=6)
    x = g.input("x", [2, 3, 8, 8])
    conv = g.conv(x, 3, 4, pads=[1, 1, 1, 1])
    bn1 = g.node("BatchNormalization", [conv, *g.bn_params(4)], "bn", epsilon=1e-3, is_test=1)
    flat = g.node("Flatten", [bn1])
    gemm = g.gemm(flat, 4 * 8 * 8, 5, trans_b=1, broadcast=1)
    out = g.node("BatchNormalization", [gemm, *g.bn_params(5)], "bn", epsilon=1e-5, is_test=1)
    return _ir3_model(g, out, [2, 5])


def _ir3_model(g: GraphBuilder, output: str, shape: list[int]) -> onnx.ModelProto:
    """An IR-3 model of `g`'s nodes, every initializer also listed as a graph input."""
    return g.model([helper.make_tensor_value_info(output, TensorProto.FLOAT, shape)], ir_version=3,
                   extra_inputs=g.initializer_inputs(), infer_shapes=False)


def test_opset6_bn_and_gemm_fold_and_are_verified_by_the_reference_evaluator():
    model = _opset6_model()
    result = bnfold.fold(model)
    ops = [n.op_type for n in result.model.graph.node]
    assert ops == ["Conv", "Flatten", "Gemm"]
    verification = result.report.verification
    # onnxruntime has no BatchNormalization(6) kernel: the comparison ran in onnx's evaluator, and says so.
    assert verification.runtime_engine.startswith("onnx reference evaluator")
    assert "BatchNormalization(6)" in verification.runtime_engine
    assert verification.runtime_status == "passed"
    assert verification.outputs[0].max_rel_error < 1e-6
    # IR 3: every initializer, the new Conv bias included, is still listed as a graph input.
    inputs = {v.name for v in result.model.graph.input}
    assert {t.name for t in result.model.graph.initializer} <= inputs
    # Independent check: the reference evaluator agrees on the folded model's output.
    feeds = {"x": np.random.default_rng(3).uniform(-1, 1, (2, 3, 8, 8)).astype(np.float32)}
    expected = ReferenceEvaluator(model).run(None, feeds)[0]
    got = ReferenceEvaluator(result.model).run(None, feeds)[0]
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


def _opset6_gemm_then_legacy_mul(axis: int | None) -> onnx.ModelProto:
    """Gemm-6 [4, 4] -> Mul-6(broadcast=1[, axis]) by a [4] constant."""
    g = GraphBuilder(opset=6)
    x = g.input("x", [4, 6])
    gemm = g.gemm(x, 6, 4, broadcast=1)
    attrs = {"broadcast": 1} if axis is None else {"broadcast": 1, "axis": axis}
    y = g.node("Mul", [gemm, g.const(np.array([0.5, 2.0, -1.0, 3.0]))], **attrs)
    return _ir3_model(g, y, [4, 4])


def test_legacy_broadcast_axis_0_is_per_row_and_is_not_folded():
    """Mul-6 with broadcast=1, axis=0 scales ROWS of the [4, 4] Gemm output (the constant aligns at
    axis 0, not at the end as in numpy). Folding it onto the Gemm's output columns would be wrong."""
    model = _opset6_gemm_then_legacy_mul(axis=0)
    result = bnfold.fold(model, verify=False)
    assert [n.op_type for n in result.model.graph.node] == ["Gemm", "Mul"]
    assert result.report.folded == []


@pytest.mark.parametrize("axis", [None, 1, -1])
def test_legacy_broadcast_that_matches_numpy_alignment_folds(axis):
    """No axis (suffix matching) or axis 1 on a rank-2 tensor for a [C] constant: per output column."""
    model = _opset6_gemm_then_legacy_mul(axis=axis)
    result = bnfold.fold(model, verify=False)
    assert [n.op_type for n in result.model.graph.node] == ["Gemm"]
    x = np.random.default_rng(0).uniform(-1, 1, (4, 6)).astype(np.float32)
    gemm = model.graph.node[0]
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    expected = (x @ inits[gemm.input[1]] + inits[gemm.input[2]]) * np.array([0.5, 2.0, -1.0, 3.0], np.float32)
    folded = result.model.graph.node[0]
    got_inits = {t.name: onnx.numpy_helper.to_array(t) for t in result.model.graph.initializer}
    got = x @ got_inits[folded.input[1]] + got_inits[folded.input[2]]
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
