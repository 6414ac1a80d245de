"""Plain readers of ONNX messages: a node's attribute value, the types and shapes a graph declares,
and how many bytes a tensor's data takes.

Kept apart from `bnfold.graph` because `bnfold.constants`, which `GraphIndex` itself consults,
needs them too; this module imports nothing from bnfold, so both can depend on it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TypeVar

import onnx
from google.protobuf.message import Message

MessageT = TypeVar("MessageT", bound=Message)


def copy_message(message: MessageT) -> MessageT:
    """A deep copy of a protobuf message (nodes, models, ...)."""
    copy = type(message)()
    copy.CopyFrom(message)
    return copy


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
            kind = attr.type  # the common kinds read directly: this runs several times per node
            if kind == _INT:
                return attr.i
            if kind == _INTS:
                return list(attr.ints)
            if kind == _FLOAT:
                return attr.f
            return onnx.helper.get_attribute_value(attr)
    return default


_INT, _INTS, _FLOAT = onnx.AttributeProto.INT, onnx.AttributeProto.INTS, onnx.AttributeProto.FLOAT


_T = onnx.TensorProto
# Bits per element of every type whose data may be stored externally (all but STRING).
_BITS = {
    _T.FLOAT: 32, _T.UINT8: 8, _T.INT8: 8, _T.UINT16: 16, _T.INT16: 16, _T.INT32: 32, _T.INT64: 64, _T.BOOL: 8,
    _T.FLOAT16: 16, _T.DOUBLE: 64, _T.UINT32: 32, _T.UINT64: 64, _T.COMPLEX64: 64, _T.COMPLEX128: 128,
    _T.BFLOAT16: 16,
}
_BITS.update({getattr(_T, name): bits for name, bits in (
    ("FLOAT8E4M3FN", 8), ("FLOAT8E4M3FNUZ", 8), ("FLOAT8E5M2", 8), ("FLOAT8E5M2FNUZ", 8), ("FLOAT8E8M0", 8),
    ("UINT4", 4), ("INT4", 4), ("FLOAT4E2M1", 4), ("UINT2", 2), ("INT2", 2)) if hasattr(_T, name)})


def data_bytes(tensor: onnx.TensorProto) -> int | None:
    """The bytes a tensor's data takes in raw (and external) form, from its dims and type: packed
    sub-byte types round up to whole bytes. None for a type without a fixed-size encoding."""
    bits = _BITS.get(tensor.data_type)
    if bits is None:
        return None
    elements = 1
    for dim in tensor.dims:
        elements *= dim
    return (elements * bits + 7) // 8
