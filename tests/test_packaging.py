"""Packaging habits: one version (pyproject.toml, read back from the installed metadata), py.typed
shipped as package data, the classifiers a typed console tool declares, a CHANGELOG. The wheel
itself is built and installed into a clean environment by .ci/run."""

from __future__ import annotations

import importlib.metadata
import re
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

import bnfold
from bnfold.cli import main

ROOT = Path(__file__).resolve().parents[1]
tomllib = pytest.importorskip("tomllib")  # Python >= 3.11


def project() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_version_comes_from_the_package_metadata():
    declared = project()["project"]["version"]
    assert importlib.metadata.version("bnfold") == declared
    assert bnfold.__version__ == declared


def test_version_option_prints_the_metadata_version():
    result = CliRunner().invoke(main, ["--version"])
    assert result.exit_code == 0
    assert result.stdout == f"bnfold, version {importlib.metadata.version('bnfold')}\n"


def test_version_module_invocation():
    process = subprocess.run([sys.executable, "-m", "bnfold", "--version"], check=False, capture_output=True,
                             text=True, timeout=60)
    assert process.returncode == 0 and process.stdout == f"bnfold, version {bnfold.__version__}\n"


def test_py_typed_is_shipped():
    assert (ROOT / "bnfold" / "py.typed").is_file()
    assert "py.typed" in project()["tool"]["setuptools"]["package-data"]["bnfold"]
    assert "Typing :: Typed" in project()["project"]["classifiers"]


def test_build_tool_is_in_the_test_extra():
    """.ci/run builds the sdist and wheel with `python -m build` from the test environment."""
    extras = project()["project"]["optional-dependencies"]["test"]
    assert any(re.match(r"build\b", requirement) for requirement in extras)
    assert "python -m build" in (ROOT / ".ci" / "run").read_text()


def test_no_invented_project_urls():
    assert "urls" not in project()["project"]


def test_changelog_has_unreleased_and_current_version():
    text = (ROOT / "CHANGELOG.md").read_text()
    headings = re.findall(r"^## \[([^\]]+)\]", text, flags=re.MULTILINE)
    assert headings[0] == "Unreleased"
    assert project()["project"]["version"] in headings
