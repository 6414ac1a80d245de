"""Match sums of linear branches that read one tensor (RepVGG, MobileOne, ACNet, RepMixer) and plan
their merge into one Conv; the arithmetic and the exactness conditions are in `bnfold.branch_math`.

A *combination* is an Add / Sub / Sum of dynamic values. Below it, a branch may hold more
combinations, per-channel affine maps (BN, Mul/Add/Sub/Div by a constant on the channel axis), and
ends either in a Conv reading the shared input x or in x itself. Every value inside the tree (the
Convs' outputs, the BN outputs, the partial sums) must be read only by the tree: another reader would
lose the value it reads. The rule reads the index only; `bnfold.branch_merge` edits the graph.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx

from bnfold.branch_math import Branch, Combined, ConvBranch, Expr, GeometryMismatch, KernelTerm, Mapped, evaluate
from bnfold.fold_math import round_to_dtype
from bnfold.graph import GraphIndex
from bnfold.protos import attribute
from bnfold.report import Reason
from bnfold.rules.affine_ops import AffineOp, is_candidate, is_default_domain, match_affine
from bnfold.rules.conv_attributes import invalid_attribute
from bnfold.rules.layer_kinds import auto_pad
from bnfold.rules.layers import Layer, match_layer
from bnfold.rules.refusal import Refusal

COMBINE_OPS = frozenset({"Add", "Sub", "Sum"})
MAX_TREE_VALUES = 64  # a block's branches; a larger linear region is not a re-parameterized block


@dataclass
class BranchPlan:
    """Replace the tree under `root` by one Conv reading `shared_input`."""

    root: onnx.NodeProto
    shared_input: str
    expr: Expr
    convs: dict[str, Layer] = field(default_factory=dict)  # by output name
    affines: dict[str, AffineOp] = field(default_factory=dict)  # by output name
    combinations: list[onnx.NodeProto] = field(default_factory=list)  # the root included

    @property
    def outputs(self) -> set[str]:
        return set(self.convs) | set(self.affines) | {node.output[0] for node in self.combinations}


@dataclass
class _Walk:
    """What one attempt on a shared input found; `refusal` is the first reason it gave up."""

    plan: BranchPlan
    batch_norms: list[str] = field(default_factory=list)
    refusal: Refusal | None = None

    def refuse(self, reason: Reason, detail: str) -> None:
        if self.refusal is None:
            self.refusal = Refusal(reason, detail)


def plan_branch_merges(index: GraphIndex) -> tuple[list[BranchPlan], dict[str, Refusal]]:
    """Every mergeable branch sum, and why BNs inside refused ones stay (by BN output name)."""
    plans: list[BranchPlan] = []
    refusals: dict[str, Refusal] = {}
    claimed: set[str] = set()
    if index.opset < 7:  # legacy broadcasting attributes on Add/Sub
        return plans, refusals
    for node in reversed(index.nodes):  # outermost sums first: they take the largest tree
        if node.output and node.output[0] not in claimed and is_combination(node, index):
            result = match_branches(node, index)
            if isinstance(result, BranchPlan):
                plans.append(result)
                claimed.update(result.outputs)
            elif result is not None:
                refusal, batch_norms = result
                for name in batch_norms:
                    refusals.setdefault(name, refusal)
    return plans, refusals


def is_combination(node: onnx.NodeProto, index: GraphIndex) -> bool:
    if node.op_type not in COMBINE_OPS or not is_default_domain(node) or len(node.output) != 1:
        return False
    if len(node.input) < 2 or (node.op_type != "Sum" and len(node.input) != 2):
        return False
    return all(name and index.constant(name) is None for name in node.input)


def match_branches(root: onnx.NodeProto, index: GraphIndex) -> BranchPlan | tuple[Refusal, list[str]] | None:
    """The plan for the tree under `root`; (refusal, BN outputs inside) when it has Convs and BNs but
    does not merge; None when it is no candidate at all (no Conv in it, e.g. a plain residual sum)."""
    first: _Walk | None = None
    for shared, conv in _shared_input_candidates(root, index):
        weight = index.constant(conv.input[1]) if len(conv.input) > 1 else None
        walk = _Walk(BranchPlan(root, shared, Branch(None)))
        walk.plan.expr = _expand(root.output[0], walk, index, None if weight is None else weight.ndim, is_root=True)
        if walk.refusal is None and walk.plan.convs:
            refusal = geometry_refusal(walk.plan)
            if refusal is None:
                return walk.plan
            walk.refusal = refusal
        if first is None and walk.plan.convs:
            first = walk
    if first is None or first.refusal is None or not first.batch_norms:
        return None
    return first.refusal, first.batch_norms


def _shared_input_candidates(root: onnx.NodeProto, index: GraphIndex) -> list[tuple[str, onnx.NodeProto]]:
    """Data inputs of the Convs reachable from `root` through linear nodes, nearest first, each with
    a Conv reading it."""
    found: dict[str, onnx.NodeProto] = {}
    pending, seen = list(root.input), set()
    while pending and len(seen) < MAX_TREE_VALUES:
        value = pending.pop(0)
        node = index.producer_of(value)
        if value in seen or node is None or not is_default_domain(node):
            continue
        seen.add(value)
        if node.op_type == "Conv" and node.input:
            found.setdefault(node.input[0], node)
        elif node.op_type in COMBINE_OPS or is_candidate(node):
            pending.extend(name for name in node.input if name)
    return list(found.items())


def _expand(value: str, walk: _Walk, index: GraphIndex, rank: int | None, is_root: bool = False) -> Expr:
    """The expression computing `value` from the shared input; on failure, `walk.refusal` is set (the
    walk goes on through the other branches, to name every BN inside the candidate)."""
    plan = walk.plan
    if value == plan.shared_input:
        return Branch(None)
    node = index.producer_of(value)
    if not is_root and index.consumer_count(value) != 1:
        walk.refuse(Reason.BRANCH_INTERMEDIATE_READ, f"'{value}' inside the branch sum '{plan.root.output[0]}' "
                    f"is also read elsewhere ({index.consumer_count(value)} readers)")
    if node is None or len(plan.outputs) >= MAX_TREE_VALUES:
        walk.refuse(Reason.BRANCH_NOT_LINEAR, f"'{value}' is not computed from '{plan.shared_input}'")
        return Branch(None)
    if node.op_type == "Conv" and node.input[0] == plan.shared_input and is_default_domain(node):
        layer = match_layer(node, index)
        if isinstance(layer, Refusal):
            walk.refuse(layer.reason, layer.detail)
        else:
            plan.convs[value] = layer
        return Branch(value)
    if is_combination(node, index):
        plan.combinations.append(node)
        signs = (1, -1) if node.op_type == "Sub" else (1,) * len(node.input)
        return Combined(tuple(_expand(name, walk, index, rank) for name in node.input), signs)
    op = match_affine(node, index, rank) if is_candidate(node) else None
    if isinstance(op, AffineOp) and op.axis in (None, 1):
        plan.affines[value] = op
        if node.op_type == "BatchNormalization":
            walk.batch_norms.append(value)
        return Mapped(_expand(op.data_input, walk, index, rank), value)
    walk.refuse(Reason.BRANCH_NOT_LINEAR, f"'{value}' is computed by {node.op_type} '{node.name or value}', "
                f"not a linear map of '{plan.shared_input}'")
    return Branch(None)


def conv_branch(node: onnx.NodeProto, weight: np.ndarray, bias: np.ndarray | None) -> ConvBranch | Refusal:
    """A Conv's geometry with explicit pads (SAME padding only at stride 1, where it does not depend
    on the input size)."""
    invalid = invalid_attribute(node)
    if invalid is not None:
        return invalid
    spatial = weight.ndim - 2
    kernel = weight.shape[2:]
    strides = tuple(attribute(node, "strides", None) or (1,) * spatial)
    dilations = tuple(attribute(node, "dilations", None) or (1,) * spatial)
    padding = auto_pad(node)
    if padding in ("SAME_UPPER", "SAME_LOWER"):
        if any(s != 1 for s in strides):
            return Refusal(Reason.BRANCH_GEOMETRY_MISMATCH, f"Conv '{node.name}' {padding} with strides "
                           f"{list(strides)}: its padding depends on the input size")
        totals = [(k - 1) * d for k, d in zip(kernel, dilations)]
        begins = [t // 2 if padding == "SAME_UPPER" else t - t // 2 for t in totals]
        pads = tuple(begins) + tuple(t - b for t, b in zip(totals, begins))
    elif padding == "VALID":
        pads = (0,) * (2 * spatial)
    else:
        pads = tuple(attribute(node, "pads", None) or (0,) * (2 * spatial))
    if len(strides) != spatial or len(dilations) != spatial or len(pads) != 2 * spatial:
        return Refusal(Reason.UNSUPPORTED_ATTRIBUTE, f"Conv '{node.name}' attributes do not match its weight's rank")
    return ConvBranch(weight, bias, int(attribute(node, "group", 1)), strides, dilations, pads)


def geometry_refusal(plan: BranchPlan) -> Refusal | None:
    """Why the planned branches do not sum to one Conv of their dtype, if they do not."""
    dtypes = {layer.weight.dtype for layer in plan.convs.values()}
    if len(dtypes) != 1:
        return Refusal(Reason.UNSUPPORTED_DTYPE, f"branch Convs have weights of dtypes {sorted(map(str, dtypes))}")
    branches = {}
    for name, layer in plan.convs.items():
        branch = conv_branch(layer.node, layer.weight, layer.bias)
        if isinstance(branch, Refusal):
            return branch
        branches[name] = branch
    try:
        term = evaluate(plan.expr, branches.__getitem__, lambda name: plan.affines[name].affine)
    except GeometryMismatch as error:
        return Refusal(Reason.BRANCH_GEOMETRY_MISMATCH, f"branches of '{plan.root.output[0]}': {error}")
    if not isinstance(term, KernelTerm):
        return Refusal(Reason.BRANCH_NOT_LINEAR, "no Conv branch")
    dtype = dtypes.pop()
    if not all(np.isfinite(round_to_dtype(v, dtype)).all() for v in (term.weight, term.bias)):
        return Refusal(Reason.INVALID_PARAMS, f"merged Conv parameters would overflow {dtype}")
    return None
