"""Small helpers of the rewriter that the fold tests only exercise on typical graphs."""

from __future__ import annotations

import onnx
from hypothesis import given
from hypothesis import strategies as st

from bnfold.edits import delete_positions as _delete_positions


@given(st.integers(0, 40).flatmap(lambda n: st.tuples(st.just(n), st.sets(st.integers(0, max(n - 1, 0)), max_size=n))))
def test_delete_positions_removes_exactly_those_and_keeps_order(case):
    n, positions = case
    positions = {p for p in positions if p < n}
    graph = onnx.GraphProto()
    for i in range(n):
        graph.node.add().name = str(i)
    _delete_positions(graph.node, positions)
    assert [node.name for node in graph.node] == [str(i) for i in range(n) if i not in positions]


def test_value_info_of_removed_values_is_dropped_and_the_rest_kept():
    """Shape-inferred models carry value_info for every intermediate. After folding, entries for
    values that no longer exist (the Conv's old output, a forward-folded BN's output) go; the BN
    output the folded Conv now produces, and untouched values, keep theirs."""
    import numpy as np

    import bnfold
    from benchmarks.graph_builder import GraphBuilder

    g = GraphBuilder(rng=np.random.default_rng(0))
    x = g.input("x", [2, 3, 8, 8])
    pre = g.bn(x, 3)                               # forward into the unpadded conv below
    conv = g.conv(pre, 3, 4)                       # backward: conv -> bn
    post = g.bn(conv, 4)
    out = g.relu(post)
    model = g.model([out])
    assert {v.name for v in model.graph.value_info} == {pre, conv, post, out}
    result = bnfold.fold(model)
    assert [n.op_type for n in result.model.graph.node] == ["Conv", "Relu"]
    produced = {name for node in result.model.graph.node for name in node.output}
    assert {v.name for v in result.model.graph.value_info} == {post, out}
    assert {v.name for v in result.model.graph.value_info} <= produced
    kept = next(v for v in result.model.graph.value_info if v.name == post)
    assert [d.dim_value for d in kept.type.tensor_type.shape.dim] == [2, 4, 6, 6]
