"""The one place that decides which files bnfold may read and which it may write.

Read: a model is a regular file (a device or FIFO would be read forever, or block); its external
data lives in regular files inside the model's folder — after normalisation *and* symlink
resolution, as onnx.load and onnxruntime require — at offsets and lengths that lie within them.
Every entry is checked before any byte of any tensor is read, so a model cannot make bnfold copy
`/etc/shadow` or `../secret` into its output. An in-memory model has no folder, so it may not
refer to external data at all.

Write: an output (the model file or its data file) is never a file the input reads, by path or
by identity (symlinks and hard links reach the same inode); the input model itself only with an
explicit in-place request, and then its content is replaced where it really lives (a symlink
stays a symlink).
"""

from __future__ import annotations

import os
import re
import stat
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import onnx

from bnfold.errors import BadInputError
from bnfold.protos import data_bytes

# The keys the ONNX spec defines for an external-data entry; anything else is refused rather than
# guessed at (a typo such as "lenght" would otherwise silently mean "to the end of the file").
EXTERNAL_DATA_KEYS = frozenset({"location", "offset", "length", "checksum"})
_DECIMAL = re.compile(r"[0-9]+")


def check_model_file(path: Path, what: str = "models") -> None:
    """Refuse, before opening, anything but an existing regular file (following symlinks)."""
    try:
        status = os.stat(path)
    except FileNotFoundError:
        raise BadInputError(f"{path}: no such file") from None
    except OSError as error:
        raise BadInputError(f"{path}: cannot read ({error.strerror or error})") from None
    if stat.S_ISDIR(status.st_mode):
        raise BadInputError(f"{path}: is a directory, not an ONNX file" if what == "models" else
                            f"{path}: is a directory; {what} must be a file")
    if not stat.S_ISREG(status.st_mode):
        raise BadInputError(f"{path}: is a {_kind(status.st_mode)}, not a regular file; only files are {what}")


@dataclass(frozen=True)
class CheckedFile:
    """A data file as the check saw it: its resolved path and its identity (device, inode)."""

    path: str
    device: int
    inode: int

    def open(self) -> int:
        """A read descriptor of this very file, or a BadInputError if the path now leads elsewhere:
        a symlink swapped in (O_NOFOLLOW; every other component was resolved by the check), a FIFO
        (O_NONBLOCK keeps the open from blocking), any other inode. Opened per read, so a model with
        thousands of data files never holds thousands of descriptors."""
        flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
        try:
            fd = os.open(self.path, flags)
        except OSError as error:
            raise BadInputError(f"external data file {self.path} cannot be opened ({error.strerror or error})") from None
        now = os.fstat(fd)
        if (now.st_dev, now.st_ino) != (self.device, self.inode) or not stat.S_ISREG(now.st_mode):
            os.close(fd)
            raise BadInputError(f"external data file {self.path} changed since it was checked")
        return fd


def check_external_data(tensors: Iterable[onnx.TensorProto], model_path: Path,
                        checked: dict[str, CheckedFile] | None = None) -> set[Path]:
    """The (resolved) data files the model's external tensors read, after checking every entry;
    a `BadInputError` naming the model, the tensor and the reason for the first bad one.

    With `checked`, each data file's identity is recorded by location: bnfold reads only that very
    file (`CheckedFile.open`), so one swapped after the check (for a symlink leading out, say) is
    never what bnfold reads."""
    folder = os.path.realpath(model_path.parent if str(model_path.parent) else ".")
    sizes: dict[str, tuple[Path, int]] = {}  # location -> (resolved file, size): one stat per file
    for tensor in tensors:
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        entries = _entries(tensor, model_path)
        location = entries.get("location", "")
        if location not in sizes:
            sizes[location] = _data_file(location, folder, tensor, model_path, checked)
        data_file, size = sizes[location]
        offset = _count(entries, "offset", tensor, model_path)
        length = _count(entries, "length", tensor, model_path)
        expected = data_bytes(tensor)
        # Without a length the tensor is its own size from `offset` (as onnxruntime reads it), never
        # the rest of the file.
        end = offset + (length if length is not None else expected or 0)
        if end > size:
            raise BadInputError(f"{model_path}: tensor '{tensor.name}': external data at offset {offset} + "
                                f"{end - offset} bytes lies beyond the end of '{location}' ({size} bytes)")
        if expected is None:
            raise BadInputError(f"{model_path}: tensor '{tensor.name}': external data for element type "
                                f"{tensor.data_type}, which has no fixed-size encoding")
        if length is not None and length != expected:
            raise BadInputError(f"{model_path}: tensor '{tensor.name}': external data length {length} does not "
                                f"match its dims and type ({expected} bytes)")
    return {data_file for data_file, _ in sizes.values()}


def refuse_external_data(tensors: Iterable[onnx.TensorProto], label: str) -> None:
    """An in-memory model has no folder its external data could be confined to: refuse it."""
    for tensor in tensors:
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            location = {e.key: e.value for e in tensor.external_data}.get("location", "")
            raise BadInputError(f"{label}: tensor '{tensor.name}' keeps its data in external file '{location}', "
                                "but an in-memory model has no folder to read it from; pass the model's path")


def _entries(tensor: onnx.TensorProto, model_path: Path) -> dict[str, str]:
    entries: dict[str, str] = {}
    for entry in tensor.external_data:
        if entry.key not in EXTERNAL_DATA_KEYS:
            raise BadInputError(f"{model_path}: tensor '{tensor.name}': unknown external-data key '{entry.key}'")
        if entry.key in entries:
            raise BadInputError(f"{model_path}: tensor '{tensor.name}': external-data key '{entry.key}' repeated")
        entries[entry.key] = entry.value
    return entries


def _data_file(location: str, folder: str, tensor: onnx.TensorProto, model_path: Path,
               checked: dict[str, CheckedFile] | None) -> tuple[Path, int]:
    """The resolved data file for `location` and its size, if it is a regular file inside `folder`
    (recorded in `checked`, when given)."""
    def refuse(reason: str) -> BadInputError:
        return BadInputError(f"{model_path}: tensor '{tensor.name}': external data location '{location}' {reason}")

    if not location:
        raise refuse("is empty")
    parts = re.split(r"[/\\]", location)
    if "\0" in location or os.path.isabs(location) or location.startswith("\\") or re.match(r"[A-Za-z]:", location):
        raise refuse("is absolute: it must be relative to the model's folder")
    if ".." in parts:
        raise refuse("leaves the model's folder ('..')")
    resolved = os.path.realpath(os.path.join(folder, location))
    if os.path.commonpath([resolved, folder]) != folder or resolved == folder:
        raise refuse("resolves (through a symlink) outside the model's folder")
    try:
        status = os.stat(resolved)
    except FileNotFoundError:
        raise BadInputError(f"{model_path}: tensor '{tensor.name}': external data file missing: "
                            f"{os.path.join(folder, location)}") from None
    except OSError as error:
        raise refuse(f"cannot be read ({error.strerror or error})") from None
    if not stat.S_ISREG(status.st_mode):
        raise refuse(f"is a {_kind(status.st_mode)}, not a regular file")
    if checked is not None:
        checked[location] = CheckedFile(resolved, status.st_dev, status.st_ino)
    return Path(resolved), status.st_size


def _count(entries: dict[str, str], key: str, tensor: onnx.TensorProto, model_path: Path) -> int | None:
    """`offset`/`length` as a non-negative integer (None when absent)."""
    value = entries.get(key)
    if value is None:
        return 0 if key == "offset" else None
    if not _DECIMAL.fullmatch(value):
        raise BadInputError(f"{model_path}: tensor '{tensor.name}': external-data {key} '{value}' is not a "
                            "non-negative decimal integer")
    return int(value)


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISCHR, "character device"), (stat.S_ISBLK, "block device"),
                       (stat.S_ISFIFO, "FIFO (named pipe)"), (stat.S_ISSOCK, "socket"), (stat.S_ISDIR, "directory")):
        if test(mode):
            return name
    return "special file"


# --- writing -------------------------------------------------------------------------------------

def same_file(a: Path, b: Path) -> bool:
    """Do `a` and `b` name one file — by resolved path, or by identity (hard links)?"""
    if os.path.realpath(a) == os.path.realpath(b):
        return True
    try:
        return os.path.samestat(os.stat(a), os.stat(b))
    except OSError:
        return False


def is_input_file(path: Path, input_files: Iterable[Path]) -> bool:
    return any(same_file(path, read) for read in input_files)


def output_target(path: Path, input_model: Path | None, input_data: Iterable[Path], in_place: bool = False) -> Path:
    """The file to replace for output `path`, refusing any file the input reads. In place, the
    input model's real file (through a symlink): the link stays and its target gets the content."""
    if os.path.isdir(path):
        raise BadInputError(f"{path}: is a folder: give a file name")
    check_regular_or_absent(path)
    for data_file in input_data:
        if same_file(path, data_file):
            raise BadInputError(f"{path}: is the input's external data file {data_file}; it must not be overwritten")
    if input_model is not None and same_file(path, input_model):
        if not in_place:
            raise BadInputError(f"{path}: output equals the input; pass --in-place (in_place=True) to overwrite it")
        return Path(os.path.realpath(path))
    if in_place:
        raise BadInputError(f"{path}: in-place output must be the input model {input_model}")
    return path


def check_regular_or_absent(path: Path, flag: str = "") -> None:
    """An output replaces a regular file or nothing: a FIFO, a device (`-o /dev/null` as root) or a
    socket would be replaced by a regular file, so it is refused (also behind a symlink)."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return  # absent (or a dangling link): nothing is replaced that anyone reads
    if not stat.S_ISREG(mode) and not stat.S_ISDIR(mode):
        raise BadInputError(f"{flag + ' ' if flag else ''}{path}: is a {_kind(mode)}; bnfold writes only regular files")


def check_side_output(path: Path, flag: str, input_files: Iterable[Path], outputs: Iterable[Path] = ()) -> None:
    """A file written beside the model (--save-inputs, --save-outputs, --report-md) is never a file
    the input reads, nor a model output of the same run, nor anything but a regular file."""
    check_regular_or_absent(path, flag)
    for protected in [*input_files, *outputs]:
        if same_file(path, protected):
            raise BadInputError(f"{flag} {path}: is {protected}, which this run reads or writes")


def fresh_data_path(output: Path, input_files: Iterable[Path]) -> Path:
    """`<name>.data` beside the output, or `<name>.folded[N].data` when that name is a file the
    input reads (which must never be written) or a file that is not the current output's own data
    (another model's weights that happen to carry the name)."""
    inputs = list(input_files)
    owned = data_files_of(output)
    for suffix in ("", ".folded", *(f".folded{n}" for n in range(2, len(inputs) + _SPARE_DATA_NAMES))):
        candidate = output.with_name(f"{output.name}{suffix}.data")
        if is_input_file(candidate, inputs):
            continue
        if not os.path.lexists(candidate) or any(same_file(candidate, mine) for mine in owned):
            return candidate
    raise BadInputError(f"{output}: no free name for its external data file beside it")


_SPARE_DATA_NAMES = 100  # other models' files a folder may hold under the candidate names


def data_files_of(model: Path) -> list[Path]:
    """The data files an existing model file at `model` reads (its graph's external initializers),
    or none: replacing the model may replace them, and nothing else."""
    try:
        if not stat.S_ISREG(os.stat(model).st_mode):
            return []
        graph = onnx.load(str(model), load_external_data=False).graph
    except Exception:  # noqa: BLE001 - not a readable model: it owns no data file
        return []
    folder = model.parent
    locations = {entry.value for tensor in graph.initializer if tensor.data_location == onnx.TensorProto.EXTERNAL
                 for entry in tensor.external_data if entry.key == "location"}
    return [folder / location for location in locations]
