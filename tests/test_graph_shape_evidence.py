"""Fold decisions rest only on shapes the graph proves: inferred from the declared graph inputs and
the constants. value_info (a leftover of an export, or written by hand) is a claim, not evidence:
where it is stale or contradicts inference it must not change a decision, and where a rule needs a
dim the graph leaves symbolic, the fold is refused with `unknown_shape`.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from helpers import op_types, run
from onnx import TensorProto, helper

import bnfold
from benchmarks.graph_builder import GraphBuilder
from bnfold.report import Reason

FLOAT = TensorProto.FLOAT


def _declare(model: onnx.ModelProto, name: str, shape: list, elem_type: int = FLOAT) -> onnx.ModelProto:
    """The model with a (stale) value_info entry claiming `name` has `shape`."""
    claimed = onnx.ModelProto()
    claimed.CopyFrom(model)
    kept = [v for v in claimed.graph.value_info if v.name != name]
    del claimed.graph.value_info[:]
    claimed.graph.value_info.extend(kept)
    claimed.graph.value_info.append(helper.make_tensor_value_info(name, elem_type, shape))
    return claimed


def _assert_same_outputs(original: onnx.ModelProto, folded: onnx.ModelProto, feeds: dict) -> None:
    for expected, actual in zip(run(original, feeds), run(folded, feeds)):
        np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-5 * max(1.0, float(np.abs(expected).max())))


def _bn_with_shift_before_same_conv(shape: list) -> tuple[onnx.ModelProto, str]:
    g = GraphBuilder(np.random.default_rng(3))
    x = g.input("x", shape)
    params = g.bn_params(3)
    g.initializers[-3].CopyFrom(onnx.numpy_helper.from_array(np.full(3, 2.0, np.float32), params[1]))  # beta: a shift
    bn = g.node("BatchNormalization", [x, *params], "bn")
    y = g.conv(bn, 3, 4, kernel=2, strides=[2, 2], auto_pad="SAME_UPPER")
    return g.model([y], check=False), bn


def test_stale_value_info_on_a_dynamic_input_is_not_evidence_for_same_padding() -> None:
    # The issue's model: at 32x32 SAME pads nothing, at 33x33 it pads one row and column — which
    # the BN's shift does not reach. The value_info claiming 32x32 must not decide the fold.
    model, bn = _bn_with_shift_before_same_conv(["N", 3, "H", "W"])
    stale = _declare(model, bn, [2, 3, 32, 32])
    result = bnfold.fold(stale, verify=False)
    assert [(s.op_type, s.reason) for s in result.report.skipped] == [("BatchNormalization", Reason.UNKNOWN_SHAPE)]
    assert "SAME_UPPER" in result.report.skipped[0].detail
    assert op_types(result.model) == ["BatchNormalization", "Conv"]
    rng = np.random.default_rng(0)
    for size in (32, 33):
        _assert_same_outputs(stale, result.model, {"x": rng.normal(size=(2, 3, size, size)).astype(np.float32)})


def test_the_issue_model_verifies_at_the_odd_size_too() -> None:
    model, bn = _bn_with_shift_before_same_conv(["N", 3, "H", "W"])
    stale = _declare(model, bn, [2, 3, 32, 32])
    for size in (32, 33):
        result = bnfold.fold(stale, input_shapes={"x": [2, 3, size, size]})
        assert result.report.verification.passed


def test_value_info_contradicting_inferred_shapes_loses_to_inference() -> None:
    # The input is 5x5: SAME with k=2, s=2 pads. A value_info saying 4x4 (no padding) is wrong.
    model, bn = _bn_with_shift_before_same_conv([1, 3, 5, 5])
    result = bnfold.fold(_declare(model, bn, [1, 3, 4, 4]), verify=False)
    assert [s.reason for s in result.report.skipped] == [Reason.PADDED_CONSUMER]
    _assert_same_outputs(model, result.model, {"x": np.random.default_rng(1).normal(size=(1, 3, 5, 5)).astype(np.float32)})


def test_inferred_shapes_fold_what_a_contradicting_value_info_would_refuse() -> None:
    # The input is 4x4: SAME with k=2, s=2 pads nothing, so the shift folds forward exactly.
    model, bn = _bn_with_shift_before_same_conv([1, 3, 4, 4])
    result = bnfold.fold(_declare(model, bn, [1, 3, 5, 5]))
    assert op_types(result.model) == ["Conv"]
    assert result.report.verification.passed


def _conv_then_reshape(x_shape: list, target: list, claimed: dict[str, list]) -> onnx.ModelProto:
    """x -> Conv 1x1 (4 channels) -> Reshape(target built by a Concat of constants) -> BN(4)."""
    g = GraphBuilder(np.random.default_rng(5))
    x = g.input("x", x_shape)
    y = g.conv(x, 4, 4, kernel=1)
    parts = [g.node("Constant", [], value=onnx.numpy_helper.from_array(np.array([d], np.int64))) for d in target]
    reshaped = g.node("Reshape", [y, g.node("Concat", parts, axis=0)])
    out = g.bn(reshaped, 4)
    model = g.model([out], check=False)
    for name, shape in claimed.items():
        model = _declare(model, {"conv": y, "reshape": reshaped}[name], shape)
    return model


def test_layout_reshape_tracking_ignores_a_stale_value_info() -> None:
    # [1, 4, 2, 2] -> [2, 4, 2, 1] mixes channels (channel c of the result holds elements of two
    # input channels); a value_info claiming [1, 4, 2, 2] would make it look like a no-op.
    model = _conv_then_reshape([1, 4, 2, 2], [2, 4, 2, 1], {"reshape": [1, 4, 2, 2]})
    result = bnfold.fold(model, verify=False)
    assert [s.reason for s in result.report.skipped] == [Reason.CHANNEL_AXIS_MISMATCH]
    _assert_same_outputs(model, result.model, {"x": np.random.default_rng(2).normal(size=(1, 4, 2, 2)).astype(np.float32)})


def test_layout_reshape_tracking_does_not_fill_symbolic_dims_from_value_info() -> None:
    # [N, 4, H, W] -> [-1, 4, 8] keeps channels whole only when H*W == 8; the graph leaves H and W
    # symbolic, and a value_info claiming the Conv output is [N, 4, 2, 4] must not settle it.
    model = _conv_then_reshape(["N", 4, "H", "W"], [-1, 4, 8], {"conv": ["N", 4, 2, 4], "reshape": ["N", 4, 8]})
    result = bnfold.fold(model, verify=False)
    assert [s.reason for s in result.report.skipped] == [Reason.UNKNOWN_SHAPE]
    assert "Reshape" in result.report.skipped[0].detail
    _assert_same_outputs(model, result.model, {"x": np.random.default_rng(2).normal(size=(1, 4, 4, 4)).astype(np.float32)})


def test_layout_reshape_with_a_proven_target_still_folds() -> None:
    # The Concat of constants is evaluated by inference (data propagation): [N, 4, H, W] -> [0, 4, -1]
    # keeps every channel whole, so the BN folds backward through the Reshape.
    model = _conv_then_reshape(["N", 4, "H", "W"], [0, 4, -1], {})
    result = bnfold.fold(model, input_shapes={"x": [2, 4, 3, 5]})
    assert "BatchNormalization" not in op_types(result.model)
    assert result.report.verification.passed


def _matmul_after_dynamic_reshape(shape_dims: list) -> tuple[onnx.ModelProto, str]:
    """x[8, 4] -> Reshape(x, s) -> MatMul(W[4, 4]) -> BN(4) -> Flatten; `s` is a graph input of shape `shape_dims`."""
    g = GraphBuilder(np.random.default_rng(7))
    x = g.input("x", [8, 4])
    s = g.input("s", shape_dims, dtype=np.int64)
    reshaped = g.node("Reshape", [x, s])
    y = g.node("Flatten", [g.bn(g.matmul(reshaped, 4, 4), 4)])
    model = g.model([y], check=False)
    model.graph.output[0].CopyFrom(helper.make_tensor_value_info(y, FLOAT, ["A", "B"]))  # the checker wants a shape
    return model, reshaped


def test_matmul_rank_comes_from_inference_not_value_info() -> None:
    # `s` has 3 entries: the MatMul input is rank 3 and the BN's axis 1 is not its feature axis.
    model, reshaped = _matmul_after_dynamic_reshape([3])
    stale = _declare(model, reshaped, [8, 4])
    result = bnfold.fold(stale, verify=False)
    assert [s.reason for s in result.report.skipped] == [Reason.CHANNEL_AXIS_MISMATCH]
    feeds = {"x": np.random.default_rng(3).normal(size=(8, 4)).astype(np.float32), "s": np.array([2, 4, 4])}
    _assert_same_outputs(stale, result.model, feeds)


def test_matmul_of_symbolic_rank_is_refused_as_unknown_shape() -> None:
    model, reshaped = _matmul_after_dynamic_reshape(["K"])
    result = bnfold.fold(_declare(model, reshaped, [8, 4]), verify=False)
    assert [s.reason for s in result.report.skipped] == [Reason.UNKNOWN_SHAPE]


def test_per_channel_constant_needs_a_proven_channel_count() -> None:
    # Mul by a [1, 4, 1, 1] constant is per-channel only if the tensor has 4 channels; here it has 1
    # (the Mul broadcasts it up to 4) and a value_info claims 4. Folding it into the Conv would be wrong.
    g = GraphBuilder(np.random.default_rng(9))
    x = g.input("x", [1, 1, 3, 3])
    scaled = g.node("Mul", [x, g.const(g.rng.uniform(0.5, 2.0, (1, 4, 1, 1)))])
    y = g.conv(scaled, 4, 2, kernel=1)
    stale = _declare(g.model([y], check=False), scaled, [1, 1, 3, 3])
    result = bnfold.fold(stale, verify=False)
    assert op_types(result.model) == ["Mul", "Conv"]


@pytest.mark.parametrize("symbolic", [True, False])
def test_same_padding_with_unit_kernel_needs_no_shapes(symbolic: bool) -> None:
    # k=1, s=1 SAME pads nothing whatever the input size: folded without any shape.
    g = GraphBuilder(np.random.default_rng(11))
    x = g.input("x", ["N", 3, "H", "W"] if symbolic else [1, 3, 5, 5])
    y = g.conv(g.bn(x, 3), 3, 4, kernel=1, auto_pad="SAME_UPPER")
    result = bnfold.fold(g.model([y]), input_shapes={"x": [1, 3, 5, 7]} if symbolic else None)
    assert op_types(result.model) == ["Conv"]


@pytest.mark.parametrize("skeleton", [False, True])
def test_inference_on_evidence_never_strips_the_model_being_folded(skeleton: bool, monkeypatch: pytest.MonkeyPatch
                                                                   ) -> None:
    # Shape inference runs on a copy without value_info (a skeleton copy for large models): the
    # folded model keeps the value_info of values that still exist.
    from bnfold import shapes

    if skeleton:
        monkeypatch.setattr(shapes, "SKELETON_ABOVE_BYTES", 0)
    model, bn = _bn_with_shift_before_same_conv([1, 3, 5, 5])
    declared = {v.name for v in model.graph.value_info}
    result = bnfold.fold(model)  # SAME padding: shape inference runs
    assert [s.reason for s in result.report.skipped] == [Reason.PADDED_CONSUMER]
    assert {v.name for v in result.model.graph.value_info} == declared
