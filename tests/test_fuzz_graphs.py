"""Property-based fuzzing of `bnfold.fold` on random, valid ONNX graphs.

The `graphs()` strategy (random_graphs.py) grows a small graph op by op from one input, tracking every value's shape
itself: chains and branches of Conv / ConvTranspose / Gemm / MatMul / BatchNormalization / Relu /
residual Add / channel Concat / Mul-Add-Sub-Div by a constant (per-channel, scalar, `c - x`, and the
traps: a [W]-shaped constant, a constant varying along H or the batch, a full-shape constant). It also
shares weights between layers, gives values several consumers, makes intermediate values (and BN
producers) graph outputs, stores some constants as Constant nodes or as overridable initializers
(IR >= 4 graph inputs), and draws float64 graphs (without Conv, which onnxruntime's CPU provider
only runs in float32).

Layout-only nodes (Transpose, Reshape, Flatten, Squeeze, Unsqueeze, Identity) go between a layer and
the BN / Mul-Add chain after it, and between a chain and the layer after it: the layouts exporters
write (Linear -> view [-1|0|N, C, 1, 1] -> BN2d, MatMul [B, T, C] -> Transpose(0, 2, 1) -> BN1d,
NCHW -> NHWC -> Mul/Add by [C], BN2d -> Flatten -> Linear) and random ones: any permutation,
reshapes that merge or split axes (through the channel axis too) or reinterpret the dims in another
order, axes as inputs (opset 13) or attributes. Constants after a layout vary along the axis the
layer's channels went to, or along another. Pure scales (Mul, Div, a BN with shift 0) feed
ConvTransposes and padded Convs; BNs feed SAME_UPPER/SAME_LOWER stride-2 Convs with kernels 2 and 3
on even and odd sizes (padding 0 for some, not for others).

Properties (for every generated model):
- `bnfold.fold` succeeds and never mutates its input;
- the folded model passes `onnx.checker.check_model(full_check=True)`;
- its outputs equal the original's under onnxruntime with optimizations off;
- folding it again folds nothing and leaves the serialized bytes identical;
- the BN count never increases, and every BN removed is reported as folded;
- every remaining BN has exactly one skipped record with a reason code.

Plus one property with `verify=True` asserting `report.verification.passed`, and explicit
regression tests for the failures the fuzzer found (the `@example`s below).

Example count, per property: BNFOLD_FUZZ_EXAMPLES if set, else max(50, the hypothesis profile's
max_examples), i.e. 50 with the "dev" profile and 200 with "ci". BNFOLD_FUZZ_EXAMPLES=1000 runs the
1,000 examples the issue asks for. BNFOLD_FUZZ_STRICT=1 turns a generator bug (an invalid model,
normally discarded with `assume`) into an error.
"""

from __future__ import annotations

import os
from collections import Counter

import numpy as np
import onnx
import pytest
from helpers import random_feeds, run
from hypothesis import example, given, note, settings
from hypothesis.errors import InvalidArgument
from random_graphs import FuzzModel, graphs

import bnfold
from benchmarks.graph_builder import GraphBuilder
from bnfold.report import Reason

FUZZ_EXAMPLES = int(os.environ.get("BNFOLD_FUZZ_EXAMPLES") or max(50, settings.default.max_examples))
TOLERANCE = {np.dtype(np.float32): (1e-4, 1e-5), np.dtype(np.float64): (1e-9, 1e-12)}  # (rtol, atol)


# --- helpers ---------------------------------------------------------------------------------------


def _note(text: str) -> None:
    """`hypothesis.note` inside a property; a no-op in the plain regression tests."""
    try:
        note(text)
    except InvalidArgument:
        pass


def _ops(model: onnx.ModelProto, op_type: str) -> list[onnx.NodeProto]:
    return [n for n in model.graph.node if n.op_type == op_type]


def _run_by_name(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return dict(zip([o.name for o in model.graph.output], run(model, feeds)))


def _assert_same_outputs(original: onnx.ModelProto, folded: onnx.ModelProto, dtype: np.dtype) -> None:
    feeds = random_feeds(original)
    expected = _run_by_name(original, feeds)
    got = _run_by_name(folded, feeds)
    assert list(got) == list(expected), "graph outputs changed"
    rtol, atol = TOLERANCE[dtype]
    for name in expected:
        # Rounding differences grow with the values flowing through the graph (outputs near 700
        # differ by more than 1e-5 with every weight within 0.5 ulp): atol scales with the output,
        # as bnfold's own verification does.
        finite = np.abs(expected[name][np.isfinite(expected[name])])
        scale = max(1.0, float(finite.max())) if finite.size else 1.0
        np.testing.assert_allclose(got[name], expected[name], rtol=rtol, atol=atol * scale, err_msg=f"output {name}")


def check_fold_properties(fuzz: FuzzModel) -> None:
    model = fuzz.model
    _note(onnx.printer.to_text(model.graph))
    before = model.SerializeToString()
    result = bnfold.fold(model, verify=False)
    folded = result.model
    report = result.report
    _note(f"folded: {[(r.node, r.op_type, r.direction, r.into) for r in report.folded]}")
    _note(f"skipped: {[(r.node, r.reason.value, r.detail) for r in report.skipped]}")

    assert model.SerializeToString() == before, "fold mutated its input model"
    onnx.checker.check_model(folded, full_check=True)
    assert [i.name for i in folded.graph.input] == [i.name for i in model.graph.input]
    assert [o.name for o in folded.graph.output] == [o.name for o in model.graph.output]

    bn_before, bn_after = len(_ops(model, "BatchNormalization")), len(_ops(folded, "BatchNormalization"))
    assert bn_after <= bn_before, "the number of BN nodes increased"
    folded_bns = [r for r in report.folded if r.op_type == "BatchNormalization"]
    assert len(folded_bns) == bn_before - bn_after, "BNs removed and BNs reported as folded differ"

    skipped = Counter(r.output for r in report.skipped)
    for node in _ops(folded, "BatchNormalization"):
        assert skipped[node.output[0]] == 1, f"remaining BN '{node.output[0]}' has {skipped[node.output[0]]} " \
                                             "skipped records"
    for record in report.skipped:
        assert isinstance(record.reason, Reason) and record.detail
        # Every record names a node still in the model, of its op type (BNs, and maps by constants
        # left next to a layer).
        assert record.output in {n.output[0] for n in _ops(folded, record.op_type)}

    _assert_same_outputs(model, folded, fuzz.dtype)

    again = bnfold.fold(folded, verify=False)
    assert again.report.folded == [], f"second fold folded {again.report.folded}"
    assert again.model.SerializeToString() == folded.SerializeToString(), "second fold changed the model"


# --- reproducers of failures found by the fuzzer ---------------------------------------------------


def _pre_and_post_of_different_widths() -> onnx.ModelProto:
    """BN(2 ch) -> unpadded 1x1 Conv 2->1 -> BN(1 ch): a forward and a backward fold into one Conv,
    with chains of different channel counts (verify's probe once mixed both chains' constants)."""
    g = GraphBuilder(np.random.default_rng(1))
    x = g.input("x", [1, 2, 4, 4])
    return g.model([g.bn(g.conv(g.bn(x, 2), 2, 1, kernel=1, bias=False), 1)])


def _conv_folded_in_two_passes() -> onnx.ModelProto:
    """x -> m1 = Mul(k1) -> {m2 = Mul(k2) -> conv_a, conv_b}. Pass 1 folds m2 forward into conv_a
    (m1 has a non-layer consumer); pass 2 folds m1 forward into conv_a and conv_b."""
    g = GraphBuilder(np.random.default_rng(2))
    x = g.input("x", [1, 4, 4, 4])
    m1 = g.node("Mul", [x, g.const(np.array([1.5, 0.8, 1.7, 1.6]).reshape(4, 1, 1), "k")])
    m2 = g.node("Mul", [m1, g.const(np.array([1.3, -0.1, 1.0, 1.3]).reshape(4, 1, 1), "k")])
    return g.model([g.conv(m2, 4, 1, kernel=1, bias=False), g.conv(m1, 4, 2, kernel=1, bias=False)])


def _matmul_folded_in_two_passes() -> onnx.ModelProto:
    """Add(k) -> MatMul (2-D) -> Add(b). Pass 1 folds the first Add forward (MatMul becomes a Gemm
    with a bias); pass 2 folds the second Add backward into that Gemm."""
    g = GraphBuilder(np.random.default_rng(3))
    x = g.input("x", [1, 3])
    a = g.node("Add", [x, g.const(np.array([0.25, -0.5, 0.125]), "k")])
    return g.model([g.node("Add", [g.matmul(a, 3, 2), g.const(np.array([0.5, -0.25]), "k")])])


def _normalized_dense_layer() -> onnx.ModelProto:
    """The common exported form of input normalization + Dense: Sub(mean) -> Div(std) -> MatMul ->
    Add(bias). Same two-pass situation as `_matmul_folded_in_two_passes`."""
    g = GraphBuilder(np.random.default_rng(4))
    x = g.input("x", [2, 8])
    a = g.node("Sub", [x, g.const(np.linspace(-0.5, 0.5, 8), "mean")])
    a = g.node("Div", [a, g.const(np.linspace(0.5, 2.0, 8), "std")])
    return g.model([g.node("Add", [g.matmul(a, 8, 4), g.const(np.linspace(-1, 1, 4), "bias")])])


def _conv_bn_then_nhwc_mul() -> onnx.ModelProto:
    """Conv -> BN -> Transpose(NCHW -> NHWC) -> Mul by a [C] constant. Pass 1 folds the BN, which
    puts Conv -> Transpose -> Mul side by side; there was no second pass (a backward fold into a Conv
    was assumed never to open another), so folding the output again folded the Mul."""
    g = GraphBuilder(np.random.default_rng(5))
    x = g.input("x", [1, 2, 3, 3])
    y = g.node("Transpose", [g.bn(g.conv(x, 2, 2, kernel=1, bias=False), 2)], perm=[0, 2, 3, 1])
    return g.model([g.node("Mul", [y, g.const(np.array([1.5, -0.5]), "k")])])


def _matmul_bn_then_transpose_mul() -> onnx.ModelProto:
    """MatMul (2-D) -> BN -> Transpose -> Mul by a scalar: pass 1 makes MatMul -> BN a Gemm, pass 2
    folds Gemm -> Transpose -> Mul. The provenance held [BN, Mul] without the Transpose between them
    and the analytic check crashed ("Unable to find input 'transpose8'")."""
    g = GraphBuilder(np.random.default_rng(6))
    x = g.input("x", [1, 3])
    y = g.node("Transpose", [g.bn(g.matmul(x, 3, 2), 2)], perm=[1, 0])
    return g.model([g.node("Mul", [y, g.const(np.array([1.5]), "k")])])


def _bn_then_identity_mul_gemm() -> onnx.ModelProto:
    """BN -> Identity -> Mul by a [C] constant -> Gemm: pass 1 folds the Mul forward, pass 2 the BN
    through the Identity; the same crash as `_matmul_bn_then_transpose_mul`, forward."""
    g = GraphBuilder(np.random.default_rng(9))
    x = g.input("x", [2, 2])
    y = g.node("Mul", [g.node("Identity", [g.bn(x, 2)]), g.const(np.array([1.5, -0.5]), "k")])
    return g.model([g.gemm(y, 2, 3)])


def _bn_then_last_axis_mul_then_flatten_matmul() -> onnx.ModelProto:
    """BN (axis 1 of [1, 2, 4]) -> Mul by a [4] constant (the last axis) -> Flatten -> MatMul: pass 1
    folds the Mul forward through the Flatten, pass 2 the BN. Both chains were probed as one, on
    axis 1, with one spread: the analytic check crashed (ValueError: operands could not be broadcast
    together with shapes (1,4,1) (2,1))."""
    g = GraphBuilder(np.random.default_rng(7))
    x = g.input("x", [1, 2, 4])
    y = g.node("Mul", [g.bn(x, 2), g.const(np.array([0.5, 1.5, 2.0, -1.0]), "k")])
    return g.model([g.matmul(g.node("Flatten", [y], axis=1), 8, 1)])


REPRODUCERS = {
    "pre_and_post_of_different_widths": _pre_and_post_of_different_widths,
    "conv_folded_in_two_passes": _conv_folded_in_two_passes,
    "matmul_folded_in_two_passes": _matmul_folded_in_two_passes,
    "normalized_dense_layer": _normalized_dense_layer,
    "backward_fold_exposes_layout_chain": _conv_bn_then_nhwc_mul,
    "two_pass_backward_through_transpose": _matmul_bn_then_transpose_mul,
    "two_pass_forward_through_identity": _bn_then_identity_mul_gemm,
    "two_forward_folds_through_flatten": _bn_then_last_axis_mul_then_flatten_matmul,
}


def _fuzz_model(build) -> FuzzModel:
    model = build()
    return FuzzModel(model, np.dtype(np.float32), [n.op_type for n in model.graph.node])


# --- properties ------------------------------------------------------------------------------------


@settings(max_examples=FUZZ_EXAMPLES)
@given(graphs())
@example(fuzz=_fuzz_model(_pre_and_post_of_different_widths))
@example(fuzz=_fuzz_model(_conv_folded_in_two_passes))
@example(fuzz=_fuzz_model(_matmul_folded_in_two_passes))
def test_fold_random_graph(fuzz: FuzzModel) -> None:
    check_fold_properties(fuzz)


# The two-pass reproducers are not @examples here: while that bug stands they would fail before any
# random graph is tried. `test_regression_fold_and_verify` covers them.
@settings(max_examples=FUZZ_EXAMPLES)
@given(graphs())
@example(fuzz=_fuzz_model(_pre_and_post_of_different_widths))
def test_fold_random_graph_verified(fuzz: FuzzModel) -> None:
    _note(onnx.printer.to_text(fuzz.model.graph))
    result = bnfold.fold(fuzz.model, verify=True, raise_on_failure=False)
    verification = result.report.verification
    assert verification is not None
    assert verification.passed, verification.failures()


# --- explicit regression tests -------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(REPRODUCERS))
def test_regression_fold_and_verify(name: str) -> None:
    """Each reproducer folds correctly (outputs match) AND passes bnfold's own verification.

    Found by the properties above. `pre_and_post_of_different_widths` made verify=True raise
    ValueError in verify._probe_affine (it sized the probe from the pre AND post chains' constants;
    fixed in ae0ed5f). The other three failed with a false VerificationError (analytic check off
    by ~1e7 ulp while the onnxruntime outputs matched; fixed in cb5bd2e): a layer folded in two
    passes kept the first pass's provenance, then compared with the tensor the second pass overwrote.
    The last four came from the layout-node generator (fold not at its fixed point; the analytic check
    crashing on layers folded in two passes through layout nodes; fixed in 8aa8a3e).
    """
    model = REPRODUCERS[name]()
    check_fold_properties(_fuzz_model(lambda: model))
    result = bnfold.fold(model, verify=True, raise_on_failure=False)
    verification = result.report.verification
    assert verification.runtime_status == "passed"  # the fold itself is right
    assert verification.passed, verification.failures()


# --- bnfold bugs the layout fuzzer found (fixed; each pins its fix) --------------------------------


def _float64_gemm_bn_tiny_scale_large_shift() -> onnx.ModelProto:
    """float64 Gemm -> BN with scale 1e-6 and shift 1 (gamma 1e-6, beta 1, mean 0, var 1, eps 0)."""
    g = GraphBuilder(np.random.default_rng(8), dtype=np.float64)
    x = g.input("x", [1, 2])
    params = [g.const(np.array([v]), p) for v, p in zip((1e-6, 1.0, 0.0, 1.0), ("gamma", "beta", "mean", "var"))]
    return g.model([g.node("BatchNormalization", [g.gemm(x, 2, 1), *params], epsilon=0.0)])


def _float64_gemm_bn_zero_shift() -> onnx.ModelProto:
    """float64 Gemm (no C) -> BN whose shift is 0 up to rounding: beta = mean * gamma / sqrt(var)."""
    g = GraphBuilder(np.random.default_rng(0), dtype=np.float64)
    x = g.input("x", [1, 2])
    gamma, mean, var = np.array([1.2, 0.8]), np.array([0.47, -0.21]), np.array([1.6, 1.05])
    params = [g.const(v, p) for v, p in zip((gamma, mean * gamma / np.sqrt(var), mean, var),
                                             ("gamma", "beta", "mean", "var"))]
    return g.model([g.node("BatchNormalization", [g.gemm(x, 2, 2, c_shape=None), *params], epsilon=0.0)])


def _rank3_matmul_bias_then_flatten_gemm() -> onnx.ModelProto:
    """MatMul [1, 4, 3] -> Mul([2]) -> Add([2]) -> Flatten -> Gemm."""
    g = GraphBuilder(np.random.default_rng(12))
    x = g.input("x", [1, 4, 3])
    y = g.node("Mul", [g.matmul(x, 3, 2), g.const(np.array([1.5, 0.5]), "k")])
    y = g.node("Add", [y, g.const(np.array([0.25, -0.5]), "k")])
    return g.model([g.gemm(g.node("Flatten", [y], axis=1), 8, 3)])


def _matmul_transpose_bn1d_then_conv1d() -> onnx.ModelProto:
    """MatMul [1, 4, 3] -> Transpose(0, 2, 1) -> BN1d -> unpadded Conv1d (kernel 1)."""
    g = GraphBuilder(np.random.default_rng(11))
    x = g.input("x", [1, 4, 3])
    y = g.bn(g.node("Transpose", [g.matmul(x, 3, 2)], perm=[0, 2, 1]), 2)
    return g.model([g.conv(y, 2, 3, kernel=1, bias=False, dims=1)])


def _two_conv_bn_mul_by_one_element_blocks() -> onnx.ModelProto:
    """Conv -> BN -> Mul by a [1]-shaped constant, twice (chains of one shape: probed stacked)."""
    g = GraphBuilder(np.random.default_rng(14))
    x = g.input("x", [1, 2, 3, 3])
    a = g.node("Mul", [g.bn(g.conv(x, 2, 2, kernel=1), 2), g.const(np.array([1.5]), "k")])
    return g.model([g.node("Mul", [g.bn(g.conv(a, 2, 2, kernel=1), 2), g.const(np.array([0.5]), "k")])])


def _verifies(model: onnx.ModelProto, dtype=np.float32) -> None:
    """The fold is right (the properties hold, onnxruntime agrees) and bnfold's verification passes."""
    check_fold_properties(FuzzModel(model, np.dtype(dtype)))
    verification = bnfold.fold(model, verify=True, raise_on_failure=False).report.verification
    assert verification.runtime_status == "passed"
    assert verification.passed, verification.failures()


@pytest.mark.parametrize("build", [_float64_gemm_bn_tiny_scale_large_shift, _float64_gemm_bn_zero_shift])
def test_float64_cancellation_passes_the_analytic_check(build) -> None:
    """The probe recovers a scale dwarfed by its shift far out (f(2^24)), and the slack of a bias is
    relative to the terms it was summed from, not to its (cancelled, ~0) value."""
    _verifies(build(), np.float64)


def test_created_bias_add_folds_onward_in_the_same_run() -> None:
    """A rank-3 MatMul's bias Add (created by a backward fold) folds forward in the next pass: the
    new MatMul output gets the chain end's shape, so the fixed point is reached in one run."""
    check_fold_properties(_fuzz_model(_rank3_matmul_bias_then_flatten_gemm))


def test_created_bias_add_folded_forward_verifies() -> None:
    """The folded-away bias leaves the MatMul's record; the Conv that absorbed it is checked instead."""
    _verifies(_matmul_transpose_bn1d_then_conv1d())


def test_stacked_probe_of_one_element_constants() -> None:
    """[1]-shaped constants are re-based to axis 0 and concatenated along it when chains are stacked."""
    _verifies(_two_conv_bn_mul_by_one_element_blocks())
