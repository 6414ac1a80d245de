"""Attack: the side files bnfold writes (--save-inputs, --save-outputs, --report-md) are outputs too.

The output guard (bnfold.file_access.output_target) covers the model output and its data file only;
`_save_arrays` (runtime.py) and the report writer (cli.py `_emit`) open their paths for writing with
no check, so naming the input model, the input's external data file, or the model output there
silently destroys it — with exit 0. `bnfold check`, documented as writing nothing, overwrites the
model it checks. Expected: exit 2, one line, every input byte and the output untouched.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import onnx
import pytest
from helpers import conv_bn_model

C = 4


def _models(folder: Path) -> None:
    """m.onnx (self-contained) and e.onnx + e.bin (external data): Conv -> BN."""
    onnx.save(conv_bn_model(C), folder / "m.onnx")
    onnx.save(conv_bn_model(C), folder / "e.onnx", save_as_external_data=True, location="e.bin", size_threshold=0)


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}


CASES = [
    # (arguments, the file that must survive)
    (["m.onnx", "-o", "out.onnx", "--save-inputs", "m.onnx"], "m.onnx"),
    (["m.onnx", "-o", "out.onnx", "--save-outputs", "m.onnx"], "m.onnx"),
    (["m.onnx", "-o", "out.onnx", "--report-md", "m.onnx"], "m.onnx"),
    (["e.onnx", "-o", "out.onnx", "--save-inputs", "e.bin"], "e.bin"),
    (["e.onnx", "-o", "out.onnx", "--save-outputs", "e.bin"], "e.bin"),
    (["e.onnx", "-o", "out.onnx", "--report-md", "e.bin"], "e.bin"),
    (["m.onnx", "--in-place", "--report-md", "m.onnx"], "m.onnx"),
    (["check", "m.onnx", "--report-md", "m.onnx"], "m.onnx"),
]


@pytest.mark.parametrize(("args", "victim"), CASES, ids=[" ".join(a) for a, _ in CASES])
def test_side_file_never_overwrites_an_input(tmp_path: Path, args: list[str], victim: str) -> None:
    _models(tmp_path)
    before = _snapshot(tmp_path)

    result = subprocess.run([sys.executable, "-m", "bnfold", *args], cwd=tmp_path, capture_output=True, text=True)

    in_place_done = "--in-place" in args and result.returncode == 0
    if not in_place_done:
        assert (tmp_path / victim).read_bytes() == before[victim], "an input file was overwritten"
    else:  # in place, the model must at least still be a model (not the Markdown report)
        onnx.load(str(tmp_path / victim))
    assert result.returncode == 2, result.stdout + result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_report_md_does_not_replace_the_written_model(tmp_path: Path) -> None:
    _models(tmp_path)

    result = subprocess.run([sys.executable, "-m", "bnfold", "m.onnx", "-o", "out.onnx", "--report-md", "out.onnx"],
                            cwd=tmp_path, capture_output=True, text=True)

    if result.returncode == 0:
        onnx.checker.check_model(onnx.load(str(tmp_path / "out.onnx")))  # "wrote out.onnx" must be a model
    else:
        assert result.returncode == 2 and not (tmp_path / "out.onnx").exists()
