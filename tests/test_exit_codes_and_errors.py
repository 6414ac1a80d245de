"""One home for exit codes, error lines and the tolerance check (bnfold/errors.py): their values,
and that the CLI, the batch runner, the JSON schema and the API use that one definition."""

from __future__ import annotations

import json
import re
import signal
from pathlib import Path

import pytest

import bnfold
from bnfold.errors import MODEL_EXIT_CODES, ExitCode, check_tolerance, first_line, worst_exit_code
from bnfold.run_config import RunConfig

ROOT = Path(__file__).resolve().parents[1]


def test_exit_code_values():
    assert [int(c) for c in MODEL_EXIT_CODES] == [0, 1, 2]
    assert (ExitCode.OK, ExitCode.FAILED, ExitCode.BAD_INPUT) == MODEL_EXIT_CODES
    assert bnfold.ExitCode is ExitCode
    assert bnfold.BadInputError.exit_code == ExitCode.BAD_INPUT
    assert bnfold.VerificationError.exit_code == ExitCode.FAILED


@pytest.mark.parametrize("name, code", [("SIGHUP", 129), ("SIGINT", 130), ("SIGTERM", 143)])
def test_interrupted_codes_are_128_plus_the_signal(name, code):
    number = getattr(signal, name)
    assert ExitCode.for_signal(number) == code == 128 + number
    assert ExitCode[f"INTERRUPTED_{name}"] == code


def test_for_signal_refuses_a_signal_without_an_exit_code():
    with pytest.raises(ValueError):
        ExitCode.for_signal(signal.SIGKILL)


def test_worst_exit_code():
    assert worst_exit_code([]) == 0
    assert worst_exit_code([0, 2, 1]) == 2
    assert worst_exit_code([ExitCode.OK, ExitCode.FAILED]) == 1
    assert type(worst_exit_code([ExitCode.FAILED])) is int


def test_json_schema_lists_exactly_the_per_model_exit_codes():
    schema = json.loads((ROOT / "docs" / "report.schema.json").read_text())
    found = []

    def walk(node):
        if isinstance(node, dict):
            if isinstance(node.get("exit_code"), dict):
                found.append(node["exit_code"]["enum"])
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(schema)
    assert found and all(sorted(e) == [int(c) for c in MODEL_EXIT_CODES] for e in found), found


def test_no_module_defines_its_own_exit_codes():
    """Exit codes are spelled once: no `EXIT_...` constants and no bare 0/1/2 tuples of them
    elsewhere in the package."""
    offenders = []
    for path in sorted((ROOT / "bnfold").rglob("*.py")):
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if re.search(r"\bEXIT_[A-Z_]+\s*[,=]", line):
                offenders.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert offenders == []


# --- first_line: what a one-line message shows of an error ------------------------------------------


def test_first_line_of_a_multi_line_error():
    assert first_line(ValueError("\n  bad thing happened  \nat line 2\n")) == "bad thing happened"


def test_first_line_of_a_silent_error_is_its_type():
    assert first_line(KeyError()) == "KeyError"
    assert first_line(RuntimeError("   \n ")) == "RuntimeError"
    assert first_line("") == ""


def test_first_line_is_bounded():
    line = first_line(RuntimeError("x" * 1000))
    assert len(line) == 300 and line.endswith("…")
    assert first_line("y" * 300) == "y" * 300
    assert len(first_line("z" * 50, limit=20)) == 20


def test_shared_first_line_replaces_the_local_copies():
    from bnfold import model_io, ort_child, runtime

    assert not hasattr(model_io, "_first_line") and not hasattr(runtime, "_line")
    assert model_io.first_line is first_line and ort_child.first_line is first_line


def test_empty_checker_message_is_not_an_index_error(monkeypatch):
    """verify took the first line of an exception's text by indexing `splitlines()`, which raised
    IndexError for an empty message; the shared helper names the exception instead."""
    import importlib

    import onnx

    verify = importlib.import_module("bnfold.verify")  # `bnfold.verify` the attribute is the API function

    calls = {"n": 0}

    def checker(model, full_check=False):
        calls["n"] += 1
        raise ValueError("")

    monkeypatch.setattr(verify, "_run_checker", checker)
    model = onnx.load(str(ROOT / "sample_models" / "no_bn.onnx"))
    assert verify._check_model(model, model, None) == (False, "ValueError")
    assert calls["n"] == 3  # strict check of the folded model, of the original, plain check of the folded


# --- one tolerance check for the API and the CLI --------------------------------------------------


@pytest.mark.parametrize("value", [-1.0, float("nan"), float("inf"), float("-inf")])
def test_tolerance_refused_alike_by_api_and_cli(value):
    with pytest.raises(bnfold.BadInputError, match=r"^atol must be a finite number >= 0"):
        RunConfig(atol=value)
    with pytest.raises(bnfold.BadInputError, match=r"^--rtol must be a finite number >= 0"):
        check_tolerance("--rtol", value)


@pytest.mark.parametrize("value", [None, 0.0, 1e-6, 10.0])
def test_tolerance_accepted(value):
    check_tolerance("atol", value)
    assert RunConfig(atol=value, rtol=value).atol == value
