"""Every `--json` output validates against docs/report.schema.json, and is strict JSON (no NaN or
Infinity tokens, which `json.dumps` would write by default and most parsers reject)."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest

jsonschema = pytest.importorskip("jsonschema")

from click.testing import CliRunner, Result
from helpers import sample_model_names

from bnfold import render
from bnfold.batch import JobResult
from bnfold.cli import main
from bnfold.report import OutputCheck, Reason, Report, SkippedRecord, TensorCheck, Verification

ROOT = Path(__file__).resolve().parents[1]
SAMPLES_DIR = ROOT / "sample_models"
SCHEMA = json.loads((ROOT / "docs" / "report.schema.json").read_text())


# --- helpers -------------------------------------------------------------------------------------


def _no_constants(token: str):
    raise AssertionError(f"JSON output contains the non-standard token {token}")


def strict_loads(text: str):
    """json.loads that rejects NaN, Infinity and -Infinity."""
    return json.loads(text, parse_constant=_no_constants)


def validate(data) -> None:
    validator_class = jsonschema.validators.validator_for(SCHEMA)
    validator_class.check_schema(SCHEMA)
    errors = list(validator_class(SCHEMA).iter_errors(data))
    if errors:
        # oneOf hides the cause in its branches' errors: list the leaves, deepest (most specific) first
        leaves, stack = [], list(errors)
        while stack:
            error = stack.pop()
            if error.context:
                stack.extend(error.context)
            else:
                leaves.append(error)
        leaves.sort(key=lambda e: (-len(e.absolute_path), list(map(str, e.absolute_path))))
        lines = [f"{list(e.absolute_path)}: {e.message[:160]}" for e in leaves[:15]]
        raise AssertionError("JSON does not match docs/report.schema.json:\n" + "\n".join(lines))


def copy_sample(folder: Path, name: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / name
    shutil.copyfile(SAMPLES_DIR / name, target)
    return target


def run_json(args: list, expected_exit: int) -> dict:
    """Run the CLI with --json; check the exit code, strict JSON, the schema; return the object."""
    result: Result = CliRunner().invoke(main, [*map(str, args), "--json"])
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise AssertionError(f"unexpected exception {result.exception!r}") from result.exception
    assert result.exit_code == expected_exit, (result.exit_code, result.stdout, result.stderr)
    data = strict_loads(result.stdout)
    assert isinstance(data, dict)
    validate(data)
    assert data["exit_code"] == expected_exit
    return data


# --- the schema itself ---------------------------------------------------------------------------


def test_schema_is_valid():
    jsonschema.validators.validator_for(SCHEMA).check_schema(SCHEMA)


def test_every_reason_is_in_the_schema():
    schema_reasons = set(SCHEMA["$defs"]["reason"]["enum"])
    missing = sorted(reason.value for reason in Reason if reason.value not in schema_reasons)
    assert not missing, f"Reason values missing from the schema's reason enum: {missing}"


def test_schema_reasons_are_known():
    """The other direction: the schema documents no reason code bnfold never emits."""
    assert set(SCHEMA["$defs"]["reason"]["enum"]) <= {reason.value for reason in Reason}


def test_schema_version_matches():
    from bnfold.report import JSON_SCHEMA_VERSION

    assert SCHEMA["$defs"]["modelReport"]["properties"]["schema_version"]["const"] == JSON_SCHEMA_VERSION


# --- real runs -----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sample_model_names())
def test_single_fold(tmp_path, name):
    model = copy_sample(tmp_path, name)
    data = run_json([model, "-o", tmp_path / "out.onnx"], 0)
    assert data["command"] == "fold"
    assert data["verification"] is not None and data["verification"]["passed"] is True
    assert data["error"] is None and data["findings"] == []


def test_fold_no_verify(tmp_path):
    model = copy_sample(tmp_path, "resnet_tiny.onnx")
    data = run_json([model, "--no-verify", "-o", tmp_path / "out.onnx"], 0)
    assert data["verification"] is None and data["verified"] is False
    assert data["skipped"][0]["reason"] == "producer_has_other_consumers"


def test_fold_with_iterations_and_providers(tmp_path):
    model = copy_sample(tmp_path, "bn_first.onnx")
    data = run_json([model, "--iterations", "2", "--providers", "CPUExecutionProvider", "-o",
                     tmp_path / "out.onnx"], 0)
    assert data["verification"]["seeds"] == [0, 1]


def test_check_two_models(tmp_path):
    dirty = copy_sample(tmp_path, "resnet_tiny.onnx")
    clean = copy_sample(tmp_path, "no_bn.onnx")
    data = run_json(["check", dirty, clean], 1)
    assert data["command"] == "check"
    assert [m["exit_code"] for m in data["models"]] == [1, 0]
    assert all(m["command"] == "check" for m in data["models"])


def test_check_verify_one_model(tmp_path):
    model = copy_sample(tmp_path, "mlp_bn1d.onnx")
    data = run_json(["check", "--verify", model], 1)
    assert data["verification"]["passed"] is True


def test_multi_model_fold(tmp_path):
    folder = tmp_path / "models"
    for name in ("resnet_tiny.onnx", "grouped_depthwise.onnx", "no_bn.onnx"):
        copy_sample(folder, name)
    copy_sample(folder / "sub", "conv_mul_add.onnx")
    data = run_json([folder, "-o", tmp_path / "out"], 0)
    assert data["command"] == "fold"
    assert len(data["models"]) == 4
    assert all(m["exit_code"] == 0 and m["output_path"] for m in data["models"])


@pytest.mark.usefixtures("drop_epsilon")
def test_failed_verification(tmp_path):
    model = copy_sample(tmp_path, "mlp_bn1d.onnx")
    data = run_json([model, "-o", tmp_path / "out.onnx"], 1)
    assert data["passed"] is False and data["verification"]["passed"] is False
    assert data["error"]
    assert not (tmp_path / "out.onnx").exists()


@pytest.mark.usefixtures("drop_epsilon")
def test_failed_verification_in_a_batch(tmp_path):
    folder = tmp_path / "models"
    copy_sample(folder, "mlp_bn1d.onnx")
    copy_sample(folder, "no_bn.onnx")
    data = run_json([folder, "-o", tmp_path / "out"], 1)
    assert sorted(m["exit_code"] for m in data["models"]) == [0, 1]


def test_bad_input_in_a_batch(tmp_path):
    folder = tmp_path / "models"
    copy_sample(folder, "bn_first.onnx")
    (folder / "broken.onnx").write_bytes(b"\x0a\xff\xff\xff garbage" * 20)
    data = run_json([folder, "-o", tmp_path / "out"], 2)
    (broken,) = [m for m in data["models"] if m["input_path"].endswith("broken.onnx")]
    assert broken["exit_code"] == 2 and "broken.onnx" in broken["error"]


def test_bad_input_in_a_check_batch(tmp_path):
    folder = tmp_path / "models"
    copy_sample(folder, "bn_first.onnx")
    (folder / "lfs.onnx").write_text("version https://git-lfs.github.com/spec/v1\noid sha256:00\nsize 1\n")
    data = run_json(["check", folder], 2)
    assert sorted(m["exit_code"] for m in data["models"]) == [1, 2]


def test_bad_input_single_model(tmp_path):
    """A single unreadable model with --json: whatever is printed must still match the schema."""
    (tmp_path / "broken.onnx").write_bytes(b"\x00garbage" * 10)
    run_json([tmp_path / "broken.onnx"], 2)


def test_infinite_tolerance(tmp_path):
    """`--atol inf` is accepted as a non-negative number; then the JSON (where inf is written as the
    string "inf") must still match the schema, or the CLI must refuse the value (exit 2)."""
    model = copy_sample(tmp_path, "bn_first.onnx")
    result = CliRunner().invoke(main, [str(model), "--atol", "inf", "-o", str(tmp_path / "out.onnx"), "--json"])
    assert result.exception is None or isinstance(result.exception, SystemExit)
    if result.exit_code == 2:
        return
    assert result.exit_code == 0, result.stderr
    validate(strict_loads(result.stdout))


def test_non_finite_errors_are_strict_json(tmp_path, monkeypatch):
    """Outputs whose errors are NaN/Inf (e.g. a shape mismatch) render as strings, not NaN tokens."""
    from bnfold import runtime

    def broken_compare(name, reference, candidate, atol, rtol):
        return OutputCheck(name, float("nan"), float("inf"), atol, rtol, reference.size, reference.size, False)

    monkeypatch.setattr(runtime, "compare_arrays", broken_compare)
    model = copy_sample(tmp_path, "bn_first.onnx")
    data = run_json([model, "-o", tmp_path / "out.onnx"], 1)
    (output,) = data["verification"]["outputs"]
    assert output["max_abs_error"] == "nan" and output["max_rel_error"] == "inf"


# --- rendering directly ----------------------------------------------------------------------------


def synthetic_report() -> Report:
    verification = Verification(
        checker_passed=True, checker_message="ok",
        tensors=[TensorCheck("w", "conv", float("inf"), False), TensorCheck("b", "conv", 0.5, True)],
        outputs=[OutputCheck("y", float("nan"), float("-inf"), 1e-5, 1e-4, 3, 10, False)],
        runtime_status="failed", seed=4, seeds=[4], input_shapes={"x": [2, 3]})
    return Report(input_path="m.onnx", skipped=[SkippedRecord("bn", "BatchNormalization", "y",
                                                              Reason.TRAINING_MODE, "training")],
                  ops_before={"BatchNormalization": 1}, ops_after={"BatchNormalization": 1},
                  verification=verification)


@pytest.mark.parametrize("command", ["fold", "check"])
def test_rendered_non_finite_report(command):
    result = JobResult(Path("m.onnx"), 1, synthetic_report(), "verification failed", ["bn: training"])
    for many, results in ((False, [result]), (True, [result, result])):
        text = render.results_to_json(results, command, many)
        data = strict_loads(text)
        validate(data)
        for token in ("NaN", "Infinity"):
            assert token not in text


def test_rendered_report_to_json_is_finite():
    data = strict_loads(render.results_to_json([JobResult(Path("m.onnx"), 1, synthetic_report())], "fold", False))
    assert data["verification"]["tensors"][0]["max_ulp_error"] == "inf"
    assert all(not (isinstance(v, float) and not math.isfinite(v)) for v in data["verification"]["outputs"][0].values())
