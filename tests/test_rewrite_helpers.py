"""Small helpers of the rewriter that the fold tests only exercise on typical graphs."""

from __future__ import annotations

import onnx
from hypothesis import given
from hypothesis import strategies as st

from bnfold.rewrite import _delete_positions


@given(st.integers(0, 40).flatmap(lambda n: st.tuples(st.just(n), st.sets(st.integers(0, max(n - 1, 0)), max_size=n))))
def test_delete_positions_removes_exactly_those_and_keeps_order(case):
    n, positions = case
    positions = {p for p in positions if p < n}
    graph = onnx.GraphProto()
    for i in range(n):
        graph.node.add().name = str(i)
    _delete_positions(graph.node, positions)
    assert [node.name for node in graph.node] == [str(i) for i in range(n) if i not in positions]
