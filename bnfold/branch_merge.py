"""Graph edit of branch re-parameterization: each sum of branches planned by `bnfold.rules.branches`
becomes one Conv that keeps the sum's output name. Called from the rewrite's fixed-point loop (the
only editor of a model) when the ordinary folds have nothing left to do, so the branch Convs already
hold their BNs.

The merged parameters are summed in float64 from each branch Conv's *original* parameters and the
maps folded into it so far (kept by the rewrite when verifying), and rounded once.
"""

from __future__ import annotations

import dataclasses

import onnx

from bnfold.branch_math import Branch, Combined, ConvBranch, Expr, evaluate
from bnfold.edits import PassEdits
from bnfold.fold_math import round_to_dtype
from bnfold.fold_session import FoldSession
from bnfold.graph import GraphIndex
from bnfold.provenance import BranchProvenance, LayerProvenance, copy_node
from bnfold.report import FoldedRecord, MergedBranchesRecord, Reason, SkippedRecord
from bnfold.rules.branches import BranchPlan, conv_branch
from bnfold.rules.layers import fold_parameters
from bnfold.rules.refusal import Refusal


def merge_branch(plan: BranchPlan, edits: PassEdits, session: FoldSession) -> None:
    """The tree under `plan.root` becomes one Conv producing the root's output."""
    index, scope = edits.index, edits.scope
    branches = {name: _current_branch(session, plan, name, scope) for name in plan.convs}
    term = evaluate(plan.expr, branches.__getitem__, lambda name: plan.affines[name].affine)
    main = max(plan.convs.values(), key=lambda layer: layer.weight[0].size)  # the largest kernel names it
    dtype = main.weight.dtype
    name = main.node.name
    base = name or plan.root.output[0]
    weight_name = session.names.fresh(f"{base}_bnfold_merged_weight")
    bias_name = session.names.fresh(f"{base}_bnfold_merged_bias")
    edits.add_initializer(weight_name, round_to_dtype(term.weight, dtype))
    edits.add_initializer(bias_name, round_to_dtype(term.bias, dtype))
    merged = onnx.helper.make_node(
        "Conv", [plan.shared_input, weight_name, bias_name], [plan.root.output[0]], name=name,
        group=term.group, strides=list(term.strides), dilations=list(term.dilations), pads=term.pads,
        kernel_shape=list(term.weight.shape[2:]))
    edits.replace_producer(plan.root.output[0], merged)
    others = [layer.node for layer in plan.convs.values()] + [op.node for op in plan.affines.values()] \
        + [node for node in plan.combinations if node is not plan.root]
    for node in others + [plan.root]:
        edits.mark_possibly_unread(n for n in node.input if n and n != plan.shared_input)
    edits.removed.update(index.producer[node.output[0]] for node in others)
    into = [name or plan.root.output[0]]
    session.log.folded.extend(FoldedRecord(op.node.name or op.output, op.node.op_type, op.output, into, "branches",
                                           scope) for op in plan.affines.values())
    session.log.merged_branches.append(MergedBranchesRecord(
        into[0], plan.root.output[0], _leaves(plan.expr), [layer.node.name or name for name, layer in plan.convs.items()],
        [n.name or n.output[0] for n in others if n.op_type != "Conv"] + [plan.root.name or plan.root.output[0]],
        scope))
    if session.keep_provenance:
        session.provenance[(scope, plan.root.output[0])] = _provenance(session, index, plan, scope, [weight_name, bias_name])


def _current_branch(session: FoldSession, plan: BranchPlan, name: str, scope: str) -> ConvBranch:
    """A branch Conv's float64 parameters: recomputed from its original ones when earlier passes
    folded maps into it (so the merged Conv is still rounded once), else as stored."""
    layer = plan.convs[name]
    original = session.originals.pop((scope, name), None)
    if original is None:
        branch = conv_branch(layer.node, layer.weight, layer.bias)
    else:
        params = fold_parameters(original.layer, original.pre, original.post)
        branch = conv_branch(layer.node, params.weight, params.bias)
    assert not isinstance(branch, Refusal), "planning checked every branch's geometry"
    return branch


def _provenance(session: FoldSession, index: GraphIndex, plan: BranchPlan, scope: str, written: list[str]
                ) -> BranchProvenance:
    convs = {}
    for name, layer in plan.convs.items():
        earlier = session.provenance.pop((scope, name), None)
        if not isinstance(earlier, LayerProvenance):  # a Conv merged before is checked from its values as stored
            params = {layer.node.input[1]: layer.weight}
            if layer.bias is not None:
                params[layer.node.input[2]] = layer.bias
            earlier = LayerProvenance(scope, copy_node(layer.node), params, [], [], {}, list(params), name)
        convs[name] = earlier
    nodes, constants = {}, {}
    for name, op in plan.affines.items():
        nodes[name] = copy_node(op.node)
        for input_name in op.node.input:
            value = index.constant(input_name) if input_name != op.data_input else None
            if value is not None:
                constants[input_name] = value
    rank = next(iter(plan.convs.values())).weight.ndim
    return BranchProvenance(scope, plan.root.output[0], written, plan.expr, convs, nodes, constants, rank)


def with_branch_reasons(records: list[SkippedRecord], refusals: dict[str, Refusal]) -> list[SkippedRecord]:
    """A BN inside a sum of branches has no layer of its own to fold into: the reason it stays is
    why the sum could not be merged into one Conv."""
    if not refusals:
        return records
    return [dataclasses.replace(r, reason=refusals[r.output].reason, detail=refusals[r.output].detail)
            if r.output in refusals and r.reason == Reason.NO_FOLDABLE_NEIGHBOUR else r for r in records]


def _leaves(expr: Expr) -> int:
    if isinstance(expr, Branch):
        return 1
    if isinstance(expr, Combined):
        return sum(_leaves(child) for child in expr.children)
    return _leaves(expr.child)
