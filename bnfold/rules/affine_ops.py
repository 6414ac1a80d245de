"""Recognise nodes that compute a per-channel affine map: BatchNormalization, and Mul / Add / Sub / Div
by a constant that broadcasts along a single axis.

A constant is per-channel on axis `a` of a rank-r tensor only under ONNX (numpy) broadcasting: its
shape, right-aligned against r, is 1 everywhere except at `a`. So [C,1,1] and [1,C,1,1] act on axis 1
of an NCHW tensor, while a [C]-shaped constant acts on the LAST axis (W), never on channels.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx

from bnfold.fold_math import (
    ChannelAffine,
    InvalidAffineError,
    bn_affine,
    compose_affines,
    is_float,
    scale_affine,
    shift_affine,
    subtracted_from_affine,
)
from bnfold.graph import GraphIndex
from bnfold.protos import attribute
from bnfold.report import Reason
from bnfold.rules.refusal import Refusal

ARITHMETIC_OPS = frozenset({"Mul", "Add", "Sub", "Div"})


@dataclass(frozen=True)
class AffineOp:
    """A node computing `scale * x + shift` along `axis` (None: a scalar map, valid on any axis)."""

    node: onnx.NodeProto
    data_input: str  # the non-constant input
    affine: ChannelAffine
    axis: int | None

    @property
    def output(self) -> str:
        return self.node.output[0]


def chain_affine(chain: list[AffineOp]) -> ChannelAffine | None:
    """The map a chain of ops computes (None for an empty chain)."""
    return compose_affines(op.affine for op in chain)


def chain_axis(chain: list[AffineOp]) -> int | None:
    """The axis a chain acts on: that of its first per-channel op (None if all are scalar maps)."""
    return next((op.axis for op in chain if op.axis is not None), None)


def chain_channels(chain: list[AffineOp]) -> int:
    return max(op.affine.channels for op in chain)


def is_default_domain(node: onnx.NodeProto) -> bool:
    return node.domain in ("", "ai.onnx")


def is_candidate(node: onnx.NodeProto) -> bool:
    """Could this node be an affine op at all (cheap test before the full check)?"""
    return is_default_domain(node) and (node.op_type == "BatchNormalization" or node.op_type in ARITHMETIC_OPS)


def match_affine(node: onnx.NodeProto, index: GraphIndex, rank: int | None) -> AffineOp | Refusal:
    """The affine map `node` computes on a tensor of `rank`, or why it is not a foldable one."""
    if node.op_type == "BatchNormalization":
        return match_batch_norm(node, index)
    return _match_arithmetic(node, index, rank)


def match_batch_norm(node: onnx.NodeProto, index: GraphIndex) -> AffineOp | Refusal:
    """Inference BN across opsets 1-15; `is_test` (opsets 1-6) is ignored on purpose."""
    if attribute(node, "training_mode", 0):
        return Refusal(Reason.TRAINING_MODE, training_mode_detail(node, index))
    if any(node.output[1:]):
        return Refusal(Reason.EXTRA_OUTPUTS, "running mean/var outputs are produced")
    if index.opset < 9 and attribute(node, "spatial", 1) != 1:
        return Refusal(Reason.NOT_SPATIAL, "spatial=0 normalises per element, not per channel")
    if len(node.input) < 5:
        return Refusal(Reason.INVALID_PARAMS, f"expected 5 inputs, found {len(node.input)}")
    params = []
    for role, name in zip(("scale", "B", "mean", "var"), node.input[1:5]):
        value = index.constant(name)
        if value is None:
            return Refusal(Reason.PARAMS_NOT_CONSTANT, f"{role} '{name}' {index.why_not_constant(name)}")
        if not is_float(value.dtype):
            return Refusal(Reason.UNSUPPORTED_DTYPE, f"{role} has dtype {value.dtype}")
        params.append(value)
    sizes = {p.size for p in params}
    if len(sizes) != 1 or any(p.ndim != 1 for p in params):
        return Refusal(Reason.INVALID_PARAMS, f"parameter shapes {[list(p.shape) for p in params]} are not one [C]")
    try:
        affine = bn_affine(*params, eps=float(attribute(node, "epsilon", 1e-5)))
    except InvalidAffineError as error:
        return Refusal(Reason.INVALID_PARAMS, str(error))
    return AffineOp(node, node.input[0], affine, axis=1)


def training_mode_detail(node: onnx.NodeProto, index: GraphIndex) -> str:
    """Why a training-mode BN is left: what keeps it from being a constant (`bnfold.constants`)."""
    data = node.input[0] if node.input else ""
    if not data or index.constant(data) is None:
        why = index.why_not_constant(data) if data else "is missing"
        return f"training_mode=1 uses the batch statistics of '{data}', which {why}"
    read = index.running_outputs_read(node)
    if read:
        return f"training_mode=1 and its running mean/var output '{read[0]}' is read"
    if node.output[0] in index.graph_outputs:
        return "training_mode=1 on a constant, but its output is a graph output"
    if len(node.input) < 3 or any(index.constant(name) is None for name in node.input[1:3]):
        return "training_mode=1 and its scale or B is not a constant"
    return "training_mode=1 on constant values with no finite result (variance + epsilon <= 0?)"


def _match_arithmetic(node: onnx.NodeProto, index: GraphIndex, rank: int | None) -> AffineOp | Refusal:
    if len(node.input) != 2:
        return Refusal(Reason.CONSUMER_NOT_FOLDABLE, f"{node.op_type} with {len(node.input)} inputs")
    constants = [index.constant(name) for name in node.input]
    # Div is affine in x only as `x / c`; Sub both ways (`c - x` is -x + c).
    positions = (1,) if node.op_type == "Div" else (1, 0)
    position = next((p for p in positions if constants[p] is not None and constants[1 - p] is None), None)
    if position is None:
        return Refusal(Reason.PARAMS_NOT_CONSTANT, f"{node.op_type} has no constant operand on a dynamic input")
    const = constants[position]
    data_input = node.input[1 - position]
    # The data tensor's own rank (when shape inference knows it) beats the caller's hint: a constant
    # of higher rank would broadcast the tensor up, which is not an affine map of it.
    rank = index.rank(data_input) if index.rank(data_input) is not None else rank
    if not is_float(const.dtype):
        return Refusal(Reason.UNSUPPORTED_DTYPE, f"{node.op_type} constant has dtype {const.dtype}")
    legacy = _legacy_broadcast_refusal(node, index, rank, const.ndim)
    if legacy is not None:
        return legacy
    axis = broadcast_axis(const.shape, rank)
    if isinstance(axis, Refusal):
        return axis
    values = np.asarray(const, dtype=np.float64).reshape(-1)
    if not np.isfinite(values).all() or (node.op_type == "Div" and (values == 0).any()):
        return Refusal(Reason.INVALID_PARAMS, f"{node.op_type} constant is not finite (or divides by 0)")
    if node.op_type == "Mul":
        affine = scale_affine(values)
    elif node.op_type == "Div":
        affine = scale_affine(1.0 / values)
    elif node.op_type == "Sub" and position == 0:
        affine = subtracted_from_affine(values)
    else:
        affine = shift_affine(values, subtract=node.op_type == "Sub")
    return AffineOp(node, data_input, affine, axis)


def _legacy_broadcast_refusal(node: onnx.NodeProto, index: GraphIndex, rank: int | None, const_rank: int) -> Refusal | None:
    """Opset < 7 Mul/Add/Sub/Div with broadcast=1 and an `axis` attribute align the constant's dims
    starting at that axis, not at the end as numpy does ([C] with axis=1 on NCHW is per channel).
    Only the case where both alignments agree is read as numpy broadcasting; the others are refused."""
    if index.opset >= 7 or not attribute(node, "broadcast", 0):
        return None
    legacy_axis = attribute(node, "axis", None)
    if legacy_axis is None:
        return None  # no axis: suffix matching, which is numpy's alignment
    if rank is not None and int(legacy_axis) % max(rank, 1) == rank - const_rank:
        return None
    return Refusal(Reason.UNSUPPORTED_ATTRIBUTE, f"legacy broadcast axis={legacy_axis} aligns the constant at "
                   "that axis, not at the end")


def broadcast_axis(const_shape: tuple[int, ...], rank: int | None) -> int | None | Refusal:
    """The single axis a constant varies along when broadcast against a rank-`rank` tensor.

    None means a scalar-like constant (all dims 1). A constant of higher rank than the tensor would
    change the output's shape, and one that varies along two axes is not per-channel.
    """
    varying = [i for i, d in enumerate(const_shape) if d != 1]
    if not varying:
        if rank is None and len(const_shape) > 0:
            # [1, 1, 1, 1] on a tensor of unknown rank may add axes: only a 0-d constant is safe.
            return Refusal(Reason.UNKNOWN_SHAPE, f"tensor rank unknown; constant of shape {list(const_shape)}")
        if rank is not None and len(const_shape) > rank:
            return Refusal(Reason.CHANNEL_AXIS_MISMATCH, f"constant of rank {len(const_shape)} expands the tensor")
        return None
    if rank is None:
        return Refusal(Reason.UNKNOWN_SHAPE, "tensor rank unknown, cannot place the constant's axis")
    if len(const_shape) > rank or len(varying) != 1:
        return Refusal(Reason.CHANNEL_AXIS_MISMATCH, f"constant shape {list(const_shape)} is not per-channel "
                       f"on a rank-{rank} tensor")
    return varying[0] + rank - len(const_shape)
