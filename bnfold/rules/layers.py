"""Linear layers that can absorb a per-channel affine map: what every layer kind shares.

`match_layer` reads a layer's constant parameters and channel layout; `fold_parameters` composes
`post(layer(pre(x)))` into new float64 parameters (via `fold_math`) and `build_nodes` turns them into
the replacement node(s). What differs per kind (Conv, ConvTranspose, Gemm, MatMul) is in
`bnfold.rules.layer_kinds`, reached through `LAYER_KINDS`.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import onnx

from bnfold import fold_math
from bnfold.fold_math import ChannelAffine, is_bfloat16, is_float
from bnfold.graph import GraphIndex
from bnfold.report import Reason
from bnfold.rules.affine_ops import is_default_domain
from bnfold.rules.layer_kinds import LAYER_KINDS, Layer, NameFor
from bnfold.rules.refusal import Refusal

__all__ = ["LAYER_OPS", "Layer", "NameFor", "match_layer", "backward_refusal", "forward_refusal", "fold_parameters",
           "overflow_refusal", "build_nodes", "peak_abs"]

LAYER_OPS = frozenset(LAYER_KINDS)


def match_layer(node: onnx.NodeProto, index: GraphIndex) -> Layer | Refusal | None:
    """The layer `node` is, None if it is no layer kind at all, or why its parameters are unusable."""
    kind = LAYER_KINDS.get(node.op_type)
    if kind is None or not is_default_domain(node) or len(node.input) < 2:
        return None
    weight = index.constant(node.input[1])
    if weight is None and kind.weight_may_be_left and index.constant(node.input[0]) is not None:
        return Refusal(Reason.WEIGHT_ON_LEFT, f"{node.op_type} '{node.name or node.output[0]}' has its constant "
                       f"operand '{node.input[0]}' on the left (W·x): only x·W with a constant right operand folds")
    if weight is None:
        return Refusal(Reason.WEIGHT_NOT_CONSTANT,
                       f"{node.op_type} weight '{node.input[1]}' {index.why_not_constant(node.input[1])}")
    if not is_float(weight.dtype):
        return Refusal(Reason.UNSUPPORTED_DTYPE, f"{node.op_type} weight has dtype {weight.dtype}")
    bias = None
    if len(node.input) > 2 and node.input[2]:
        bias = index.constant(node.input[2])
        if bias is None:
            return Refusal(Reason.WEIGHT_NOT_CONSTANT,
                           f"{node.op_type} bias '{node.input[2]}' {index.why_not_constant(node.input[2])}")
    return kind.match(node, index, weight, bias)


def backward_refusal(layer: Layer, axis: int | None, channels: int) -> Refusal | None:
    """Why an affine map on `axis` with `channels` channels after `layer` cannot be absorbed."""
    if axis is not None and layer.out_axis is None:
        return Refusal(Reason.UNKNOWN_SHAPE, f"rank of {layer.kind} output '{layer.output}' is unknown")
    if axis is not None and axis != layer.out_axis:
        return Refusal(Reason.CHANNEL_AXIS_MISMATCH, f"acts on axis {axis}, {layer.kind} output channels are "
                       f"axis {layer.out_axis} of a rank-{layer.output_rank} tensor")
    if channels not in (1, layer.out_channels):
        return Refusal(Reason.CHANNEL_COUNT_MISMATCH, f"{channels} channels vs {layer.out_channels} outputs")
    return None


def forward_refusal(layer: Layer, axis: int | None, channels: int, shift_free: bool = False) -> Refusal | None:
    """Why an affine map on `axis` feeding `layer` cannot be absorbed into it. `shift_free`: the map
    only scales (shift 0 everywhere), so it commutes with zero padding."""
    refusal = LAYER_KINDS[layer.kind].forward_refusal(layer, shift_free)
    if refusal is not None:
        return refusal
    if axis is not None and layer.in_axis is None:
        return Refusal(Reason.UNKNOWN_SHAPE, f"rank of {layer.kind} input is unknown")
    if axis is not None and axis != layer.in_axis:
        return Refusal(Reason.CHANNEL_AXIS_MISMATCH, f"acts on axis {axis}, {layer.kind} contracts axis {layer.in_axis}")
    if channels not in (1, layer.in_channels):
        return Refusal(Reason.CHANNEL_COUNT_MISMATCH, f"{channels} channels vs {layer.in_channels} inputs")
    return None


@dataclass(frozen=True)
class FoldedParameters:
    weight: np.ndarray  # float64
    bias: np.ndarray | None  # float64; None: the layer needs no bias


def fold_parameters(layer: Layer, pre: ChannelAffine | None, post: ChannelAffine | None,
                    round_weight: bool = False) -> FoldedParameters:
    """The float64 parameters of `post ∘ layer ∘ pre` (either map may be absent). With
    `round_weight` a backward-only fold returns the weight already rounded to the layer's dtype."""
    out_dtype = layer.weight.dtype if round_weight and pre is None else None
    # numpy promotes float16/float32 weights to float64 inside the first product, which saves a
    # float64 copy of every weight; bfloat16 (ml_dtypes) is widened explicitly.
    weight = layer.weight if layer.weight.dtype.kind == "f" else layer.weight.astype(np.float64)
    bias = None if layer.bias is None else layer.bias.astype(np.float64)
    weight, bias = LAYER_KINDS[layer.kind].fold(layer, weight, bias, pre, post, out_dtype)
    return FoldedParameters(weight, bias)


def overflow_refusal(layer: Layer, pre: ChannelAffine | None, post: ChannelAffine | None) -> Refusal | None:
    """Folding must not push a parameter past its dtype's range: a float16 weight scaled by a large
    gamma/sqrt(var + eps) would become inf and silently change the outputs. A cheap magnitude bound
    clears almost every layer; only near the limit are the parameters computed and checked."""
    limit = _largest_finite(layer.weight.dtype)
    peaks = [peak_abs(layer.weight)] + ([peak_abs(layer.bias)] if layer.bias is not None else [])
    if limit is None or not all(np.isfinite(peaks)):
        return None  # non-finite parameters stay what they are: nothing new can overflow
    fan_in = layer.weight.size // max(layer.out_channels, 1)
    gain = 1.0 + max(abs(layer.attributes.get("alpha", 1.0)), abs(layer.attributes.get("beta", 1.0)))
    if pre is not None:
        gain *= (1.0 + fan_in) * max(1.0, peak_abs(pre.scale), peak_abs(pre.shift))
    if post is not None:
        gain *= max(1.0, peak_abs(post.scale))
    bound = sum(peaks) * gain + (peak_abs(post.shift) if post is not None else 0.0)
    if np.isfinite(bound) and bound < limit / 2:
        return None
    params = fold_parameters(layer, pre, post)
    for values in (params.weight, params.bias):
        if values is not None and not np.isfinite(fold_math.round_to_dtype(values, layer.weight.dtype)).all():
            return Refusal(Reason.INVALID_PARAMS, f"folded {layer.kind} parameters would overflow {layer.weight.dtype}")
    return None


def peak_abs(values: np.ndarray) -> float:
    """max |values| without a temporary copy (weights can be hundreds of MB, or memory-mapped)."""
    if values.size == 0:
        return 0.0
    if values.size <= _SMALL:  # one temporary is cheaper than a second reduction
        return float(np.abs(values).max())
    return max(abs(float(values.max())), abs(float(values.min())))


_SMALL = 4096


@functools.cache
def _largest_finite(dtype: np.dtype) -> float | None:
    if is_bfloat16(dtype):
        import ml_dtypes

        return float(ml_dtypes.finfo(ml_dtypes.bfloat16).max)
    return float(np.finfo(dtype).max) if dtype.kind == "f" else None


def build_nodes(
    layer: Layer, params: FoldedParameters, x_name: str, y_name: str, name_for: NameFor, opset: int,
    preferred_names: list[str] | None = None,
) -> tuple[list[onnx.NodeProto], dict[str, np.ndarray]]:
    """The node(s) replacing `layer`, reading `x_name` and producing `y_name`, and their tensors.
    `preferred_names`: the inputs of the node in the graph now (it may differ from `layer.node` when
    the layer was already folded once)."""
    current = preferred_names or list(layer.node.input)
    dtype = layer.weight.dtype
    tensors = {name_for("weight", current[1]): fold_math.round_to_dtype(params.weight, dtype)}
    weight_name = next(iter(tensors))
    node = onnx.NodeProto()
    node.CopyFrom(layer.node)
    del node.input[:]
    del node.output[:]
    node.output.append(y_name)
    if params.bias is None:
        node.input.extend([x_name, weight_name])
        return [node], tensors
    bias_name = name_for("bias", current[2] if len(current) > 2 and current[2] else f"{weight_name}_bias")
    tensors[bias_name] = fold_math.round_to_dtype(params.bias, dtype)
    return LAYER_KINDS[layer.kind].build(layer, node, (x_name, weight_name, bias_name), tensors, opset, name_for), tensors
