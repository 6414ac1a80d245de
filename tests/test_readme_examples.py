"""The documented examples run as written: the README's CLI session and Python API block, docs/ci.md's CI step;
CI runs the README's test command."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def _bnfold(args: list[str], cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "bnfold", *args], cwd=cwd, capture_output=True, text=True,
                          check=False, timeout=300, env=env)


def test_cli_session_in_readme_is_what_bnfold_prints(tmp_path):
    session = README.split("$ bnfold sample_models/resnet_tiny.onnx -o /tmp/rt.onnx\n", 1)[1].split("```", 1)[0]
    (tmp_path / "sample_models").mkdir()
    shutil.copy(ROOT / "sample_models" / "resnet_tiny.onnx", tmp_path / "sample_models")
    done = _bnfold(["sample_models/resnet_tiny.onnx", "-o", str(tmp_path / "rt.onnx")], tmp_path)
    assert done.returncode == 0, done.stderr
    printed = done.stdout.replace(str(tmp_path / "rt.onnx"), "/tmp/rt.onnx")
    assert printed.strip() == session.strip()


def test_ci_step_in_docs_runs(tmp_path):
    step = re.search(r"run: \|\n((?:    .*\n)+)", (ROOT / "docs" / "ci.md").read_text()).group(1)
    commands = [line.strip() for line in step.splitlines() if line.strip().startswith("bnfold")]
    assert len(commands) == 2
    (tmp_path / "models").mkdir()
    folded = _bnfold([str(ROOT / "sample_models" / "bn_first.onnx"), "-o", "models/bn_first.onnx", "-q"], tmp_path)
    assert folded.returncode == 0, folded.stderr
    env = {**os.environ, "GITHUB_STEP_SUMMARY": str(tmp_path / "summary.md")}
    for command in commands:
        shell = subprocess.run(command.replace("bnfold", f"{sys.executable} -m bnfold", 1), shell=True, cwd=tmp_path,
                               env=env, capture_output=True, text=True, check=False, timeout=300)
        assert shell.returncode == 0, (command, shell.stderr)
    report = json.loads((tmp_path / "bnfold-report.json").read_text())
    assert report["exit_code"] == 0 and report["command"] == "check"
    assert "| op | before | after |" in (tmp_path / "summary.md").read_text()


def test_python_api_block_runs(tmp_path, monkeypatch):
    block = README.split("```python\n", 1)[1].split("```", 1)[0]
    shutil.copy(ROOT / "sample_models" / "resnet_tiny.onnx", tmp_path / "model.onnx")
    monkeypatch.chdir(tmp_path)
    exec(compile(block, "README.md", "exec"), {})  # noqa: S102 - the README's own example
    assert (tmp_path / "model.folded.onnx").exists()


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    commands = re.findall(r"^python3 -m venv .*$", readme, flags=re.MULTILINE)
    assert len(commands) == 2, "README must start with the two set-up commands"
    test_command = commands[1]
    assert "pytest" in test_command
    assert test_command in (ROOT / ".ci" / "run").read_text()
