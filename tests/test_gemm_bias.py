"""2-D MatMul + constant bias -> one Gemm, exact (W and C stored unchanged), where Gemm's C may take
the bias; kept, with a reason, where it may not or where no node would go."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from helpers import op_types, random_feeds, run
from onnx import numpy_helper

import bnfold
from benchmarks.graph_builder import GraphBuilder
from bnfold.report import Reason


def initializers(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def matmul_bias(bias_shape: tuple, op: str = "Add", bias_first: bool = False, x_shape=(4, 6)):
    g = GraphBuilder()
    x = g.input("x", list(x_shape))
    y = g.matmul(x, 6, 3)
    c = g.const(g.rng.normal(size=bias_shape), "bias")
    out = g.node(op, [c, y] if bias_first else [y, c])
    return g, out


def assert_same_outputs(model: onnx.ModelProto, folded: onnx.ModelProto) -> None:
    feeds = random_feeds(model)
    for want, have in zip(run(model, feeds), run(folded, feeds)):
        assert have.shape == want.shape
        np.testing.assert_allclose(have, want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("bias_shape", [(3,), (1, 3), (), (1,), (4, 3), (4, 1), (1, 1)])
@pytest.mark.parametrize("op,bias_first", [("Add", False), ("Add", True), ("Sub", False), ("Sub", True)])
def test_matmul_plus_bias_becomes_one_exact_gemm(bias_shape, op, bias_first) -> None:
    g, out = matmul_bias(bias_shape, op, bias_first)
    model = g.model([out])
    result = bnfold.fold(model)
    assert result.report.verification.passed
    assert op_types(result.model) == ["Gemm"]
    (gemm,) = result.model.graph.node
    assert gemm.output[0] == out
    before, after = initializers(model), initializers(result.model)
    w, c = (g.initializers[0].name, g.initializers[1].name)
    attrs = {a.name: a.f for a in gemm.attribute}
    if op == "Sub" and bias_first and bias_shape not in ((4, 3), (4, 1)):
        # c - x·W with a per-channel c is a map with scale -1: the fold negates W (exact) and
        # keeps c as C, rounded once from float64 (exact too).
        np.testing.assert_array_equal(after[gemm.input[1]], -before[w])
    else:
        assert attrs == ({} if op == "Add" else {"alpha": -1.0} if bias_first else {"beta": -1.0})
        assert list(gemm.input[1:]) == [w, c]  # W and C exactly as stored, under their own names
        np.testing.assert_array_equal(after[w], before[w])
        np.testing.assert_array_equal(after[c], before[c])
    (record,) = result.report.folded
    assert (record.op_type, record.direction, record.became) == (op, "backward", "Gemm")
    assert_same_outputs(model, result.model)


def test_matmul_with_rank3_input_keeps_its_bias_add() -> None:
    g, out = matmul_bias((3,), x_shape=(2, 4, 6))
    model = g.model([out])
    result = bnfold.fold(model)
    assert op_types(result.model) == ["MatMul", "Add"]
    assert [(s.op_type, s.reason) for s in result.report.skipped] == [("Add", Reason.NO_GAIN)]


@pytest.mark.parametrize("bias_shape,x_shape,reason", [
    ((1, 1, 3), (4, 6), Reason.CHANNEL_AXIS_MISMATCH),  # broadcasts the product up to rank 3
    ((4, 3), (1, 6), Reason.CHANNEL_COUNT_MISMATCH),  # Add broadcasts [1, 3] up to [4, 3]; Gemm's C may not
])
def test_bias_that_gemm_c_cannot_take_is_kept(bias_shape, x_shape, reason) -> None:
    g, out = matmul_bias(bias_shape, x_shape=x_shape)
    model = g.model([out])
    result = bnfold.fold(model)
    assert result.report.verification.passed
    assert op_types(result.model) == ["MatMul", "Add"]
    assert [(s.op_type, s.reason) for s in result.report.skipped] == [("Add", reason)]


def test_full_bias_with_rows_not_known_statically_is_kept() -> None:
    g, out = matmul_bias((4, 3), x_shape=("n", 6))
    model = g.model([out])
    result = bnfold.fold(model, input_shapes={"x": [4, 6]})
    assert op_types(result.model) == ["MatMul", "Add"]
    assert [(s.op_type, s.reason) for s in result.report.skipped] == [("Add", Reason.UNKNOWN_SHAPE)]


@pytest.mark.parametrize("bias_shape", [(3,), (4, 3)])
def test_matmul_bias_bn_ends_as_one_gemm(bias_shape) -> None:
    g, out = matmul_bias(bias_shape)
    model = g.model([g.bn(out, 3)])
    result = bnfold.fold(model)
    assert result.report.verification.passed
    assert op_types(result.model) == ["Gemm"]
    assert_same_outputs(model, result.model)


def test_shared_weight_is_not_copied() -> None:
    g = GraphBuilder()
    x = g.input("x", [4, 6])
    w = g.const(g.weights(6, 3), "w")
    a = g.node("Add", [g.node("MatMul", [x, w]), g.const(g.rng.normal(size=3))])
    b = g.node("Add", [g.node("MatMul", [g.relu(x), w]), g.const(g.rng.normal(size=3))])
    model = g.model([a, b])
    result = bnfold.fold(model)
    assert op_types(result.model).count("Gemm") == 2
    assert len(result.model.graph.initializer) == len(model.graph.initializer)
    assert_same_outputs(model, result.model)


def test_add_folded_forward_is_not_also_a_gemm_bias() -> None:
    # MatMul -> Add -> Gemm: the Add folds forward into the Gemm this pass; the MatMul stays MatMul.
    g, out = matmul_bias((3,))
    model = g.model([g.gemm(out, 3, 2)])
    result = bnfold.fold(model)
    assert result.report.verification.passed
    assert op_types(result.model) == ["MatMul", "Gemm"]
    assert_same_outputs(model, result.model)


def test_bias_computed_after_the_matmul_puts_the_gemm_where_the_add_is() -> None:
    # Found by the fuzzer: the bias comes from a Constant node placed after the MatMul; a Gemm at
    # the MatMul's place would read it before it exists (nodes must stay topologically sorted).
    g = GraphBuilder()
    x = g.input("x", [4, 6])
    y = g.matmul(x, 6, 3)
    bias = g.node("Constant", [], value=numpy_helper.from_array(np.array([0.5, -1.0, 2.0], np.float32), "k"))
    model = g.model([g.node("Add", [y, bias])])
    result = bnfold.fold(model)
    assert result.report.verification.passed and result.report.verification.checker_passed
    assert op_types(result.model) == ["Constant", "Gemm"]
    assert_same_outputs(model, result.model)
