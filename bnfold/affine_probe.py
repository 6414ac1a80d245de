"""Recover the (scale, shift) of chains of original affine nodes by running them, for the analytic check.

A chain (BN, Mul, Add, Sub, Div with constant operands) is run in float64 by onnx's reference
evaluator on a probe tensor with one element per channel: f(0) = shift, f(1) - f(0) = scale. No
formula of `fold_math` is involved, so a wrong fold formula cannot also be a wrong check.

Chains that differ only in their constants (every Conv -> BN of a network) are stacked: their
constants are concatenated along the channel axis and the stacked chain runs once. That is exact —
each channel only ever meets its own constants — and turns thousands of evaluator runs into a few.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import numpy as np
import onnx

from bnfold.fold_math import ChannelAffine

MAX_CACHED_EVALUATORS = 256
PROBE_FAR = 2.0**24  # a power of two: exact in float64, far enough that the scale dominates any sane shift


@dataclass(frozen=True)
class ProbeSpec:
    """One chain, renamed to positional names (x, c0.., v0.., y), with its constants as float64 feeds."""

    nodes: list[onnx.NodeProto]
    feeds: dict[str, np.ndarray]
    rank: int
    axis: int
    channels: int
    key: tuple  # equal keys: same ops, attributes, shapes — stackable

    @property
    def shape(self) -> list[int]:
        shape = [1] * self.rank
        shape[self.axis] = self.channels
        return shape


def probe_spec(nodes: list[onnx.NodeProto], constants: dict[str, np.ndarray], rank: int | None) -> ProbeSpec | None:
    """The probe for a chain (None for an empty one); `rank`: of the tensor the chain acts on."""
    if not nodes:
        return None
    used = {name for node in nodes for name in node.input}
    constants = {name: value for name, value in constants.items() if name in used}
    rank = max([rank or 2] + [v.ndim for v in constants.values()])
    channels = max(max((v.size for v in constants.values()), default=1), 1)
    axis = _probe_axis(nodes, constants, rank)
    renamed, feeds = _renamed_chain(nodes, constants)
    key = (tuple(node.SerializeToString() for node in renamed), rank, axis, channels,
           tuple((name, value.shape) for name, value in feeds.items()))
    return ProbeSpec(renamed, feeds, rank, axis, channels, key)


def probe_affines(specs: list[ProbeSpec | None]) -> list[ChannelAffine | None]:
    """The affine map of each chain, in order; stackable chains are evaluated together."""
    results: list[ChannelAffine | None] = [None] * len(specs)
    groups: dict[tuple, list[int]] = {}
    for position, spec in enumerate(specs):
        if spec is not None:
            groups.setdefault(spec.key, []).append(position)
    for positions in groups.values():
        members = [specs[p] for p in positions]
        stacked = _stack(members) if len(members) > 1 else None
        if stacked is None:
            for p, spec in zip(positions, members):
                results[p] = _evaluate(spec)
            continue
        affine = _evaluate(stacked)
        width = members[0].channels
        for i, p in enumerate(positions):
            part = slice(i * width, (i + 1) * width)
            results[p] = ChannelAffine(affine.scale[part], affine.shift[part])
    return results


def _stack(members: list[ProbeSpec]) -> ProbeSpec | None:
    """One chain computing all `members` side by side on the channel axis, or None when a constant's
    channel axis is ambiguous (then each member runs on its own)."""
    first = members[0]
    positions = _feed_channel_positions(first)
    if positions is None:
        return None
    feeds = {}
    for name, position in positions.items():
        parts = [_with_channels(m.feeds[name], position, m.channels) for m in members]
        feeds[name] = np.concatenate(parts, axis=max(position, 0))  # a padded constant has channels at 0
    channels = first.channels * len(members)
    return ProbeSpec(first.nodes, feeds, first.rank, first.axis, channels, ("stacked", channels) + first.key)


def _feed_channel_positions(spec: ProbeSpec) -> dict[str, int] | None:
    """For each feed, the axis of the feed that lines up with the probe's channel axis."""
    positions: dict[str, int] = {}
    for node in spec.nodes:
        for slot, name in enumerate(node.input):
            if name not in spec.feeds:
                continue
            if node.op_type == "BatchNormalization":
                position = 0 if slot > 0 else None  # parameters are [C]
            else:  # numpy broadcasting: right-aligned against the probe tensor
                position = spec.axis - (spec.rank - spec.feeds[name].ndim)
            value = spec.feeds[name]
            if position is None or (position < 0 and value.size != 1):
                return None
            # Stacking is only clean for constants that vary along the channel axis alone.
            if position >= 0 and (value.size != value.shape[position] or value.shape[position] not in (1, spec.channels)):
                return None
            if positions.setdefault(name, position) != position:
                return None
    return positions


def _with_channels(value: np.ndarray, position: int, channels: int) -> np.ndarray:
    """`value` with `channels` entries on axis `position` (a scalar-like constant is repeated)."""
    if position < 0:  # a constant of lower rank than the channel axis needs: add leading axes
        value = value.reshape((1,) * -position + value.shape)
        position = 0
    if value.shape[position] == channels:
        return value
    shape = list(value.shape)
    shape[position] = channels
    return np.broadcast_to(value, shape)


def _evaluate(spec: ProbeSpec) -> ChannelAffine:
    with _EVALUATORS_LOCK:  # folds may run in several threads of one process
        evaluator = _EVALUATORS.get(spec.key)
        if evaluator is None:
            evaluator = _EVALUATORS[spec.key] = _probe_evaluator(spec)
            if len(_EVALUATORS) > MAX_CACHED_EVALUATORS:
                _EVALUATORS.pop(next(iter(_EVALUATORS)))
    shape = spec.shape
    zero = evaluator.run(None, {"x": np.zeros(shape), **spec.feeds})[0].reshape(-1)
    one = evaluator.run(None, {"x": np.ones(shape), **spec.feeds})[0].reshape(-1)
    scale = one - zero
    if (np.abs(zero) > np.abs(scale)).any():
        # f(1) - f(0) keeps only ~ulp(shift) of the scale when the shift dominates (a BN with a tiny
        # gamma and a large beta): probe far out, where the scale dominates instead.
        far = evaluator.run(None, {"x": np.full(shape, PROBE_FAR), **spec.feeds})[0].reshape(-1)
        with np.errstate(all="ignore"):
            scale_far = (far - zero) / PROBE_FAR
        use_far = (np.abs(zero) > np.abs(scale)) & np.isfinite(scale_far)
        scale = np.where(use_far, scale_far, scale)
    return ChannelAffine(scale, zero)


def magnitude_constants(nodes: list[onnx.NodeProto], constants: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Constants under which the chain adds up the magnitudes of every term it would cancel: run on
    0, it gives a bound on |shift| before cancellation (|beta| + |mean| * |gamma| / sqrt(var + eps),
    not their difference). The analytic check's rounding slack is relative to that bound."""
    result = {}
    for node in nodes:
        for slot, name in enumerate(node.input):
            if name not in constants or name in result:
                continue
            value = np.abs(np.asarray(constants[name], dtype=np.float64))
            # (x - mean) and (x - c) with x = 0 subtract: flip them so the terms add.
            subtracted = (node.op_type == "BatchNormalization" and slot == 3) or (node.op_type == "Sub" and slot == 1)
            result[name] = -value if subtracted else value
    return result


_EVALUATORS: dict[tuple, object] = {}
_EVALUATORS_LOCK = threading.Lock()


def _probe_evaluator(spec: ProbeSpec):
    from onnx.reference import ReferenceEvaluator

    double = onnx.TensorProto.DOUBLE
    inputs = [onnx.helper.make_tensor_value_info("x", double, spec.shape)]
    inputs += [onnx.helper.make_tensor_value_info(name, double, value.shape) for name, value in spec.feeds.items()]
    graph = onnx.helper.make_graph(spec.nodes, "probe", inputs, [onnx.helper.make_tensor_value_info("y", double, None)])
    return ReferenceEvaluator(onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 15)]))


def _renamed_chain(nodes: list[onnx.NodeProto], constants: dict[str, np.ndarray]):
    names = {_data_input(nodes[0], constants): "x", nodes[-1].output[0]: "y"}
    feeds: dict[str, np.ndarray] = {}
    renamed = []
    for position, node in enumerate(nodes):
        copy = _as_opset15(node)
        copy.name = ""
        for i, name in enumerate(copy.input):
            if name in constants and name not in names:
                names[name] = f"c{len(feeds)}"
                feeds[names[name]] = np.asarray(constants[name], dtype=np.float64)
            copy.input[i] = names.get(name, name)
        if copy.output[0] not in names:
            names[copy.output[0]] = f"v{position}"
        copy.output[0] = names[copy.output[0]]
        renamed.append(copy)
    return renamed, feeds


def _probe_axis(nodes: list[onnx.NodeProto], constants: dict[str, np.ndarray], rank: int) -> int:
    if any(node.op_type == "BatchNormalization" for node in nodes):
        return 1
    for node in nodes:
        for name in node.input:
            if name in constants and constants[name].size > 1:
                shape = constants[name].shape
                return rank - len(shape) + next(i for i, d in enumerate(shape) if d != 1)
    return rank - 1


def _data_input(node: onnx.NodeProto, constants: dict[str, np.ndarray]) -> str:
    return next(name for name in node.input if name and name not in constants)


def _as_opset15(node: onnx.NodeProto) -> onnx.NodeProto:
    """A copy of `node`; a BN of any opset becomes BN-15 (same math: only epsilon matters in
    inference), because the probe model needs one opset for every node."""
    copy = onnx.NodeProto()
    copy.CopyFrom(node)
    if node.op_type == "BatchNormalization":
        epsilon = [a for a in copy.attribute if a.name == "epsilon"]
        del copy.attribute[:]
        copy.attribute.extend(epsilon)  # absent: BN-15's default, 1e-5, as in every older opset
        del copy.input[5:]
        del copy.output[1:]
    return copy
