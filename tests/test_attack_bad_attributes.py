"""Attack: Conv attributes the checker lets through but the spec forbids must be a clean refusal (or
bad input), never an internal error.

A branch sum `Conv3x3(x, dilations=[0, 0]) + Conv1x1(x)`: the slack of the 3x3 is 0 (no padding, zero
dilation), equal to the 1x1's, so `branch_math._sum_kernels` reaches `(begin_a - begin_b) % dilation`
with dilation 0 -> "unexpected error: ZeroDivisionError" (exit 2 via the catch-all, also with
--no-verify and in `bnfold check`). `conv_branch` (rules/branches.py) takes strides/dilations/group as
given; values < 1 should refuse the merge (unsupported_attribute) before any arithmetic.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

C = 4


def _branch_sum(path: Path, **conv_attrs) -> None:
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.normal(size=(C, C, 3, 3)).astype(np.float32), "w3"),
             numpy_helper.from_array(rng.normal(size=(C, C, 1, 1)).astype(np.float32), "w1")]
    for name, v in (("g", rng.uniform(0.5, 2, C)), ("b", rng.normal(size=C)), ("m", rng.normal(size=C)),
                    ("v", rng.uniform(0.5, 2, C))):
        inits.append(numpy_helper.from_array(v.astype(np.float32), name))
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w3"], ["c3"], **conv_attrs),
         helper.make_node("BatchNormalization", ["c3", "g", "b", "m", "v"], ["n3"]),
         helper.make_node("Conv", ["x", "w1"], ["c1"]), helper.make_node("Add", ["n3", "c1"], ["y"])],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, C, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, None, None, None])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, path)


@pytest.mark.parametrize("args", [["m.onnx", "-o", "out.onnx"], ["m.onnx", "-o", "out.onnx", "--no-verify"],
                                  ["check", "m.onnx"]], ids=["fold", "no-verify", "check"])
def test_zero_dilation_is_no_internal_error(tmp_path: Path, args: list[str]) -> None:
    _branch_sum(tmp_path / "m.onnx", dilations=[0, 0])

    result = subprocess.run([sys.executable, "-m", "bnfold", *args], cwd=tmp_path, capture_output=True, text=True)

    assert "unexpected error" not in result.stderr, result.stderr
    assert result.returncode in (0, 1, 2)
