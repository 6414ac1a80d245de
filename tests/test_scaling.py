"""No quadratic behaviour: the work bnfold does grows linearly with the graph. Asserted on operation
counts (index builds, rule evaluations, node scans), never on wall time."""

from __future__ import annotations

import numpy as np
import pytest
from builders import GraphBuilder

import bnfold
from bnfold import graph, rewrite
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
                                                   chains.match_affine, rewrite._dead_values)

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
    monkeypatch.setattr(rewrite, "_dead_values", dead)
    result = bnfold.fold(_pairs(n), verify=False)
    assert len(result.report.folded) == n
    return counts


@pytest.mark.parametrize("n", [50, 400])
def test_work_per_conv_bn_pair_is_constant(monkeypatch, n):
    counts = _count_work(monkeypatch, n)
    # A fixed number of passes, each indexing the graph once: no per-fold re-scan of the graph.
    assert counts["plans"] == 1 and counts["index_builds"] == 2
    assert counts["nodes_indexed"] == 2 * n + n  # 2n nodes before the pass, n after
    # Each BN is matched a constant number of times, each dead-value candidate looked at once.
    assert counts["affine_matches"] == n
    assert counts["dead_scans"] == 4 * n  # the four BN parameters of every pair
