"""Plan one rewrite pass: which affine chains fold into which layers.

A *chain* is a run of per-channel affine ops (BN, Mul/Add/Sub/Div by a constant) on one channel axis
where every link but the last has a single consumer. For each chain, in order of preference:

1. backward: the chain follows a layer whose output feeds only the chain -> absorb it as `post`;
2. forward:  every consumer of the chain's end is a layer that can absorb it on its input channels
             (no padding, axis and channel count match) -> absorb it as `pre` into each of them;
3. merge:    a chain of two or more ops holding a BN is replaced by a single BN;
4. Gemm:     a 2-D MatMul whose only map after it is a constant Add/Sub becomes one Gemm
             (`bnfold.rules.gemm_bias`), unless a fold above already takes the MatMul or the Add.

Readers of a value that look only at its shape or dtype (`bnfold.rules.readers`) do not count as
consumers: the fold keeps every shape and dtype, and `bnfold.edits` rewires them.

Planning reads the `GraphIndex` only; `bnfold.rewrite` applies the plans (`bnfold.layer_folds`,
`bnfold.node_merges`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx

from bnfold.fold_math import ChannelAffine, ChannelSpread, round_to_dtype, spread_affine
from bnfold.graph import GraphIndex
from bnfold.rules.affine_ops import AffineOp, chain_affine, chain_axis, chain_channels, is_candidate, match_affine
from bnfold.rules.gemm_bias import GemmBiasPlan, match_gemm_bias
from bnfold.rules.layers import LAYER_OPS, Layer, backward_refusal, forward_refusal, match_layer, overflow_refusal
from bnfold.rules.multi_producer import JOIN_OPS, join_plans, joined_chain_head
from bnfold.rules.passthrough import PASSTHROUGH_OPS, axis_before, spread_after, walk_passthrough
from bnfold.rules.readers import data_consumer, data_readers


@dataclass
class LayerPlan:
    """Fold `pre` (a chain feeding the layer) and `post` (a chain after it) into one layer."""

    layer: Layer
    pre: list[AffineOp] = field(default_factory=list)
    post: list[AffineOp] = field(default_factory=list)
    layout_after: list[onnx.NodeProto] = field(default_factory=list)  # layout-only nodes between the layer and `post`
    layout_before: list[onnx.NodeProto] = field(default_factory=list)  # layout-only nodes between `pre` and the layer
    pre_spread: ChannelSpread | None = None  # where `pre`'s channels are at the layer's input
    # `post` after a Concat/Add joining several layers (`layout_after` is that node): the layer's channel
    # slice of the chain, or only its scale (`bnfold.rules.multi_producer`).
    post_slice: tuple[int, int] | None = None
    post_scale_only: bool = False

    @property
    def pre_affine(self) -> ChannelAffine | None:
        affine = chain_affine(self.pre)
        if affine is None or self.pre_spread is None:
            return affine
        return spread_affine(affine, self.pre_spread)

    @property
    def post_affine(self) -> ChannelAffine | None:
        return chain_affine(self.post)


@dataclass(frozen=True)
class MergePlan:
    """Replace a chain of affine ops by one BatchNormalization with the composed map."""

    chain: list[AffineOp]


@dataclass
class PassPlan:
    layers: list[LayerPlan] = field(default_factory=list)
    merges: list[MergePlan] = field(default_factory=list)
    gemm_biases: list[GemmBiasPlan] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.layers or self.merges or self.gemm_biases)


def plan_pass(index: GraphIndex) -> PassPlan:
    """Every non-conflicting fold available in the graph as it is now."""
    by_layer: dict[str, LayerPlan] = {}  # layer output name -> its plan
    claimed: set[str] = set()  # outputs of affine ops already placed in a plan
    biases = _plan_backward(index, by_layer, claimed)
    _plan_joins(index, by_layer, claimed)
    merges = _plan_forward(index, by_layer, claimed)
    # A forward fold into the MatMul, or of the Add into the next layer, removes as many nodes:
    # it goes first, and the Gemm can form in a later pass.
    gemm_biases = [b for b in biases if b.layer.output not in by_layer and b.output not in claimed]
    return PassPlan(list(by_layer.values()), merges, gemm_biases)


def _plan_backward(index: GraphIndex, by_layer: dict[str, LayerPlan], claimed: set[str]) -> list[GemmBiasPlan]:
    """Chains after layers, folded into them; MatMul + bias pairs that could become Gemms."""
    biases: list[GemmBiasPlan] = []
    for node in index.nodes:
        if node.op_type not in LAYER_OPS or not node.output:
            continue
        follower = direct = data_consumer(index, node.output[0])
        if follower is not None and follower.op_type in PASSTHROUGH_OPS:
            between = walk_passthrough(node.output[0], index)
            follower = data_consumer(index, between[-1].output[0]) if between else None
        if follower is None or not is_candidate(follower):
            continue  # decided on structure alone: no weight is read for layers with nothing to fold
        layer = match_layer(node, index)
        if isinstance(layer, Layer):
            between, post = walk_backward_chain(layer, index)
            if post and worth_folding(layer, post) and overflow_refusal(layer, None, chain_affine(post)) is None:
                by_layer[layer.output] = LayerPlan(layer, post=post, layout_after=between)
                claimed.update(op.output for op in post)
            elif follower is direct:
                bias = match_gemm_bias(layer, direct, index)
                if isinstance(bias, GemmBiasPlan):
                    biases.append(bias)
    return biases


def _plan_forward(index: GraphIndex, by_layer: dict[str, LayerPlan], claimed: set[str]) -> list[MergePlan]:
    """Chains before layers, folded into them; chains no layer takes, merged into one BN."""
    merges: list[MergePlan] = []
    walked: set[str] = set()  # affine ops already seen in a forward chain (keeps walking linear)
    for node in index.nodes:
        if not is_candidate(node) or node.output[0] in claimed or node.output[0] in walked:
            continue
        chain = walk_forward_chain(node, index, claimed)
        if not chain:
            continue
        walked.update(op.output for op in chain)
        targets = forward_targets(chain, index, by_layer)
        through_layout = forward_layout_target(chain, index, by_layer) if targets is None else None
        if through_layout is not None:
            layer, between, spread = through_layout
            planned = by_layer.setdefault(layer.output, LayerPlan(layer))
            planned.pre, planned.layout_before, planned.pre_spread = chain, between, spread
        elif isinstance(targets, list):
            for layer in targets:
                by_layer.setdefault(layer.output, LayerPlan(layer)).pre = chain
        elif len(chain) >= 2 and mergeable(chain, index):
            merges.append(MergePlan(chain))
        else:
            continue
        claimed.update(op.output for op in chain)
    return merges


def _plan_joins(index: GraphIndex, by_layer: dict[str, LayerPlan], claimed: set[str]) -> None:
    """Chains after a Concat/Add of several layers, folded into each of them."""
    for node in index.nodes:
        head = joined_chain_head(node, index) if node.op_type in JOIN_OPS else None
        if head is None or head.output[0] in claimed:
            continue
        chain = walk_forward_chain(head, index, claimed)
        if not chain or chain[0].data_input != node.output[0]:
            continue
        parts = join_plans(node, chain, index, set(by_layer))
        if parts is None:
            continue
        for part in parts:
            by_layer[part.layer.output] = LayerPlan(part.layer, post=part.chain, layout_after=[node],
                                                    post_slice=part.channels, post_scale_only=part.scale_only)
        claimed.update(op.output for op in chain)


def walk_backward_chain(layer: Layer, index: GraphIndex) -> tuple[list[onnx.NodeProto], list[AffineOp]]:
    """The longest chain of affine ops after `layer` that it can absorb, and the layout-only nodes
    (Transpose, Reshape, ...) between the layer and the chain, which stay where they are."""
    # Opset < 7 has legacy broadcasting (the bias Add a rank-3 MatMul may need after the layout
    # nodes would not be numpy-aligned there): layout passthrough only from opset 7 on.
    between = walk_passthrough(layer.output, index) if index.opset >= 7 else []
    current = between[-1].output[0] if between else layer.output
    rank = layer.output_rank if not between else index.rank(current)
    if between and rank is None:
        return [], []
    chain: list[AffineOp] = []
    while True:
        consumer = data_consumer(index, current)
        if consumer is None or not is_candidate(consumer):
            break
        op = match_affine(consumer, index, rank)
        if not isinstance(op, AffineOp) or op.data_input != current:
            break
        axis = op.axis if op.axis is None or not between else axis_before(between, op.axis, index)
        if op.axis is not None and axis is None:
            break
        if backward_refusal(layer, axis, op.affine.channels) is not None:
            break
        chain.append(op)
        current = op.output
    return (between if chain else []), chain


def walk_forward_chain(head: onnx.NodeProto, index: GraphIndex, claimed: set[str]) -> list[AffineOp]:
    """The chain of affine ops starting at `head`, on one consistent axis."""
    chain: list[AffineOp] = []
    node: onnx.NodeProto | None = head
    rank = None  # match_affine reads each data input's rank from the index
    while node is not None and is_candidate(node) and node.output[0] not in claimed:
        op = match_affine(node, index, rank)
        if not isinstance(op, AffineOp) or (chain and op.data_input != chain[-1].output):
            break
        axis = chain_axis(chain)
        if axis is not None and op.axis is not None and op.axis != axis:
            break
        if not _keeps_shape(op, chain, index):
            break
        chain.append(op)
        node = data_consumer(index, op.output)
    return chain


def _keeps_shape(op: AffineOp, chain: list[AffineOp], index: GraphIndex) -> bool:
    """Does the op's constant leave its input's channel count alone? A [1,C,1,1] constant on an
    [N,1,H,W] tensor broadcasts it up to C channels: not an affine map of the input. A BN's
    parameters always match its input's channels; for a later link, an earlier per-channel link
    has already fixed the count; otherwise shape inference must confirm it."""
    if op.axis is None:
        return True
    established = [o.affine.channels for o in chain if o.axis is not None]
    if established:
        return established[0] == op.affine.channels
    if op.node.op_type == "BatchNormalization":
        return True
    info = index.info(op.data_input)
    if info is None or info.shape is None or len(info.shape) <= op.axis:
        return False
    return info.shape[op.axis] == op.affine.channels


def forward_targets(chain: list[AffineOp], index: GraphIndex, by_layer: dict[str, LayerPlan]) -> list[Layer] | None:
    """The layers that absorb `chain` forward, or None if any consumer cannot."""
    end = chain[-1].output
    consumers = data_readers(index, end)
    if not consumers or end in index.graph_outputs:
        return None
    layers = []
    affine = chain_affine(chain)
    shift_free = not affine.shift.any()
    for consumer in consumers:
        layer = match_layer(consumer, index)
        if not isinstance(layer, Layer) or list(consumer.input).count(end) != 1 or layer.data_input != end:
            return None
        if forward_refusal(layer, chain_axis(chain), chain_channels(chain), shift_free) is not None:
            return None
        if not _can_take_pre(layer, affine, by_layer):
            return None
        layers.append(layer)
    return layers


def _can_take_pre(layer: Layer, affine: ChannelAffine, by_layer: dict[str, LayerPlan]) -> bool:
    """May `affine` fold forward into `layer`, given what this pass already plans for it: one pre
    chain per layer and pass, and no overflow of the layer's dtype together with its post chain."""
    planned = by_layer.get(layer.output)
    if planned is not None and planned.pre:
        return False
    return overflow_refusal(layer, affine, planned.post_affine if planned else None) is None


def forward_layout_target(chain: list[AffineOp], index: GraphIndex, by_layer: dict[str, LayerPlan]
                          ) -> tuple[Layer, list[onnx.NodeProto], ChannelSpread | None] | None:
    """chain -> layout-only nodes -> one layer (BatchNorm2d -> Flatten -> Linear): the layer, the
    layout nodes, and where the chain's channels are along the layer's input axis; None if not."""
    between = walk_passthrough(chain[-1].output, index) if index.opset >= 7 else []
    if not between:
        return None
    last = between[-1].output[0]
    consumer = data_consumer(index, last)
    layer = None if consumer is None else match_layer(consumer, index)
    if not isinstance(layer, Layer) or layer.data_input != last or list(consumer.input).count(last) != 1:
        return None
    axis, channels = chain_axis(chain), chain_channels(chain)
    spread = None if axis is None else spread_after(between, axis, channels, index)
    if axis is not None and spread is None:
        return None
    affine = chain_affine(chain)
    if spread is not None:
        affine = spread_affine(affine.expanded(channels), spread)
    if forward_refusal(layer, None if spread is None else spread.axis, affine.channels, not affine.shift.any()):
        return None
    if not _can_take_pre(layer, affine, by_layer):
        return None
    return layer, between, spread


def mergeable(chain: list[AffineOp], index: GraphIndex) -> bool:
    """A chain holding a BN on axis 1 can become one BN (opset >= 7: no consumed_inputs)."""
    has_bn = any(op.node.op_type == "BatchNormalization" for op in chain)
    if not (has_bn and chain_axis(chain) in (None, 1) and index.opset >= 7 and chain_channels(chain) > 1):
        return False
    # The merged scale and shift are stored in the first BN's parameter dtype: they must fit.
    bn = next(op for op in chain if op.node.op_type == "BatchNormalization")
    dtype = index.constant(bn.node.input[1]).dtype
    affine = chain_affine(chain)
    return all(np.isfinite(round_to_dtype(v, dtype)).all() for v in (affine.scale, affine.shift))


def worth_folding(layer: Layer, post: list[AffineOp]) -> bool:
    """MatMul -> Add(bias) is already the canonical form: folding only shifts into it would not
    remove anything, just turn it into a Gemm."""
    if layer.has_bias_input:
        return True
    return any(op.node.op_type not in ("Add", "Sub") or (op.affine.scale != 1).any() for op in post)
