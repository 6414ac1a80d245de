"""The driver of the only code that edits a model: plans and applies folds pass by pass, scope by
scope, until nothing changes.

Each pass plans on a fresh `GraphIndex` (`bnfold.rules.chains.plan_pass`), collects its edits in a
`PassEdits` (`bnfold.layer_folds`, `bnfold.node_merges`, `bnfold.branch_merge` say what changes),
and commits them in one splice: every pass is O(nodes): one index build, one plan, one splice.
"""

from __future__ import annotations

import numpy as np
import onnx

from bnfold.branch_merge import merge_branch, with_branch_reasons
from bnfold.edits import PassEdits
from bnfold.fold_session import FoldSession, RewriteLog
from bnfold.function_scopes import fold_function
from bnfold.graph import GraphIndex, names_used_inside
from bnfold.layer_folds import fold_layer, record_forward_folds
from bnfold.node_merges import fold_gemm_bias, merge_chain, replace_constant_batch_norms
from bnfold.rules.affine_ops import ARITHMETIC_OPS, AffineOp
from bnfold.rules.branches import plan_branch_merges
from bnfold.rules.chains import LayerPlan, MergePlan, PassPlan, plan_pass
from bnfold.rules.explain import explain_skipped
from bnfold.rules.passthrough import PASSTHROUGH_OPS
from bnfold.rules.readers import data_consumer
from bnfold.rules.refusal import Refusal
from bnfold.tensors import TensorStore
from bnfold.walk import MAIN_SCOPE, has_subgraphs, sees_callers_scope, subgraphs_with_owners

MAX_PASSES = 32


def fold_model(model: onnx.ModelProto, keep_provenance: bool = False, store: TensorStore | None = None,
               merge_branches: bool = True) -> RewriteLog:
    """Fold every foldable affine chain of `model` in place (the caller owns `model`). New tensor
    data goes to `store` (see `bnfold.tensors`); without one, it is written into the proto.
    `merge_branches`: also merge sums of linear branches into one Conv (`bnfold.branch_merge`)."""
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 1)
    rewriter = Rewriter(FoldSession(model, opset, keep_provenance, store, merge_branches))
    with np.errstate(over="ignore"):  # a weight overflowing float16 becomes inf: verification says so
        rewriter.fold_graph(model.graph, MAIN_SCOPE, None)
        for function in model.functions:
            fold_function(rewriter, function)
    rewriter.session.log.provenance = list(rewriter.session.provenance.values())
    return rewriter.session.log


class Rewriter:
    """Folds graph scopes to a fixed point; `session` carries what the passes remember."""

    def __init__(self, session: FoldSession) -> None:
        self.session = session

    def fold_graph(self, graph: onnx.GraphProto, scope: str, outer: GraphIndex | None,
                   input_kind: str = "graph input") -> None:
        session = self.session
        infos = lambda: session.value_infos.get(scope, {})

        def build_index() -> GraphIndex:
            return GraphIndex(graph, session.model.ir_version, session.opset, infos, outer, is_main_graph=outer is None,
                              store=session.store, input_kind=input_kind,
                              trained=session.trained_names if scope == MAIN_SCOPE else frozenset(),
                              # Inferred shapes are evidence-only (`bnfold.shapes`): main-graph ones
                              # may make a Shape/CastLike reader's result a constant.
                              static_infos=infos if scope == MAIN_SCOPE else None)

        index = build_index()
        edits = PassEdits(graph, index, scope, session.store)
        if replace_constant_batch_norms(edits, session):
            edits.commit(any_default_op=True)
            index = build_index()
        branch_refusals: dict[str, Refusal] = {}
        for _ in range(MAX_PASSES):
            plan = plan_pass(index)
            if plan:
                session.log.passes += 1
                cascades = _may_cascade(plan.layers, plan.merges, index) or bool(plan.gemm_biases)
                self._apply(plan, PassEdits(graph, index, scope, session.store))
                if not cascades and not _needs_index(graph, session.merge_branches):
                    return  # no BN left to explain, no subgraph or sum to visit: skip re-indexing a big graph
                index = build_index()
                if cascades:
                    continue
            if not session.merge_branches:
                break
            merged, branch_refusals = self._merge_branches(PassEdits(graph, index, scope, session.store))
            if not merged:
                break
            session.log.passes += 1
            index = build_index()
        for path, body, owner in subgraphs_with_owners(graph, scope):
            # Outer names resolve in this graph only for control-flow bodies; elsewhere they are unknown.
            self.fold_graph(body, path, index if sees_callers_scope(owner) else None)
        self._drop_outer_values_unread(graph, index)
        explained = [r for r in explain_skipped(index, scope) if (scope, r.output) not in session.created_biases]
        session.log.skipped.extend(with_branch_reasons(explained, branch_refusals))

    def _apply(self, plan: PassPlan, edits: PassEdits) -> None:
        layers = plan.layers
        layers.reverse()
        folded_forward: list[tuple[list[AffineOp], str]] = []
        while layers:
            # Popped, so each layer's weight (possibly a mapped external-data region) is released
            # as soon as it is folded: only the tensor being folded is held at any time.
            layer_plan = layers.pop()
            fold_layer(layer_plan, edits, self.session)
            if layer_plan.pre:
                folded_forward.append((layer_plan.pre, layer_plan.layer.node.name or layer_plan.layer.output))
        record_forward_folds(folded_forward, self.session, edits.scope)
        for merge in plan.merges:
            merge_chain(merge, edits, self.session)
        for bias in plan.gemm_biases:
            fold_gemm_bias(bias, edits, self.session)
        self._commit(edits)

    def _merge_branches(self, edits: PassEdits) -> tuple[bool, dict[str, Refusal]]:
        """Merge every planned branch sum of this scope in one edit; whether anything was merged,
        and why the BNs inside refused sums stay."""
        plans, refusals = plan_branch_merges(edits.index)
        for plan in plans:
            merge_branch(plan, edits, self.session)
        if plans:
            self._commit(edits)
        return bool(plans), refusals

    def _commit(self, edits: PassEdits) -> None:
        """Commit a pass and bring what the session remembers up to date with it."""
        session, scope = self.session, edits.scope
        dead_names = edits.commit()
        session.evaluated_names.difference_update((scope, name) for name in dead_names)
        for name in dead_names & session.checked_by.keys():
            # A tensor an earlier pass wrote and this pass folded away (a MatMul's bias Add folded
            # forward into the next layer) is checked no more where it was written; the layer that
            # absorbed it is checked against its values.
            record = session.provenance.get(session.checked_by.pop(name))
            if record is not None and record.scope == scope:
                record.written = [n for n in record.written if n != name]
        session.outer_values_unread.update(edits.outer_values_unread())

    def _drop_outer_values_unread(self, graph: onnx.GraphProto, index: GraphIndex) -> None:
        """Remove this scope's initializers that only a (now folded) subgraph used to read."""
        session = self.session
        mine = session.outer_values_unread & index.initializers.keys()
        if not mine:
            return
        used = names_used_inside(graph)
        dead = {name for name in mine if name not in used and name not in index.overridable}
        session.outer_values_unread -= mine
        for values in (graph.initializer, graph.input):
            doomed = [i for i, value in enumerate(values) if value.name in dead]
            for position in reversed(doomed):
                del values[position]


def _may_cascade(layers: list[LayerPlan], merges: list[MergePlan], index: GraphIndex) -> bool:
    """Can this pass's edits open folds the pass could not see? Forward folds (a chain's producer
    gains the layers as consumers), merges, MatMuls (which may become Gemms), and backward folds
    whose chain ends in a layout node (Conv -> BN -> Transpose -> Mul: the Mul is reachable only
    once the BN is gone) can. Any other backward fold into Conv/ConvTranspose/Gemm leaves every
    neighbour's situation as it was, so the common case needs no second full pass."""
    if merges or any(plan.pre or not plan.layer.has_bias_input for plan in layers):
        return True
    for plan in layers:
        follower = data_consumer(index, plan.post[-1].output) if plan.post else None
        if follower is not None and follower.op_type in PASSTHROUGH_OPS:
            return True
    return False


def _needs_index(graph: onnx.GraphProto, merge_branches: bool) -> bool:
    """After the last pass, does the scope still need an index: a BN or Mul/Add/Sub/Div left to
    explain, subgraphs (to fold, with this scope as their outer one, and to clean up after), or sums
    of branches to merge?"""
    explained = _EXPLAINED_OPS | {"Sum"} if merge_branches else _EXPLAINED_OPS
    return any(node.op_type in explained or has_subgraphs(node) for node in graph.node)


_EXPLAINED_OPS = ARITHMETIC_OPS | {"BatchNormalization"}
