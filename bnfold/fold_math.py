"""Pure float64 fold arithmetic: no onnx, no graph, only numpy.

Inference BatchNormalization is a per-channel affine map

    y = gamma * (x - mean) / sqrt(var + eps) + beta = s * x + t,
    s = gamma / sqrt(var + eps),   t = beta - mean * s.

Mul/Add by a per-channel constant are affine maps too (s = c, t = 0 / s = 1, t = c), and affine maps
compose: (s2, t2) after (s1, t1) is (s1 * s2, t1 * s2 + t2).

*Backward* folds absorb an affine map that follows a linear layer along the layer's output channels:

    Conv           W'[o] = W[o] * s[o]                         b' = b * s + t
    ConvTranspose  W is [C_in, C_out/g, k...]: output channel o = g * (C_out/g) + j sits in
                   the rows of group g, column j; same bias rule
    Gemm           Y = alpha * A' B' + beta * C  ->  B'' = alpha * B' * s (columns of op(B)),
                   C'' = beta * C * s + t, alpha = beta = 1
    MatMul         W[:, o] * s[o]; bias as for Conv

*Forward* folds absorb an affine map that precedes a linear layer along its input channels:

    Conv (no padding)  W'[o, c] = W[o, c] * s[g*C_in/g + c],  b'[o] = b[o] + sum_{c,k} W[o,c,k] t[.]
    Gemm (transA = 0)  op(B)'[k, n] = alpha * s[k] * op(B)[k, n],  C' = beta * C + alpha * t op(B)

Zero padding is applied to the affine map's *output*, so a padded Conv sees t in the interior and 0 at
the border: the forward fold is exact only without padding. Callers check that.

Everything is computed in float64 from the stored values and rounded once by `round_to_dtype`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

FloatArray = np.ndarray


class InvalidAffineError(ValueError):
    """BN statistics that do not describe a finite affine map (var + eps <= 0, NaN, Inf)."""


@dataclass(frozen=True)
class ChannelAffine:
    """y = scale * x + shift per channel, float64, both of shape [C] (or [1] for a scalar)."""

    scale: FloatArray
    shift: FloatArray

    @property
    def channels(self) -> int:
        return int(self.scale.shape[0])

    def then(self, after: ChannelAffine) -> ChannelAffine:
        """The map `after(self(x))`; scalar maps broadcast against per-channel ones."""
        return ChannelAffine(self.scale * after.scale, self.shift * after.scale + after.shift)

    def expanded(self, channels: int) -> ChannelAffine:
        """Broadcast a scalar map to `channels` channels (a per-channel map is returned as is)."""
        if self.channels == channels:
            return self
        return ChannelAffine(
            np.broadcast_to(self.scale, (channels,)).copy(),
            np.broadcast_to(self.shift, (channels,)).copy(),
        )


def compose_affines(affines: Iterable[ChannelAffine | None]) -> ChannelAffine | None:
    """The maps applied one after the other, in data order; absent ones (None) are skipped, and
    None comes back when there is no map at all."""
    result = None
    for affine in affines:
        if affine is not None:
            result = affine if result is None else result.then(affine)
    return result


@dataclass(frozen=True)
class ChannelSpread:
    """Where a tensor's channels are after layout nodes: along `axis`, of size `length`, entry f
    holds channel (f // inner) % channels. Flatten of [N, C, H, W] spreads C over axis 1 with
    inner = H*W; a layout that keeps the channel axis whole has inner 1 and length C."""

    axis: int
    inner: int
    length: int


def spread_affine(affine: ChannelAffine, spread: ChannelSpread) -> ChannelAffine:
    """The map per entry of the axis the channels are spread over (merged with neighbouring axes
    by a Flatten or Reshape)."""
    channels, inner = affine.channels, spread.inner
    if inner == 1 and spread.length == channels:
        return affine
    repeats = spread.length // (channels * inner)
    return ChannelAffine(np.tile(np.repeat(affine.scale, inner), repeats), np.tile(np.repeat(affine.shift, inner), repeats))


def bn_affine(
    gamma: FloatArray, beta: FloatArray, mean: FloatArray, var: FloatArray, eps: float
) -> ChannelAffine:
    """The affine map of inference BatchNormalization (each parameter a [C] vector), in float64."""
    params = np.array((gamma, beta, mean, var), dtype=np.float64)  # [4, C]
    gamma, beta, mean, var = params
    if not math.isfinite(eps) or not np.isfinite(params).all():
        raise InvalidAffineError("BN parameters contain NaN or Inf")
    denominator = var + np.float64(eps)
    if (denominator <= 0).any():
        raise InvalidAffineError(f"var + epsilon <= 0 for {int((denominator <= 0).sum())} channel(s)")
    scale = gamma / np.sqrt(denominator)
    return ChannelAffine(scale, beta - mean * scale)


def batch_statistics_normalized(x: FloatArray, gamma: FloatArray, beta: FloatArray, eps: float) -> FloatArray:
    """Training-mode BatchNormalization's Y (BN-14/15): each channel (axis 1) normalised by its own
    mean and biased variance over every other axis, then scaled and shifted; in float64."""
    values = np.asarray(x, dtype=np.float64)
    if values.ndim < 2 or not values.size:
        raise InvalidAffineError(f"X of shape {list(values.shape)} has no channel axis with values")
    axes = tuple(axis for axis in range(values.ndim) if axis != 1)
    along = (1, -1) + (1,) * (values.ndim - 2)
    params = np.array((gamma, beta), dtype=np.float64)  # [2, C]
    if params.shape != (2, values.shape[1]):
        raise InvalidAffineError(f"scale/B shapes do not match {values.shape[1]} channels")
    centred = values - values.mean(axis=axes, keepdims=True)
    denominator = (centred * centred).mean(axis=axes, keepdims=True) + np.float64(eps)
    if not np.isfinite(params).all() or not np.isfinite(centred).all() or (denominator <= 0).any():
        raise InvalidAffineError("non-finite values, or a channel with variance + epsilon <= 0")
    return centred / np.sqrt(denominator) * params[0].reshape(along) + params[1].reshape(along)


def scale_affine(values: FloatArray) -> ChannelAffine:
    """Mul by a per-channel constant."""
    scale = np.asarray(values, dtype=np.float64).reshape(-1)
    return ChannelAffine(scale, np.zeros_like(scale))


def shift_affine(values: FloatArray, subtract: bool = False) -> ChannelAffine:
    """Add (or Sub, `x - c`) of a per-channel constant."""
    shift = np.asarray(values, dtype=np.float64).reshape(-1)
    return ChannelAffine(np.ones_like(shift), -shift if subtract else shift)


def subtracted_from_affine(values: FloatArray) -> ChannelAffine:
    """Sub with the constant first, `c - x`: a scale of -1 and a shift of c (both exact in any dtype)."""
    shift = np.asarray(values, dtype=np.float64).reshape(-1)
    return ChannelAffine(-np.ones_like(shift), shift)


def _bias_or_zeros(bias: FloatArray | None, channels: int) -> FloatArray:
    if bias is None:
        return np.zeros(channels, dtype=np.float64)
    return np.asarray(bias, dtype=np.float64)


def _along(values: FloatArray, axis: int, ndim: int) -> FloatArray:
    """Reshape a [C] vector so it broadcasts along `axis` of an `ndim`-d array."""
    shape = [1] * ndim
    shape[axis] = values.shape[0]
    return values.reshape(shape)


# --- backward folds: layer -> affine -------------------------------------------------------------


def scaled(weight: FloatArray, factor: FloatArray, out_dtype: np.dtype | None = None) -> np.ndarray:
    """`weight * factor` computed in float64; with `out_dtype`, rounded once into it element by
    element, so no float64 copy of a large weight is ever held (bfloat16 keeps the float64 result:
    numpy's cast to it is not a single rounding, `round_to_dtype` does that)."""
    if out_dtype is None or is_bfloat16(out_dtype):
        return np.multiply(weight, factor, dtype=np.float64)
    out = np.empty(np.broadcast_shapes(weight.shape, factor.shape), dtype=out_dtype)
    np.multiply(weight, factor, out=out, dtype=np.float64, casting="unsafe")
    return out


def conv_backward(
    weight: FloatArray, bias: FloatArray | None, affine: ChannelAffine, out_dtype: np.dtype | None = None
) -> tuple[FloatArray, FloatArray]:
    """Conv weight [C_out, C_in/g, k...]: output channels are axis 0 whatever the group."""
    return _backward_along(weight, bias, affine, 0, out_dtype)


def conv_transpose_backward(
    weight: FloatArray, bias: FloatArray | None, affine: ChannelAffine, group: int,
    out_dtype: np.dtype | None = None,
) -> tuple[FloatArray, FloatArray]:
    """ConvTranspose weight [C_in, C_out/g, k...]: channel g*(C_out/g)+j is column j of group g."""
    in_channels, out_per_group = weight.shape[:2]
    kernel = weight.shape[2:]
    out_channels = out_per_group * group
    affine = affine.expanded(out_channels)
    grouped = weight.reshape((group, in_channels // group, out_per_group) + kernel)
    scale = affine.scale.reshape((group, 1, out_per_group) + (1,) * len(kernel))
    new_weight = scaled(grouped, scale, out_dtype).reshape(weight.shape)
    return new_weight, _bias_or_zeros(bias, out_channels) * affine.scale + affine.shift


def gemm_backward(
    b_matrix: FloatArray,
    c: FloatArray | None,
    affine: ChannelAffine,
    alpha: float,
    beta: float,
    trans_b: bool,
    out_dtype: np.dtype | None = None,
) -> tuple[FloatArray, FloatArray]:
    """New (B, C) for alpha = beta = 1; C keeps numpy broadcasting against [M, N]."""
    out_channels = b_matrix.shape[0] if trans_b else b_matrix.shape[1]
    affine = affine.expanded(out_channels)
    new_b = scaled(b_matrix, np.float64(alpha) * _along(affine.scale, 0 if trans_b else 1, 2), out_dtype)
    if c is None:
        return new_b, affine.shift.copy()
    # Y*s + t = alpha*A*(B*s) + (beta*C*s + t); broadcasting keeps [M, N]/[M, 1] C exact.
    return new_b, np.float64(beta) * np.asarray(c, np.float64) * affine.scale + affine.shift


def matmul_backward(
    weight: FloatArray, bias: FloatArray | None, affine: ChannelAffine, out_dtype: np.dtype | None = None
) -> tuple[FloatArray, FloatArray]:
    """MatMul weight [K, N]: output channels are the last axis."""
    return _backward_along(weight, bias, affine, 1, out_dtype)


def _backward_along(weight: FloatArray, bias: FloatArray | None, affine: ChannelAffine, axis: int,
                    out_dtype: np.dtype | None) -> tuple[FloatArray, FloatArray]:
    """W' = W·s along the weight's output-channel `axis`, b' = b·s + t (a missing bias is 0)."""
    out_channels = weight.shape[axis]
    affine = affine.expanded(out_channels)
    new_weight = scaled(weight, _along(affine.scale, axis, weight.ndim), out_dtype)
    return new_weight, _bias_or_zeros(bias, out_channels) * affine.scale + affine.shift


# --- forward folds: affine -> layer --------------------------------------------------------------


def conv_forward(
    weight: FloatArray, bias: FloatArray | None, affine: ChannelAffine, group: int
) -> tuple[FloatArray, FloatArray]:
    """Conv(s*x + t) without padding; input channel g*(C_in/g)+c is weight column c of group g."""
    out_channels, in_per_group = weight.shape[:2]
    kernel = weight.shape[2:]
    affine = affine.expanded(in_per_group * group)
    grouped = weight.reshape((group, out_channels // group, in_per_group) + kernel)
    column_shape = (group, 1, in_per_group) + (1,) * len(kernel)
    new_weight = (grouped * affine.scale.reshape(column_shape)).reshape(weight.shape)
    summed_axes = tuple(range(2, grouped.ndim))
    bias_delta = (grouped * affine.shift.reshape(column_shape)).sum(axis=summed_axes).reshape(-1)
    return new_weight, _bias_or_zeros(bias, out_channels) + bias_delta


def conv_transpose_forward(weight: FloatArray, bias: FloatArray | None, affine: ChannelAffine) -> tuple[FloatArray, FloatArray | None]:
    """ConvTranspose(s*x) for a pure scale: weight [C_in, C_out/g, k...] has input channel c as row c.
    A shift is not foldable here: how many kernel taps reach an output position varies at the borders
    and with the stride, so t never becomes one bias per channel."""
    # Planning only sends shift-free maps here; a re-derived map (the analytic check's probe) may
    # carry float64 rounding residue of a zero shift, which is ignored, while a real shift is an error.
    if np.abs(affine.shift).max(initial=0.0) > 1e-12 * max(1.0, float(np.abs(affine.scale).max(initial=0.0))):
        raise ValueError("only a pure scale folds forward into ConvTranspose")
    affine = affine.expanded(weight.shape[0])
    new_weight = weight * affine.scale.reshape((-1,) + (1,) * (weight.ndim - 1))
    return new_weight, None if bias is None else np.asarray(bias, dtype=np.float64)


def gemm_forward(
    b_matrix: FloatArray,
    c: FloatArray | None,
    affine: ChannelAffine,
    alpha: float,
    beta: float,
    trans_b: bool,
) -> tuple[FloatArray, FloatArray]:
    """Gemm(s*A + t, B) with transA = 0, as new (B, C) for alpha = beta = 1."""
    op_b = b_matrix.T if trans_b else b_matrix  # [K, N]
    affine = affine.expanded(op_b.shape[0])
    new_op_b = np.float64(alpha) * op_b * affine.scale[:, None]
    c_delta = np.float64(alpha) * (affine.shift @ op_b)  # [N]
    new_c = c_delta if c is None else np.float64(beta) * np.asarray(c, np.float64) + c_delta
    return (new_op_b.T if trans_b else new_op_b), new_c


def matmul_forward(weight: FloatArray, affine: ChannelAffine) -> tuple[FloatArray, FloatArray]:
    """MatMul(s*x + t, W) for a 2-D x: W' = diag(s) W, bias = t W."""
    return gemm_forward(weight, None, affine, 1.0, 1.0, trans_b=False)


# --- rounding -----------------------------------------------------------------------------------


def is_bfloat16(dtype: np.dtype) -> bool:
    """ml_dtypes' bfloat16 (numpy kind "V"); testing the kind first keeps this cheap on hot paths."""
    dtype = np.dtype(dtype)
    return dtype.kind == "V" and dtype.name == "bfloat16"


def is_float(dtype: np.dtype) -> bool:
    """A floating-point dtype bnfold folds: float16/32/64 or bfloat16."""
    return np.dtype(dtype).kind == "f" or is_bfloat16(dtype)


def round_to_dtype(values: FloatArray, dtype: np.dtype) -> np.ndarray:
    """Round float64 values once, to nearest-even, into `dtype`.

    numpy's float64 -> float16/float32 casts round correctly. ml_dtypes' bfloat16 cast goes through
    float32 (a double rounding that can be 1 ulp off), so bfloat16 is rounded here on the float64
    mantissa (8 significant bits) and then cast exactly.
    """
    dtype = np.dtype(dtype)
    if values.dtype == dtype:
        return values  # already rounded once (see `scaled`)
    values = np.asarray(values, dtype=np.float64)
    if not is_bfloat16(dtype):
        return values.astype(dtype)  # overflow gives inf, which verification reports
    _, exponent = np.frexp(values)  # values = mantissa * 2**exponent, 0.5 <= |mantissa| < 1
    # 8 significant bits for normals; below 2**-126 the spacing stays fixed at 2**-133 (subnormals).
    exponent = np.maximum(exponent, -125)
    rounded = np.ldexp(np.round(np.ldexp(values, 8 - exponent)), exponent - 8)
    with np.errstate(over="ignore"):
        return rounded.astype(np.float32).astype(dtype)
