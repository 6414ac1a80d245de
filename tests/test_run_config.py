"""The verification options live in one place, `RunConfig`: `fold`, `check` and `verify` take one
(as `verify=` / `config`), or its fields as keywords, which replace the config's fields."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest

import bnfold
from benchmarks.graph_builder import GraphBuilder
from bnfold import RunConfig


def _model_file(tmp_path: Path) -> Path:
    g = GraphBuilder(np.random.default_rng(11))
    x = g.input("x", ["N", 3, 6, 6])
    path = tmp_path / "model.onnx"
    onnx.save(g.model([g.bn(g.conv(x, 3, 4, kernel=3, pads=[1, 1, 1, 1]), 4)]), path)
    return path


def test_a_config_and_the_same_keywords_verify_alike(tmp_path: Path) -> None:
    model = _model_file(tmp_path)
    by_config = bnfold.fold(model, verify=RunConfig(seed=7, iterations=2, input_shapes={"x": [3, 3, 6, 6]}))
    by_keywords = bnfold.fold(model, seed=7, iterations=2, input_shapes={"x": [3, 3, 6, 6]})
    for verification in (by_config.report.verification, by_keywords.report.verification):
        assert verification.passed and verification.seeds == [7, 8] and verification.input_shapes == {"x": [3, 3, 6, 6]}
    assert [o.max_abs_error for o in by_config.report.verification.outputs] == \
        [o.max_abs_error for o in by_keywords.report.verification.outputs]


def test_keywords_replace_the_fields_of_a_given_config(tmp_path: Path) -> None:
    base = RunConfig(seed=7, timeout=30)
    result = bnfold.fold(_model_file(tmp_path), verify=base, seed=2)
    assert result.report.verification.seed == 2 and result.report.verification.timeout == 30
    assert base.seed == 7  # the caller's config is not changed


def test_check_and_verify_take_a_config(tmp_path: Path) -> None:
    model = _model_file(tmp_path)
    checked = bnfold.check(model, verify=RunConfig(seed=4))
    assert checked.report.verification.seed == 4 and len(checked.foldable) == 1
    folded = tmp_path / "folded.onnx"
    bnfold.fold(model, output=folded, verify=False)
    assert bnfold.verify(model, folded, RunConfig(seed=9)).seed == 9
    assert bnfold.verify(model, folded, seed=3).seed == 3


def test_an_unknown_option_is_a_type_error_before_any_work(tmp_path: Path) -> None:
    model = _model_file(tmp_path)
    out = tmp_path / "out.onnx"
    with pytest.raises(TypeError, match="fold\\(\\) got an unexpected keyword argument 'sed'"):
        bnfold.fold(model, output=out, sed=3)
    with pytest.raises(TypeError, match="verify\\(\\) got an unexpected keyword argument 'tolerance'"):
        bnfold.verify(model, model, tolerance=1.0)
    assert not out.exists()


def test_bad_values_are_refused_whichever_way_they_come(tmp_path: Path) -> None:
    model = _model_file(tmp_path)
    with pytest.raises(bnfold.BadInputError, match="atol must be a finite number >= 0"):
        bnfold.fold(model, atol=-1.0)
    with pytest.raises(bnfold.BadInputError, match="iterations must be at least 1"):
        bnfold.fold(model, verify=RunConfig(), iterations=0)
    with pytest.raises(bnfold.BadInputError, match="timeout must be a positive number"):
        RunConfig(timeout=float("nan"))


def test_run_config_takes_keywords_only_and_normalises_its_fields() -> None:
    with pytest.raises(TypeError):
        RunConfig(3)  # type: ignore[misc]  # a positional seed would silently shift with a new field
    config = RunConfig(input_shapes=None, providers="CPUExecutionProvider", save_inputs=Path("a.npz"))  # type: ignore[arg-type]
    assert config.input_shapes == {} and config.providers == ["CPUExecutionProvider"] and config.save_inputs == "a.npz"


def test_ill_typed_options_are_refused(tmp_path: Path) -> None:
    model = _model_file(tmp_path)
    with pytest.raises(TypeError, match="verify must be True, False or a RunConfig"):
        bnfold.fold(model, verify="no")  # type: ignore[arg-type]
    for options in ({"seed": True}, {"iterations": 2.0}, {"timeout": True}, {"rtol": True},
                    {"providers": [1]}, {"isolated": "no"}, {"input_shapes": {"x": [1, True, 6, 6]}}):
        with pytest.raises(bnfold.BadInputError):
            RunConfig(**options)
    assert RunConfig(seed=np.int64(3), atol=np.float32(0.5)).seed == 3
