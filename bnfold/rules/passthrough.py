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

from bnfold.fold_math import ChannelSpread
from bnfold.graph import GraphIndex
from bnfold.protos import attribute
from bnfold.rules.affine_ops import is_default_domain
from bnfold.rules.readers import data_consumer

PASSTHROUGH_OPS = frozenset({"Transpose", "Reshape", "Flatten", "Squeeze", "Unsqueeze", "Identity"})


def walk_passthrough(start: str, index: GraphIndex) -> list[onnx.NodeProto]:
    """The run of layout-only nodes that read `start` and each other, one sole consumer after the
    next (no other reader but shape-only ones, no graph output along the way). Structural only:
    reads no shapes."""
    nodes: list[onnx.NodeProto] = []
    current = start
    while True:
        node = data_consumer(index, current)
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


def spread_after(nodes: list[onnx.NodeProto], axis: int, channels: int, index: GraphIndex) -> ChannelSpread | None:
    """Where channel axis `axis` (of `channels` entries) of the first node's input ends up in the
    last node's output, or None when its entries do not map to channels in one regular pattern.
    An axis may be merged with the (static) axes next to it once, by the last reshape."""
    spread = ChannelSpread(axis, 1, channels)
    for position, node in enumerate(nodes):
        if node.op_type == "Identity":
            continue
        if node.op_type == "Transpose":
            perm = attribute(node, "perm", None)
            rank = index.rank(node.input[0])
            perm = list(perm) if perm is not None else (list(reversed(range(rank))) if rank is not None else None)
            if perm is None or spread.axis not in perm:
                return None
            spread = ChannelSpread(perm.index(spread.axis), spread.inner, spread.length)
            continue
        before, after = index.info(node.input[0]), index.info(node.output[0])
        if before is None or after is None or before.shape is None or after.shape is None:
            return None
        merged = spread.inner != 1 or spread.length != channels
        kept = [q for q in range(len(after.shape))
                if _reshaped_axis_before(list(before.shape), list(after.shape), q) == spread.axis]
        if kept:
            spread = ChannelSpread(kept[0], spread.inner, spread.length)
        elif merged or position != len(nodes) - 1:
            return None  # merging twice, or moving a merged axis on: not followed
        else:
            spread = _merged_axis_after(list(before.shape), list(after.shape), spread.axis)
            if spread is None:
                return None
    return spread


def _merged_axis_after(before: list, after: list, axis: int) -> ChannelSpread | None:
    """A row-major reshape that merges channel axis `axis` with static neighbours into one axis of
    `after` (the same number of elements in front of the merged run as in front of that axis)."""
    channels = before[axis]
    if not isinstance(channels, int) or channels <= 1:
        return None
    for q, size in enumerate(after):
        if not isinstance(size, int):
            continue
        for start in range(axis, -1, -1):
            if not all(isinstance(d, int) for d in before[start:axis]):
                break
            for stop in range(axis + 1, len(before) + 1):
                run = before[start:stop]
                if not all(isinstance(d, int) for d in run) or math.prod(run) > size:
                    break
                if math.prod(run) == size and _same_elements_around(before, start, stop, after, q):
                    return ChannelSpread(q, math.prod(before[axis + 1:stop]), size)
    return None


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
    for candidate, dim in enumerate(before):
        if dim == channels and _same_elements_around(before, candidate, candidate + 1, after, axis):
            return candidate
    return None


def _same_elements_around(before: list, start: int, stop: int, after: list, axis: int) -> bool:
    """Do before[start:stop] and after[axis] sit behind the same number of elements? A reshape keeps
    the total, so equal counts behind them say the same as equal counts in front (useful when the
    front holds a batch dim inference could not name, as after a Reshape to [-1, ...])."""
    front = _elements(before[:start])
    if front is not None and front == _elements(after[:axis]):
        return True
    back = _elements(before[stop:])
    return back is not None and back == _elements(after[axis + 1:])


def _elements(dims: list) -> tuple | None:
    """The number of elements spanned by `dims`: an int when all are known, else the sorted symbolic
    names with the product of the known rest (so [N, 4] spans the same elements as [4, N]); None when a
    dim is unknown altogether."""
    if any(d is None for d in dims):
        return None
    known = math.prod(d for d in dims if isinstance(d, int))
    symbols = sorted(d for d in dims if not isinstance(d, int))
    return (known, *symbols)
