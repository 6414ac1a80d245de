"""MatMul + constant bias -> Gemm: `Add(MatMul(x, W), C)` is `Gemm(x, W, C)` when x is 2-D.

Gemm computes `alpha·A·B + beta·C` with A [M, K], B [K, N] and C unidirectionally broadcast to
[M, N] (spec: C may be a scalar, [N], [1, N], [M, 1] or [M, N]). So the Add goes into the Gemm as
it is: `x·W + C` (alpha = beta = 1), `x·W − C` (beta = −1), `C − x·W` (alpha = −1). Nothing is
computed: W and C keep their stored values and names, so the rewrite is exact whatever C's shape,
and no weight is copied when W is shared.

It applies only where it removes a node. A MatMul on a rank-3 input would need a Reshape on each
side to become a Gemm, so its bias stays an Add (reason `no_gain`). An Add whose constant would
broadcast the product up (C of rank 3, or C with M rows when M is not statically known or differs)
is not a Gemm's C and stays.
"""

from __future__ import annotations

from dataclasses import dataclass

import onnx

from bnfold.graph import GraphIndex
from bnfold.report import Reason
from bnfold.rules.layers import Layer
from bnfold.rules.refusal import Refusal

BIAS_OPS = frozenset({"Add", "Sub"})


@dataclass(frozen=True)
class GemmBiasPlan:
    """Replace `layer` (a MatMul on a 2-D input) and the Add/Sub after it by one Gemm."""

    layer: Layer
    node: onnx.NodeProto  # the Add / Sub
    bias: str  # its constant operand, read by the Gemm as C
    alpha: float
    beta: float
    at_add: bool = False  # the bias is computed after the MatMul: the Gemm goes where the Add is

    @property
    def output(self) -> str:
        return self.node.output[0]


def match_gemm_bias(layer: Layer, node: onnx.NodeProto, index: GraphIndex) -> GemmBiasPlan | Refusal | None:
    """The Gemm that `layer` -> `node` can become, why not, or None when `node` is no Add/Sub of
    a constant to the layer's output."""
    if layer.kind != "MatMul" or node.op_type not in BIAS_OPS or node.domain not in ("", "ai.onnx") \
            or len(node.input) != 2 or list(node.input).count(layer.output) != 1:
        return None
    position = list(node.input).index(layer.output)
    bias = node.input[1 - position]
    values = index.constant(bias)
    if values is None:
        return None
    if index.opset < 7:
        return Refusal(Reason.UNSUPPORTED_ATTRIBUTE, "before opset 7 Add and Gemm broadcast by legacy rules")
    refusal = _shape_refusal(layer, values.shape, index)
    if refusal is not None:
        return refusal
    if values.dtype != layer.weight.dtype:
        return Refusal(Reason.UNSUPPORTED_DTYPE, f"bias {values.dtype} vs weight {layer.weight.dtype}")
    producer = index.producer.get(bias)
    at_add = producer is not None and producer > index.producer[layer.output]
    if at_add and index.sole_consumer(layer.output) is None:
        return Refusal(Reason.PRODUCER_HAS_OTHER_CONSUMERS, f"MatMul output '{layer.output}' is also read for its "
                       "shape, before the bias is computed")
    subtracted = node.op_type == "Sub"
    alpha = -1.0 if subtracted and position == 1 else 1.0
    beta = -1.0 if subtracted and position == 0 else 1.0
    return GemmBiasPlan(layer, node, bias, alpha, beta, at_add)


def _shape_refusal(layer: Layer, shape: tuple[int, ...], index: GraphIndex) -> Refusal | None:
    """Why x of `layer` and a bias of `shape` are not Gemm's A and C."""
    if layer.in_axis is None:
        return Refusal(Reason.UNKNOWN_SHAPE, f"rank of MatMul input '{layer.data_input}' is unknown")
    if layer.in_axis != 1:
        return Refusal(Reason.NO_GAIN, f"MatMul on a rank-{layer.in_axis + 1} input keeps its bias as an Add "
                       "(Gemm takes 2-D inputs only): folding would remove no node")
    if len(shape) > 2:
        return Refusal(Reason.CHANNEL_AXIS_MISMATCH, f"bias of shape {list(shape)} broadcasts the 2-D product "
                       "up; Gemm's C is at most 2-D")
    if shape and shape[-1] not in (1, layer.out_channels):
        return Refusal(Reason.CHANNEL_COUNT_MISMATCH, f"bias of shape {list(shape)} vs {layer.out_channels} outputs")
    if len(shape) == 2 and shape[0] != 1:
        info = index.info(layer.data_input)
        rows = None if info is None or info.shape is None else info.shape[0]
        if not isinstance(rows, int) or rows <= 0:
            return Refusal(Reason.UNKNOWN_SHAPE, f"bias of shape {list(shape)} needs the number of rows of "
                           f"'{layer.data_input}', which is not static")
        if rows != shape[0]:
            return Refusal(Reason.CHANNEL_COUNT_MISMATCH, f"bias of shape {list(shape)} vs {rows} rows")
    return None


def gemm_node(plan: GemmBiasPlan) -> onnx.NodeProto:
    """The Gemm replacing the MatMul (its name and doc_string kept), producing the Add's output."""
    gemm = onnx.NodeProto()
    gemm.CopyFrom(plan.layer.node)
    gemm.op_type, gemm.domain = "Gemm", ""
    del gemm.input[:], gemm.output[:], gemm.attribute[:]
    gemm.input.extend([plan.layer.data_input, plan.layer.node.input[1], plan.bias])
    gemm.output.append(plan.output)
    for name, value in (("alpha", plan.alpha), ("beta", plan.beta)):
        if value != 1.0:
            gemm.attribute.append(onnx.helper.make_attribute(name, value))
    return gemm
