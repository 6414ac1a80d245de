"""Edits that replace nodes without folding into a layer: an affine chain merged into one
BatchNormalization, a MatMul and its bias Add/Sub merged into one Gemm, and training-mode BNs of
constants replaced by their values."""

from __future__ import annotations

import numpy as np
import onnx

from bnfold.constants import EvaluatedConstant, is_training_bn
from bnfold.edits import PassEdits
from bnfold.fold_math import round_to_dtype
from bnfold.fold_session import FoldSession, folded_record
from bnfold.graph import GraphIndex
from bnfold.provenance import copy_node
from bnfold.report import FoldedRecord
from bnfold.rules.affine_ops import chain_affine, chain_channels
from bnfold.rules.chains import MergePlan
from bnfold.rules.gemm_bias import GemmBiasPlan, gemm_node


def merge_chain(plan: MergePlan, edits: PassEdits, session: FoldSession) -> None:
    """The chain becomes one BN (mean 0, var 1, epsilon 0: it computes exactly x * scale + bias)
    named after the chain's first BN, in that BN's parameter dtype."""
    chain, index = plan.chain, edits.index
    first_bn = next(op for op in chain if op.node.op_type == "BatchNormalization")
    affine = chain_affine(chain).expanded(chain_channels(chain))
    dtype = index.constant(first_bn.node.input[1]).dtype
    base = first_bn.node.name or first_bn.output
    names = [session.names.fresh(f"{base}_bnfold_{role}") for role in ("scale", "bias", "mean", "var")]
    values = [affine.scale, affine.shift, np.zeros_like(affine.scale), np.ones_like(affine.scale)]
    for name, value in zip(names, values):
        edits.add_initializer(name, round_to_dtype(value, dtype))
    merged = onnx.helper.make_node("BatchNormalization", [chain[0].data_input, *names], [chain[-1].output],
                                   name=first_bn.node.name, epsilon=0.0)
    edits.replace_producer(chain[-1].output, merged)
    for op in chain[:-1]:
        edits.remove_producer(op.output)
        edits.alias(op.output, chain[0].data_input)
    for op in chain:
        edits.mark_possibly_unread(op.node.input[1:] if op.node.op_type == "BatchNormalization" else op.node.input)
    into = [first_bn.node.name or chain[-1].output]
    session.log.folded.extend(folded_record(op, into, "merged", edits.scope) for op in chain if op is not first_bn)


def fold_gemm_bias(plan: GemmBiasPlan, edits: PassEdits, session: FoldSession) -> None:
    """MatMul + Add/Sub -> Gemm reading W and the bias as they are stored: nothing is written."""
    layer, index, scope = plan.layer, edits.index, edits.scope
    # The Gemm takes the MatMul's place, or the Add's when the bias is computed in between.
    here, gone = plan.layer.output, plan.output
    if plan.at_add:
        here, gone = gone, here
    edits.replace(index.producer[here], gemm_node(plan))
    edits.removed.add(index.producer[gone])
    edits.alias(layer.output, plan.output)
    # A MatMul folded in an earlier pass is no longer refolded from its original weight: its
    # record keeps checking what that pass wrote, and the Gemm is the next fold's original.
    session.originals.pop((scope, layer.output), None)
    session.log.folded.append(FoldedRecord(plan.node.name or plan.output, plan.node.op_type, plan.output,
                                           [layer.node.name or layer.output], "backward", scope, "Gemm"))


def replace_constant_batch_norms(edits: PassEdits, session: FoldSession) -> bool:
    """Training-mode BNs of constants become initializers named like their output, before any
    fold (the layers reading them then fold like any layer); what only they read goes too (commit
    with `any_default_op`: their statistics may be computed by ReduceMean & co.). Whether any was found."""
    index, scope = edits.index, edits.scope
    found = constant_batch_norms(index)
    if not found:
        return False
    edits.removed.update(index.producer[node.output[0]] for node, _ in found)
    edits.mark_possibly_unread(name for node, _ in found for name in node.input if name)
    for node, values in found:
        if any(reader not in edits.removed for reader in index.consumers.get(node.output[0], ())):
            edits.add_initializer(node.output[0], values)  # else only other such BNs read it
        session.evaluated_names.add((scope, node.output[0]))
        session.log.folded.append(FoldedRecord(node.name or node.output[0], node.op_type, node.output[0],
                                               [node.output[0]], "evaluated", scope))
        if session.keep_provenance:
            inputs = [index.constant(name) for name in node.input[:3]]
            session.log.evaluated.append(EvaluatedConstant(scope, copy_node(node), inputs, values))
    return True


def constant_batch_norms(index: GraphIndex) -> list[tuple[onnx.NodeProto, np.ndarray]]:
    """Every training-mode BN of this scope whose Y is a constant, with that constant. A graph
    output keeps its node (an output that is an initializer is not portable)."""
    found = []
    for node in index.nodes:
        if node.op_type != "BatchNormalization" or not is_training_bn(node) or node.output[0] in index.graph_outputs:
            continue
        value = index.constant(node.output[0])
        if value is not None:
            found.append((node, value))
    return found
