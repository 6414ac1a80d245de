"""One class per linear layer kind — Conv, ConvTranspose, Gemm, MatMul — owning everything that
differs between them: how its parameters and channel axes are read (`match`), why a map before it
cannot fold in (`forward_refusal`), which `fold_math` equations fold maps into it (`forward`,
`backward`), and the node(s) that replace it (`build`). `bnfold.rules.layers` holds what all kinds
share and dispatches through `LAYER_KINDS`; `fold_math` holds the numerics.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np
import onnx

from bnfold import fold_math
from bnfold.fold_math import ChannelAffine
from bnfold.graph import GraphIndex
from bnfold.protos import attribute
from bnfold.report import Reason
from bnfold.rules.conv_attributes import invalid_attribute
from bnfold.rules.refusal import Refusal

Parameters = tuple[np.ndarray, np.ndarray | None]  # (weight, bias), float64 once folded
# Allocates an initializer name for a role ("weight"/"bias"/"value"/"node") of the layer, given a preferred name.
NameFor = Callable[[str, str], str]


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
        """The op type, which names the layer's `LayerKind` in `LAYER_KINDS`."""
        return self.node.op_type

    @property
    def has_bias_input(self) -> bool:
        """False for a MatMul: a bias it absorbs needs an Add of its own, or a Gemm in its place."""
        return LAYER_KINDS[self.kind].has_bias_input

    @property
    def data_input(self) -> str:
        return self.node.input[0]

    @property
    def output(self) -> str:
        return self.node.output[0]


class LayerKind:
    """What is particular to one layer op type; the shared checks live in `bnfold.rules.layers`."""

    op_type: ClassVar[str]
    weight_may_be_left: ClassVar[bool] = False  # W·x is a valid (but unfoldable) use of the op
    has_bias_input: ClassVar[bool] = True

    def match(self, node: onnx.NodeProto, index: GraphIndex, weight: np.ndarray, bias: np.ndarray | None
              ) -> Layer | Refusal:
        raise NotImplementedError

    def forward_refusal(self, layer: Layer, shift_free: bool) -> Refusal | None:
        """Why a map on the layer's input channels cannot fold into this kind, before the shared
        axis and channel-count checks. `shift_free`: the map only scales."""
        return None

    def forward(self, layer: Layer, weight: np.ndarray, bias: np.ndarray | None, pre: ChannelAffine) -> Parameters:
        raise NotImplementedError

    def backward(self, layer: Layer, weight: np.ndarray, bias: np.ndarray | None, post: ChannelAffine,
                 out_dtype: np.dtype | None) -> Parameters:
        raise NotImplementedError

    def fold(self, layer: Layer, weight: np.ndarray, bias: np.ndarray | None, pre: ChannelAffine | None,
             post: ChannelAffine | None, out_dtype: np.dtype | None) -> Parameters:
        """The parameters of `post ∘ layer ∘ pre`."""
        if pre is not None:
            weight, bias = self.forward(layer, weight, bias, pre)
        if post is not None:
            weight, bias = self.backward(layer, weight, bias, post, out_dtype)
        if bias is not None and layer.bias is None and not bias.any():
            bias = None  # only scales were absorbed: no need for a zero bias
        return weight, bias

    def build(self, layer: Layer, node: onnx.NodeProto, names: tuple[str, str, str], tensors: dict[str, np.ndarray],
              opset: int, name_for: NameFor) -> list[onnx.NodeProto]:
        """The node(s) computing the folded layer with a bias; `node` is a copy of the layer node
        with its output set and no inputs, `names` (input, weight, bias)."""
        node.input.extend(names)
        return [node]


class _GroupedKind(LayerKind):
    """Conv and ConvTranspose: channels on axis 1 of input and output, a `group` attribute."""

    def match(self, node, index, weight, bias):
        invalid = invalid_attribute(node)  # spec-breaking values would reach the fold arithmetic
        if invalid is not None:
            return invalid
        if weight.ndim < 3:
            return Refusal(Reason.UNKNOWN_SHAPE, f"{node.op_type} weight of rank {weight.ndim}")
        group = int(attribute(node, "group", 1))
        out_channels, in_channels = self.channels(weight.shape, group)
        attrs = {"group": group, "input_spatial": self.input_spatial(node, index)}
        return Layer(node, weight, bias, weight.ndim, 1, 1, out_channels, in_channels, attrs)

    def channels(self, weight_shape: tuple[int, ...], group: int) -> tuple[int, int]:
        """(output channels, input channels) for a weight of this shape."""
        raise NotImplementedError

    def input_spatial(self, node: onnx.NodeProto, index: GraphIndex) -> tuple | None:
        return None


class ConvKind(_GroupedKind):
    op_type = "Conv"

    def channels(self, weight_shape, group):
        return weight_shape[0], weight_shape[1] * group  # weight [C_out, C_in / group, k...]

    def input_spatial(self, node, index):
        return _same_padding_input(node, index)

    def forward_refusal(self, layer, shift_free):
        if shift_free:
            return None
        # The padded zeros bypass the map: s*x + t is applied to the data but not to the zeros the
        # Conv adds around it. A pure scale maps 0 to 0, so for it padding does not matter.
        spatial = layer.attributes.get("input_spatial")
        padding = _conv_padding(layer.node, layer.weight.shape[2:], spatial)
        name = layer.node.name or layer.output
        if padding is None:
            dims = "unknown" if spatial is None else list(spatial)
            return Refusal(Reason.UNKNOWN_SHAPE, f"Conv '{name}' auto_pad={auto_pad(layer.node)} pads by an amount "
                           f"that depends on its input's spatial dims, which the graph does not fix (inferred: {dims})")
        if padding:
            return Refusal(Reason.PADDED_CONSUMER, f"Conv '{name}' {padding}: "
                           "zero padding is applied after the affine map, so the fold is not exact")
        return None

    def forward(self, layer, weight, bias, pre):
        return fold_math.conv_forward(weight, bias, pre, layer.attributes["group"])

    def backward(self, layer, weight, bias, post, out_dtype):
        return fold_math.conv_backward(weight, bias, post, out_dtype)


class ConvTransposeKind(_GroupedKind):
    op_type = "ConvTranspose"

    def channels(self, weight_shape, group):
        return weight_shape[1] * group, weight_shape[0]  # weight [C_in, C_out / group, k...]

    def forward_refusal(self, layer, shift_free):
        if shift_free:
            return None
        # How many kernel taps reach an output position varies at the borders and with the stride,
        # so a shift never becomes one bias per output channel. A pure scale folds exactly.
        return Refusal(Reason.CONSUMER_NOT_FOLDABLE, "a shift before ConvTranspose does not reach every output "
                       "position equally; only a pure scale folds forward into it")

    def forward(self, layer, weight, bias, pre):
        return fold_math.conv_transpose_forward(weight, bias, pre)  # a pure scale (forward_refusal)

    def backward(self, layer, weight, bias, post, out_dtype):
        return fold_math.conv_transpose_backward(weight, bias, post, layer.attributes["group"], out_dtype)


class GemmKind(LayerKind):
    op_type = "Gemm"
    weight_may_be_left = True

    def match(self, node, index, weight, bias):
        if weight.ndim != 2:
            return _matrix_rank_refusal(node, weight)
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

    def forward_refusal(self, layer, shift_free):
        if layer.attributes["trans_a"]:
            return Refusal(Reason.UNSUPPORTED_ATTRIBUTE, "Gemm transA=1 contracts over axis 0 of its input")
        return None

    def fold(self, layer, weight, bias, pre, post, out_dtype):
        # alpha and beta go into the new B and C; a bias stays even if zero (C's shape is kept).
        alpha, beta, trans_b = layer.attributes["alpha"], layer.attributes["beta"], bool(layer.attributes["trans_b"])
        if pre is not None:
            weight, bias = fold_math.gemm_forward(weight, bias, pre, alpha, beta, trans_b)
            alpha = beta = 1.0
        if post is not None:
            weight, bias = fold_math.gemm_backward(weight, bias, post, alpha, beta, trans_b, out_dtype)
        elif pre is None:
            raise ValueError("nothing to fold")
        return weight, bias

    def build(self, layer, node, names, tensors, opset, name_for):
        return [gemm_with_bias(layer, node, names, tensors, opset)]


class MatMulKind(LayerKind):
    op_type = "MatMul"
    weight_may_be_left = True
    has_bias_input = False

    def match(self, node, index, weight, bias):
        if weight.ndim != 2:
            return _matrix_rank_refusal(node, weight)
        # MatMul(x, W): output features on the last axis, contraction over x's last axis.
        input_rank = index.rank(node.input[0])
        output_rank = None if input_rank is None else max(input_rank, 2)
        in_axis = None if input_rank is None else input_rank - 1
        out_axis = None if output_rank is None else output_rank - 1
        return Layer(node, weight, None, output_rank, out_axis, in_axis, weight.shape[1], weight.shape[0])

    def forward_refusal(self, layer, shift_free):
        if layer.in_axis != 1:
            return Refusal(Reason.CHANNEL_AXIS_MISMATCH, "forward fold into MatMul needs a 2-D input")
        return None

    def forward(self, layer, weight, bias, pre):
        return fold_math.matmul_forward(weight, pre)

    def backward(self, layer, weight, bias, post, out_dtype):
        return fold_math.matmul_backward(weight, bias, post, out_dtype)

    def build(self, layer, node, names, tensors, opset, name_for):
        """A MatMul needing a bias: a Gemm on a 2-D input; on a rank >= 3 one, the MatMul and an Add
        of the bias after it."""
        if layer.in_axis == 1:
            return [gemm_with_bias(layer, node, names, tensors, opset)]
        x_name, weight_name, bias_name = names
        y_name = node.output[0]
        node.input.extend([x_name, weight_name])
        node.output[0] = name_for("value", f"{y_name}_bnfold_matmul")
        add_name = name_for("node", f"{layer.node.name}_bias") if layer.node.name else ""
        return [node, onnx.helper.make_node("Add", [node.output[0], bias_name], [y_name], name=add_name)]


def gemm_with_bias(layer: Layer, node: onnx.NodeProto, names: tuple[str, str, str], tensors: dict[str, np.ndarray],
                   opset: int) -> onnx.NodeProto:
    """Gemm (or a 2-D MatMul turned into one): alpha and beta are already inside B and C."""
    gemm = node  # a copy of the layer node: name and doc_string stay
    gemm.op_type, gemm.domain = "Gemm", ""
    kept = [a for a in layer.node.attribute if a.name in ("transA", "transB")] if layer.kind == "Gemm" else []
    del gemm.attribute[:]
    gemm.attribute.extend(kept)
    gemm.input.extend(names)
    if opset < 7 and tensors[names[2]].ndim < 2:
        gemm.attribute.append(onnx.helper.make_attribute("broadcast", 1))
    return gemm


LAYER_KINDS: dict[str, LayerKind] = {kind.op_type: kind for kind in
                                     (ConvKind(), ConvTransposeKind(), GemmKind(), MatMulKind())}


def _matrix_rank_refusal(node: onnx.NodeProto, weight: np.ndarray) -> Refusal:
    return Refusal(Reason.UNKNOWN_SHAPE, f"{node.op_type} weight of rank {weight.ndim} (2 needed)")


def auto_pad(node: onnx.NodeProto) -> str:
    value = attribute(node, "auto_pad", b"NOTSET")
    return value.decode() if isinstance(value, bytes) else value


def _same_padding_input(node: onnx.NodeProto, index: GraphIndex) -> tuple | None:
    """The spatial dims of a SAME-padded Conv's input (how much SAME pads depends on them); None for
    any other Conv, whose padding the attributes say (shapes come from shape inference, which is
    only run when a rule needs it: most graphs never pay for it)."""
    if auto_pad(node) not in ("SAME_UPPER", "SAME_LOWER"):
        return None
    info = index.info(node.input[0])
    return None if info is None or info.shape is None else tuple(info.shape[2:])


def _conv_padding(node: onnx.NodeProto, kernel: tuple[int, ...], input_spatial: tuple | None) -> str | None:
    """A description of the zero padding a Conv applies, '' when it applies none, None when that
    depends on input dims the graph leaves unknown (SAME padding)."""
    mode = auto_pad(node)
    if mode in ("SAME_UPPER", "SAME_LOWER"):
        total = _same_total_padding(node, kernel, input_spatial)
        if total is None:
            return None
        return f"auto_pad={mode}" if any(total) else ""
    if mode == "VALID":
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
