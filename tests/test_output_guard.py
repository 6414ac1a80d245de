"""An output is never a file the input reads (its model file or any external-data file), by name,
through a symlink or through a hard link; the input model is replaced only when asked (CLI
--in-place, API in_place=True), and then where it really lives: a symlink stays a symlink. In a batch,
one job's output is never another job's input; side files (--save-inputs, --save-outputs,
--report-md) are outputs too."""

from __future__ import annotations

import copy
import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import onnx
import pytest
from helpers import conv_bn_model, invoke
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


# --- batch mode: one job's output is never another job's input -------------------------------------
# The guard compares each job's outputs with every job's inputs, not only its own: an output model that
# is another input is refused before any work (exit 2); a data file name taken by a file the output does
# not own is not replaced (a fresh name is used); every input stays intact.


C = 4


def _conv_bn() -> onnx.ModelProto:
    return conv_bn_model(C)


def _bnfold_quiet(folder: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "bnfold", *args, "-q"], cwd=folder, capture_output=True, text=True)


def test_one_jobs_output_is_not_another_jobs_input(tmp_path: Path) -> None:
    onnx.save(_conv_bn(), tmp_path / "X.onnx")
    onnx.save(_conv_bn(), tmp_path / "X.folded.onnx")  # named on the command line: an input
    before = (tmp_path / "X.folded.onnx").read_bytes()

    result = _bnfold_quiet(tmp_path, "X.onnx", "X.folded.onnx")

    assert (tmp_path / "X.folded.onnx").read_bytes() == before
    assert result.returncode == 2


@pytest.mark.parametrize("order", [("X.onnx", "Y.onnx"), ("Y.onnx", "X.onnx")])
def test_one_jobs_data_file_is_not_another_inputs_data(tmp_path: Path, order: tuple[str, str]) -> None:
    onnx.save(copy.deepcopy(_conv_bn()), tmp_path / "X.onnx", save_as_external_data=True, location="X.bin",
              size_threshold=0)
    onnx.save(copy.deepcopy(_conv_bn()), tmp_path / "Y.onnx", save_as_external_data=True,
              location="X.folded.onnx.data", size_threshold=0)
    before = (tmp_path / "X.folded.onnx.data").read_bytes()

    result = _bnfold_quiet(tmp_path, *order)

    assert (tmp_path / "X.folded.onnx.data").read_bytes() == before, "input Y's weights were replaced"
    assert result.returncode == 0, result.stderr  # X's weights went to a fresh name beside its output
    written = onnx.load(str(tmp_path / "X.folded.onnx"))
    assert written.graph.node and {"Conv"} <= {n.op_type for n in written.graph.node}


def test_data_file_of_an_unnamed_model_is_not_replaced(tmp_path: Path) -> None:
    onnx.save(copy.deepcopy(_conv_bn()), tmp_path / "X.onnx", save_as_external_data=True, location="X.bin",
              size_threshold=0)
    onnx.save(copy.deepcopy(_conv_bn()), tmp_path / "Y.onnx", save_as_external_data=True,
              location="X.folded.onnx.data", size_threshold=0)
    before = (tmp_path / "X.folded.onnx.data").read_bytes()

    _bnfold_quiet(tmp_path, "X.onnx")

    assert (tmp_path / "X.folded.onnx.data").read_bytes() == before


# --- side files (--save-inputs, --save-outputs, --report-md) are outputs too -------------------------
# Naming the input model, the input's external data file or the model output as a side file is refused
# (exit 2, one line), every input byte and the output untouched; `bnfold check`, which writes nothing,
# never overwrites the model it checks.


def _conv_bn_models(folder: Path) -> None:
    """m.onnx (self-contained) and e.onnx + e.bin (external data): Conv -> BN."""
    onnx.save(conv_bn_model(C), folder / "m.onnx")
    onnx.save(conv_bn_model(C), folder / "e.onnx", save_as_external_data=True, location="e.bin", size_threshold=0)


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}


SIDE_FILE_CASES = [
    # (arguments, the file that must survive)
    (["m.onnx", "-o", "out.onnx", "--save-inputs", "m.onnx"], "m.onnx"),
    (["m.onnx", "-o", "out.onnx", "--save-outputs", "m.onnx"], "m.onnx"),
    (["m.onnx", "-o", "out.onnx", "--report-md", "m.onnx"], "m.onnx"),
    (["e.onnx", "-o", "out.onnx", "--save-inputs", "e.bin"], "e.bin"),
    (["e.onnx", "-o", "out.onnx", "--save-outputs", "e.bin"], "e.bin"),
    (["e.onnx", "-o", "out.onnx", "--report-md", "e.bin"], "e.bin"),
    (["m.onnx", "--in-place", "--report-md", "m.onnx"], "m.onnx"),
    (["check", "m.onnx", "--report-md", "m.onnx"], "m.onnx"),
]


@pytest.mark.parametrize(("args", "victim"), SIDE_FILE_CASES, ids=[" ".join(a) for a, _ in SIDE_FILE_CASES])
def test_side_file_never_overwrites_an_input(tmp_path: Path, args: list[str], victim: str) -> None:
    _conv_bn_models(tmp_path)
    before = _files(tmp_path)

    result = subprocess.run([sys.executable, "-m", "bnfold", *args], cwd=tmp_path, capture_output=True, text=True)

    in_place_done = "--in-place" in args and result.returncode == 0
    if not in_place_done:
        assert (tmp_path / victim).read_bytes() == before[victim], "an input file was overwritten"
    else:  # in place, the model must at least still be a model (not the Markdown report)
        onnx.load(str(tmp_path / victim))
    assert result.returncode == 2, result.stdout + result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_report_md_does_not_replace_the_written_model(tmp_path: Path) -> None:
    _conv_bn_models(tmp_path)

    result = subprocess.run([sys.executable, "-m", "bnfold", "m.onnx", "-o", "out.onnx", "--report-md", "out.onnx"],
                            cwd=tmp_path, capture_output=True, text=True)

    if result.returncode == 0:
        onnx.checker.check_model(onnx.load(str(tmp_path / "out.onnx")))  # "wrote out.onnx" must be a model
    else:
        assert result.returncode == 2 and not (tmp_path / "out.onnx").exists()
