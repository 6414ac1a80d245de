"""Attack: an external-data entry without `length` whose file holds more than the tensor.

The ONNX spec makes `length` optional; onnxruntime then reads exactly the tensor's size
(dims x element size) from `offset`, so such a model loads and runs. bnfold instead takes "no
length" to mean "to the end of the file" (`TensorStore.byte_length`, tensors.py:123-130), and
`file_access.check_external_data` (file_access.py:49-70) never reconciles an entry with the tensor's
dims. So:

* the loader's `TensorStore.materialize(nested_only=True)` (model_io.py:70, tensors.py:176-186)
  reads the whole rest of the file into *every* Constant / subgraph / function tensor that names it
  — a 16-byte tensor pointing at a multi-GB weight file costs that many GB per tensor (N Constants
  cost N times the file), and
* the writer streams the rest of the file as a main-graph tensor's data (`TensorStore.chunks`), so
  with `--no-verify` bnfold exits 0 having written a model onnxruntime refuses ("raw_data size
  does not match expected size"), from an input onnxruntime runs; with verification it is a
  "verification failed" (exit 1) on a valid model, not a fold.

Fix: in `check_external_data`, derive the tensor's byte size from dims and type; refuse (exit 2) a
`length` that disagrees, and when `length` is absent use that size (refusing if it passes the end of
the file) — and have `TensorStore.byte_length` use the same size, so nothing reads past the tensor.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
from crafted_models import conv_bn_plus_constant, external_tensor

from bnfold.errors import BadInputError
from bnfold.model_io import load_model

FILE_FLOATS = 1 << 16  # a 256 kB data file; the tensor needs 16 bytes of it


def _data_file(folder: Path) -> None:
    (folder / "w.bin").write_bytes(np.arange(FILE_FLOATS, dtype=np.float32).tobytes())


def test_nested_tensor_without_length_reads_only_its_own_bytes(tmp_path: Path) -> None:
    _data_file(tmp_path)
    path = conv_bn_plus_constant(tmp_path, external_tensor("k", "w.bin", (4,)), as_node=True)
    try:
        loaded = load_model(path)
    except BadInputError:
        return  # refusing the entry is fine too
    constant = next(node for node in loaded.model.graph.node if node.op_type == "Constant")
    read = len(constant.attribute[0].t.raw_data)
    assert read == 16, f"read {read} bytes into memory for a 16-byte tensor"


def test_no_verify_output_of_tensor_without_length_is_loadable(tmp_path: Path) -> None:
    _data_file(tmp_path)
    path = conv_bn_plus_constant(tmp_path, external_tensor("k", "w.bin", (4,)), as_node=False)
    feeds = {"x": np.ones((1, 4, 4, 4), np.float32)}
    ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feeds)  # a valid model
    output = tmp_path / "out.onnx"
    run = subprocess.run([sys.executable, "-m", "bnfold", str(path), "-o", str(output), "--no-verify", "-q"],
                         capture_output=True, text=True)
    if run.returncode == 2:
        return  # refused as bad input: fine
    assert run.returncode == 0, run.stderr
    ort.InferenceSession(str(output), providers=["CPUExecutionProvider"]).run(None, feeds)
