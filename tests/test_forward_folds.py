"""Forward folds: an affine map (BN, per-channel Mul/Add/Sub/Div) absorbed by the layers it feeds, where
padding, SAME padding, a shift before a ConvTranspose or a broadcast that adds channels allow it and
where they do not.

Every test runs the original and the folded model in onnxruntime (optimizations off) and checks
the report: which nodes were folded, in which direction, into which layer.
"""

from __future__ import annotations

import numpy as np
import pytest
from affine_checks import (
    BN,
    assert_untouched,
    const_of,
    fold_and_compare,
    node_named,
    records,
)
from helpers import op_types
from onnx import helper

import bnfold
from benchmarks.graph_builder import GraphBuilder
from bnfold.report import Reason

# --- forward folds into Conv ---------------------------------------------------------------------

CONV_CASES = {
    "1d": {"shape": [2, 3, 12], "c_in": 3, "c_out": 4, "dims": 1, "attrs": {}},
    "2d": {"shape": [2, 3, 8, 8], "c_in": 3, "c_out": 4, "dims": 2, "attrs": {}},
    "3d": {"shape": [1, 3, 5, 6, 5], "c_in": 3, "c_out": 2, "dims": 3, "attrs": {}},
    "grouped": {"shape": [2, 6, 8, 8], "c_in": 6, "c_out": 4, "dims": 2, "attrs": {"group": 2}},
    "depthwise": {"shape": [2, 4, 8, 8], "c_in": 4, "c_out": 8, "dims": 2, "attrs": {"group": 4}},
    "valid_strided": {"shape": [2, 3, 9, 9], "c_in": 3, "c_out": 4, "dims": 2,
                      "attrs": {"auto_pad": "VALID", "strides": [2, 2], "dilations": [1, 2]}},
    "same_1x1": {"shape": [2, 3, 8, 8], "c_in": 3, "c_out": 5, "dims": 2,
                 "attrs": {"auto_pad": "SAME_UPPER", "kernel": 1}},
    "zero_pads": {"shape": [2, 3, 8, 8], "c_in": 3, "c_out": 4, "dims": 2, "attrs": {"pads": [0, 0, 0, 0]}},
}


@pytest.mark.parametrize("case", sorted(CONV_CASES))
@pytest.mark.parametrize("conv_bias", [True, False])
def test_bn_on_input_folds_forward_into_unpadded_conv(case: str, conv_bias: bool) -> None:
    spec = CONV_CASES[case]
    attrs = dict(spec["attrs"])
    kernel = attrs.pop("kernel", 3)
    g = GraphBuilder()
    x = g.input("x", spec["shape"])
    bn = g.bn(x, spec["c_in"])
    y = g.conv(bn, spec["c_in"], spec["c_out"], kernel=kernel, dims=spec["dims"], bias=conv_bias, **attrs)
    model = g.model([y])
    result = fold_and_compare(model)
    assert op_types(result.model) == ["Conv"]
    conv = result.model.graph.node[0]
    assert conv.input[0] == x and conv.output[0] == y and len(conv.input) == 3  # the shift became a bias
    assert records(result) == [(BN, "forward", [node_named(model, y).name])]
    assert result.report.skipped == []


@pytest.mark.parametrize("trans_b", [0, 1])
@pytest.mark.parametrize("alpha_beta", [(1.0, 1.0), (0.5, 2.0)])
@pytest.mark.parametrize("c_shape", ["n", "absent", "1xn", "mx1", "mxn"])
def test_bn_folds_forward_into_gemm(trans_b: int, alpha_beta: tuple[float, float], c_shape: str) -> None:
    m, k, n = 3, 4, 5
    alpha, beta = alpha_beta
    shapes = {"n": (None,), "absent": None, "1xn": (1, n), "mx1": (m, 1), "mxn": (m, n)}
    g = GraphBuilder()
    x = g.input("x", [m, k])
    y = g.gemm(g.bn(x, k), k, n, trans_b=trans_b, c_shape=shapes[c_shape], alpha=alpha, beta=beta)
    model = g.model([y])
    result = fold_and_compare(model)
    assert op_types(result.model) == ["Gemm"]
    gemm = result.model.graph.node[0]
    assert gemm.input[0] == x and len(gemm.input) == 3
    attrs = {a.name: helper.get_attribute_value(a) for a in gemm.attribute}
    assert attrs.get("transB", 0) == trans_b
    assert records(result) == [(BN, "forward", [node_named(model, y).name])]


def test_bn_folds_forward_into_2d_matmul_as_gemm() -> None:
    g = GraphBuilder()
    x = g.input("x", [3, 4])
    y = g.matmul(g.bn(x, 4), 4, 6)
    model = g.model([y])
    result = fold_and_compare(model)
    assert op_types(result.model) == ["Gemm"]
    assert result.model.graph.node[0].input[0] == x
    assert records(result) == [(BN, "forward", [node_named(model, y).name])]


def test_per_channel_sub_folds_forward_into_conv() -> None:
    g = GraphBuilder()
    x = g.input("x", [2, 3, 8, 8])
    shifted = g.node("Sub", [x, const_of(g, (3, 1, 1), -1.0, 1.0)])
    scaled = g.node("Mul", [shifted, const_of(g, (1, 3, 1, 1))])
    y = g.conv(scaled, 3, 4)
    model = g.model([y])
    result = fold_and_compare(model)
    assert op_types(result.model) == ["Conv"]
    into = [node_named(model, y).name]
    assert records(result) == [("Sub", "forward", into), ("Mul", "forward", into)]


def test_bn_feeding_two_unpadded_convs_folds_into_both() -> None:
    g = GraphBuilder()
    x = g.input("x", [2, 3, 8, 8])
    bn = g.bn(x, 3)
    y1 = g.conv(bn, 3, 4)
    y2 = g.conv(bn, 3, 5, kernel=1, bias=False)
    model = g.model([y1, y2])
    result = fold_and_compare(model)
    assert op_types(result.model) == ["Conv", "Conv"]
    assert all(node.input[0] == x for node in result.model.graph.node)
    [record] = result.report.folded
    assert (record.op_type, record.direction) == (BN, "forward")
    assert sorted(record.into) == sorted([node_named(model, y1).name, node_named(model, y2).name])


def test_bn_feeding_an_unpadded_and_a_padded_conv_is_not_folded() -> None:
    g = GraphBuilder()
    x = g.input("x", [2, 3, 8, 8])
    bn = g.bn(x, 3)
    y1 = g.conv(bn, 3, 4)
    y2 = g.conv(bn, 3, 4, pads=[1, 1, 1, 1])
    model = g.model([y1, y2])
    result = fold_and_compare(model)
    assert_untouched(model, result)
    assert [r.reason for r in result.report.skipped] == [Reason.PADDED_CONSUMER]


@pytest.mark.parametrize("padding", [{"pads": [1, 1, 1, 1]}, {"pads": [0, 2, 1, 0]}, {"auto_pad": "SAME_UPPER"},
                                     {"auto_pad": "SAME_LOWER"}])
def test_a_pure_scale_folds_forward_into_a_padded_conv(padding: dict) -> None:
    """Zero padding is applied after the map; a map that only scales sends 0 to 0, so for it the
    padding does not matter (a shift would not reach the padded border)."""
    g = GraphBuilder()
    x = g.input("x", [2, 3, 8, 8])
    scaled = g.node("Mul", [x, g.const(g.rng.uniform(0.5, 2.0, (1, 3, 1, 1)))])
    y = g.conv(scaled, 3, 4, **padding)
    model = g.model([y])
    result = fold_and_compare(model)
    assert op_types(result.model) == ["Conv"]
    assert records(result) == [("Mul", "forward", [node_named(model, y).name])]


def test_bn_with_zero_shift_folds_forward_into_a_padded_conv() -> None:
    """beta = mean * gamma / sqrt(var + eps) makes a BN a pure scale (as in a freshly initialised
    network with beta = mean = 0)."""
    g = GraphBuilder()
    x = g.input("x", [2, 3, 8, 8])
    gamma = g.rng.uniform(0.5, 1.5, 3).astype(np.float32)
    bn = g.node("BatchNormalization", [x, g.const(gamma), g.const(np.zeros(3, np.float32)),
                                       g.const(np.zeros(3, np.float32)), g.const(g.rng.uniform(0.5, 2, 3))])
    y = g.conv(bn, 3, 4, pads=[1, 1, 1, 1])
    model = g.model([y])
    result = fold_and_compare(model)
    assert op_types(result.model) == ["Conv"]
    assert records(result) == [(BN, "forward", [node_named(model, y).name])]


@pytest.mark.parametrize(("size", "kernel", "stride", "folds"), [
    (8, 2, 2, True),    # ceil(8/2) = 4 outputs cover 8 inputs exactly: SAME pads 0
    (9, 3, 3, True),    # 3 outputs x stride 3 = 9: pads 0
    (9, 2, 2, False),   # 5 outputs need (5-1)*2 + 2 = 10 > 9: one padded column
    (8, 3, 1, False),   # stride 1, kernel 3: pads 2
])
def test_same_padding_is_computed_from_the_input_shape(size: int, kernel: int, stride: int, folds: bool) -> None:
    g = GraphBuilder()
    x = g.input("x", [2, 3, size, size])
    y = g.conv(g.bn(x, 3), 3, 4, kernel=kernel, strides=[stride, stride], auto_pad="SAME_UPPER")
    model = g.model([y])
    result = fold_and_compare(model)
    if folds:
        assert op_types(result.model) == ["Conv"]
        assert records(result) == [(BN, "forward", [node_named(model, y).name])]
    else:
        assert [s.reason for s in result.report.skipped] == [Reason.PADDED_CONSUMER]
        assert_untouched(model, result)


def test_same_padding_on_a_symbolic_input_is_not_folded() -> None:
    # Whether SAME pads depends on the run-time size: 8 would not pad, 9 would.
    g = GraphBuilder()
    x = g.input("x", [2, 3, "H", "W"])
    y = g.conv(g.bn(x, 3), 3, 4, kernel=2, strides=[2, 2], auto_pad="SAME_UPPER")
    model = g.model([y])
    result = bnfold.fold(model, input_shapes={"x": [2, 3, 8, 8]})
    assert [s.reason for s in result.report.skipped] == [Reason.UNKNOWN_SHAPE]
    assert op_types(result.model) == op_types(model)


@pytest.mark.parametrize("group", [1, 2])
def test_a_pure_scale_folds_forward_into_conv_transpose(group: int) -> None:
    g = GraphBuilder()
    x = g.input("x", [2, 4, 5, 5])
    scaled = g.node("Mul", [x, g.const(g.rng.uniform(-2.0, 2.0, (4, 1, 1)))])
    y = g.conv_transpose(scaled, 4, 6, group=group, strides=[2, 2], pads=[1, 1, 1, 1], output_padding=[1, 1])
    model = g.model([y])
    result = fold_and_compare(model)
    assert op_types(result.model) == ["ConvTranspose"]
    assert records(result) == [("Mul", "forward", [node_named(model, y).name])]


def test_bn_with_a_shift_before_conv_transpose_is_not_folded() -> None:
    g = GraphBuilder()
    x = g.input("x", [2, 4, 5, 5])
    y = g.conv_transpose(g.bn(x, 4), 4, 6, strides=[2, 2])
    model = g.model([y])
    result = fold_and_compare(model)
    assert [s.reason for s in result.report.skipped] == [Reason.CONSUMER_NOT_FOLDABLE]
    assert "pure scale" in result.report.skipped[0].detail
    assert_untouched(model, result)


def test_mul_then_add_before_a_padded_conv_is_not_folded() -> None:
    g = GraphBuilder()
    x = g.input("x", [2, 3, 8, 8])
    scaled = g.node("Mul", [x, g.const(g.rng.uniform(0.5, 2.0, (1, 3, 1, 1)))])
    shifted = g.node("Add", [scaled, g.const(g.rng.uniform(-1, 1, (1, 3, 1, 1)))])
    y = g.conv(shifted, 3, 4, pads=[1, 1, 1, 1])
    model = g.model([y])
    result = fold_and_compare(model)
    assert op_types(result.model) == op_types(model) and result.report.folded == []


def test_mul_by_c_shaped_constant_before_conv_is_not_folded_forward() -> None:
    # x is [N, C, H, W] with W == C: a [C] constant scales W, not the channels the Conv contracts.
    g = GraphBuilder()
    x = g.input("x", [2, 4, 6, 4])
    y = g.conv(g.node("Mul", [x, const_of(g, (4,))]), 4, 3)
    model = g.model([y])
    assert_untouched(model, fold_and_compare(model))


@pytest.mark.parametrize("layer", ["Conv", "Gemm"])
def test_broadcasting_mul_that_adds_channels_is_not_folded_forward(layer: str) -> None:
    # A constant with C > 1 channels on a 1-channel tensor broadcasts it to C channels: the layer
    # reads C channels that do not exist in x. Absorbing the Mul would leave it reading x directly.
    g = GraphBuilder()
    if layer == "Conv":
        x = g.input("x", [2, 1, 8, 8])
        y = g.conv(g.node("Mul", [x, const_of(g, (1, 4, 1, 1))]), 4, 6)
    else:
        x = g.input("x", [3, 1])
        y = g.gemm(g.node("Mul", [x, const_of(g, (4,))]), 4, 6)
    model = g.model([y])
    assert_untouched(model, fold_and_compare(model))


@pytest.mark.parametrize("pre_op", ["bn", "scalar_mul"])
def test_affine_before_and_bn_after_one_conv_fold_into_it(pre_op: str) -> None:
    # 3 input channels, 4 output channels: the map in front and the BN behind differ in size.
    g = GraphBuilder()
    x = g.input("x", [2, 3, 8, 8])
    pre = g.bn(x, 3) if pre_op == "bn" else g.node("Mul", [x, g.const(np.array(1.5), "k")])
    conv = g.conv(pre, 3, 4, bias=False)
    y = g.bn(conv, 4)
    model = g.model([y])
    result = fold_and_compare(model)
    assert op_types(result.model) == ["Conv"]
    node = result.model.graph.node[0]
    assert (node.input[0], node.output[0]) == (x, y)
    into = [node_named(model, conv).name]
    pre_type = BN if pre_op == "bn" else "Mul"
    assert sorted(records(result)) == sorted([(pre_type, "forward", into), (BN, "backward", into)])
