"""Folds inside If / Loop bodies: nested scopes, outer-scope initializers (shared, overridable, read
only by a folded body), outer-scope values captured by a body, and name uniqueness across scopes."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from helpers import random_feeds, run
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator
from scope_checks import (
    BN,
    Feeds,
    bn_values,
    constant_node,
    conv_input,
    defined_names,
    fold_and_compare,
    tensor,
)

import bnfold
from benchmarks.graph_builder import GraphBuilder
from bnfold.report import Reason, op_counts

# --- If / Loop bodies --------------------------------------------------------------------------------


def conv_bn_body(b: GraphBuilder, source: str, c_in: int, c_out: int, weight: str | None = None,
                 relu: bool = False) -> str:
    """source -> padded Conv -> BN (-> Relu) inside `b`; the Conv may read an outer-scope weight."""
    if weight is None:
        conv = b.conv(source, c_in, c_out, pads=[1, 1, 1, 1])
    else:
        conv = b.node("Conv", [source, weight, b.const(b.rng.normal(size=c_out), "b")], pads=[1, 1, 1, 1])
    out = b.bn(conv, c_out)
    return b.relu(out) if relu else out


def feeds_with_flag(model: onnx.ModelProto, flag_name: str = "flag") -> list[Feeds]:
    base = random_feeds(model)
    return [{**base, flag_name: np.array(value)} for value in (True, False)]


def test_if_branches_fold_with_shared_outer_initializer() -> None:
    rng = np.random.default_rng(0)
    g = GraphBuilder(rng)
    x = g.input("x", [1, 3, 8, 8])
    flag = g.input("flag", [], dtype=np.bool_)
    shared = g.const(g.weights(4, 3, 3, 3), "shared_w")
    outer = g.bn(g.node("Conv", [x, shared, g.const(rng.normal(size=4), "b")], pads=[1, 1, 1, 1]), 4)
    then_b = GraphBuilder(rng, scope="then")
    then_out = conv_bn_body(then_b, x, 3, 4, weight=shared)  # outer-scope initializer, also read outside
    else_b = GraphBuilder(rng, scope="else")
    else_out = conv_bn_body(else_b, x, 3, 4, relu=True)
    g.nodes.append(helper.make_node("If", [flag], ["if_out"], name="if_node",
                                    then_branch=then_b.subgraph([], [tensor(then_out, [1, 4, 8, 8])]),
                                    else_branch=else_b.subgraph([], [tensor(else_out, [1, 4, 8, 8])])))
    model = g.model([tensor(outer, [1, 4, 8, 8]), tensor("if_out", [1, 4, 8, 8])])
    shared_before = numpy_helper.to_array(model.graph.initializer[0])
    result = fold_and_compare(model, feeds_with_flag(model))
    assert op_counts(result.model).get(BN, 0) == 0
    assert sorted(r.graph for r in result.report.folded) == \
        ["main", "main/if_node.else_branch", "main/if_node.then_branch"]
    assert result.report.skipped == []
    kept = {t.name: t for t in result.model.graph.initializer}
    if shared in kept:  # still read by the then-branch or not: it must not have been overwritten
        np.testing.assert_array_equal(numpy_helper.to_array(kept[shared]), shared_before)


def loop_model(nested_if: bool) -> onnx.ModelProto:
    """x[1,4,8,8] -> Loop(2 iterations){ Conv->BN [-> If{Conv->BN | Conv->BN->Relu}] } -> output."""
    rng = np.random.default_rng(1)
    g = GraphBuilder(rng)
    x = g.input("x", [1, 4, 8, 8])
    inputs = [g.const(np.array(2), "trip", dtype=np.int64), ""]
    outer_w = g.const(g.weights(4, 4, 3, 3), "outer_w")  # read two scopes down
    body = GraphBuilder(rng, scope="body")
    carried = conv_bn_body(body, "body_v", 4, 4, relu=True)
    if nested_if:
        g.input("flag", [], dtype=np.bool_)
        then_b = GraphBuilder(rng, scope="then")
        then_out = conv_bn_body(then_b, carried, 4, 4, weight=outer_w)
        else_b = GraphBuilder(rng, scope="else")
        else_out = conv_bn_body(else_b, carried, 4, 4)
        body.nodes.append(helper.make_node("If", ["flag"], ["body_if_out"], name="inner_if",
                                           then_branch=then_b.subgraph([], [tensor(then_out, [1, 4, 8, 8])]),
                                           else_branch=else_b.subgraph([], [tensor(else_out, [1, 4, 8, 8])])))
        carried = "body_if_out"
    body.nodes.append(helper.make_node("Identity", ["body_cond"], ["body_cond_out"], name="body_cond_node"))
    graph = body.subgraph([tensor("body_i", [], TensorProto.INT64), tensor("body_cond", [], TensorProto.BOOL),
                       tensor("body_v", [1, 4, 8, 8])],
                      [tensor("body_cond_out", [], TensorProto.BOOL), tensor(carried, [1, 4, 8, 8])])
    g.nodes.append(helper.make_node("Loop", [*inputs, x], ["loop_out"], name="loop_node", body=graph))
    return g.model([tensor("loop_out", [1, 4, 8, 8])])


def test_loop_body_folds() -> None:
    model = loop_model(nested_if=False)
    result = fold_and_compare(model)
    assert op_counts(result.model).get(BN, 0) == 0
    assert [(r.op_type, r.direction, r.graph) for r in result.report.folded] == \
        [(BN, "backward", "main/loop_node.body")]


def test_if_nested_in_loop_body_folds() -> None:
    model = loop_model(nested_if=True)
    result = fold_and_compare(model, feeds_with_flag(model))
    assert op_counts(model)[BN] == 3
    assert op_counts(result.model).get(BN, 0) == 0
    assert sorted(r.graph for r in result.report.folded) == [
        "main/loop_node.body", "main/loop_node.body/inner_if.else_branch", "main/loop_node.body/inner_if.then_branch"]


@pytest.mark.parametrize("reader", ["If", "Loop"])
def test_outer_conv_output_read_inside_a_body_blocks_the_fold(reader: str) -> None:
    rng = np.random.default_rng(2)
    g = GraphBuilder(rng)
    _, conv = conv_input(g)
    y = g.bn(conv, 4)
    if reader == "If":
        g.input("flag", [], dtype=np.bool_)
        then_b, else_b = GraphBuilder(rng, scope="then"), GraphBuilder(rng, scope="else")
        then_out = then_b.relu(conv)  # reads the outer Conv's output
        else_out = else_b.node("Neg", [conv])
        g.nodes.append(helper.make_node("If", ["flag"], ["sub_out"], name="reader",
                                        then_branch=then_b.subgraph([], [tensor(then_out, [2, 4, 8, 8])]),
                                        else_branch=else_b.subgraph([], [tensor(else_out, [2, 4, 8, 8])])))
    else:
        body = GraphBuilder(rng, scope="body")
        total = body.node("Add", ["body_v", conv])  # reads the outer Conv's output every iteration
        body.nodes.append(helper.make_node("Identity", ["body_cond"], ["body_cond_out"], name="body_cond_node"))
        graph = body.subgraph([tensor("body_i", [], TensorProto.INT64), tensor("body_cond", [], TensorProto.BOOL),
                           tensor("body_v", [2, 4, 8, 8])],
                          [tensor("body_cond_out", [], TensorProto.BOOL), tensor(total, [2, 4, 8, 8])])
        start = g.node("Identity", [y])
        g.nodes.append(helper.make_node("Loop", [g.const(np.array(3), "trip", dtype=np.int64), "", start],
                                        ["sub_out"], name="reader", body=graph))
    model = g.model([tensor(y, [2, 4, 8, 8]), tensor("sub_out", [2, 4, 8, 8])])
    feeds = feeds_with_flag(model) if reader == "If" else [random_feeds(model)]
    result = fold_and_compare(model, feeds)
    assert result.report.folded == []
    assert op_counts(result.model)[BN] == 1
    assert [(r.graph, r.reason) for r in result.report.skipped] == [("main", Reason.PRODUCER_HAS_OTHER_CONSUMERS)]
    for f in feeds:
        for want, have in zip(run(model, f), run(result.model, f)):
            np.testing.assert_array_equal(have, want)


def test_overridable_outer_weight_used_in_a_body_is_not_constant() -> None:
    rng = np.random.default_rng(3)
    g = GraphBuilder(rng)
    x = g.input("x", [1, 3, 8, 8])
    flag = g.input("flag", [], dtype=np.bool_)
    weight = g.const(g.weights(4, 3, 3, 3), "w_default")
    then_b, else_b = GraphBuilder(rng, scope="then"), GraphBuilder(rng, scope="else")
    then_out = conv_bn_body(then_b, x, 3, 4, weight=weight)
    else_out = conv_bn_body(else_b, x, 3, 4)
    g.nodes.append(helper.make_node("If", [flag], ["if_out"], name="if_node",
                                    then_branch=then_b.subgraph([], [tensor(then_out, [1, 4, 8, 8])]),
                                    else_branch=else_b.subgraph([], [tensor(else_out, [1, 4, 8, 8])])))
    model = g.model([tensor("if_out", [1, 4, 8, 8])], extra_inputs=[tensor(weight, [4, 3, 3, 3])])
    result = fold_and_compare(model, feeds_with_flag(model))
    assert [(r.graph, r.reason) for r in result.report.skipped] == \
        [("main/if_node.then_branch", Reason.WEIGHT_NOT_CONSTANT)]
    assert [r.graph for r in result.report.folded] == ["main/if_node.else_branch"]


def test_bn_params_from_outer_constant_nodes_fold_inside_a_body() -> None:
    rng = np.random.default_rng(4)
    g = GraphBuilder(rng)
    x = g.input("x", [1, 3, 8, 8])
    flag = g.input("flag", [], dtype=np.bool_)
    params = [constant_node(g, v) for v in bn_values(g, 4)]  # outer-scope Constant nodes
    branches = {}
    for branch in ("then", "else"):
        b = GraphBuilder(rng, scope=branch)
        out = b.node(BN, [b.conv(x, 3, 4, pads=[1, 1, 1, 1]), *params], "bn")
        branches[branch] = b.subgraph([], [tensor(out, [1, 4, 8, 8])])
    g.nodes.append(helper.make_node("If", [flag], ["if_out"], name="if_node", then_branch=branches["then"],
                                    else_branch=branches["else"]))
    model = g.model([tensor("if_out", [1, 4, 8, 8])])
    result = fold_and_compare(model, feeds_with_flag(model))
    assert op_counts(result.model).get(BN, 0) == 0
    assert len(result.report.folded) == 2


def test_new_names_stay_unique_across_scopes() -> None:
    # Bias-less Convs get a new bias initializer, and a weight read from an outer scope gets a new
    # weight. Names bnfold would pick are taken in other scopes already.
    rng = np.random.default_rng(5)
    g = GraphBuilder(rng)
    x = g.input("x", [1, 3, 8, 8])
    flag = g.input("flag", [], dtype=np.bool_)
    weight = g.const(g.weights(4, 3, 3, 3), "w")  # "w1"
    taken = [f"{weight}_bnfold", f"{weight}_bnfold_bias", f"{weight}_bnfold_bias_bnfold", f"{weight}_bias_bnfold"]
    decoys = [g.node("Neg", [g.input(name, [1])]) for name in taken]
    branches = {}
    for branch in ("then", "else"):
        b = GraphBuilder(rng, scope=branch)
        conv = b.node("Conv", [x, weight], pads=[1, 1, 1, 1])  # no bias, outer weight
        out = b.bn(conv, 4)
        branches[branch] = b.subgraph([], [tensor(out, [1, 4, 8, 8])])
    main_conv = g.bn(g.node("Conv", [x, weight], pads=[1, 1, 1, 1]), 4)
    g.nodes.append(helper.make_node("If", [flag], ["if_out"], name="if_node", then_branch=branches["then"],
                                    else_branch=branches["else"]))
    model = g.model([tensor("if_out", [1, 4, 8, 8]), tensor(main_conv, [1, 4, 8, 8]),
                     *(tensor(d, [1]) for d in decoys)])
    result = fold_and_compare(model, feeds_with_flag(model))
    assert op_counts(result.model).get(BN, 0) == 0
    assert len(result.report.folded) == 3
    names = defined_names(result.model)
    assert all(names[name] == 1 for name in taken)


def test_forward_fold_inside_a_body_on_an_outer_input() -> None:
    # Inside the branch the BN reads the outer graph input x; its rank comes from the outer scope.
    rng = np.random.default_rng(6)
    g = GraphBuilder(rng)
    x = g.input("x", [1, 3, 8, 8])
    flag = g.input("flag", [], dtype=np.bool_)
    branches = {}
    for branch in ("then", "else"):
        b = GraphBuilder(rng, scope=branch)
        out = b.conv(b.bn(x, 3), 3, 4)  # unpadded: the BN folds forward
        branches[branch] = b.subgraph([], [tensor(out, [1, 4, 6, 6])])
    g.nodes.append(helper.make_node("If", [flag], ["if_out"], name="if_node", then_branch=branches["then"],
                                    else_branch=branches["else"]))
    model = g.model([tensor("if_out", [1, 4, 6, 6])])
    result = fold_and_compare(model, feeds_with_flag(model))
    assert op_counts(result.model).get(BN, 0) == 0
    assert sorted((r.direction, r.graph) for r in result.report.folded) == [
        ("forward", "main/if_node.else_branch"), ("forward", "main/if_node.then_branch")]


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


def test_outer_initializer_read_only_by_a_folded_subgraph_is_removed():
    inner = GraphBuilder(rng=np.random.default_rng(5))
    xi = inner.input("xi", [1, 2, 4, 4])
    weight = inner.const(inner.weights(2, 2, 1, 1), "outer_w")
    y = inner.bn(inner.node("Conv", [xi, weight]), 2)
    outer_weight = inner.initializers.pop(0)  # the body reads the weight from the enclosing scope
    body = helper.make_graph(inner.nodes, "then", [], [helper.make_tensor_value_info(y, TensorProto.FLOAT, [1, 2, 4, 4])],
                             inner.initializers)
    other = helper.make_graph([helper.make_node("Identity", ["xi"], ["o"])], "else", [],
                              [helper.make_tensor_value_info("o", TensorProto.FLOAT, [1, 2, 4, 4])])
    node = helper.make_node("If", ["cond"], ["out"], then_branch=body, else_branch=other, name="branch")
    graph = helper.make_graph(
        [node], "main",
        [helper.make_tensor_value_info("cond", TensorProto.BOOL, []), *inner.inputs],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, 2, 4, 4])], [outer_weight])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    result = bnfold.fold(model, verify=False)
    assert [r.graph for r in result.report.folded] == ["main/branch.then_branch"]
    assert "outer_w" not in {t.name for t in result.model.graph.initializer}
    onnx.checker.check_model(result.model, full_check=True)
    feeds = {"cond": np.array(True), "xi": np.random.default_rng(1).uniform(-1, 1, (1, 2, 4, 4)).astype(np.float32)}
    np.testing.assert_allclose(ReferenceEvaluator(result.model).run(None, feeds)[0],
                               ReferenceEvaluator(model).run(None, feeds)[0], rtol=1e-5, atol=1e-6)
