"""Readers that look only at a value's shape or element type, never at its numbers.

A fold changes the numbers a layer produces, never the shape or dtype of the tensors on the folded
path: per-channel maps broadcast nothing up (`affine_ops` refuses constants that would), and every
op involved keeps its input's element type. So a `Shape` of the layer's output (torch's
`reshape_as` writes one: LeViT's `bn(x.flatten(0, 1)).reshape_as(x)`) does not block the fold; it
is rewired to a value of the folded graph with the same shape and dtype when the value it read goes
away.

From the operator specs: `Shape` (any start/end) and `Size` read only the shape; `EyeLike` reads
the shape, and the dtype when it has no `dtype` attribute; `CastLike` reads only the element type of
its second input (`target_type`). Inputs read for their values (Reshape's shape, Expand,
ConstantOfShape) are data reads.
"""

from __future__ import annotations

import onnx

from bnfold.graph import GraphIndex

# op type -> positions of the inputs it reads only for their shape or element type
SHAPE_ONLY_INPUTS: dict[str, frozenset[int]] = {
    "Shape": frozenset({0}),
    "Size": frozenset({0}),
    "EyeLike": frozenset({0}),
    "CastLike": frozenset({1}),
}


def reads_only_shape(node: onnx.NodeProto, name: str) -> bool:
    """Does `node` read `name` only for its shape or element type (at every input it appears)?"""
    positions = SHAPE_ONLY_INPUTS.get(node.op_type) if node.domain in ("", "ai.onnx") else None
    if positions is None:
        return False
    return all(position in positions for position, value in enumerate(node.input) if value == name)


def data_consumer(index: GraphIndex, name: str) -> onnx.NodeProto | None:
    """The only node that reads the numbers of `name`, when every other reader reads only its shape
    or dtype; None when none or several do, or `name` is a graph output."""
    sole = index.sole_consumer(name)  # the common case: one reader, no list built
    if sole is not None or name in index.graph_outputs:
        return sole
    readers = data_readers(index, name)
    return readers[0] if len(readers) == 1 else None


def data_readers(index: GraphIndex, name: str) -> list[onnx.NodeProto]:
    """Every node reading the numbers of `name` (a node reading it twice is listed twice)."""
    return [node for node in index.consumer_nodes(name) if not reads_only_shape(node, name)]


def rewired_readers(index: GraphIndex, aliases: dict[str, str],
                    replaced: dict[int, onnx.NodeProto]) -> dict[int, onnx.NodeProto]:
    """Copies of the shape-only readers of each value a fold removes, reading its alias (a value
    with the same shape and dtype, produced no later) instead, by node position. `replaced`: the
    pass's other edits, built on when a reader was already changed."""
    rewired: dict[int, onnx.NodeProto] = {}
    for name, alias in aliases.items():
        for position in index.consumers.get(name, ()):
            reader = index.nodes[position]
            if not reads_only_shape(reader, name):
                continue
            node = onnx.NodeProto()
            node.CopyFrom(rewired.get(position) or replaced.get(position) or reader)
            for slot, value in enumerate(node.input):
                if value == name:
                    node.input[slot] = alias
            rewired[position] = node
    return rewired
