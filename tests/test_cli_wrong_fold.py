"""A wrong fold (bn_affine broken on purpose: epsilon dropped) is caught by verification: exit 1,
nothing written, the input kept (also --in-place), the failure on stderr even with --quiet and with
huge tolerances (the analytic check does not use them); in-process and in a real subprocess."""

from __future__ import annotations

import json
import subprocess
import sys

from cli_helpers import copy_sample, files_in
from helpers import invoke

# --- a wrong fold must be caught -------------------------------------------------------------------


def test_wrong_fold_exits_1_and_writes_nothing(tmp_path, drop_epsilon):
    model = copy_sample(tmp_path, "mlp_bn1d.onnx")
    before = files_in(tmp_path)
    result = invoke([model])
    assert result.exit_code == 1, (result.stdout, result.stderr)
    assert "verification failed" in result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    assert files_in(tmp_path) == before


def test_wrong_fold_caught_by_analytic_check_despite_huge_tolerances(tmp_path, drop_epsilon):
    """The spec: a deliberately wrong fold must be caught by the analytic check even where output
    tolerances would let it through."""
    model = copy_sample(tmp_path, "mlp_bn1d.onnx")
    target = tmp_path / "out.onnx"
    before = files_in(tmp_path)
    result = invoke([model, "--atol", "1e3", "--rtol", "1e3", "-o", target, "--json"])
    assert result.exit_code == 1, (result.stdout, result.stderr)
    assert not target.exists()
    assert files_in(tmp_path) == before
    data = json.loads(result.stdout)
    verification = data["verification"]
    assert verification["passed"] is False and data["passed"] is False
    # The output comparison alone lets the wrong fold through ...
    assert all(o["passed"] for o in verification["outputs"])
    # ... the analytic check does not.
    failed = [t for t in verification["tensors"] if not t["passed"]]
    assert failed, verification["tensors"]
    assert all(t["max_ulp_error"] > 1 for t in failed)


def test_wrong_fold_in_place_keeps_input(tmp_path, drop_epsilon):
    model = copy_sample(tmp_path, "mlp_bn1d.onnx")
    before = files_in(tmp_path)
    result = invoke([model, "--in-place", "--atol", "1e3", "--rtol", "1e3"])
    assert result.exit_code == 1, (result.stdout, result.stderr)
    assert files_in(tmp_path) == before


def test_wrong_fold_quiet_reports_on_stderr(tmp_path, drop_epsilon):
    model = copy_sample(tmp_path, "mlp_bn1d.onnx")
    result = invoke([model, "-q"])
    assert result.exit_code == 1
    assert "verification failed" in result.stderr.lower()
    assert not (tmp_path / "mlp_bn1d.folded.onnx").exists()


WRONG_FOLD_SCRIPT = """
import runpy, sys
import bnfold, bnfold.fold_math as fm
original = fm.bn_affine
def no_eps(gamma, beta, mean, var, eps=0.0):
    return original(gamma, beta, mean, var, 0.0)
fm.bn_affine = no_eps
for module in list(sys.modules.values()):
    if getattr(module, "__name__", "").startswith("bnfold.") and getattr(module, "bn_affine", None) is original:
        module.bn_affine = no_eps
sys.argv = ["bnfold", *sys.argv[1:]]
runpy.run_module("bnfold", run_name="__main__")
"""


def test_subprocess_wrong_fold_exit_1(tmp_path):
    model = copy_sample(tmp_path, "mlp_bn1d.onnx")
    before = files_in(tmp_path)
    process = subprocess.run([sys.executable, "-c", WRONG_FOLD_SCRIPT, str(model), "--atol", "1e3", "--rtol", "1e3"],
                             check=False, capture_output=True, text=True, timeout=120)
    assert process.returncode == 1, (process.stdout, process.stderr)
    assert "verification failed" in process.stderr
    assert "Traceback" not in process.stderr
    assert files_in(tmp_path) == before
