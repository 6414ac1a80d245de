"""Property tests for bnfold.fold_math against direct float64 evaluations written here.

Every layer is evaluated independently with explicit numpy (a patch-by-patch convolution, a
scatter-style transposed convolution, a literal Gemm), so a wrong channel layout, a dropped
alpha/beta or a mis-grouped weight in fold_math shows up as a numeric mismatch.
"""

from __future__ import annotations

import itertools

import ml_dtypes
import numpy as np
import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from bnfold.fold_math import (
    ChannelAffine,
    InvalidAffineError,
    bn_affine,
    conv_backward,
    conv_forward,
    conv_transpose_backward,
    gemm_backward,
    gemm_forward,
    matmul_backward,
    matmul_forward,
    scale_affine,
    shift_affine,
    subtracted_from_affine,
)

BF16 = np.dtype(ml_dtypes.bfloat16)
RTOL = 1e-11
ATOL = 1e-11


# --- independent reference implementations ---------------------------------------------------------


def direct_conv(
    x: np.ndarray,
    weight: np.ndarray,
    bias: np.ndarray | None,
    group: int,
    strides: tuple[int, ...],
    pads: tuple[int, ...],
    dilations: tuple[int, ...],
) -> np.ndarray:
    """ONNX Conv in float64, one output position at a time (pads = begins + ends)."""
    spatial = x.ndim - 2
    out_channels, in_per_group = weight.shape[:2]
    kernel = weight.shape[2:]
    out_per_group = out_channels // group
    padded = np.pad(x, [(0, 0), (0, 0)] + [(pads[i], pads[i + spatial]) for i in range(spatial)])
    out_shape = tuple(
        (padded.shape[2 + i] - dilations[i] * (kernel[i] - 1) - 1) // strides[i] + 1 for i in range(spatial)
    )
    y = np.zeros((x.shape[0], out_channels) + out_shape, dtype=np.float64)
    for g in range(group):
        w_group = weight[g * out_per_group:(g + 1) * out_per_group]  # [O/g, C/g, k...]
        x_group = padded[:, g * in_per_group:(g + 1) * in_per_group]
        for position in itertools.product(*(range(n) for n in out_shape)):
            window = tuple(
                slice(position[i] * strides[i], position[i] * strides[i] + dilations[i] * (kernel[i] - 1) + 1,
                      dilations[i])
                for i in range(spatial)
            )
            patch = x_group[(slice(None), slice(None)) + window]  # [N, C/g, k...]
            value = np.tensordot(patch, w_group, axes=(list(range(1, patch.ndim)), list(range(1, w_group.ndim))))
            y[(slice(None), slice(g * out_per_group, (g + 1) * out_per_group)) + position] = value
    if bias is not None:
        y += bias.reshape((1, -1) + (1,) * spatial)
    return y


def direct_conv_transpose(
    x: np.ndarray, weight: np.ndarray, bias: np.ndarray | None, group: int, strides: tuple[int, ...]
) -> np.ndarray:
    """ONNX ConvTranspose (no pads, no dilation) in float64 by scattering every input element."""
    spatial = x.ndim - 2
    in_channels, out_per_group = weight.shape[:2]
    kernel = weight.shape[2:]
    in_per_group = in_channels // group
    out_shape = tuple((x.shape[2 + i] - 1) * strides[i] + kernel[i] for i in range(spatial))
    y = np.zeros((x.shape[0], out_per_group * group) + out_shape, dtype=np.float64)
    for n in range(x.shape[0]):
        for c in range(in_channels):
            g = c // in_per_group
            for position in itertools.product(*(range(d) for d in x.shape[2:])):
                for offset in itertools.product(*(range(k) for k in kernel)):
                    target = tuple(position[i] * strides[i] + offset[i] for i in range(spatial))
                    for j in range(out_per_group):
                        y[(n, g * out_per_group + j) + target] += x[(n, c) + position] * weight[(c, j) + offset]
    if bias is not None:
        y += bias.reshape((1, -1) + (1,) * spatial)
    return y


def direct_gemm(
    a: np.ndarray, b: np.ndarray, c: np.ndarray | None, alpha: float, beta: float, trans_a: bool, trans_b: bool
) -> np.ndarray:
    op_a = a.T if trans_a else a
    op_b = b.T if trans_b else b
    y = np.zeros((op_a.shape[0], op_b.shape[1]))
    for m in range(op_a.shape[0]):
        for n in range(op_b.shape[1]):
            y[m, n] = alpha * sum(op_a[m, k] * op_b[k, n] for k in range(op_a.shape[1]))
    if c is not None:
        y = y + beta * c
    return y


def apply_affine(x: np.ndarray, scale: np.ndarray, shift: np.ndarray, axis: int) -> np.ndarray:
    """scale * x + shift along `axis`; a length-1 map applies to every channel."""
    shape = [1] * x.ndim
    shape[axis] = -1
    return x * scale.reshape(shape) + shift.reshape(shape)


def random_affine(rng: np.random.Generator, channels: int, scalar: bool) -> ChannelAffine:
    size = 1 if scalar else channels
    sign = rng.choice([-1.0, 1.0], size=size)
    return ChannelAffine(sign * rng.uniform(0.1, 3.0, size), rng.normal(0.0, 2.0, size))


def assert_close(actual: np.ndarray, expected: np.ndarray) -> None:
    scale = max(1.0, float(np.abs(expected).max(initial=0.0)))
    np.testing.assert_allclose(actual, expected, rtol=RTOL, atol=ATOL * scale)


# --- the reference implementations themselves, on a case checked by hand ---------------------------


def test_direct_conv_matches_hand_computed_values() -> None:
    x = np.arange(1.0, 6.0).reshape(1, 1, 5)  # 1 2 3 4 5
    w = np.array([[[1.0, 0.0, -1.0]]])
    y = direct_conv(x, w, np.array([10.0]), 1, (2,), (1, 1), (1,))
    # padded: 0 1 2 3 4 5 0; windows at 0, 2, 4: (0,1,2) (2,3,4) (4,5,0)
    np.testing.assert_array_equal(y, [[[10.0 - 2.0, 10.0 - 2.0, 10.0 + 4.0]]])


def test_direct_conv_transpose_matches_hand_computed_values() -> None:
    x = np.array([[[1.0, 2.0]]])
    w = np.array([[[1.0, 10.0, 100.0]]])
    y = direct_conv_transpose(x, w, None, 1, (2,))
    np.testing.assert_array_equal(y, [[[1.0, 10.0, 102.0, 20.0, 200.0]]])


# --- bn_affine ------------------------------------------------------------------------------------


@given(seed=st.integers(0, 2**32 - 1), channels=st.integers(1, 16),
       eps=st.sampled_from([0.0, 1e-5, 1e-3, 0.1]))
def test_bn_affine_matches_formula(seed: int, channels: int, eps: float) -> None:
    rng = np.random.default_rng(seed)
    gamma = rng.normal(0.0, 2.0, channels)
    beta = rng.normal(0.0, 2.0, channels)
    mean = rng.normal(0.0, 2.0, channels)
    var = rng.uniform(1e-3, 5.0, channels)
    affine = bn_affine(gamma.astype(np.float32), beta.astype(np.float32), mean.astype(np.float32),
                       var.astype(np.float32), eps)
    g32, b32, m32, v32 = (a.astype(np.float32).astype(np.float64) for a in (gamma, beta, mean, var))
    expected_scale = g32 / np.sqrt(v32 + eps)
    assert affine.scale.dtype == np.float64 and affine.shift.dtype == np.float64
    np.testing.assert_allclose(affine.scale, expected_scale, rtol=1e-14, atol=0)
    np.testing.assert_allclose(affine.shift, b32 - m32 * expected_scale, rtol=1e-13, atol=1e-14)
    x = rng.normal(0.0, 3.0, (3, channels, 2))
    direct = g32[None, :, None] * (x - m32[None, :, None]) / np.sqrt(v32[None, :, None] + eps) + b32[None, :, None]
    assert_close(apply_affine(x, affine.scale, affine.shift, 1), direct)


def test_bn_affine_accepts_positive_denominator_with_negative_variance() -> None:
    affine = bn_affine(np.array([2.0]), np.array([1.0]), np.array([3.0]), np.array([-0.5]), 1.5)
    np.testing.assert_allclose(affine.scale, [2.0])
    np.testing.assert_allclose(affine.shift, [1.0 - 3.0 * 2.0])


@pytest.mark.parametrize(
    "var, eps",
    [(0.0, 0.0), (-1e-5, 1e-5), (-1.0, 1e-5), (-2.0, 1.0)],
    ids=["zero", "var=-eps", "negative", "negative-beyond-eps"],
)
def test_bn_affine_rejects_non_positive_denominator(var: float, eps: float) -> None:
    ones = np.ones(3)
    with pytest.raises(InvalidAffineError):
        bn_affine(ones, ones, ones, np.array([1.0, var, 1.0]), eps)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("position", ["gamma", "beta", "mean", "var", "eps"])
def test_bn_affine_rejects_non_finite(bad: float, position: str) -> None:
    params = {name: np.ones(3) for name in ("gamma", "beta", "mean", "var")}
    eps = 1e-5
    if position == "eps":
        eps = bad
    else:
        params[position][1] = bad
    with pytest.raises(InvalidAffineError):
        bn_affine(params["gamma"], params["beta"], params["mean"], params["var"], eps)


# --- ChannelAffine composition --------------------------------------------------------------------


@given(seed=st.integers(0, 2**32 - 1), channels=st.integers(1, 8),
       first_scalar=st.booleans(), second_scalar=st.booleans())
def test_then_composes_in_data_order(seed: int, channels: int, first_scalar: bool, second_scalar: bool) -> None:
    rng = np.random.default_rng(seed)
    first = random_affine(rng, channels, first_scalar)
    second = random_affine(rng, channels, second_scalar)
    x = rng.normal(0.0, 2.0, (4, channels, 3))
    composed = first.then(second)
    expected = apply_affine(apply_affine(x, first.scale, first.shift, 1), second.scale, second.shift, 1)
    assert_close(apply_affine(x, composed.scale, composed.shift, 1), expected)
    if channels > 1 and not (first_scalar and second_scalar):
        assert composed.channels == channels
    expanded = composed.expanded(channels)
    assert expanded.scale.shape == (channels,) and expanded.shift.shape == (channels,)
    assert_close(apply_affine(x, expanded.scale, expanded.shift, 1), expected)


def test_then_is_not_commutative() -> None:
    scale = scale_affine(np.array([2.0]))
    shift = shift_affine(np.array([3.0]))
    np.testing.assert_array_equal(scale.then(shift).shift, [3.0])  # 2x + 3
    np.testing.assert_array_equal(shift.then(scale).shift, [6.0])  # 2(x + 3)


def test_subtracted_from_affine_negates_and_shifts() -> None:
    affine = subtracted_from_affine(np.array([1.5, -2.0]))
    x = np.array([0.25, 3.0])
    np.testing.assert_array_equal(affine.scale * x + affine.shift, np.array([1.5, -2.0]) - x)


def test_shift_affine_subtract() -> None:
    affine = shift_affine(np.array([1.5, -2.0]), subtract=True)
    np.testing.assert_array_equal(affine.scale, [1.0, 1.0])
    np.testing.assert_array_equal(affine.shift, [-1.5, 2.0])


# --- Conv -----------------------------------------------------------------------------------------


@st.composite
def conv_cases(draw: st.DrawFn) -> dict:
    spatial = draw(st.integers(1, 3))
    group = draw(st.integers(1, 3))
    in_per_group = draw(st.integers(1, 2))
    depthwise = draw(st.booleans())
    out_per_group = 1 if depthwise and in_per_group == 1 else draw(st.integers(1, 3))
    kernel = tuple(draw(st.integers(1, 3)) for _ in range(spatial))
    max_size = {1: 7, 2: 5, 3: 4}[spatial]
    dilations = tuple(draw(st.integers(1, 2)) for _ in range(spatial))
    extents = [dilations[i] * (kernel[i] - 1) + 1 for i in range(spatial)]  # smallest unpadded input
    sizes = tuple(draw(st.integers(extent, max(max_size, extent))) for extent in extents)
    return {
        "spatial": spatial,
        "group": group,
        "in_channels": in_per_group * group,
        "out_channels": out_per_group * group,
        "kernel": kernel,
        "sizes": sizes,
        "strides": tuple(draw(st.integers(1, 2)) for _ in range(spatial)),
        "dilations": dilations,
        "pads": tuple(draw(st.integers(0, 1)) for _ in range(2 * spatial)),
        "bias": draw(st.booleans()),
        "scalar": draw(st.booleans()),
        "seed": draw(st.integers(0, 2**32 - 1)),
    }


@given(case=conv_cases())
def test_conv_backward_equals_conv_then_affine(case: dict) -> None:
    rng = np.random.default_rng(case["seed"])
    weight = rng.normal(0.0, 1.0, (case["out_channels"], case["in_channels"] // case["group"]) + case["kernel"])
    bias = rng.normal(0.0, 1.0, case["out_channels"]) if case["bias"] else None
    affine = random_affine(rng, case["out_channels"], case["scalar"])
    x = rng.normal(0.0, 1.0, (2, case["in_channels"]) + case["sizes"])
    geometry = (case["group"], case["strides"], case["pads"], case["dilations"])

    new_weight, new_bias = conv_backward(weight, bias, affine)

    assert new_weight.shape == weight.shape and new_bias.shape == (case["out_channels"],)
    expected = apply_affine(direct_conv(x, weight, bias, *geometry), affine.scale, affine.shift, 1)
    assert_close(direct_conv(x, new_weight, new_bias, *geometry), expected)


@given(case=conv_cases())
def test_conv_forward_equals_affine_then_unpadded_conv(case: dict) -> None:
    rng = np.random.default_rng(case["seed"])
    weight = rng.normal(0.0, 1.0, (case["out_channels"], case["in_channels"] // case["group"]) + case["kernel"])
    bias = rng.normal(0.0, 1.0, case["out_channels"]) if case["bias"] else None
    affine = random_affine(rng, case["in_channels"], case["scalar"])
    x = rng.normal(0.0, 1.0, (2, case["in_channels"]) + case["sizes"])
    geometry = (case["group"], case["strides"], (0,) * (2 * case["spatial"]), case["dilations"])

    new_weight, new_bias = conv_forward(weight, bias, affine, case["group"])

    assert new_weight.shape == weight.shape and new_bias.shape == (case["out_channels"],)
    expected = direct_conv(apply_affine(x, affine.scale, affine.shift, 1), weight, bias, *geometry)
    assert_close(direct_conv(x, new_weight, new_bias, *geometry), expected)


# --- ConvTranspose --------------------------------------------------------------------------------


@st.composite
def conv_transpose_cases(draw: st.DrawFn) -> dict:
    spatial = draw(st.integers(1, 2))
    group = draw(st.integers(1, 3))
    return {
        "spatial": spatial,
        "group": group,
        "in_channels": draw(st.integers(1, 2)) * group,
        "out_channels": draw(st.integers(1, 3)) * group,
        "kernel": tuple(draw(st.integers(1, 3)) for _ in range(spatial)),
        "sizes": tuple(draw(st.integers(1, 3)) for _ in range(spatial)),
        "strides": tuple(draw(st.integers(1, 2)) for _ in range(spatial)),
        "bias": draw(st.booleans()),
        "scalar": draw(st.booleans()),
        "seed": draw(st.integers(0, 2**32 - 1)),
    }


@given(case=conv_transpose_cases())
def test_conv_transpose_backward_equals_layer_then_affine(case: dict) -> None:
    rng = np.random.default_rng(case["seed"])
    group, out_channels = case["group"], case["out_channels"]
    weight = rng.normal(0.0, 1.0, (case["in_channels"], out_channels // group) + case["kernel"])
    bias = rng.normal(0.0, 1.0, out_channels) if case["bias"] else None
    affine = random_affine(rng, out_channels, case["scalar"])
    x = rng.normal(0.0, 1.0, (2, case["in_channels"]) + case["sizes"])

    new_weight, new_bias = conv_transpose_backward(weight, bias, affine, group)

    expected = apply_affine(direct_conv_transpose(x, weight, bias, group, case["strides"]),
                            affine.scale, affine.shift, 1)
    assert_close(direct_conv_transpose(x, new_weight, new_bias, group, case["strides"]), expected)


@given(case=conv_transpose_cases())
def test_conv_transpose_backward_scales_each_weight_by_its_output_channel(case: dict) -> None:
    """Output channel o = g*(C_out/g) + j lives at weight[g*(C_in/g):(g+1)*(C_in/g), j]."""
    rng = np.random.default_rng(case["seed"])
    group, out_channels, in_channels = case["group"], case["out_channels"], case["in_channels"]
    out_per_group, in_per_group = out_channels // group, in_channels // group
    weight = rng.normal(0.0, 1.0, (in_channels, out_per_group) + case["kernel"])
    bias = rng.normal(0.0, 1.0, out_channels) if case["bias"] else None
    affine = random_affine(rng, out_channels, case["scalar"])
    scale = np.broadcast_to(affine.scale, (out_channels,))
    shift = np.broadcast_to(affine.shift, (out_channels,))

    new_weight, new_bias = conv_transpose_backward(weight, bias, affine, group)

    assert new_weight.shape == weight.shape
    for c in range(in_channels):
        g = c // in_per_group
        for j in range(out_per_group):
            o = g * out_per_group + j
            np.testing.assert_array_equal(new_weight[c, j], weight[c, j] * scale[o])
    expected_bias = (bias if bias is not None else np.zeros(out_channels)) * scale + shift
    np.testing.assert_array_equal(new_bias, expected_bias)


# --- Gemm / MatMul --------------------------------------------------------------------------------

C_SHAPES = ["absent", "scalar", "[N]", "[1,N]", "[M,1]", "[M,N]"]


def make_c(rng: np.random.Generator, kind: str, m: int, n: int) -> np.ndarray | None:
    shapes: dict[str, tuple[int, ...]] = {"scalar": (), "[N]": (n,), "[1,N]": (1, n), "[M,1]": (m, 1),
                                          "[M,N]": (m, n)}
    return None if kind == "absent" else rng.normal(0.0, 1.0, shapes[kind])


@given(seed=st.integers(0, 2**32 - 1), m=st.integers(1, 4), k=st.integers(1, 4), n=st.integers(1, 5),
       alpha=st.sampled_from([1.0, 0.5, -1.25, 3.0]), beta=st.sampled_from([1.0, 2.0, 0.0, -0.75]),
       trans_a=st.booleans(), trans_b=st.booleans(), c_kind=st.sampled_from(C_SHAPES), scalar=st.booleans())
@example(seed=0, m=3, k=2, n=4, alpha=0.5, beta=2.0, trans_a=False, trans_b=True, c_kind="[N]", scalar=False)
@example(seed=1, m=2, k=3, n=3, alpha=0.5, beta=2.0, trans_a=True, trans_b=False, c_kind="[M,N]", scalar=False)
def test_gemm_backward_equals_gemm_then_affine(
    seed: int, m: int, k: int, n: int, alpha: float, beta: float, trans_a: bool, trans_b: bool, c_kind: str,
    scalar: bool,
) -> None:
    rng = np.random.default_rng(seed)
    a = rng.normal(0.0, 1.0, (k, m) if trans_a else (m, k))
    b = rng.normal(0.0, 1.0, (n, k) if trans_b else (k, n))
    c = make_c(rng, c_kind, m, n)
    affine = random_affine(rng, n, scalar)

    new_b, new_c = gemm_backward(b, c, affine, alpha, beta, trans_b)

    assert new_b.shape == b.shape
    expected = apply_affine(direct_gemm(a, b, c, alpha, beta, trans_a, trans_b), affine.scale, affine.shift, 1)
    # The folded Gemm has alpha = beta = 1 and C broadcast to [M, N] as ONNX does.
    got = direct_gemm(a, new_b, np.broadcast_to(new_c, (m, n)), 1.0, 1.0, trans_a, trans_b)
    assert_close(got, expected)


@given(seed=st.integers(0, 2**32 - 1), m=st.integers(1, 4), k=st.integers(1, 4), n=st.integers(1, 5),
       alpha=st.sampled_from([1.0, 0.5, -1.25]), beta=st.sampled_from([1.0, 2.0, 0.0]),
       trans_b=st.booleans(), c_kind=st.sampled_from(C_SHAPES), scalar=st.booleans())
def test_gemm_forward_equals_affine_then_gemm(
    seed: int, m: int, k: int, n: int, alpha: float, beta: float, trans_b: bool, c_kind: str, scalar: bool
) -> None:
    rng = np.random.default_rng(seed)
    a = rng.normal(0.0, 1.0, (m, k))
    b = rng.normal(0.0, 1.0, (n, k) if trans_b else (k, n))
    c = make_c(rng, c_kind, m, n)
    affine = random_affine(rng, k, scalar)

    new_b, new_c = gemm_forward(b, c, affine, alpha, beta, trans_b)

    assert new_b.shape == b.shape
    expected = direct_gemm(apply_affine(a, affine.scale, affine.shift, 1), b, c, alpha, beta, False, trans_b)
    got = direct_gemm(a, new_b, np.broadcast_to(new_c, (m, n)), 1.0, 1.0, False, trans_b)
    assert_close(got, expected)


@given(seed=st.integers(0, 2**32 - 1), m=st.integers(1, 4), k=st.integers(1, 4), n=st.integers(1, 5),
       with_bias=st.booleans(), scalar=st.booleans())
def test_matmul_backward_equals_matmul_then_affine(
    seed: int, m: int, k: int, n: int, with_bias: bool, scalar: bool
) -> None:
    rng = np.random.default_rng(seed)
    x = rng.normal(0.0, 1.0, (m, k))
    weight = rng.normal(0.0, 1.0, (k, n))
    bias = rng.normal(0.0, 1.0, n) if with_bias else None
    affine = random_affine(rng, n, scalar)

    new_weight, new_bias = matmul_backward(weight, bias, affine)

    layer = direct_gemm(x, weight, bias, 1.0, 1.0, False, False)
    expected = apply_affine(layer, affine.scale, affine.shift, 1)
    assert new_bias.shape == (n,)
    assert_close(direct_gemm(x, new_weight, new_bias, 1.0, 1.0, False, False), expected)


@given(seed=st.integers(0, 2**32 - 1), m=st.integers(1, 4), k=st.integers(1, 4), n=st.integers(1, 5),
       scalar=st.booleans())
def test_matmul_forward_equals_affine_then_matmul(seed: int, m: int, k: int, n: int, scalar: bool) -> None:
    rng = np.random.default_rng(seed)
    x = rng.normal(0.0, 1.0, (m, k))
    weight = rng.normal(0.0, 1.0, (k, n))
    affine = random_affine(rng, k, scalar)

    new_weight, bias = matmul_forward(weight, affine)

    expected = direct_gemm(apply_affine(x, affine.scale, affine.shift, 1), weight, None, 1.0, 1.0, False, False)
    assert_close(direct_gemm(x, new_weight, bias, 1.0, 1.0, False, False), expected)
