"""Attack 4: RunConfig validation (bnfold/run_config.py `_checked_shapes`).

Before the validation (801676b) `input_shapes` values went through `list(shape)`, so a numpy array
of dims (`np.array([1, 3, 224, 224])`, what a caller computing shapes with numpy holds) was a valid
shape. `_checked_shapes` now requires a `collections.abc.Sequence`, which np.ndarray is not: the
same call is refused as "expected a list of positive integers". Tuples and numpy integer dims still
pass; only the container type regressed.
"""

from __future__ import annotations

import numpy as np
from helpers import conv_bn_model

import bnfold


def test_input_shapes_given_as_a_numpy_array_are_accepted():
    model = conv_bn_model()
    dims = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    result = bnfold.fold(model, input_shapes={model.graph.input[0].name: np.array(dims)})
    assert result.report.verification.passed


def test_input_shapes_tuples_numpy_ints_and_path_side_outputs_are_accepted(tmp_path):
    """What held: tuples, numpy integer dims/seed/iterations, numpy float tolerances, Path outputs."""
    model = conv_bn_model()
    name = model.graph.input[0].name
    dims = tuple(np.int64(d.dim_value) for d in model.graph.input[0].type.tensor_type.shape.dim)
    result = bnfold.fold(model, input_shapes={name: dims}, seed=np.int64(3), iterations=np.int32(2),
                         timeout=np.float32(60), atol=np.float32(1e-4), providers=("CPUExecutionProvider",),
                         save_inputs=tmp_path / "in.npz", save_outputs=tmp_path / "out.npz")
    assert result.report.verification.passed
    assert (tmp_path / "in.npz").exists() and (tmp_path / "out.npz").exists()
