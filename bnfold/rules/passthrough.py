"""Layout-only nodes between a layer and the affine chain after it: Transpose, Reshape, Flatten,
Squeeze, Unsqueeze, Identity.

They move elements without changing them, so a per-channel map after them is still a per-channel
map of the layer's output — on whichever axis the layer's channel axis ends up. Typical exports:
Linear -> view(N, C, 1, 1) -> BatchNorm2d; MatMul [B, T, C] -> Transpose(0, 2, 1) -> BatchNorm1d;
TF's Conv -> Transpose(NCHW -> NHWC) -> Mul/Add by [C] constants.

The channel axis is followed exactly: through a Transpose by its permutation; through a reshape
only when the channel dim survives whole, with the same number of elements before it (then every
element keeps its channel index under row-major order). Anything else ends the walk.
"""

from __future__ import annotations

import math

import onnx

from bnfold.graph import GraphIndex, attribute
from bnfold.rules.affine_ops import is_default_domain

PASSTHROUGH_OPS = frozenset({"Transpose", "Reshape", "Flatten", "Squeeze", "Unsqueeze", "Identity"})


def walk_passthrough(start: str, index: GraphIndex) -> list[onnx.NodeProto]:
    """The run of layout-only nodes that read `start` and each other, one sole consumer after the
    next (no other reader, no graph output along the way). Structural only: reads no shapes."""
    nodes: list[onnx.NodeProto] = []
    current = start
    while True:
        node = index.sole_consumer(current)
        if node is None or node.op_type not in PASSTHROUGH_OPS or not is_default_domain(node):
            return nodes
        if not node.input or node.input[0] != current or current in node.input[1:] or len(node.output) != 1:
            return nodes
        nodes.append(node)
        current = node.output[0]


def axis_before(nodes: list[onnx.NodeProto], axis: int, index: GraphIndex) -> int | None:
    """The axis of the first node's input that becomes `axis` of the last node's output, or None
    when channels do not map one-to-one (or a shape the mapping needs is unknown)."""
    for node in reversed(nodes):
        axis = _axis_before_node(node, axis, index)
        if axis is None:
            return None
    return axis


def _axis_before_node(node: onnx.NodeProto, axis: int, index: GraphIndex) -> int | None:
    if node.op_type == "Identity":
        return axis
    if node.op_type == "Transpose":
        rank = index.rank(node.input[0])
        perm = attribute(node, "perm", None)
        if perm is None:
            if rank is None:
                return None
            perm = list(reversed(range(rank)))
        return perm[axis] if 0 <= axis < len(perm) else None
    before, after = index.info(node.input[0]), index.info(node.output[0])
    if before is None or after is None or before.shape is None or after.shape is None:
        return None
    return _reshaped_axis_before(list(before.shape), list(after.shape), axis)


def _reshaped_axis_before(before: list, after: list, axis: int) -> int | None:
    """Under a row-major reshape from `before` to `after`, the axis of `before` whose elements keep
    their index along `axis` of `after`: same dim, and the same number of elements in front of it."""
    if not 0 <= axis < len(after):
        return None
    channels = after[axis]
    if not isinstance(channels, int) or channels <= 1:
        return None  # one channel: a scalar map, which the chain rules treat without an axis
    front = _elements(after[:axis])
    if front is None:
        return None
    for candidate, dim in enumerate(before):
        if dim == channels and _elements(before[:candidate]) == front:
            return candidate
    return None


def _elements(dims: list) -> tuple | None:
    """The number of elements spanned by `dims`: an int when all are known, else the sorted symbolic
    names with the product of the known rest (so [N, 4] spans the same elements as [4, N]); None when a
    dim is unknown altogether."""
    if any(d is None for d in dims):
        return None
    known = math.prod(d for d in dims if isinstance(d, int))
    symbols = sorted(d for d in dims if not isinstance(d, int))
    return (known, *symbols)
