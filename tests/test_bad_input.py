"""Unusable inputs and options: exit code 2, exactly one line on stderr ("bnfold: error: ..."), no
traceback, nothing written, the input untouched. Every case runs in a real subprocess
(`python -m bnfold`) and in-process through click's CliRunner.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

from benchmarks.graph_builder import GraphBuilder
from bnfold.cli import main

ROOT = Path(__file__).resolve().parents[1]
SAMPLES_DIR = ROOT / "sample_models"
MODES = ["subprocess", "runner"]


# --- running the CLI ----------------------------------------------------------------------------


class Outcome:
    def __init__(self, code: int, stdout: str, stderr: str) -> None:
        self.code, self.stdout, self.stderr = code, stdout, stderr

    def __repr__(self) -> str:
        return f"Outcome(code={self.code}, stdout={self.stdout!r}, stderr={self.stderr!r})"


def run_cli(mode: str, args: list) -> Outcome:
    args = [str(a) for a in args]
    if mode == "subprocess":
        process = subprocess.run([sys.executable, "-m", "bnfold", *args], check=False, capture_output=True, text=True,
                                 timeout=120)
        return Outcome(process.returncode, process.stdout, process.stderr)
    result = CliRunner().invoke(main, args)
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        import traceback

        text = "".join(traceback.format_exception(result.exception))
        return Outcome(result.exit_code, result.stdout, result.stderr + "\n" + text)
    return Outcome(result.exit_code, result.stdout, result.stderr)


def snapshot(folder: Path) -> dict[str, bytes | None]:
    """Every path below `folder` with its bytes (None for directories)."""
    tree = {}
    for path in sorted(folder.rglob("*")):
        relative = str(path.relative_to(folder))
        tree[relative] = None if path.is_dir() else path.read_bytes()
    return tree


def assert_bad_input(outcome: Outcome) -> None:
    assert outcome.code == 2, outcome
    assert "Traceback" not in outcome.stdout + outcome.stderr, outcome
    lines = outcome.stderr.splitlines()
    assert len(lines) == 1, f"expected exactly one line on stderr: {outcome!r}"
    assert lines[0].startswith("bnfold: error:"), outcome
    assert outcome.stdout == "", outcome


# --- the cases: each writes its files below tmp_path and returns the CLI arguments -------------------


def valid_model(tmp_path: Path, name: str = "no_bn.onnx") -> Path:
    target = tmp_path / name
    shutil.copyfile(SAMPLES_DIR / name, target)
    return target


def save_unchecked(model: onnx.ModelProto, path: Path) -> Path:
    path.write_bytes(model.SerializeToString())
    return path


def case_missing(tmp_path):
    return [tmp_path / "missing.onnx"]


def case_missing_in_missing_folder(tmp_path):
    return [tmp_path / "nowhere" / "missing.onnx"]


def case_directory(tmp_path):
    (tmp_path / "folder").mkdir()
    return [tmp_path / "folder"]


def case_directory_named_onnx(tmp_path):
    (tmp_path / "model.onnx").mkdir()
    return [tmp_path / "model.onnx"]


def case_empty(tmp_path):
    (tmp_path / "empty.onnx").write_bytes(b"")
    return [tmp_path / "empty.onnx"]


def case_random(seed: int, size: int) -> Callable:
    def make(tmp_path):
        path = tmp_path / f"random{seed}.onnx"
        path.write_bytes(np.random.default_rng(seed).bytes(size))
        return [path]

    make.__name__ = f"case_random_{seed}_{size}"
    return make


def case_truncated(name: str, fraction: float = 0.5) -> Callable:
    def make(tmp_path):
        data = (SAMPLES_DIR / name).read_bytes()
        path = tmp_path / f"truncated_{name}"
        path.write_bytes(data[: int(len(data) * fraction)])
        return [path]

    make.__name__ = f"case_truncated_{name}_{fraction}"
    return make


def case_text_file(tmp_path):
    path = tmp_path / "notes.onnx"
    path.write_text("this is not a model\n" * 20)
    return [path]


def case_protobuf_without_graph(tmp_path):
    path = tmp_path / "nograph.onnx"
    path.write_bytes(b"\x08\x07")  # ModelProto{ir_version: 7}, no graph
    return [path]


def case_lfs_pointer(tmp_path):
    path = tmp_path / "lfs.onnx"
    path.write_text("version https://git-lfs.github.com/spec/v1\n"
                    "oid sha256:4d7a214614ab2935c943f9e0ff69d22eadbb8f32b1258daaa5e2ca24d17e2393\n"
                    "size 123\n")
    return [path]


def case_checker_fails(tmp_path):
    model = onnx.load(str(SAMPLES_DIR / "no_bn.onnx"))
    model.graph.node[0].input[0] = "undefined_tensor"
    return [save_unchecked(model, tmp_path / "invalid.onnx")]


def case_checker_fails_with_bn(tmp_path):
    model = onnx.load(str(SAMPLES_DIR / "resnet_tiny.onnx"))
    bn = next(node for node in model.graph.node if node.op_type == "BatchNormalization")
    bn.input[3] = "undefined_mean"
    return [save_unchecked(model, tmp_path / "invalid_bn.onnx")]


def case_ir_too_new(tmp_path):
    model = onnx.load(str(SAMPLES_DIR / "no_bn.onnx"))
    model.ir_version = onnx.IR_VERSION + 1
    return [save_unchecked(model, tmp_path / "future_ir.onnx")]


def case_opset_too_new(tmp_path):
    model = onnx.load(str(SAMPLES_DIR / "resnet_tiny.onnx"))
    model.opset_import[0].version = onnx.defs.onnx_opset_version() + 1
    return [save_unchecked(model, tmp_path / "future_opset.onnx")]


def case_missing_external_data(tmp_path):
    model = onnx.load(str(SAMPLES_DIR / "resnet_tiny.onnx"))
    path = tmp_path / "ext.onnx"
    onnx.save_model(model, str(path), save_as_external_data=True, location="weights.bin", size_threshold=0)
    (tmp_path / "weights.bin").unlink()
    return [path]


def case_truncated_external_data(tmp_path):
    model = onnx.load(str(SAMPLES_DIR / "resnet_tiny.onnx"))
    path = tmp_path / "ext.onnx"
    onnx.save_model(model, str(path), save_as_external_data=True, location="weights.bin", size_threshold=0)
    weights = tmp_path / "weights.bin"
    weights.write_bytes(weights.read_bytes()[:100])
    return [path]


def case_output_folder_missing(tmp_path):
    return [valid_model(tmp_path), "-o", tmp_path / "no_such_folder" / "out.onnx"]


def case_output_folder_is_a_file(tmp_path):
    (tmp_path / "afile").write_text("x")
    return [valid_model(tmp_path), "-o", tmp_path / "afile" / "out.onnx"]


def case_input_shape(value: str) -> Callable:
    def make(tmp_path):
        return [valid_model(tmp_path, "resnet_tiny.onnx"), "--input-shape", value]

    make.__name__ = f"case_input_shape_{value}"
    return make


CASES = [
    case_missing,
    case_missing_in_missing_folder,
    case_directory,
    case_directory_named_onnx,
    case_empty,
    *(case_random(seed, size) for seed, size in [(0, 16), (1, 2000), (2, 5000), (3, 1), (4, 64)]),
    case_truncated("no_bn.onnx"),
    case_truncated("resnet_tiny.onnx"),
    case_truncated("resnet_tiny.onnx", 0.9),
    case_text_file,
    case_protobuf_without_graph,
    case_lfs_pointer,
    case_checker_fails,
    case_checker_fails_with_bn,
    case_ir_too_new,
    case_opset_too_new,
    case_missing_external_data,
    case_truncated_external_data,
    case_output_folder_missing,
    case_output_folder_is_a_file,
    case_input_shape("input:3,x,32,32"),
    case_input_shape("input"),
    case_input_shape("input:0,3,32,32"),
    case_input_shape("input:-2,3,32,32"),
    case_input_shape(":2,3,32,32"),
    case_input_shape("input:2,,32,32"),
    case_input_shape("input:"),
    case_input_shape("images:2,3,32,32"),  # unknown input name
]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", CASES, ids=[c.__name__.removeprefix("case_") for c in CASES])
def test_bad_input(tmp_path, case, mode):
    args = case(tmp_path)
    before = snapshot(tmp_path)
    outcome = run_cli(mode, args)
    assert_bad_input(outcome)
    assert snapshot(tmp_path) == before, "files were created, changed or removed"


@pytest.mark.parametrize("mode", MODES)
def test_bad_input_with_json_flag(tmp_path, mode):
    """--json does not turn a bad input into a traceback or a half-written object."""
    (tmp_path / "junk.onnx").write_bytes(b"\x12\x34" * 50)
    before = snapshot(tmp_path)
    outcome = run_cli(mode, [tmp_path / "junk.onnx", "--json"])
    assert outcome.code == 2, outcome
    assert "Traceback" not in outcome.stdout + outcome.stderr
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("mode", MODES)
def test_unknown_input_name_is_named(tmp_path, mode):
    outcome = run_cli(mode, [valid_model(tmp_path, "resnet_tiny.onnx"), "--input-shape", "images:2,3,32,32"])
    assert_bad_input(outcome)
    assert "images" in outcome.stderr


@pytest.mark.parametrize("mode", MODES)
def test_error_names_the_path(tmp_path, mode):
    (tmp_path / "empty.onnx").write_bytes(b"")
    outcome = run_cli(mode, [tmp_path / "empty.onnx"])
    assert_bad_input(outcome)
    assert "empty.onnx" in outcome.stderr


@pytest.mark.parametrize("mode", MODES)
def test_output_folder_not_writable(tmp_path, mode):
    model = valid_model(tmp_path)
    folder = tmp_path / "readonly"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        try:
            (folder / "probe").write_bytes(b"")
        except PermissionError:
            pass
        else:
            (folder / "probe").unlink()
            pytest.skip("running as root: the read-only folder is writable anyway")
        before = snapshot(tmp_path)
        outcome = run_cli(mode, [model, "-o", folder / "out.onnx"])
        assert_bad_input(outcome)
        assert snapshot(tmp_path) == before
    finally:
        folder.chmod(stat.S_IRWXU)


def test_write_failure_is_one_line(tmp_path, monkeypatch):
    """The output folder passes the up-front check but writing fails (EACCES, a full disk...):
    still exit 2, one line, no temp file left. Simulated, so it also runs as root."""
    import tempfile

    from bnfold import model_io

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(model_io.tempfile, "mkstemp", refuse)
    model = valid_model(tmp_path, "resnet_tiny.onnx")
    before = snapshot(tmp_path)
    outcome = run_cli("runner", [model, "-o", tmp_path / "out.onnx"])
    monkeypatch.setattr(model_io.tempfile, "mkstemp", tempfile.mkstemp)
    assert_bad_input(outcome)
    assert snapshot(tmp_path) == before


def test_write_failure_midway_leaves_nothing(tmp_path, monkeypatch):
    """os.replace fails after the temp file was written: the temp file is removed."""
    from bnfold import model_io

    def refuse(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(model_io.os, "replace", refuse)
    model = valid_model(tmp_path, "resnet_tiny.onnx")
    before = snapshot(tmp_path)
    outcome = run_cli("runner", [model, "-o", tmp_path / "out.onnx"])
    monkeypatch.undo()
    assert_bad_input(outcome)
    assert snapshot(tmp_path) == before


# --- invalid BN parameters: not an error, the BN is kept ----------------------------------------------


def invalid_bn_model(kind: str) -> onnx.ModelProto:
    """x -> conv_a -> bn_a (valid) -> relu -> conv_b -> bn_b (invalid `kind`) -> y."""
    g = GraphBuilder(np.random.default_rng(7), opset=15)
    x = g.input("x", ["N", 3, 8, 8])
    y = g.relu(g.bn(g.conv(x, 3, 4, pads=[1, 1, 1, 1]), 4))
    y = g.conv(y, 4, 4, pads=[1, 1, 1, 1])
    gamma = np.array([1.0, 0.5, 1.5, 1.2])
    beta = np.array([0.1, -0.2, 0.0, 0.3])
    mean = np.array([0.0, 0.5, -0.5, 0.1])
    var = np.array([1.0, 0.5, 0.25, 1.5])
    if kind == "negative_var":
        var[1] = -0.5
    elif kind == "nan_var":
        var[2] = np.nan
    elif kind == "nan_gamma":
        gamma[0] = np.nan
    elif kind == "inf_mean":
        mean[3] = np.inf
    elif kind == "var_plus_eps_zero":
        var[0] = -np.float32(1e-5)
    params = [g.const(v, p) for v, p in zip((gamma, beta, mean, var), ("gamma", "beta", "mean", "var"))]
    y = g.node("BatchNormalization", [y, *params], "bad_bn", epsilon=1e-5)
    return g.model([y])


INVALID_KINDS = ["negative_var", "nan_var", "nan_gamma", "inf_mean", "var_plus_eps_zero"]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("kind", INVALID_KINDS)
def test_invalid_bn_params_kept(tmp_path, kind, mode):
    path = tmp_path / f"{kind}.onnx"
    onnx.save_model(invalid_bn_model(kind), str(path))
    original = path.read_bytes()
    outcome = run_cli(mode, [path, "--json"])
    assert outcome.code == 0, outcome
    assert "Traceback" not in outcome.stdout + outcome.stderr
    data = json.loads(outcome.stdout)
    assert data["ops_before"]["BatchNormalization"] == 2
    assert data["ops_after"]["BatchNormalization"] == 1
    assert len(data["folded"]) == 1
    (skipped,) = data["skipped"]
    assert skipped["op_type"] == "BatchNormalization"
    assert skipped["reason"] == "invalid_params"
    assert skipped["node"].startswith("bad_bn")
    assert path.read_bytes() == original
    output = tmp_path / f"{kind}.folded.onnx"
    assert output.is_file()
    folded = onnx.load(str(output))
    (kept,) = [n for n in folded.graph.node if n.op_type == "BatchNormalization"]
    assert kept.name.startswith("bad_bn")
    # The kept BN still reads the original (invalid) statistics, untouched.
    values = {t.name: onnx.numpy_helper.to_array(t) for t in folded.graph.initializer}
    originals = {t.name: onnx.numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer}
    for name in kept.input[1:]:
        np.testing.assert_array_equal(values[name], originals[name])


def test_cli_runner_does_not_leak_cwd_files(tmp_path, monkeypatch):
    """Bad input given as a relative path: nothing appears in the working directory either."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "bad.onnx").write_bytes(b"\xff" * 10)
    before = snapshot(tmp_path)
    assert_bad_input(run_cli("runner", ["bad.onnx"]))
    assert snapshot(tmp_path) == before
    assert os.listdir(tmp_path) == ["bad.onnx"]


@pytest.mark.parametrize("kind", INVALID_KINDS)
def test_invalid_bn_params_quiet_is_silent(tmp_path, kind):
    """-q on success prints nothing, even when outputs contain NaN/Inf in the same places (no numpy
    RuntimeWarning leaking onto stderr)."""
    path = tmp_path / f"{kind}.onnx"
    onnx.save_model(invalid_bn_model(kind), str(path))
    outcome = run_cli("subprocess", [path, "-q"])
    assert outcome.code == 0, outcome
    assert outcome.stdout == "" and outcome.stderr == "", outcome
