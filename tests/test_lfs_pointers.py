"""A Git LFS pointer file in place of a model: bad input (exit 2, one line naming Git LFS) for fold and
check, alone, in a batch, and through the API."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from cli_helpers import (
    assert_one_error_line,
    copy_sample,
    tree,
)
from helpers import invoke

import bnfold

LFS_POINTER = ("version https://git-lfs.github.com/spec/v1\n"
               "oid sha256:4d7a214614ab2935c943f9e0ff69d22eadbb8f32b1258daaa5e2ca24d17e2393\n"
               "size 81631\n")


@pytest.mark.parametrize("command", [[], ["fold"], ["check"], ["check", "--verify"]])
def test_lfs_pointer_is_reported(tmp_path, command):
    pointer = tmp_path / "model.onnx"
    pointer.write_text(LFS_POINTER)
    before = tree(tmp_path)
    result = invoke([*command, pointer])
    assert result.exit_code == 2, (result.stdout, result.stderr)
    assert_one_error_line(result.stderr)
    assert "Git LFS" in result.stderr
    assert "model.onnx" in result.stderr
    assert tree(tmp_path) == before


@pytest.mark.parametrize("command", ["fold", "check"])
def test_lfs_pointer_in_a_batch(tmp_path, command):
    folder = tmp_path / "models"
    copy_sample(folder, "no_bn.onnx")
    (folder / "big.onnx").write_text(LFS_POINTER)
    args = [command, folder, "--json"] + (["-o", tmp_path / "out"] if command == "fold" else [])
    result = invoke(args)
    assert result.exit_code == 2
    by_name = {Path(m["input_path"]).name: m for m in json.loads(result.stdout)["models"]}
    assert by_name["no_bn.onnx"]["exit_code"] == 0
    assert by_name["big.onnx"]["exit_code"] == 2
    assert "Git LFS" in by_name["big.onnx"]["error"]
    assert "Git LFS" in result.stderr


def test_lfs_pointer_api():
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        pointer = Path(folder) / "m.onnx"
        pointer.write_text(LFS_POINTER)
        for call in (bnfold.fold, bnfold.check):
            with pytest.raises(bnfold.BadInputError, match="Git LFS"):
                call(pointer)
