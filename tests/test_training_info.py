"""Attack: a model with training info (ModelProto.training_info) whose algorithm updates the BN's
running statistics and the Conv weight.

bnfold folds the BN (removing initializers `m`, `v`, ... and giving the Conv a new weight) but keeps
`training_info` as it was: its `update_binding` still names `m` — no longer an initializer, which the
ONNX spec requires of every binding key — and its algorithm graph still reads `m`. The output is a
model whose training description is broken, reported `verification: PASSED`: verification runs only
inference, and neither the folds (`walk.iter_scopes` leaves training graphs out, walk.py:84-118, as
it should) nor anything else looks at what the training graphs *read*.

Why it matters: a PASSED output that is no longer a valid ONNX model for a training runtime (and the
onnx checker does not look at training info, so nothing else notices). Fix: refuse folds whose
parameters a training-info graph reads or binds (a reason such as `used_by_training_info`), or drop
training_info with a reported repair.
"""

from __future__ import annotations

import numpy as np
import onnx
from helpers import conv_bn_model
from onnx import TensorProto, helper, numpy_helper

import bnfold


def _with_training_info() -> onnx.ModelProto:
    model = conv_bn_model()  # x -> Conv(w) -> BN(g, b, m, v) -> y
    info = model.training_info.add()
    info.algorithm.CopyFrom(helper.make_graph(
        [helper.make_node("Mul", ["m", "decay"], ["m_new"])], "algorithm", [],
        [helper.make_tensor_value_info("m_new", TensorProto.FLOAT, [4])],
        [numpy_helper.from_array(np.array(0.9, np.float32), "decay")]))
    binding = info.update_binding.add()
    binding.key, binding.value = "m", "m_new"
    onnx.checker.check_model(model)
    return model


def test_training_info_never_binds_a_folded_away_initializer() -> None:
    result = bnfold.fold(_with_training_info())
    model = result.model
    initializers = {tensor.name for tensor in model.graph.initializer}
    stale = [binding.key for info in model.training_info for binding in info.update_binding
             if binding.key not in initializers]
    assert not stale, f"update_binding names initializers the fold removed: {stale}"


def test_a_bn_whose_statistics_are_trained_is_refused_with_the_reason() -> None:
    result = bnfold.fold(_with_training_info())
    assert result.report.ops_after.get("BatchNormalization") == 1
    skipped, = result.report.skipped
    assert skipped.reason == bnfold.Reason.PARAMS_NOT_CONSTANT
    assert skipped.detail == "mean 'm' is an initializer the model's training_info updates"


def test_training_info_that_reads_none_of_the_fold_does_not_block_it() -> None:
    model = _with_training_info()
    model.graph.initializer.append(numpy_helper.from_array(np.zeros(4, np.float32), "counter"))
    binding = model.training_info[0].update_binding[0]
    binding.key = "counter"  # trains an initializer the fold does not touch
    model.training_info[0].algorithm.node[0].input[0] = "counter"
    result = bnfold.fold(model)
    assert result.report.passed and "BatchNormalization" not in result.report.ops_after
    assert {t.name for t in result.model.graph.initializer} >= {"counter"}
    assert result.model.training_info[0].update_binding[0].key == "counter"
