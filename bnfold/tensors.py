"""Where tensor data lives while a model is folded: in the protobuf, in the input's external data
file, or in memory as a freshly folded numpy array.

Why not just write new weights into the ModelProto: the upb protobuf runtime allocates from arenas
that free nothing until the whole model is freed, so overwriting a 275 MB weight keeps the old bytes
alive (a folded 2.2 GB model peaked at 7.6 GB that way). Instead a folded tensor keeps its name, type
and dims in the graph and points, through an external-data entry with a marker location, at an
array held here; the writer streams it from here, and `materialize` puts it into the proto only when
a caller asks for the in-memory model. External-data inputs are read lazily from their files, so
only the tensors being folded are ever in memory.
"""

from __future__ import annotations

import math
import mmap
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

import numpy as np
import onnx
from onnx import numpy_helper

from bnfold.errors import BadInputError
from bnfold.file_access import CheckedFile
from bnfold.protos import data_bytes
from bnfold.walk import iter_tensors

PENDING_LOCATION = "bnfold:pending"
_DATA_FIELDS = ("raw_data", "float_data", "int32_data", "string_data", "int64_data", "double_data",
                "uint64_data", "external_data")
CHUNK_BYTES = 64 * 1024 * 1024
# Folded tensors smaller than this are written into the proto at once.
DEFER_BYTES = 256 * 1024


def external_info(tensor: onnx.TensorProto) -> dict[str, str]:
    return {entry.key: entry.value for entry in tensor.external_data}


# Types whose raw_data is plain little-endian values of a numpy dtype (the common case).
_RAW_DTYPES = {
    onnx.TensorProto.FLOAT: np.dtype(np.float32), onnx.TensorProto.DOUBLE: np.dtype(np.float64),
    onnx.TensorProto.FLOAT16: np.dtype(np.float16), onnx.TensorProto.INT64: np.dtype(np.int64),
    onnx.TensorProto.INT32: np.dtype(np.int32), onnx.TensorProto.INT8: np.dtype(np.int8),
    onnx.TensorProto.UINT8: np.dtype(np.uint8),
} if sys.byteorder == "little" else {}


def tensor_values(tensor: onnx.TensorProto) -> np.ndarray:
    """A tensor's values (read-only). Plain raw data is viewed directly, which is several times
    faster than numpy_helper.to_array on graphs with tens of thousands of tensors."""
    dtype = _RAW_DTYPES.get(tensor.data_type)
    try:
        if dtype is not None and tensor.data_location != onnx.TensorProto.EXTERNAL:
            raw = tensor.raw_data  # b"" when the values are in a typed field instead
            shape = tuple(tensor.dims)
            if raw and len(raw) == math.prod(shape) * dtype.itemsize:
                return np.frombuffer(raw, dtype=dtype).reshape(shape)
        return numpy_helper.to_array(tensor)
    except (ValueError, KeyError, TypeError) as error:
        # A tensor whose bytes do not match its dims or type: the file is damaged, not our input.
        raise BadInputError(f"tensor '{tensor.name}' cannot be read ({type(error).__name__}: {error})") from None


class PendingTensors:
    """Arrays folding produced, held in memory until written. A tensor refers to one through an
    external-data entry: location `PENDING_LOCATION`, offset the array's key. Only this class reads
    or writes that convention."""

    def __init__(self) -> None:
        self._arrays: dict[str, np.ndarray] = {}

    def attach(self, tensor: onnx.TensorProto, values: np.ndarray) -> None:
        """Make `values` the data of `tensor` (whose data fields are already cleared)."""
        key = str(len(self._arrays))
        self._arrays[key] = values
        tensor.data_location = onnx.TensorProto.EXTERNAL
        for entry_key, value in (("location", PENDING_LOCATION), ("offset", key)):
            entry = tensor.external_data.add()
            entry.key, entry.value = entry_key, value

    def of(self, info: dict[str, str]) -> np.ndarray | None:
        """The array an external-data entry (`external_info` of a tensor) refers to; None when
        it refers to a file."""
        return self._arrays[info["offset"]] if info.get("location") == PENDING_LOCATION else None

    def clear(self) -> None:
        self._arrays.clear()


class TensorStore:
    """Reads any tensor of one model; holds the arrays folding produced until they are written."""

    def __init__(self, base_dir: Path | None = None) -> None:
        self.base_dir = base_dir
        self._pending = PendingTensors()
        # The data files as `file_access.check_external_data` checked them, by location: a read
        # opens that very file or fails, never whatever the name leads to later.
        self.checked_files: dict[str, CheckedFile] = {}

    # --- reading -----------------------------------------------------------------------------

    def is_deferred(self, tensor: onnx.TensorProto) -> bool:
        """Is the tensor's data somewhere other than the proto (pending here, or in a file)?"""
        return tensor.data_location == onnx.TensorProto.EXTERNAL

    def read(self, tensor: onnx.TensorProto) -> np.ndarray:
        """The tensor's values, from wherever they live."""
        if tensor.data_location != onnx.TensorProto.EXTERNAL:  # (is_deferred, inlined: a hot path)
            return tensor_values(tensor)
        info = external_info(tensor)
        pending = self._pending.of(info)
        if pending is not None:
            return pending
        dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)
        path, offset, length = self._file(tensor), int(info.get("offset", 0)), self.byte_length(tensor)
        shape = tuple(tensor.dims)
        if length != math.prod(shape) * dtype.itemsize:
            raise BadInputError(f"tensor '{tensor.name}': {length} bytes of external data for dims {list(shape)}")
        try:
            # Mapped, not read: the pages are the page cache's, and leave with the array.
            with self._open(tensor) as handle:
                return np.memmap(handle, dtype=dtype, mode="r", offset=offset, shape=shape)
        except (OSError, ValueError) as error:
            raise BadInputError(f"tensor '{tensor.name}': cannot read external data {path} ({error})") from None

    def byte_length(self, tensor: onnx.TensorProto) -> int:
        info = external_info(tensor)
        pending = self._pending.of(info)
        if pending is not None:
            return pending.nbytes
        if "length" in info:
            return int(info["length"])
        return data_bytes(tensor) or 0  # the loader checked the entry against dims and type

    def chunks(self, tensor: onnx.TensorProto) -> Iterator[bytes | memoryview]:
        """The raw little-endian bytes of a deferred tensor, in pieces (files are never read whole)."""
        info = external_info(tensor)
        pending = self._pending.of(info)
        if pending is not None:
            values = np.ascontiguousarray(pending)
            yield memoryview(values.reshape(-1).view(np.uint8))  # bytes as stored: little-endian
            return
        path, offset, length = self._file(tensor), int(info.get("offset", 0)), self.byte_length(tensor)
        try:
            with self._open(tensor) as handle, mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
                if offset + length > len(mapped):
                    raise BadInputError(f"tensor '{tensor.name}': external data in {path} is truncated")
                for start in range(offset, offset + length, CHUNK_BYTES):
                    yield mapped[start:min(start + CHUNK_BYTES, offset + length)]
        except (OSError, ValueError) as error:
            raise BadInputError(f"tensor '{tensor.name}': cannot read external data {path} ({error})") from None

    def _open(self, tensor: onnx.TensorProto) -> BinaryIO:
        """The tensor's data file: the very file the check saw, else (not loaded from a path) by name."""
        checked = self.checked_files.get(external_info(tensor).get("location", ""))
        if checked is not None:
            try:
                return os.fdopen(checked.open(), "rb")
            except BadInputError as error:
                raise BadInputError(f"tensor '{tensor.name}': {error}") from None
        return open(self._file(tensor), "rb")

    def _file(self, tensor: onnx.TensorProto) -> Path:
        location = external_info(tensor).get("location", "")
        if self.base_dir is None:
            raise BadInputError(f"tensor '{tensor.name}' refers to external data '{location}' but the model "
                                "was not loaded from a path")
        return self.base_dir / location

    # --- writing -----------------------------------------------------------------------------

    def assign(self, tensor: onnx.TensorProto, values: np.ndarray, new: bool = False) -> None:
        """Give `tensor` new values (and the type and dims of `values`). Large ones are kept here
        until written; small ones go straight into the proto (their arena cost is negligible and
        the model stays plain, which keeps writing 10,000 small tensors fast). `new`: the tensor
        holds nothing yet but its name (no data fields to clear)."""
        if not new:
            for name in _DATA_FIELDS:
                tensor.ClearField(name)
        del tensor.dims[:]
        tensor.dims.extend(values.shape)
        tensor.data_type = onnx.helper.np_dtype_to_tensor_dtype(values.dtype)
        if values.nbytes < DEFER_BYTES:
            tensor.ClearField("data_location")
            tensor.raw_data = values.tobytes()  # C order, native (little-endian) bytes
            return
        self._pending.attach(tensor, values)

    def materialize(self, model: onnx.ModelProto, nested_only: bool = False, keep_pending: bool = False) -> None:
        """Put deferred tensors' data into the proto (the plain, self-contained form); with
        `nested_only`, all but the main graph's initializers (which the writer streams itself)."""
        for tensor in iter_tensors(model, main_initializers=not nested_only):
            if self.is_deferred(tensor):
                raw = b"".join(bytes(chunk) for chunk in self.chunks(tensor))
                for name in _DATA_FIELDS:
                    tensor.ClearField(name)
                tensor.ClearField("data_location")
                tensor.raw_data = raw
        if not nested_only and not keep_pending:
            self._pending.clear()

    def has_deferred(self, model: onnx.ModelProto) -> bool:
        return any(self.is_deferred(t) for t in iter_tensors(model))
