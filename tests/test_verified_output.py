"""`bnfold.fold(..., output=PATH)` (and so the CLI) verifies the file it writes: onnxruntime runs
the complete temporary file, which is renamed into place only if verification passed; also when the
file name is not UTF-8, and an error while verifying is not reported as a write failure."""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

import bnfold
from bnfold import BadInputError, VerificationError, model_io, runtime

SAMPLES_DIR = Path(__file__).resolve().parents[1] / "sample_models"


def _copy(tmp_path: Path, name: str) -> Path:
    target = tmp_path / name
    shutil.copyfile(SAMPLES_DIR / name, target)
    return target


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _bns(path: Path) -> int:
    return sum(n.op_type == "BatchNormalization" for n in onnx.load(str(path)).graph.node)


def _record_sessions(monkeypatch) -> list:
    """Every model handed to onnxruntime: (path, sha256 of its bytes at that moment) or the proto."""
    seen = []
    real_session = runtime.model_file

    def session(model, *args, **kwargs):
        seen.append((str(model), _sha(Path(model))) if isinstance(model, (str, os.PathLike)) else model)
        return real_session(model, *args, **kwargs)

    monkeypatch.setattr(runtime, "model_file", session)
    return seen


@pytest.mark.parametrize("name", ["resnet_tiny.onnx", "mlp_bn1d.onnx", "fp16_cnn.onnx"])
def test_onnxruntime_runs_exactly_the_bytes_that_land(tmp_path, monkeypatch, name):
    model = _copy(tmp_path, name)
    out = tmp_path / "out" / "folded.onnx"
    out.parent.mkdir()
    seen = _record_sessions(monkeypatch)
    result = bnfold.fold(model, output=out)
    assert result.report.passed and result.report.output_path == str(out)
    (reference, _), (candidate, candidate_sha) = seen
    assert reference == str(model)
    # The candidate was the temporary file beside the output, and it is what now sits at `out`.
    assert Path(candidate).parent == out.parent and candidate.endswith(".tmp")
    assert not Path(candidate).exists()
    assert candidate_sha == _sha(out)
    assert sorted(p.name for p in out.parent.iterdir()) == ["folded.onnx"]
    assert _bns(out) == _bns(model) - sum(r.op_type == "BatchNormalization" for r in result.report.folded)


def _corrupting_writer(monkeypatch):
    """A serialiser that writes the model with one folded weight doubled: the in-memory model is
    right, the file is wrong."""
    real_write = model_io.write_model

    def write_model(model, handle, store=None, *args):
        copy = onnx.ModelProto()
        copy.CopyFrom(model)
        if store is not None:
            store.materialize(copy, keep_pending=True)
        tensor = next(t for t in copy.graph.initializer if t.data_type == onnx.TensorProto.FLOAT and len(t.dims) >= 2)
        tensor.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(tensor) * np.float32(2), tensor.name))
        return real_write(copy, handle, None, *args)

    monkeypatch.setattr(model_io, "write_model", write_model)


def test_a_file_that_differs_from_the_folded_model_fails_and_is_not_written(tmp_path, monkeypatch):
    model = _copy(tmp_path, "resnet_tiny.onnx")
    out = tmp_path / "folded.onnx"
    _corrupting_writer(monkeypatch)
    # In memory the fold is right: without an output everything passes.
    assert bnfold.fold(model).report.passed
    with pytest.raises(VerificationError) as caught:
        bnfold.fold(model, output=out)
    verification = caught.value.report.verification
    assert all(t.passed for t in verification.tensors)  # the in-memory weights are right ...
    assert not all(o.passed for o in verification.outputs)  # ... the written file is not
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["resnet_tiny.onnx"]  # no temporary left


def test_failed_verification_without_raising_writes_nothing(tmp_path, monkeypatch):
    model = _copy(tmp_path, "mlp_bn1d.onnx")
    out = tmp_path / "folded.onnx"
    _corrupting_writer(monkeypatch)
    result = bnfold.fold(model, output=out, raise_on_failure=False)
    assert not result.report.passed
    assert result.report.output_path is None
    assert not out.exists()


def test_without_verification_output_is_written_directly(tmp_path, monkeypatch):
    model = _copy(tmp_path, "mlp_bn1d.onnx")
    out = tmp_path / "folded.onnx"
    seen = _record_sessions(monkeypatch)
    result = bnfold.fold(model, output=out, verify=False)
    assert seen == [] and result.report.verification is None
    assert result.report.output_path == str(out) and out.exists()
    assert _sha(model) == _sha(SAMPLES_DIR / "mlp_bn1d.onnx")


def test_in_place_is_verified_against_the_untouched_original(tmp_path, monkeypatch):
    model = _copy(tmp_path, "resnet_tiny.onnx")
    original_sha = _sha(model)
    seen = _record_sessions(monkeypatch)
    folded = bnfold.fold(model, output=model, in_place=True).report.folded
    (reference, reference_sha), (candidate, _) = seen
    assert reference == str(model) and reference_sha == original_sha  # read before the rename
    assert candidate != str(model)
    assert _sha(model) != original_sha
    assert folded and _bns(model) == _bns(SAMPLES_DIR / "resnet_tiny.onnx") - len(folded)


def test_reference_evaluator_fallback_also_runs_the_written_file(tmp_path, monkeypatch):
    """When onnxruntime cannot run the original (BN-6), both models go through onnx's reference
    evaluator — and the candidate is still the file about to be delivered, not the in-memory model."""
    from test_legacy_opsets import _opset6_model

    model = tmp_path / "old.onnx"
    onnx.save(_opset6_model(), str(model))
    out = tmp_path / "folded.onnx"
    assert bnfold.fold(model, output=out).report.verification.runtime_engine.startswith("onnx reference evaluator")
    out.unlink()
    _corrupting_writer(monkeypatch)
    with pytest.raises(VerificationError) as caught:
        bnfold.fold(model, output=out)
    verification = caught.value.report.verification
    assert verification.runtime_engine.startswith("onnx reference evaluator")
    assert all(t.passed for t in verification.tensors) and not all(o.passed for o in verification.outputs)
    assert not out.exists()


def test_negative_seed_is_bad_input_before_any_work(tmp_path):
    model = _copy(tmp_path, "mlp_bn1d.onnx")
    with pytest.raises(bnfold.BadInputError, match="seed must be a non-negative integer"):
        bnfold.fold(model, output=tmp_path / "out.onnx", seed=-1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mlp_bn1d.onnx"]


def test_external_data_never_lands_in_any_input_data_file(tmp_path):
    """The output's data file is `OUT.data`, or `OUT.folded.data`, `OUT.folded2.data`, ... when the
    input's own data files have those names."""
    from onnx import external_data_helper

    source = onnx.load(str(SAMPLES_DIR / "resnet_tiny.onnx"))
    big = sorted(source.graph.initializer, key=lambda t: -len(t.raw_data))[:2]
    for tensor, location in zip(big, ["out.onnx.data", "out.onnx.folded.data"]):
        external_data_helper.set_external_data(tensor, location)
        (tmp_path / location).write_bytes(tensor.raw_data)
        tensor.ClearField("raw_data")
        tensor.data_location = onnx.TensorProto.EXTERNAL
    model = tmp_path / "out.onnx"
    onnx.save(source, str(model))
    before = {p.name: _sha(p) for p in tmp_path.iterdir()}
    result = bnfold.fold(model, output=model, in_place=True)  # in place: the input's data files must survive
    assert result.report.passed
    assert (tmp_path / "out.onnx.folded2.data").is_file()
    assert {name: _sha(tmp_path / name) for name in ("out.onnx.data", "out.onnx.folded.data")} == \
        {name: before[name] for name in ("out.onnx.data", "out.onnx.folded.data")}
    folded = onnx.load(str(model), load_external_data=False)
    locations = {e.value for t in folded.graph.initializer for e in t.external_data if e.key == "location"}
    assert locations == {"out.onnx.folded2.data"}


# --- edge cases: a file name that is not UTF-8, an error while verifying ------------------------------


@pytest.mark.skipif(sys.platform != "linux", reason="needs a file system that stores any byte in a file name")
def test_output_name_that_is_not_utf8_still_verifies(tmp_path):
    """Bug: onnxruntime now loads the folded model from its temporary file by *path*
    (`runtime.session(str(folded_file))`). A Linux file name that is not valid UTF-8 (Python holds it
    with surrogate escapes) cannot be passed to onnxruntime's InferenceSession, so a correct fold is
    reported as "verification: FAILED ... onnxruntime cannot run the folded model: __init__():
    incompatible constructor arguments" (CLI exit 1, nothing written). Before c71e202..HEAD the
    folded model was handed to onnxruntime as bytes and the same command passed and wrote the file.
    Fix: load the temporary file's bytes (`Path(folded_file).read_bytes()`) for onnxruntime — it is
    self-contained whenever a path is passed — or do so when `str(path)` is not UTF-8 encodable."""
    model = tmp_path / "in.onnx"
    shutil.copyfile(SAMPLES_DIR / "resnet_tiny.onnx", model)
    output = tmp_path / os.fsdecode(b"out\xff.onnx")
    try:
        output.write_bytes(b"")
        output.unlink()
    except (OSError, UnicodeEncodeError):
        pytest.skip("this file system rejects non-UTF-8 file names")
    result = bnfold.fold(model, output=output, raise_on_failure=False)
    assert result.report.verification.runtime_status == "passed", result.report.verification.runtime_status
    assert result.report.passed
    assert output.is_file()


def test_error_during_verification_is_not_reported_as_a_write_failure(tmp_path):
    """Bug (message): verification now runs inside `save_model_atomic`'s try block, whose
    `except ValueError` / `except OSError` turn *any* such error raised by verification into
    "OUT: cannot write: ..." — blaming the output file for a problem of the verification options.
    Reproducer: `bnfold in.onnx -o out.onnx --seed -1` prints "out.onnx: cannot write: expected
    non-negative integer" (numpy's seed check), which sends the user to look at the output folder.
    Fix: call `accept` outside the except clauses that translate write errors (e.g. write in one
    try/except, then call accept, then rename in a second try/except, keeping the `finally` that
    removes the temporary files), and validate `seed >= 0` in the CLI/RunConfig."""
    model = tmp_path / "in.onnx"
    shutil.copyfile(SAMPLES_DIR / "resnet_tiny.onnx", model)
    output = tmp_path / "out.onnx"
    with pytest.raises((BadInputError, ValueError)) as caught:
        bnfold.fold(model, output=output, seed=-1)
    assert "cannot write" not in str(caught.value), str(caught.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.onnx"]  # and nothing left behind
