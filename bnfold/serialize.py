"""Stream a ModelProto to a file without building its serialised copy in memory.

`SerializeToString` on a 300 MB model allocates a 300 MB bytes object and, in the upb Python
runtime, spends about 1.1 s doing it — half of a plain load + save. Protobuf fields may appear in any
order on the wire, so the model can instead be written as its small parts (model without graph,
graph without initializers, each tensor without raw_data) followed by each weight's bytes as its own
length-delimited field. Parsers read the result exactly as if it had been serialised in one piece.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, BinaryIO

import onnx
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

from bnfold.protos import data_bytes

if TYPE_CHECKING:  # pragma: no cover
    from bnfold.tensors import TensorStore

# Field numbers from onnx.proto.
MODEL_GRAPH_FIELD = 7
GRAPH_INITIALIZER_FIELD = 5
TENSOR_RAW_DATA_FIELD = 9
LENGTH_DELIMITED = 2
# Tensors smaller than this are serialised with their graph the ordinary way.
STREAM_THRESHOLD_BYTES = 64 * 1024
# Models below this size are serialised in one call (the copy is cheap, per-tensor work is not).
SMALL_MODEL_BYTES = 32 * 1024 * 1024


def copy_without(message: Message, *skipped: str) -> Message:
    """A copy of `message` with every field but the `skipped` ones (which are never copied)."""
    shell = type(message)()
    for field, value in message.ListFields():
        if field.name in skipped:
            continue
        if field.is_repeated:
            getattr(shell, field.name).extend(value)
        elif field.type == FieldDescriptor.TYPE_MESSAGE:
            getattr(shell, field.name).CopyFrom(value)
        else:
            setattr(shell, field.name, value)
    return shell


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _key(field_number: int) -> bytes:
    return _varint(field_number << 3 | LENGTH_DELIMITED)


def raw_size(tensor: onnx.TensorProto) -> int:
    """The byte size of a tensor's data from its dims and type, without touching the data (0 for a
    type without a fixed-size encoding). (upb's `ByteSize()` serialises the message to measure it:
    seconds on a large model.)"""
    return data_bytes(tensor) or 0


def estimated_size(model: onnx.ModelProto) -> int:
    """Roughly the serialised size: the weights' bytes (what decides the 2 GB protobuf limit)."""
    return sum(raw_size(t) for t in model.graph.initializer)


@dataclass
class DataFile:
    """Where tensors go when a model is saved with external data."""

    handle: BinaryIO
    location: str  # the file name recorded in the model, relative to it
    threshold: int = 1024  # smaller tensors stay in the model
    alignment: int = 4096

    def append(self, chunks: Iterable[bytes | memoryview]) -> tuple[int, int]:
        """Write a tensor's bytes at the next aligned offset; (offset, length)."""
        offset = (self.handle.tell() + self.alignment - 1) // self.alignment * self.alignment
        self.handle.seek(offset)
        length = 0
        for chunk in chunks:
            length += self.handle.write(chunk)
        return offset, length


def _data_source(tensor: onnx.TensorProto, store: TensorStore | None, threshold: int):
    """(length, chunk iterator factory) for a tensor to be streamed, None to serialise it inline."""
    if store is not None and store.is_deferred(tensor):
        return store.byte_length(tensor), lambda: store.chunks(tensor)
    length = raw_size(tensor)
    if length < threshold or not tensor.HasField("raw_data"):
        return None

    def raw_chunks() -> Iterator[bytes]:
        raw = tensor.raw_data
        if len(raw) != length:
            raise ValueError(f"tensor '{tensor.name}' holds {len(raw)} bytes, its dims need {length}")
        yield raw

    return length, raw_chunks


def _tensor_head(tensor: onnx.TensorProto, external: tuple[str, int, int] | None = None) -> bytes:
    """The tensor's fields without its data (and, for a data file, pointing at `external`)."""
    head = copy_without(tensor, "raw_data", "external_data", "data_location")
    if external is not None:
        head.data_location = onnx.TensorProto.EXTERNAL
        for key, value in zip(("location", "offset", "length"), external):
            entry = head.external_data.add()
            entry.key, entry.value = key, str(value)
    return head.SerializeToString()


def write_model(model: onnx.ModelProto, handle: BinaryIO, store: TensorStore | None = None,
                data: DataFile | None = None) -> None:
    """Write `model` to `handle` in protobuf wire format, one weight at a time, keeping field order.

    Deferred tensors (folded arrays, the input's external data) are streamed from `store`; with
    `data`, tensors above its threshold go to that file and the model records where.
    """
    graph = model.graph
    if store is not None:
        store.materialize(model, nested_only=True)  # only top-level initializers are streamed
    deferred = store is not None and store.has_deferred(model)
    if data is None and not deferred and estimated_size(model) < SMALL_MODEL_BYTES:
        handle.write(model.SerializeToString())  # small: the one-call path is fastest
        return
    head = copy_without(model, "graph").SerializeToString()
    graph_bytes = copy_without(graph, "initializer").SerializeToString()
    # Each entry: serialised small initializers (a GraphProto holding only them is exactly their
    # wire bytes), or a big tensor's prefix followed by its streamed bytes.
    entries: list[tuple[bytes, Callable[[], Iterable[bytes | memoryview]] | None, int]] = []
    graph_length = len(graph_bytes)
    small_run = onnx.GraphProto()  # consecutive small initializers, serialised in one call

    def flush_small_run() -> None:
        nonlocal graph_length, small_run
        if len(small_run.initializer):
            entries.append((small_run.SerializeToString(), None, 0))
            graph_length += len(entries[-1][0])
            small_run = onnx.GraphProto()

    threshold = data.threshold if data is not None else STREAM_THRESHOLD_BYTES
    for tensor in graph.initializer:
        source = _data_source(tensor, store, threshold)
        if source is None:
            small_run.initializer.append(tensor)
            continue
        flush_small_run()
        length, chunks = source
        if data is not None:
            offset, written = data.append(chunks())
            body = _tensor_head(tensor, (data.location, offset, written))
            entries.append((_key(GRAPH_INITIALIZER_FIELD) + _varint(len(body)) + body, None, 0))
            graph_length += len(entries[-1][0])
            continue
        tensor_head = _tensor_head(tensor)
        tensor_length = len(tensor_head) + 1 + len(_varint(length)) + length
        prefix = _key(GRAPH_INITIALIZER_FIELD) + _varint(tensor_length) + tensor_head + \
            _key(TENSOR_RAW_DATA_FIELD) + _varint(length)
        entries.append((prefix, chunks, length))
        graph_length += len(prefix) + length
    flush_small_run()
    handle.write(head)
    handle.write(_key(MODEL_GRAPH_FIELD) + _varint(graph_length))
    handle.write(graph_bytes)
    for prefix, chunks, length in entries:
        handle.write(prefix)
        if chunks is not None:
            written = sum(handle.write(chunk) for chunk in chunks())
            if written != length:
                raise ValueError(f"a tensor wrote {written} bytes where {length} were announced")
