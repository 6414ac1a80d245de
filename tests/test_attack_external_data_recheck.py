"""Attack: the external-data location that is checked is not the file that is read.

`file_access.check_external_data` resolves each location (symlinks included) once, when the model is
loaded; `TensorStore._file` (tensors.py) later opens `base_dir / location` again by name, following
whatever is there *then*. Whoever can write in the model's folder while bnfold runs (a shared upload
folder, a CI workspace) swaps the checked file for a symlink to a file outside, and its bytes are
copied into the output with --no-verify. Low severity (needs a race with write access to the folder);
the general fix is to read what was checked: keep the opened file (descriptor) from the check, or
re-resolve and re-confine the path at every read.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import bnfold
from bnfold import file_access
from bnfold.errors import BadInputError

C = 4


@pytest.mark.xfail(strict=True, reason="external data is re-opened by name after the check (TOCTOU): a symlink "
                   "swapped in after loading is followed outside the model's folder")
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

    def check_then_swap(tensors, model_path):
        files = checked(tensors, model_path)
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
