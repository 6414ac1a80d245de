"""Per-channel Mul/Add/Sub/Div after a layer folded into it, their broadcasting traps (a constant that
broadcasts over W, varies along H, has a higher rank or an unknown-rank operand), and merges of affine
chains into a single BatchNormalization.

Every test runs the original and the folded model in onnxruntime (optimizations off) and checks
the report: which nodes were folded, in which direction, into which layer.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from affine_checks import (
    BN,
    assert_untouched,
    const_of,
    fold_and_compare,
    node_named,
    padded_conv_graph,
    records,
)
from helpers import model_from_text, op_types, run

import bnfold
from benchmarks.graph_builder import GraphBuilder
from bnfold.report import FoldedRecord, Reason, op_counts

# --- per-channel Mul / Add / Sub / Div after a layer -----------------------------------------------


def test_conv_mul_add_fold_into_conv() -> None:
    g, conv = padded_conv_graph(channels=8)
    scaled = g.node("Mul", [conv, const_of(g, (1, 8, 1, 1))])
    y = g.node("Add", [scaled, const_of(g, (8, 1, 1), -1.0, 1.0)])
    model = g.model([y])
    result = fold_and_compare(model)
    assert op_types(result.model) == ["Conv"]
    into = [node_named(model, conv).name]
    assert records(result) == [("Mul", "backward", into), ("Add", "backward", into)]
    assert result.model.graph.node[0].output[0] == y


@pytest.mark.parametrize("shape", [(), (1,), (1, 1, 1, 1)])
@pytest.mark.parametrize("constant_first", [False, True])
def test_conv_mul_by_scalar_folds(shape: tuple[int, ...], constant_first: bool) -> None:
    g, conv = padded_conv_graph(channels=4)
    k = g.const(np.full(shape, 1.75), "k")
    y = g.node("Mul", [k, conv] if constant_first else [conv, k])
    model = g.model([y])
    result = fold_and_compare(model)
    assert op_types(result.model) == ["Conv"]
    assert records(result) == [("Mul", "backward", [node_named(model, conv).name])]


@pytest.mark.parametrize("op", ["Mul", "Add"])
def test_c_shaped_constant_after_conv_broadcasts_over_w_and_is_not_folded(op: str) -> None:
    # The trap: NCHW conv output with C == H == W == 8. A [C]-shaped constant right-aligns with W, so
    # it scales columns, not channels. Every shape lines up, so a wrong fold would go unnoticed.
    g, conv = padded_conv_graph(channels=8, size=8)
    y = g.node(op, [conv, const_of(g, (8,))])
    model = g.model([y])
    result = fold_and_compare(model)
    assert op_types(result.model) == ["Conv", op]
    assert_untouched(model, result)


def test_add_varying_along_h_is_not_folded() -> None:
    g, conv = padded_conv_graph(channels=8, size=8)
    y = g.node("Add", [conv, const_of(g, (8, 1), -1.0, 1.0)])  # [C,1] right-aligns with (H, W)
    model = g.model([y])
    result = fold_and_compare(model)
    assert op_types(result.model) == ["Conv", "Add"]
    assert_untouched(model, result)


def test_constant_of_higher_rank_is_not_folded() -> None:
    g, conv = padded_conv_graph(channels=4)
    y = g.node("Mul", [conv, g.const(np.full((1, 1, 1, 1, 1), 2.0), "k")])  # output becomes rank 5
    model = g.model([y])
    result = fold_and_compare(model)
    assert_untouched(model, result)


@pytest.mark.parametrize("op", ["Sub", "Div"])
def test_x_minus_or_over_per_channel_constant_folds(op: str) -> None:
    g, conv = padded_conv_graph(channels=4)
    y = g.node(op, [conv, const_of(g, (4, 1, 1))])
    model = g.model([y])
    result = fold_and_compare(model)
    assert op_types(result.model) == ["Conv"]
    assert records(result) == [(op, "backward", [node_named(model, conv).name])]


def test_constant_over_x_is_not_folded() -> None:
    g, conv = padded_conv_graph(channels=4)
    y = g.node("Div", [const_of(g, (4, 1, 1)), conv])
    model = g.model([y])
    result = fold_and_compare(model)
    assert op_types(result.model) == ["Conv", "Div"]
    assert_untouched(model, result)


@pytest.mark.parametrize("shape", [(4, 1, 1), (1, 4, 1, 1), ()])
def test_constant_minus_x_folds_backward_as_a_negated_map(shape: tuple[int, ...]) -> None:
    g, conv = padded_conv_graph(channels=4)
    y = g.node("Sub", [const_of(g, shape, -1.0, 1.0), conv])
    model = g.model([y])
    conv_node = node_named(model, conv)
    weight_before = onnx.numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == conv_node.input[1]))
    result = fold_and_compare(model)
    assert op_types(result.model) == ["Conv"]
    assert records(result) == [("Sub", "backward", [conv_node.name])]
    folded = node_named(result.model, y)
    weight_after = onnx.numpy_helper.to_array(next(t for t in result.model.graph.initializer if t.name == folded.input[1]))
    np.testing.assert_array_equal(weight_after, -weight_before)  # negation is exact


def test_constant_minus_x_folds_forward_into_gemm() -> None:
    g = GraphBuilder()
    x = g.input("x", [3, 5])
    y = g.node("Sub", [const_of(g, (5,), -1.0, 1.0), x])
    y = g.gemm(y, 5, 4, trans_b=1)
    model = g.model([y])
    result = fold_and_compare(model)
    assert op_types(result.model) == ["Gemm"]
    assert records(result)[0][:2] == ("Sub", "forward")


def test_bn_then_constant_minus_x_after_concat_merges_into_one_bn() -> None:
    g = GraphBuilder()
    x = g.input("x", [2, 3, 6, 6])
    y = g.node("Concat", [x, x], axis=1)
    y = g.bn(y, 6)
    y = g.node("Sub", [const_of(g, (1, 6, 1, 1), -1.0, 1.0), y])
    model = g.model([g.relu(y)])
    result = fold_and_compare(model)
    assert op_types(result.model) == ["Concat", BN, "Relu"]


def test_div_by_zero_constant_is_not_folded() -> None:
    g, conv = padded_conv_graph(channels=4)
    y = g.node("Div", [conv, g.const(np.array([1.0, 0.0, 2.0, 4.0]).reshape(4, 1, 1), "k")])
    model = g.model([y])
    assert_untouched(model, fold_and_compare(model))


def test_gemm_mul_per_output_folds() -> None:
    g = GraphBuilder()
    x = g.input("x", [5, 4])
    gemm = g.gemm(x, 4, 5, trans_b=1, alpha=0.5)
    y = g.node("Mul", [gemm, const_of(g, (5,))])  # [N]: the Gemm's output features
    model = g.model([y])
    result = fold_and_compare(model)
    assert op_types(result.model) == ["Gemm"]
    assert records(result) == [("Mul", "backward", [node_named(model, gemm).name])]


def test_gemm_mul_per_row_is_not_folded() -> None:
    g = GraphBuilder()
    x = g.input("x", [5, 4])
    gemm = g.gemm(x, 4, 5)
    y = g.node("Mul", [gemm, const_of(g, (5, 1))])  # [M,1]: scales batch rows (M == N == 5)
    model = g.model([y])
    assert_untouched(model, fold_and_compare(model))


# --- merges into one BatchNormalization --------------------------------------------------------------


def concat_graph(channels: tuple[int, int] = (2, 3), size: int = 6) -> tuple[GraphBuilder, str]:
    g = GraphBuilder()
    a = g.input("a", [2, channels[0], size, size])
    b = g.input("b", [2, channels[1], size, size])
    return g, g.node("Concat", [a, b], axis=1)


@pytest.mark.parametrize("then_relu", [True, False])
def test_bn_bn_after_concat_merges_into_one_bn(then_relu: bool) -> None:
    g, cat = concat_graph()
    first = g.bn(cat, 5)
    second = g.bn(first, 5)
    y = g.relu(second) if then_relu else second
    model = g.model([y])
    result = fold_and_compare(model)
    assert op_counts(result.model).get(BN) == 1
    assert op_types(result.model) == ["Concat", BN] + (["Relu"] if then_relu else [])
    first_name = node_named(model, first).name
    assert [(r.node, r.direction, r.into) for r in result.report.folded] == \
        [(node_named(model, second).name, "merged", [first_name])]
    merged = node_named(result.model, second)
    assert merged.op_type == BN and merged.input[0] == cat
    # The merged BN stays (nothing can absorb it) and is reported under the first BN's name.
    assert [r.node for r in result.report.skipped] == [first_name]
    if then_relu:
        assert result.report.skipped[0].reason == Reason.NO_FOLDABLE_NEIGHBOUR


def test_bn_mul_add_after_concat_merges_into_one_bn() -> None:
    g, cat = concat_graph()
    bn = g.bn(cat, 5)
    scaled = g.node("Mul", [bn, const_of(g, (5, 1, 1))])
    y = g.node("Add", [scaled, const_of(g, (1, 5, 1, 1), -1.0, 1.0)])
    model = g.model([g.relu(y)])
    result = fold_and_compare(model)
    assert op_types(result.model) == ["Concat", BN, "Relu"]
    bn_name = node_named(model, bn).name
    assert records(result) == [("Mul", "merged", [bn_name]), ("Add", "merged", [bn_name])]
    assert node_named(result.model, y).op_type == BN


def test_bn_then_c_shaped_mul_after_concat_is_not_merged() -> None:
    # Concat output [2, 6, 6, 6]: C == H == W, and a [C] constant acts on W, not on channels.
    g, cat = concat_graph(channels=(2, 4), size=6)
    y = g.node("Mul", [g.bn(cat, 6), const_of(g, (6,))])
    model = g.model([y])
    result = fold_and_compare(model)
    assert op_types(result.model) == ["Concat", BN, "Mul"]
    assert_untouched(model, result)


def test_broadcasting_mul_after_one_channel_bn_is_not_merged() -> None:
    # BN over 1 channel, then a [1,3,1,1] constant that broadcasts the tensor to 3 channels. A merged
    # BN with 3 channels cannot take a 1-channel input.
    g = GraphBuilder()
    x = g.input("x", [2, 1, 6, 6])
    bn = g.bn(g.relu(x), 1)
    y = g.node("Mul", [bn, const_of(g, (1, 3, 1, 1))])
    model = g.model([y])
    assert_untouched(model, fold_and_compare(model))


def test_merge_chain_on_rank2_tensor() -> None:
    # BN over [N, C] (channels on axis 1 == last axis): a [C] constant is per-channel here.
    g = GraphBuilder()
    a = g.input("a", [3, 2])
    b = g.input("b", [3, 4])
    cat = g.node("Concat", [a, b], axis=1)
    bn = g.bn(cat, 6)
    y = g.node("Mul", [bn, const_of(g, (6,))])
    model = g.model([y])
    result = fold_and_compare(model)
    assert op_types(result.model) == ["Concat", BN]
    assert records(result) == [("Mul", "merged", [node_named(model, bn).name])]


def test_folded_records_name_existing_layers() -> None:
    # A mix: Conv -> BN -> Mul backward, then BN on the result's Relu feeding an unpadded Conv forward.
    g, conv = padded_conv_graph(channels=4)
    y = g.node("Mul", [g.bn(conv, 4), const_of(g, (4, 1, 1))])
    z = g.conv(g.bn(g.relu(y), 4), 4, 2)
    model = g.model([z])
    result = fold_and_compare(model)
    assert op_types(result.model) == ["Conv", "Relu", "Conv"]
    names = {node.name for node in result.model.graph.node}
    assert all(set(r.into) <= names for r in result.report.folded)
    directions = sorted((r.op_type, r.direction) for r in result.report.folded)
    assert directions == [(BN, "backward"), (BN, "forward"), ("Mul", "backward")]
    assert all(isinstance(r, FoldedRecord) and r.graph == "main" for r in result.report.folded)


def test_all_ones_constant_on_a_tensor_of_unknown_rank_is_not_a_scalar():
    # Reshape to a runtime shape hides the rank; the Mul by k[1,1,1,1] may add axes to it.
    rng = np.random.default_rng(1)
    model = model_from_text("""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[6, 5] x0, int64[r] s) => (float[a, b, c, d] y) {
            x = Reshape(x0, s)
            c = MatMul(x, W)
            y = Mul(c, k)
        }""", {"W": rng.standard_normal((5, 6)).astype(np.float32), "k": np.full((1, 1, 1, 1), 2.0, np.float32)})
    result = bnfold.fold(model, verify=False)
    assert [n.op_type for n in result.model.graph.node] == ["Reshape", "MatMul", "Mul"]
    assert result.report.folded == []
    feeds = {"x0": rng.standard_normal((6, 5)).astype(np.float32), "s": np.array([6, 5])}
    assert run(result.model, feeds)[0].shape == run(model, feeds)[0].shape == (1, 1, 6, 6)


def test_added_bias_nodes_of_unnamed_matmuls_do_not_share_a_name():
    rng = np.random.default_rng(2)
    weights = {f"{n}{i}": rng.standard_normal(s).astype(np.float32)
               for i in (1, 2) for n, s in (("W", (5, 6)), ("k", (6,)), ("a", (6,)))}
    model = model_from_text("""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[2, 3, 5] x) => (float[2, 3, 6] y1, float[2, 3, 6] y2) {
            c1 = MatMul(x, W1)
            d1 = Mul(c1, k1)
            y1 = Add(d1, a1)
            c2 = MatMul(x, W2)
            d2 = Mul(c2, k2)
            y2 = Add(d2, a2)
        }""", weights)
    result = bnfold.fold(model)  # verification loads the folded model in onnxruntime
    assert [n.op_type for n in result.model.graph.node] == ["MatMul", "Add", "MatMul", "Add"]
    names = [n.name for n in result.model.graph.node if n.name]
    assert len(names) == len(set(names))
    assert result.report.verification.passed
