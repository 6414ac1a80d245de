"""Attack: `--inputs` is a file bnfold reads, but only the model path is checked for being a regular
file (file_access.check_model_file); cli.py `_load_inputs` hands any path to np.load, so a FIFO
blocks bnfold forever. Expected, as for models: refused before opening, exit 2, one line.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import onnx
import pytest
from helpers import conv_bn_model


def _conv_bn(path: Path) -> None:
    onnx.save(conv_bn_model(4), path)


def test_inputs_fifo_is_refused(tmp_path: Path) -> None:
    _conv_bn(tmp_path / "m.onnx")
    os.mkfifo(tmp_path / "arrays.npz")

    try:
        result = subprocess.run([sys.executable, "-m", "bnfold", "m.onnx", "-o", "out.onnx", "--inputs", "arrays.npz"],
                                cwd=tmp_path, capture_output=True, text=True, timeout=20)
    except subprocess.TimeoutExpired:
        pytest.fail("bnfold blocked reading the FIFO")
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1
