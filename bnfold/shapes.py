"""Shape inference without copying the weights.

onnx's shape inference serialises the whole model; on a 300 MB model that is a second copy of every
weight for information the fold needs only a little of (ranks and a few channel counts). So it runs
on a skeleton: the graph structure with initializers reduced to their dims, type and (when small,
e.g. Reshape targets) their data.
"""

from __future__ import annotations

import onnx

from bnfold.graph import ValueInfo, scoped_subgraphs, value_infos_of

# Initializers up to this many elements keep their data: shape inference reads values of small
# integer tensors (Reshape shapes, Slice bounds); weights never influence shapes.
SMALL_TENSOR_ELEMENTS = 4096


def skeleton(model: onnx.ModelProto, keep_data: bool = True) -> onnx.ModelProto:
    """The model without its weights: big (or, without `keep_data`, all) initializers become stubs
    that keep name, type and dims."""
    skeleton = onnx.ModelProto()
    skeleton.ir_version = model.ir_version
    skeleton.opset_import.extend(model.opset_import)
    skeleton.functions.extend(model.functions)
    graph = skeleton.graph
    source = model.graph
    graph.name = source.name
    graph.node.extend(source.node)
    graph.input.extend(source.input)
    graph.output.extend(source.output)
    graph.value_info.extend(source.value_info)
    for tensor in source.initializer:
        elements = 1
        for dim in tensor.dims:
            elements *= dim
        if keep_data and elements <= SMALL_TENSOR_ELEMENTS and tensor.data_location != onnx.TensorProto.EXTERNAL:
            graph.initializer.append(tensor)
        else:
            stub = graph.initializer.add()
            stub.name = tensor.name
            stub.data_type = tensor.data_type
            stub.dims.extend(tensor.dims)
    return skeleton


def infer_value_infos(model: onnx.ModelProto) -> dict[str, dict[str, ValueInfo]]:
    """Value types and shapes per graph scope ("main", "main/<node>.<attr>", ...).

    Falls back to the shapes declared in the model when shape inference fails (custom ops, odd
    exports): the rules then refuse what needs an unknown rank instead of guessing.
    """
    try:
        inferred = onnx.shape_inference.infer_shapes(skeleton(model), check_type=False, strict_mode=False)
    except Exception:  # noqa: BLE001 - any inference failure just means "less is known"
        inferred = model
    scopes: dict[str, dict[str, ValueInfo]] = {}

    def visit(graph: onnx.GraphProto, scope: str) -> None:
        scopes[scope] = value_infos_of(graph)
        for node in graph.node:
            for path, body in scoped_subgraphs(node, scope):
                visit(body, path)

    visit(inferred.graph, "main")
    return scopes
