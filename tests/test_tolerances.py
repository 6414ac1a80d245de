"""Output comparison: the element rule, NaN/Inf placement, and the scale-relative default atol."""

from __future__ import annotations

import numpy as np
from helpers import run

import bnfold
from benchmarks.graph_builder import GraphBuilder
from bnfold.runtime import compare_arrays, graph_inputs, random_inputs


def test_element_fails_only_beyond_atol_plus_rtol_times_reference():
    reference = np.array([0.0, 1.0, 100.0])
    inside = reference + np.array([1e-5, 1e-5 + 1e-4, 1e-5 + 1e-2]) * 0.99
    outside = reference + np.array([0.0, 0.0, 1e-5 + 1e-2]) * 1.01
    assert compare_arrays("y", reference, inside, atol=1e-5, rtol=1e-4).passed
    check = compare_arrays("y", reference, outside, atol=1e-5, rtol=1e-4)
    assert not check.passed and check.mismatches == 1
    assert np.isclose(check.max_abs_error, (1e-5 + 1e-2) * 1.01, rtol=1e-9)
    assert np.isclose(check.max_rel_error, check.max_abs_error / 100.0)


def test_nan_and_inf_must_sit_in_the_same_places():
    reference = np.array([np.nan, np.inf, -np.inf, 1.0])
    assert compare_arrays("y", reference, reference.copy(), 0.0, 0.0).passed
    assert not compare_arrays("y", reference, np.array([1.0, np.inf, -np.inf, 1.0]), 1.0, 1.0).passed
    assert not compare_arrays("y", reference, np.array([np.nan, -np.inf, -np.inf, 1.0]), 1.0, 1.0).passed


def _large_output_model():
    """Conv -> BN with outputs around 1e3: rounding differences are ~1e-4 absolute."""
    g = GraphBuilder(rng=np.random.default_rng(7))
    x = g.input("x", [1, 64, 8, 8])
    weight = g.const(g.rng.normal(0, 30.0, size=(64, 64, 3, 3)), "w")
    y = g.bn(g.node("Conv", [x, weight], pads=[1, 1, 1, 1]), 64)
    return g.model([y])


def test_default_atol_is_relative_to_the_output_scale_and_reported():
    model = _large_output_model()
    result = bnfold.fold(model)
    output = result.report.verification.outputs[0]
    scale = output.max_abs_error / output.max_rel_error
    assert scale > 100  # the test really has large outputs
    # The scale is the output's 90th percentile of |reference| (docs/verification.md), not its maximum.
    feeds, _ = random_inputs(graph_inputs(model), {}, seed=0)
    (reference,) = run(model, feeds)
    assert np.isclose(output.atol, 1e-5 * np.quantile(np.abs(reference), 0.9, method="lower"), rtol=1e-6)
    assert output.atol < 1e-5 * scale
    assert output.passed


def test_user_atol_is_absolute():
    result = bnfold.fold(_large_output_model(), atol=1e-9, rtol=0.0, raise_on_failure=False)
    output = result.report.verification.outputs[0]
    assert output.atol == 1e-9 and output.rtol == 0.0
    assert output.max_abs_error > 1e-9 and not output.passed and not result.report.passed
