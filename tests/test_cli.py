"""End-to-end tests of the `bnfold` command line: exit codes, output files, --json, flags.

Most tests use click's CliRunner (in-process, so a fold can be broken by monkeypatching); a few run
`python -m bnfold` in a real subprocess to check exit codes and stdout/stderr as a pipeline sees them.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from cli_helpers import bn_count, copy_sample, files_in, run_module
from helpers import invoke, sample_model_names

import bnfold
from bnfold.report import Reason

SAMPLES = sample_model_names()
FP32_SAMPLES = [name for name in SAMPLES if name != "fp16_cnn.onnx"]

# BatchNormalization nodes left after folding each sample (sample_models/README.md). mlp_bn1d's bn3
# folds only if MatMul+Add is supported; otherwise it must be skipped with a reason.
EXPECTED_BN_LEFT = {
    "resnet_tiny.onnx": {1},
    "grouped_depthwise.onnx": {0},
    "convtranspose_decoder.onnx": {0},
    "mlp_bn1d.onnx": {0, 1},
    "fp16_cnn.onnx": {0},
    "no_bn.onnx": {0},
    "bn_first.onnx": {0},
    "conv_mul_add.onnx": {0},
}


def test_sample_list_is_complete():
    assert set(SAMPLES) == set(EXPECTED_BN_LEFT)


def assert_one_error_line(stderr: str) -> None:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got {lines!r}"
    assert lines[0].startswith("bnfold: error:"), lines[0]


def symbolic_input_shape(path: Path, batch: int = 3) -> str:
    """`--input-shape` value for the sample's input: the symbolic batch dim set to `batch`."""
    model = onnx.load(str(path))
    (value,) = model.graph.input
    dims = [d.dim_value if d.HasField("dim_value") else batch for d in value.type.tensor_type.shape.dim]
    assert not value.type.tensor_type.shape.dim[0].HasField("dim_value"), "sample batch dim should be symbolic"
    return f"{value.name}:{','.join(map(str, dims))}"


# --- every sample ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", SAMPLES)
def test_each_sample_folds_with_default_output_name(tmp_path, name):
    model = copy_sample(tmp_path, name)
    original_bytes = model.read_bytes()
    result = invoke([model])
    assert result.exit_code == 0, result.stderr
    output = tmp_path / (model.stem + ".folded.onnx")
    assert output.is_file()
    onnx.checker.check_model(str(output), full_check=True)
    assert bn_count(output) in EXPECTED_BN_LEFT[name]
    assert model.read_bytes() == original_bytes
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([name, output.name])  # no temp files


@pytest.mark.parametrize("name", SAMPLES)
def test_each_sample_json_report(tmp_path, name):
    model = copy_sample(tmp_path, name)
    result = invoke([model, "--json"])
    assert result.exit_code == 0, result.stderr
    data = json.loads(result.stdout)
    assert isinstance(data, dict)
    assert data["schema_version"] == 1
    assert data["passed"] is True
    before, after = data["ops_before"], data["ops_after"]
    assert after.get("BatchNormalization", 0) in EXPECTED_BN_LEFT[name]
    bn_folded = [r for r in data["folded"] if r["op_type"] == "BatchNormalization"]
    bn_skipped = [r for r in data["skipped"] if r["op_type"] == "BatchNormalization"]
    assert len(bn_folded) + len(bn_skipped) == before.get("BatchNormalization", 0)
    assert len(bn_skipped) == after.get("BatchNormalization", 0)
    codes = {reason.value for reason in Reason}
    for record in data["skipped"]:
        assert record["reason"] in codes
        assert record["detail"]
    verification = data["verification"]
    assert verification["passed"] is True
    assert verification["outputs"], "no outputs compared"
    for output in verification["outputs"]:
        assert isinstance(output["max_abs_error"], float)
        assert output["passed"] is True


def test_json_schema_for_resnet_tiny(tmp_path):
    model = copy_sample(tmp_path, "resnet_tiny.onnx")
    result = invoke([model, "--json", "-o", tmp_path / "out.onnx"])
    assert result.exit_code == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["schema_version"] == 1
    assert {r["node"] for r in data["folded"]} == {"stem.bn", "block1.bn1", "block1.bn2", "down.bn"}
    assert [(r["node"], r["reason"]) for r in data["skipped"]] == [
        ("branch.bn", Reason.PRODUCER_HAS_OTHER_CONSUMERS.value)]
    assert data["ops_before"]["BatchNormalization"] == 5
    assert data["ops_after"]["BatchNormalization"] == 1
    assert data["ops_before"]["Conv"] == data["ops_after"]["Conv"] == 5
    assert [o["name"] for o in data["verification"]["outputs"]] == ["logits"]
    assert data["verification"]["outputs"][0]["max_abs_error"] < 1e-4
    assert data["verification"]["passed"] is True
    assert data["passed"] is True
    assert Path(data["output_path"]).resolve() == (tmp_path / "out.onnx").resolve()


def test_output_option(tmp_path):
    model = copy_sample(tmp_path, "grouped_depthwise.onnx")
    (tmp_path / "sub").mkdir()
    target = tmp_path / "sub" / "result.onnx"
    result = invoke([model, "-o", target])
    assert result.exit_code == 0, result.stderr
    assert target.is_file() and bn_count(target) == 0
    assert not (tmp_path / "grouped_depthwise.folded.onnx").exists()
    assert sorted(p.name for p in (tmp_path / "sub").iterdir()) == ["result.onnx"]


def test_output_option_long_form_overwrites_existing_file(tmp_path):
    model = copy_sample(tmp_path, "bn_first.onnx")
    target = tmp_path / "existing.onnx"
    target.write_bytes(b"old content")
    result = invoke([model, "--output", target])
    assert result.exit_code == 0, result.stderr
    assert bn_count(target) == 0


def test_no_bn_is_success(tmp_path):
    model = copy_sample(tmp_path, "no_bn.onnx")
    result = invoke([model, "--json"])
    assert result.exit_code == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["folded"] == [] and data["skipped"] == []
    assert data["ops_before"] == data["ops_after"]
    assert data["verification"]["passed"] is True
    output = tmp_path / "no_bn.folded.onnx"
    assert output.is_file()
    original, folded = onnx.load(str(model)), onnx.load(str(output))
    assert [n.op_type for n in original.graph.node] == [n.op_type for n in folded.graph.node]


def test_no_verify(tmp_path):
    model = copy_sample(tmp_path, "resnet_tiny.onnx")
    result = invoke([model, "--no-verify", "--json"])
    assert result.exit_code == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["verification"] is None
    assert data["ops_after"]["BatchNormalization"] == 1
    assert (tmp_path / "resnet_tiny.folded.onnx").is_file()


def test_seed_is_recorded(tmp_path):
    model = copy_sample(tmp_path, "mlp_bn1d.onnx")
    result = invoke([model, "--seed", "1234", "--json"])
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["verification"]["seed"] == 1234


def test_seed_changes_inputs_not_result(tmp_path):
    model = copy_sample(tmp_path, "mlp_bn1d.onnx")
    first = json.loads(invoke([model, "--seed", "1", "--json", "-o", tmp_path / "a.onnx"]).stdout)
    second = json.loads(invoke([model, "--seed", "2", "--json", "-o", tmp_path / "b.onnx"]).stdout)
    assert first["verification"]["seed"] == 1 and second["verification"]["seed"] == 2
    assert (tmp_path / "a.onnx").read_bytes() == (tmp_path / "b.onnx").read_bytes()


def test_negative_seed_is_a_usage_error(tmp_path):
    model = copy_sample(tmp_path, "mlp_bn1d.onnx")
    before = files_in(tmp_path)
    result = invoke([model, "--seed", "-1"])
    assert result.exit_code == 2
    assert "--seed" in result.stderr and "Traceback" not in result.stdout + result.stderr
    assert files_in(tmp_path) == before


# --- --input-shape ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", SAMPLES)
def test_input_shape_for_symbolic_batch(tmp_path, name):
    model = copy_sample(tmp_path, name)
    shape = symbolic_input_shape(model, batch=3)
    result = invoke([model, "--input-shape", shape, "--json"])
    assert result.exit_code == 0, result.stderr
    data = json.loads(result.stdout)
    input_name, dims = shape.split(":")
    assert data["verification"]["input_shapes"] == {input_name: [int(d) for d in dims.split(",")]}
    assert data["verification"]["passed"] is True


@pytest.mark.parametrize("value", ["input", "input:3,x,32,32", "input:0,3,32,32", "input:-1,3,32,32",
                                   ":1,3,32,32", "input:3,,32,32", "input:3.5,3,32,32", "input:"])
def test_malformed_input_shape(tmp_path, value):
    model = copy_sample(tmp_path, "resnet_tiny.onnx")
    before = files_in(tmp_path)
    result = invoke([model, "--input-shape", value])
    assert result.exit_code == 2, (result.stdout, result.stderr)
    assert_one_error_line(result.stderr)
    assert "input-shape" in result.stderr
    assert files_in(tmp_path) == before


def test_input_shape_unknown_input(tmp_path):
    model = copy_sample(tmp_path, "resnet_tiny.onnx")
    before = files_in(tmp_path)
    result = invoke([model, "--input-shape", "images:1,3,32,32"])
    assert result.exit_code == 2, (result.stdout, result.stderr)
    assert_one_error_line(result.stderr)
    assert "images" in result.stderr
    assert files_in(tmp_path) == before


def test_input_shape_of_wrong_rank_is_bad_input(tmp_path):
    """A well-formed shape onnxruntime rejects for the *original* model is the user's input error
    (exit 2, one line), not a failed verification of the fold (exit 1)."""
    model = copy_sample(tmp_path, "resnet_tiny.onnx")
    before = files_in(tmp_path)
    result = invoke([model, "--input-shape", "input:2,3"])
    assert result.exit_code == 2, (result.exit_code, result.stdout, result.stderr)
    assert_one_error_line(result.stderr)
    assert files_in(tmp_path) == before


# --- --atol / --rtol ----------------------------------------------------------------------------


@pytest.mark.parametrize("flag", ["--atol", "--rtol"])
@pytest.mark.parametrize("value", ["-1", "-1e-9", "abc", "1e", "nan"])
def test_bad_tolerance(tmp_path, flag, value):
    model = copy_sample(tmp_path, "no_bn.onnx")
    before = files_in(tmp_path)
    result = invoke([model, f"{flag}={value}"])
    assert result.exit_code == 2, (result.stdout, result.stderr)
    assert "Traceback" not in result.stdout + result.stderr
    assert flag in result.stderr
    assert files_in(tmp_path) == before


def test_tolerances_are_recorded(tmp_path):
    model = copy_sample(tmp_path, "resnet_tiny.onnx")
    result = invoke([model, "--atol", "0.001", "--rtol", "0", "--json"])
    assert result.exit_code == 0, result.stderr
    (output,) = json.loads(result.stdout)["verification"]["outputs"]
    assert output["atol"] == 0.001 and output["rtol"] == 0.0


# --- output flavours -------------------------------------------------------------------------------


def test_quiet_prints_nothing_on_success(tmp_path):
    model = copy_sample(tmp_path, "resnet_tiny.onnx")
    result = invoke([model, "-q"])
    assert result.exit_code == 0, result.stderr
    assert result.stdout == "" and result.stderr == ""
    assert (tmp_path / "resnet_tiny.folded.onnx").is_file()


def test_text_report(tmp_path):
    model = copy_sample(tmp_path, "resnet_tiny.onnx")
    result = invoke([model])
    assert result.exit_code == 0, result.stderr
    assert "branch.bn" in result.stdout and "producer_has_other_consumers" in result.stdout
    assert "PASSED" in result.stdout


def test_report_md(tmp_path):
    model = copy_sample(tmp_path, "resnet_tiny.onnx")
    report = tmp_path / "report.md"
    result = invoke([model, "--report-md", report])
    assert result.exit_code == 0, result.stderr
    text = report.read_text()
    assert "| op | before | after |" in text
    assert "| BatchNormalization | 5 | 1 |" in text
    assert "| Conv | 5 | 5 |" in text
    assert "producer_has_other_consumers" in text
    assert "logits" in text


def test_report_md_with_json(tmp_path):
    model = copy_sample(tmp_path, "bn_first.onnx")
    report = tmp_path / "report.md"
    result = invoke([model, "--report-md", report, "--json"])
    assert result.exit_code == 0, result.stderr
    json.loads(result.stdout)
    assert "| BatchNormalization | 2 | 0 |" in report.read_text()


# --- --in-place and output == input --------------------------------------------------------------


def test_in_place_replaces_input(tmp_path):
    model = copy_sample(tmp_path, "resnet_tiny.onnx")
    result = invoke([model, "--in-place"])
    assert result.exit_code == 0, result.stderr
    assert bn_count(model) == 1
    onnx.checker.check_model(str(model), full_check=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["resnet_tiny.onnx"]


def test_in_place_and_output_exclude_each_other(tmp_path):
    model = copy_sample(tmp_path, "resnet_tiny.onnx")
    before = files_in(tmp_path)
    result = invoke([model, "--in-place", "-o", tmp_path / "x.onnx"])
    assert result.exit_code == 2
    assert_one_error_line(result.stderr)
    assert files_in(tmp_path) == before


@pytest.mark.parametrize("spelling", ["same", "dotted", "relative"])
def test_output_equal_to_input_is_refused(tmp_path, spelling, monkeypatch):
    model = copy_sample(tmp_path, "resnet_tiny.onnx")
    (tmp_path / "sub").mkdir()
    before = files_in(tmp_path)
    if spelling == "same":
        target = model
    elif spelling == "dotted":
        target = tmp_path / "sub" / ".." / model.name
    else:
        monkeypatch.chdir(tmp_path)
        target = Path(model.name)
    result = invoke([model, "-o", target])
    assert result.exit_code == 2, (result.stdout, result.stderr)
    assert_one_error_line(result.stderr)
    assert files_in(tmp_path) == before


# --- real subprocesses ---------------------------------------------------------------------------


def test_module_help():
    process = run_module(["--help"])
    assert process.returncode == 0, process.stderr
    assert "Usage" in process.stdout
    assert "fold" in process.stdout


def test_module_fold_help():
    process = run_module(["fold", "--help"])
    assert process.returncode == 0, process.stderr
    for flag in ("--output", "--in-place", "--no-verify", "--input-shape", "--seed", "--atol", "--rtol",
                 "--json", "--report-md", "--quiet"):
        assert flag in process.stdout


def test_module_version():
    process = run_module(["--version"])
    assert process.returncode == 0, process.stderr
    assert bnfold.__version__ in process.stdout


@pytest.mark.parametrize("name", ["resnet_tiny.onnx", "no_bn.onnx", "fp16_cnn.onnx"])
def test_subprocess_fold_exit_0(tmp_path, name):
    model = copy_sample(tmp_path, name)
    process = run_module([name], cwd=tmp_path)
    assert process.returncode == 0, process.stderr
    assert (tmp_path / (model.stem + ".folded.onnx")).is_file()
    assert "Traceback" not in process.stderr


def test_subprocess_json_stdout_is_one_object(tmp_path):
    model = copy_sample(tmp_path, "convtranspose_decoder.onnx")
    process = run_module([model, "--json", "-o", tmp_path / "out.onnx"])
    assert process.returncode == 0, process.stderr
    data = json.loads(process.stdout)  # raises if anything but one JSON document is on stdout
    assert data["schema_version"] == 1
    assert data["verification"]["passed"] is True
    assert {r["node"] for r in data["folded"]} == {"up1.bn", "up2.bn"}
    assert (tmp_path / "out.onnx").is_file()


def test_subprocess_quiet(tmp_path):
    copy_sample(tmp_path, "bn_first.onnx")
    process = run_module(["-q", "bn_first.onnx"], cwd=tmp_path)
    assert process.returncode == 0, process.stderr
    assert process.stdout == "" and process.stderr == ""


def test_subprocess_bad_input_exit_2(tmp_path):
    (tmp_path / "junk.onnx").write_bytes(b"\x00\xff" * 100)
    process = run_module(["junk.onnx"], cwd=tmp_path)
    assert process.returncode == 2
    assert process.stdout == ""
    assert_one_error_line(process.stderr)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["junk.onnx"]


def test_subprocess_output_equals_input_exit_2(tmp_path):
    model = copy_sample(tmp_path, "no_bn.onnx")
    original = model.read_bytes()
    process = run_module([model.name, "-o", model.name], cwd=tmp_path)
    assert process.returncode == 2
    assert_one_error_line(process.stderr)
    assert model.read_bytes() == original
    assert sorted(p.name for p in tmp_path.iterdir()) == ["no_bn.onnx"]


def test_subprocess_bad_tolerance_exit_2(tmp_path):
    copy_sample(tmp_path, "no_bn.onnx")
    for args in (["--atol", "-1"], ["--rtol", "x"]):
        process = run_module(["no_bn.onnx", *args], cwd=tmp_path)
        assert process.returncode == 2, (args, process.stderr)
        assert "Traceback" not in process.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["no_bn.onnx"]


def test_console_script(tmp_path):
    script = Path(sys.executable).parent / "bnfold"
    if not script.exists():
        script = shutil.which("bnfold")
        if script is None:
            pytest.skip("bnfold console script not installed")
    model = copy_sample(tmp_path, "grouped_depthwise.onnx")
    process = subprocess.run([str(script), str(model), "-q"], check=False, capture_output=True, text=True, timeout=120)
    assert process.returncode == 0, process.stderr
    assert (tmp_path / "grouped_depthwise.folded.onnx").is_file()


def test_folded_output_matches_original_numerically(tmp_path):
    """The written file (not only the report) computes what the original computes."""
    import onnxruntime as ort

    model = copy_sample(tmp_path, "resnet_tiny.onnx")
    assert invoke([model, "-q"]).exit_code == 0
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    feeds = {"input": np.random.default_rng(5).uniform(-1, 1, (4, 3, 32, 32)).astype(np.float32)}
    outputs = [ort.InferenceSession(str(p), options, providers=["CPUExecutionProvider"]).run(None, feeds)[0]
               for p in (model, tmp_path / "resnet_tiny.folded.onnx")]
    np.testing.assert_allclose(outputs[1], outputs[0], rtol=1e-5, atol=1e-5)


def test_environment_has_no_stray_cwd_outputs(tmp_path, monkeypatch):
    """Relative paths resolve against the working directory, and outputs go beside the input."""
    (tmp_path / "models").mkdir()
    copy_sample(tmp_path / "models", "bn_first.onnx")
    monkeypatch.chdir(tmp_path)
    result = invoke([os.path.join("models", "bn_first.onnx")])
    assert result.exit_code == 0, result.stderr
    assert (tmp_path / "models" / "bn_first.folded.onnx").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["models"]
