"""External data held by tensors that are neither main-graph initializers nor node-attribute
tensors of the main graph — a Constant node inside a model-local function, a sparse initializer.

bnfold streams main-graph initializers (and materialises attribute/subgraph tensors) into its output,
but these kept their external-data entry pointing at the *input's* file name, which the output then
resolves against the *output's* folder. Verification runs the in-memory candidate, which onnxruntime
resolves against the current directory, so it passed while the delivered file could not be loaded, or —
when the output folder holds a file of that name — read someone else's bytes. The input check, too,
ran the onnx checker on a proto whose locations it resolved against the current directory. (Fixed:
every tensor walk is `bnfold.walk.iter_tensors`, and the loader reads every tensor outside the main
graph's initializers from the checked files, so no later step resolves a location on its own.)
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

C = 4
DATA = "w.bin"


def _externalize(tensor: onnx.TensorProto, folder: Path) -> None:
    raw = numpy_helper.to_array(tensor).tobytes()
    with open(folder / DATA, "ab") as handle:
        offset = handle.tell()
        handle.write(raw)
    for field in ("float_data", "int64_data", "raw_data"):
        tensor.ClearField(field)
    tensor.data_location = TensorProto.EXTERNAL
    for key, value in (("location", DATA), ("offset", str(offset)), ("length", str(len(raw)))):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value


def _model(folder: Path, kind: str) -> Path:
    """Conv -> BN (foldable) -> a 300-value constant summed in, held externally in `folder/w.bin`."""
    rng = np.random.default_rng(0)
    folder.mkdir()
    values = np.arange(1, 301, dtype=np.float32)
    inits = [numpy_helper.from_array(rng.normal(size=(C, C, 1, 1)).astype(np.float32), "w")]
    for name, v in (("g", rng.uniform(0.5, 2, C)), ("b", rng.normal(size=C)), ("m", rng.normal(size=C)),
                    ("v", rng.uniform(0.5, 2, C))):
        inits.append(numpy_helper.from_array(v.astype(np.float32), name))
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"]),
             helper.make_node("BatchNormalization", ["c", "g", "b", "m", "v"], ["y0"])]
    sparse, functions, opsets = [], [], [helper.make_opsetid("", 17)]
    if kind == "function":
        constant = numpy_helper.from_array(values, "k_value")
        _externalize(constant, folder)
        functions.append(helper.make_function(
            "local", "F", ["a"], ["b"],
            [helper.make_node("Constant", [], ["k"], value=constant),
             helper.make_node("ReduceSum", ["k"], ["ks"], keepdims=0), helper.make_node("Add", ["a", "ks"], ["b"])],
            [helper.make_opsetid("", 17)]))
        opsets.append(helper.make_opsetid("local", 1))
        nodes.append(helper.make_node("F", ["y0"], ["y"], domain="local"))
    elif kind == "constant":  # a Constant node of the main graph
        constant = numpy_helper.from_array(values, "k_value")
        _externalize(constant, folder)
        nodes += [helper.make_node("Constant", [], ["k"], value=constant),
                  helper.make_node("ReduceSum", ["k"], ["ks"], keepdims=0), helper.make_node("Add", ["y0", "ks"], ["y"])]
    else:
        values_tensor = numpy_helper.from_array(values, "sp")
        _externalize(values_tensor, folder)
        sparse.append(helper.make_sparse_tensor(values_tensor, numpy_helper.from_array(np.arange(300), "sp_i"), [300]))
        nodes += [helper.make_node("ReduceSum", ["sp"], ["r"], keepdims=0), helper.make_node("Add", ["y0", "r"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, C, 4, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, C, 4, 4])], inits,
                              sparse_initializer=sparse)
    model = helper.make_model(graph, opset_imports=opsets, functions=functions)
    model.ir_version = 8
    path = folder / "m.onnx"
    onnx.save(model, path)
    return path


def _run(path: Path, x: np.ndarray) -> np.ndarray:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


@pytest.mark.parametrize("kind", ["function", "sparse"])
def test_output_in_another_folder_is_the_verified_model(tmp_path: Path, kind: str) -> None:
    source = _model(tmp_path / "A", kind)
    (tmp_path / "B").mkdir()
    # A file of the same name in the output folder (e.g. another model's weights), other bytes.
    (tmp_path / "B" / DATA).write_bytes(bytes(b ^ 0x40 for b in (source.parent / DATA).read_bytes()))
    output = tmp_path / "B" / "out.onnx"
    x = np.random.default_rng(1).uniform(-1, 1, (1, C, 4, 4)).astype(np.float32)
    expected = _run(source, x)  # onnxruntime loads the input model

    result = subprocess.run([sys.executable, "-m", "bnfold", "m.onnx", "-o", str(output)],
                            cwd=source.parent, capture_output=True, text=True)

    if result.returncode == 0:  # a PASSED output must be the model that was verified
        np.testing.assert_allclose(_run(output, x), expected, rtol=1e-4, atol=1e-4)
    else:  # or a clean refusal, nothing written
        assert result.returncode == 2 and not output.exists()


@pytest.mark.parametrize("kind", ["function", "sparse", "constant"])
def test_input_check_does_not_depend_on_current_directory(tmp_path: Path, kind: str) -> None:
    source = _model(tmp_path / "A", kind)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    _run(source, np.zeros((1, C, 4, 4), np.float32))  # onnxruntime accepts the model from any cwd

    from_folder = subprocess.run([sys.executable, "-m", "bnfold", "check", str(source)], cwd=source.parent,
                                 capture_output=True, text=True)
    from_elsewhere = subprocess.run([sys.executable, "-m", "bnfold", "check", str(source)], cwd=elsewhere,
                                    capture_output=True, text=True)

    assert from_elsewhere.returncode == from_folder.returncode, from_elsewhere.stderr
