"""No quadratic behaviour: the work bnfold does grows linearly with the graph. Asserted on operation
counts (index builds, rule evaluations, node scans), never on wall time."""

from __future__ import annotations

import numpy as np
import pytest

import bnfold
from benchmarks.graph_builder import GraphBuilder
from bnfold import edits, fold_session, graph, rewrite
from bnfold.rules import chains


def _pairs(n: int):
    g = GraphBuilder(rng=np.random.default_rng(0))
    x = g.input("x", [1, 4, 2, 2])
    for _ in range(n):
        x = g.bn(g.conv(x, 4, 4, kernel=1, bias=False), 4)
    return g.model([x], check=False)


def _count_work(monkeypatch, n: int) -> dict[str, int]:
    counts = {"index_builds": 0, "nodes_indexed": 0, "plans": 0, "affine_matches": 0, "dead_scans": 0}
    real_init, real_plan, real_match, real_dead = (graph.GraphIndex.__init__, chains.plan_pass,
                                                   chains.match_affine, edits.dead_values)

    def init(self, g, *args, **kwargs):
        counts["index_builds"] += 1
        counts["nodes_indexed"] += len(g.node)
        real_init(self, g, *args, **kwargs)

    def plan(index):
        counts["plans"] += 1
        return real_plan(index)

    def match(*args, **kwargs):
        counts["affine_matches"] += 1
        return real_match(*args, **kwargs)

    def dead(index, replaced, removed, candidates):
        counts["dead_scans"] += len(candidates)
        return real_dead(index, replaced, removed, candidates)

    monkeypatch.setattr(graph.GraphIndex, "__init__", init)
    monkeypatch.setattr(rewrite, "plan_pass", plan)
    monkeypatch.setattr(chains, "match_affine", match)
    monkeypatch.setattr(edits, "dead_values", dead)
    result = bnfold.fold(_pairs(n), verify=False)
    assert len(result.report.folded) == n
    return counts


@pytest.mark.parametrize("n", [50, 400])
def test_work_per_conv_bn_pair_is_constant(monkeypatch, n):
    counts = _count_work(monkeypatch, n)
    # One pass, one index of the graph: no per-fold re-scan, and no re-index afterwards when no BN
    # is left to explain and there is no subgraph to visit.
    assert counts["plans"] == 1 and counts["index_builds"] == 1
    assert counts["nodes_indexed"] == 2 * n
    # Each BN is matched a constant number of times, each dead-value candidate looked at once.
    assert counts["affine_matches"] == n
    assert counts["dead_scans"] == 4 * n  # the four BN parameters of every pair


def test_a_bn_left_behind_is_indexed_once_more_and_explained(monkeypatch):
    """Skipping the re-index is only for graphs with nothing left to explain: a BN that stays (here
    after a Relu) costs exactly one more index, and gets its reason."""
    builds = []
    real_init = graph.GraphIndex.__init__

    def init(self, g, *args, **kwargs):
        builds.append(len(g.node))
        real_init(self, g, *args, **kwargs)

    monkeypatch.setattr(graph.GraphIndex, "__init__", init)
    g = GraphBuilder(rng=np.random.default_rng(0))
    x = g.bn(g.conv(g.input("x", [1, 4, 2, 2]), 4, 4, kernel=1), 4)
    y = g.bn(g.relu(x), 4)
    result = bnfold.fold(g.model([y]), verify=False)
    assert builds == [4, 3]  # before the pass; after it (conv, relu, the BN left)
    assert [s.reason.value for s in result.report.skipped] == ["no_foldable_neighbour"]


def test_conv_bn_folds_never_run_shape_inference(monkeypatch):
    """Conv/ConvTranspose → BN needs no shapes: shape inference (a whole-graph pass, ~25% of the fold
    time on 10,000 pairs) must only run when a rule needs a rank or dim (MatMul, Mul/Add, SAME)."""
    calls = []
    real = fold_session.infer_value_infos

    def spy(model):
        calls.append(len(model.graph.node))
        return real(model)

    monkeypatch.setattr(fold_session, "infer_value_infos", spy)
    result = bnfold.fold(_pairs(20), verify=False)
    assert len(result.report.folded) == 20
    assert calls == []
    g = GraphBuilder(rng=np.random.default_rng(0))
    y = g.conv(g.bn(g.input("x", [1, 4, 8, 8]), 4), 4, 4, kernel=2, strides=[2, 2], auto_pad="SAME_UPPER")
    result = bnfold.fold(g.model([y]), verify=False)  # forward into SAME: whether it pads needs dims
    assert [r.direction for r in result.report.folded] == ["forward"]
    assert len(calls) == 1
