"""The pre-commit hook declared in .pre-commit-hooks.yaml: its fields, and its entry run on staged files."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from cli_helpers import (
    ROOT,
    copy_sample,
    tree,
)


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
