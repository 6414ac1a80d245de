"""Loading with one-line errors, and atomic saving with (fresh) external data.

Every failure to read a model becomes a `BadInputError` naming the path: a pipeline gets exit code 2
and one line, never a protobuf traceback.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import onnx
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import DecodeError, Message

from bnfold import file_access, interrupts
from bnfold.errors import BadInputError, first_line
from bnfold.protos import copy_message
from bnfold.serialize import DataFile, estimated_size, raw_size, write_model
from bnfold.tensors import TensorStore

LFS_POINTER_PREFIX = b"version https://git-lfs.github.com/spec/"
PROTOBUF_LIMIT = 2**31 - 1
# Weights above this (leaving room for the graph itself) cannot be serialised in one protobuf.
EXTERNAL_ABOVE_BYTES = PROTOBUF_LIMIT - 2**26
# Tensors at least this large go to the data file when a model is saved with external data.
EXTERNAL_THRESHOLD_BYTES = 1024
EXTERNAL_ALIGNMENT = 4096


@dataclass
class LoadedModel:
    model: onnx.ModelProto
    path: Path
    external_files: set[Path]  # data files the input reads (never written by bnfold)
    store: TensorStore  # reads them, and holds folded tensors until they are written


def load_model(path: str | os.PathLike) -> LoadedModel:
    """Read an ONNX model and its external data; BadInputError for anything unusable."""
    path = Path(path)
    file_access.check_model_file(path)  # before opening: a FIFO would block, a device never end
    try:
        with open(path, "rb") as handle:
            head = handle.read(len(LFS_POINTER_PREFIX))
    except OSError as error:
        raise BadInputError(f"{path}: cannot read ({error.strerror})") from None
    if not head:
        raise BadInputError(f"{path}: empty file")
    if head.startswith(LFS_POINTER_PREFIX):
        raise BadInputError(f"{path}: is a Git LFS pointer, not the model (run `git lfs pull`)")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except (DecodeError, RuntimeWarning, ValueError, UnicodeDecodeError) as error:
        raise BadInputError(f"{path}: not an ONNX model ({first_line(error) or 'protobuf parse failed'})") from None
    except OSError as error:
        raise BadInputError(f"{path}: cannot read ({error})") from None
    if not model.HasField("graph") or model.ir_version == 0:
        raise BadInputError(f"{path}: not an ONNX model (no graph or IR version)")
    check_supported(model, str(path))
    external: set[Path] = set()
    store = TensorStore(path.parent)

    def confine(tensors: list[onnx.TensorProto]) -> None:
        external.update(file_access.check_external_data(tensors, path, store.checked_files))
        # Tensors outside the main graph's initializers (Constant nodes, function bodies, sparse
        # tensors, subgraphs) are read now, from the checked files: the checker, shape inference and
        # onnxruntime would otherwise resolve their locations against the current directory.
        store.materialize(model, nested_only=True)

    check_structure(model, str(path), confine)
    # The main graph's external weights stay in their files: read when a rule needs them, and
    # streamed from there when the result is written (bnfold.tensors).
    return LoadedModel(model, path, external, store)


def check_supported(model: onnx.ModelProto, label: str) -> None:
    """Reject IR/opset versions the installed onnx does not know."""
    if model.ir_version > onnx.IR_VERSION:
        raise BadInputError(f"{label}: IR version {model.ir_version} is newer than this onnx supports "
                            f"({onnx.IR_VERSION}); upgrade onnx")
    newest = onnx.defs.onnx_opset_version()
    for opset in model.opset_import:
        if opset.domain in ("", "ai.onnx") and opset.version > newest:
            raise BadInputError(f"{label}: opset {opset.version} is newer than this onnx supports ({newest})")


def check_structure(model: onnx.ModelProto, label: str,
                    check_tensors: Callable[[list[onnx.TensorProto]], None] | None = None) -> list[onnx.TensorProto]:
    """onnx.checker on the model's skeleton: every node, attribute, name and small tensor is checked,
    while big weights are replaced by empty stand-ins — the checker would otherwise serialise a
    full copy of them (seconds and gigabytes on large models) to learn nothing about the graph.
    Returns every tensor of the model (initializers, attribute tensors and the parts of sparse
    tensors, of all scopes), which the name check walks past anyway, after `check_tensors` has
    seen them."""
    from bnfold.conformance import list_initializers_as_inputs, unlisted_initializers
    from bnfold.shapes import weight_free

    tensors, bad_string = _scan_model(model)
    if bad_string is not None:
        raise BadInputError(f"{label}: invalid model: a string is not valid UTF-8 ({bad_string})")
    if check_tensors is not None:  # the external-data rules first: they say more than the checker
        check_tensors(tensors)
    for tensor in model.graph.initializer:  # the skeleton keeps only the types of big tensors
        if tensor.data_type not in _KNOWN_TYPES:
            raise BadInputError(f"{label}: invalid model: initializer '{tensor.name}' has unknown "
                                f"data type {tensor.data_type}")
    checked = weight_free(model, empty_stubs=True)
    unlisted = unlisted_initializers(checked)
    if unlisted:
        # Accepted as onnxruntime accepts it (bnfold.conformance): the rest of the model is checked
        # as the repaired output will be, with the listings added, on a copy.
        checked = copy_message(checked) if checked is model else checked
        list_initializers_as_inputs(checked, unlisted_initializers(checked))
    try:
        onnx.checker.check_model(checked)
    except (onnx.checker.ValidationError, ValueError) as error:
        raise BadInputError(f"{label}: invalid model: {first_line(error)}") from None
    return tensors


def _scan_model(model: onnx.ModelProto) -> tuple[list[onnx.TensorProto], str | None]:
    """One walk over every message of the model: the tensors met (initializers, sparse tensors'
    parts, attribute tensors — of the main graph, its subgraphs, training-info graphs and the
    model-local functions) and the first string field that is not valid UTF-8, if any.

    Protobuf parses such a string without complaint and hands it out as bytes, which bnfold's code
    would then compare, copy or print as if it were text (a name that never matches, a copy that
    raises): the model is refused instead, naming the field. Nodes and tensors, the bulk of a
    model, are walked by hand; every other message through its descriptor.

    The one walk that does not go through `bnfold.walk`: the string check must visit every message,
    not only scopes and tensors, so the tensors come with it at no extra cost (a second walk with
    `iter_tensors` would add to every load). tests/test_walk.py checks both find the same tensors."""
    tensors: list[onnx.TensorProto] = []
    pending: list[Message] = [model]
    while pending:
        message = pending.pop()
        if isinstance(message, onnx.NodeProto):
            bad = _scan_node(message, pending)
        elif isinstance(message, onnx.TensorProto):
            tensors.append(message)
            bad = _first_bad_string((message.name, message.doc_string), "tensor")
            if message.external_data or message.metadata_props:
                pending.extend((*message.external_data, *message.metadata_props))
        else:
            bad = _scan_fields(message, pending)
        if bad is not None:
            return tensors, bad
    return tensors, None


def _scan_fields(message: Message, pending: list[Message]) -> str | None:
    for field, value in message.ListFields():
        if field.type == FieldDescriptor.TYPE_STRING:
            bad = _first_bad_string(value if field.is_repeated else (value,), field.full_name)
            if bad is not None:
                return bad
        elif field.type == FieldDescriptor.TYPE_MESSAGE:
            if field.is_repeated:
                pending.extend(value)
            else:
                pending.append(value)
    return None


def _scan_node(node: onnx.NodeProto, pending: list[Message]) -> str | None:
    bad = _first_bad_string((node.name, node.op_type, node.domain, node.overload, node.doc_string, *node.input,
                             *node.output), "node")
    for attr in node.attribute:
        bad = bad or _first_bad_string((attr.name, attr.ref_attr_name, attr.doc_string), "attribute")
        field = _MESSAGE_FIELD_OF_KIND.get(attr.type)  # the checker refuses a field other than `type`'s
        if field is not None:
            value = getattr(attr, field)
            if isinstance(value, Message):
                pending.append(value)
            else:
                pending.extend(value)
    if node.metadata_props:
        pending.extend(node.metadata_props)
    return bad


_KIND = onnx.AttributeProto
_MESSAGE_FIELD_OF_KIND = {
    _KIND.TENSOR: "t", _KIND.TENSORS: "tensors", _KIND.SPARSE_TENSOR: "sparse_tensor",
    _KIND.SPARSE_TENSORS: "sparse_tensors", _KIND.GRAPH: "g", _KIND.GRAPHS: "graphs", _KIND.TYPE_PROTO: "tp",
    _KIND.TYPE_PROTOS: "type_protos",
}


def _first_bad_string(texts: Sequence[str | bytes], owner: str) -> str | None:
    """The first of `texts` protobuf handed out as bytes (not valid UTF-8), described for a message."""
    try:
        "".join(texts)  # type: ignore[arg-type]  # one C-level pass; raises only if some text is bytes
        return None
    except TypeError:
        text = next(text for text in texts if not isinstance(text, str))
        return f"{owner} {text[:40]!r}"


_KNOWN_TYPES = frozenset(v for v in onnx.TensorProto.DataType.values() if v != onnx.TensorProto.UNDEFINED)




def save_model_atomic(
    model: onnx.ModelProto, path: str | os.PathLike, external_data: bool = False,
    protected: set[Path] | None = None, store: TensorStore | None = None,
    accept: Callable[[Path | None], bool] | None = None, *,
    input_model: Path | None = None, in_place: bool = False,
) -> Path | None:
    """Write `model` to `path` so that a crash or a signal leaves either the old file or the
    complete new one, and no temporary file.

    Neither `path` nor its data file may be a file the input reads (`input_model`, or one of its
    `protected` data files) — `path` may be `input_model` only `in_place`, and then the file
    behind a symlink is replaced (see bnfold.file_access).
    With `external_data` (forced above the 2 GB protobuf limit) tensors go to a *fresh* file
    `<name>.data` beside it (never appended to, never a file the input reads).
    Tensor data is streamed (from `store` for deferred tensors), never copied in memory whole.
    `accept` is asked before the new file replaces anything, with the complete temporary file (or
    None when the model has external data: its temporary file names a data file not in place
    yet); if it says no, nothing is written and None is returned.
    """
    inputs = set(protected or ()) | ({input_model} if input_model is not None else set())
    named = Path(path)
    path = file_access.output_target(named, input_model, protected or (), in_place)
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise BadInputError(f"{path}: output folder {folder} does not exist")
    external_data = external_data or _total_bytes(model, store) > EXTERNAL_ABOVE_BYTES
    data_path = file_access.fresh_data_path(path, inputs) if external_data else None
    temp_files: list[str] = []
    try:
        with _write_errors(path):
            temp_model = _temp_file(folder, path.name, temp_files)
            with open(temp_model, "wb") as handle:
                if data_path is None:
                    write_model(model, handle, store)
                else:
                    temp_data = _temp_file(folder, data_path.name, temp_files)
                    with open(temp_data, "wb") as data_handle:
                        write_model(model, handle, store, DataFile(data_handle, data_path.name,
                                                                    EXTERNAL_THRESHOLD_BYTES, EXTERNAL_ALIGNMENT))
                        data_handle.flush()
                        os.fsync(data_handle.fileno())
                handle.flush()
                os.fsync(handle.fileno())
        # Outside the write-error translation: an error of verification is not the output's fault.
        if accept is not None and not accept(Path(temp_model) if data_path is None else None):
            return None
        # A signal here would leave a new data file beside the old model: both renames, or neither.
        with _write_errors(path), interrupts.deferred():
            if data_path is not None:
                os.replace(temp_files[1], data_path)
            os.replace(temp_model, path)
            _fsync_dir(folder)
    finally:
        for name in temp_files:
            if os.path.exists(name):
                os.unlink(name)
    return named


@contextlib.contextmanager
def _write_errors(path: Path) -> Iterator[None]:
    """Failures while writing `path` (disk full, permissions, a tensor whose data does not match
    its dims) as one-line bad-output errors."""
    try:
        yield
    except OSError as error:
        raise BadInputError(f"{path}: cannot write ({error.strerror or error})") from None
    except ValueError as error:
        raise BadInputError(f"{path}: cannot write: {error}") from None


def _temp_file(folder: Path, name: str, temp_files: list[str]) -> str:
    """A hidden temporary file in `folder` with the permissions a plain new file would get."""
    with interrupts.deferred():  # a signal between creating and recording it would leave it behind
        fd, temp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=folder)
        temp_files.append(temp)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(temp, 0o666 & ~umask)  # mkstemp makes 0600; an output file should look like any other
    return temp


def _total_bytes(model: onnx.ModelProto, store: TensorStore | None) -> int:
    if store is None:
        return estimated_size(model)
    return sum(store.byte_length(t) if store.is_deferred(t) else raw_size(t) for t in model.graph.initializer)


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
