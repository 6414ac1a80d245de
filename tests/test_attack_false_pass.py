"""Attack: verification reports PASSED for comparisons that prove nothing (issue 11, C2/C3, still open).

- The default atol is 1e-5 x max|reference| of the whole output (runtime.py `compare_outputs`), so one
  element of 1e7 lets every other element of that output be off by 100: `bnfold.verify` passes two
  models whose outputs differ by 200 % on most elements.
- `--inputs` arrays that are all NaN (or Inf) give "max abs 0 ... ok", PASSED, exit 0, and the report
  says "seed 0" although no random input was used.
- Zero samples end in "unexpected error: IndexError".
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from helpers import conv_bn_model
from onnx import TensorProto, helper, numpy_helper

import bnfold
from bnfold.errors import VerificationError

C = 4


def _scaled(scale_of_element_1: float) -> onnx.ModelProto:
    """y = x * s + k, with k holding one huge element."""
    s = np.ones((1, 4), np.float32)
    s[0, 1] = scale_of_element_1
    k = np.zeros((1, 4), np.float32)
    k[0, 0] = 1e7
    graph = helper.make_graph(
        [helper.make_node("Mul", ["x", "s"], ["m"]), helper.make_node("Add", ["m", "k"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
        [numpy_helper.from_array(s, "s"), numpy_helper.from_array(k, "k")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def test_one_large_element_does_not_widen_the_others_tolerance() -> None:
    with pytest.raises(VerificationError):
        bnfold.verify(_scaled(1.0), _scaled(3.0))


def _conv_bn(path: Path) -> None:
    onnx.save(conv_bn_model(C), path)


@pytest.mark.parametrize("fill", [np.nan, np.inf])
def test_inputs_without_a_finite_comparison_do_not_pass(tmp_path: Path, fill: float) -> None:
    _conv_bn(tmp_path / "m.onnx")
    np.savez(tmp_path / "x.npz", x=np.full((1, C, 4, 4), fill, np.float32))

    result = subprocess.run([sys.executable, "-m", "bnfold", "m.onnx", "-o", "out.onnx", "--inputs", "x.npz"],
                            cwd=tmp_path, capture_output=True, text=True)

    assert result.returncode in (1, 2), result.stdout
    assert not (tmp_path / "out.onnx").exists()


def test_report_says_user_arrays_were_used(tmp_path: Path) -> None:
    _conv_bn(tmp_path / "m.onnx")
    np.savez(tmp_path / "x.npz", x=np.ones((1, C, 4, 4), np.float32))

    result = subprocess.run([sys.executable, "-m", "bnfold", "m.onnx", "-o", "out.onnx", "--inputs", "x.npz"],
                            cwd=tmp_path, capture_output=True, text=True)

    assert result.returncode == 0
    assert "seed" not in result.stdout


def test_zero_samples_is_a_clear_bad_input(tmp_path: Path) -> None:
    _conv_bn(tmp_path / "m.onnx")
    np.savez(tmp_path / "x.npz", x=np.zeros((0, 1, C, 4, 4), np.float32))

    result = subprocess.run([sys.executable, "-m", "bnfold", "m.onnx", "-o", "out.onnx", "--inputs", "x.npz"],
                            cwd=tmp_path, capture_output=True, text=True)

    assert result.returncode == 2
    assert "unexpected error" not in result.stderr and "IndexError" not in result.stderr
