"""The command line's error surface: every usage error is one `bnfold: error:` line on stderr and
exit 2; a failed verification is reported once, naming the model; the summary table of a batch keeps
its columns aligned whatever the length of the model paths; onnxruntime's own error log stays off
stderr.

Each case runs in-process (CliRunner) and, for the usage errors, also as `python -m bnfold`, the way
a shell or CI job sees it.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import onnx
import pytest
from click.testing import CliRunner
from helpers import conv_bn_model

from bnfold import runtime
from bnfold.batch import JobResult
from bnfold.cli import main
from bnfold.render import summary_table
from bnfold.report import OutputCheck, Report

SAMPLES_DIR = Path(__file__).resolve().parents[1] / "sample_models"

# (arguments after the model or command, a word the one line must contain). MODEL stands for a real
# sample model, so only the usage error can be what fails.
USAGE_ERRORS = {
    "unknown option": (["MODEL", "--bogus"], "--bogus"),
    "unknown short option": (["MODEL", "-Z"], "-Z"),
    "unknown option of check": (["check", "MODEL", "--no-verify"], "--no-verify"),
    "missing model": (["fold"], "MODELS"),
    "missing model of check": (["check"], "MODELS"),
    "bare command": ([], "MODELS"),
    "option without its value": (["MODEL", "--seed"], "--seed"),
    "value not an integer": (["MODEL", "--seed", "abc"], "--seed"),
    "negative seed": (["MODEL", "--seed", "-1"], "--seed"),
    "zero iterations": (["MODEL", "--iterations", "0"], "--iterations"),
    "zero workers": (["check", "MODEL", "-j", "0"], "--jobs"),
    "tolerance not a number": (["MODEL", "--atol", "x"], "--atol"),
    "tolerance NaN": (["MODEL", "--rtol", "nan"], "--rtol"),
    "tolerance infinite": (["MODEL", "--atol", "inf"], "--atol"),
    "input shape without dims": (["MODEL", "--input-shape", "x"], "--input-shape"),
    "input shape with a zero dim": (["MODEL", "--input-shape", "x:1,0"], "--input-shape"),
    "input shape not integers": (["MODEL", "--input-shape", "x:a,b"], "--input-shape"),
    "flag given a value": (["MODEL", "--no-verify=yes"], "--no-verify"),
    "in-place with output": (["MODEL", "--in-place", "-o", "out.onnx"], "--in-place"),
}


def run(mode: str, args: list[str], cwd: Path) -> tuple[int, str, str]:
    if mode == "subprocess":
        process = subprocess.run([sys.executable, "-m", "bnfold", *args], check=False, capture_output=True,
                                 text=True, cwd=cwd, timeout=120)
        return process.returncode, process.stdout, process.stderr
    result = CliRunner().invoke(main, args)
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    return result.exit_code, result.stdout, result.stderr


def files_in(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("mode", ["runner", "subprocess"])
@pytest.mark.parametrize("case", sorted(USAGE_ERRORS))
def test_usage_error_is_one_line_exit_2(tmp_path, monkeypatch, mode, case):
    arguments, mentioned = USAGE_ERRORS[case]
    shutil.copyfile(SAMPLES_DIR / "bn_first.onnx", tmp_path / "bn_first.onnx")
    monkeypatch.chdir(tmp_path)
    before = files_in(tmp_path)
    code, stdout, stderr = run(mode, ["bn_first.onnx" if a == "MODEL" else a for a in arguments], tmp_path)
    assert code == 2, (code, stdout, stderr)
    assert stdout == ""
    lines = stderr.splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got {lines!r}"
    assert lines[0].startswith("bnfold: error: "), lines
    assert mentioned in lines[0], lines
    assert "Traceback" not in stderr and "Usage:" not in stderr
    assert files_in(tmp_path) == before


def test_click_usage_error_points_to_the_command_help(tmp_path):
    code, _, stderr = run("runner", ["check", str(SAMPLES_DIR / "bn_first.onnx"), "--bogus"], tmp_path)
    assert code == 2
    assert stderr.rstrip().endswith("check --help')"), stderr


@pytest.mark.parametrize("args", [["--help"], ["-h"], ["fold", "--help"], ["check", "-h"]])
def test_help_is_still_the_help_page(tmp_path, args):
    code, stdout, stderr = run("runner", args, tmp_path)
    assert code == 0 and stderr == ""
    assert stdout.startswith("Usage:") and "--help" in stdout


# --- a failed verification is said once, naming the model -------------------------------------------


@pytest.fixture
def failing_comparison(monkeypatch):
    """Every onnxruntime output comparison fails: a verification failure without a broken fold."""

    def always_fails(name, reference, candidate, atol, rtol):
        return OutputCheck(name, 1.0, 1.0, atol, rtol, reference.size, reference.size, False)

    monkeypatch.setattr(runtime, "compare_arrays", always_fails)


@pytest.mark.parametrize("extra", [[], ["-q"], ["--json"]])
def test_one_failed_model_is_one_stderr_line(tmp_path, failing_comparison, extra):
    model = tmp_path / "bn_first.onnx"
    shutil.copyfile(SAMPLES_DIR / "bn_first.onnx", model)
    result = CliRunner().invoke(main, [str(model), *extra])
    assert result.exit_code == 1, (result.stdout, result.stderr)
    lines = result.stderr.splitlines()
    assert len(lines) == 1, lines
    assert lines[0] == f"bnfold: error: {model}: verification failed; nothing written", lines
    assert result.stderr.count("verification failed") == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bn_first.onnx"]


def test_failed_model_among_several_is_named_once(tmp_path, monkeypatch, failing_comparison):
    for name in ("bn_first.onnx", "no_bn.onnx"):
        shutil.copyfile(SAMPLES_DIR / name, tmp_path / name)
    # no_bn.onnx has nothing folded, but its verification compares outputs too: both fail.
    result = CliRunner().invoke(main, [str(tmp_path / "bn_first.onnx"), str(tmp_path / "no_bn.onnx"),
                                       "-o", str(tmp_path / "out")])
    assert result.exit_code == 1, (result.stdout, result.stderr)
    lines = result.stderr.splitlines()
    assert lines == [f"bnfold: error: {tmp_path / name}: verification failed; nothing written"
                     for name in ("bn_first.onnx", "no_bn.onnx")]


def test_bad_input_line_is_not_prefixed_twice_with_the_model(tmp_path):
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"\x00garbage" * 10)
    shutil.copyfile(SAMPLES_DIR / "no_bn.onnx", tmp_path / "no_bn.onnx")
    result = CliRunner().invoke(main, [str(broken), str(tmp_path / "no_bn.onnx"), "-o", str(tmp_path / "out")])
    assert result.exit_code == 2
    (line,) = result.stderr.splitlines()
    assert line.startswith(f"bnfold: error: {broken}: not an ONNX model"), line
    assert line.count(str(broken)) == 1


# --- the summary table ------------------------------------------------------------------------------


def columns(table: str) -> list[dict[str, str]]:
    """Cut every row at the header's column edges: model | BN before | BN after | exit | result.
    The model column is left-aligned (ends where "BN before" starts, minus the padding); the number
    columns are right-aligned (end where their header ends)."""
    header, *rows = table.splitlines()
    ends = [header.index(title) + len(title) for title in ("BN before", "BN after", "exit")]
    starts = [header.index("BN before") - 2, *ends]
    cells = []
    for row in rows:
        cells.append({"model": row[:starts[0]].rstrip(), "before": row[starts[0]:ends[0]].strip(),
                      "after": row[ends[0]:ends[1]].strip(), "exit": row[ends[1]:ends[2]].strip(),
                      "result": row[ends[2]:].strip()})
        # the cells sit exactly in their columns: a space before each right-aligned number column
        assert all(row[end] == " " for end in ends[:2]), row
    return cells


def long_results() -> list[JobResult]:
    deep = Path("models") / ("a_rather_long_folder_name_" * 3) / "resnet_with_an_unusually_long_name.onnx"
    folded = Report(ops_before={"BatchNormalization": 12}, ops_after={"BatchNormalization": 1})
    return [JobResult(Path("m.onnx"), 0, Report(ops_before={"BatchNormalization": 3})),
            JobResult(deep, 0, folded),
            JobResult(Path("x") / ("y" * 60 + ".onnx"), 2, None, "bad.onnx: not an ONNX model\nsecond line")]


def test_summary_columns_align_on_long_model_paths():
    results = long_results()
    cells = columns(summary_table(results, "fold"))
    assert [c["model"] for c in cells] == [str(r.model) for r in results]
    assert [(c["before"], c["after"], c["exit"]) for c in cells] == [("3", "0", "0"), ("12", "1", "0"), ("-", "-", "2")]
    assert [c["result"] for c in cells] == ["nothing to fold", "nothing to fold", "bad.onnx: not an ONNX model"]


def test_summary_table_from_the_cli_aligns_on_long_paths(tmp_path):
    folder = tmp_path / "models" / ("a_folder_name_long_enough_to_overflow_" * 2)
    folder.mkdir(parents=True)
    shutil.copyfile(SAMPLES_DIR / "bn_first.onnx", folder / "bn_first.onnx")
    shutil.copyfile(SAMPLES_DIR / "no_bn.onnx", tmp_path / "models" / "no_bn.onnx")
    (folder / "broken.onnx").write_bytes(b"\x00garbage" * 10)
    result = CliRunner().invoke(main, ["check", str(tmp_path / "models")])
    assert result.exit_code == 2, (result.stdout, result.stderr)
    lines = result.stdout.splitlines()
    (start,) = [i for i, line in enumerate(lines) if line.startswith("model") and "BN before" in line]
    table = "\n".join(lines[start:])
    cells = {Path(c["model"]).name: c for c in columns(table)}
    assert {name: (c["before"], c["after"], c["exit"]) for name, c in cells.items()} == {
        "bn_first.onnx": ("2", "0", "1"), "broken.onnx": ("-", "-", "2"), "no_bn.onnx": ("0", "0", "0")}
    assert cells["no_bn.onnx"]["result"] == "ok"


# --- onnxruntime's own error log stays off bnfold's stderr ------------------------------------------
# When onnxruntime fails to run a model it logs an ERROR record of its own ("[E:onnxruntime:, ...]");
# bnfold's stderr still holds exactly one line per failed model (issue 11 F).


C = 4


def test_failed_model_gives_one_stderr_line(tmp_path: Path) -> None:
    # group=0: the checker accepts it, onnxruntime fails at run time
    model = conv_bn_model(C, kernel=3, size=8, group=0)
    onnx.save(model, tmp_path / "m.onnx")

    result = subprocess.run([sys.executable, "-m", "bnfold", "m.onnx", "-o", "out.onnx", "-q"], cwd=tmp_path,
                            capture_output=True, text=True)

    assert result.returncode == 1
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
