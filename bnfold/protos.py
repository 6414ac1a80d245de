"""Plain readers of ONNX messages: a node's attribute value, and the types and shapes a graph declares.

Kept apart from `bnfold.graph` because `bnfold.constants`, which `GraphIndex` itself consults,
needs them too; this module imports nothing from bnfold, so both can depend on it.
"""

from __future__ import annotations

from dataclasses import dataclass

import onnx


@dataclass(frozen=True)
class ValueInfo:
    """Element type and shape of a value; a dim is an int, a symbolic name, or None."""

    elem_type: int
    shape: tuple[int | str | None, ...] | None

    @property
    def rank(self) -> int | None:
        return None if self.shape is None else len(self.shape)


def value_infos_of(graph: onnx.GraphProto) -> dict[str, ValueInfo]:
    """Types and shapes declared for the values of a graph (inputs, outputs, value_info)."""
    infos: dict[str, ValueInfo] = {}
    for value in [*graph.input, *graph.value_info, *graph.output]:
        if not value.type.HasField("tensor_type"):
            continue
        tensor_type = value.type.tensor_type
        shape = None
        if tensor_type.HasField("shape"):
            shape = tuple(
                d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tensor_type.shape.dim
            )
        infos[value.name] = ValueInfo(tensor_type.elem_type, shape)
    for tensor in graph.initializer:
        infos[tensor.name] = ValueInfo(tensor.data_type, tuple(tensor.dims))
    return infos


def attribute(node: onnx.NodeProto, name: str, default=None):
    """A node attribute's value, or the operator spec's default."""
    for attr in node.attribute:
        if attr.name == name:
            return onnx.helper.get_attribute_value(attr)
    return default
