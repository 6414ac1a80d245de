"""Parameters that are constant without being plain initializers: Constant nodes, Identity, small
constant subgraphs, IR 3 initializers listed as graph inputs. Each folds like an initializer; a
constant another node also reads is kept for it."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from helpers import op_types
from onnx import TensorProto, numpy_helper
from scope_checks import (
    BN,
    bn_values,
    constant_node,
    conv_input,
    fold_and_compare,
    orphan_initializers,
    tensor,
)

import bnfold
from benchmarks.graph_builder import GraphBuilder
from bnfold.report import op_counts


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
