"""onnxruntime runs in a child process; the caller's own script must not run again in it."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = """
import bnfold
print("script ran")
result = bnfold.fold("m.onnx", raise_on_failure=False)
print("verification", result.report.verification.runtime_status)
"""


@pytest.mark.parametrize("from_stdin", [False, True])
def test_a_pipeline_script_without_main_guard_verifies_once(tmp_path, from_stdin):
    shutil.copy(ROOT / "sample_models" / "resnet_tiny.onnx", tmp_path / "m.onnx")
    (tmp_path / "script.py").write_text(SCRIPT)
    command = [sys.executable, "-"] if from_stdin else [sys.executable, "script.py"]
    done = subprocess.run(command, input=SCRIPT if from_stdin else None, cwd=tmp_path, capture_output=True,
                          text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["script ran", "verification passed"], done.stderr


def test_a_wrong_fold_hidden_from_every_output_fails_at_its_tensor(monkeypatch):
    """The folded tensor is compared where it is made: a fold whose error no output shows still
    fails verification. The fold math is broken on purpose, so the
    analytic check (which reuses it) agrees with it and only the tensor comparison can catch it. The
    output (y > 1e30) is all False for any fold."""
    import numpy as np

    import bnfold
    from benchmarks.graph_builder import GraphBuilder
    from bnfold import fold_math

    original = fold_math.conv_backward

    def off_by_a_half(weight, bias, affine, out_dtype=None):
        new_weight, new_bias = original(weight, bias, affine, out_dtype)
        return new_weight, new_bias + 0.5

    g = GraphBuilder(np.random.default_rng(3))
    x = g.input("x", [1, 3, 8, 8])
    y = g.bn(g.conv(x, 3, 4), 4)
    z = g.node("Greater", [y, g.const(np.full(1, 1e30, np.float32))])
    model = g.model([z])
    assert bnfold.fold(model).report.verification.passed  # the correct fold passes
    monkeypatch.setattr(fold_math, "conv_backward", off_by_a_half)
    verification = bnfold.fold(model, raise_on_failure=False).report.verification
    assert all(output.passed for output in verification.outputs)
    assert [t.passed for t in verification.intermediate_tensors] == [False]
    assert not verification.passed


def test_a_child_whose_parent_closed_without_a_job_leaves_quietly(capfd):
    """The child is started before the parent's last checks; when those find bad input, the parent
    closes the pipe without sending a job. The child's `recv` then fails, and its reply could not be
    sent either: that raised out of the child, and multiprocessing printed "Process
    bnfold-onnxruntime:" (and a traceback, cut short by the kill) above bnfold's one-line error."""
    import multiprocessing

    from bnfold.ort_child import _child_main

    parent_end, child_end = multiprocessing.Pipe()
    parent_end.close()
    _child_main(child_end)  # returns, raises nothing
    captured = capfd.readouterr()
    assert captured.err == "" and captured.out == ""
