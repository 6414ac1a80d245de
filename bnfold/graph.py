"""A read-only index of one ONNX graph scope: producers, consumers, constants, shapes.

Built once per rewrite pass in O(nodes + initializers); every lookup afterwards is a dict access, so
no rule ever scans the graph (that is what makes other tools quadratic on 10,000-node models).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np
import onnx

from bnfold import constants as computed
from bnfold.protos import ValueInfo, value_infos_of
from bnfold.tensors import tensor_values
from bnfold.walk import has_subgraphs, iter_scopes, subgraphs_of

if TYPE_CHECKING:  # pragma: no cover
    from bnfold.tensors import TensorStore

# Ops whose output is constant when all their inputs are; evaluated with onnx's reference evaluator.
CONSTANT_FOLDABLE_OPS = frozenset(
    {"Identity", "Cast", "Reshape", "Unsqueeze", "Squeeze", "ConstantOfShape", "Flatten", "Expand",
     "Concat", "Transpose", "Shape", "Gather", "Slice", "Neg", "Sqrt", "Reciprocal", "Mul", "Add",
     "Sub", "Div", "CastLike", "Size"}
)
# Constant subgraphs larger than this are left to the runtime: folding through them is not worth
# evaluating an arbitrary program at fold time.
MAX_CONSTANT_SUBGRAPH_NODES = 16
# A constant subgraph may not make a tensor larger than this (ConstantOfShape([5e8]) in a 1 kB model
# would otherwise take gigabytes at fold time); real computed biases and scales are per channel.
MAX_CONSTANT_ELEMENTS = 1 << 24
# op type -> position of the input whose *values* are the shape of the tensor the op creates
_SHAPE_FROM_VALUES = {"ConstantOfShape": 0, "Expand": 1}


def _declared_inputs(graph: onnx.GraphProto) -> dict[str, ValueInfo]:
    """`value_infos_of` restricted to the graph's inputs and initializers."""
    known = {value.name for value in graph.input} | {tensor.name for tensor in graph.initializer}
    return {name: info for name, info in value_infos_of(graph).items() if name in known}


def names_used_inside(graph: onnx.GraphProto) -> set[str]:
    """Every value name referenced by a node of `graph` or of its nested subgraphs.

    Used to count outer-scope values captured by a subgraph as consumed: folding the producer of
    such a value would silently change what the subgraph sees.
    """
    used: set[str] = set()
    for _, body in iter_scopes(graph):
        for node in body.node:
            used.update(node.input)
        used.update(output.name for output in body.output)
    return used


def function_graph(function: onnx.FunctionProto) -> onnx.GraphProto:
    """A function body as a graph: its nodes (copies), its formal inputs as graph inputs and its
    outputs as graph outputs (untyped: a function's types are those of each call)."""
    return onnx.helper.make_graph(
        function.node, function.name,
        [onnx.ValueInfoProto(name=name) for name in function.input],
        [onnx.ValueInfoProto(name=name) for name in function.output],
    )


class GraphIndex:
    """Read-only lookups over one graph scope (and, for constants, its enclosing scopes)."""

    def __init__(
        self,
        graph: onnx.GraphProto,
        ir_version: int,
        opset: int,
        value_infos: dict[str, ValueInfo] | Callable[[], dict[str, ValueInfo]] | None = None,
        outer: GraphIndex | None = None,
        is_main_graph: bool = True,
        store: TensorStore | None = None,
        input_kind: str = "graph input",
        static_infos: Callable[[], dict[str, ValueInfo]] | None = None,
        trained: frozenset[str] = frozenset(),
    ) -> None:
        self.graph = graph
        self.input_kind = input_kind  # what the graph's inputs are, for refusal messages
        self.store = store
        self.ir_version = ir_version
        self.opset = opset
        self.outer = outer
        self.nodes = list(graph.node)
        self.producer: dict[str, int] = {}
        self.consumers: dict[str, list[int]] = defaultdict(list)
        producer, consumers = self.producer, self.consumers  # locals: this loop sees every node
        for index, node in enumerate(self.nodes):
            for output in node.output:
                if output:
                    producer[output] = index
            for name in node.input:
                if name:
                    consumers[name].append(index)
            if has_subgraphs(node):
                for body in subgraphs_of(node):
                    for name in names_used_inside(body):
                        if index not in consumers[name]:
                            consumers[name].append(index)
        self.graph_outputs = {output.name for output in graph.output}
        self.initializers = {tensor.name: tensor for tensor in graph.initializer}
        graph_inputs = {value.name for value in graph.input}
        # IR >= 4: an initializer that is also a graph input is a default the caller may override.
        # IR < 4 listed every initializer as an input, so there it means nothing. Subgraph inputs are
        # formal parameters bound by the enclosing op, never initializers the user feeds.
        overridable = is_main_graph and ir_version >= 4
        self.overridable = graph_inputs & self.initializers.keys() if overridable else set()
        self.graph_inputs = graph_inputs - (self.initializers.keys() - self.overridable)
        # Names the model's training_info reads or binds: a training step changes those initializers
        # (so they are no constants, and stay) and reads those values (so they keep their names).
        self.trained = trained
        self.overridable |= trained & self.initializers.keys()
        self.graph_outputs |= trained - self.initializers.keys()
        # Shape inference is only needed by some rules (MatMul ranks, Mul/Add broadcasting), so it
        # may be passed as a callable and is then run on first use only.
        # Without inferred shapes, only what the graph declares for its inputs and constants counts:
        # value_info on intermediate values is a claim, not evidence (see `bnfold.shapes`).
        self._value_infos = value_infos if value_infos is not None else (lambda: _declared_inputs(graph))
        self._constants: dict[str, np.ndarray | None] = {}
        # Main graph only: types and shapes that no value_info can fake (see `bnfold.constants`),
        # inferred the first time a constant depends on one.
        self._static_infos = static_infos

    @classmethod
    def of_constants(cls, nodes: list[onnx.NodeProto], constants: dict[str, np.ndarray], opset: int) -> GraphIndex:
        """An index over `nodes` alone whose constants are the given arrays (used as they are: no
        tensor protos are built, which for large weights would mean copying them twice)."""
        index = cls(onnx.helper.make_graph(nodes, "constants", [], []), onnx.IR_VERSION, opset)
        index._constants.update(constants)
        return index

    # --- structure ---------------------------------------------------------------------------

    def producer_of(self, name: str) -> onnx.NodeProto | None:
        index = self.producer.get(name)
        return None if index is None else self.nodes[index]

    def consumer_count(self, name: str) -> int:
        return len(self.consumers.get(name, ())) + (1 if name in self.graph_outputs else 0)

    def running_outputs_read(self, node: onnx.NodeProto) -> list[str]:
        """The running mean/var outputs of a training-mode BN that something reads."""
        return [name for name in node.output[1:] if name and self.consumer_count(name)]

    def sole_consumer(self, name: str) -> onnx.NodeProto | None:
        """The only node reading `name`, if exactly one does and it is not a graph output."""
        readers = self.consumers.get(name, ())
        if len(readers) != 1 or name in self.graph_outputs:
            return None
        return self.nodes[readers[0]]

    def consumer_nodes(self, name: str) -> list[onnx.NodeProto]:
        return [self.nodes[i] for i in self.consumers.get(name, ())]

    @property
    def value_infos(self) -> dict[str, ValueInfo]:
        if callable(self._value_infos):
            self._value_infos = self._value_infos()
        return self._value_infos

    def info(self, name: str) -> ValueInfo | None:
        info = self.value_infos.get(name)
        if info is None and self.outer is not None and name not in self.producer:
            return self.outer.info(name)
        return info

    def rank(self, name: str) -> int | None:
        info = self.info(name)
        return None if info is None else info.rank

    def elem_type(self, name: str) -> int | None:
        info = self.info(name)
        if info is None or not info.elem_type:
            return None
        return info.elem_type

    def static_info(self, name: str) -> ValueInfo | None:
        """Type and shape of `name` as fixed by the declared graph inputs and the constants alone."""
        if name in self.overridable:
            return None
        if name in self.producer or name in self.graph_inputs or name in self.initializers:
            if callable(self._static_infos):
                self._static_infos = self._static_infos()
            return None if self._static_infos is None else self._static_infos.get(name)
        return None if self.outer is None else self.outer.static_info(name)

    # --- constants -----------------------------------------------------------------------------

    def read(self, tensor: onnx.TensorProto) -> np.ndarray:
        """A tensor's values: through the store when data may live outside the proto."""
        return self.store.read(tensor) if self.store is not None else tensor_values(tensor)

    def is_initializer(self, name: str) -> bool:
        if name in self.initializers:
            return name not in self.overridable
        if name in self.producer or name in self.graph_inputs:
            return False
        return self.outer is not None and self.outer.is_initializer(name)

    def constant(self, name: str) -> np.ndarray | None:
        """The value of `name` if it is fixed at fold time, else None. Cached per index."""
        if not name:
            return None
        if name in self.initializers:
            # Not cached: holding every weight here would keep a second copy of the model alive.
            return None if name in self.overridable else self.read(self.initializers[name])
        if name not in self._constants:
            self._constants[name] = self._evaluate_constant(name, MAX_CONSTANT_SUBGRAPH_NODES)
        return self._constants[name]

    def why_not_constant(self, name: str, depth: int = 4) -> str:
        """Where a non-constant value comes from, for a refusal message."""
        if name in self.trained:
            return "is an initializer the model's training_info updates"
        if name in self.overridable:
            return "is an initializer that is also a graph input (callers may override it)"
        if name in self.graph_inputs:
            return f"is a {self.input_kind}"
        node = self.producer_of(name)
        if node is None:
            return "is not a constant" if self.outer is None else self.outer.why_not_constant(name, depth)
        label = f"{node.op_type} '{node.name or name}'"
        if node.op_type == "DequantizeLinear":
            return f"is dequantized at run time by {label} (quantized weights stay quantized)"
        if node.op_type in CONSTANT_FOLDABLE_OPS and node.domain in ("", "ai.onnx") and depth > 0:
            for position, input_name in enumerate(node.input):
                if not input_name or self.constant(input_name) is not None:
                    continue
                kind = computed.metadata_read(node, position)
                info = None if kind is None else self.static_info(input_name)
                if kind is not None and computed.placeholder(info, node, position) is not None:
                    continue
                if kind is not None:
                    known = "" if info is None or info.shape is None else f" {list(info.shape)}"
                    return (f"is computed by {label} from the {kind} of '{input_name}'{known}, "
                            "which the declared graph inputs and constants do not fix")
                return f"is computed by {label} from '{input_name}', which {self.why_not_constant(input_name, depth - 1)}"
        return f"is computed by {label}, not a constant bnfold evaluates"

    def _evaluate_constant(self, name: str, budget: int) -> np.ndarray | None:
        if name in self.initializers:
            if name in self.overridable:
                return None
            return self.read(self.initializers[name])
        node = self.producer_of(name)
        if node is None:
            if name in self.graph_inputs or self.outer is None:
                return None
            return self.outer.constant(name)
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
            return _constant_node_value(node)
        if budget <= 0 or node.domain not in ("", "ai.onnx"):
            return None
        if computed.is_training_bn(node):
            return self._training_bn_output(node, name, budget)
        if node.op_type not in CONSTANT_FOLDABLE_OPS:
            return None
        inputs = []
        for position, input_name in enumerate(node.input):
            value = self._constant_input(node, position, input_name, budget - 1) if input_name else None
            if input_name and value is None:
                return None
            inputs.append(value)
        if _too_large(node, inputs):
            return None
        return _evaluate_node(node, inputs, self.opset, name)

    def _constant_input(self, node: onnx.NodeProto, position: int, name: str, budget: int) -> np.ndarray | None:
        """An input's value; for an input the node reads only the type or dims of, a stand-in with
        that fixed type or shape (see `bnfold.constants`)."""
        value = self._constants.get(name)
        if value is None:
            value = self._evaluate_constant(name, budget)
        if value is not None or computed.metadata_read(node, position) is None:
            return value
        return computed.placeholder(self.static_info(name), node, position)

    def _training_bn_output(self, node: onnx.NodeProto, name: str, budget: int) -> np.ndarray | None:
        """Y of a training-mode BN whose X, scale and B are constants and whose running mean/var
        outputs nobody reads (its mean/var inputs only feed those)."""
        if name != node.output[0] or len(node.input) < 3 or self.running_outputs_read(node):
            return None
        inputs = [self._constant_input(node, position, node.input[position], budget - 1) for position in range(3)]
        if any(value is None for value in inputs):
            return None
        return computed.training_bn_output(node, *inputs)


def _too_large(node: onnx.NodeProto, inputs: list[np.ndarray | None]) -> bool:
    """Would the op create a tensor above MAX_CONSTANT_ELEMENTS from a requested shape?"""
    position = _SHAPE_FROM_VALUES.get(node.op_type)
    if position is None or position >= len(inputs) or inputs[position] is None:
        return False
    dims = [int(d) for d in np.asarray(inputs[position]).reshape(-1)]
    if node.op_type == "Expand" and inputs[0] is not None:  # broadcast with the input's own shape
        data = list(np.shape(inputs[0]))
        width = max(len(dims), len(data))
        dims = [max(a, b) for a, b in zip([1] * (width - len(dims)) + dims, [1] * (width - len(data)) + data)]
    return any(d < 0 for d in dims) or float(np.prod([float(d) for d in dims])) > MAX_CONSTANT_ELEMENTS


def _constant_node_value(node: onnx.NodeProto) -> np.ndarray | None:
    attr = node.attribute[0] if len(node.attribute) == 1 else None
    if attr is None:
        return None
    if attr.name == "value":
        return tensor_values(attr.t)
    if attr.name in ("value_float", "value_int"):
        dtype = np.float32 if attr.name == "value_float" else np.int64
        return np.array(onnx.helper.get_attribute_value(attr), dtype=dtype)
    if attr.name in ("value_floats", "value_ints"):
        dtype = np.float32 if attr.name == "value_floats" else np.int64
        return np.array(onnx.helper.get_attribute_value(attr), dtype=dtype)
    return None  # sparse_value / strings: not a dense numeric constant


def _evaluate_node(
    node: onnx.NodeProto, inputs: list[np.ndarray | None], opset: int, output_name: str
) -> np.ndarray | None:
    """Run one op on constant inputs with onnx's reference evaluator (no op re-implemented here)."""
    from onnx.reference import ReferenceEvaluator

    feeds = {name: value for name, value in zip(node.input, inputs) if name}
    graph = onnx.helper.make_graph(
        [node],
        "constant",
        [onnx.helper.make_tensor_value_info(n, onnx.helper.np_dtype_to_tensor_dtype(v.dtype), v.shape)
         for n, v in feeds.items()],
        [onnx.helper.make_empty_tensor_value_info(o) for o in node.output if o],
    )
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", opset)])
    try:
        results = ReferenceEvaluator(model).run(None, feeds)
    except Exception:  # noqa: BLE001 - an op the evaluator cannot run is simply not a constant
        return None
    outputs = [o for o in node.output if o]
    return np.asarray(results[outputs.index(output_name)])
