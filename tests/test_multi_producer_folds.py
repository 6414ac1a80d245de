"""A BN (or per-channel map) after a node joining several layers folds into every one of them.

    Conv_a ─┐                              Conv_a' ─┐
            ├─ Concat(axis=1) ─ BN    ->            ├─ Concat     (slice i of the BN into layer i)
    Conv_b ─┘                              Conv_b' ─┘

    Conv_a ─┐                              Conv_a' (s, t) ─┐
            ├─ Add ─ BN               ->                   ├─ Add  (s*(a+b)+t = (s*a+t) + s*b)
    Conv_b ─┘                              Conv_b' (s)    ─┘
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from helpers import op_types, random_feeds, run

import bnfold
from benchmarks.graph_builder import GraphBuilder


def fold_and_compare(model: onnx.ModelProto) -> bnfold.api.FoldResult:
    result = bnfold.fold(model)
    feeds = random_feeds(model)
    for before, after in zip(run(model, feeds), run(result.model, feeds)):
        np.testing.assert_allclose(after, before, rtol=1e-4, atol=1e-5)
    assert result.report.verification.passed and all(t.passed for t in result.report.verification.tensors)
    return result


def two_layers(g: GraphBuilder, channels=(3, 5)) -> tuple[str, str]:
    """Two Convs on different inputs (so no branch merge applies)."""
    x, z = g.input("x", [2, 4, 6, 6]), g.input("z", [2, 4, 6, 6])
    return g.conv(x, 4, channels[0], kernel=3, pads=[1] * 4), g.conv(g.relu(z), 4, channels[1], kernel=1)


@pytest.mark.parametrize("axis", [1, -3])
def test_concat_on_the_channel_axis_then_bn(axis):
    g = GraphBuilder()
    a, b = two_layers(g)
    y = g.relu(g.bn(g.node("Concat", [a, b], axis=axis), 8))
    result = fold_and_compare(g.model([y]))
    assert "BatchNormalization" not in op_types(result.model)
    [record] = result.report.folded
    assert len(record.into) == 2
    assert result.model.graph.node[-2].op_type == "Concat"


def test_concat_of_gemm_and_conv_kinds_and_a_mul_chain():
    g = GraphBuilder()
    x, z = g.input("x", [2, 6]), g.input("z", [2, 6])
    a, b = g.gemm(x, 6, 3), g.gemm(g.relu(z), 6, 4, trans_b=1)
    scale = g.const(g.rng.uniform(0.5, 2, (1, 7)))
    y = g.node("Mul", [g.bn(g.node("Concat", [a, b], axis=1), 7), scale])
    result = fold_and_compare(g.model([y]))
    assert op_types(result.model) == ["Gemm", "Relu", "Gemm", "Concat"]


def test_add_of_two_layers_then_bn():
    g = GraphBuilder()
    a, b = two_layers(g, (5, 5))
    y = g.relu(g.bn(g.node("Add", [a, b]), 5))
    result = fold_and_compare(g.model([y]))
    assert "BatchNormalization" not in op_types(result.model)


def test_concat_on_another_axis_is_refused():
    g = GraphBuilder()
    a, b = two_layers(g, (4, 4))
    y = g.bn(g.node("Concat", [a, b], axis=2), 4)  # along H: each BN channel spans both layers
    result = fold_and_compare(g.model([y]))
    assert "BatchNormalization" in op_types(result.model)


def test_producer_read_elsewhere_is_refused():
    g = GraphBuilder()
    a, b = two_layers(g)
    y = g.bn(g.node("Concat", [a, b], axis=1), 8)
    result = fold_and_compare(g.model([y, a]))
    assert "BatchNormalization" in op_types(result.model)


def test_join_output_read_elsewhere_is_refused():
    g = GraphBuilder()
    a, b = two_layers(g, (5, 5))
    total = g.node("Add", [a, b])
    result = fold_and_compare(g.model([g.bn(total, 5), g.relu(total)]))
    assert "BatchNormalization" in op_types(result.model)


def test_add_with_a_channel_broadcast_layer_is_refused():
    """A 1-channel layer broadcast over 5 channels cannot take a per-channel scale."""
    g = GraphBuilder()
    a, b = two_layers(g, (5, 1))
    result = fold_and_compare(g.model([g.bn(g.node("Add", [a, b]), 5)]))
    assert "BatchNormalization" in op_types(result.model)


def test_add_of_a_layer_and_a_non_layer_is_refused():
    g = GraphBuilder()
    x = g.input("x", [2, 4, 6, 6])
    a = g.conv(x, 4, 4, kernel=3, pads=[1] * 4)
    result = fold_and_compare(g.model([g.bn(g.node("Add", [a, g.relu(x)]), 4)]))
    assert "BatchNormalization" in op_types(result.model)


def test_analytic_check_sees_the_slices(monkeypatch):
    """Folding the wrong slice into a layer is caught by the analytic check, not only by the outputs."""
    import bnfold.rules.multi_producer as multi_producer

    real = multi_producer._concat_parts

    def swapped(join, layers, chain):
        parts = real(join, layers, chain)
        first, second = parts
        return [multi_producer.JoinedPart(first.layer, second.chain, first.channels, False), second]

    monkeypatch.setattr(multi_producer, "_concat_parts", swapped)
    g = GraphBuilder()
    a, b = two_layers(g, (4, 4))
    result = bnfold.fold(g.model([g.bn(g.node("Concat", [a, b], axis=1), 8)]), raise_on_failure=False)
    assert not result.report.verification.analytic_passed
