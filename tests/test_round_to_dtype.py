"""Property tests for bnfold.fold_math.round_to_dtype: float16/float32 equal numpy's cast, bfloat16 is
correctly rounded (round to nearest, ties to even) against a reference written here, subnormals
included."""

from __future__ import annotations

import math

import ml_dtypes
import numpy as np
import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from bnfold.fold_math import round_to_dtype

BF16 = np.dtype(ml_dtypes.bfloat16)


# --- round_to_dtype -------------------------------------------------------------------------------

FLOAT64_VALUES = st.floats(allow_nan=False, allow_infinity=True, width=64)


@pytest.mark.parametrize("dtype", [np.float16, np.float32], ids=["float16", "float32"])
@given(values=st.lists(FLOAT64_VALUES, min_size=1, max_size=16))
def test_round_to_float16_float32_equals_numpy_cast(dtype: type, values: list[float]) -> None:
    array = np.array(values, dtype=np.float64)
    rounded = round_to_dtype(array, np.dtype(dtype))
    assert rounded.dtype == np.dtype(dtype)
    with np.errstate(over="ignore"):
        expected = array.astype(dtype)
    np.testing.assert_array_equal(rounded.view(f"u{rounded.itemsize}"), expected.view(f"u{expected.itemsize}"))


BF16_SMALLEST_SUBNORMAL_EXPONENT = -133  # bfloat16 shares float32's exponent range: 7-bit fraction


BF16_MAX = float(np.array(0x7F7F, dtype=np.uint16).view(BF16).astype(np.float64))


def bf16_spacing(value: float) -> float:
    """Distance between consecutive bfloat16 values around |value| (in the binade of value)."""
    if value == 0.0:
        return 2.0**BF16_SMALLEST_SUBNORMAL_EXPONENT
    _, exponent = math.frexp(abs(value))  # |value| = m * 2**exponent, 0.5 <= m < 1
    return 2.0 ** max(exponent - 8, BF16_SMALLEST_SUBNORMAL_EXPONENT)


def bf16_correctly_rounded(value: float) -> float:
    """Round-to-nearest-even of a float64 onto the bfloat16 grid, by exact float64 arithmetic."""
    if not math.isfinite(value):
        return value
    spacing = bf16_spacing(value)
    magnitude = abs(value)
    steps = math.floor(magnitude / spacing)  # exact: spacing is a power of two
    below, above = steps * spacing, (steps + 1) * spacing
    distance_below, distance_above = magnitude - below, above - magnitude
    if distance_below < distance_above or (distance_below == distance_above and steps % 2 == 0):
        result = below
    else:
        result = above
    if result > BF16_MAX:
        result = math.inf
    return math.copysign(result, value)


def bf16_values_near_ties(bits: st.SearchStrategy[int]) -> st.SearchStrategy[float]:
    """bfloat16 values (given by their bits) plus a fraction of a bfloat16 step: exact ties and
    values just off them."""

    def build(pattern: int, fraction: float) -> float:
        base = float(np.array(pattern, dtype=np.uint16).view(BF16).astype(np.float64))
        return base + math.copysign(fraction * bf16_spacing(base), base if base != 0 else 1.0)

    fractions = st.sampled_from([0.5, 0.5 + 2.0**-20, 0.5 - 2.0**-20, 0.5 + 2.0**-40, 0.25, 0.75, 2.0**-30])
    return st.builds(build, bits, fractions | st.floats(0.0, 1.0))


BF16_MIN_NORMAL = 2.0**-126


SIGN = st.sampled_from([0, 0x8000])


NORMAL_BITS = st.builds(lambda sign, magnitude: sign | magnitude, SIGN, st.integers(0x0080, 0x7F7F))


SUBNORMAL_BITS = st.builds(lambda sign, magnitude: sign | magnitude, SIGN, st.integers(0x0000, 0x007E))


BF16_NORMAL_INPUTS = (
    st.floats(min_value=-3.5e38, max_value=3.5e38, width=64).filter(lambda v: v == 0 or abs(v) >= BF16_MIN_NORMAL)
    | bf16_values_near_ties(NORMAL_BITS)
)


BF16_SUBNORMAL_INPUTS = (
    st.floats(min_value=-BF16_MIN_NORMAL, max_value=BF16_MIN_NORMAL, width=64, exclude_min=True, exclude_max=True)
    | bf16_values_near_ties(SUBNORMAL_BITS)
)


def test_bf16_reference_rounding_on_known_values() -> None:
    """The test's own reference, against values whose rounding is known by hand."""
    assert bf16_correctly_rounded(1.0 + 2.0**-8) == 1.0  # tie -> even (1.0)
    assert bf16_correctly_rounded(1.0 + 3 * 2.0**-8) == 1.0 + 2.0**-6  # tie -> even (1 + 2*2**-7)
    assert bf16_correctly_rounded(1.0 + 2.0**-8 + 2.0**-30) == 1.0 + 2.0**-7
    assert bf16_correctly_rounded(-(1.0 + 2.0**-8 + 2.0**-30)) == -(1.0 + 2.0**-7)
    assert bf16_correctly_rounded(2.0**-134) == 0.0  # half the smallest subnormal: tie -> 0
    assert bf16_correctly_rounded(2.0**-134 * 1.0000001) == 2.0**-133
    assert bf16_correctly_rounded(1e39) == math.inf
    assert bf16_correctly_rounded(BF16_MAX + 0.5 * 2.0**120) == math.inf  # tie above max -> even (inf)


def assert_bf16_correctly_rounded(values: list[float]) -> None:
    array = np.array(values, dtype=np.float64)
    rounded = round_to_dtype(array, BF16)
    assert rounded.dtype == BF16
    got = rounded.astype(np.float64)
    expected = np.array([bf16_correctly_rounded(v) for v in values])
    for value, g, e in zip(values, got, expected):
        if math.isfinite(e):
            # within half a bfloat16 step of the float64 value ...
            assert abs(g - value) <= 0.5 * bf16_spacing(value), (value, g, e)
        # ... and on the nearest grid point, ties to even
        assert g == e and math.copysign(1.0, g) == math.copysign(1.0, e), (value, g, e)


@given(values=st.lists(BF16_NORMAL_INPUTS, min_size=1, max_size=8))
@example(values=[1.0 + 2.0**-8 + 2.0**-30])  # ml_dtypes via float32 double-rounds this to 1.0
@example(values=[1.0 + 2.0**-8, 1.0 + 3 * 2.0**-8, -(1.0 + 2.0**-8)])  # exact ties
@example(values=[BF16_MAX, BF16_MAX + 0.5 * 2.0**120, BF16_MAX + 0.49 * 2.0**120, -1e39])  # overflow
def test_round_to_bfloat16_is_correctly_rounded(values: list[float]) -> None:
    assert_bf16_correctly_rounded(values)


@given(values=st.lists(BF16_SUBNORMAL_INPUTS, min_size=1, max_size=8))
@example(values=[2.0**-130 + 2.0**-134 + 2.0**-140])  # subnormal, just above a tie
@example(values=[-(2.0**-134) * 1.0000001])  # just above half the smallest subnormal
def test_round_to_bfloat16_subnormals_are_correctly_rounded(values: list[float]) -> None:
    assert_bf16_correctly_rounded(values)
