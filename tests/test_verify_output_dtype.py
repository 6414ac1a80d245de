"""Attack: `bnfold.verify(original, candidate)` lets the candidate choose its own tolerance.

`runtime._compare_runs` (runtime.py:195-210) picks each output's tolerance from the element type the
*candidate* declares (`output_types` from `folded.graph.output`), and `compare.compare_arrays`
(compare.py:80-99) compares shapes but never dtypes. `fold` never changes an output's type, but the
public `verify` compares *any* two models: a candidate that multiplies the float32 output by 1.008
and casts it to float16 (declaring a float16 output) is compared with float16's rtol 1e-2 instead of
float32's 1e-4 — `verify` returns a pass for a model 0.8 % off, with a different output type.

Why it matters: `verify` is the documented way to check a model folded (or edited) elsewhere; its
PASS must not depend on what the candidate claims. Fix: take each output's element type (hence the
tolerance) from the *original*, and fail an output whose dtype differs between the two models.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from helpers import conv_bn_model
from onnx import TensorProto, helper, numpy_helper

import bnfold
from bnfold.errors import VerificationError


def _off_by_08_percent_in_float16(original: onnx.ModelProto) -> onnx.ModelProto:
    candidate = onnx.ModelProto()
    candidate.CopyFrom(original)
    graph = candidate.graph
    graph.node[1].output[0] = "y32"
    graph.node.extend([helper.make_node("Mul", ["y32", "fudge"], ["y_scaled"]),
                       helper.make_node("Cast", ["y_scaled"], ["y"], to=TensorProto.FLOAT16)])
    graph.initializer.append(numpy_helper.from_array(np.array(1.008, np.float32), "fudge"))
    graph.output[0].type.tensor_type.elem_type = TensorProto.FLOAT16
    onnx.checker.check_model(candidate)
    return candidate


def test_candidate_cannot_loosen_its_tolerance_by_declaring_float16() -> None:
    original = conv_bn_model()
    with pytest.raises(VerificationError):
        bnfold.verify(original, _off_by_08_percent_in_float16(original))
