"""Parameters that are constant without being plain initializers (Constant nodes, Identity, small
constant subgraphs, IR 3 initializer inputs), and folds inside If / Loop bodies: nested scopes,
outer-scope initializers, outer-scope values captured by a body, and name uniqueness across scopes.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import pytest
from helpers import op_types, random_feeds, run
from onnx import TensorProto, helper, numpy_helper

import bnfold
from benchmarks.graph_builder import GraphBuilder
from bnfold.report import Reason, op_counts

BN = "BatchNormalization"
Feeds = dict[str, np.ndarray]
RTOL, ATOL = 1e-4, 1e-5


# --- helpers --------------------------------------------------------------------------------------


class ScopedBuilder(GraphBuilder):
    """A GraphBuilder whose names carry a scope prefix, so bodies never reuse an outer name."""

    def __init__(self, scope: str, rng: np.random.Generator) -> None:
        super().__init__(rng)
        self.scope = scope

    def name(self, prefix: str) -> str:
        return f"{self.scope}_{super().name(prefix)}"

    def body(self, inputs: list[onnx.ValueInfoProto], outputs: list[onnx.ValueInfoProto]) -> onnx.GraphProto:
        return helper.make_graph(self.nodes, self.scope, inputs, outputs, self.initializers)


def tensor(name: str, shape: list[int], elem_type: int = TensorProto.FLOAT) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, elem_type, shape)


def all_graphs(graph: onnx.GraphProto) -> list[onnx.GraphProto]:
    graphs = [graph]
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                graphs += all_graphs(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for body in attr.graphs:
                    graphs += all_graphs(body)
    return graphs


def defined_names(model: onnx.ModelProto) -> Counter[str]:
    """How often each value name is defined anywhere (an initializer listed as input counts once)."""
    counts: Counter[str] = Counter()
    for graph in all_graphs(model.graph):
        initializers = {t.name for t in graph.initializer}
        counts.update(initializers)
        counts.update(v.name for v in graph.input if v.name not in initializers)
        counts.update(o for node in graph.node for o in node.output if o)
    return counts


def orphan_initializers(graph: onnx.GraphProto) -> list[str]:
    """Initializers of `graph` (main graph only) that no node of any scope reads."""
    read = {name for g in all_graphs(graph) for node in g.node for name in node.input}
    read |= {o.name for o in graph.output}
    listed = {v.name for v in graph.input}
    return sorted(t.name for t in graph.initializer if t.name not in read and t.name not in listed)


def fold_and_compare(model: onnx.ModelProto, feeds_list: list[Feeds] | None = None) -> bnfold.FoldResult:
    """Fold with verification; full checker, unique names, and onnxruntime agreement on every feed."""
    before = model.SerializeToString()
    result = bnfold.fold(model)
    assert model.SerializeToString() == before, "the input model was mutated"
    verification = result.report.verification
    assert verification is not None and verification.passed, verification
    onnx.checker.check_model(result.model, full_check=True)
    duplicates = {name: n for name, n in defined_names(result.model).items() if n > 1}
    assert duplicates == {}
    for feeds in feeds_list or [random_feeds(model)]:
        expected, got = run(model, feeds), run(result.model, feeds)
        assert len(expected) == len(got)
        for want, have in zip(expected, got):
            np.testing.assert_allclose(have, want, rtol=RTOL, atol=ATOL)
    return result


def conv_input(g: GraphBuilder) -> tuple[str, str]:
    """x[2,3,8,8] -> padded Conv(3->4); returns (x, conv output)."""
    x = g.input("x", [2, 3, 8, 8])
    return x, g.conv(x, 3, 4, pads=[1, 1, 1, 1])


def bn_values(g: GraphBuilder, channels: int) -> list[np.ndarray]:
    r = g.rng
    return [r.uniform(0.5, 1.5, channels), r.normal(0, 0.2, channels), r.normal(0, 0.5, channels),
            r.uniform(0.25, 1.75, channels)]


def constant_node(g: GraphBuilder, values: np.ndarray, form: str = "value") -> str:
    output = g.name("const")
    if form == "value":
        node = helper.make_node("Constant", [], [output], name=output + "_node",
                                value=numpy_helper.from_array(np.asarray(values, np.float32)))
    else:
        node = helper.make_node("Constant", [], [output], name=output + "_node",
                                value_floats=[float(v) for v in values])
    g.nodes.append(node)
    return output


def assert_conv_only(result: bnfold.FoldResult, bn_count: int = 1) -> None:
    assert op_types(result.model) == ["Conv"]
    assert [r.op_type for r in result.report.folded] == [BN] * bn_count
    assert all(r.direction == "backward" for r in result.report.folded)
    assert result.report.skipped == []
    assert orphan_initializers(result.model.graph) == []


# --- constant parameters -------------------------------------------------------------------------


@pytest.mark.parametrize("form", ["value", "value_floats"])
def test_bn_params_from_constant_nodes_fold(form: str) -> None:
    g = GraphBuilder()
    _, conv = conv_input(g)
    params = [constant_node(g, v, form) for v in bn_values(g, 4)]
    y = g.node(BN, [conv, *params], "bn")
    result = fold_and_compare(g.model([y]))
    assert_conv_only(result)  # the dead Constant nodes are gone


def test_bn_params_from_identity_of_initializers_fold() -> None:
    g = GraphBuilder()
    _, conv = conv_input(g)
    params = [g.node("Identity", [g.const(v, "p")]) for v in bn_values(g, 4)]
    y = g.node(BN, [conv, *params], "bn")
    model = g.model([y])
    result = fold_and_compare(model)
    assert_conv_only(result)
    assert len(result.model.graph.initializer) == 2  # conv weight and bias only


def test_bn_params_from_small_constant_subgraph_fold() -> None:
    g = GraphBuilder()
    _, conv = conv_input(g)
    gamma, beta, mean, var = bn_values(g, 4)
    shape = g.const(np.array([4]), "shape", dtype=np.int64)
    gamma_name = g.node("Reshape", [g.const(gamma.reshape(1, 4), "g2d"), shape])
    beta_name = g.node("Cast", [g.const(beta, "b64", dtype=np.float64)], to=TensorProto.FLOAT)
    unsqueezed = g.node("Unsqueeze", [g.const(mean, "m"), g.const(np.array([0]), "axes", dtype=np.int64)])
    mean_name = g.node("Reshape", [unsqueezed, shape])
    var_double = g.node("Constant", [], value=numpy_helper.from_array(var.astype(np.float64)))
    var_name = g.node("Cast", [var_double], to=TensorProto.FLOAT)
    y = g.node(BN, [conv, gamma_name, beta_name, mean_name, var_name], "bn")
    model = g.model([y])
    result = fold_and_compare(model)
    assert_conv_only(result)
    assert len(result.model.graph.initializer) == 2  # the int64 shape/axes constants went with them


def test_conv_weight_from_constant_node_folds() -> None:
    g = GraphBuilder()
    x = g.input("x", [2, 3, 8, 8])
    weight = constant_node(g, g.weights(4, 3, 3, 3))
    bias = constant_node(g, g.rng.normal(size=4))
    conv = g.node("Conv", [x, weight, bias], pads=[1, 1, 1, 1])
    y = g.bn(conv, 4)
    result = fold_and_compare(g.model([y]))
    assert_conv_only(result)
    assert "Constant" not in op_counts(result.model)


def test_constant_shared_with_another_reader_is_kept() -> None:
    # The BN's gamma Constant also feeds an Add elsewhere: it must survive the fold.
    g = GraphBuilder()
    _, conv = conv_input(g)
    gamma, beta, mean, var = bn_values(g, 4)
    gamma_name = constant_node(g, gamma)
    y = g.node(BN, [conv, gamma_name, *(g.const(v, "p") for v in (beta, mean, var))], "bn")
    z = g.node("Add", [g.input("v", [4]), gamma_name])
    result = fold_and_compare(g.model([y, z]))
    assert sorted(op_types(result.model)) == ["Add", "Constant", "Conv"]
    assert [r.op_type for r in result.report.folded] == [BN]


# --- IR 3: every initializer is a graph input ------------------------------------------------------


def ir3_model(g: GraphBuilder, outputs: list[onnx.ValueInfoProto]) -> onnx.ModelProto:
    return g.model(outputs, ir_version=3, extra_inputs=g.initializer_inputs())


@pytest.mark.parametrize("case", ["conv_bias", "conv_no_bias", "conv_mul_add", "merge"])
def test_ir3_model_folds(case: str) -> None:
    g = GraphBuilder(opset=8)
    if case == "merge":
        a, b = g.input("a", [2, 2, 6, 6]), g.input("b", [2, 3, 6, 6])
        y = g.bn(g.bn(g.node("Concat", [a, b], axis=1), 5), 5)
        expected_ops = ["Concat", BN]
        shape = [2, 5, 6, 6]
    else:
        x = g.input("x", [2, 3, 8, 8])
        conv = g.conv(x, 3, 4, pads=[1, 1, 1, 1], bias=case != "conv_no_bias")
        if case == "conv_mul_add":
            y = g.node("Add", [g.node("Mul", [conv, g.const(np.full((4, 1, 1), 1.5), "k")]),
                               g.const(np.arange(4.0).reshape(4, 1, 1), "k")])
        else:
            y = g.bn(conv, 4)
        expected_ops = ["Conv"]
        shape = [2, 4, 8, 8]
    model = ir3_model(g, [tensor(y, shape)])
    result = fold_and_compare(model)
    assert op_types(result.model) == expected_ops
    assert result.report.folded
    # IR 3 needs every initializer listed as an input; the fold must not change what callers feed.
    graph = result.model.graph
    initializers = {t.name for t in graph.initializer}
    assert initializers <= {v.name for v in graph.input}
    fed = [v.name for v in graph.input if v.name not in initializers]
    assert fed == [v.name for v in model.graph.input if v.name not in {t.name for t in model.graph.initializer}]


# --- If / Loop bodies --------------------------------------------------------------------------------


def conv_bn_body(b: ScopedBuilder, source: str, c_in: int, c_out: int, weight: str | None = None,
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
    then_b = ScopedBuilder("then", rng)
    then_out = conv_bn_body(then_b, x, 3, 4, weight=shared)  # outer-scope initializer, also read outside
    else_b = ScopedBuilder("else", rng)
    else_out = conv_bn_body(else_b, x, 3, 4, relu=True)
    g.nodes.append(helper.make_node("If", [flag], ["if_out"], name="if_node",
                                    then_branch=then_b.body([], [tensor(then_out, [1, 4, 8, 8])]),
                                    else_branch=else_b.body([], [tensor(else_out, [1, 4, 8, 8])])))
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
    body = ScopedBuilder("body", rng)
    carried = conv_bn_body(body, "body_v", 4, 4, relu=True)
    if nested_if:
        g.input("flag", [], dtype=np.bool_)
        then_b = ScopedBuilder("then", rng)
        then_out = conv_bn_body(then_b, carried, 4, 4, weight=outer_w)
        else_b = ScopedBuilder("else", rng)
        else_out = conv_bn_body(else_b, carried, 4, 4)
        body.nodes.append(helper.make_node("If", ["flag"], ["body_if_out"], name="inner_if",
                                           then_branch=then_b.body([], [tensor(then_out, [1, 4, 8, 8])]),
                                           else_branch=else_b.body([], [tensor(else_out, [1, 4, 8, 8])])))
        carried = "body_if_out"
    body.nodes.append(helper.make_node("Identity", ["body_cond"], ["body_cond_out"], name="body_cond_node"))
    graph = body.body([tensor("body_i", [], TensorProto.INT64), tensor("body_cond", [], TensorProto.BOOL),
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
        then_b, else_b = ScopedBuilder("then", rng), ScopedBuilder("else", rng)
        then_out = then_b.relu(conv)  # reads the outer Conv's output
        else_out = else_b.node("Neg", [conv])
        g.nodes.append(helper.make_node("If", ["flag"], ["sub_out"], name="reader",
                                        then_branch=then_b.body([], [tensor(then_out, [2, 4, 8, 8])]),
                                        else_branch=else_b.body([], [tensor(else_out, [2, 4, 8, 8])])))
    else:
        body = ScopedBuilder("body", rng)
        total = body.node("Add", ["body_v", conv])  # reads the outer Conv's output every iteration
        body.nodes.append(helper.make_node("Identity", ["body_cond"], ["body_cond_out"], name="body_cond_node"))
        graph = body.body([tensor("body_i", [], TensorProto.INT64), tensor("body_cond", [], TensorProto.BOOL),
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
    then_b, else_b = ScopedBuilder("then", rng), ScopedBuilder("else", rng)
    then_out = conv_bn_body(then_b, x, 3, 4, weight=weight)
    else_out = conv_bn_body(else_b, x, 3, 4)
    g.nodes.append(helper.make_node("If", [flag], ["if_out"], name="if_node",
                                    then_branch=then_b.body([], [tensor(then_out, [1, 4, 8, 8])]),
                                    else_branch=else_b.body([], [tensor(else_out, [1, 4, 8, 8])])))
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
        b = ScopedBuilder(branch, rng)
        out = b.node(BN, [b.conv(x, 3, 4, pads=[1, 1, 1, 1]), *params], "bn")
        branches[branch] = b.body([], [tensor(out, [1, 4, 8, 8])])
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
        b = ScopedBuilder(branch, rng)
        conv = b.node("Conv", [x, weight], pads=[1, 1, 1, 1])  # no bias, outer weight
        out = b.bn(conv, 4)
        branches[branch] = b.body([], [tensor(out, [1, 4, 8, 8])])
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
        b = ScopedBuilder(branch, rng)
        out = b.conv(b.bn(x, 3), 3, 4)  # unpadded: the BN folds forward
        branches[branch] = b.body([], [tensor(out, [1, 4, 6, 6])])
    g.nodes.append(helper.make_node("If", [flag], ["if_out"], name="if_node", then_branch=branches["then"],
                                    else_branch=branches["else"]))
    model = g.model([tensor("if_out", [1, 4, 6, 6])])
    result = fold_and_compare(model, feeds_with_flag(model))
    assert op_counts(result.model).get(BN, 0) == 0
    assert sorted((r.direction, r.graph) for r in result.report.folded) == [
        ("forward", "main/if_node.else_branch"), ("forward", "main/if_node.then_branch")]
