"""Layer -> layout-only nodes (Transpose, Reshape, Flatten, Squeeze, Unsqueeze, Identity) -> BN / affine
chain: the chain folds into the layer when the layer's channel axis maps one-to-one onto the axis
the chain acts on, and the layout nodes stay. Channel-scrambling layouts are refused.

Every fold is compared with the original in onnxruntime (optimizations off) on fresh inputs.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from helpers import op_types, random_feeds, run

import bnfold
from benchmarks.graph_builder import GraphBuilder
from bnfold.report import Reason

BN = "BatchNormalization"


def int64(values) -> np.ndarray:
    return np.asarray(values, dtype=np.int64)


def fold_and_compare(model: onnx.ModelProto, feeds: dict | None = None) -> bnfold.FoldResult:
    result = bnfold.fold(model)
    verification = result.report.verification
    assert verification.passed and verification.runtime_status == "passed", verification
    assert max(t.max_ulp_error for t in verification.tensors) <= 0.5
    onnx.checker.check_model(result.model, full_check=True)
    feeds = feeds or random_feeds(model, seed=3)
    for want, have in zip(run(model, feeds), run(result.model, feeds)):
        assert want.shape == have.shape
        np.testing.assert_allclose(have, want, rtol=1e-4, atol=1e-5)
    again = bnfold.fold(result.model, verify=False)
    assert again.report.folded == [] and op_types(again.model) == op_types(result.model)
    return result


def directions(result: bnfold.FoldResult) -> list[tuple[str, str]]:
    return [(r.op_type, r.direction) for r in result.report.folded]


@pytest.mark.parametrize("shape", [[-1, 5, 1, 1], [0, 5, 1, 1], [3, 5, 1, 1]])
def test_gemm_then_reshape_to_nchw_then_bn2d(shape: list[int]) -> None:
    """Linear -> view(N, C, 1, 1) -> BatchNorm2d."""
    g = GraphBuilder()
    x = g.input("x", [3, 6])
    y = g.node("Reshape", [g.gemm(x, 6, 5), g.const(int64(shape), dtype=np.int64)])
    model = g.model([g.relu(g.bn(y, 5))])
    result = fold_and_compare(model)
    assert op_types(result.model) == ["Gemm", "Reshape", "Relu"]
    assert directions(result) == [(BN, "backward")]


def test_gemm_then_unsqueeze_then_bn1d_on_symbolic_batch() -> None:
    g = GraphBuilder()
    x = g.input("x", ["N", 6])
    y = g.node("Unsqueeze", [g.gemm(x, 6, 5, trans_b=1), g.const(int64([2]), dtype=np.int64)])
    model = g.model([g.bn(y, 5)])
    result = fold_and_compare(model, {"x": np.random.default_rng(0).uniform(-1, 1, (4, 6)).astype(np.float32)})
    assert op_types(result.model) == ["Gemm", "Unsqueeze"]
    assert result.model.graph.output[0].name == model.graph.output[0].name


@pytest.mark.parametrize("batch", [2, "B"])
def test_matmul_over_time_then_transpose_then_bn1d(batch) -> None:
    """[B, T, K] @ [K, C] -> Transpose(0, 2, 1) -> BatchNorm1d over C: the bias goes after the
    Transpose as a [C, 1] Add (a rank-3 MatMul cannot become a Gemm)."""
    g = GraphBuilder()
    x = g.input("x", [batch, 7, 6])
    y = g.node("Transpose", [g.matmul(x, 6, 5)], perm=[0, 2, 1])
    model = g.model([g.relu(g.bn(y, 5))])
    feeds = {"x": np.random.default_rng(1).uniform(-1, 1, (2, 7, 6)).astype(np.float32)}
    result = fold_and_compare(model, feeds)
    assert op_types(result.model) == ["MatMul", "Transpose", "Add", "Relu"]
    add = result.model.graph.node[2]
    bias = next(t for t in result.model.graph.initializer if t.name == add.input[1])
    assert list(bias.dims) == [5, 1]


def test_conv_then_nhwc_transpose_then_per_channel_mul_add() -> None:
    """TF exports: Conv (NCHW) -> Transpose to NHWC -> Mul/Add by [C] constants (the last axis is
    the channel axis here) -> Transpose back."""
    g = GraphBuilder()
    x = g.input("x", [2, 3, 8, 8])
    y = g.node("Transpose", [g.conv(x, 3, 4, pads=[1, 1, 1, 1])], perm=[0, 2, 3, 1])
    y = g.node("Mul", [y, g.const(g.rng.uniform(0.5, 2.0, 4))])
    y = g.node("Add", [y, g.const(g.rng.normal(size=4))])
    model = g.model([g.node("Transpose", [y], perm=[0, 3, 1, 2])])
    result = fold_and_compare(model)
    assert op_types(result.model) == ["Conv", "Transpose", "Transpose"]
    assert directions(result) == [("Mul", "backward"), ("Add", "backward")]


def test_conv_then_flatten_then_bn1d() -> None:
    g = GraphBuilder()
    x = g.input("x", [2, 3, 3, 3])
    y = g.node("Flatten", [g.conv(x, 3, 4)])  # [2, 4, 1, 1] -> [2, 4]
    model = g.model([g.bn(y, 4)])
    assert op_types(fold_and_compare(model).model) == ["Conv", "Flatten"]


def test_chain_through_identity_and_squeeze() -> None:
    g = GraphBuilder()
    x = g.input("x", [2, 3, 1, 5])
    y = g.node("Identity", [g.conv(x, 3, 4, kernel=1)])
    y = g.node("Squeeze", [y, g.const(int64([2]), dtype=np.int64)])  # [2, 4, 5]
    model = g.model([g.bn(y, 4)])
    assert op_types(fold_and_compare(model).model) == ["Conv", "Identity", "Squeeze"]


# --- refused: the chain's axis is not the layer's channel axis --------------------------------------


def refused_untouched(model: onnx.ModelProto) -> bnfold.FoldResult:
    result = bnfold.fold(model)
    assert result.report.verification.passed
    assert result.report.folded == [] and op_types(result.model) == op_types(model)
    feeds = random_feeds(model)
    for want, have in zip(run(model, feeds), run(result.model, feeds)):
        np.testing.assert_array_equal(have, want)
    return result


def test_transpose_that_swaps_channels_with_an_equal_sized_axis_is_refused() -> None:
    # C == H == 4: BN on axis 1 of the transposed tensor normalises the conv's H axis.
    g = GraphBuilder()
    x = g.input("x", [2, 3, 4, 4])
    y = g.node("Transpose", [g.conv(x, 3, 4, pads=[1, 1, 1, 1])], perm=[0, 2, 1, 3])
    result = refused_untouched(g.model([g.bn(y, 4)]))
    # The layer is there; its channels are on another axis than the BN's (was no_foldable_neighbour).
    assert [s.reason for s in result.report.skipped] == [Reason.CHANNEL_AXIS_MISMATCH]


def test_reshapes_that_scramble_channels_are_refused() -> None:
    # [2, 4, 4, 4] -> [2, 4, 16] -> transpose -> [2, 16, 4] -> [2, 4, 4, 4]: axis 1 is no longer C.
    g = GraphBuilder()
    x = g.input("x", [2, 3, 4, 4])
    y = g.node("Reshape", [g.conv(x, 3, 4, pads=[1, 1, 1, 1]), g.const(int64([2, 4, 16]), dtype=np.int64)])
    y = g.node("Transpose", [y], perm=[0, 2, 1])
    y = g.node("Reshape", [y, g.const(int64([2, 4, 4, 4]), dtype=np.int64)])
    refused_untouched(g.model([g.bn(y, 4)]))


def test_reshape_that_moves_elements_across_channels_is_refused() -> None:
    # [2, 4, 2, 2] -> [2, 2, 4, 2]: axis 2 has 4 entries, but 2 of them come from each channel row.
    g = GraphBuilder()
    x = g.input("x", [2, 3, 2, 2])
    y = g.node("Reshape", [g.conv(x, 3, 4, pads=[1, 1, 1, 1]), g.const(int64([2, 2, 4, 2]), dtype=np.int64)])
    y = g.node("Transpose", [y], perm=[0, 2, 1, 3])  # [2, 4, 2, 2]
    refused_untouched(g.model([g.bn(y, 4)]))


def test_layout_node_with_another_reader_is_refused() -> None:
    g = GraphBuilder()
    x = g.input("x", [3, 6])
    y = g.node("Reshape", [g.gemm(x, 6, 5), g.const(int64([-1, 5, 1, 1]), dtype=np.int64)])
    refused_untouched(g.model([g.bn(y, 5), g.relu(y)]))


def test_layout_output_that_is_a_graph_output_is_refused() -> None:
    g = GraphBuilder()
    x = g.input("x", [3, 6])
    y = g.node("Reshape", [g.gemm(x, 6, 5), g.const(int64([-1, 5, 1, 1]), dtype=np.int64)])
    refused_untouched(g.model([g.bn(y, 5), y]))


def test_reshape_with_a_run_time_shape_is_refused_when_shapes_are_unknown() -> None:
    # The target shape comes from a graph input: nothing says where the channels end up.
    g = GraphBuilder()
    x = g.input("x", [3, 6])
    shape = g.input("shape", [4], dtype=np.int64)
    y = g.node("Reshape", [g.gemm(x, 6, 5), shape])
    model = g.model([g.bn(y, 5)], check=False)
    result = bnfold.fold(model, verify=False)
    assert result.report.folded == [] and op_types(result.model) == op_types(model)


# --- forward: chain -> layout nodes -> layer ---------------------------------------------------------


def test_bn2d_then_flatten_then_linear_folds_forward() -> None:
    """ArcFace-style head: residual Add -> BatchNorm2d -> Flatten -> Linear -> BatchNorm1d. The BN2d
    cannot go backward (an Add produces its input); forward, channel c covers Linear inputs
    c*H*W .. (c+1)*H*W - 1."""
    g = GraphBuilder()
    x = g.input("x", [2, 4, 3, 3])
    y = g.bn(g.node("Add", [x, x]), 4)
    y = g.bn(g.gemm(g.node("Flatten", [y]), 36, 5, trans_b=1), 5)
    model = g.model([y])
    result = fold_and_compare(model)
    assert op_types(result.model) == ["Add", "Flatten", "Gemm"]
    assert sorted(directions(result)) == [(BN, "backward"), (BN, "forward")]
    flatten = result.model.graph.node[1]
    assert flatten.input[0] == result.model.graph.node[0].output[0]


@pytest.mark.parametrize("batch", [2, "N"])
def test_bn_then_reshape_then_matmul_folds_forward(batch) -> None:
    g = GraphBuilder()
    x = g.input("x", [batch, 4, 3, 3])
    y = g.node("Reshape", [g.bn(g.relu(x), 4), g.const(int64([-1, 36]), dtype=np.int64)])
    model = g.model([g.matmul(y, 36, 5)])
    feeds = {"x": np.random.default_rng(2).uniform(-1, 1, (2, 4, 3, 3)).astype(np.float32)}
    assert op_types(fold_and_compare(model, feeds).model) == ["Relu", "Reshape", "Gemm"]


def test_channels_last_then_flatten_interleaves_channels() -> None:
    # Transpose to NHWC, then Flatten: feature f belongs to channel f % C.
    g = GraphBuilder()
    x = g.input("x", [2, 4, 3, 3])
    y = g.node("Transpose", [g.bn(g.relu(x), 4)], perm=[0, 2, 3, 1])
    model = g.model([g.gemm(g.node("Flatten", [y]), 36, 5)])
    assert op_types(fold_and_compare(model).model) == ["Relu", "Transpose", "Flatten", "Gemm"]


def test_scalar_maps_fold_forward_through_a_flatten() -> None:
    g = GraphBuilder()
    x = g.input("x", [2, 4, 3, 3])
    y = g.node("Mul", [g.relu(x), g.const(np.float32(0.5))])
    y = g.node("Add", [y, g.const(np.float32(0.25))])
    model = g.model([g.gemm(g.node("Flatten", [y]), 36, 5)])
    assert op_types(fold_and_compare(model).model) == ["Relu", "Flatten", "Gemm"]


def test_flatten_that_puts_channels_on_the_batch_side_is_refused() -> None:
    # Flatten(axis=2): [N, C, H, W] -> [N*C, H*W]; the Gemm contracts H*W, channels are rows.
    g = GraphBuilder()
    x = g.input("x", [2, 4, 3, 3])
    y = g.node("Flatten", [g.bn(g.relu(x), 4)], axis=2)
    result = refused_untouched(g.model([g.gemm(y, 9, 5)]))
    assert [s.reason for s in result.report.skipped] == [Reason.NO_FOLDABLE_NEIGHBOUR]


def test_flatten_with_another_reader_is_refused() -> None:
    g = GraphBuilder()
    x = g.input("x", [2, 4, 3, 3])
    flat = g.node("Flatten", [g.bn(g.relu(x), 4)])
    refused_untouched(g.model([g.gemm(flat, 36, 5), flat]))


def test_shifting_map_through_a_flatten_into_a_padded_conv_is_refused() -> None:
    # [N, C, 4] -> Unsqueeze -> [N, C, 4, 1] -> padded Conv: the padding would see 0, not the shift.
    g = GraphBuilder()
    x = g.input("x", [2, 3, 4])
    y = g.node("Unsqueeze", [g.bn(g.relu(x), 3), g.const(int64([3]), dtype=np.int64)])
    refused_untouched(g.model([g.conv(y, 3, 4, kernel=3, pads=[1, 1, 1, 1])]))
