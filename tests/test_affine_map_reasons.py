"""Every per-channel Mul/Add/Sub/Div by a constant left next to a layer gets a reason record (text
and JSON), like a BN; misleading reasons fixed (weight on the left of a MatMul)."""

from __future__ import annotations

import json

import numpy as np
import onnx
from helpers import invoke, op_types

import bnfold
from benchmarks.graph_builder import GraphBuilder
from bnfold.report import Reason


def skipped(model: onnx.ModelProto) -> list[tuple[str, Reason]]:
    result = bnfold.fold(model)
    assert result.report.verification.passed
    return [(s.op_type, s.reason) for s in result.report.skipped]


def test_maps_left_next_to_layers_have_reasons_in_the_json_report(tmp_path) -> None:
    g = GraphBuilder()
    x = g.input("x", [1, 3, 6, 6])
    conv = g.conv(x, 3, 4, pads=[1, 1, 1, 1])
    mul = g.node("Mul", [conv, g.const(g.rng.uniform(0.5, 2, (4, 1, 1)))])  # conv also read by Relu
    sub = g.node("Sub", [g.relu(conv), g.const(g.rng.normal(size=(4, 1, 1)))])  # shift before a padded Conv
    div = g.node("Div", [g.conv(sub, 4, 6, pads=[1, 1, 1, 1]), g.const(np.full(6, 2.0))])  # [C] on NCHW: axis W
    model = g.model([mul, div])
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    result = invoke([path, "-o", tmp_path / "out.onnx", "--json"])
    assert result.exit_code == 0, result.stderr
    records = {r["op_type"]: r for r in json.loads(result.stdout)["skipped"]}
    assert {op: r["reason"] for op, r in records.items()} == {
        "Mul": "producer_has_other_consumers", "Sub": "padded_consumer", "Div": "channel_axis_mismatch"}
    assert records["Mul"]["output"] == mul and "2 consumers" in records["Mul"]["detail"]
    text = invoke([path, "-o", tmp_path / "out2.onnx"]).stdout
    assert f"skipped Sub '{sub}_node': padded_consumer" in text


def test_arithmetic_that_is_no_map_or_not_next_to_a_layer_gets_no_record() -> None:
    g = GraphBuilder()
    x = g.input("x", [1, 3, 6, 6])
    conv = g.conv(x, 3, 3, pads=[1, 1, 1, 1])
    residual = g.node("Add", [conv, x])  # two dynamic operands: not a map by a constant
    scaled = g.node("Mul", [g.relu(residual), g.const(np.float32(2.0))])  # between Relus only
    positive = g.node("Add", [g.relu(scaled), g.const(np.float32(1.0))])  # between a Relu and a Div only
    reciprocal = g.node("Div", [g.const(np.float32(1.0)), positive])  # c / x is not affine (x >= 1: finite)
    model = g.model([g.conv(g.relu(reciprocal), 3, 2, pads=[1, 1, 1, 1])])
    assert skipped(model) == []


def test_weight_on_the_left_of_a_matmul_is_refused_as_such() -> None:
    g = GraphBuilder()
    x = g.input("x", [6, 5])
    y = g.node("MatMul", [g.const(g.weights(4, 6), "w"), x])
    result = bnfold.fold(g.model([g.bn(y, 5)]))
    assert result.report.verification.passed and "BatchNormalization" in op_types(result.model)
    (record,) = result.report.skipped
    assert record.reason == Reason.WEIGHT_ON_LEFT
    assert "on the left" in record.detail and "graph input" not in record.detail


def test_bn_after_transpose_swapping_a_square_matmuls_axes_is_channel_axis_mismatch() -> None:
    g = GraphBuilder()
    x = g.input("x", [4, 6])
    t = g.node("Transpose", [g.matmul(x, 6, 4)], perm=[1, 0])  # [4, 4]: BN's axis 1 is the MatMul's rows
    assert skipped(g.model([g.bn(t, 4)])) == [("BatchNormalization", Reason.CHANNEL_AXIS_MISMATCH)]


def test_shift_only_after_a_rank3_matmul_is_no_gain() -> None:
    g = GraphBuilder()
    x = g.input("x", [2, 3, 6])
    y = g.node("Sub", [g.matmul(x, 6, 4), g.const(g.rng.normal(size=4))])
    assert skipped(g.model([y])) == [("Sub", Reason.NO_GAIN)]


def test_bias_add_written_by_a_fold_is_not_reported() -> None:
    # Mul then Add after a rank-3 MatMul fold into it; the bias stays as an Add bnfold wrote: it is
    # no map the user left, so it gets no record.
    g = GraphBuilder()
    x = g.input("x", [2, 3, 6])
    y = g.node("Mul", [g.matmul(x, 6, 4), g.const(g.rng.uniform(1, 2, 4))])
    result = bnfold.fold(g.model([g.node("Add", [y, g.const(g.rng.normal(size=4))])]))
    assert result.report.verification.passed
    assert op_types(result.model) == ["MatMul", "Add"] and result.report.skipped == []
