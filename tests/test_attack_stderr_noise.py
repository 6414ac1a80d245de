"""Attack: onnxruntime's own error log leaks onto bnfold's stderr.

Sessions are created with log_severity_level=3 (runtime.py `session`), which still prints ERROR
records: when onnxruntime fails to run a model, a coloured "[E:onnxruntime:, sequential_executor.cc
...]" line precedes bnfold's own one-line error, so a failed model gives two stderr lines (issue 11 F:
one line per failed model). Severity 4 (FATAL) or the default logger's severity would keep it quiet.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import onnx
import pytest
from helpers import conv_bn_model

C = 4


def test_failed_model_gives_one_stderr_line(tmp_path: Path) -> None:
    # group=0: the checker accepts it, onnxruntime fails at run time
    model = conv_bn_model(C, kernel=3, size=8, group=0)
    onnx.save(model, tmp_path / "m.onnx")

    result = subprocess.run([sys.executable, "-m", "bnfold", "m.onnx", "-o", "out.onnx", "-q"], cwd=tmp_path,
                            capture_output=True, text=True)

    assert result.returncode == 1
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
