"""Regressions from an adversarial review: each was a silent wrong fold (or an unloadable output)
with verification switched off."""

from __future__ import annotations

import numpy as np
from helpers import model_from_text, run
from onnx import TensorProto, helper

import bnfold
from benchmarks.graph_builder import GraphBuilder
from bnfold.report import Reason


def test_fold_that_would_overflow_float16_is_refused():
    weight = np.full((2, 2, 1, 1), 0.01, np.float16)
    weight[0, 0] = 40000.0  # times gamma 4 does not fit in float16
    params = {n: np.array(v, np.float16) for n, v in
              [("g", [4.0, 1.0]), ("b", [0.0, 0.0]), ("m", [0.0, 0.0]), ("v", [1.0, 1.0])]}
    model = model_from_text("""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float16[1, 2, 2, 2] x) => (float16[1, 2, 2, 2] y) {
            c = Conv(x, W)
            y = BatchNormalization <epsilon = 0.0> (c, g, b, m, v)
        }""", {"W": weight, **params})
    result = bnfold.fold(model, verify=False)
    assert not result.report.folded
    [skipped] = result.report.skipped
    assert skipped.reason == Reason.INVALID_PARAMS and "overflow" in skipped.detail
    feeds = {"x": np.full((1, 2, 2, 2), 1e-3, np.float16)}
    np.testing.assert_array_equal(run(result.model, feeds)[0], run(model, feeds)[0])


def test_subgraph_scopes_with_clashing_owner_names_keep_their_own_shapes():
    rng = np.random.default_rng(0)
    unshaped = helper.make_tensor_value_info("o", TensorProto.FLOAT, None)
    # If "Q": c = Conv(x) is [2,6,6,6]; Mul by k[6,1] scales rows (axis 2), never channels.
    body_a = helper.make_graph([helper.make_node("Conv", ["x", "W"], ["c"]), helper.make_node("Mul", ["c", "k"], ["o"])],
                               "a", [], [unshaped])
    # An unnamed If whose OUTPUT is "Q": its body has a value "c" of rank 3.
    body_b = helper.make_graph([helper.make_node("Conv", ["x3", "W1"], ["c"]), helper.make_node("Relu", ["c"], ["o"])],
                               "b", [], [unshaped])
    g = GraphBuilder(rng)
    for name, shape in (("W", (6, 3, 3, 3)), ("k", (6, 1)), ("W1", (3, 3, 1))):
        g.initializer(name, rng.standard_normal(shape).astype(np.float32))
    g.input("x", [2, 3, 8, 8]), g.input("x3", [2, 3, 8]), g.input("cond", [], np.bool_)
    g.nodes += [helper.make_node("If", ["cond"], ["y1"], name="Q", then_branch=body_a, else_branch=body_a),
                helper.make_node("If", ["cond"], ["Q"], then_branch=body_b, else_branch=body_b)]
    model = g.model([helper.make_tensor_value_info("y1", TensorProto.FLOAT, [2, 6, 6, 6]),
                     helper.make_tensor_value_info("Q", TensorProto.FLOAT, [2, 3, 8])], infer_shapes=False)
    result = bnfold.fold(model, verify=False)
    assert not result.report.folded
    feeds = {"x": rng.standard_normal((2, 3, 8, 8)).astype(np.float32),
             "x3": rng.standard_normal((2, 3, 8)).astype(np.float32), "cond": np.array(True)}
    np.testing.assert_array_equal(run(result.model, feeds)[0], run(model, feeds)[0])


def test_all_ones_constant_on_a_tensor_of_unknown_rank_is_not_a_scalar():
    # Reshape to a runtime shape hides the rank; the Mul by k[1,1,1,1] may add axes to it.
    rng = np.random.default_rng(1)
    model = model_from_text("""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[6, 5] x0, int64[r] s) => (float[a, b, c, d] y) {
            x = Reshape(x0, s)
            c = MatMul(x, W)
            y = Mul(c, k)
        }""", {"W": rng.standard_normal((5, 6)).astype(np.float32), "k": np.full((1, 1, 1, 1), 2.0, np.float32)})
    result = bnfold.fold(model, verify=False)
    assert [n.op_type for n in result.model.graph.node] == ["Reshape", "MatMul", "Mul"]
    assert result.report.folded == []
    feeds = {"x0": rng.standard_normal((6, 5)).astype(np.float32), "s": np.array([6, 5])}
    assert run(result.model, feeds)[0].shape == run(model, feeds)[0].shape == (1, 1, 6, 6)


def test_added_bias_nodes_of_unnamed_matmuls_do_not_share_a_name():
    rng = np.random.default_rng(2)
    weights = {f"{n}{i}": rng.standard_normal(s).astype(np.float32)
               for i in (1, 2) for n, s in (("W", (5, 6)), ("k", (6,)), ("a", (6,)))}
    model = model_from_text("""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[2, 3, 5] x) => (float[2, 3, 6] y1, float[2, 3, 6] y2) {
            c1 = MatMul(x, W1)
            d1 = Mul(c1, k1)
            y1 = Add(d1, a1)
            c2 = MatMul(x, W2)
            d2 = Mul(c2, k2)
            y2 = Add(d2, a2)
        }""", weights)
    result = bnfold.fold(model)  # verification loads the folded model in onnxruntime
    assert [n.op_type for n in result.model.graph.node] == ["MatMul", "Add", "MatMul", "Add"]
    names = [n.name for n in result.model.graph.node if n.name]
    assert len(names) == len(set(names))
    assert result.report.verification.passed
