"""Values that are constant although a plain constant-subgraph walk says no.

1. Type and shape readers. `CastLike(c, x)` reads only x's element type, `Shape(x)` / `Size(x)` only
   its dims. When those are fixed whatever the input values are — declared by the main graph's
   inputs (the runtime rejects any other feed) and propagated by onnx's shape inference from them and
   the constants, never from the model's own value_info, which nothing checks — the reader's output
   is a constant. torch.onnx's dynamo exporter (optimize=False) writes every bias-free Conv's zero
   bias as `Expand(CastLike(0, x), Expand(Shape(W, end=1), [1]))`. A symbolic or unknown dim keeps
   the value dynamic.
2. Batch statistics of a constant. `BatchNormalization(training_mode=1)` normalises X by X's own
   per-channel mean and biased variance; on a constant X (NF-Nets standardise their conv weights so)
   with its running mean/var outputs unread, Y is a constant: computed in float64 and rounded once.

`bnfold.graph.GraphIndex.constant` asks this module when it meets such a node; `bnfold.node_merges`
replaces a constant training-mode BN by an initializer named like its output. This module reads
nodes and arrays only, never a `GraphIndex` (which imports it).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx

from bnfold.fold_math import InvalidAffineError, batch_statistics_normalized, is_float, round_to_dtype
from bnfold.protos import ValueInfo, attribute

# (op type, input position) -> what the op reads of that input: its element type or its dims.
METADATA_READS = {("Shape", 0): "dims", ("Size", 0): "dims", ("CastLike", 1): "element type"}


def metadata_read(node: onnx.NodeProto, position: int) -> str | None:
    """'dims' or 'element type' when `node` reads nothing but that of its input at `position`."""
    if node.domain not in ("", "ai.onnx"):
        return None
    return METADATA_READS.get((node.op_type, position))


def placeholder(info: ValueInfo | None, node: onnx.NodeProto, position: int) -> np.ndarray | None:
    """An array standing in for input `position` of `node`, which reads only its element type or
    dims: zeros of that type and shape, without memory (a broadcast view). None when what the node
    reads is not fixed. Dims the node does not read (outside a Shape's start/end) may be symbolic."""
    kind = metadata_read(node, position)
    if info is None or kind is None:
        return None
    try:
        dtype = onnx.helper.tensor_dtype_to_np_dtype(info.elem_type) if info.elem_type else None
    except (KeyError, ValueError, TypeError):
        dtype = None
    if kind == "element type":
        return None if dtype is None else np.zeros((), dtype)
    if info.shape is None:
        return None
    fixed = [isinstance(dim, int) and dim >= 0 for dim in info.shape]
    if not all(fixed[axis] for axis in _dims_read(node, len(info.shape))):
        return None
    shape = [dim if known else 1 for dim, known in zip(info.shape, fixed)]
    return np.broadcast_to(np.zeros((), dtype or np.float32), shape)


def _dims_read(node: onnx.NodeProto, rank: int) -> range:
    """The axes whose dims the node's output depends on: Shape-15's [start, end) (negative counts
    from the back, clamped to the rank), every axis for Shape-1 and Size."""
    if node.op_type != "Shape":
        return range(rank)
    bounds = [int(attribute(node, "start", 0)), int(attribute(node, "end", rank))]
    start, end = (min(max(bound + rank if bound < 0 else bound, 0), rank) for bound in bounds)
    return range(start, end)


# --- training-mode BatchNormalization of a constant ----------------------------------------------


def is_training_bn(node: onnx.NodeProto) -> bool:
    return node.op_type == "BatchNormalization" and node.domain in ("", "ai.onnx") \
        and bool(attribute(node, "training_mode", 0))


def training_bn_output(node: onnx.NodeProto, x: np.ndarray, scale: np.ndarray, bias: np.ndarray) -> np.ndarray | None:
    """Y of a training-mode BN on constant inputs, rounded once to X's dtype; None when the spec
    gives no finite result or the inputs do not fit it (then the BN stays, and is refused)."""
    if not all(is_float(value.dtype) for value in (x, scale, bias)) or scale.ndim != 1 or bias.ndim != 1:
        return None
    try:
        y = batch_statistics_normalized(x, scale, bias, float(attribute(node, "epsilon", 1e-5)))
    except InvalidAffineError:
        return None
    return round_to_dtype(y, x.dtype)


@dataclass
class EvaluatedConstant:
    """A training-mode BN replaced by its value, kept for the analytic check in `bnfold.verify`."""

    scope: str
    node: onnx.NodeProto  # a copy of the BN
    inputs: list[np.ndarray]  # X, scale, B as stored
    values: np.ndarray  # what was written


def recompute(record: EvaluatedConstant) -> np.ndarray:
    """Y recomputed in float64 by onnx's reference evaluator running the BN itself (training mode,
    BN-15), independently of `fold_math`; mean/var inputs only feed the unread running outputs."""
    from onnx.reference import ReferenceEvaluator

    x, scale, bias = (np.asarray(value, dtype=np.float64) for value in record.inputs)
    channels = x.shape[1]
    feeds = {"x": x, "scale": scale, "bias": bias, "mean": np.zeros(channels), "var": np.ones(channels)}
    epsilon = next((a.f for a in record.node.attribute if a.name == "epsilon"), 1e-5)
    node = onnx.helper.make_node("BatchNormalization", list(feeds), ["y", "running_mean", "running_var"],
                                 epsilon=epsilon, training_mode=1)
    graph = onnx.helper.make_graph(
        [node], "recompute",
        [onnx.helper.make_tensor_value_info(name, onnx.TensorProto.DOUBLE, value.shape) for name, value in feeds.items()],
        [onnx.helper.make_empty_tensor_value_info(name) for name in node.output])
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 15)])
    return np.asarray(ReferenceEvaluator(model).run(["y"], feeds)[0], dtype=np.float64)
