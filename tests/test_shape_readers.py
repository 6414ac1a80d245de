"""Readers that look only at a value's shape or dtype (Shape, Size, CastLike's type input) do not
block a fold; they are rewired to a value of the same shape when the one they read goes away, and
left alone when it stays. A reader of the numbers still blocks, with the reason saying so."""

from __future__ import annotations

import numpy as np
import onnx
from helpers import op_types, random_feeds, run

import bnfold
from benchmarks.graph_builder import GraphBuilder
from bnfold.report import Reason


def folded_and_equal(model: onnx.ModelProto) -> bnfold.FoldResult:
    """Fold with verification, and compare every output with onnxruntime (optimizations off)."""
    result = bnfold.fold(model)
    assert result.report.verification.passed
    feeds = random_feeds(model)
    for want, have in zip(run(model, feeds), run(result.model, feeds)):
        assert have.shape == want.shape and have.dtype == want.dtype
        np.testing.assert_allclose(have, want, rtol=1e-5, atol=1e-5)
    return result


def reader_input(model: onnx.ModelProto, op_type: str, slot: int = 0) -> str:
    (node,) = [n for n in model.graph.node if n.op_type == op_type]
    return node.input[slot]


def test_levit_linear_norm_with_reshape_as_folds() -> None:
    # timm LeViT LinearNorm: bn(linear(x).flatten(0, 1)).reshape_as(linear(x))
    g = GraphBuilder()
    x = g.input("x", [2, 5, 6])
    y = g.matmul(x, 6, 8)
    shape = g.node("Shape", [y])
    z = g.bn(g.node("Flatten", [y], axis=2), 8)
    model = g.model([g.node("Reshape", [z, shape])])
    result = folded_and_equal(model)
    assert "BatchNormalization" not in op_types(result.model)
    assert [(r.op_type, r.direction) for r in result.report.folded] == [("BatchNormalization", "backward")]
    assert reader_input(result.model, "Shape") == y  # the MatMul keeps its output: nothing to rewire


def test_shape_reader_of_the_layer_output_is_rewired_to_the_folded_output() -> None:
    g = GraphBuilder()
    x = g.input("x", [4, 6])
    y = g.matmul(x, 6, 3)
    shape, size = g.node("Shape", [y]), g.node("Size", [y])
    like = g.node("CastLike", [g.const(np.ones(2, np.float64), dtype=np.float64), y])
    out = g.bn(y, 3)
    model = g.model([out, shape, size, like])
    result = folded_and_equal(model)
    assert op_types(result.model).count("BatchNormalization") == 0
    assert "Gemm" in op_types(result.model)
    assert reader_input(result.model, "Shape") == out and reader_input(result.model, "Size") == out
    assert reader_input(result.model, "CastLike", 1) == out


def test_shape_reader_of_a_chain_link_before_a_rank3_matmul_bias_reads_the_matmul() -> None:
    # MatMul [2, 3, 4] -> Mul -> Add, Shape reads the Mul's output (it sits before the chain end's
    # producer): it must read a value produced before it, with the same shape.
    g = GraphBuilder()
    x = g.input("x", [2, 3, 4])
    y = g.matmul(x, 4, 5)
    m = g.node("Mul", [y, g.const(g.rng.uniform(0.5, 2, 5))])
    shape = g.node("Shape", [m])
    out = g.node("Add", [m, g.const(g.rng.normal(size=5))])
    model = g.model([out, shape])
    result = folded_and_equal(model)
    # Both maps fold (the Shape reader of the link between them does not stop the chain).
    assert [r.op_type for r in result.report.folded] == ["Mul", "Add"]
    (matmul,) = [n for n in result.model.graph.node if n.op_type == "MatMul"]
    assert reader_input(result.model, "Shape") == matmul.output[0]


def test_shape_reader_on_a_layout_path_keeps_reading_the_unfolded_layout() -> None:
    # Trap: MatMul [2, 3, 5] -> Transpose -> [2, 5, 3] -> BN. A Shape of the MatMul output must stay
    # [2, 3, 5]; rewiring it to the BN's output would give [2, 5, 3].
    g = GraphBuilder()
    x = g.input("x", [2, 3, 6])
    y = g.matmul(x, 6, 5)
    shape = g.node("Shape", [y])
    out = g.bn(g.node("Transpose", [y], perm=[0, 2, 1]), 5)
    model = g.model([out, shape])
    result = folded_and_equal(model)
    assert "BatchNormalization" not in op_types(result.model)
    assert reader_input(result.model, "Shape") == y
    assert run(result.model, random_feeds(model))[1].tolist() == [2, 3, 5]


def test_shape_reader_of_the_last_layout_node_follows_its_renamed_output() -> None:
    # Conv -> Transpose (NHWC) -> Mul by [C]: the Transpose takes over the Mul's output name; a
    # Shape of its old output reads the new name (same [N, H, W, C] shape).
    g = GraphBuilder()
    x = g.input("x", [1, 3, 4, 5])
    t = g.node("Transpose", [g.conv(x, 3, 2, pads=[1, 1, 1, 1])], perm=[0, 2, 3, 1])
    shape = g.node("Shape", [t])
    out = g.node("Mul", [t, g.const(np.array([2.0, -0.5]))])
    model = g.model([out, shape])
    result = folded_and_equal(model)
    assert "Mul" not in op_types(result.model)
    assert reader_input(result.model, "Shape") == out


def test_shape_readers_of_values_the_fold_keeps_stay_as_they_are() -> None:
    # Trap: Shapes of the Conv's input and of the BN's output (whose name the folded Conv takes over)
    # read values that stay: they are not touched.
    g = GraphBuilder()
    x = g.input("x", [1, 3, 6, 6])
    out = g.bn(g.conv(x, 3, 4, pads=[1, 1, 1, 1]), 4)
    of_input, of_output = g.node("Shape", [x]), g.node("Shape", [out])
    model = g.model([out, of_input, of_output])
    result = folded_and_equal(model)
    shapes = [n.input[0] for n in result.model.graph.node if n.op_type == "Shape"]
    assert shapes == [x, out]


def test_forward_fold_rewires_a_shape_reader_of_the_bn_to_its_input() -> None:
    g = GraphBuilder()
    x = g.input("x", [2, 3, 5, 5])
    b = g.bn(x, 3)
    shape = g.node("Shape", [b])
    model = g.model([g.conv(b, 3, 4, kernel=1), shape])
    result = folded_and_equal(model)
    assert "BatchNormalization" not in op_types(result.model)
    assert reader_input(result.model, "Shape") == x


def test_shape_reader_of_merged_chain_link_reads_the_chain_input() -> None:
    g = GraphBuilder()
    x = g.input("x", [2, 3, 4, 4])
    r = g.relu(x)
    b = g.bn(r, 3)
    shape = g.node("Shape", [b])
    model = g.model([g.relu(g.bn(b, 3)), shape])
    result = folded_and_equal(model)
    assert op_types(result.model).count("BatchNormalization") == 1
    assert reader_input(result.model, "Shape") == r


def test_a_reader_of_the_numbers_still_blocks_and_says_so() -> None:
    # Like LeViT, but the MatMul output is also read by a Relu: the BN stays, and the reason is the
    # extra reader (it used to be no_foldable_neighbour, naming the Flatten).
    g = GraphBuilder()
    x = g.input("x", [2, 5, 6])
    y = g.matmul(x, 6, 8)
    z = g.bn(g.node("Flatten", [y], axis=2), 8)
    model = g.model([z, g.relu(y)])
    result = bnfold.fold(model)
    assert [(s.reason, s.op_type) for s in result.report.skipped] == \
        [(Reason.PRODUCER_HAS_OTHER_CONSUMERS, "BatchNormalization")]
    assert "2 consumers" in result.report.skipped[0].detail
