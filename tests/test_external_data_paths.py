"""External data is read only from regular files inside the model's folder, at offsets within them.

The threat: a model is data a user received; its external-data entries name files. An entry that
is absolute, climbs out with `..`, or reaches out through a symlink would make bnfold copy a file
the user never named (an SSH key, /etc/shadow) into its output — with --no-verify verbatim, exit 0.
onnx.load and onnxruntime refuse such entries; bnfold refuses them in every entry point before any
byte is read, with one line naming the model, the tensor and the reason (CLI exit 2).
"""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from helpers import invoke, random_feeds, run
from onnx import TensorProto, helper, numpy_helper

import bnfold
from benchmarks.graph_builder import GraphBuilder
from bnfold import BadInputError, file_access

SECRET = b"TOP-SECRET-" * 100  # 1,100 bytes: enough for the 8x3x3x3 float weight (864 bytes)
WEIGHT_BYTES = 8 * 3 * 3 * 3 * 4


def _model() -> onnx.ModelProto:
    g = GraphBuilder(np.random.default_rng(3))
    x = g.input("x", [1, 3, 8, 8])
    return g.model([g.bn(g.conv(x, 3, 8, kernel=3, pads=[1, 1, 1, 1]), 8)])


def _point_weight_at(tensor: onnx.TensorProto, entries: dict[str, str]) -> None:
    tensor.ClearField("raw_data")
    tensor.ClearField("float_data")
    tensor.data_location = onnx.TensorProto.EXTERNAL
    for key, value in entries.items():
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value


def _write_model(folder: Path, entries: dict[str, str]) -> Path:
    """model.onnx in `folder` whose Conv weight is external data described by `entries`."""
    model = _model()
    weight = next(t for t in model.graph.initializer if t.name.startswith("w"))
    _point_weight_at(weight, entries)
    path = folder / "model.onnx"
    path.write_bytes(model.SerializeToString())
    return path


@pytest.fixture
def layout(tmp_path):
    """tmp/models/ (the model's folder) and tmp/outside/secret.bin (a file the user never named)."""
    models, outside = tmp_path / "models", tmp_path / "outside"
    models.mkdir()
    outside.mkdir()
    (outside / "secret.bin").write_bytes(SECRET)
    return models, outside


def _assert_refused_everywhere(path: Path, reason: str) -> None:
    """CLI fold (with and without verification) and check exit 2 with one line naming the model,
    the tensor and `reason`; the API raises; nothing is written beside the model."""
    before = sorted(p.name for p in path.parent.iterdir())
    for args in ([path, "--no-verify"], [path], ["check", path], [path, "--no-verify", "-o", path.parent / "o.onnx"]):
        result = invoke(args)
        assert result.exit_code == 2, (args, result.stdout, result.stderr)
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1, result.stderr
        assert str(path) in lines[0] and "tensor 'w" in lines[0] and reason in lines[0], lines[0]
    for call in (lambda: bnfold.fold(path, verify=False), lambda: bnfold.fold(path),
                 lambda: bnfold.fold(path, verify=False, output=path.parent / "api.onnx"),
                 lambda: bnfold.check(path), lambda: bnfold.verify(path, path)):
        with pytest.raises(BadInputError, match=reason):
            call()
    assert sorted(p.name for p in path.parent.iterdir()) == before


def test_absolute_location_is_refused(layout):
    models, outside = layout
    path = _write_model(models, {"location": str(outside / "secret.bin"), "length": str(WEIGHT_BYTES)})
    _assert_refused_everywhere(path, "is absolute")


@pytest.mark.parametrize("location", ["../outside/secret.bin", "sub/../../outside/secret.bin",
                                      "..\\outside\\secret.bin", "./../outside/secret.bin"])
def test_location_climbing_out_is_refused(layout, location):
    models, _ = layout
    (models / "sub").mkdir()
    path = _write_model(models, {"location": location, "length": str(WEIGHT_BYTES)})
    _assert_refused_everywhere(path, "leaves the model's folder")


def test_symlinked_file_pointing_outside_is_refused(layout):
    models, outside = layout
    (models / "w.bin").symlink_to(outside / "secret.bin")
    path = _write_model(models, {"location": "w.bin", "length": str(WEIGHT_BYTES)})
    _assert_refused_everywhere(path, "outside the model's folder")


def test_symlinked_folder_pointing_outside_is_refused(layout):
    models, outside = layout
    (models / "weights").symlink_to(outside, target_is_directory=True)
    path = _write_model(models, {"location": "weights/secret.bin", "length": str(WEIGHT_BYTES)})
    _assert_refused_everywhere(path, "outside the model's folder")


def test_the_model_folder_itself_reached_through_a_symlink_is_fine(layout, tmp_path):
    """Confinement compares resolved paths: a model opened through a symlinked folder, with data in
    a subfolder and behind a symlink that stays inside, folds exactly."""
    models, _ = layout
    (models / "weights").mkdir()
    model = _model()
    weight = next(t for t in model.graph.initializer if t.name.startswith("w"))
    (models / "weights" / "w.bin").write_bytes(weight.raw_data)
    (models / "alias.bin").symlink_to(models / "weights" / "w.bin")
    _point_weight_at(weight, {"location": "alias.bin", "offset": "0", "length": str(WEIGHT_BYTES)})
    (models / "model.onnx").write_bytes(model.SerializeToString())
    (tmp_path / "via").symlink_to(models, target_is_directory=True)
    result = bnfold.fold(tmp_path / "via" / "model.onnx", output=tmp_path / "out.onnx")
    assert result.report.passed and len(result.report.folded) == 1
    feeds = random_feeds(_model())
    np.testing.assert_allclose(run(onnx.load(str(tmp_path / "out.onnx")), feeds)[0], run(_model(), feeds)[0],
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("entries, reason", [
    ({"location": "w.bin", "lenght": "864"}, "unknown external-data key 'lenght'"),
    ({"location": "w.bin", "offset": "-4"}, "offset '-4' is not a non-negative decimal integer"),
    ({"location": "w.bin", "offset": "1e3"}, "offset '1e3' is not a non-negative decimal integer"),
    ({"location": "w.bin", "offset": " 4"}, "offset ' 4' is not a non-negative decimal integer"),
    ({"location": "w.bin", "length": "-1"}, "length '-1' is not a non-negative decimal integer"),
    ({"location": "w.bin", "length": "864.0"}, "length '864.0' is not a non-negative decimal integer"),
    ({"location": "w.bin", "offset": "99999999999999999999999"}, "lies beyond the end of 'w.bin'"),
    ({"location": "w.bin", "offset": "4096", "length": "864"}, "lies beyond the end of 'w.bin'"),
    ({"location": "w.bin", "offset": "1", "length": "1100"}, "lies beyond the end of 'w.bin'"),
    ({"location": "w.bin", "length": "860"}, "length 860 does not match its dims and type"),
    ({"location": "w.bin", "offset": "400"}, "864 bytes lies beyond the end of 'w.bin'"),
    ({"length": "864"}, "location '' is empty"),
    ({"location": "bnfold:pending", "offset": "0"}, "external data file missing"),
    ({"location": "missing.bin"}, "external data file missing"),
])
def test_malformed_entries_are_bad_input(layout, entries, reason):
    models, _ = layout
    (models / "w.bin").write_bytes(SECRET)
    path = _write_model(models, entries)
    _assert_refused_everywhere(path, reason)


def test_repeated_key_is_refused(layout):
    models, _ = layout
    (models / "w.bin").write_bytes(SECRET)
    model = _model()
    weight = next(t for t in model.graph.initializer if t.name.startswith("w"))
    _point_weight_at(weight, {"location": "w.bin", "offset": "0"})
    extra = weight.external_data.add()
    extra.key, extra.value = "offset", "128"
    path = models / "model.onnx"
    path.write_bytes(model.SerializeToString())
    _assert_refused_everywhere(path, "key 'offset' repeated")


@pytest.mark.parametrize("kind", ["folder", "fifo"])
def test_data_location_must_be_a_regular_file(layout, kind):
    models, _ = layout
    if kind == "folder":
        (models / "w.bin").mkdir()
    else:
        os.mkfifo(models / "w.bin")  # reading it would block forever
    path = _write_model(models, {"location": "w.bin", "length": str(WEIGHT_BYTES)})
    _assert_refused_everywhere(path, "not a regular file")


def _outside_constant(location: str) -> onnx.TensorProto:
    tensor = numpy_helper.from_array(np.zeros(4, np.float32), "k")
    _point_weight_at(tensor, {"location": location, "length": "16"})
    return tensor


def test_tensors_in_subgraphs_functions_and_sparse_tensors_are_checked(layout):
    """Every scope: an If branch's initializer, a model-local function's Constant node, a sparse
    initializer. None of them is folded, yet each would have its file read (or its entry copied).
    The escape goes through a symlink: onnx's checker does not resolve those."""
    models, outside = layout
    (models / "link.bin").symlink_to(outside / "secret.bin")
    location = "link.bin"
    base = _model()
    cond = helper.make_tensor("cond", onnx.TensorProto.BOOL, [], [True])
    branch = helper.make_graph([helper.make_node("Identity", ["k"], ["kb"])], "b", [],
                               [helper.make_tensor_value_info("kb", onnx.TensorProto.FLOAT, [4])],
                               [_outside_constant(location)])
    with_if = onnx.ModelProto()
    with_if.CopyFrom(base)
    with_if.graph.initializer.append(cond)
    with_if.graph.node.append(helper.make_node("If", ["cond"], ["side"], then_branch=branch, else_branch=branch))
    with_if.graph.output.append(helper.make_tensor_value_info("side", onnx.TensorProto.FLOAT, [4]))

    with_function = onnx.ModelProto()
    with_function.CopyFrom(base)
    with_function.opset_import.append(helper.make_opsetid("local", 1))
    constant = helper.make_node("Constant", [], ["k"], value=_outside_constant(location))
    with_function.functions.append(helper.make_function("local", "K", [], ["k"], [constant],
                                                        [helper.make_opsetid("", 17)]))
    with_function.graph.node.append(helper.make_node("K", [], ["side"], domain="local"))
    with_function.graph.output.append(helper.make_tensor_value_info("side", onnx.TensorProto.FLOAT, [4]))

    with_sparse = onnx.ModelProto()
    with_sparse.CopyFrom(base)
    values = _outside_constant(location)
    values.name = "sv"
    indices = numpy_helper.from_array(np.arange(4, dtype=np.int64), "si")
    with_sparse.graph.sparse_initializer.append(helper.make_sparse_tensor(values, indices, [8]))

    for model in (with_if, with_function, with_sparse):
        path = models / "model.onnx"
        path.write_bytes(model.SerializeToString())
        for call in (lambda: bnfold.fold(path, verify=False), lambda: bnfold.check(path)):
            with pytest.raises(BadInputError, match=r"tensor '(k|sv)'.*outside the model's folder"):
                call()
        result = invoke([path, "--no-verify"])
        assert result.exit_code == 2 and "outside the model's folder" in result.stderr, result.stderr
        assert not (models / "model.folded.onnx").exists()


def test_in_memory_model_with_external_data_is_refused(layout):
    """A ModelProto has no folder to confine its entries to (onnxruntime would resolve them against
    the working directory): refused in fold, check and verify, whatever the location."""
    models, _ = layout
    model = _model()
    weight = next(t for t in model.graph.initializer if t.name.startswith("w"))
    (models / "w.bin").write_bytes(weight.raw_data)
    _point_weight_at(weight, {"location": "w.bin", "length": str(WEIGHT_BYTES)})
    plain = _model()
    for call in (lambda: bnfold.fold(model, verify=False), lambda: bnfold.fold(model), lambda: bnfold.check(model),
                 lambda: bnfold.verify(model, plain), lambda: bnfold.verify(plain, model)):
        with pytest.raises(BadInputError, match="in-memory model has no folder"):
            call()


@pytest.mark.parametrize("target", ["/dev/zero", "fifo", "socket"])
@pytest.mark.parametrize("mode", ["fold", "check"])
def test_only_regular_files_are_models(tmp_path, target, mode):
    """/dev/zero would be read until memory runs out; opening a FIFO blocks forever. The command
    runs in a subprocess with a timeout, so a regression fails instead of hanging the suite."""
    if target == "fifo":
        path = tmp_path / "model.onnx"
        os.mkfifo(path)
    elif target == "socket":
        import socket

        path = tmp_path / "model.onnx"
        server = socket.socket(socket.AF_UNIX)
        server.bind(str(path))
    else:
        path = Path(target)
        if not path.exists():
            pytest.skip("no /dev/zero here")
    process = subprocess.run([sys.executable, "-m", "bnfold", mode, str(path)], capture_output=True, text=True,
                             timeout=120, check=False)
    assert process.returncode == 2, process.stderr
    lines = process.stderr.strip().splitlines()
    assert len(lines) == 1 and str(path) in lines[0] and "not a regular file" in lines[0], process.stderr
    with pytest.raises(BadInputError, match="not a regular file"):
        bnfold.check(path)


# --- the checked external-data file is the one read ------------------------------------------------
# `file_access.check_external_data` resolves each location (symlinks included) once, when the model is
# loaded. Whoever can write in the model's folder while bnfold runs (a shared upload folder, a CI
# workspace) could swap the checked file for a symlink to a file outside, and its bytes were copied
# into the output with --no-verify, because the store re-opened the file by name. The check now records
# each file's identity (device, inode) and a read opens that very file (O_NOFOLLOW) or fails.


C = 4


def test_data_file_swapped_for_a_symlink_after_the_check_is_not_read(tmp_path: Path, monkeypatch) -> None:
    folder = tmp_path / "model"
    folder.mkdir()
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.normal(size=(C, C, 3, 3)).astype(np.float32), "w")]
    for name, v in (("g", np.ones(C)), ("b", np.zeros(C)), ("m", np.zeros(C)), ("v", np.ones(C) - 1e-5)):
        inits.append(numpy_helper.from_array(v.astype(np.float32), name))
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["c"]), helper.make_node("BatchNormalization", ["c", "g", "b", "m", "v"], ["y"])],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, C, 4, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, C, 2, 2])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, folder / "m.onnx", save_as_external_data=True, location="w.bin", size_threshold=0)
    # Outside the folder: the same layout, but the weight region holds 7.0 everywhere.
    saved = onnx.load(str(folder / "m.onnx"), load_external_data=False)
    entry = {e.key: e.value for e in next(t for t in saved.graph.initializer if t.name == "w").external_data}
    data = bytearray((folder / "w.bin").read_bytes())
    offset = int(entry.get("offset", 0))
    data[offset:offset + C * C * 9 * 4] = np.full((C, C, 3, 3), 7.0, np.float32).tobytes()
    secret = tmp_path / "secret.bin"
    secret.write_bytes(bytes(data))

    checked = file_access.check_external_data

    def check_then_swap(tensors, model_path, *opened):
        files = checked(tensors, model_path, *opened)
        os.unlink(folder / "w.bin")  # the race: replaced right after the check
        os.symlink(secret, folder / "w.bin")
        return files

    monkeypatch.setattr(file_access, "check_external_data", check_then_swap)
    try:
        result = bnfold.fold(folder / "m.onnx", verify=False)
    except BadInputError:
        return  # refused: fine
    weight = next(t for t in result.model.graph.initializer if t.name == result.model.graph.node[0].input[1])
    assert not np.allclose(numpy_helper.to_array(weight), 7.0), "the secret file's bytes reached the output"


def test_a_data_file_replaced_between_check_and_open_is_refused(tmp_path: Path, monkeypatch) -> None:
    """A read opens the very inode that was checked: replaced in between (here by a FIFO, which a
    plain open would block on), it is refused instead of read."""
    model = _model()
    onnx.save(model, tmp_path / "m.onnx", save_as_external_data=True, location="w.bin", size_threshold=0)
    real_stat = file_access.os.stat

    def stat_then_replace(path, *args, **kwargs):
        status = real_stat(path, *args, **kwargs)
        if str(path).endswith("w.bin") and stat.S_ISREG(status.st_mode):
            os.unlink(path)
            os.mkfifo(path)
        return status

    monkeypatch.setattr(file_access.os, "stat", stat_then_replace)
    with pytest.raises(BadInputError, match="w.bin changed since it was checked"):
        bnfold.fold(tmp_path / "m.onnx", verify=False)


def test_checked_data_files_are_closed_with_the_result(tmp_path: Path) -> None:
    import gc

    model = _model()
    onnx.save(model, tmp_path / "m.onnx", save_as_external_data=True, location="w.bin", size_threshold=0)
    before = len(os.listdir("/proc/self/fd"))
    for _ in range(5):
        result = bnfold.fold(tmp_path / "m.onnx", verify=False)
        result.save(tmp_path / "out.onnx")
        del result
    gc.collect()
    assert len(os.listdir("/proc/self/fd")) <= before
