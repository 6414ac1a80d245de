"""Faults while writing: a process killed mid-write, a full disk, models above the protobuf limit."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

import bnfold
from benchmarks.graph_builder import GraphBuilder
from bnfold import model_io
from bnfold.cli import main


def _big_model(path: Path, blocks: int = 6, channels: int = 384) -> Path:
    """About 32 MB of fp32 Conv weights (3x3, C -> C) with a BN after each conv."""
    g = GraphBuilder(rng=np.random.default_rng(0))
    x = g.input("x", [1, channels, 4, 4])
    for _ in range(blocks):
        x = g.relu(g.bn(g.conv(x, channels, channels, pads=[1, 1, 1, 1], bias=False), channels))
    onnx.save(g.model([x], check=False), path)
    return path


def _is_complete_model(path: Path, expected_bn: int) -> bool:
    model = onnx.load(path)
    onnx.checker.check_model(model)
    return sum(n.op_type == "BatchNormalization" for n in model.graph.node) == expected_bn


def test_killing_bnfold_mid_write_leaves_the_old_file_or_the_complete_new_one(tmp_path):
    source = _big_model(tmp_path / "big.onnx")
    target = tmp_path / "out.onnx"
    target.write_bytes(source.read_bytes())  # "the old file": the unfolded model, 6 BNs
    outcomes = set()
    for delay in (0.3, 0.6, 0.9, 1.2, 1.5, 2.0, 3.0):
        process = subprocess.Popen([sys.executable, "-m", "bnfold", str(source), "-o", str(target), "--no-verify",
                                    "-q"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(delay)
        process.send_signal(signal.SIGKILL)
        process.wait()
        if _is_complete_model(target, 6):
            outcomes.add("old")
        else:
            assert _is_complete_model(target, 0), f"a kill after {delay}s left a broken {target.name}"
            outcomes.add("new")
            target.write_bytes(source.read_bytes())
    # Only hidden temporary files may be left behind by a kill; never a partial out.onnx.
    leftovers = {p.name for p in tmp_path.iterdir()} - {"big.onnx", "out.onnx"}
    assert all(name.startswith(".out.onnx.") and name.endswith(".tmp") for name in leftovers)
    assert outcomes  # at least one kill landed; which side it landed on depends on the machine


def test_disk_full_while_writing_is_exit_2_with_the_path(tmp_path, monkeypatch):
    source = tmp_path / "model.onnx"
    g = GraphBuilder()
    y = g.bn(g.conv(g.input("x", [1, 3, 8, 8]), 3, 4), 4)
    onnx.save(g.model([y]), source)
    target = tmp_path / "out.onnx"

    def no_space(*_args, **_kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(model_io, "write_model", no_space)
    result = CliRunner().invoke(main, [str(source), "-o", str(target)])
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and str(target) in lines[0] and "No space left" in lines[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]  # temp file cleaned up


def test_results_above_the_protobuf_limit_are_saved_with_fresh_external_data(tmp_path, monkeypatch):
    # Pretend the limit is tiny so the > 2 GB code path runs on a small model.
    monkeypatch.setattr(model_io, "EXTERNAL_ABOVE_BYTES", 1024)
    source = _big_model(tmp_path / "m.onnx", blocks=2, channels=64)
    result = bnfold.fold(source)
    target = tmp_path / "m.folded.onnx"
    stale = tmp_path / "m.folded.onnx.data"
    # onnx would append to this. No model there owns it (it may be another model's weights under
    # that name), so bnfold neither appends to it nor replaces it: the output's data gets a fresh name.
    stale.write_bytes(b"x" * 10_000_000)
    result.save(target)
    assert stale.read_bytes() == b"x" * 10_000_000
    assert 0 < (tmp_path / "m.folded.onnx.folded.data").stat().st_size < 1_000_000
    folded = onnx.load(target, load_external_data=False)  # loading the data would reset data_location
    assert any(t.data_location == onnx.TensorProto.EXTERNAL for t in folded.graph.initializer)
    onnx.checker.check_model(str(target))
    verification = bnfold.verify(source, target)
    assert verification.passed
    # The in-memory result still holds its weights after saving.
    assert all(t.data_location != onnx.TensorProto.EXTERNAL for t in result.model.graph.initializer)


@pytest.mark.parametrize("external_input", [True, False])
def test_in_place_with_external_data_replaces_model_and_data(tmp_path, external_input):
    source = _big_model(tmp_path / "m.onnx", blocks=2, channels=32)
    if external_input:
        model = onnx.load(source)
        onnx.save_model(model, source, save_as_external_data=True, location="m.onnx.data", size_threshold=0)
    result = CliRunner().invoke(main, [str(source), "--in-place", "-q"])
    assert result.exit_code == 0, result.output
    folded = onnx.load(source, load_external_data=False)
    assert [n.op_type for n in folded.graph.node] == ["Conv", "Relu", "Conv", "Relu"]
    onnx.checker.check_model(str(source))
    uses_external = any(t.data_location == onnx.TensorProto.EXTERNAL for t in folded.graph.initializer)
    assert uses_external == external_input
