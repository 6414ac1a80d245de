"""Runs over many models: files and folders into an output folder or beside the inputs, recursion,
already-folded results skipped, -j 2 in a real subprocess (identical files to a serial run), the
worst exit code, clashing output names, the summary table."""

from __future__ import annotations

import json
from pathlib import Path

import onnx
import pytest
from cli_helpers import (
    assert_one_error_line,
    bn_count,
    copy_sample,
    random_bytes,
    run_module,
    summary_rows,
    tree,
)
from helpers import invoke


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
