"""Folds through layout nodes that take more than one pass, and their verification (found by an
independent review): a layer folded once and again through a Transpose/Reshape/Flatten, scalar maps
after a Transpose into a rank-3 MatMul, and a chain reachable only after an earlier fold.

Each fold is correct; these pin that verification recomputes it (one probe per folded segment,
composed) instead of reporting a failure or crashing, and that one run reaches the fixed point.
"""

from __future__ import annotations

import numpy as np
import onnx
from helpers import invoke, op_types, random_feeds, run

import bnfold
from benchmarks.graph_builder import GraphBuilder


def int64(values) -> np.ndarray:
    return np.asarray(values, dtype=np.int64)


def assert_same_outputs(model: onnx.ModelProto, folded: onnx.ModelProto, feeds: dict | None = None) -> None:
    feeds = feeds or random_feeds(model, seed=3)
    for want, have in zip(run(model, feeds), run(folded, feeds)):
        assert want.shape == have.shape
        np.testing.assert_allclose(have, want, rtol=1e-4, atol=1e-5)


def assert_folds_and_verifies(model: onnx.ModelProto) -> bnfold.FoldResult:
    # The fold itself is right: compare without bnfold's verification first.
    unverified = bnfold.fold(model, verify=False)
    assert unverified.report.folded
    assert_same_outputs(model, unverified.model)
    result = bnfold.fold(model, raise_on_failure=False)  # currently raises or fails for these models
    verification = result.report.verification
    failed = [(t.tensor, t.max_ulp_error) for t in verification.tensors if not t.passed]
    assert verification.passed, (failed, verification.runtime_status)
    return result


# --- 1. scalar chain after layout nodes into a rank-3 MatMul ------------------------------------


def test_scalar_maps_after_transpose_into_rank3_matmul_verify() -> None:
    """MatMul [B, T, K] -> Transpose -> Add(0.5) -> Mul(2): the fold is right (a uniform bias Add
    after the Transpose), but `_hand_over_chain_output` stores that bias as `bias[:1]` (shape [1])
    while the analytic check expects [C]; sizes differ, so `ulp_error` sees a shape mismatch and
    reports inf ulp -> verification FAILED, nothing written."""
    g = GraphBuilder()
    x = g.input("x", [2, 7, 6])
    y = g.node("Transpose", [g.matmul(x, 6, 5)], perm=[0, 2, 1])
    y = g.node("Add", [y, g.const(np.array(0.5))])
    y = g.node("Mul", [y, g.const(np.array(2.0))])
    model = g.model([g.relu(y)])
    result = assert_folds_and_verifies(model)
    assert op_types(result.model) == ["MatMul", "Transpose", "Add", "Relu"]


# --- 2. a second pass folding through layout nodes into an already folded layer -----------------


def test_second_pass_through_reshape_into_a_folded_gemm_verifies() -> None:
    """BN -> Gemm -> BN1d -> Reshape [N, C, 1, 1] -> BN2d. Pass 1 folds BN (forward) and BN1d
    (backward); the forward fold makes a second pass, which folds BN2d through the Reshape into the
    same Gemm. `layer_folds._layer_provenance` then extends the first record's `post` with the new BN
    (`earlier.post + post`), although a Reshape sits between them: the probe chain is not
    contiguous and onnx's reference evaluator raises "Unable to find input 'reshape..'"."""
    g = GraphBuilder()
    x = g.input("x", [3, 6])
    y = g.bn(g.gemm(g.bn(x, 6), 6, 4), 4)
    y = g.node("Reshape", [y, g.const(int64([3, 4, 1, 1]), dtype=np.int64)])
    model = g.model([g.bn(y, 4)])
    result = assert_folds_and_verifies(model)
    assert op_types(result.model) == ["Gemm", "Reshape"]


def test_second_pass_through_transpose_into_a_folded_rank3_matmul_verifies() -> None:
    """MatMul [B, T, K] -> Mul([C]) -> Transpose -> BN1d: pass 1 folds the Mul (a MatMul fold always
    cascades), pass 2 the BN through the Transpose; same non-contiguous provenance -> traceback."""
    g = GraphBuilder()
    x = g.input("x", [2, 7, 6])
    y = g.node("Mul", [g.matmul(x, 6, 5), g.const(np.linspace(0.5, 1.5, 5))])
    y = g.node("Transpose", [y], perm=[0, 2, 1])
    model = g.model([g.relu(g.bn(y, 5))])
    assert_folds_and_verifies(model)


def test_conv_bn_then_nhwc_mul_verifies_when_another_branch_cascades() -> None:
    """Conv -> BN -> Transpose(NHWC) -> Mul([C]). Alone, only the BN folds (no second pass). With an
    unrelated forward fold elsewhere in the graph (BN -> Gemm on another input) a second pass runs,
    folds the Mul through the Transpose into the already folded Conv, and the analytic check
    crashes. Whether bnfold crashes depends on an unrelated part of the graph."""
    g = GraphBuilder()
    x = g.input("x", [2, 3, 4, 4])
    y = g.bn(g.conv(x, 3, 5, kernel=1), 5)
    y = g.node("Transpose", [y], perm=[0, 2, 3, 1])
    y = g.node("Mul", [y, g.const(np.linspace(0.5, 2.0, 5))])
    z = g.gemm(g.bn(g.input("z", [2, 6]), 6), 6, 3)
    model = g.model([y, z])
    assert_folds_and_verifies(model)


# --- 3. a second pass folding forward through layout nodes into a forward-folded layer ----------


def test_bn2d_flatten_bn1d_gemm_verifies() -> None:
    """BN2d -> Flatten -> BN1d -> Gemm: pass 1 folds BN1d forward, pass 2 BN2d through the Flatten
    into the same Gemm. The provenance becomes pre = [BN2d, BN1d] on the rank-4 probe (`pre +
    earlier.pre`, `pre_spread or earlier.pre_spread`): BN2d's [3] parameters meet a 12-channel
    probe and the reference evaluator raises a broadcasting ValueError."""
    g = GraphBuilder()
    x = g.input("x", [2, 3, 2, 2])
    y = g.node("Flatten", [g.bn(x, 3)], axis=1)
    model = g.model([g.gemm(g.bn(y, 12), 12, 4)])
    result = assert_folds_and_verifies(model)
    assert op_types(result.model) == ["Flatten", "Gemm"]


def test_bn2d_flatten_bn1d_gemm_cli_exit_code(tmp_path) -> None:
    """The same model through the CLI: exit 2 ("unexpected error"), which the README reserves for
    usage errors and bad input; nothing is written."""
    g = GraphBuilder()
    x = g.input("x", [2, 3, 2, 2])
    y = g.node("Flatten", [g.bn(x, 3)], axis=1)
    path = tmp_path / "m.onnx"
    onnx.save(g.model([g.gemm(g.bn(y, 12), 12, 4)]), path)
    result = invoke([path, "-o", tmp_path / "out.onnx"])
    assert result.exit_code == 0, result.stderr
    assert (tmp_path / "out.onnx").exists()


# --- 4. not a fixed point: a backward fold that opens a fold through layout nodes ---------------


def test_conv_bn_nhwc_mul_folds_in_one_run() -> None:
    """Conv -> BN -> Transpose(NHWC) -> Mul([C]): one `bnfold.fold` folds only the BN; folding the
    result again folds the Mul too. `_may_cascade` assumes a backward fold into a Conv opens no new
    fold, but after it the Conv is directly followed by the Transpose, and the Mul behind it becomes
    foldable through the layout node (the walk in `walk_backward_chain` does not continue through
    layout nodes after the chain). With test 2 fixed this is the remaining behaviour: a missed fold
    that depends on unrelated parts of the graph (the same model with any forward fold elsewhere
    folds the Mul in the first run)."""
    g = GraphBuilder()
    x = g.input("x", [2, 3, 4, 4])
    y = g.bn(g.conv(x, 3, 5, kernel=1), 5)
    y = g.node("Transpose", [y], perm=[0, 2, 3, 1])
    model = g.model([g.node("Mul", [y, g.const(np.linspace(0.5, 2.0, 5))])])
    first = bnfold.fold(model)
    again = bnfold.fold(first.model, verify=False)
    assert again.report.folded == [], [(r.op_type, r.direction) for r in again.report.folded]
