"""Fold decisions resting on onnx shape inference where onnxruntime computes another shape.

bnfold treats the shapes onnx shape inference derives from the declared graph inputs and the
constants as proven (docs/graph-trust.md, docs/computed-constants.md). onnx's inference is not the
runtime, though: for MaxPool with ceil_mode=1 a window that would start inside the end padding is
dropped by the spec (opset 19 text) and by onnxruntime, but onnx 1.23's shape inference still
counts it. On a 4x4 input, kernel 2, stride 2, pads (0, 1), inference says 3x3, onnxruntime
produces 2x2 (on 6x6: 4x4 vs 3x3).

Everything derived from such an intermediate shape is then wrong at run time: a `Size`/`Shape` of
it evaluated as a constant (bnfold/constants.py `placeholder`, reached from
bnfold/graph.py:276-284 `_constant_input` through `static_info`, bnfold/graph.py:185-193), and how
much a SAME-padded Conv pads (bnfold/rules/layer_kinds.py:303-309 `_same_padding_input` ->
`_same_total_padding`), which decides whether a shift may fold forward into it.

Both folds are caught by verification (the folded tensor is compared), so `verification: PASSED`
stays true; but the fold is not exact, `--no-verify` writes a model computing something else, and
`bnfold check` counts the BN as foldable. Suggested fix: trust only shapes that inference derives
through ops whose inference is known to match the runtime, or at least never derive a *fold
decision or constant value* from the output shape of pooling ops with ceil_mode=1 (mark such dims
unknown in `bnfold/shapes.py:infer_value_infos`), falling back to `unknown_shape`. (Fixed: `bnfold.shapes` hides such pools from inference, so
nothing downstream of them is known; found by the third adversarial review.)
"""

from __future__ import annotations

import numpy as np
import pytest
from helpers import run
from onnx import TensorProto

import bnfold
from benchmarks.graph_builder import GraphBuilder

CEIL_POOL = dict(kernel_shape=[2, 2], strides=[2, 2], pads=[0, 0, 1, 1], ceil_mode=1)


def _outputs_agree(model, feeds) -> None:
    folded = bnfold.fold(model, verify=False).model
    for before, after in zip(run(model, feeds), run(folded, feeds)):
        np.testing.assert_allclose(after, before, rtol=1e-4, atol=1e-5)


def test_weight_computed_from_size_of_ceil_mode_pool_is_not_a_constant():
    """What: Conv weight = W0 * Cast(Size(MaxPool(x, ceil_mode=1))) then BN. bnfold evaluates Size
    as 1*3*3*3 = 27 (onnx inference), onnxruntime as 1*3*2*2 = 12; the folded Conv's weight is 27*W0*s
    instead of 12*W0*s (relative output error ~1.2).
    Why it matters: a fold that is not exact; with --no-verify the wrong model is written.
    Root cause: bnfold/graph.py:276-284 takes the placeholder of `static_info` (onnx inference,
    bnfold/shapes.py:59-73) as the proven dims of an intermediate tensor.
    Fix: do not count dims inferred through ops whose onnx inference disagrees with the runtime
    (ceil_mode pools) as fixed; refuse with weight_not_constant."""
    g = GraphBuilder(np.random.default_rng(1))
    x = g.input("x", [1, 3, 4, 4])
    pooled = g.node("MaxPool", [x], **CEIL_POOL)
    scale = g.node("Cast", [g.node("Size", [pooled])], to=TensorProto.FLOAT)
    weight = g.node("Mul", [g.const(g.weights(3, 3, 1, 1)), scale])
    y = g.bn(g.node("Conv", [x, weight]), 3)
    model = g.model([y, pooled])
    _outputs_agree(model, {"x": np.random.default_rng(0).uniform(-1, 1, (1, 3, 4, 4)).astype(np.float32)})
    skipped = bnfold.fold(model, verify=False).report.skipped
    bn, = [r for r in skipped if r.op_type == "BatchNormalization"]
    assert bn.reason == bnfold.Reason.WEIGHT_NOT_CONSTANT and "the dims of 'maxpool1'" in bn.detail


def test_forward_shift_into_same_conv_after_ceil_mode_pool():
    """What: x[1,3,6,6] -> MaxPool(ceil_mode=1) -> BN -> Conv(k2, s2, SAME_UPPER). onnx inference says
    the Conv input is 4x4 (no SAME padding at k2/s2), onnxruntime makes it 3x3 (one padded column and
    row). bnfold folds the BN's shift forward into the Conv as if nothing were padded: the padded
    border then misses the shift (relative error ~0.16 on the last row/column).
    Why it matters: the exactness condition of forward folds (ConvKind.forward_refusal) is decided on
    a shape the runtime does not have; the same applies to every SAME-padded Conv behind such a pool.
    Root cause: bnfold/rules/layer_kinds.py:303-309 `_same_padding_input` reads index.info (onnx
    inference with data propagation, bnfold/shapes.py:59-73) and trusts its spatial dims.
    Fix: treat spatial dims downstream of a ceil_mode pooling as unknown (refuse `unknown_shape`)."""
    g = GraphBuilder(np.random.default_rng(1))
    x = g.input("x", [1, 3, 6, 6])
    normalized = g.bn(g.node("MaxPool", [x], **CEIL_POOL), 3)
    y = g.conv(normalized, 3, 3, kernel=2, strides=[2, 2], auto_pad="SAME_UPPER")
    model = g.model([y])
    _outputs_agree(model, {"x": np.random.default_rng(0).uniform(-1, 1, (1, 3, 6, 6)).astype(np.float32)})
    skipped, = bnfold.fold(model, verify=False).report.skipped
    assert skipped.reason == bnfold.Reason.UNKNOWN_SHAPE


def test_shapes_after_a_floor_mode_pool_still_count_and_ceil_mode_folds_that_need_none_still_happen():
    """Only ceil_mode pools lose their inferred shapes: the same SAME-Conv forward fold behind a
    ceil_mode=0 pool (whose inference matches the runtime) goes through, and a Conv -> BN behind a
    ceil_mode pool (a backward fold, which needs no shape) is folded."""
    g = GraphBuilder(np.random.default_rng(2))
    x = g.input("x", [1, 3, 8, 8])
    floor_pool = dict(CEIL_POOL, ceil_mode=0, pads=[0, 0, 0, 0])
    normalized = g.bn(g.node("MaxPool", [x], **floor_pool), 3)
    y = g.conv(normalized, 3, 3, kernel=2, strides=[2, 2], auto_pad="SAME_UPPER")
    z = g.bn(g.conv(g.node("MaxPool", [x], **CEIL_POOL), 3, 3, kernel=1), 3)
    model = g.model([y, z])
    result = bnfold.fold(model)
    assert result.report.passed and not result.report.skipped
    assert "BatchNormalization" not in result.report.ops_after
