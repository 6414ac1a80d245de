"""Shape inference without copying the weights.

onnx's shape inference serialises the whole model; on a 300 MB model that is a second copy of every
weight for information the fold needs only a little of (ranks and a few channel counts). So it runs
on a skeleton: the graph structure with initializers reduced to their dims, type and (when small,
e.g. Reshape targets) their data.
"""

from __future__ import annotations

import onnx

from bnfold.protos import ValueInfo, attribute, value_infos_of
from bnfold.serialize import copy_without, raw_size
from bnfold.walk import MAIN_SCOPE, iter_scopes

# Initializers up to this many elements keep their data: shape inference reads values of small
# integer tensors (Reshape shapes, Slice bounds); weights never influence shapes.
SMALL_TENSOR_ELEMENTS = 4096


def skeleton(model: onnx.ModelProto, empty_stubs: bool = False) -> onnx.ModelProto:
    """The model without its big weights. A stub keeps name and type, and its dims (for shape
    inference) or, with `empty_stubs`, dims [0] and no data (a valid empty tensor for the checker)."""
    skeleton = copy_without(model, "graph")
    graph = skeleton.graph
    graph.CopyFrom(copy_without(model.graph, "initializer"))
    for tensor in model.graph.initializer:
        elements = 1
        for dim in tensor.dims:
            elements *= dim
        if elements <= SMALL_TENSOR_ELEMENTS and tensor.data_location != onnx.TensorProto.EXTERNAL:
            graph.initializer.append(tensor)
        else:
            stub = graph.initializer.add()
            stub.name = tensor.name
            stub.data_type = tensor.data_type
            stub.dims.extend([0] if empty_stubs else tensor.dims)
    return skeleton


# Below this serialised size a self-contained model is checked as it is: copying its graph into a
# skeleton would cost more than serialising its few weights.
SKELETON_ABOVE_BYTES = 16 * 1024 * 1024


def weight_free(model: onnx.ModelProto, empty_stubs: bool = False) -> onnx.ModelProto:
    """What the checker and shape inference should see: the model itself when it is small and all
    its weights are in the proto, else its `skeleton`. Sizes come from dims (`raw_size`): upb's
    ByteSize() would serialise the model to measure it."""
    size = 0
    for tensor in model.graph.initializer:
        size += raw_size(tensor)
        if tensor.data_location == onnx.TensorProto.EXTERNAL or size >= SKELETON_ABOVE_BYTES:
            return skeleton(model, empty_stubs)
    return model


def infer_value_infos(model: onnx.ModelProto) -> dict[str, dict[str, ValueInfo]]:
    """Value types and shapes per graph scope ("main", "main/<node>.<attr>", ...), as the graph
    proves them: inferred from the declared graph inputs and the constants only.

    A fold decision may rest on nothing else. `value_info` (and shapes declared on outputs or on a
    subgraph's formal inputs) is a claim a stale export can get wrong, so inference runs on a copy
    without it; what inference cannot derive stays unknown (or symbolic) and the rules refuse what
    needs it. Data propagation lets Reshape targets computed from Shape nodes count as proven.
    """
    evidence = _without_declared_shapes(weight_free(model), model)
    try:
        inferred = onnx.shape_inference.infer_shapes(evidence, check_type=False, strict_mode=False, data_prop=True)
    except Exception:  # noqa: BLE001 - any inference failure just means "less is known"
        inferred = evidence
    return {scope: value_infos_of(graph) for scope, graph in iter_scopes(inferred.graph, MAIN_SCOPE)}


def _without_declared_shapes(model: onnx.ModelProto, original: onnx.ModelProto) -> onnx.ModelProto:
    """`model` keeping only the shapes its graph inputs declare: no value_info, no shapes on graph
    outputs or on subgraph inputs (element types stay; inference needs them). Edited in place when
    it is already a copy (a skeleton), else copied: `original` is never touched."""
    copy = model
    if model is original:
        copy = copy_without(model, "graph")
        copy.graph.CopyFrom(copy_without(model.graph, "value_info"))
    for scope, graph in iter_scopes(copy.graph, MAIN_SCOPE):
        del graph.value_info[:]
        # The main graph's inputs are the feeds the runtime checks; a subgraph's are formal parameters.
        values = list(graph.output) if scope == MAIN_SCOPE else [*graph.input, *graph.output]
        for value in values:
            if value.type.HasField("tensor_type"):
                value.type.tensor_type.ClearField("shape")
    for function in copy.functions:
        del function.value_info[:]
    untrusted = [node for _, body in iter_scopes(copy) for node in body.node if _inference_disagrees_with_runtime(node)]
    for node in untrusted:
        node.domain = UNTRUSTED_DOMAIN  # an op inference does not know: its outputs stay unknown
    if untrusted:
        copy.opset_import.add(domain=UNTRUSTED_DOMAIN, version=1)
    return copy


# onnx's inference of these disagrees with the runtime: for a pool with ceil_mode=1 it counts a last
# window that starts inside the end padding, which the spec (opset 19) and onnxruntime drop.
_CEIL_MODE_POOLS = frozenset({"MaxPool", "AveragePool", "LpPool"})
UNTRUSTED_DOMAIN = "bnfold.shape_not_inferred"


def _inference_disagrees_with_runtime(node: onnx.NodeProto) -> bool:
    return node.op_type in _CEIL_MODE_POOLS and node.domain in ("", "ai.onnx") and \
        attribute(node, "ceil_mode", 0) == 1
