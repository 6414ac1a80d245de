"""What the constant-parameter and subgraph fold tests share: value declarations, every graph of a model
(subgraphs included), a fold checked for unique names across scopes and for onnxruntime agreement, and
parameters held by Constant nodes."""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
from helpers import random_feeds, run
from onnx import TensorProto, helper, numpy_helper

import bnfold
from benchmarks.graph_builder import GraphBuilder

BN = "BatchNormalization"


Feeds = dict[str, np.ndarray]


RTOL, ATOL = 1e-4, 1e-5


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
