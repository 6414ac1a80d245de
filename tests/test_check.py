"""`bnfold check` and the check API: exit codes, --verify, --quiet, --json, over one model and over
folders (-j 2 through a real subprocess, never an in-process fork); `check` writes nothing."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from cli_helpers import (
    SAMPLES_DIR,
    assert_one_error_line,
    bn_count,
    copy_sample,
    random_bytes,
    run_module,
    summary_rows,
    tree,
)
from helpers import invoke
from onnx import helper

import bnfold
from benchmarks.graph_builder import GraphBuilder


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


# --- bnfold check over folders -----------------------------------------------------------------


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
