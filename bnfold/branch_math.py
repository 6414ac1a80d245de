"""Pure float64 arithmetic of branch re-parameterization (RepVGG, MobileOne, ACNet, RepMixer): a sum
of linear branches that read the same tensor x becomes one Conv. No onnx, only numpy.

A Conv with stride s, dilation d and zero padding (begin, end) on an axis computes output o from the
input positions  o*s - begin + j*d,  j = 0..k-1,  and has  floor((n + slack - 1) / s) + 1  outputs for an
input of length n, where  slack = begin + end - (k - 1) * d.  Two Convs on the same x therefore sum to
one Conv exactly, for every input size, when on each spatial axis

- the strides are equal (the same output position reads around the same input position),
- their tap offsets lie on one lattice: (begin_a - begin_b) % d == 0 with equal dilations (a kernel of
  size 1 has no dilation of its own and takes the other's),
- their slacks are equal (the same number of outputs),

and they have the same group count and channel counts. The merged kernel spans the union of both tap
ranges: begin' = max(begin_a, begin_b), each kernel placed at its own offset (a 1x1 beside a 3x3 with
pads 0 and 1 lands in the centre), and end' keeps the slack. Zero padding means "positions outside
the input read 0" for every branch alike, so the union is exact at the borders too.

The identity branch (x itself, or s*x + t per channel) is a Conv with a kernel of size 1, stride 1,
no padding, weight s[o] at input channel o: with group g, output channel o belongs to group
o // (C/g), which holds input channel o exactly when C_in == C_out == C, at column o % (C/g).

A per-channel affine map after a sum scales each branch's output rows and adds its shift to the bias.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from bnfold.fold_math import ChannelAffine


class GeometryMismatch(ValueError):
    """The branches do not sum to one Conv exactly (stride, dilation, group, padding or channels)."""


@dataclass(frozen=True)
class ConvBranch:
    """One Conv's parameters (float64) and geometry; `pads` as in ONNX: all begins, then all ends."""

    weight: np.ndarray  # [C_out, C_in / group, k...]
    bias: np.ndarray | None
    group: int
    strides: tuple[int, ...]
    dilations: tuple[int, ...]
    pads: tuple[int, ...]


@dataclass(frozen=True)
class KernelTerm:
    """A sum of branches as one Conv: float64 weight and bias, and the geometry described above."""

    weight: np.ndarray
    bias: np.ndarray
    group: int
    strides: tuple[int, ...]
    dilations: tuple[int, ...]
    begin: tuple[int, ...]
    slack: tuple[int, ...]

    @property
    def pads(self) -> list[int]:
        kernel = self.weight.shape[2:]
        ends = [s + (k - 1) * d - b for s, k, d, b in zip(self.slack, kernel, self.dilations, self.begin)]
        return list(self.begin) + ends


@dataclass(frozen=True)
class IdentityTerm:
    """scale * x + shift per channel ([C] or [1]): branches that are the shared input itself."""

    scale: np.ndarray
    shift: np.ndarray


Term = KernelTerm | IdentityTerm


# --- the expression a combination computes, by value name (no parameters) ------------------------


@dataclass(frozen=True)
class Branch:
    """A leaf: the output of a Conv reading x (by its output name), or x itself (`conv` None)."""

    conv: str | None


@dataclass(frozen=True)
class Mapped:
    """A per-channel affine map (named by its node's output) applied to a sub-expression."""

    child: Expr
    affine: str


@dataclass(frozen=True)
class Combined:
    """sum(sign_i * child_i): Add, Sum, Sub."""

    children: tuple[Expr, ...]
    signs: tuple[int, ...]


Expr = Branch | Mapped | Combined


def evaluate(expr: Expr, conv_of: Callable[[str], ConvBranch], affine_of: Callable[[str], ChannelAffine]) -> Term:
    """The single term `expr` computes; GeometryMismatch when the branches do not merge exactly."""
    if isinstance(expr, Branch):
        if expr.conv is None:
            return IdentityTerm(np.ones(1), np.zeros(1))
        return conv_term(conv_of(expr.conv))
    if isinstance(expr, Mapped):
        return affine_term(evaluate(expr.child, conv_of, affine_of), affine_of(expr.affine))
    total = None
    for child, sign in zip(expr.children, expr.signs):
        term = evaluate(child, conv_of, affine_of)
        total = add_terms(total, term, sign)
    return total


def conv_term(conv: ConvBranch) -> KernelTerm:
    weight = np.asarray(conv.weight, dtype=np.float64)
    kernel = weight.shape[2:]
    half = len(conv.pads) // 2
    begin, end = conv.pads[:half], conv.pads[half:]
    slack = tuple(b + e - (k - 1) * d for b, e, k, d in zip(begin, end, kernel, conv.dilations))
    bias = np.zeros(weight.shape[0]) if conv.bias is None else np.asarray(conv.bias, dtype=np.float64)
    return KernelTerm(weight, bias, conv.group, tuple(conv.strides), tuple(conv.dilations), tuple(begin), slack)


def affine_term(term: Term, affine: ChannelAffine) -> Term:
    """affine(term): rows of the kernel scaled, the bias mapped."""
    if isinstance(term, IdentityTerm):
        return IdentityTerm(term.scale * affine.scale, term.shift * affine.scale + affine.shift)
    channels = term.weight.shape[0]
    if affine.channels not in (1, channels):
        raise GeometryMismatch(f"a per-channel map of {affine.channels} channels on {channels} channels")
    affine = affine.expanded(channels)
    weight = term.weight * affine.scale.reshape((-1,) + (1,) * (term.weight.ndim - 1))
    return KernelTerm(weight, term.bias * affine.scale + affine.shift, term.group, term.strides, term.dilations,
                      term.begin, term.slack)


def add_terms(first: Term | None, second: Term, sign: int = 1) -> Term:
    """first + sign * second (first None: 0)."""
    if sign < 0:
        second = affine_term(second, ChannelAffine(-np.ones(1), np.zeros(1)))
    if first is None:
        return second
    if isinstance(first, IdentityTerm) and isinstance(second, IdentityTerm):
        if 1 not in (first.scale.shape[0], second.scale.shape[0]) and first.scale.shape != second.scale.shape:
            raise GeometryMismatch(f"identity maps of {first.scale.shape[0]} and {second.scale.shape[0]} channels")
        return IdentityTerm(first.scale + second.scale, first.shift + second.shift)
    if isinstance(first, IdentityTerm):
        first = identity_kernel(first, second)
    if isinstance(second, IdentityTerm):
        second = identity_kernel(second, first)
    return _sum_kernels(first, second)


def identity_kernel(identity: IdentityTerm, like: KernelTerm) -> KernelTerm:
    """The identity term as a Conv in `like`'s group layout: a delta at input channel o per output o."""
    out_channels, in_per_group = like.weight.shape[:2]
    spatial = like.weight.ndim - 2
    if out_channels != in_per_group * like.group:
        raise GeometryMismatch(f"an identity branch needs as many input as output channels; the Conv has "
                               f"{in_per_group * like.group} inputs and {out_channels} outputs")
    if identity.scale.shape[0] not in (1, out_channels) or identity.shift.shape[0] not in (1, out_channels):
        raise GeometryMismatch(f"identity map of {identity.scale.shape[0]} channels on {out_channels} channels")
    weight = np.zeros((out_channels, in_per_group) + (1,) * spatial)
    channels = np.arange(out_channels)
    weight[(channels, channels % in_per_group) + (0,) * spatial] = np.broadcast_to(identity.scale, (out_channels,))
    bias = np.broadcast_to(identity.shift, (out_channels,)).astype(np.float64)
    return KernelTerm(weight, bias, like.group, (1,) * spatial, like.dilations, (0,) * spatial, (0,) * spatial)


def _sum_kernels(a: KernelTerm, b: KernelTerm) -> KernelTerm:
    if a.weight.ndim != b.weight.ndim or a.weight.shape[:2] != b.weight.shape[:2] or a.group != b.group:
        raise GeometryMismatch(f"weights {list(a.weight.shape)} (group {a.group}) and {list(b.weight.shape)} "
                               f"(group {b.group}) have different channel layouts")
    if a.strides != b.strides:
        raise GeometryMismatch(f"strides {list(a.strides)} and {list(b.strides)} differ")
    if a.slack != b.slack:
        raise GeometryMismatch(f"paddings give different output sizes (pads {a.pads} and {b.pads})")
    dilations, starts, kernel = [], [], []
    for axis, (ka, kb) in enumerate(zip(a.weight.shape[2:], b.weight.shape[2:])):
        da, db = a.dilations[axis], b.dilations[axis]
        dilation = da if ka > 1 else (db if kb > 1 else 1)
        if ka > 1 and kb > 1 and da != db:
            raise GeometryMismatch(f"dilations {list(a.dilations)} and {list(b.dilations)} differ")
        if (a.begin[axis] - b.begin[axis]) % dilation:
            raise GeometryMismatch(f"kernel taps do not align (pads {a.pads} and {b.pads}, dilation {dilation})")
        start = -max(a.begin[axis], b.begin[axis])
        stop = max(-a.begin[axis] + (ka - 1) * dilation, -b.begin[axis] + (kb - 1) * dilation)
        dilations.append(dilation)
        starts.append(start)
        kernel.append((stop - start) // dilation + 1)
    weight = np.zeros(a.weight.shape[:2] + tuple(kernel))
    for term in (a, b):
        offsets = [(-begin - start) // d for begin, start, d in zip(term.begin, starts, dilations)]
        window = tuple(slice(o, o + k) for o, k in zip(offsets, term.weight.shape[2:]))
        weight[(slice(None), slice(None)) + window] += term.weight
    return KernelTerm(weight, a.bias + b.bias, a.group, a.strides, tuple(dilations), tuple(-s for s in starts), a.slack)


def magnitude(expr: Expr, conv_of: Callable[[str], ConvBranch], affine_of: Callable[[str], ChannelAffine]) -> float:
    """A bound on the terms summed into any merged parameter (the same sum over absolute values):
    the rounding slack of a recomputation is relative to it, not to a result cancellation shrank."""
    def absolute_conv(name: str) -> ConvBranch:
        conv = conv_of(name)
        bias = None if conv.bias is None else np.abs(conv.bias)
        return ConvBranch(np.abs(conv.weight), bias, conv.group, conv.strides, conv.dilations, conv.pads)

    def absolute_affine(name: str) -> ChannelAffine:
        affine = affine_of(name)
        return ChannelAffine(np.abs(affine.scale), np.abs(affine.shift))

    term = evaluate(_all_positive(expr), absolute_conv, absolute_affine)
    values = [term.scale, term.shift] if isinstance(term, IdentityTerm) else [term.weight, term.bias]
    peak = max(float(np.max(v, initial=0.0)) for v in values)
    return peak if np.isfinite(peak) else 0.0


def _all_positive(expr: Expr) -> Expr:
    if isinstance(expr, Branch):
        return expr
    if isinstance(expr, Mapped):
        return Mapped(_all_positive(expr.child), expr.affine)
    return Combined(tuple(_all_positive(c) for c in expr.children), (1,) * len(expr.children))
