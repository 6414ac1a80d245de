"""Attack: a correct fold is rejected because the only output sits behind a discontinuous op
(issue 11 C4, still open: verification compares graph outputs only, runtime.py `compare_outputs`).

Two output channels compute the same function two ways: channel 0 is Conv(w) followed by a BN scale
of 3, channel 1 is Conv(fl(3w)) with scale 1. In the original the two channels differ by rounding;
folded, both hold the weight fl(3w) exactly and tie. `TopK(k=1)` over the channels then picks other
indices at some positions, the integer output differs, and bnfold exits 1 although every folded
weight is within 0.5 ulp and the folded tensor itself matches. Expected: the BN output (which keeps its
name) is compared; the TopK output is reported as not comparable; exit 0.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

C = 8


def test_correct_fold_behind_topk_is_not_rejected(tmp_path: Path) -> None:
    w = np.random.default_rng(5).normal(size=(1, C, 1, 1)).astype(np.float32)
    weight = np.concatenate([w, (w.astype(np.float64) * 3).astype(np.float32)], 0)
    inits = [numpy_helper.from_array(a, n) for n, a in (
        ("w", weight), ("g", np.array([3, 1], np.float32)), ("b", np.zeros(2, np.float32)),
        ("m", np.zeros(2, np.float32)), ("v", np.ones(2, np.float32)), ("k", np.array([1], np.int64)))]
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["c"]),
         helper.make_node("BatchNormalization", ["c", "g", "b", "m", "v"], ["s"], epsilon=0.0),
         helper.make_node("TopK", ["s", "k"], ["values", "index"], axis=1)],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, C, 16, 16])],
        [helper.make_tensor_value_info("index", TensorProto.INT64, [1, 1, 16, 16])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, tmp_path / "m.onnx")

    result = subprocess.run([sys.executable, "-m", "bnfold", "m.onnx", "-o", "out.onnx"], cwd=tmp_path,
                            capture_output=True, text=True)

    assert result.returncode == 0, result.stdout + result.stderr
    assert (tmp_path / "out.onnx").exists()
