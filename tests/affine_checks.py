"""What the forward-fold and affine-map tests share: a fold checked against onnxruntime and the full
checker, the folded records, an untouched model, per-channel constants, a padded Conv to hang maps on."""

from __future__ import annotations

import numpy as np
import onnx
from helpers import op_types, random_feeds, run

import bnfold
from benchmarks.graph_builder import GraphBuilder

BN = "BatchNormalization"


Feeds = dict[str, np.ndarray]


RTOL, ATOL = 1e-4, 1e-5


def node_named(model: onnx.ModelProto, output: str) -> onnx.NodeProto:
    """The node of `model` producing `output`."""
    return next(node for node in model.graph.node if output in node.output)


def fold_and_compare(model: onnx.ModelProto, feeds: Feeds | None = None) -> bnfold.FoldResult:
    """Fold with verification; the folded model must pass the full checker and match in onnxruntime."""
    before = model.SerializeToString()
    result = bnfold.fold(model)
    assert model.SerializeToString() == before, "the input model was mutated"
    verification = result.report.verification
    assert verification is not None and verification.passed, verification
    assert verification.runtime_status == "passed" and verification.outputs
    onnx.checker.check_model(result.model, full_check=True)
    feeds = feeds if feeds is not None else random_feeds(model)
    expected, got = run(model, feeds), run(result.model, feeds)
    assert len(expected) == len(got)
    for want, have in zip(expected, got):
        assert want.shape == have.shape
        np.testing.assert_allclose(have, want, rtol=RTOL, atol=ATOL)
    assert [o.name for o in result.model.graph.output] == [o.name for o in model.graph.output]
    return result


def records(result: bnfold.FoldResult) -> list[tuple[str, str, list[str]]]:
    """(op type, direction, into) of each folded record."""
    return [(r.op_type, r.direction, r.into) for r in result.report.folded]


def assert_untouched(model: onnx.ModelProto, result: bnfold.FoldResult) -> None:
    """Nothing was folded: same ops, and onnxruntime gives bit-identical outputs."""
    assert result.report.folded == []
    assert op_types(result.model) == op_types(model)
    feeds = random_feeds(model)
    for want, have in zip(run(model, feeds), run(result.model, feeds)):
        np.testing.assert_array_equal(have, want)


def const_of(g: GraphBuilder, shape: tuple[int, ...], low: float = 0.5, high: float = 1.5) -> str:
    return g.const(g.rng.uniform(low, high, shape), "k")


def padded_conv_graph(channels: int = 8, size: int = 8) -> tuple[GraphBuilder, str]:
    """x[2,3,size,size] -> Conv(3->channels, 3x3, pads 1): output [2, channels, size, size]."""
    g = GraphBuilder()
    x = g.input("x", [2, 3, size, size])
    return g, g.conv(x, 3, channels, pads=[1, 1, 1, 1])
