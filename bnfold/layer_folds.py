"""Edits of one layer fold: the layer is rebuilt with the chains before (`pre`) and after (`post`)
it absorbed, the chains' nodes go, and the folded layer (or the last layout node after it) takes
over the chain's output name, so graph outputs, value_info and downstream names stay valid.

A weight another node (or a subgraph) also reads is never overwritten: the folded layer gets a new,
uniquely named initializer; a weight only this layer reads is overwritten under its own name.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import onnx

from bnfold.edits import PassEdits
from bnfold.fold_math import compose_affines
from bnfold.fold_session import FoldSession, folded_record
from bnfold.provenance import ChainSegment, LayerProvenance, OriginalLayer, copy_node
from bnfold.rules.affine_ops import AffineOp, chain_axis
from bnfold.rules.chains import LayerPlan
from bnfold.rules.layers import NameFor, build_nodes, fold_parameters
from bnfold.rules.multi_producer import JOIN_OPS


def fold_layer(plan: LayerPlan, edits: PassEdits, session: FoldSession) -> None:
    layer, scope = plan.layer, edits.scope
    # With layout-only nodes after `pre`, the layer keeps reading them and the first of them
    # reads the chain's input instead.
    x_name = plan.pre[0].data_input if plan.pre and not plan.layout_before else layer.data_input
    # With layout-only nodes in between, the layer keeps its output and the last of them takes
    # over the chain's output name instead.
    y_name = plan.post[-1].output if plan.post and not plan.layout_after else layer.output
    # A layer folded in an earlier pass is recomputed from its original parameters with the maps
    # composed, so it is still rounded once (and checked against one provenance).
    original = session.originals.pop((scope, layer.output), None)
    if original is None:  # a merged branch sum folded further is checked from its values as stored
        session.provenance.pop((scope, layer.output), None)
    source = original.layer if original else layer
    pre = compose_affines((plan.pre_affine, original.pre if original else None))
    post = compose_affines((original.post if original else None, plan.post_affine))
    params = fold_parameters(source, pre, post, round_weight=True)
    provenance = _layer_provenance(plan, edits, session, original) if session.keep_provenance else None
    name_for = _tensor_namer(plan, edits, session, refold=original is not None)
    nodes, tensors = build_nodes(source, params, x_name, y_name, name_for, session.opset,
                                 preferred_names=list(layer.node.input))
    if len(nodes) > 1 and not plan.layout_after:
        # The MatMul's new output has the shape of the chain's end (Add of a [C] bias keeps it):
        # later passes need it to fold that bias Add onward.
        infos = session.inferred_scope(scope)
        if infos is not None and y_name in infos:
            infos[nodes[0].output[0]] = infos[y_name]
    _place_nodes(plan, edits, nodes, tensors)
    for name, values in tensors.items():
        edits.write_tensor(name, values)
    edits.mark_possibly_unread(i for i in layer.node.input[1:] if i and i not in tensors)
    for op in plan.pre + plan.post:
        edits.mark_possibly_unread(_parameter_inputs(op))
        edits.remove_producer(op.output)
    _alias_vanished_values(plan, edits)
    session.created_biases.update((scope, node.output[0]) for node in nodes[1:])
    _record(plan, nodes, session, scope)
    if provenance is not None:
        provenance.written = [n for n in nodes[0].input[1:]] + [n for n in nodes[1:2] for n in n.input[1:]]
        provenance.output = y_name
        session.provenance[(scope, y_name)] = provenance
        session.checked_by.update((name, (scope, y_name)) for name in provenance.written)
        session.originals[(scope, y_name)] = OriginalLayer(replace(source, node=copy_node(source.node)), pre, post)


def record_forward_folds(folded: list[tuple[list[AffineOp], str]], session: FoldSession, scope: str) -> None:
    """One record per op of each chain folded forward, listing every layer it went into.
    `folded`: (chain, layer name) for each layer a chain was folded into."""
    targets: dict[str, tuple[list[AffineOp], list[str]]] = {}  # chain head -> (chain, layers)
    for chain, layer_name in folded:
        targets.setdefault(chain[0].output, (chain, []))[1].append(layer_name)
    for chain, into in targets.values():
        session.log.folded.extend(folded_record(op, into, "forward", scope) for op in chain)


def _parameter_inputs(op: AffineOp) -> list[str]:
    """The inputs of an affine op that may be left unread when it goes (a BN's data input too:
    it may be a constant only the BN read)."""
    return list(op.node.input[1:] if op.node.op_type == "BatchNormalization" else op.node.input)


def _tensor_namer(plan: LayerPlan, edits: PassEdits, session: FoldSession, refold: bool) -> NameFor:
    """Names for the folded layer's tensors: overwrite in place only what nobody else reads;
    otherwise a fresh, unique name. A tensor an earlier fold wrote is overwritten only by a refold
    of that same layer: another record still checks it."""
    index, scope, inputs = edits.index, edits.scope, plan.layer.node.input

    def name_for(role: str, preferred: str) -> str:
        if role in ("weight", "bias") and preferred in index.initializers and index.consumer_count(preferred) == 1 \
                and preferred not in index.overridable and preferred in inputs \
                and (scope, preferred) not in session.evaluated_names \
                and (refold or preferred not in session.checked_by):
            return preferred
        return session.names.fresh(f"{preferred}_bnfold" if role in ("weight", "bias") else preferred)

    return name_for


def _place_nodes(plan: LayerPlan, edits: PassEdits, nodes: list[onnx.NodeProto], tensors: dict[str, np.ndarray]) -> None:
    """Put the folded layer (and a MatMul's bias Add) where the layer and the chain were."""
    edits.replace_producer(plan.layer.output, nodes[0])
    if plan.layout_before:
        first = copy_node(plan.layout_before[0])
        first.input[0] = plan.pre[0].data_input
        edits.replace_producer(plan.layout_before[0].output[0], first)
    if plan.layout_after:
        _hand_over_chain_output(plan, edits, nodes, tensors)
    elif len(nodes) > 1:  # MatMul + Add: the Add takes the place of the chain's last node
        edits.replace_producer(plan.post[-1].output, nodes[1])


def _hand_over_chain_output(plan: LayerPlan, edits: PassEdits, nodes: list[onnx.NodeProto],
                            tensors: dict[str, np.ndarray]) -> None:
    """Layer -> layout nodes -> chain: the layout nodes stay and the chain goes. The last layout
    node now produces the chain's output; a MatMul's bias Add (it has no bias input) follows the
    layout nodes instead, broadcast along the axis the channels have moved to."""
    last = plan.layout_after[-1]
    end = plan.post[-1].output
    if len(nodes) == 1:
        renamed = copy_node(last)
        renamed.output[0] = end
        edits.replace_producer(last.output[0], renamed)
        return
    matmul, add = nodes
    matmul.output[0] = plan.layer.output
    add.input[0], add.output[0] = last.output[0], end
    rank, axis = edits.index.rank(last.output[0]), chain_axis(plan.post)
    bias = tensors[add.input[1]]
    # Scalar maps only: every channel has the same bias, and one value broadcasts anywhere.
    tensors[add.input[1]] = bias.reshape((-1,) + (1,) * (rank - 1 - axis)) if axis is not None else bias[:1]
    edits.replace_producer(end, add)


def _alias_vanished_values(plan: LayerPlan, edits: PassEdits) -> None:
    """The values a layer fold removes, each with the value of the folded graph that has its shape
    and dtype and is produced no later: a forward chain's input; behind the layer, the output of
    the node now at the layer's place (or at the last layout node's, which may have taken over the
    chain's output name)."""
    for op in plan.pre:
        edits.alias(op.output, plan.pre[0].data_input)
    if plan.post:
        last = plan.layout_after[-1] if plan.layout_after else plan.layer.node
        anchor = edits.current(last.output[0]).output[0]
        for op in plan.post[:-1]:
            edits.alias(op.output, anchor)
        if anchor != last.output[0]:
            edits.alias(last.output[0], anchor)


def _record(plan: LayerPlan, nodes: list[onnx.NodeProto], session: FoldSession, scope: str) -> None:
    layer = plan.layer
    into = layer.node.name or layer.output
    if plan.layout_after and plan.layout_after[0].op_type in JOIN_OPS:
        # One record per op of a chain folded into several joined layers, listing all of them.
        for op in plan.post:
            record = session.joined_records.get((scope, op.output))
            if record is None:
                record = session.joined_records[(scope, op.output)] = folded_record(op, [], "backward", scope)
                session.log.folded.append(record)
            record.into.append(into)
        return
    became = nodes[0].op_type if nodes[0].op_type != layer.kind else ""
    session.log.folded.extend(folded_record(op, [into], "backward", scope, became) for op in plan.post)


def _layer_provenance(plan: LayerPlan, edits: PassEdits, session: FoldSession,
                      original: OriginalLayer | None) -> LayerProvenance:
    index, scope = edits.index, edits.scope
    constants: dict[str, np.ndarray] = {}
    for op in plan.pre + plan.post:
        for name in op.node.input:
            value = index.constant(name) if name and name != op.data_input else None
            if value is not None:
                constants[name] = value
    pre = [ChainSegment([copy_node(op.node) for op in plan.pre], index.rank(plan.pre[0].data_input),
                        plan.pre_spread)] if plan.pre else []
    post_rank = index.rank(plan.layout_after[-1].output[0]) if plan.layout_after else plan.layer.output_rank
    post = [ChainSegment([copy_node(op.node) for op in plan.post], post_rank, None, plan.post_slice,
                         plan.post_scale_only)] if plan.post else []
    earlier = session.provenance.pop((scope, plan.layer.output), None) if original else None
    if isinstance(earlier, LayerProvenance):  # extend the first fold's record: same original layer, more segments
        return LayerProvenance(scope, earlier.layer_node, earlier.layer_params, pre + earlier.pre,
                               earlier.post + post, {**earlier.constants, **constants}, [], "")
    layer = plan.layer
    # The arrays the plan read (read-only views of the stored values): reading them again
    # would hold a second copy of every folded weight until verification.
    params = {layer.node.input[1]: layer.weight}
    if layer.bias is not None:
        params[layer.node.input[2]] = layer.bias
    return LayerProvenance(scope, copy_node(layer.node), params, pre, post, constants, [], "")
