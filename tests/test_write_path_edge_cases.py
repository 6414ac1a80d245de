"""Edge cases of "verify what is written" (onnxruntime loads the temporary output file, and
verification runs inside `save_model_atomic`'s accept callback), found in review."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest

import bnfold
from bnfold import BadInputError

SAMPLES_DIR = Path(__file__).resolve().parents[1] / "sample_models"


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
