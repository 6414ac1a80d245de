"""Why a BN, or a per-channel map by a constant next to a layer, is still in the graph after the last
pass: one stable reason code each.

Computed once on the final graph, by asking the same questions the rules ask, in the order a user
would: is the op itself foldable; can the layer before it take it (reached through the layout nodes
and the other maps of its chain, as the planner reaches it); can the layers after it take it. A
Mul/Add/Sub/Div is explained when one operand is a constant (Div: the divisor) and a layer is its
neighbour that way; other arithmetic is not a map this tool folds and gets no record.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import onnx

from bnfold.graph import GraphIndex
from bnfold.report import Reason, SkippedRecord
from bnfold.rules.affine_ops import (
    ARITHMETIC_OPS,
    AffineOp,
    chain_affine,
    is_candidate,
    is_default_domain,
    match_affine,
    match_batch_norm,
)
from bnfold.rules.chains import worth_folding
from bnfold.rules.gemm_bias import match_gemm_bias
from bnfold.rules.layers import LAYER_OPS, Layer, backward_refusal, forward_refusal, match_layer, overflow_refusal
from bnfold.rules.passthrough import PASSTHROUGH_OPS, axis_before
from bnfold.rules.readers import data_readers
from bnfold.rules.refusal import Refusal

# Ops a walk back from a map may pass through on its way to a layer.
_PATH_OPS = PASSTHROUGH_OPS | ARITHMETIC_OPS | {"BatchNormalization"}
MAX_PATH = 16


def explain_skipped(index: GraphIndex, scope: str) -> list[SkippedRecord]:
    records = []
    for node in index.nodes:
        if not is_default_domain(node):
            continue
        if node.op_type == "BatchNormalization":
            refusal = explain(node, index)
        elif node.op_type in ARITHMETIC_OPS and _may_touch_layer(node, index):
            refusal = explain(node, index)
        else:
            continue
        if refusal is not None:
            records.append(SkippedRecord(node.name or node.output[0], node.op_type, node.output[0],
                                         refusal.reason, refusal.detail, scope))
    return records


def explain(node: onnx.NodeProto, index: GraphIndex) -> Refusal | None:
    """The reason a (still present) BN, or map by a constant next to a layer, was not folded; None
    for arithmetic that is no such map."""
    if node.op_type == "BatchNormalization":
        op = match_batch_norm(node, index)
        if isinstance(op, Refusal):
            return op
        data_input = op.data_input
    else:
        matched = _map_by_constant(node, index)
        if matched is None:
            return None
        data_input, op = matched
    path = _path_to_layer(data_input, index)
    feeds_layer = any(reader.op_type in LAYER_OPS for reader in data_readers(index, node.output[0]))
    if path is None and not feeds_layer and node.op_type != "BatchNormalization":
        return None  # not next to a layer
    if isinstance(op, Refusal):
        # A constant that is no per-channel map may still be a MatMul's bias that Gemm's C takes.
        direct = path is not None and not path.layout_after and not path.links
        return (_bias_refusal(node, path, index) if direct else None) or op
    backward = None if path is None else _backward_refusal(op, path, index)
    forward = _forward_refusal(op, index)
    if backward is not None and forward is not None:
        return Refusal(backward.reason, f"{backward.detail}; forward: {forward.detail}")
    if backward is not None or forward is not None:
        return backward or forward
    producer = index.producer_of(op.data_input)
    source = f"{producer.op_type} '{producer.name or op.data_input}'" if producer else f"graph input '{op.data_input}'"
    consumers = sorted({c.op_type for c in index.consumer_nodes(op.output)}) or ["none"]
    return Refusal(Reason.NO_FOLDABLE_NEIGHBOUR, f"produced by {source}, consumed by {', '.join(consumers)}")


def _map_by_constant(node: onnx.NodeProto, index: GraphIndex) -> tuple[str, AffineOp | Refusal] | None:
    """The data input of a Mul/Add/Sub/Div with exactly one constant operand (a Div's divisor), and
    the map it is (or why it is none); None for any other arithmetic."""
    if len(node.input) != 2:
        return None
    constant = [index.constant(name) is not None for name in node.input]
    if constant[0] == constant[1] or (node.op_type == "Div" and not constant[1]):
        return None
    return node.input[0 if constant[1] else 1], match_affine(node, index, None)


def _may_touch_layer(node: onnx.NodeProto, index: GraphIndex) -> bool:
    """Cheap structural pre-test: could a layer be this node's neighbour? Reads no constants."""
    for name in node.input:
        producer = index.producer_of(name)
        if producer is not None and (producer.op_type in LAYER_OPS or producer.op_type in _PATH_OPS):
            return True
    return any(reader.op_type in LAYER_OPS for reader in index.consumer_nodes(node.output[0]))


@dataclass
class _Path:
    """layer -> layout nodes -> maps -> the op explained, as the planner would walk it."""

    layer: onnx.NodeProto
    layout_after: list[onnx.NodeProto] = field(default_factory=list)
    links: list[AffineOp] = field(default_factory=list)


def _path_to_layer(data_input: str, index: GraphIndex) -> _Path | None:
    """The layer `data_input` comes from through maps and then layout nodes, or None."""
    layout: list[onnx.NodeProto] = []
    links: list[AffineOp] = []
    current = data_input
    for _ in range(MAX_PATH):
        producer = index.producer_of(current)
        if producer is None or not is_default_domain(producer):
            return None
        if producer.op_type in LAYER_OPS:
            return _Path(producer, layout, links)
        if producer.op_type in PASSTHROUGH_OPS and producer.input and len(producer.output) == 1:
            layout.insert(0, producer)
            current = producer.input[0]
            continue
        link = match_affine(producer, index, None) if is_candidate(producer) and not layout else None
        if not isinstance(link, AffineOp) or link.output != current:
            return None
        links.insert(0, link)
        current = link.data_input
    return None


def _backward_refusal(op: AffineOp, path: _Path, index: GraphIndex) -> Refusal | None:
    """Why the layer before `op` could not absorb it (and the maps between them)."""
    layer = match_layer(path.layer, index)
    if not isinstance(layer, Layer):
        return layer
    name = path.layer.name or layer.output
    refusal = _reader_refusal(layer, path, index)
    if refusal is not None:
        return refusal
    if not path.layout_after and not path.links:
        bias = _bias_refusal(op.node, path, index)
        if bias is not None:
            return bias
    for link in [*path.links, op]:
        axis = link.axis
        if axis is not None and path.layout_after:
            axis = axis_before(path.layout_after, axis, index)
            if axis is None:
                return _layout_refusal(link, path, layer, name, index)
        refusal = backward_refusal(layer, axis, link.affine.channels)
        if refusal is not None:
            return refusal
    chain = [*path.links, op]
    refusal = overflow_refusal(layer, None, chain_affine(chain))
    if refusal is not None:
        return refusal
    if not worth_folding(layer, chain):
        return Refusal(Reason.NO_GAIN, f"only shifts after {layer.kind} '{name}': folding would turn them into "
                       "one bias Add, removing no node")
    return Refusal(Reason.NO_FOLDABLE_NEIGHBOUR, f"{layer.kind} '{name}' was not folded")


def _bias_refusal(node: onnx.NodeProto, path: _Path, index: GraphIndex) -> Refusal | None:
    """Why the Add/Sub right after a MatMul did not become the bias of a Gemm (None: it could)."""
    layer = match_layer(path.layer, index)
    if not isinstance(layer, Layer):
        return layer
    refusal = _reader_refusal(layer, path, index)
    bias = match_gemm_bias(layer, node, index)
    return refusal or (bias if isinstance(bias, Refusal) else None)


def _reader_refusal(layer: Layer, path: _Path, index: GraphIndex) -> Refusal | None:
    """Is a value on the way from the layer to the op a graph output or read (for its numbers)
    by another node? Folding would change what that reader sees."""
    name = path.layer.name or layer.output
    for value in [layer.output, *(n.output[0] for n in path.layout_after), *(link.output for link in path.links)]:
        where = "output" if value == layer.output else f"output (as '{value}')"
        if value in index.graph_outputs:
            return Refusal(Reason.PRODUCER_IS_GRAPH_OUTPUT, f"{layer.kind} '{name}' {where} is a graph output")
        readers = data_readers(index, value)
        if len(readers) > 1:
            return Refusal(Reason.PRODUCER_HAS_OTHER_CONSUMERS, f"{layer.kind} '{name}' {where} has {len(readers)} consumers")
    return None


def _layout_refusal(link: AffineOp, path: _Path, layer: Layer, name: str, index: GraphIndex) -> Refusal:
    """The map's channels could not be followed back through the layout nodes to the layer's:
    `unknown_shape` when that depends on dims the graph does not fix, else the layout mixes them."""
    for node in path.layout_after:
        shapes = [index.info(value) for value in (node.input[0], node.output[0])]
        if node.op_type not in ("Identity", "Transpose") and any(
                info is None or info.shape is None or not all(isinstance(d, int) for d in info.shape) for info in shapes):
            dims = " -> ".join("?" if i is None or i.shape is None else str(list(i.shape)) for i in shapes)
            return Refusal(Reason.UNKNOWN_SHAPE, f"{node.op_type} '{node.name or node.output[0]}' ({dims}): whether it "
                           "keeps the channels whole depends on dims the graph does not fix")
    layout = ", ".join(n.op_type for n in path.layout_after)
    return Refusal(Reason.CHANNEL_AXIS_MISMATCH, f"axis {link.axis} after {layout} is not one whole axis of "
                   f"{layer.kind} '{name}' output")


def _forward_refusal(op: AffineOp, index: GraphIndex) -> Refusal | None:
    """Why the consumers could not absorb the op, or None when none of them is a layer."""
    consumers = data_readers(index, op.output)
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
