"""SIGINT, SIGTERM and SIGHUP: every temporary file removed, one line on stderr, exit 128+signal,
the input and a previous output untouched — whether the signal lands during start-up (imports) or
while the complete temporary output is being verified. Real signals to a real `python -m bnfold`."""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

SAMPLES_DIR = Path(__file__).resolve().parents[1] / "sample_models"
pytestmark = pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux /proc")
WAIT_SECONDS = 120  # an upper bound for waiting, never a measured time


def _catches(pid: int, signum: int) -> bool:
    """Has the process installed a handler for `signum` (Linux: SigCgt in /proc/PID/status)?"""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("SigCgt:"):
            return bool(int(line.split()[1], 16) >> (signum - 1) & 1)
    return False


def _start(tmp_path: Path, iterations: int):
    model, output, temp = tmp_path / "m.onnx", tmp_path / "out.onnx", tmp_path / "tmp"
    shutil.copyfile(SAMPLES_DIR / "resnet_tiny.onnx", model)
    output.write_bytes(b"previous output")
    temp.mkdir()
    env = {**os.environ, "TMPDIR": str(temp)}
    process = subprocess.Popen([sys.executable, "-m", "bnfold", str(model), "-o", str(output),
                                "--iterations", str(iterations)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, env=env)
    return process, model, output, temp


def _wait_for(process: subprocess.Popen, ready) -> None:
    deadline = time.monotonic() + WAIT_SECONDS
    while not ready():
        assert process.poll() is None, f"bnfold ended before the signal: {process.communicate()}"
        assert time.monotonic() < deadline, "bnfold never reached the point to interrupt"
        time.sleep(0.001)


def _assert_clean_exit(process, signum, model, output, temp, tmp_path):
    _, stderr = process.communicate(timeout=WAIT_SECONDS)
    name = signal.Signals(signum).name
    assert process.returncode == 128 + signum, (process.returncode, stderr)
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"bnfold: interrupted ({name})"), stderr
    assert hashlib.sha256(model.read_bytes()).digest() == \
        hashlib.sha256((SAMPLES_DIR / "resnet_tiny.onnx").read_bytes()).digest()
    assert output.read_bytes() == b"previous output"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "out.onnx", "tmp"]  # no hidden .tmp
    assert list(temp.iterdir()) == []  # nor a verification folder


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP])
def test_signal_while_the_output_is_verified(tmp_path, signum):
    """The temporary output exists (complete, being verified) when the signal arrives."""
    process, model, output, temp = _start(tmp_path, iterations=100_000)
    _wait_for(process, lambda: any(p.name.endswith(".tmp") for p in tmp_path.iterdir()))
    process.send_signal(signum)
    _assert_clean_exit(process, signum, model, output, temp, tmp_path)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP])
def test_signal_during_start_up(tmp_path, signum):
    """The handlers are in before onnx and onnxruntime are imported: the signal is sent as soon as
    the process catches SIGTERM (Python itself never does), i.e. while it is still importing."""
    process, model, output, temp = _start(tmp_path, iterations=1)
    _wait_for(process, lambda: _catches(process.pid, signal.SIGTERM))
    process.send_signal(signum)
    _assert_clean_exit(process, signum, model, output, temp, tmp_path)


def test_signal_stops_worker_processes_too(tmp_path):
    """With -j 2 the models are folded in worker processes: the command must not wait for them to
    finish (and write their outputs) after it was told to stop."""
    models = [tmp_path / "a.onnx", tmp_path / "b.onnx"]
    for path, sample in zip(models, ["resnet_tiny.onnx", "bn_first.onnx"]):
        shutil.copyfile(SAMPLES_DIR / sample, path)
    out = tmp_path / "out"
    process = subprocess.Popen([sys.executable, "-m", "bnfold", *map(str, models), "-j", "2", "-o", str(out),
                                "--iterations", "100000"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for(process, lambda: out.is_dir() and any(p.name.endswith(".tmp") for p in out.iterdir()))
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=WAIT_SECONDS)
    assert process.returncode == 143, stderr
    assert stderr.strip().splitlines() == [
        "bnfold: interrupted (SIGTERM); unfinished outputs not written, temporary files removed"]
    assert list(out.iterdir()) == []
