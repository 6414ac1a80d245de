"""Byte-level fuzzing of the loader path: corrupted sample models through the `bnfold fold` CLI.

Each mutant is a sample model with a seeded mutation: a truncation, random bit flips anywhere,
bit flips / byte overwrites / insertions / deletions in the *structural* bytes (everything that
is not an initializer's raw weight data, where most random flips would otherwise land), or a
truncation plus flips. The CLI runs in-process through click's CliRunner; the contract checked:

- the exit code is 0, 1 or 2 and no exception other than SystemExit escaped;
- exit 2 (bad input) and exit 1 (verification failed) write nothing: no output, no temp file;
- exit 2 prints a one-line `bnfold: error: ...` message and never a traceback;
- no internal crash hides behind exit 2: the CLI catches every exception (bnfold/batch.py) and
  reports it as "unexpected error: <type>: ...", so "no exception escaped" is checked as "no
  'unexpected error'" (the same inputs make `bnfold.fold(path)` raise a raw ValueError/KeyError);
- exit 0 writes an output that onnx can load and check.

A few mutants also run as real subprocesses (`python -m bnfold`), where "Traceback" must not
appear on stderr.

Mutant count: BNFOLD_FUZZ_MUTANTS (default 200). Every mutant is reproducible from its test id.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import helper

import bnfold
from benchmarks.graph_builder import GraphBuilder
from bnfold.cli import main

SAMPLES = Path(__file__).resolve().parent.parent / "sample_models"
# (file, share of the mutants): the two main targets first, then one of each other situation.
MODELS = [
    ("resnet_tiny.onnx", 5), ("mlp_bn1d.onnx", 5), ("conv_mul_add.onnx", 2), ("bn_first.onnx", 2),
    ("convtranspose_decoder.onnx", 2), ("grouped_depthwise.onnx", 2), ("fp16_cnn.onnx", 1), ("no_bn.onnx", 1),
]
N_MUTANTS = int(os.environ.get("BNFOLD_FUZZ_MUTANTS") or 200)
MUTATIONS = ["truncate", "field", "flip", "field", "flip_structure", "field", "set_structure", "field",
             "insert_delete", "truncate_flip"]


def _schedule(count: int) -> list[tuple[str, int]]:
    """(model file, seed) for each mutant, the models in proportion to their share."""
    files = [name for name, share in MODELS for _ in range(share)]
    return [(files[i % len(files)], i) for i in range(count)]


def _varint(data: bytes, pos: int) -> int:
    """The position just after the varint starting at `pos`."""
    while data[pos] & 0x80:
        pos += 1
    return pos + 1


def wire_fields(data: bytes, descriptor=onnx.ModelProto.DESCRIPTOR, start: int = 0, end: int | None = None,
                path: str = "") -> list[tuple[str, int, int, str]]:
    """(wire kind, start, end, field path) of every scalar payload of a serialized message, found by
    walking the protobuf wire format with the ONNX descriptors (nested messages are descended into)."""
    from google.protobuf.descriptor import FieldDescriptor

    found = []
    end = len(data) if end is None else end
    pos = start
    while pos < end:
        tag_end = _varint(data, pos)
        tag = sum((b & 0x7F) << (7 * i) for i, b in enumerate(data[pos:tag_end]))
        number, wire = tag >> 3, tag & 7
        field = descriptor.fields_by_number.get(number)
        name = f"{path}.{field.name if field else number}"
        pos = tag_end
        if wire == 0:
            found.append(("varint", pos, _varint(data, pos), name))
            pos = found[-1][2]
        elif wire in (1, 5):
            size = 8 if wire == 1 else 4
            found.append(("fixed", pos, pos + size, name))
            pos += size
        elif wire == 2:
            length_end = _varint(data, pos)
            length = sum((b & 0x7F) << (7 * i) for i, b in enumerate(data[pos:length_end]))
            pos = length_end
            if field is not None and field.type == FieldDescriptor.TYPE_MESSAGE:
                found += wire_fields(data, field.message_type, pos, pos + length, name)
            else:
                found.append(("bytes", pos, pos + length, name))
            pos += length
        else:
            raise ValueError(f"wire type {wire} at {pos}")
    return found


def _weight_ranges(data: bytes) -> list[tuple[int, int]]:
    """Byte ranges of the initializers' raw_data inside the serialized model."""
    model = onnx.load_from_string(data)
    ranges = []
    for tensor in model.graph.initializer:
        if len(tensor.raw_data) >= 16:
            start = data.find(tensor.raw_data)
            if start >= 0:
                ranges.append((start, start + len(tensor.raw_data)))
    return ranges


def _structural_offsets(data: bytes) -> np.ndarray:
    mask = np.ones(len(data), dtype=bool)
    for start, end in _weight_ranges(data):
        mask[start:end] = False
    return np.flatnonzero(mask)


def mutate(data: bytes, seed: int) -> tuple[bytes, str]:
    """A seeded mutant of `data` and a description of the mutation."""
    rng = np.random.default_rng(seed)
    kind = MUTATIONS[seed % len(MUTATIONS)]
    buffer = bytearray(data)
    structure = _structural_offsets(data)
    if kind == "field":
        # One scalar field changed in place: the wire format stays valid, so the mutant reaches the
        # checker and the fold (a dim, a data type, an attribute, an opset, a name, ...).
        fields = [f for f in wire_fields(data) if f[2] > f[1] and not f[3].endswith("raw_data")]
        wire, start, end, path = fields[int(rng.integers(len(fields)))]
        offset = int(rng.integers(start, end))
        bit = int(rng.integers(0, 7 if wire == "varint" else 8))  # a varint keeps its continuation bits
        buffer[offset] ^= 1 << bit
        return bytes(buffer), f"field {path} ({wire}): flip bit {bit} at {offset}"
    if kind == "truncate":
        cut = int(rng.integers(0, len(data)))
        return bytes(buffer[:cut]), f"truncate at {cut}/{len(data)}"
    if kind == "truncate_flip":
        cut = int(rng.integers(len(data) // 2, len(data)))
        buffer = buffer[:cut]
        offsets = rng.integers(0, cut, size=int(rng.integers(1, 4)))
    elif kind == "flip":
        offsets = rng.integers(0, len(data), size=int(rng.integers(1, 9)))
    elif kind == "flip_structure":
        offsets = rng.choice(structure, size=int(rng.integers(1, 4)))
    elif kind == "set_structure":
        offsets = rng.choice(structure, size=int(rng.integers(1, 3)))
        values = rng.choice([0x00, 0x01, 0x7F, 0x80, 0xFF, int(rng.integers(0, 256))], size=len(offsets))
        for offset, value in zip(offsets, values):
            buffer[int(offset)] = int(value)
        return bytes(buffer), f"set bytes {dict(zip(offsets.tolist(), values.tolist()))}"
    else:  # insert_delete
        offset = int(rng.choice(structure))
        if rng.integers(0, 2):
            inserted = rng.integers(0, 256, size=int(rng.integers(1, 5))).astype(np.uint8).tobytes()
            buffer[offset:offset] = inserted
            return bytes(buffer), f"insert {inserted.hex()} at {offset}"
        length = int(rng.integers(1, 5))
        del buffer[offset:offset + length]
        return bytes(buffer), f"delete {length} bytes at {offset}"
    bits = rng.integers(0, 8, size=len(offsets))
    for offset, bit in zip(offsets, bits):
        buffer[int(offset)] ^= 1 << int(bit)
    return bytes(buffer), f"{kind}: flip bits {list(zip(offsets.tolist(), bits.tolist()))}"


def _write_mutant(tmp_path: Path, model_file: str, seed: int) -> tuple[Path, Path, str]:
    data, description = mutate((SAMPLES / model_file).read_bytes(), seed)
    source = tmp_path / "mutant.onnx"
    source.write_bytes(data)
    return source, tmp_path / "out.onnx", f"{model_file} seed {seed}: {description}"


def _check_outcome(code: int, stderr: str, tmp_path: Path, source: Path, out: Path, what: str) -> None:
    assert code in (0, 1, 2), f"{what}: exit code {code}\n{stderr}"
    assert "Traceback" not in stderr, f"{what}: traceback on stderr\n{stderr}"
    assert "unexpected error" not in stderr, f"{what}: internal error\n{stderr}"
    leftovers = sorted(p.name for p in tmp_path.iterdir() if p not in (source, out))
    assert not leftovers, f"{what}: files left behind: {leftovers}"
    if code == 0:
        assert out.is_file(), f"{what}: exit 0 but no output"
        onnx.checker.check_model(onnx.load(str(out)))
    else:
        assert not out.exists(), f"{what}: exit {code} but {out.name} was written"
    if code == 2:
        lines = stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("bnfold: error: "), f"{what}: stderr {stderr!r}"


@pytest.mark.parametrize("model_file,seed", _schedule(N_MUTANTS), ids=lambda v: str(v))
def test_cli_survives_mutant(tmp_path: Path, model_file: str, seed: int) -> None:
    source, out, what = _write_mutant(tmp_path, model_file, seed)
    result = CliRunner().invoke(main, ["fold", str(source), "-o", str(out)])
    exception = result.exception
    assert exception is None or isinstance(exception, SystemExit), \
        f"{what}: {type(exception).__name__} escaped: {exception!r}"
    _check_outcome(result.exit_code, result.stderr, tmp_path, source, out, what)


# One mutant of each model/mutation kind pair below; the flipped resnet_tiny weights fold, verify and
# are written (exit 0), so the whole path runs in a real process at least once.
SUBPROCESS_MUTANTS = [("resnet_tiny.onnx", 2), ("mlp_bn1d.onnx", 1), ("conv_mul_add.onnx", 10),
                      ("bn_first.onnx", 6), ("convtranspose_decoder.onnx", 8)]


@pytest.mark.parametrize("model_file,seed", SUBPROCESS_MUTANTS, ids=lambda v: str(v))
def test_cli_subprocess_survives_mutant(tmp_path: Path, model_file: str, seed: int) -> None:
    source, out, what = _write_mutant(tmp_path, model_file, seed)
    process = subprocess.run([sys.executable, "-m", "bnfold", "fold", str(source), "-o", str(out)],
                             check=False, capture_output=True, text=True, timeout=300)
    _check_outcome(process.returncode, process.stderr, tmp_path, source, out, what)


CRAFTED = {
    "empty": b"",
    "one_byte": b"\x08",
    "text": b"this is not an onnx model\n",
    "lfs_pointer": b"version https://git-lfs.github.com/spec/v1\noid sha256:00\nsize 1\n",
    "random": np.random.default_rng(0).integers(0, 256, 4096).astype(np.uint8).tobytes(),
    "zeros": bytes(4096),
    "empty_model": onnx.ModelProto().SerializeToString() + b"\x08\x08",  # ir_version 8, no graph
    "tensor_proto": onnx.helper.make_tensor("t", onnx.TensorProto.FLOAT, [2], [1.0, 2.0]).SerializeToString(),
}


@pytest.mark.parametrize("name", sorted(CRAFTED))
def test_cli_rejects_crafted_input(tmp_path: Path, name: str) -> None:
    source, out = tmp_path / "input.onnx", tmp_path / "out.onnx"
    source.write_bytes(CRAFTED[name])
    result = CliRunner().invoke(main, ["fold", str(source), "-o", str(out)])
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert result.exit_code == 2, result.output
    _check_outcome(result.exit_code, result.stderr, tmp_path, source, out, name)


# --- regression tests for what the mutants found -----------------------------------------------------


def _conv_bn(batch="N") -> onnx.ModelProto:
    g = GraphBuilder(np.random.default_rng(5))
    x = g.input("x", [batch, 4, 8, 8])
    return g.model([g.bn(g.conv(x, 4, 4, kernel=3, pads=[1, 1, 1, 1]), 4)])


def _corrupt_tensor(how: str) -> onnx.ModelProto:
    """A tensor whose bytes do not match its declared dims / type: the (skeleton) checker accepts it."""
    model = _conv_bn()
    var = next(t for t in model.graph.initializer if t.name.startswith("var"))
    weight = next(t for t in model.graph.initializer if t.name.startswith("w"))
    if how == "dims_smaller_than_data":  # 4 floats of raw data, dims [2]
        var.dims[:] = [2]
    elif how == "unknown_data_type":  # data_type 33 is no TensorProto.DataType
        var.data_type = 33
    elif how == "narrower_data_type":  # FLOAT -> FLOAT16: twice as many elements as dims say
        weight.data_type = onnx.TensorProto.FLOAT16
    return model


@pytest.mark.parametrize("how", ["dims_smaller_than_data", "unknown_data_type", "narrower_data_type"])
def test_regression_tensor_data_not_matching_dims_is_bad_input(tmp_path: Path, how: str) -> None:
    """Found by `field` mutants (a flipped bit in an initializer's data_type or dims).

    Up to 78702d6 the loader accepted the model; GraphIndex.constant -> tensor_values ->
    numpy_helper.to_array then raised ValueError ("cannot reshape array of size 4 into shape (2,)") or KeyError (33).
    The CLI turned it into "unexpected error: ValueError: ..." (exit 2), the API raised it raw.
    Expected: BadInputError naming the tensor, like the "raw_data size is too small" case
    (fixed in 8d3d9e7).
    """
    source, out = tmp_path / "model.onnx", tmp_path / "out.onnx"
    onnx.save(_corrupt_tensor(how), str(source))
    with pytest.raises(bnfold.BadInputError):
        bnfold.fold(source, verify=False)
    result = CliRunner().invoke(main, ["fold", str(source), "-o", str(out)])
    _check_outcome(result.exit_code, result.stderr, tmp_path, source, out, how)
    assert result.exit_code == 2


def _unrunnable(batch) -> onnx.ModelProto:
    """A Conv whose kernel_shape attribute contradicts its 3x3 weight: the onnx checker (without
    shape inference) accepts it, onnxruntime cannot run it whatever the input shape."""
    model = _conv_bn(batch)
    conv = model.graph.node[0]
    for attr in [a for a in conv.attribute if a.name == "kernel_shape"]:
        conv.attribute.remove(attr)
    conv.attribute.append(helper.make_attribute("kernel_shape", [5, 5]))
    return model


def test_regression_unrunnable_original_is_not_blamed_on_the_input_shape(tmp_path: Path) -> None:
    """Found by `field` mutants of attribute ints (kernel_shape, group).

    Up to 78702d6, with a symbolic batch dim bnfold said "onnxruntime rejected the default shape
    [2, 4, 8, 8] ... pass --input-shape" (exit 2), though the model cannot run with any shape; the
    same model with a static batch dim exited 1 ("verification failed"). Expected: one outcome for
    both, and no advice to change a shape that is not the problem (fixed in 8d3d9e7).
    """
    codes = {}
    for batch in ("N", 2):
        source, out = tmp_path / f"model_{batch}.onnx", tmp_path / f"out_{batch}.onnx"
        onnx.save(_unrunnable(batch), str(source))
        result = CliRunner().invoke(main, ["fold", str(source), "-o", str(out)])
        assert result.exit_code in (1, 2) and not out.exists()
        assert "rejected the default shape" not in result.stderr, result.stderr
        codes[batch] = result.exit_code
    assert codes["N"] == codes[2], codes


def test_regression_node_name_not_utf8(tmp_path: Path) -> None:
    """Found by a `set_structure` mutant (grouped_depthwise.onnx seed 1216: one byte of a node name).

    A proto2 string that is not valid UTF-8 comes back from protobuf as `bytes`; the onnx checker
    does not look at node names. Up to 78702d6 bnfold folded, WROTE the output, then
    render.to_text crashed (`', '.join(record.into)`: TypeError, bytes found) with a traceback and
    exit 1, an exit code that promises nothing was written (fixed in 8d3d9e7).
    """
    model = _conv_bn()
    model.graph.node[0].name = "conv.QQQ"
    data = model.SerializeToString()
    assert data.count(b"conv.QQQ") == 1
    source, out = tmp_path / "model.onnx", tmp_path / "out.onnx"
    source.write_bytes(data.replace(b"conv.QQQ", b"conv.\x84QQ"))
    result = CliRunner().invoke(main, ["fold", str(source), "-o", str(out)])
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    _check_outcome(result.exit_code, result.stderr, tmp_path, source, out, "node name not UTF-8")


@pytest.mark.parametrize("elem_type", [0, 33])
def test_regression_graph_input_without_known_elem_type(tmp_path: Path, elem_type: int) -> None:
    """Found by `field` mutants of graph.input.type.tensor_type.elem_type (mlp_bn1d.onnx seed 5427:
    FLOAT=1 -> 0 (UNDEFINED); resnet_tiny.onnx seed 7461: 1 -> 33).

    The loader's checker accepts the model, the fold runs, then verification's
    runtime.random_inputs calls onnx.helper.tensor_dtype_to_np_dtype(0) -> KeyError: the API raises
    it raw, the CLI says "unexpected error: KeyError: 0" (still so at 8d3d9e7). Expected: a
    BadInputError naming the input.
    """
    model = _conv_bn()
    model.graph.input[0].type.tensor_type.elem_type = elem_type
    source, out = tmp_path / "model.onnx", tmp_path / "out.onnx"
    source.write_bytes(model.SerializeToString())
    with pytest.raises(bnfold.BnfoldError):
        bnfold.fold(source)
    result = CliRunner().invoke(main, ["fold", str(source), "-o", str(out)])
    _check_outcome(result.exit_code, result.stderr, tmp_path, source, out, f"input elem_type {elem_type}")
