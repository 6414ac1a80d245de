"""Crafted models of the second adversarial review: external data without a length, a graph given to a
function call, training info."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from helpers import conv_bn_model
from onnx import TensorProto, helper, numpy_helper


def bn_initializers(rng: np.random.Generator, channels: int, names=("g", "b", "m", "v")) -> list[onnx.TensorProto]:
    """Scale, bias, mean and variance (positive) of a BatchNormalization over `channels`."""
    values = (rng.uniform(0.5, 2, channels), rng.normal(size=channels), rng.normal(size=channels),
              rng.uniform(0.5, 2, channels))
    return [numpy_helper.from_array(v.astype(np.float32), name) for name, v in zip(names, values)]


C = 4


def external_tensor(name: str, location: str, dims: tuple[int, ...], length: int | None = None) -> onnx.TensorProto:
    """A float tensor whose data is `location` from offset 0 (with `length` only when given)."""
    tensor = onnx.TensorProto(name=name, data_type=TensorProto.FLOAT, dims=list(dims))
    tensor.data_location = TensorProto.EXTERNAL
    entries = [("location", location), ("offset", "0")] + ([("length", str(length))] if length is not None else [])
    for key, value in entries:
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value
    return tensor


def conv_bn_plus_constant(folder: Path, constant: onnx.TensorProto, as_node: bool) -> Path:
    """Conv -> BN (foldable) -> + ReduceSum(k), where k is `constant`: a Constant node's value
    (`as_node`) or a main-graph initializer. Saved as `folder/m.onnx`."""
    model = conv_bn_model()
    graph = model.graph
    graph.node[1].output[0] = "y0"
    if as_node:
        graph.node.append(helper.make_node("Constant", [], [constant.name], value=constant))
    else:
        graph.initializer.append(constant)
    graph.node.extend([helper.make_node("ReduceSum", [constant.name], ["ks"], keepdims=0),
                       helper.make_node("Add", ["y0", "ks"], ["y"])])
    path = folder / "m.onnx"
    onnx.save(model, str(path))
    return path


def function_with_graph_argument() -> onnx.ModelProto:
    """A model-local function F(x) whose body defines its own `w` (a Constant) and runs an If whose
    then-branch is the graph *passed as attribute* `body` of the call (`ref_attr_name`). The graph
    passed by the main graph's call node does Conv(x, w) -> BN, where `w` is, at run time, the
    function's Constant — but the main graph also has an initializer named `w` (other values).

    The branch is taken only when max(x) > 3, which seeded uniform(-1, 1) inputs never reach."""
    rng = np.random.default_rng(0)
    w_main = numpy_helper.from_array(rng.normal(size=(C, C, 1, 1)).astype(np.float32), "w")
    w_function = numpy_helper.from_array(rng.normal(size=(C, C, 1, 1)).astype(np.float32), "w")
    passed_graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["bc"]),
         helper.make_node("BatchNormalization", ["bc", "g", "b", "m", "v"], ["bo"])],
        "body", [], [helper.make_tensor_value_info("bo", TensorProto.FLOAT, None)], bn_initializers(rng, C))
    branch = helper.make_node("If", ["take"], ["y"], else_branch=helper.make_graph(
        [helper.make_node("Identity", ["x"], ["e"])], "else", [], [helper.make_tensor_value_info("e", TensorProto.FLOAT, None)]))
    reference = onnx.AttributeProto(name="then_branch", ref_attr_name="body", type=onnx.AttributeProto.GRAPH)
    branch.attribute.append(reference)
    three = numpy_helper.from_array(np.array(3.0, np.float32), "three")
    function = helper.make_function(
        "local", "F", ["x"], ["y"],
        [helper.make_node("Constant", [], ["w"], value=w_function),
         helper.make_node("Constant", [], ["three"], value=three),
         helper.make_node("ReduceMax", ["x"], ["peak"], keepdims=0),
         helper.make_node("Greater", ["peak", "three"], ["take"]), branch],
        [helper.make_opsetid("", 17)], attributes=["body"])
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["y0"]),
         helper.make_node("F", ["x"], ["y1"], domain="local", body=passed_graph),
         helper.make_node("Add", ["y0", "y1"], ["y"])],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, C, 3, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, C, 3, 3])], [w_main])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("local", 1)],
                              functions=[function])
    model.ir_version = 8
    return model
