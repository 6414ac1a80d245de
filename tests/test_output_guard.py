"""An output is never a file the input reads (its model file or any external-data file), by name,
through a symlink or through a hard link; the input model is replaced only when asked (CLI
--in-place, API in_place=True), and then where it really lives: a symlink stays a symlink."""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import onnx
import pytest
from helpers import invoke
from onnx import external_data_helper

import bnfold
from bnfold import BadInputError

SAMPLES_DIR = Path(__file__).resolve().parents[1] / "sample_models"


def _digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else os.readlink(p)
            for p in sorted(folder.iterdir())}


def _external_model(folder: Path) -> Path:
    """m.onnx whose two largest weights live in w.bin."""
    source = onnx.load(str(SAMPLES_DIR / "resnet_tiny.onnx"))
    big = sorted(source.graph.initializer, key=lambda t: -len(t.raw_data))[:2]
    data = b""
    for tensor in big:
        external_data_helper.set_external_data(tensor, "w.bin", offset=len(data), length=len(tensor.raw_data))
        data += tensor.raw_data
        tensor.ClearField("raw_data")
        tensor.data_location = onnx.TensorProto.EXTERNAL
    (folder / "w.bin").write_bytes(data)
    onnx.save(source, str(folder / "m.onnx"))
    return folder / "m.onnx"


@pytest.mark.parametrize("verify", [True, False])
@pytest.mark.parametrize("how", ["same name", "symlink", "hard link"])
def test_output_onto_an_input_data_file_is_refused(tmp_path, how, verify):
    model = _external_model(tmp_path)
    output = tmp_path / "w.bin"
    if how == "symlink":
        output = tmp_path / "out.onnx"
        output.symlink_to(tmp_path / "w.bin")
    elif how == "hard link":
        output = tmp_path / "out.onnx"
        os.link(tmp_path / "w.bin", output)
    before = _digests(tmp_path)
    result = invoke([model, "-o", output, *([] if verify else ["--no-verify"])])
    assert result.exit_code == 2, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "external data file" in lines[0] and "w.bin" in lines[0], result.stderr
    with pytest.raises(BadInputError, match="external data file"):
        bnfold.fold(model, output=output, verify=verify)
    assert _digests(tmp_path) == before


@pytest.mark.parametrize("how", ["same path", "symlink", "hard link"])
def test_api_output_onto_the_input_model_needs_in_place(tmp_path, how):
    model = tmp_path / "m.onnx"
    shutil.copyfile(SAMPLES_DIR / "resnet_tiny.onnx", model)
    output = model
    if how == "symlink":
        output = tmp_path / "out.onnx"
        output.symlink_to(model)
    elif how == "hard link":
        output = tmp_path / "out.onnx"
        os.link(model, output)
    before = _digests(tmp_path)
    for verify in (True, False):
        with pytest.raises(BadInputError, match="output equals the input"):
            bnfold.fold(model, output=output, verify=verify)
        with pytest.raises(BadInputError, match="output equals the input"):
            bnfold.fold(model, verify=verify).save(output)
    assert _digests(tmp_path) == before
    if how == "hard link":
        assert invoke([model, "-o", output]).exit_code == 2
        assert _digests(tmp_path) == before
    result = bnfold.fold(model, output=model, in_place=True)
    assert result.report.passed and result.report.folded
    assert _digests(tmp_path)["m.onnx"] != before["m.onnx"]


def test_in_place_on_a_symlink_replaces_the_target_and_keeps_the_link(tmp_path):
    real_dir, link_dir = tmp_path / "real", tmp_path / "links"
    real_dir.mkdir()
    link_dir.mkdir()
    target = real_dir / "model.onnx"
    shutil.copyfile(SAMPLES_DIR / "resnet_tiny.onnx", target)
    link = link_dir / "model.onnx"
    link.symlink_to(target)
    bns = sum(n.op_type == "BatchNormalization" for n in onnx.load(str(target)).graph.node)
    result = invoke([link, "--in-place", "-q"])
    assert result.exit_code == 0, result.stderr
    assert link.is_symlink() and os.readlink(link) == str(target)
    assert sum(n.op_type == "BatchNormalization" for n in onnx.load(str(target)).graph.node) < bns
    assert sorted(p.name for p in real_dir.iterdir()) == ["model.onnx"]  # no temporary file left
    assert sorted(p.name for p in link_dir.iterdir()) == ["model.onnx"]


def test_output_that_is_an_existing_folder_for_one_model_says_what_to_do(tmp_path):
    model = tmp_path / "m.onnx"
    shutil.copyfile(SAMPLES_DIR / "resnet_tiny.onnx", model)
    (tmp_path / "out").mkdir()
    result = invoke([model, "-o", tmp_path / "out"])
    assert result.exit_code == 2
    assert result.stderr.strip().splitlines() == [
        f"bnfold: error: -o {tmp_path / 'out'}: is a folder: give a file name, or pass several models"]
    assert list((tmp_path / "out").iterdir()) == []
    with pytest.raises(BadInputError, match="is a folder"):
        bnfold.fold(model, output=tmp_path / "out")
