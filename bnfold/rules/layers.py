"""Linear layers that can absorb a per-channel affine map: Conv, ConvTranspose, Gemm, MatMul.

`match_layer` reads a layer's constant parameters and channel layout; `fold_parameters` composes
`post(layer(pre(x)))` into new float64 parameters (via `fold_math`) and `build_nodes` turns them into
the replacement node(s). A MatMul whose fold needs a bias becomes a Gemm when its input is 2-D, or a
MatMul + Add otherwise.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import onnx

from bnfold import fold_math
from bnfold.fold_math import ChannelAffine, is_bfloat16, is_float
from bnfold.graph import GraphIndex, attribute
from bnfold.report import Reason
from bnfold.rules.affine_ops import is_default_domain
from bnfold.rules.conv_attributes import invalid_attribute
from bnfold.rules.refusal import Refusal

LAYER_OPS = frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul"})


@dataclass(frozen=True)
class Layer:
    """A linear layer with constant parameters and known channel axes."""

    node: onnx.NodeProto
    weight: np.ndarray  # as stored (its dtype is the dtype every new parameter is rounded to)
    bias: np.ndarray | None
    output_rank: int | None
    out_axis: int | None  # axis of the output tensor that carries output channels
    in_axis: int | None  # axis of the input tensor that the layer contracts over channels
    out_channels: int
    in_channels: int
    attributes: dict = field(default_factory=dict)

    @property
    def kind(self) -> str:
        return self.node.op_type

    @property
    def data_input(self) -> str:
        return self.node.input[0]

    @property
    def output(self) -> str:
        return self.node.output[0]


def match_layer(node: onnx.NodeProto, index: GraphIndex) -> Layer | Refusal | None:
    """The layer `node` is, None if it is no layer kind at all, or why its parameters are unusable."""
    if node.op_type not in LAYER_OPS or not is_default_domain(node) or len(node.input) < 2:
        return None
    weight = index.constant(node.input[1])
    if weight is None and node.op_type in ("MatMul", "Gemm") and index.constant(node.input[0]) is not None:
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
    if node.op_type in ("Conv", "ConvTranspose"):
        invalid = invalid_attribute(node)
        if invalid is not None:
            return invalid
        if weight.ndim < 3:
            return Refusal(Reason.UNKNOWN_SHAPE, f"{node.op_type} weight of rank {weight.ndim}")
        group = int(attribute(node, "group", 1))
        if node.op_type == "Conv":
            out_channels, in_channels = weight.shape[0], weight.shape[1] * group
        else:
            out_channels, in_channels = weight.shape[1] * group, weight.shape[0]
        attrs = {"group": group, "input_spatial": _same_padding_input(node, index)}
        return Layer(node, weight, bias, weight.ndim, 1, 1, out_channels, in_channels, attrs)
    if weight.ndim != 2:
        return Refusal(Reason.UNKNOWN_SHAPE, f"{node.op_type} weight of rank {weight.ndim} (2 needed)")
    if node.op_type == "Gemm":
        attrs = {
            "alpha": float(attribute(node, "alpha", 1.0)),
            "beta": float(attribute(node, "beta", 1.0)),
            "trans_a": int(attribute(node, "transA", 0)),
            "trans_b": int(attribute(node, "transB", 0)),
        }
        if not (np.isfinite(attrs["alpha"]) and np.isfinite(attrs["beta"])):
            return Refusal(Reason.INVALID_PARAMS, f"Gemm alpha={attrs['alpha']} beta={attrs['beta']} not finite")
        out_channels, in_channels = weight.shape if attrs["trans_b"] else weight.shape[::-1]
        return Layer(node, weight, bias, 2, 1, None if attrs["trans_a"] else 1, out_channels, in_channels, attrs)
    # MatMul(x, W): output features on the last axis, contraction over x's last axis.
    input_rank = index.rank(node.input[0])
    output_rank = None if input_rank is None else max(input_rank, 2)
    in_axis = None if input_rank is None else input_rank - 1
    out_axis = None if output_rank is None else output_rank - 1
    return Layer(node, weight, None, output_rank, out_axis, in_axis, weight.shape[1], weight.shape[0])


def _same_padding_input(node: onnx.NodeProto, index: GraphIndex) -> tuple | None:
    """The spatial dims of a SAME-padded Conv's input (how much SAME pads depends on them); None for
    any other Conv, whose padding the attributes say (shapes come from shape inference, which is
    only run when a rule needs it: most graphs never pay for it)."""
    if node.op_type != "Conv" or _auto_pad(node) not in ("SAME_UPPER", "SAME_LOWER"):
        return None
    info = index.info(node.input[0])
    return None if info is None or info.shape is None else tuple(info.shape[2:])


def _auto_pad(node: onnx.NodeProto) -> str:
    auto_pad = attribute(node, "auto_pad", b"NOTSET")
    return auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad


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
    if layer.kind == "ConvTranspose" and not shift_free:
        # How many kernel taps reach an output position varies at the borders and with the stride,
        # so a shift never becomes one bias per output channel. A pure scale folds exactly.
        return Refusal(Reason.CONSUMER_NOT_FOLDABLE, "a shift before ConvTranspose does not reach every output "
                       "position equally; only a pure scale folds forward into it")
    if layer.kind == "Gemm" and layer.attributes["trans_a"]:
        return Refusal(Reason.UNSUPPORTED_ATTRIBUTE, "Gemm transA=1 contracts over axis 0 of its input")
    if layer.kind == "Conv" and not shift_free:
        # The padded zeros bypass the map: s*x + t is applied to the data but not to the zeros the
        # Conv adds around it. A pure scale maps 0 to 0, so for it padding does not matter.
        spatial = layer.attributes.get("input_spatial")
        padding = _conv_padding(layer.node, layer.weight.shape[2:], spatial)
        if padding is None:
            dims = "unknown" if spatial is None else list(spatial)
            return Refusal(Reason.UNKNOWN_SHAPE, f"Conv '{layer.node.name or layer.output}' auto_pad={_auto_pad(layer.node)}"
                           f" pads by an amount that depends on its input's spatial dims, which the graph does not "
                           f"fix (inferred: {dims})")
        if padding:
            return Refusal(Reason.PADDED_CONSUMER, f"Conv '{layer.node.name or layer.output}' {padding}: "
                           "zero padding is applied after the affine map, so the fold is not exact")
    if layer.kind == "MatMul" and layer.in_axis != 1:
        return Refusal(Reason.CHANNEL_AXIS_MISMATCH, "forward fold into MatMul needs a 2-D input")
    if axis is not None and layer.in_axis is None:
        return Refusal(Reason.UNKNOWN_SHAPE, f"rank of {layer.kind} input is unknown")
    if axis is not None and axis != layer.in_axis:
        return Refusal(Reason.CHANNEL_AXIS_MISMATCH, f"acts on axis {axis}, {layer.kind} contracts axis {layer.in_axis}")
    if channels not in (1, layer.in_channels):
        return Refusal(Reason.CHANNEL_COUNT_MISMATCH, f"{channels} channels vs {layer.in_channels} inputs")
    return None


def _conv_padding(node: onnx.NodeProto, kernel: tuple[int, ...], input_spatial: tuple | None) -> str | None:
    """A description of the zero padding a Conv applies, '' when it applies none, None when that
    depends on input dims the graph leaves unknown (SAME padding)."""
    auto_pad = _auto_pad(node)
    if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        total = _same_total_padding(node, kernel, input_spatial)
        if total is None:
            return None
        return f"auto_pad={auto_pad}" if any(total) else ""
    if auto_pad == "VALID":
        return ""
    pads = attribute(node, "pads", None) or []
    return f"pads={list(pads)}" if any(pads) else ""


def _same_total_padding(node: onnx.NodeProto, kernel: tuple[int, ...], input_spatial: tuple | None) -> list[int] | None:
    """Total SAME padding per spatial axis (ONNX Conv spec: output = ceil(in / stride), padding
    = max(0, (output - 1) * stride + (kernel - 1) * dilation + 1 - in)); None when it depends on a
    dim that is not known. A stride-1 kernel of 1 pads nothing whatever the input size."""
    strides = list(attribute(node, "strides", None) or [1] * len(kernel))
    dilations = list(attribute(node, "dilations", None) or [1] * len(kernel))
    if all(k == 1 for k in kernel) and all(s == 1 for s in strides):
        return [0] * len(kernel)
    if input_spatial is None or len(input_spatial) != len(kernel) or \
            not all(isinstance(d, int) and d > 0 for d in input_spatial):
        return None
    totals = []
    for size, k, stride, dilation in zip(input_spatial, kernel, strides, dilations):
        output = -(-size // stride)
        totals.append(max(0, (output - 1) * stride + (k - 1) * dilation + 1 - size))
    return totals


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
    attrs = layer.attributes
    if layer.kind == "Gemm":
        alpha, beta, trans_b = attrs["alpha"], attrs["beta"], bool(attrs["trans_b"])
        if pre is not None:
            weight, bias = fold_math.gemm_forward(weight, bias, pre, alpha, beta, trans_b)
            alpha = beta = 1.0
        if post is not None:
            weight, bias = fold_math.gemm_backward(weight, bias, post, alpha, beta, trans_b, out_dtype)
        elif pre is None:
            raise ValueError("nothing to fold")
        return FoldedParameters(weight, bias)
    if pre is not None:
        if layer.kind == "Conv":
            weight, bias = fold_math.conv_forward(weight, bias, pre, attrs["group"])
        elif layer.kind == "ConvTranspose":  # a pure scale (forward_refusal refuses shifts)
            weight, bias = fold_math.conv_transpose_forward(weight, bias, pre)
        else:
            weight, bias = fold_math.matmul_forward(weight, pre)
    if post is not None:
        if layer.kind == "Conv":
            weight, bias = fold_math.conv_backward(weight, bias, post, out_dtype)
        elif layer.kind == "ConvTranspose":
            weight, bias = fold_math.conv_transpose_backward(weight, bias, post, attrs["group"], out_dtype)
        else:
            weight, bias = fold_math.matmul_backward(weight, bias, post, out_dtype)
    if bias is not None and layer.bias is None and not bias.any():
        bias = None  # only scales were absorbed: no need for a zero bias
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
    return max(abs(float(values.max())), abs(float(values.min())))


@functools.cache
def _largest_finite(dtype: np.dtype) -> float | None:
    if is_bfloat16(dtype):
        import ml_dtypes

        return float(ml_dtypes.finfo(ml_dtypes.bfloat16).max)
    return float(np.finfo(dtype).max) if dtype.kind == "f" else None


# Allocates an initializer name for a role ("weight"/"bias") of the layer, given a preferred name.
NameFor = Callable[[str, str], str]


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
    if layer.kind in ("Conv", "ConvTranspose"):
        node.input.extend([x_name, weight_name, bias_name])
        return [node], tensors
    if layer.kind == "Gemm" or layer.in_axis == 1:
        # Gemm (or a 2-D MatMul turned into one): alpha and beta are already inside B and C.
        gemm = node  # a copy of the layer node: name and doc_string stay
        gemm.op_type, gemm.domain = "Gemm", ""
        kept = [a for a in layer.node.attribute if a.name in ("transA", "transB")] if layer.kind == "Gemm" else []
        del gemm.attribute[:]
        gemm.attribute.extend(kept)
        gemm.input.extend([x_name, weight_name, bias_name])
        if opset < 7 and tensors[bias_name].ndim < 2:
            gemm.attribute.append(onnx.helper.make_attribute("broadcast", 1))
        return [gemm], tensors
    # MatMul on a rank >= 3 input: keep the MatMul and add the bias after it.
    matmul_output = f"{y_name}_bnfold_matmul"
    node.input.extend([x_name, weight_name])
    node.output[0] = name_for("value", matmul_output)
    add_name = name_for("node", f"{layer.node.name}_bias") if layer.node.name else ""
    add = onnx.helper.make_node("Add", [node.output[0], bias_name], [y_name], name=add_name)
    return [node, add], tensors
