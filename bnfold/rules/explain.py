"""Why a BN is still in the graph after the last pass: one stable reason code per BN.

Computed once on the final graph, by asking the same questions the rules ask, in the order a user
would: is the BN itself foldable; can the layer before it take it; can the layers after it take it.
"""

from __future__ import annotations

import onnx

from bnfold.graph import GraphIndex
from bnfold.report import Reason, SkippedRecord
from bnfold.rules.affine_ops import AffineOp, is_default_domain, match_batch_norm
from bnfold.rules.layers import Layer, backward_refusal, forward_refusal, match_layer, overflow_refusal
from bnfold.rules.passthrough import PASSTHROUGH_OPS, axis_before, walk_passthrough
from bnfold.rules.refusal import Refusal


def explain_skipped(index: GraphIndex, scope: str) -> list[SkippedRecord]:
    records = []
    for node in index.nodes:
        if node.op_type == "BatchNormalization" and is_default_domain(node):
            refusal = explain(node, index)
            records.append(SkippedRecord(node.name or node.output[0], node.op_type, node.output[0],
                                         refusal.reason, refusal.detail, scope))
    return records


def explain(node: onnx.NodeProto, index: GraphIndex) -> Refusal:
    """The reason a (still present) BN was not folded."""
    op = match_batch_norm(node, index)
    if isinstance(op, Refusal):
        return op
    backward = _backward_refusal(op, index)
    forward = _forward_refusal(op, index)
    if backward is not None and forward is not None:
        return Refusal(backward.reason, f"{backward.detail}; forward: {forward.detail}")
    if backward is not None or forward is not None:
        return backward or forward
    producer = index.producer_of(op.data_input)
    source = f"{producer.op_type} '{producer.name or op.data_input}'" if producer else f"graph input '{op.data_input}'"
    consumers = sorted({c.op_type for c in index.consumer_nodes(op.output)}) or ["none"]
    return Refusal(Reason.NO_FOLDABLE_NEIGHBOUR, f"produced by {source}, consumed by {', '.join(consumers)}")


def _backward_refusal(op: AffineOp, index: GraphIndex) -> Refusal | None:
    """Why the producer could not absorb the BN, or None when the producer is no layer at all."""
    producer = index.producer_of(op.data_input)
    if producer is not None and producer.op_type in PASSTHROUGH_OPS and is_default_domain(producer):
        return _through_layout_refusal(op, producer, index)
    layer = None if producer is None else match_layer(producer, index)
    if layer is None:
        return None
    if isinstance(layer, Refusal):
        return layer
    name = producer.name or layer.output
    if layer.output in index.graph_outputs:
        return Refusal(Reason.PRODUCER_IS_GRAPH_OUTPUT, f"{layer.kind} '{name}' output is a graph output")
    if index.consumer_count(layer.output) > 1:
        count = index.consumer_count(layer.output)
        return Refusal(Reason.PRODUCER_HAS_OTHER_CONSUMERS, f"{layer.kind} '{name}' output has {count} consumers")
    refusal = backward_refusal(layer, op.axis, op.affine.channels) or overflow_refusal(layer, None, op.affine)
    return refusal or Refusal(Reason.NO_FOLDABLE_NEIGHBOUR, f"{layer.kind} '{name}' was not folded")


def _through_layout_refusal(op: AffineOp, producer: onnx.NodeProto, index: GraphIndex) -> Refusal | None:
    """Layer -> layout nodes (Reshape, Transpose, ...) -> BN: why the BN's channels could not be
    followed back to the layer's output channels; None when no layer sits behind the layout nodes."""
    while producer is not None and producer.op_type in PASSTHROUGH_OPS and is_default_domain(producer) and producer.input:
        producer = index.producer_of(producer.input[0])
    if producer is None or not producer.output or match_layer(producer, index) is None:
        return None
    between = walk_passthrough(producer.output[0], index)
    if not between or between[-1].output[0] != op.data_input:
        return None  # a layout node with other readers: the layer's output is not the BN's alone
    if axis_before(between, op.axis, index) is not None:
        return None  # the channels map: the layer itself is what refused (explained below)
    for node in between:
        shapes = [index.info(name) for name in (node.input[0], node.output[0])]
        if node.op_type not in ("Identity", "Transpose") and any(
                info is None or info.shape is None or not all(isinstance(d, int) for d in info.shape) for info in shapes):
            dims = " -> ".join("?" if i is None or i.shape is None else str(list(i.shape)) for i in shapes)
            return Refusal(Reason.UNKNOWN_SHAPE, f"{node.op_type} '{node.name or node.output[0]}' ({dims}): whether it "
                           "keeps the BN's channels whole depends on dims the graph does not fix")
    return Refusal(Reason.CHANNEL_AXIS_MISMATCH, f"the layout nodes between {producer.op_type} "
                   f"'{producer.name or producer.output[0]}' and the BN do not keep its channels whole on axis {op.axis}")


def _forward_refusal(op: AffineOp, index: GraphIndex) -> Refusal | None:
    """Why the consumers could not absorb the BN, or None when none of them is a layer."""
    consumers = index.consumer_nodes(op.output)
    layers = [match_layer(c, index) for c in consumers]
    if not any(isinstance(layer, (Layer, Refusal)) for layer in layers):
        return None
    if op.output in index.graph_outputs:
        return Refusal(Reason.OUTPUT_IS_GRAPH_OUTPUT, f"output '{op.output}' is a graph output")
    for consumer, layer in zip(consumers, layers):
        if layer is None:
            return Refusal(Reason.CONSUMER_NOT_FOLDABLE, f"also consumed by {consumer.op_type} "
                           f"'{consumer.name or consumer.output[0]}'")
        if isinstance(layer, Refusal):
            return layer
        if layer.data_input != op.output:
            return Refusal(Reason.CONSUMER_NOT_FOLDABLE, f"feeds a parameter of {layer.kind} '{consumer.name}'")
        refusal = forward_refusal(layer, op.axis, op.affine.channels, shift_free=not op.affine.shift.any()) \
            or overflow_refusal(layer, op.affine, None)
        if refusal is not None:
            return refusal
    return Refusal(Reason.CONSUMER_NOT_FOLDABLE, "consumers could not all absorb it")
