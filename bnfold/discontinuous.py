"""Which graph outputs are downstream of a discontinuous op.

A fold changes float rounding by an ulp or so. A continuous op passes such a difference on with
bounded growth, but an op whose result jumps at some input value (a comparison, rounding, an index
of a maximum, a selection by score) can turn it into a different integer, a reordered list, or a
different box: outputs behind such an op may differ after a correct fold. The list follows the
operator specification: ops (or op outputs) that are not continuous in their floating-point inputs.
"""

from __future__ import annotations

import onnx

from bnfold.walk import iter_nodes, subgraphs_of

ALL = None  # every output of the op
# op type -> output positions that are discontinuous functions of the op's float inputs.
DISCONTINUOUS: dict[str, tuple[int, ...] | None] = {
    # comparisons and predicates: a bool flips when a value crosses another
    "Greater": ALL, "Less": ALL, "Equal": ALL, "GreaterOrEqual": ALL, "LessOrEqual": ALL,
    "IsNaN": ALL, "IsInf": ALL,
    # rounding and steps
    "Round": ALL, "Floor": ALL, "Ceil": ALL, "Sign": ALL, "Mod": ALL,
    "ThresholdedRelu": ALL, "Shrink": ALL, "Hardmax": ALL,
    "QuantizeLinear": ALL, "DynamicQuantizeLinear": ALL,
    # positions of extremes, selections, data-dependent shapes
    "ArgMax": ALL, "ArgMin": ALL, "TopK": (1,), "MaxPool": (1,), "NonMaxSuppression": ALL,
    "NonZero": ALL, "Unique": ALL,
    # region ops that round or adapt their sampling grid to the region's coordinates
    "RoiAlign": ALL, "MaxRoiPool": ALL,
}
INTEGER_TYPES = {onnx.TensorProto.BOOL, onnx.TensorProto.INT8, onnx.TensorProto.INT16, onnx.TensorProto.INT32,
                 onnx.TensorProto.INT64, onnx.TensorProto.UINT8, onnx.TensorProto.UINT16, onnx.TensorProto.UINT32,
                 onnx.TensorProto.UINT64, onnx.TensorProto.INT4, onnx.TensorProto.UINT4}


def _discontinuous_positions(node: onnx.NodeProto) -> tuple[int, ...] | None | bool:
    """The node's discontinuous outputs (ALL = every one), or False for a continuous node."""
    if node.op_type == "Cast":
        to = next((a.i for a in node.attribute if a.name == "to"), 0)
        return ALL if to in INTEGER_TYPES else False
    if node.op_type == "CastLike":  # the target type is another tensor's: assume an integer one
        return ALL
    if node.op_type == "GridSample":
        mode = next((a.s.decode() for a in node.attribute if a.name == "mode"), "bilinear")
        return ALL if mode == "nearest" else False
    if node.domain not in ("", "ai.onnx"):
        return False
    return DISCONTINUOUS.get(node.op_type, False)


def _label(node: onnx.NodeProto) -> str:
    return f"{node.op_type} '{node.name or node.output[0]}'"


def _inner(graph: onnx.GraphProto) -> tuple[str | None, set[str]]:
    """A discontinuous op anywhere inside `graph` (label), and every name its nodes read."""
    found, reads = None, set()
    for node in iter_nodes(graph.node):
        reads.update(node.input)
        if found is None and _discontinuous_positions(node) is not False:
            found = _label(node)
    return found, reads


def _reads_values_of(node: onnx.NodeProto, names: set[str]) -> bool:
    """Does `node` read the numbers (not just the shape or dtype) of one of `names`?"""
    from bnfold.rules.readers import reads_only_shape

    return any(name in names and not reads_only_shape(node, name) for name in node.input)


def discontinuous_sources(graph: onnx.GraphProto, folded: set[str]) -> dict[str, str]:
    """graph output name -> the first discontinuous op it is downstream of whose input values a fold
    can change (outputs that are not downstream of one are absent). `folded`: the tensors the folds
    produced; only values computed from their numbers differ between the models, so a Cast to int
    of an image size (a Shape of the input) never excuses anything. Subgraph bodies count as part
    of their node."""
    origin: dict[str, str] = {}
    affected = set(folded)
    for node in graph.node:
        touched = _reads_values_of(node, affected) or any(
            _inner(body)[1] & affected for body in subgraphs_of(node))
        if not touched:
            continue
        affected.update(name for name in node.output if name)
        positions = _discontinuous_positions(node)
        inherited = next((origin[name] for name in node.input if name in origin), None)
        if inherited is None:
            bodies = subgraphs_of(node)
            for body in bodies:
                inner, reads = _inner(body)
                inherited = inner or next((origin[name] for name in reads if name in origin), None)
                if inherited:
                    break
        for position, name in enumerate(node.output):
            if positions is ALL or (positions and position in positions):
                origin[name] = _label(node)
            elif inherited is not None:
                origin[name] = inherited
    return {output.name: origin[output.name] for output in graph.output if output.name in origin}
