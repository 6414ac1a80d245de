"""The edits of one rewrite pass over one graph scope, collected and then committed together.

Fold functions say what changes (a node replaced or removed, a tensor written, values that may
have lost their last reader, values that vanish and the value their shape-only readers read
instead); `PassEdits.commit` applies all of it in one splice, then removes what nobody reads any
more: initializers, Constant nodes, and value_info of values that no longer exist. Edits are
keyed by node position in the index the pass was planned on, so a pass is O(nodes + edits).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol

import numpy as np
import onnx
from onnx import numpy_helper

from bnfold.graph import CONSTANT_FOLDABLE_OPS, GraphIndex
from bnfold.rules.readers import rewired_readers
from bnfold.tensors import TensorStore
from bnfold.walk import has_subgraphs


class RepeatedField(Protocol):
    def __len__(self) -> int: ...
    def __delitem__(self, key: slice) -> None: ...


class PassEdits:
    """One pass's edits of `graph`, planned on `index` (built on `graph` before the pass)."""

    def __init__(self, graph: onnx.GraphProto, index: GraphIndex, scope: str, store: TensorStore | None) -> None:
        self.graph, self.index, self.scope, self.store = graph, index, scope, store
        self.replaced: dict[int, onnx.NodeProto] = {}  # node position -> its replacement
        self.removed: set[int] = set()
        self.possibly_unread: set[str] = set()  # inputs of removed/replaced nodes: dead unless read elsewhere
        # Values the pass removes -> a value with the same shape and dtype, for shape-only readers.
        self.aliases: dict[str, str] = {}

    # --- nodes ----------------------------------------------------------------------------------

    def replace(self, position: int, node: onnx.NodeProto) -> None:
        self.replaced[position] = node

    def replace_producer(self, value: str, node: onnx.NodeProto) -> None:
        """Replace the node producing `value`."""
        self.replaced[self.index.producer[value]] = node

    def remove_producer(self, value: str) -> None:
        """Remove the node producing `value`, unless this pass already put another node there."""
        position = self.index.producer[value]
        if position not in self.replaced:
            self.removed.add(position)

    def current(self, value: str) -> onnx.NodeProto:
        """The node producing `value` as this pass leaves it (its replacement, if any)."""
        position = self.index.producer[value]
        return self.replaced.get(position, self.index.nodes[position])

    def mark_possibly_unread(self, names: Iterable[str]) -> None:
        self.possibly_unread.update(names)

    def alias(self, removed_value: str, same_shape_value: str) -> None:
        """`removed_value` goes away; its shape-only readers read `same_shape_value` instead."""
        self.aliases[removed_value] = same_shape_value

    # --- tensors --------------------------------------------------------------------------------

    def write_tensor(self, name: str, values: np.ndarray) -> None:
        """Give this scope's initializer `name` new values, creating it if it does not exist."""
        tensor = self.index.initializers.get(name)
        if tensor is None:
            self.add_initializer(name, values)
        else:
            self._assign(tensor, values)

    def add_initializer(self, name: str, values: np.ndarray) -> None:
        tensor = self.graph.initializer.add()  # built in place: appending a finished tensor would copy it
        tensor.name = name
        self._assign(tensor, values, new=True)
        if self.index.ir_version < 4 and self.index.outer is None:
            # IR < 4 requires every initializer of the main graph to be listed as an input too.
            self.graph.input.append(onnx.helper.make_tensor_value_info(tensor.name, tensor.data_type, tensor.dims))

    def _assign(self, tensor: onnx.TensorProto, values: np.ndarray, new: bool = False) -> None:
        if self.store is not None:
            self.store.assign(tensor, values, new)
        else:
            tensor.CopyFrom(numpy_helper.from_array(values, tensor.name))

    # --- commit ---------------------------------------------------------------------------------

    def commit(self, any_default_op: bool = False) -> set[str]:
        """Write the edits into the graph; the names of the initializers it removed as unread.
        `any_default_op`: see `dead_values`."""
        if self.aliases:
            self.replaced.update(rewired_readers(self.index, self.aliases, self.replaced))
        if any_default_op:
            dead = dead_values(self.index, self.replaced, self.removed, self.possibly_unread, any_default_op=True)
        else:
            dead = dead_values(self.index, self.replaced, self.removed, self.possibly_unread)
        self._drop_vanished_value_info()
        for position, node in self.replaced.items():
            self.graph.node[position].CopyFrom(node)
        delete_positions(self.graph.node, self.removed)
        if dead:
            graph = self.graph
            delete_positions(graph.initializer, [i for i, t in enumerate(graph.initializer) if t.name in dead])
            # IR < 4 lists every initializer as a graph input too: drop the listing with the value.
            delete_positions(graph.input, [i for i, v in enumerate(graph.input) if v.name in dead])
        return dead

    def outer_values_unread(self) -> set[str]:
        """Values of an enclosing scope this pass stopped reading (that scope cleans them up)."""
        index = self.index
        return {name for name in self.possibly_unread if name not in index.initializers and name not in index.producer}

    def _drop_vanished_value_info(self) -> None:
        """value_info describing values this pass removed (the layer's old output, a forward-folded
        BN's output) would describe values that no longer exist: drop those entries."""
        value_info = self.graph.value_info
        if not len(value_info):
            return
        nodes = self.index.nodes
        vanished = {name for position in self.removed | self.replaced.keys() for name in nodes[position].output}
        vanished.difference_update(name for position, node in self.replaced.items() if position not in self.removed
                                   for name in node.output)
        if vanished:
            delete_positions(value_info, [i for i, value in enumerate(value_info) if value.name in vanished])


def delete_positions(container: RepeatedField, positions: Iterable[int]) -> None:
    """Delete these positions of a repeated protobuf field, a contiguous run per call: each delete
    shifts the tail, so runs (a BN's four parameters sit side by side) save most of that work."""
    ordered = sorted(positions, reverse=True)
    run_end = 0
    for index, position in enumerate(ordered):
        if index == 0 or position != ordered[index - 1] - 1:
            run_end = position + 1
        if index + 1 == len(ordered) or ordered[index + 1] != position - 1:
            del container[position:run_end]


def dead_values(index: GraphIndex, replaced: dict[int, onnx.NodeProto], removed: set[int],
                candidates: set[str], any_default_op: bool = False) -> set[str]:
    """Initializer names nobody will read after this pass; constant-producing nodes (with
    `any_default_op`, any default-domain node without subgraphs: a BN's running-statistics inputs
    are computed by ReduceMean & co.) that become unread are added to `removed`. Counts come from
    the index plus this pass's edits: O(edits)."""
    delta = _reader_count_changes(index, replaced, removed)

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
        if not _removable_producer(node, any_default_op):
            continue
        if any(readers(output) > 0 for output in node.output if output and output not in dead):
            continue
        removed.add(position)
        for input_name in node.input:
            if input_name:
                delta[input_name] = delta.get(input_name, 0) - 1
                if readers(input_name) <= 0:
                    pending.append(input_name)
    return {name for name in dead if name in index.initializers and name not in index.overridable}


def _reader_count_changes(index: GraphIndex, replaced: dict[int, onnx.NodeProto], removed: set[int]) -> dict[str, int]:
    """How many readers each value gains (+) or loses (-) with these edits."""
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
    return delta


def _removable_producer(node: onnx.NodeProto, any_default_op: bool) -> bool:
    if any_default_op:
        return node.domain in ("", "ai.onnx") and not has_subgraphs(node)
    return node.op_type == "Constant" or node.op_type in CONSTANT_FOLDABLE_OPS
