"""Attack: in batch mode each job guarded only its *own* input's files, so one job's output (its model
file or its fresh `.data` file) could replace a file another input of the same run reads.

The output guard (bnfold.file_access.output_target / fresh_data_path) is given one job's input model
and data files; `batch.output_paths` / cli `_check_target` never compare a job's outputs with the
other jobs' inputs. Expected: an output model that is another input is refused before any work (exit 2); a data file
name taken by a file the output did not own is not replaced (a fresh name is used); every input intact.
"""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path

import onnx
import pytest
from helpers import conv_bn_model

C = 4


def _model() -> onnx.ModelProto:
    return conv_bn_model(C)


def _bnfold(folder: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "bnfold", *args, "-q"], cwd=folder, capture_output=True, text=True)


def test_one_jobs_output_is_not_another_jobs_input(tmp_path: Path) -> None:
    onnx.save(_model(), tmp_path / "X.onnx")
    onnx.save(_model(), tmp_path / "X.folded.onnx")  # named on the command line: an input
    before = (tmp_path / "X.folded.onnx").read_bytes()

    result = _bnfold(tmp_path, "X.onnx", "X.folded.onnx")

    assert (tmp_path / "X.folded.onnx").read_bytes() == before
    assert result.returncode == 2


@pytest.mark.parametrize("order", [("X.onnx", "Y.onnx"), ("Y.onnx", "X.onnx")])
def test_one_jobs_data_file_is_not_another_inputs_data(tmp_path: Path, order: tuple[str, str]) -> None:
    onnx.save(copy.deepcopy(_model()), tmp_path / "X.onnx", save_as_external_data=True, location="X.bin",
              size_threshold=0)
    onnx.save(copy.deepcopy(_model()), tmp_path / "Y.onnx", save_as_external_data=True,
              location="X.folded.onnx.data", size_threshold=0)
    before = (tmp_path / "X.folded.onnx.data").read_bytes()

    result = _bnfold(tmp_path, *order)

    assert (tmp_path / "X.folded.onnx.data").read_bytes() == before, "input Y's weights were replaced"
    assert result.returncode == 0, result.stderr  # X's weights went to a fresh name beside its output
    written = onnx.load(str(tmp_path / "X.folded.onnx"))
    assert written.graph.node and {"Conv"} <= {n.op_type for n in written.graph.node}


def test_data_file_of_an_unnamed_model_is_not_replaced(tmp_path: Path) -> None:
    onnx.save(copy.deepcopy(_model()), tmp_path / "X.onnx", save_as_external_data=True, location="X.bin",
              size_threshold=0)
    onnx.save(copy.deepcopy(_model()), tmp_path / "Y.onnx", save_as_external_data=True,
              location="X.folded.onnx.data", size_threshold=0)
    before = (tmp_path / "X.folded.onnx.data").read_bytes()

    _bnfold(tmp_path, "X.onnx")

    assert (tmp_path / "X.folded.onnx.data").read_bytes() == before
