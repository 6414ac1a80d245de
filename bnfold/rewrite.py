"""The only module that edits a model: applies planned folds pass by pass until nothing changes.

Guarantees kept here:
- the BN's (chain end's) output name is produced by the folded layer, so graph outputs, value_info
  and downstream names stay valid;
- a weight another node (or a subgraph) also reads is never overwritten: the folded layer gets a new,
  uniquely named initializer; a weight only this layer reads is overwritten under its own name;
- initializers and constant nodes left without readers by a fold are removed;
- every pass is O(nodes): one index build, one plan, one splice.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field, replace

import numpy as np
import onnx
from onnx import numpy_helper

from bnfold import fold_math
from bnfold.constants import EvaluatedConstant, constant_batch_norms
from bnfold.fold_math import ChannelAffine
from bnfold.function_scopes import fold_function
from bnfold.graph import (
    CONSTANT_FOLDABLE_OPS,
    GraphIndex,
    function_graph,
    has_subgraphs,
    names_used_inside,
    scoped_subgraphs,
    subgraphs_of,
)
from bnfold.branch_merge import merge_branches, with_branch_reasons
from bnfold.report import FoldedRecord, MergedBranchesRecord, SkippedRecord
from bnfold.rules.affine_ops import ARITHMETIC_OPS, AffineOp
from bnfold.rules.chains import LayerPlan, MergePlan, chain_axis, compose, plan_pass
from bnfold.rules.explain import explain_skipped
from bnfold.rules.gemm_bias import GemmBiasPlan, gemm_node
from bnfold.rules.layers import Layer, build_nodes, fold_parameters
from bnfold.rules.multi_producer import JOIN_OPS
from bnfold.rules.passthrough import PASSTHROUGH_OPS
from bnfold.rules.readers import data_consumer, rewired_readers
from bnfold.shapes import infer_value_infos
from bnfold.tensors import TensorStore

MAX_PASSES = 32


@dataclass
class ChainSegment:
    """Original affine nodes folded into a layer in one pass, as they acted on one tensor."""

    nodes: list[onnx.NodeProto]  # copies, in data order
    rank: int | None  # rank of the tensor they act on
    spread: tuple[int, int] | None = None  # (inner, length): reached the layer's input through a Flatten/Reshape
    channels: tuple[int, int] | None = None  # (first, count): the layer's slice of the chain (after a Concat)
    scale_only: bool = False  # the layer took the chain's scale only (the second layer of an Add)


@dataclass
class Provenance:
    """What a folded layer was made from, kept for the analytic check in `bnfold.verify`. Each pass
    that folds into the layer adds a segment: segments act on different tensors (layout nodes may sit
    between them), so each is re-derived on its own and then composed."""

    scope: str
    layer_node: onnx.NodeProto  # a copy of the original layer node
    layer_params: dict[str, np.ndarray]  # its constant inputs as stored, by input name
    pre: list[ChainSegment]  # folded in front, in data order
    post: list[ChainSegment]  # folded behind, in data order
    constants: dict[str, np.ndarray]  # the affine nodes' constant inputs as stored
    written: list[str]  # initializer names the folded node(s) read, in input order
    output: str  # the output name of the folded layer


@dataclass
class FoldOutcome:
    folded: list[FoldedRecord] = field(default_factory=list)
    skipped: list[SkippedRecord] = field(default_factory=list)
    merged_branches: list[MergedBranchesRecord] = field(default_factory=list)
    provenance: list = field(default_factory=list)  # Provenance, and BranchProvenance of merged branches
    evaluated: list[EvaluatedConstant] = field(default_factory=list)  # with provenance only
    passes: int = 0


class NameRegistry:
    """Every name used anywhere in the model, so new names never collide across scopes."""

    def __init__(self, model: onnx.ModelProto) -> None:
        self._model = model
        self._used: set[str] | None = None  # collected on first use: most folds need no new name

    @property
    def used(self) -> set[str]:
        if self._used is None:
            self._used = set()
            self._collect(self._model.graph, self._used)
            for function in self._model.functions:  # folds inside functions need fresh names there too
                self._collect(function_graph(function), self._used)
        return self._used

    def _collect(self, graph: onnx.GraphProto, used: set[str]) -> None:
        used.update(t.name for t in graph.initializer)
        used.update(v.name for v in graph.input)
        for node in graph.node:  # every node of the model: kept to plain set updates
            used.update(node.input)
            used.update(node.output)
            used.add(node.name)
            if has_subgraphs(node):
                for body in subgraphs_of(node):
                    self._collect(body, used)

    def fresh(self, base: str) -> str:
        name, counter = base, 0
        while name in self.used:
            counter += 1
            name = f"{base}_{counter}"
        self.used.add(name)
        return name


def fold_model(model: onnx.ModelProto, keep_provenance: bool = False, store: TensorStore | None = None,
               merge_branches: bool = True) -> FoldOutcome:
    """Fold every foldable affine chain of `model` in place (the caller owns `model`). New tensor
    data goes to `store` (see `bnfold.tensors`); without one, it is written into the proto.
    `merge_branches`: also merge sums of linear branches into one Conv (`bnfold.branch_merge`)."""
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 1)
    folder = _Folder(model, opset, keep_provenance, store)
    folder.merge_branches = merge_branches
    with np.errstate(over="ignore"):  # a weight overflowing float16 becomes inf: verification says so
        folder.fold_graph(model.graph, "main", None)
        for function in model.functions:
            fold_function(folder, function)
    folder.outcome.provenance = list(folder.provenance.values())
    return folder.outcome


class _Folder:
    def __init__(self, model: onnx.ModelProto, opset: int, keep_provenance: bool, store: TensorStore | None) -> None:
        self.model = model
        self.store = store
        self.opset = opset
        self.keep_provenance = keep_provenance
        self.names = NameRegistry(model)
        self._value_infos: dict[str, dict] | None = None
        self.evaluated_names: set[tuple[str, str]] = set()  # (scope, name): never overwritten in place
        self.orphaned: set[str] = set()
        self.created_biases: set[tuple[str, str]] = set()  # outputs of the bias Adds folds wrote: not the user's maps
        # Only kept with verification (they hold the original weights of folded layers).
        self.origins: dict[tuple[str, str], _Origin] = {}
        self.provenance: dict[tuple[str, str], Provenance] = {}
        self.written_by: dict[str, tuple[str, str]] = {}  # tensor name -> key of the record that wrote it
        self.outcome = FoldOutcome()
        self.merge_branches = True
        self.joined_records: dict[tuple[str, str], FoldedRecord] = {}

    @property
    def value_infos(self) -> dict[str, dict]:
        """Shapes of every scope, inferred once, when a rule first asks for one."""
        if self._value_infos is None:
            self._value_infos = infer_value_infos(self.model)
        return self._value_infos

    def fold_graph(self, graph: onnx.GraphProto, scope: str, outer: GraphIndex | None,
                   input_kind: str = "graph input") -> None:
        infos = lambda: self.value_infos.get(scope, {})

        def build_index() -> GraphIndex:
            return GraphIndex(graph, self.model.ir_version, self.opset, infos, outer, is_main_graph=outer is None,
                              store=self.store, input_kind=input_kind,
                              # Inferred shapes are evidence-only (`bnfold.shapes`): main-graph ones
                              # may make a Shape/CastLike reader's result a constant.
                              static_infos=infos if scope == "main" else None)

        index = build_index()
        if self._replace_constant_batch_norms(graph, index, scope):
            index = build_index()
        branch_refusals: dict = {}
        for _ in range(MAX_PASSES):
            plan = plan_pass(index)
            if plan:
                self.outcome.passes += 1
                cascades = _may_cascade(plan.layers, plan.merges, index) or bool(plan.gemm_biases)
                self._apply(graph, index, plan.layers, plan.merges, scope, plan.gemm_biases)
                if not cascades and not _needs_index(graph, self.merge_branches):
                    return  # no BN left to explain, no subgraph or sum to visit: skip re-indexing a big graph
                index = build_index()
                if cascades:
                    continue
            if not self.merge_branches:
                break
            merged, branch_refusals = merge_branches(self, graph, index, scope)
            if not merged:
                break
            self.outcome.passes += 1
            index = build_index()
        for path, body in scoped_subgraphs(graph, scope):
            self.fold_graph(body, path, index)
        self._drop_outer_orphans(graph, index)
        explained = [r for r in explain_skipped(index, scope) if (scope, r.output) not in self.created_biases]
        self.outcome.skipped.extend(with_branch_reasons(explained, branch_refusals))

    def _drop_outer_orphans(self, graph: onnx.GraphProto, index: GraphIndex) -> None:
        """Remove this scope's initializers that only a (now folded) subgraph used to read."""
        mine = self.orphaned & index.initializers.keys()
        if not mine:
            return
        used = names_used_inside(graph)
        dead = {name for name in mine if name not in used and name not in index.overridable}
        self.orphaned -= mine
        for values in (graph.initializer, graph.input):
            doomed = [i for i, value in enumerate(values) if value.name in dead]
            for position in reversed(doomed):
                del values[position]

    # --- one pass --------------------------------------------------------------------------

    def _apply(
        self, graph: onnx.GraphProto, index: GraphIndex, layers: list[LayerPlan], merges: list[MergePlan], scope: str,
        gemm_biases: list[GemmBiasPlan] = (),
    ) -> None:
        replaced: dict[int, onnx.NodeProto] = {}  # node position -> its replacement
        removed: set[int] = set()
        maybe_dead: set[str] = set()
        # Values the pass removes -> a value with the same shape and dtype, for shape-only readers.
        aliases: dict[str, str] = {}
        forward_targets: dict[str, tuple[list[AffineOp], list[str]]] = {}  # chain head -> (chain, layers)
        layers.reverse()
        while layers:
            # Popped, so each layer's weight (possibly a mapped external-data region) is released
            # as soon as it is folded: only the tensor being folded is held at any time.
            plan = layers.pop()
            self._fold_layer(graph, index, plan, scope, replaced, removed, maybe_dead)
            aliases.update(_vanished_values(index, plan, replaced))
            if plan.pre:
                layer_name = plan.layer.node.name or plan.layer.output
                forward_targets.setdefault(plan.pre[0].output, (plan.pre, []))[1].append(layer_name)
        for chain, into in forward_targets.values():
            self.outcome.folded.extend(_record(op, into, "forward", scope) for op in chain)
        for merge in merges:
            self._merge_chain(graph, index, merge, scope, replaced, removed, maybe_dead)
            aliases.update((op.output, merge.chain[0].data_input) for op in merge.chain[:-1])
        for bias in gemm_biases:
            self._fold_gemm_bias(index, bias, scope, replaced, removed)
            aliases[bias.layer.output] = bias.output
        if aliases:
            replaced.update(rewired_readers(index, aliases, replaced))
        self.commit(graph, index, replaced, removed, maybe_dead, scope)

    def commit(self, graph: onnx.GraphProto, index: GraphIndex, replaced: dict[int, onnx.NodeProto], removed: set[int],
               maybe_dead: set[str], scope: str) -> None:
        """Write one pass's node edits into `graph` and drop the values nobody reads any more."""
        dead_names = _dead_values(index, replaced, removed, maybe_dead)
        self.evaluated_names.difference_update((scope, name) for name in dead_names)
        for name in dead_names & self.written_by.keys():
            # A tensor an earlier pass wrote and this pass folded away (a MatMul's bias Add folded
            # forward into the next layer) is checked no more where it was written; the layer that
            # absorbed it is checked against its values.
            record = self.provenance.get(self.written_by.pop(name))
            if record is not None and record.scope == scope:
                record.written = [n for n in record.written if n != name]
        # Values of an enclosing scope this pass stopped reading: that scope cleans them up.
        self.orphaned.update(n for n in maybe_dead if n not in index.initializers and n not in index.producer)
        _drop_vanished_value_info(graph, index, replaced, removed)
        for position, node in replaced.items():
            graph.node[position].CopyFrom(node)
        _delete_positions(graph.node, removed)
        _delete_initializers(graph, dead_names)

    def _replace_constant_batch_norms(self, graph: onnx.GraphProto, index: GraphIndex, scope: str) -> bool:
        """Training-mode BNs of constants become initializers named like their output, before any
        fold (the layers reading them then fold like any layer); what only they read goes too."""
        found = constant_batch_norms(index)
        if not found:
            return False
        removed = {index.producer[node.output[0]] for node, _ in found}
        maybe_dead = {name for node, _ in found for name in node.input if name}
        for node, values in found:
            if any(reader not in removed for reader in index.consumers.get(node.output[0], ())):
                self._add_initializer(graph, index, node.output[0], values)  # else only other such BNs read it
            self.evaluated_names.add((scope, node.output[0]))
            self.outcome.folded.append(FoldedRecord(node.name or node.output[0], node.op_type, node.output[0],
                                                    [node.output[0]], "evaluated", scope))
            if self.keep_provenance:
                inputs = [index.constant(name) for name in node.input[:3]]
                self.outcome.evaluated.append(EvaluatedConstant(scope, _copy(node), inputs, values))
        dead_names = _dead_values(index, {}, removed, maybe_dead, any_default_op=True)
        _drop_vanished_value_info(graph, index, {}, removed)
        _delete_positions(graph.node, removed)
        _delete_initializers(graph, dead_names)
        return True

    def _fold_layer(self, graph, index, plan: LayerPlan, scope, replaced, removed, maybe_dead) -> None:
        layer = plan.layer
        # With layout-only nodes after `pre`, the layer keeps reading them and the first of them
        # reads the chain's input instead.
        x_name = plan.pre[0].data_input if plan.pre and not plan.pre_between else layer.data_input
        # With layout-only nodes in between, the layer keeps its output and the last of them takes
        # over the chain's output name instead.
        y_name = plan.post[-1].output if plan.post and not plan.between else layer.output
        # A layer folded in an earlier pass is recomputed from its original parameters with the maps
        # composed, so it is still rounded once (and checked against one provenance).
        origin = self.origins.pop((scope, layer.output), None)
        if origin is None:  # a merged branch sum folded further is checked from its values as stored
            self.provenance.pop((scope, layer.output), None)
        math_layer = origin.layer if origin else layer
        pre = _then(plan.pre_affine, origin.pre if origin else None)
        post = _then(origin.post if origin else None, plan.post_affine)
        params = fold_parameters(math_layer, pre, post, round_weight=True)
        position = index.producer[layer.output]

        def name_for(role: str, preferred: str) -> str:
            # Overwrite in place only what nobody else reads; otherwise a fresh, unique name.
            # A tensor an earlier fold wrote is overwritten only by a refold of that same layer
            # (`origin`): another record still checks it.
            if role in ("weight", "bias") and preferred in index.initializers and index.consumer_count(preferred) == 1 \
                    and preferred not in index.overridable and preferred in layer.node.input \
                    and (scope, preferred) not in self.evaluated_names \
                    and (origin is not None or preferred not in self.written_by):
                return preferred
            return self.names.fresh(f"{preferred}_bnfold" if role in ("weight", "bias") else preferred)

        provenance = self._provenance(index, plan, scope, origin) if self.keep_provenance else None
        nodes, tensors = build_nodes(math_layer, params, x_name, y_name, name_for, self.opset,
                                     preferred_names=list(layer.node.input))
        if len(nodes) > 1 and not plan.between and self._value_infos is not None:
            # The MatMul's new output has the shape of the chain's end (Add of a [C] bias keeps it):
            # later passes need it to fold that bias Add onward.
            infos = self._value_infos.get(scope)
            if infos is not None and y_name in infos:
                infos[nodes[0].output[0]] = infos[y_name]
        replaced[position] = nodes[0]
        if plan.pre_between:
            first = _copy(plan.pre_between[0])
            first.input[0] = plan.pre[0].data_input
            replaced[index.producer[plan.pre_between[0].output[0]]] = first
        if plan.between:
            self._hand_over_chain_output(index, plan, nodes, tensors, replaced)
        elif len(nodes) > 1:  # MatMul + Add: the Add takes the place of the chain's last node
            replaced[index.producer[plan.post[-1].output]] = nodes[1]
        for name, values in tensors.items():
            if name in index.initializers:
                self._assign(index.initializers[name], values)
            else:
                self._add_initializer(graph, index, name, values)
        maybe_dead.update(i for i in layer.node.input[1:] if i and i not in tensors)
        for op in plan.pre + plan.post:
            maybe_dead.update(op.node.input[1:] if op.node.op_type == "BatchNormalization" else op.node.input)
            op_position = index.producer[op.output]
            if op_position not in replaced:
                removed.add(op_position)
        self.created_biases.update((scope, node.output[0]) for node in nodes[1:])
        into = [layer.node.name or layer.output]
        became = nodes[0].op_type if nodes[0].op_type != layer.kind else ""
        if plan.between and plan.between[0].op_type in JOIN_OPS:
            self._record_joined(plan, into[0], scope)
        else:
            self.outcome.folded.extend(_record(op, into, "backward", scope, became) for op in plan.post)
        if provenance is not None:
            provenance.written = [n for n in nodes[0].input[1:]] + [n for n in nodes[1:2] for n in n.input[1:]]
            provenance.output = y_name
            self.provenance[(scope, y_name)] = provenance
            self.written_by.update((name, (scope, y_name)) for name in provenance.written)
            self.origins[(scope, y_name)] = _Origin(replace(math_layer, node=_copy(math_layer.node)), pre, post)

    def _record_joined(self, plan: LayerPlan, layer_name: str, scope: str) -> None:
        """One record per op of a chain folded into several joined layers, listing all of them."""
        for op in plan.post:
            record = self.joined_records.get((scope, op.output))
            if record is None:
                record = self.joined_records[(scope, op.output)] = _record(op, [], "backward", scope)
                self.outcome.folded.append(record)
            record.into.append(layer_name)

    @staticmethod
    def _hand_over_chain_output(index: GraphIndex, plan: LayerPlan, nodes: list[onnx.NodeProto],
                                tensors: dict[str, np.ndarray], replaced: dict[int, onnx.NodeProto]) -> None:
        """Layer -> layout nodes -> chain: the layout nodes stay and the chain goes. The last layout
        node now produces the chain's output; a MatMul's bias Add (it has no bias input) follows the
        layout nodes instead, broadcast along the axis the channels have moved to."""
        last = plan.between[-1]
        end = plan.post[-1].output
        if len(nodes) == 1:
            renamed = _copy(last)
            renamed.output[0] = end
            replaced[index.producer[last.output[0]]] = renamed
            return
        matmul, add = nodes
        matmul.output[0] = plan.layer.output
        add.input[0], add.output[0] = last.output[0], end
        rank, axis = index.rank(last.output[0]), chain_axis(plan.post)
        bias = tensors[add.input[1]]
        # Scalar maps only: every channel has the same bias, and one value broadcasts anywhere.
        tensors[add.input[1]] = bias.reshape((-1,) + (1,) * (rank - 1 - axis)) if axis is not None else bias[:1]
        replaced[index.producer[end]] = add

    def _fold_gemm_bias(self, index: GraphIndex, plan: GemmBiasPlan, scope: str, replaced: dict[int, onnx.NodeProto],
                        removed: set[int]) -> None:
        """MatMul + Add/Sub -> Gemm reading W and the bias as they are stored: nothing is written."""
        layer = plan.layer
        # The Gemm takes the MatMul's place, or the Add's when the bias is computed in between.
        here, gone = index.producer[layer.output], index.producer[plan.output]
        if plan.at_add:
            here, gone = gone, here
        replaced[here] = gemm_node(plan)
        removed.add(gone)
        # A MatMul folded in an earlier pass is no longer refolded from its original weight: its
        # record keeps checking what that pass wrote, and the Gemm is the next fold's original.
        self.origins.pop((scope, layer.output), None)
        self.outcome.folded.append(FoldedRecord(plan.node.name or plan.output, plan.node.op_type, plan.output,
                                                [layer.node.name or layer.output], "backward", scope, "Gemm"))

    def _merge_chain(self, graph, index, merge: MergePlan, scope, replaced, removed, maybe_dead) -> None:
        chain = merge.chain
        first_bn = next(op for op in chain if op.node.op_type == "BatchNormalization")
        affine = compose(chain).expanded(max(op.affine.channels for op in chain))
        dtype = index.constant(first_bn.node.input[1]).dtype
        base = first_bn.node.name or first_bn.output
        names = [self.names.fresh(f"{base}_bnfold_{role}") for role in ("scale", "bias", "mean", "var")]
        values = [affine.scale, affine.shift, np.zeros_like(affine.scale), np.ones_like(affine.scale)]
        for name, value in zip(names, values):
            self._add_initializer(graph, index, name, fold_math.round_to_dtype(value, dtype))
        # mean 0, var 1, epsilon 0: the BN computes exactly x * scale + bias.
        merged = onnx.helper.make_node("BatchNormalization", [chain[0].data_input, *names], [chain[-1].output],
                                       name=first_bn.node.name, epsilon=0.0)
        replaced[index.producer[chain[-1].output]] = merged
        for op in chain[:-1]:
            removed.add(index.producer[op.output])
        for op in chain:
            maybe_dead.update(op.node.input[1:] if op.node.op_type == "BatchNormalization" else op.node.input)
        for op in chain:
            if op is not first_bn:
                self.outcome.folded.append(_record(op, [first_bn.node.name or chain[-1].output], "merged", scope))

    def _assign(self, tensor: onnx.TensorProto, values: np.ndarray) -> None:
        if self.store is not None:
            self.store.assign(tensor, values)
        else:
            tensor.CopyFrom(numpy_helper.from_array(values, tensor.name))

    def _add_initializer(self, graph: onnx.GraphProto, index: GraphIndex, name: str, values: np.ndarray) -> None:
        tensor = graph.initializer.add()  # built in place: appending a finished tensor would copy it
        tensor.name = name
        self._assign(tensor, values)
        if index.ir_version < 4 and index.outer is None:
            # IR < 4 requires every initializer of the main graph to be listed as an input too.
            graph.input.append(onnx.helper.make_tensor_value_info(tensor.name, tensor.data_type, tensor.dims))

    def _provenance(self, index: GraphIndex, plan: LayerPlan, scope: str, origin: _Origin | None) -> Provenance:
        constants: dict[str, np.ndarray] = {}
        for op in plan.pre + plan.post:
            for name in op.node.input:
                value = index.constant(name) if name and name != op.data_input else None
                if value is not None:
                    constants[name] = value
        spread = plan.pre_spread
        pre = [ChainSegment([_copy(op.node) for op in plan.pre], index.rank(plan.pre[0].data_input),
                            None if spread is None else (spread.inner, spread.length))] if plan.pre else []
        post_rank = index.rank(plan.between[-1].output[0]) if plan.between else plan.layer.output_rank
        post = [ChainSegment([_copy(op.node) for op in plan.post], post_rank, None, plan.post_slice,
                             plan.post_scale_only)] if plan.post else []
        earlier = self.provenance.pop((scope, plan.layer.output), None) if origin else None
        if earlier is not None:  # extend the first fold's record: same original layer, more segments
            return Provenance(scope, earlier.layer_node, earlier.layer_params, pre + earlier.pre, earlier.post + post,
                              {**earlier.constants, **constants}, [], "")
        layer = plan.layer
        # The arrays the plan read (read-only views of the stored values): reading them again
        # would hold a second copy of every folded weight until verification.
        params = {layer.node.input[1]: layer.weight}
        if layer.bias is not None:
            params[layer.node.input[2]] = layer.bias
        return Provenance(scope, _copy(layer.node), params, pre, post, constants, [], "")

@dataclass
class _Origin:
    """A folded layer's original parameters and the maps folded into it so far."""

    layer: Layer  # with a copy of the original node: the graph's node is overwritten
    pre: ChannelAffine | None
    post: ChannelAffine | None


def _then(first: ChannelAffine | None, second: ChannelAffine | None) -> ChannelAffine | None:
    if first is None or second is None:
        return first or second
    return first.then(second)


def _drop_vanished_value_info(graph: onnx.GraphProto, index: GraphIndex, replaced: dict[int, onnx.NodeProto],
                              removed: set[int]) -> None:
    """value_info describing values this pass removed (the layer's old output, a forward-folded
    BN's output) would describe values that no longer exist: drop those entries."""
    if not len(graph.value_info):
        return
    vanished = {name for position in removed | replaced.keys() for name in index.nodes[position].output}
    vanished.difference_update(name for position, node in replaced.items() if position not in removed
                               for name in node.output)
    if vanished:
        _delete_positions(graph.value_info, [i for i, value in enumerate(graph.value_info) if value.name in vanished])


def _may_cascade(layers: list[LayerPlan], merges: list[MergePlan], index: GraphIndex) -> bool:
    """Can this pass's edits open folds the pass could not see? Forward folds (a chain's producer
    gains the layers as consumers), merges, MatMuls (which may become Gemms), and backward folds
    whose chain ends in a layout node (Conv -> BN -> Transpose -> Mul: the Mul is reachable only
    once the BN is gone) can. Any other backward fold into Conv/ConvTranspose/Gemm leaves every
    neighbour's situation as it was, so the common case needs no second full pass."""
    if merges or any(plan.pre or plan.layer.kind == "MatMul" for plan in layers):
        return True
    for plan in layers:
        follower = data_consumer(index, plan.post[-1].output) if plan.post else None
        if follower is not None and follower.op_type in PASSTHROUGH_OPS:
            return True
    return False


def _delete_positions(container, positions: Iterable[int]) -> None:
    """Delete these positions of a repeated protobuf field, a contiguous run per call: each delete
    shifts the tail, so runs (a BN's four parameters sit side by side) save most of that work."""
    ordered = sorted(positions, reverse=True)
    run_end = 0
    for index, position in enumerate(ordered):
        if index == 0 or position != ordered[index - 1] - 1:
            run_end = position + 1
        if index + 1 == len(ordered) or ordered[index + 1] != position - 1:
            del container[position:run_end]


def _needs_index(graph: onnx.GraphProto, merge_branches: bool) -> bool:
    """After the last pass, does the scope still need an index: a BN or Mul/Add/Sub/Div left to
    explain, subgraphs (to fold, with this scope as their outer one, and to clean up after), or sums
    of branches to merge?"""
    explained = _EXPLAINED_OPS | {"Sum"} if merge_branches else _EXPLAINED_OPS
    return any(node.op_type in explained or has_subgraphs(node) for node in graph.node)


_EXPLAINED_OPS = ARITHMETIC_OPS | {"BatchNormalization"}


def _copy(node: onnx.NodeProto) -> onnx.NodeProto:
    copy = onnx.NodeProto()
    copy.CopyFrom(node)
    return copy


def _record(op: AffineOp, into: list[str], direction: str, scope: str, became: str = "") -> FoldedRecord:
    return FoldedRecord(op.node.name or op.output, op.node.op_type, op.output, into, direction, scope, became)


def _vanished_values(index: GraphIndex, plan: LayerPlan, replaced: dict[int, onnx.NodeProto]) -> dict[str, str]:
    """The values a layer fold removes, each with the value of the folded graph that has its shape
    and dtype and is produced no later: a forward chain's input; behind the layer, the output of
    the node now at the layer's place (or at the last layout node's, which may have taken over the
    chain's output name)."""
    aliases = {op.output: plan.pre[0].data_input for op in plan.pre}
    if plan.post:
        last = plan.between[-1] if plan.between else plan.layer.node
        anchor = replaced.get(index.producer[last.output[0]], last).output[0]
        aliases.update((op.output, anchor) for op in plan.post[:-1])
        if anchor != last.output[0]:
            aliases[last.output[0]] = anchor
    return aliases


def _delete_initializers(graph: onnx.GraphProto, dead_names: set[str]) -> None:
    if dead_names:
        _delete_positions(graph.initializer, [i for i, t in enumerate(graph.initializer) if t.name in dead_names])
        # IR < 4 lists every initializer as a graph input too: drop the listing with the value.
        _delete_positions(graph.input, [i for i, v in enumerate(graph.input) if v.name in dead_names])


def _dead_values(index: GraphIndex, replaced: dict[int, onnx.NodeProto], removed: set[int],
                 candidates: set[str], any_default_op: bool = False) -> set[str]:
    """Initializer names nobody will read after this pass; constant-producing nodes (with
    `any_default_op`, any default-domain node without subgraphs: a BN's running-statistics inputs
    are computed by ReduceMean & co.) that become unread are added to `removed`. Counts come from
    the index plus this pass's edits: O(edits)."""
    delta: dict[str, int] = {}  # a plain dict: Counter's update/subtract are several times slower

    def count(names: Iterable[str], step: int) -> None:
        for name in names:
            if name:
                delta[name] = delta.get(name, 0) + step

    for position in removed:
        count(index.nodes[position].input, -1)
    for position, node in replaced.items():
        if position not in removed:
            count(index.nodes[position].input, -1)
        count(node.input, 1)

    def readers(name: str) -> int:
        return index.consumer_count(name) + delta.get(name, 0)

    dead: set[str] = set()
    pending = [name for name in candidates if readers(name) <= 0]
    while pending:
        name = pending.pop()
        if name in dead:
            continue
        dead.add(name)
        position = index.producer.get(name)
        if position is None or position in removed or position in replaced:
            continue
        node = index.nodes[position]
        if any_default_op:
            if node.domain not in ("", "ai.onnx") or has_subgraphs(node):
                continue
        elif node.op_type != "Constant" and node.op_type not in CONSTANT_FOLDABLE_OPS:
            continue
        if any(readers(output) > 0 for output in node.output if output and output not in dead):
            continue
        removed.add(position)
        for input_name in node.input:
            if input_name:
                count((input_name,), -1)
                if readers(input_name) <= 0:
                    pending.append(input_name)
    return {name for name in dead if name in index.initializers and name not in index.overridable}
