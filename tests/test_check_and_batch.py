"""`bnfold check`, the check API, runs over many models (files, folders, -j), the pre-commit hook
and Git LFS pointers.

Single-model fold behaviour is covered by test_cli.py; this file is about the gate (`check`) and
batches. Parallel runs (-j 2) go through a real subprocess, never an in-process fork.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from helpers import invoke
from onnx import helper
from test_cli import drop_epsilon  # noqa: F401 - pytest fixture, reused

import bnfold
from benchmarks.graph_builder import GraphBuilder

ROOT = Path(__file__).resolve().parents[1]
SAMPLES_DIR = ROOT / "sample_models"
LFS_POINTER = ("version https://git-lfs.github.com/spec/v1\n"
               "oid sha256:4d7a214614ab2935c943f9e0ff69d22eadbb8f32b1258daaa5e2ca24d17e2393\n"
               "size 81631\n")


# --- helpers -------------------------------------------------------------------------------------


def copy_sample(folder: Path, name: str, as_name: str | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / (as_name or name)
    shutil.copyfile(SAMPLES_DIR / name, target)
    return target




def run_module(args: list, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "bnfold", *map(str, args)], check=False, capture_output=True,
                          text=True, cwd=cwd, timeout=120)


def tree(folder: Path) -> dict[str, bytes]:
    """Every file below `folder` (recursively), by relative path, with its content."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def assert_one_error_line(stderr: str) -> None:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got {lines!r}"
    assert lines[0].startswith("bnfold: error:"), lines[0]
    assert "Traceback" not in stderr


def bn_count(path: Path) -> int:
    return sum(node.op_type == "BatchNormalization" for node in onnx.load(str(path)).graph.node)


def training_mode_model(path: Path) -> Path:
    """Conv -> BN-15 with training_mode=1 and its three outputs (y, running_mean, running_var)."""
    g = GraphBuilder(np.random.default_rng(3), opset=15)
    x = g.input("x", [2, 3, 8, 8])
    conv = g.conv(x, 3, 4, pads=[1, 1, 1, 1])
    params = g.bn_params(4)
    g.nodes.append(helper.make_node("BatchNormalization", [conv, *params], ["y", "running_mean", "running_var"],
                                    name="bn_train", training_mode=1))
    model = g.model(["y"])
    onnx.save(model, str(path))
    return path


def random_bytes(path: Path, size: int = 777, seed: int = 0) -> Path:
    path.write_bytes(np.random.default_rng(seed).integers(0, 256, size, dtype=np.uint8).tobytes())
    return path


def summary_rows(stdout: str) -> list[str]:
    """The rows of the summary table printed after a run over several models."""
    lines = stdout.splitlines()
    header = [i for i, line in enumerate(lines) if line.startswith("model") and "BN before" in line]
    assert header, f"no summary table in stdout:\n{stdout}"
    return lines[header[-1] + 1:]


# --- bnfold check: exit codes ----------------------------------------------------------------------


def test_check_foldable_model_exits_1(tmp_path):
    model = copy_sample(tmp_path, "resnet_tiny.onnx")
    result = invoke(["check", model])
    assert result.exit_code == 1, (result.stdout, result.stderr)
    for node in ("stem.bn", "block1.bn1", "block1.bn2", "down.bn"):
        assert node in result.stdout
    assert "branch.bn" not in result.stdout  # skipped for a reason: not a problem for the gate
    assert "Traceback" not in result.stdout + result.stderr


def test_check_folded_model_exits_0(tmp_path):
    model = copy_sample(tmp_path, "resnet_tiny.onnx")
    assert invoke([model, "-q"]).exit_code == 0
    folded = tmp_path / "resnet_tiny.folded.onnx"
    assert bn_count(folded) == 1  # branch.bn remains, but it is not foldable
    result = invoke(["check", folded])
    assert result.exit_code == 0, (result.stdout, result.stderr)
    assert "ok" in result.stdout


def test_check_model_without_bn_exits_0(tmp_path):
    model = copy_sample(tmp_path, "no_bn.onnx")
    result = invoke(["check", model])
    assert result.exit_code == 0, (result.stdout, result.stderr)
    assert result.stderr == ""


def test_check_training_mode_exits_1_and_names_the_node(tmp_path):
    model = training_mode_model(tmp_path / "train.onnx")
    result = invoke(["check", model])
    assert result.exit_code == 1, (result.stdout, result.stderr)
    assert "bn_train" in result.stdout
    assert "training" in result.stdout


def test_check_training_mode_json(tmp_path):
    model = training_mode_model(tmp_path / "train.onnx")
    result = invoke(["check", model, "--json"])
    assert result.exit_code == 1
    data = json.loads(result.stdout)
    assert data["exit_code"] == 1
    assert data["command"] == "check"
    assert [(r["node"], r["reason"]) for r in data["skipped"]] == [("bn_train", "training_mode")]
    assert any("bn_train" in line and "training" in line for line in data["findings"])


def test_check_missing_file_exits_2(tmp_path):
    result = invoke(["check", tmp_path / "missing.onnx"])
    assert result.exit_code == 2
    assert_one_error_line(result.stderr)
    assert "missing.onnx" in result.stderr
    assert result.stdout == ""


def test_check_garbage_exits_2(tmp_path):
    model = random_bytes(tmp_path / "garbage.onnx")
    result = invoke(["check", model])
    assert result.exit_code == 2
    assert_one_error_line(result.stderr)
    assert "garbage.onnx" in result.stderr
    assert result.stdout == ""


def test_check_garbage_subprocess_exits_2(tmp_path):
    random_bytes(tmp_path / "garbage.onnx", seed=4)
    process = run_module(["check", "garbage.onnx"], cwd=tmp_path)
    assert process.returncode == 2
    assert_one_error_line(process.stderr)
    assert process.stdout == ""


@pytest.mark.parametrize("extra", [[], ["--verify"], ["--json"], ["-q"], ["--verify", "--iterations", "2"]])
def test_check_writes_nothing(tmp_path, extra):
    copy_sample(tmp_path, "resnet_tiny.onnx")
    copy_sample(tmp_path, "no_bn.onnx")
    training_mode_model(tmp_path / "train.onnx")
    before = tree(tmp_path)
    result = invoke(["check", tmp_path, *extra])
    assert result.exit_code == 1, (result.stdout, result.stderr)
    assert tree(tmp_path) == before


def test_check_without_verify_does_not_verify(tmp_path):
    model = copy_sample(tmp_path, "no_bn.onnx")
    data = json.loads(invoke(["check", model, "--json"]).stdout)
    assert data["verification"] is None
    assert data["verified"] is False


def test_check_verify_runs_verification(tmp_path):
    model = copy_sample(tmp_path, "resnet_tiny.onnx")
    result = invoke(["check", "--verify", model, "--json"])
    assert result.exit_code == 1  # still foldable BNs
    data = json.loads(result.stdout)
    verification = data["verification"]
    assert verification is not None
    assert data["verified"] is True
    assert verification["passed"] is True
    assert [o["name"] for o in verification["outputs"]] == ["logits"]


def test_check_verify_clean_model_exits_0(tmp_path):
    model = copy_sample(tmp_path, "no_bn.onnx")
    result = invoke(["check", "--verify", model, "--json"])
    assert result.exit_code == 0, (result.stdout, result.stderr)
    assert json.loads(result.stdout)["verification"]["passed"] is True


@pytest.mark.usefixtures("drop_epsilon")
def test_check_verify_reports_a_wrong_fold(tmp_path):
    model = copy_sample(tmp_path, "mlp_bn1d.onnx")
    before = tree(tmp_path)
    result = invoke(["check", "--verify", model, "--json"])
    assert result.exit_code == 1
    data = json.loads(result.stdout)
    assert data["verification"]["passed"] is False
    assert any(line.startswith("verification:") for line in data["findings"])
    assert tree(tmp_path) == before


def test_check_quiet_clean_prints_nothing(tmp_path):
    model = copy_sample(tmp_path, "no_bn.onnx")
    result = invoke(["check", "-q", model])
    assert result.exit_code == 0
    assert result.stdout == "" and result.stderr == ""


def test_check_quiet_prints_only_problems(tmp_path):
    dirty = copy_sample(tmp_path, "resnet_tiny.onnx")
    clean = copy_sample(tmp_path, "no_bn.onnx")
    result = invoke(["check", "-q", dirty, clean])
    assert result.exit_code == 1
    lines = result.stdout.splitlines()
    assert len(lines) == 4, lines  # one per foldable BN of resnet_tiny, nothing else
    assert all(line.startswith(f"{dirty}: ") and "foldable BatchNormalization" in line for line in lines)
    assert "no_bn" not in result.stdout
    assert "BN before" not in result.stdout  # no summary table
    assert result.stderr == ""


def test_check_json_is_one_object(tmp_path):
    model = copy_sample(tmp_path, "resnet_tiny.onnx")
    result = invoke(["check", model, "--json"])
    assert result.exit_code == 1
    data = json.loads(result.stdout)  # raises on anything but one JSON document
    assert isinstance(data, dict)
    assert data["command"] == "check"
    assert data["exit_code"] == 1
    assert data["output_path"] is None
    assert len(data["findings"]) == 4


def test_check_json_many_models(tmp_path):
    dirty = copy_sample(tmp_path, "resnet_tiny.onnx")
    clean = copy_sample(tmp_path, "no_bn.onnx")
    result = invoke(["check", dirty, clean, "--json"])
    assert result.exit_code == 1
    data = json.loads(result.stdout)
    assert data["command"] == "check" and data["exit_code"] == 1
    assert [(m["input_path"], m["exit_code"]) for m in data["models"]] == [(str(dirty), 1), (str(clean), 0)]


def test_check_json_subprocess_stdout_is_one_object(tmp_path):
    copy_sample(tmp_path, "bn_first.onnx")
    process = run_module(["check", "bn_first.onnx", "--json"], cwd=tmp_path)
    assert process.returncode == 1, process.stderr
    data = json.loads(process.stdout)
    assert data["command"] == "check"
    assert {line.split(":")[0] for line in data["findings"]} == {"in.bn", "bn2"}


# --- the Python API --------------------------------------------------------------------------------


def test_api_check_foldable():
    checked = bnfold.check(SAMPLES_DIR / "resnet_tiny.onnx")
    assert isinstance(checked, bnfold.CheckResult)
    assert {r.node for r in checked.foldable} == {"stem.bn", "block1.bn1", "block1.bn2", "down.bn"}
    assert all(r.op_type == "BatchNormalization" for r in checked.foldable)
    assert checked.training == []
    assert checked.clean is False


def test_api_check_clean():
    checked = bnfold.check(str(SAMPLES_DIR / "no_bn.onnx"))
    assert checked.foldable == [] and checked.training == []
    assert checked.clean is True


def test_api_check_training(tmp_path):
    checked = bnfold.check(training_mode_model(tmp_path / "train.onnx"))
    assert checked.foldable == []
    assert [r.node for r in checked.training] == ["bn_train"]
    assert checked.training[0].reason == bnfold.Reason.TRAINING_MODE
    assert checked.clean is False


def test_api_check_model_proto_is_not_mutated():
    model = onnx.load(str(SAMPLES_DIR / "bn_first.onnx"))
    before = model.SerializeToString()
    checked = bnfold.check(model)
    assert len(checked.foldable) == 2 and not checked.clean
    assert model.SerializeToString() == before


def test_api_check_with_verify():
    checked = bnfold.check(SAMPLES_DIR / "no_bn.onnx", verify=True)
    assert checked.report.verification is not None and checked.report.verification.passed
    assert checked.clean


def test_api_check_bad_input(tmp_path):
    with pytest.raises(bnfold.BadInputError):
        bnfold.check(random_bytes(tmp_path / "x.onnx"))


# --- many models ----------------------------------------------------------------------------------


def test_files_and_folder_into_output_folder(tmp_path):
    a = copy_sample(tmp_path, "resnet_tiny.onnx")
    b = copy_sample(tmp_path, "bn_first.onnx")
    folder = tmp_path / "more"
    copy_sample(folder, "mlp_bn1d.onnx")
    copy_sample(folder / "deep" / "er", "grouped_depthwise.onnx")
    out = tmp_path / "outdir"
    inputs_before = tree(tmp_path)
    result = invoke([a, b, folder, "-o", out])
    assert result.exit_code == 0, (result.stdout, result.stderr)
    assert sorted(p.name for p in out.iterdir()) == ["bn_first.onnx", "grouped_depthwise.onnx", "mlp_bn1d.onnx",
                                                      "resnet_tiny.onnx"]
    expected_bn = {"resnet_tiny.onnx": 1, "bn_first.onnx": 0, "mlp_bn1d.onnx": 0, "grouped_depthwise.onnx": 0}
    for name, count in expected_bn.items():
        onnx.checker.check_model(str(out / name), full_check=True)
        assert bn_count(out / name) == count, name
    # inputs untouched, nothing written beside them
    assert {k: v for k, v in tree(tmp_path).items() if not k.startswith("outdir")} == inputs_before


def test_output_folder_is_created(tmp_path):
    copy_sample(tmp_path / "in", "bn_first.onnx")
    copy_sample(tmp_path / "in", "no_bn.onnx")
    out = tmp_path / "new" / "nested"
    result = invoke([tmp_path / "in", "-o", out, "-q"])
    assert result.exit_code == 0, result.stderr
    assert sorted(p.name for p in out.iterdir()) == ["bn_first.onnx", "no_bn.onnx"]


def test_folder_search_is_recursive_and_skips_folded(tmp_path):
    folder = tmp_path / "models"
    copy_sample(folder, "bn_first.onnx")
    copy_sample(folder / "a" / "b", "mlp_bn1d.onnx")
    copy_sample(folder / "a", "resnet_tiny.onnx", as_name="old.folded.onnx")  # a previous result
    (folder / "a" / "notes.txt").write_text("not a model")
    (folder / "a" / "model.onnx.bak").write_bytes(b"junk")
    out = tmp_path / "out"
    result = invoke([folder, "-o", out, "--json"])
    assert result.exit_code == 0, (result.stdout, result.stderr)
    data = json.loads(result.stdout)
    assert sorted(Path(m["input_path"]).name for m in data["models"]) == ["bn_first.onnx", "mlp_bn1d.onnx"]
    assert sorted(p.name for p in out.iterdir()) == ["bn_first.onnx", "mlp_bn1d.onnx"]


def test_folder_without_output_writes_beside_and_second_run_skips_results(tmp_path):
    folder = tmp_path / "models"
    copy_sample(folder, "bn_first.onnx")
    copy_sample(folder / "sub", "no_bn.onnx")
    assert invoke([folder, "-q"]).exit_code == 0
    assert (folder / "bn_first.folded.onnx").is_file()
    assert (folder / "sub" / "no_bn.folded.onnx").is_file()
    after_first = tree(folder)
    result = invoke([folder, "--json"])
    assert result.exit_code == 0, result.stderr
    data = json.loads(result.stdout)
    assert sorted(Path(m["input_path"]).name for m in data["models"]) == ["bn_first.onnx", "no_bn.onnx"]
    assert set(tree(folder)) == set(after_first)  # no *.folded.folded.onnx


def test_single_folder_with_one_model_is_a_batch(tmp_path):
    """A folder argument makes a batch even when it holds one model: -o is a folder, and --json has
    the batch shape ({"models": [...]}), so a CI script's parser does not depend on the folder's
    contents."""
    folder = tmp_path / "models"
    copy_sample(folder, "bn_first.onnx")
    out = tmp_path / "out"
    result = invoke([folder, "-o", out, "--json"])
    assert result.exit_code == 0, result.stderr
    assert (out / "bn_first.onnx").is_file()
    data = json.loads(result.stdout)
    assert "models" in data, f"folder run printed a single-model report: {sorted(data)}"
    assert [Path(m["input_path"]).name for m in data["models"]] == ["bn_first.onnx"]


def test_empty_folder_is_bad_input(tmp_path):
    (tmp_path / "empty").mkdir()
    for command in (["fold"], ["check"]):
        result = invoke([*command, tmp_path / "empty"])
        assert result.exit_code == 2, command
        assert_one_error_line(result.stderr)


def test_parallel_run_with_a_broken_model(tmp_path):
    folder = tmp_path / "models"
    good = ["resnet_tiny.onnx", "bn_first.onnx", "conv_mul_add.onnx"]
    copy_sample(folder, good[0])
    copy_sample(folder / "sub", good[1])
    copy_sample(folder / "sub" / "deeper", good[2])
    random_bytes(folder / "sub" / "broken.onnx", size=2048, seed=11)
    process = run_module(["models", "-j", "2", "-o", "out"], cwd=tmp_path)
    assert process.returncode == 2, (process.stdout, process.stderr)
    assert "Traceback" not in process.stdout + process.stderr
    # every good model written, the broken one not
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(good)
    for name in good:
        onnx.checker.check_model(str(tmp_path / "out" / name), full_check=True)
    # the broken model is reported on stderr, on one line
    errors = [line for line in process.stderr.splitlines() if line.strip()]
    assert len(errors) == 1 and errors[0].startswith("bnfold: error:"), errors
    assert "broken.onnx" in errors[0]
    # a summary table listing every model, with its exit code
    rows = summary_rows(process.stdout)
    models = ["models/resnet_tiny.onnx", "models/sub/bn_first.onnx", "models/sub/broken.onnx",
              "models/sub/deeper/conv_mul_add.onnx"]
    assert len(rows) == len(models), rows
    for model in models:
        (row,) = [r for r in rows if r.split()[0] == model]
        assert row.split()[3] == ("2" if "broken" in model else "0"), row


def test_parallel_run_json(tmp_path):
    folder = tmp_path / "models"
    copy_sample(folder, "resnet_tiny.onnx")
    copy_sample(folder, "mlp_bn1d.onnx")
    copy_sample(folder / "sub", "no_bn.onnx")
    random_bytes(folder / "sub" / "broken.onnx", size=500, seed=5)
    process = run_module(["models", "-j", "2", "-o", "out", "--json"], cwd=tmp_path)
    assert process.returncode == 2, process.stderr
    data = json.loads(process.stdout)
    assert data["command"] == "fold" and data["exit_code"] == 2
    codes = {Path(m["input_path"]).name: m["exit_code"] for m in data["models"]}
    assert codes == {"resnet_tiny.onnx": 0, "mlp_bn1d.onnx": 0, "no_bn.onnx": 0, "broken.onnx": 2}
    by_name = {Path(m["input_path"]).name: m for m in data["models"]}
    assert "broken.onnx" in by_name["broken.onnx"]["error"]
    assert by_name["resnet_tiny.onnx"]["error"] is None
    written = tmp_path / by_name["resnet_tiny.onnx"]["output_path"]
    assert written.resolve() == (tmp_path / "out" / "resnet_tiny.onnx").resolve()
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["mlp_bn1d.onnx", "no_bn.onnx",
                                                                      "resnet_tiny.onnx"]


def test_parallel_and_serial_runs_write_identical_files(tmp_path):
    folder = tmp_path / "models"
    for name in ("resnet_tiny.onnx", "grouped_depthwise.onnx", "convtranspose_decoder.onnx"):
        copy_sample(folder, name)
    serial = run_module(["models", "-j", "1", "-o", "serial", "-q"], cwd=tmp_path)
    parallel = run_module(["models", "-j", "2", "-o", "parallel", "-q"], cwd=tmp_path)
    assert serial.returncode == parallel.returncode == 0, (serial.stderr, parallel.stderr)
    assert tree(tmp_path / "serial") == tree(tmp_path / "parallel")
    assert len(tree(tmp_path / "serial")) == 3


@pytest.mark.usefixtures("drop_epsilon")
def test_worst_exit_code_with_a_failed_verification(tmp_path):
    """One model fails verification (1), one is fine (0): the run exits 1, the good one is written.
    (The patch breaks every BN fold, so the good model is one without BN.)"""
    copy_sample(tmp_path / "in", "mlp_bn1d.onnx")
    copy_sample(tmp_path / "in", "no_bn.onnx")
    out = tmp_path / "out"
    result = invoke([tmp_path / "in", "-o", out, "--json"])
    assert result.exit_code == 1, (result.stdout, result.stderr)
    codes = {Path(m["input_path"]).name: m["exit_code"] for m in json.loads(result.stdout)["models"]}
    assert codes == {"mlp_bn1d.onnx": 1, "no_bn.onnx": 0}
    assert sorted(p.name for p in out.iterdir()) == ["no_bn.onnx"]
    assert "verification failed" in result.stderr


def test_check_folder_parallel(tmp_path):
    folder = tmp_path / "models"
    copy_sample(folder, "resnet_tiny.onnx")
    copy_sample(folder / "sub", "no_bn.onnx")
    copy_sample(folder / "sub", "bn_first.onnx", as_name="bn_first.folded.onnx")  # check does not skip these
    training_mode_model(folder / "sub" / "train.onnx")
    before = tree(tmp_path)
    process = run_module(["check", "models", "-j", "2"], cwd=tmp_path)
    assert process.returncode == 1, (process.stdout, process.stderr)
    assert process.stderr == ""
    rows = summary_rows(process.stdout)
    expected = {"models/resnet_tiny.onnx": "1", "models/sub/bn_first.folded.onnx": "1",
                "models/sub/no_bn.onnx": "0", "models/sub/train.onnx": "1"}
    assert {r.split()[0]: r.split()[3] for r in rows} == expected
    assert "bn_train" in process.stdout
    assert tree(tmp_path) == before


def test_check_folder_parallel_json_and_clean_folder(tmp_path):
    folder = tmp_path / "clean"
    copy_sample(folder, "no_bn.onnx")
    (folder / "x").mkdir()
    assert invoke([SAMPLES_DIR / "resnet_tiny.onnx", "-o", folder / "x" / "resnet_folded.onnx", "-q"]).exit_code == 0
    process = run_module(["check", "clean", "-j", "2", "--json"], cwd=tmp_path)
    assert process.returncode == 0, (process.stdout, process.stderr)
    data = json.loads(process.stdout)
    assert data["command"] == "check" and data["exit_code"] == 0
    assert sorted(m["exit_code"] for m in data["models"]) == [0, 0]


def test_check_folder_with_broken_model(tmp_path):
    folder = tmp_path / "models"
    copy_sample(folder, "no_bn.onnx")
    random_bytes(folder / "broken.onnx", seed=9)
    process = run_module(["check", "models", "-j", "2", "--json"], cwd=tmp_path)
    assert process.returncode == 2
    data = json.loads(process.stdout)
    assert {Path(m["input_path"]).name: m["exit_code"] for m in data["models"]} == {"no_bn.onnx": 0,
                                                                                   "broken.onnx": 2}
    errors = process.stderr.strip().splitlines()
    assert len(errors) == 1 and "broken.onnx" in errors[0]


def test_output_folder_with_shared_file_names_exits_2(tmp_path):
    copy_sample(tmp_path / "a", "no_bn.onnx")
    copy_sample(tmp_path / "b", "no_bn.onnx")
    before = tree(tmp_path)
    result = invoke([tmp_path / "a", tmp_path / "b", "-o", tmp_path / "out"])
    assert result.exit_code == 2, (result.stdout, result.stderr)
    assert_one_error_line(result.stderr)
    assert tree(tmp_path) == before  # no model written anywhere


def test_output_folder_with_shared_file_names_creates_no_folder(tmp_path):
    """A refused run (exit 2) should leave no trace, not even an empty output folder."""
    copy_sample(tmp_path / "a", "no_bn.onnx")
    copy_sample(tmp_path / "b", "no_bn.onnx")
    result = invoke([tmp_path / "a" / "no_bn.onnx", tmp_path / "b" / "no_bn.onnx", "-o", tmp_path / "out"])
    assert result.exit_code == 2
    assert not (tmp_path / "out").exists()


def test_summary_table_not_printed_for_one_model_or_quiet(tmp_path):
    model = copy_sample(tmp_path, "bn_first.onnx")
    single = invoke([model, "-o", tmp_path / "single.onnx"])
    assert single.exit_code == 0 and "BN before" not in single.stdout
    copy_sample(tmp_path / "in", "bn_first.onnx")
    copy_sample(tmp_path / "in", "no_bn.onnx")
    quiet = invoke([tmp_path / "in", "-o", tmp_path / "out", "-q"])
    assert quiet.exit_code == 0 and quiet.stdout == "" and quiet.stderr == ""
    loud = invoke([tmp_path / "in", "-o", tmp_path / "out2"])
    rows = summary_rows(loud.stdout)
    assert len(rows) == 2 and all(r.split()[3] == "0" for r in rows)


# --- pre-commit hook ------------------------------------------------------------------------------


def parse_hooks(text: str) -> list[dict[str, str]]:
    """The hook file: yaml if available, else a minimal parser for a flat list of `key: value` maps."""
    try:
        import yaml
    except ImportError:
        yaml = None
    if yaml is not None:
        return yaml.safe_load(text)
    hooks: list[dict[str, str]] = []
    for raw in text.splitlines():
        line = raw.split(" #")[0].rstrip()
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        if line.startswith("- "):
            hooks.append({})
            line = line[2:]
        key, sep, value = line.strip().partition(":")
        assert sep and hooks, f"unexpected line {raw!r}"
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        hooks[-1][key.strip()] = value
    return hooks


def bnfold_check_hook() -> dict:
    hooks = parse_hooks((ROOT / ".pre-commit-hooks.yaml").read_text())
    assert isinstance(hooks, list)
    (hook,) = [h for h in hooks if h.get("id") == "bnfold-check"]
    return hook


def test_pre_commit_hook_declaration():
    hook = bnfold_check_hook()
    assert hook["entry"].startswith("bnfold check")
    assert hook["language"] == "python"
    assert hook["name"]
    pattern = re.compile(hook["files"])
    assert pattern.search("models/a.onnx") and pattern.search("x.folded.onnx")
    assert not pattern.search("a.onnx.txt") and not pattern.search("onnx/readme.md")


def test_pre_commit_hook_entry_runs(tmp_path):
    """pre-commit runs `entry` followed by the staged file names."""
    script = Path(sys.executable).parent / "bnfold"
    if not script.exists():
        script = shutil.which("bnfold")
        if script is None:
            pytest.skip("bnfold console script not installed")
    entry = shlex.split(bnfold_check_hook()["entry"])
    assert entry[0] == "bnfold"
    copy_sample(tmp_path, "no_bn.onnx")
    copy_sample(tmp_path, "resnet_tiny.onnx")
    before = tree(tmp_path)

    def run(*files: str) -> subprocess.CompletedProcess:
        return subprocess.run([str(script), *entry[1:], *files], cwd=tmp_path, check=False, capture_output=True,
                              text=True, timeout=120)

    clean = run("no_bn.onnx")
    assert clean.returncode == 0, clean.stderr
    dirty = run("no_bn.onnx", "resnet_tiny.onnx")
    assert dirty.returncode == 1, dirty.stderr
    assert "resnet_tiny.onnx" in dirty.stdout and "stem.bn" in dirty.stdout
    assert tree(tmp_path) == before


# --- Git LFS pointers -----------------------------------------------------------------------------


@pytest.mark.parametrize("command", [[], ["fold"], ["check"], ["check", "--verify"]])
def test_lfs_pointer_is_reported(tmp_path, command):
    pointer = tmp_path / "model.onnx"
    pointer.write_text(LFS_POINTER)
    before = tree(tmp_path)
    result = invoke([*command, pointer])
    assert result.exit_code == 2, (result.stdout, result.stderr)
    assert_one_error_line(result.stderr)
    assert "Git LFS" in result.stderr
    assert "model.onnx" in result.stderr
    assert tree(tmp_path) == before


@pytest.mark.parametrize("command", ["fold", "check"])
def test_lfs_pointer_in_a_batch(tmp_path, command):
    folder = tmp_path / "models"
    copy_sample(folder, "no_bn.onnx")
    (folder / "big.onnx").write_text(LFS_POINTER)
    args = [command, folder, "--json"] + (["-o", tmp_path / "out"] if command == "fold" else [])
    result = invoke(args)
    assert result.exit_code == 2
    by_name = {Path(m["input_path"]).name: m for m in json.loads(result.stdout)["models"]}
    assert by_name["no_bn.onnx"]["exit_code"] == 0
    assert by_name["big.onnx"]["exit_code"] == 2
    assert "Git LFS" in by_name["big.onnx"]["error"]
    assert "Git LFS" in result.stderr


def test_lfs_pointer_api():
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        pointer = Path(folder) / "m.onnx"
        pointer.write_text(LFS_POINTER)
        for call in (bnfold.fold, bnfold.check):
            with pytest.raises(bnfold.BadInputError, match="Git LFS"):
                call(pointer)
