"""Hypothesis profiles, and the fixtures several test files use."""

import os
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

# CI runs the "ci" profile (more examples); local runs stay quick. Select with HYPOTHESIS_PROFILE.
settings.register_profile("dev", max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("ci", max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "dev"))


@pytest.fixture
def drop_epsilon(monkeypatch):
    """Break the fold: bn_affine ignores epsilon (eps=0).

    Patches `bnfold.fold_math.bn_affine` and every bnfold module that imported it by name (a
    `from bnfold.fold_math import bn_affine` keeps its own reference, which a patch of the
    fold_math attribute alone would not reach). The verifier must not depend on it.
    """
    import bnfold
    from bnfold import fold_math

    sample = str(Path(__file__).resolve().parents[1] / "sample_models" / "mlp_bn1d.onnx")
    good = bnfold.fold(sample, verify=False).model.SerializeToString()
    original = fold_math.bn_affine

    def bn_affine_without_eps(gamma, beta, mean, var, eps=0.0):
        return original(gamma, beta, mean, var, 0.0)

    monkeypatch.setattr(fold_math, "bn_affine", bn_affine_without_eps)
    for name, module in list(sys.modules.items()):
        if name.startswith("bnfold.") and getattr(module, "bn_affine", None) is original:
            monkeypatch.setattr(module, "bn_affine", bn_affine_without_eps)
    # Sanity: the broken fold must produce different weights, or the test proves nothing.
    broken = bnfold.fold(sample, verify=False).model.SerializeToString()
    assert broken != good, "the eps=0 patch did not change the fold"
    return bn_affine_without_eps
