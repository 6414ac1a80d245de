"""Attack: values of the wrong type or range in the public API's verification options.

`RunConfig.__post_init__` (run_config.py:34-48) checks timeout, seed, iterations and tolerances by
comparison only, and `input_shapes` / `inputs` not at all, so:

* `input_shapes={"x": [1, 4, -4, 4]}` reaches numpy and raises `ValueError("negative dimensions are
  not allowed")` — the CLI refuses the same value with a one-line error (`--input-shape ... positive
  integers`), the API with a traceback;
* `input_shapes=[1, 4, 4, 4]` (a list, not a dict) raises `AttributeError`;
* `inputs={"x": [[...]]}` (a list, not an array) raises `AttributeError` (runtime.feed_sets reads
  `.dtype`), and `inputs=<an ndarray>` raises numpy's "truth value of an array is ambiguous"
  `ValueError`;
* `atol=True` is taken as an absolute tolerance of 1.0 — a bool where a number belongs silently
  widens the tolerance to where nearly anything passes.

Why it matters: the API promises `BadInputError` (or `TypeError`) for unusable options, never an
arbitrary exception, and a PASSED never obtained through a type confusion. Fix: validate in
`RunConfig.__post_init__` — `input_shapes` a mapping of names to sequences of positive ints,
`inputs` a mapping of names to numpy arrays, numeric fields real numbers but not bools.
"""

from __future__ import annotations

import numpy as np
import pytest
from helpers import conv_bn_model

import bnfold
from bnfold.errors import BadInputError

ONES = np.ones((1, 4, 4, 4), np.float32)


@pytest.mark.parametrize("options", [
    {"input_shapes": {"x": [1, 4, -4, 4]}},
    {"input_shapes": [1, 4, 4, 4]},
    {"inputs": {"x": ONES.tolist()}},
    {"inputs": ONES},
    {"atol": True},
], ids=["negative-dim", "shapes-not-a-dict", "inputs-a-list", "inputs-not-a-dict", "atol-bool"])
def test_wrong_option_is_bad_input_or_type_error(options: dict) -> None:
    with pytest.raises((BadInputError, TypeError)):
        bnfold.fold(conv_bn_model(), **options)
