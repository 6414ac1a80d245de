"""Attack: a graph passed as an attribute to a model-local function call is folded against the
*caller's* names, but at run time it is a branch inside the function body and its outer-scope names
bind there.

`tests/crafted_models.function_with_graph_argument`: the main graph calls `F(x, body=<graph>)`; F's
body defines `w` (a Constant) and runs `If(then_branch = @body)`; the passed graph does
`Conv(x, w) -> BatchNormalization`. The main graph *also* has an initializer `w` (other values).
`bnfold.walk.scoped_subgraphs` (walk.py:53-81) treats every graph attribute of a custom-domain node as
a subgraph scope of the node's own graph, so the fold resolves `w` to the main graph's initializer,
writes `w_bnfold = main_w * scale` into the passed graph — and the analytic check recomputes the
expected weight from the same wrong tensor (the provenance's layer parameters), so it agrees. The
branch runs only for inputs with max(x) > 3, which the seeded uniform(-1, 1) verification inputs
never reach, so onnxruntime sees no difference either: `verification: PASSED`, and the written model
computes something else than the original whenever the branch is taken.

Why it matters: a PASSED that is wrong — the promise bnfold is built on. Reproduce: build the model,
`bnfold.fold(model)` passes; run original and folded in onnxruntime on `x = 5 * ones`: outputs differ
by ~10. Fix: a graph attribute of a call to a model-local function is not a scope of the caller (its
outer scope is the function body): leave it alone (or refuse with a reason), in `walk.scoped_subgraphs`
/ `iter_scopes`, and in the fold rules' constant lookup.
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
from crafted_models import C, function_with_graph_argument

import bnfold


def _run(model, feeds):
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"]).run(None, feeds)


def test_graph_passed_to_a_function_is_not_folded_with_the_callers_names() -> None:
    original = function_with_graph_argument()
    result = bnfold.fold(original, raise_on_failure=False)
    feeds = {"x": np.full((1, C, 3, 3), 5.0, np.float32)}  # max(x) > 3: the passed graph runs
    expected, = _run(original, feeds)
    got, = _run(result.model, feeds)
    # Either bnfold did not claim a pass, or what it passed computes what the original computes.
    assert not result.report.passed or np.allclose(got, expected, rtol=1e-4, atol=1e-4), \
        f"verification PASSED but outputs differ by {np.max(np.abs(got - expected)):.3g}"
