"""What the check, batch, pre-commit hook and Git LFS tests share: copies of the sample models,
`python -m bnfold` in a real subprocess, a folder's files, the one-error-line rule, the rows of the
summary table a run over several models prints."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx

ROOT = Path(__file__).resolve().parents[1]
SAMPLES_DIR = ROOT / "sample_models"


def copy_sample(folder: Path, name: str, as_name: str | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / (as_name or name)
    shutil.copyfile(SAMPLES_DIR / name, target)
    return target


def run_module(args: list, cwd: Path | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "bnfold", *map(str, args)], check=False, capture_output=True,
                          text=True, cwd=cwd, env=env, timeout=120)


def tree(folder: Path) -> dict[str, bytes]:
    """Every file below `folder` (recursively), by relative path, with its content."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def files_in(folder: Path) -> dict[str, bytes]:
    """The files directly in `folder` (not below), by name, with their content."""
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def assert_one_error_line(stderr: str) -> None:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got {lines!r}"
    assert lines[0].startswith("bnfold: error:"), lines[0]
    assert "Traceback" not in stderr


def bn_count(path: Path) -> int:
    return sum(node.op_type == "BatchNormalization" for node in onnx.load(str(path)).graph.node)


def random_bytes(path: Path, size: int = 777, seed: int = 0) -> Path:
    path.write_bytes(np.random.default_rng(seed).integers(0, 256, size, dtype=np.uint8).tobytes())
    return path


def summary_rows(stdout: str) -> list[str]:
    """The rows of the summary table printed after a run over several models."""
    lines = stdout.splitlines()
    header = [i for i, line in enumerate(lines) if line.startswith("model") and "BN before" in line]
    assert header, f"no summary table in stdout:\n{stdout}"
    return lines[header[-1] + 1:]
