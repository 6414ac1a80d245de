"""Affine chains after a node that joins several layers' outputs, folded into every one of them:

    Concat(layer_1, ..., layer_k, axis=channels) -> chain:  channel slice i of the map goes into layer_i
    Add(layer_a, layer_b) -> chain:  s*(a + b) + t = (s*a + t) + s*b: the scale into both, the shift into a

Each layer keeps its output; the joining node takes over the chain's output name (the same hand-over
as for layout nodes between a layer and its chain). Exact only when every layer's output is read by
the joining node alone, once, and the joining node's output by the chain alone; the chain must act
on the layers' channel axis, and for Add every layer must have all the channels (a layer broadcast
along the channels cannot take a per-channel scale) and the same rank (broadcasting aligns ranks at
the end, which would move the channel axis).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx

from bnfold.fold_math import ChannelAffine
from bnfold.graph import GraphIndex
from bnfold.protos import attribute
from bnfold.rules.affine_ops import AffineOp, chain_affine, chain_axis, chain_channels, is_candidate, is_default_domain
from bnfold.rules.layers import Layer, backward_refusal, match_layer, overflow_refusal

JOIN_OPS = frozenset({"Concat", "Add"})


@dataclass(frozen=True)
class JoinedPart:
    """One joined layer and the chain as it acts on it: its channel slice (Concat), or the scale only
    (the second layer of an Add)."""

    layer: Layer
    chain: list[AffineOp]  # the chain's nodes, each with its map restricted to this layer
    channels: tuple[int, int] | None  # (first channel, count) of the chain's channels
    scale_only: bool


def join_plans(join: onnx.NodeProto, chain: list[AffineOp], index: GraphIndex, planned: set[str]
               ) -> list[JoinedPart] | None:
    """How each layer joined by `join` absorbs `chain`, or None when that is not exact.
    `planned`: outputs of layers another plan of this pass already folds into."""
    if not is_default_domain(join) or join.op_type not in JOIN_OPS or len(join.input) < 2:
        return None
    if len(set(join.input)) != len(join.input) or join.output[0] in index.graph_outputs:
        return None
    layers = []
    for name in join.input:
        node = index.producer_of(name)
        layer = None if node is None else match_layer(node, index)
        if not isinstance(layer, Layer) or not layer.has_bias_input or layer.output != name \
                or layer.output in planned or index.consumer_count(name) != 1:
            return None  # a MatMul's bias needs an Add of its own: not a single-node hand-over
        layers.append(layer)
    axis = chain_axis(chain)
    if any(layer.out_axis != 1 or layer.output_rank != layers[0].output_rank for layer in layers):
        return None
    if axis not in (None, 1):
        return None
    if any(op.affine.channels != 1 and op.affine.channels != chain_channels(chain) for op in chain):
        return None
    if join.op_type == "Concat":
        parts = _concat_parts(join, layers, chain)
    else:
        parts = _add_parts(layers, chain)
    return parts if parts is not None and all(_absorbs(part) for part in parts) else None


def _concat_parts(join: onnx.NodeProto, layers: list[Layer], chain: list[AffineOp]) -> list[JoinedPart] | None:
    rank = layers[0].output_rank
    concat_axis = int(attribute(join, "axis", 1))  # opsets 1-3 default to 1; later ones require it
    if rank is None or not -rank <= concat_axis < rank or concat_axis % rank != 1:
        return None  # only a Concat along the layers' channel axis splits the map by layer
    total = sum(layer.out_channels for layer in layers)
    if chain_channels(chain) not in (1, total):
        return None
    parts, start = [], 0
    for layer in layers:
        stop = start + layer.out_channels
        sliced = [_restricted(op, lambda v: v.expanded(total).scale[start:stop],
                              lambda v: v.expanded(total).shift[start:stop]) for op in chain]
        parts.append(JoinedPart(layer, sliced, (start, layer.out_channels), False))
        start = stop
    return parts


def _add_parts(layers: list[Layer], chain: list[AffineOp]) -> list[JoinedPart] | None:
    channels = layers[0].out_channels
    if len(layers) != 2 or layers[1].out_channels != channels or chain_channels(chain) not in (1, channels):
        return None
    scaled = [_restricted(op, lambda v: v.scale, lambda v: np.zeros_like(v.shift)) for op in chain]
    return [JoinedPart(layers[0], chain, None, False), JoinedPart(layers[1], scaled, None, True)]


def _restricted(op: AffineOp, scale, shift) -> AffineOp:
    return AffineOp(op.node, op.data_input, ChannelAffine(scale(op.affine).copy(), shift(op.affine).copy()), op.axis)


def _absorbs(part: JoinedPart) -> bool:
    affine = chain_affine(part.chain)
    return backward_refusal(part.layer, 1, affine.channels) is None and \
        overflow_refusal(part.layer, None, affine) is None


def joined_chain_head(join: onnx.NodeProto, index: GraphIndex) -> onnx.NodeProto | None:
    """The affine op reading the joining node's output, if it is its only reader."""
    if join.op_type not in JOIN_OPS or not join.output:
        return None
    consumer = index.sole_consumer(join.output[0])
    return consumer if consumer is not None and is_candidate(consumer) else None
