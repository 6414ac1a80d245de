"""README, docs, the `Reason` enum and the JSON schema say the same thing about reason codes."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

from bnfold.report import REASON_MEANINGS, Reason

ROOT = Path(__file__).resolve().parents[1]
DOCS = sorted((ROOT / "docs").glob("*.md"))


def _generator():
    spec = importlib.util.spec_from_file_location("generate_reason_table", ROOT / "docs" / "generate_reason_table.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_reason_has_a_meaning():
    assert set(REASON_MEANINGS) == set(Reason)


def test_reason_table_in_docs_is_generated_from_the_enum():
    generator = _generator()
    text = (ROOT / "docs" / "rules.md").read_text()
    assert generator.with_table(text) == text, "run: python docs/generate_reason_table.py"
    for reason in Reason:
        assert f"| `{reason.value}` |" in text


def test_schema_enum_is_the_reason_enum():
    schema = json.loads((ROOT / "docs" / "report.schema.json").read_text())
    assert schema["$defs"]["reason"]["enum"] == [reason.value for reason in Reason]


def test_docs_name_no_reason_code_that_does_not_exist():
    """A snake_case name in backticks in the README or docs is a reason code, or a name the source
    or the tests use (an option, a field, a test cited as evidence): a renamed or invented code fails."""
    source = "\n".join(path.read_text() for folder in ("bnfold", "tests") for path in (ROOT / folder).rglob("*.py"))
    schema = (ROOT / "docs" / "report.schema.json").read_text()
    # Names from outside bnfold the docs cite: timm's function, the BN spec's input names.
    known = {reason.value for reason in Reason} | {"reparameterize_model", "input_mean", "input_var"}
    for path in [ROOT / "README.md", *DOCS]:
        for token in set(re.findall(r"`([a-z][a-z0-9]*(?:_[a-z0-9]+)+)`", path.read_text())):
            assert token in known or token in source or token in schema, f"{path.name}: `{token}`"
