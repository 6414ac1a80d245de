"""bnfold.walk: every scope, node and tensor of a model, found by the one walker every module uses.

The model below hides graphs and tensors in each place ONNX allows: nested If/Loop bodies, a
model-local function with a subgraph of its own and a default attribute value, sparse
initializers, Constant nodes, TENSORS / SPARSE_TENSOR attributes, initializers inside subgraphs,
and a training-info graph. The counts and names asserted are the ones built here.
"""

from __future__ import annotations

import ast
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import pytest
from helpers import sample_model_names
from onnx import TensorProto, helper, numpy_helper

from bnfold.model_io import _scan_model
from bnfold.report import op_counts
from bnfold.walk import iter_nodes, iter_scopes, iter_tensors, scoped_subgraphs

SAMPLES = Path(__file__).resolve().parents[1] / "sample_models"
BNFOLD = Path(__file__).resolve().parents[1] / "bnfold"


def _tensor(name: str, values=(1.0, 2.0)) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(values, dtype=np.float32), name)


def _sparse(prefix: str) -> onnx.SparseTensorProto:
    return helper.make_sparse_tensor(_tensor(f"{prefix}_values", [5.0]),
                                     numpy_helper.from_array(np.array([1], dtype=np.int64), f"{prefix}_indices"), [4])


def _constant(output: str) -> onnx.NodeProto:
    return helper.make_node("Constant", [], [output], name=f"{output}_node", value=_tensor(f"{output}_value"))


def _graph(name: str, nodes: list[onnx.NodeProto], outputs: list[str],
           initializers: list[onnx.TensorProto] = (), **fields) -> onnx.GraphProto:
    return helper.make_graph(nodes, name, [], [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outputs],
                             list(initializers), **fields)


def _hiding_model() -> onnx.ModelProto:
    loop_body = _graph("loop_body", [helper.make_node("Identity", ["w_loop"], ["loop_out"], name="loop_id")],
                       ["loop_out"], [_tensor("w_loop")])
    then_branch = _graph("then", [
        _constant("k_then"),
        helper.make_node("Loop", ["", ""], ["loop_y"], name="inner", body=loop_body),
        helper.make_node("Add", ["k_then", "w_then"], ["then_out"], name="then_add"),
    ], ["then_out"], [_tensor("w_then")])
    else_branch = _graph("else", [helper.make_node("Identity", ["h"], ["else_out"], name="else_id")], ["else_out"])
    main = _graph("main", [
        _constant("k_main"),
        helper.make_node("MatMul", ["x", "w_main"], ["h"], name="matmul"),
        helper.make_node("If", ["cond"], ["branch_out"], name="branch", then_branch=then_branch,
                         else_branch=else_branch),
        helper.make_node("Custom", ["h"], ["custom_out"], name="custom", domain="vendor",
                         pair=[_tensor("ta"), _tensor("tb")], hint=_sparse("sa")),
        helper.make_node("Block", ["h"], ["y"], name="call", domain="local"),
    ], ["y"], [_tensor("w_main")], sparse_initializer=[_sparse("sp")])
    fn_then = _graph("fn_then", [helper.make_node("Identity", ["w_fn_then"], ["fn_then_out"], name="fn_then_id")],
                     ["fn_then_out"], [_tensor("w_fn_then")])
    fn_else = _graph("fn_else", [helper.make_node("Identity", ["a"], ["fn_else_out"], name="fn_else_id")],
                     ["fn_else_out"])
    function = helper.make_function("local", "Block", ["a"], ["b"], [
        _constant("k_fn"),
        helper.make_node("If", ["c"], ["b"], name="fn_if", then_branch=fn_then, else_branch=fn_else),
    ], [helper.make_opsetid("", 17)])
    function.attribute_proto.append(helper.make_attribute("scale", _tensor("default_value")))
    model = helper.make_model(main, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("local", 1)],
                              functions=[function])
    training = model.training_info.add()
    training.initialization.CopyFrom(_graph("init", [], [], [_tensor("w_train")]))
    return model


MAIN_SCOPES = ["main", "main/branch.else_branch", "main/branch.then_branch", "main/branch.then_branch/inner.body"]
FUNCTION_SCOPES = ["function:local:Block", "function:local:Block/fn_if.else_branch",
                   "function:local:Block/fn_if.then_branch"]
# name -> how many tensors of that name the model holds
ALL_TENSORS = Counter({
    "w_main": 1, "sp_values": 1, "sp_indices": 1, "k_main_value": 1, "ta": 1, "tb": 1, "sa_values": 1,
    "sa_indices": 1, "w_then": 1, "k_then_value": 1, "w_loop": 1, "k_fn_value": 1, "w_fn_then": 1,
    "default_value": 1, "w_train": 1})


def test_iter_scopes_finds_every_scope_in_reading_order() -> None:
    model = _hiding_model()

    scopes = list(iter_scopes(model))

    assert [path for path, _ in scopes] == MAIN_SCOPES + FUNCTION_SCOPES
    bodies = dict(scopes)
    assert bodies["main"] is model.graph or bodies["main"] == model.graph
    assert isinstance(bodies["function:local:Block"], onnx.FunctionProto)
    assert [n.name for n in bodies["main/branch.then_branch/inner.body"].node] == ["loop_id"]
    assert [n.name for n in bodies["function:local:Block/fn_if.then_branch"].node] == ["fn_then_id"]


def test_iter_scopes_of_a_graph_a_function_and_the_training_graphs() -> None:
    model = _hiding_model()

    assert [path for path, _ in iter_scopes(model.graph)] == MAIN_SCOPES
    assert [path for path, _ in iter_scopes(model.graph.node[2].attribute[1].g, "outer")] == \
        ["outer", "outer/inner.body"]
    assert [path for path, _ in iter_scopes(model.functions[0])] == FUNCTION_SCOPES
    with_training = [path for path, _ in iter_scopes(model, training_info=True)]
    assert with_training == MAIN_SCOPES + FUNCTION_SCOPES + ["training_info[0].initialization"]


def test_repeated_owner_names_get_distinct_scope_paths() -> None:
    body = _graph("b", [helper.make_node("Identity", ["x"], ["o"])], ["o"])
    graph = _graph("g", [helper.make_node("If", ["c"], [out], name="same", then_branch=body, else_branch=body)
                         for out in ("out1", "out2")], ["out1"])

    paths = [path for path, _ in scoped_subgraphs(graph, "main")]

    assert paths == ["main/same@out1.else_branch", "main/same@out1.then_branch",
                     "main/same@out2.else_branch", "main/same@out2.then_branch"]


def test_iter_nodes_meets_a_node_before_its_subgraphs_and_those_before_the_next_node() -> None:
    model = _hiding_model()

    names = [node.name for node in iter_nodes(model.graph.node)]

    assert names == ["k_main_node", "matmul", "branch", "else_id", "k_then_node", "inner", "loop_id", "then_add",
                     "custom", "call"]
    assert [node.name for node in iter_nodes(model.functions[0].node)] == \
        ["k_fn_node", "fn_if", "fn_else_id", "fn_then_id"]


def test_iter_tensors_finds_every_tensor() -> None:
    model = _hiding_model()

    found = Counter(tensor.name for tensor in iter_tensors(model))

    assert found == ALL_TENSORS
    assert sum(found.values()) == 15


def test_iter_tensors_without_main_initializers_and_of_one_graph() -> None:
    model = _hiding_model()

    nested = Counter(tensor.name for tensor in iter_tensors(model, main_initializers=False))
    of_main_graph = Counter(tensor.name for tensor in iter_tensors(model.graph))

    assert nested == ALL_TENSORS - Counter({"w_main": 1})
    assert of_main_graph == Counter({"w_main": 1, "sp_values": 1, "sp_indices": 1, "k_main_value": 1, "ta": 1,
                                     "tb": 1, "sa_values": 1, "sa_indices": 1, "w_then": 1, "k_then_value": 1,
                                     "w_loop": 1})


def test_iter_tensors_yields_the_model_s_own_messages() -> None:
    """Callers edit what they get (TensorStore.materialize writes the data into it): no copies."""
    model = _hiding_model()

    for tensor in iter_tensors(model):
        if tensor.name == "w_loop":
            tensor.raw_data = np.float32([7, 7]).tobytes()

    loop_body = model.graph.node[2].attribute[1].g.node[1].attribute[0].g
    assert numpy_helper.to_array(loop_body.initializer[0]).tolist() == [7, 7]


def test_op_counts_covers_subgraphs_and_functions() -> None:
    assert op_counts(_hiding_model()) == {"Add": 1, "Block": 1, "Constant": 3, "Custom": 1, "Identity": 4,
                                          "If": 2, "Loop": 1, "MatMul": 1}


def test_the_string_check_walk_finds_the_same_tensors() -> None:
    """model_io._scan_model is the one walk kept apart (it visits every message to check strings):
    it must find exactly the tensors iter_tensors finds."""
    model = _hiding_model()

    scanned, bad = _scan_model(model)

    assert bad is None
    assert Counter(t.name for t in scanned) == Counter(t.name for t in iter_tensors(model)) == ALL_TENSORS
    assert sorted(t.SerializeToString() for t in scanned) == sorted(t.SerializeToString() for t in iter_tensors(model))


@pytest.mark.parametrize("name", sample_model_names())
def test_the_string_check_walk_agrees_on_every_sample_model(name: str) -> None:
    model = onnx.load(str(SAMPLES / name), load_external_data=False)

    scanned, _ = _scan_model(model)

    assert sorted(t.SerializeToString() for t in scanned) == sorted(t.SerializeToString() for t in iter_tensors(model))


def test_no_module_walks_graphs_by_hand() -> None:
    """Only bnfold/walk.py (and model_io's string check, see test above) look into graph-valued
    attributes; onnx's private tensor walk is not used."""
    walking = []
    for path in sorted(BNFOLD.rglob("*.py")):
        source = path.read_text()
        names = {node.attr for node in ast.walk(ast.parse(source)) if isinstance(node, ast.Attribute)}
        if names & {"GRAPH", "GRAPHS", "_get_all_tensors"} or "external_data_helper" in source:
            walking.append(path.relative_to(BNFOLD).as_posix())
    assert walking == ["model_io.py", "walk.py"]
