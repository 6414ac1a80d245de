"""The public Python API: bnfold.fold / bnfold.verify / FoldResult.save, external data, precision."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from helpers import sample_model_names
from onnx import numpy_helper

import bnfold
from bnfold import BadInputError, VerificationError
from bnfold.report import Verification

ROOT = Path(__file__).resolve().parents[1]
SAMPLES_DIR = ROOT / "sample_models"
SAMPLES = sample_model_names()
FP32_SAMPLES = [name for name in SAMPLES if name != "fp16_cnn.onnx"]
FOLDING_SAMPLES = [name for name in SAMPLES if name != "no_bn.onnx"]


def sample(name: str) -> Path:
    return SAMPLES_DIR / name


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def bn_count(model: onnx.ModelProto) -> int:
    return sum(node.op_type == "BatchNormalization" for node in model.graph.node)


def initializer(model: onnx.ModelProto, name: str) -> onnx.TensorProto:
    return next(t for t in model.graph.initializer if t.name == name)


# --- fold ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", SAMPLES)
def test_fold_does_not_mutate_model_proto(name):
    model = onnx.load(str(sample(name)))
    before = model.SerializeToString()
    result = bnfold.fold(model)
    assert model.SerializeToString() == before
    assert result.model is not model
    assert result.report.passed


def test_fold_model_proto_result_is_independent_of_input():
    model = onnx.load(str(sample("resnet_tiny.onnx")))
    result = bnfold.fold(model)
    before = result.model.SerializeToString()
    model.graph.initializer[0].raw_data = b"\x00" * len(model.graph.initializer[0].raw_data)
    model.graph.node.pop()
    assert result.model.SerializeToString() == before


@pytest.mark.parametrize("kind", [str, Path])
def test_fold_path(kind):
    result = bnfold.fold(kind(sample("resnet_tiny.onnx")))
    assert result.report.passed
    assert result.report.input_path is not None
    assert bn_count(result.model) == 1
    assert result.report.ops_before["BatchNormalization"] == 5
    assert result.report.ops_after["BatchNormalization"] == 1
    onnx.checker.check_model(result.model, full_check=True)


def test_fold_without_verify():
    result = bnfold.fold(str(sample("bn_first.onnx")), verify=False)
    assert result.report.verification is None
    assert result.report.passed
    assert bn_count(result.model) == 0


def test_fold_rejects_other_types():
    with pytest.raises(BadInputError):
        bnfold.fold(12345)


def test_fold_invalid_model_proto_is_bad_input():
    model = onnx.load(str(sample("no_bn.onnx")))
    model.graph.node[0].input[0] = "undefined_tensor"
    with pytest.raises(BadInputError):
        bnfold.fold(model)


def test_fold_same_result_from_proto_and_path():
    from_path = bnfold.fold(str(sample("convtranspose_decoder.onnx"))).model
    from_proto = bnfold.fold(onnx.load(str(sample("convtranspose_decoder.onnx")))).model
    for tensor in from_path.graph.initializer:
        np.testing.assert_array_equal(numpy_helper.to_array(tensor),
                                      numpy_helper.to_array(initializer(from_proto, tensor.name)))


# --- save ---------------------------------------------------------------------------------------


def test_save_is_atomic_and_leaves_no_temp_files(tmp_path):
    result = bnfold.fold(str(sample("resnet_tiny.onnx")))
    target = tmp_path / "out.onnx"
    returned = result.save(target)
    assert Path(returned) == target
    assert [p.name for p in tmp_path.iterdir()] == ["out.onnx"]
    assert result.report.output_path == str(target)
    saved = onnx.load(str(target))
    assert saved.SerializeToString() == result.model.SerializeToString()
    onnx.checker.check_model(str(target), full_check=True)


def test_save_replaces_existing_file(tmp_path):
    target = tmp_path / "out.onnx"
    target.write_bytes(b"previous content that is not a model")
    result = bnfold.fold(str(sample("bn_first.onnx")))
    result.save(target)
    assert bn_count(onnx.load(str(target))) == 0
    assert [p.name for p in tmp_path.iterdir()] == ["out.onnx"]


def test_save_twice_is_idempotent(tmp_path):
    result = bnfold.fold(str(sample("grouped_depthwise.onnx")))
    target = tmp_path / "out.onnx"
    result.save(target)
    first = target.read_bytes()
    result.save(target)
    assert target.read_bytes() == first
    assert [p.name for p in tmp_path.iterdir()] == ["out.onnx"]


def test_save_into_missing_folder(tmp_path):
    result = bnfold.fold(str(sample("no_bn.onnx")))
    with pytest.raises(BadInputError):
        result.save(tmp_path / "missing" / "out.onnx")
    assert list(tmp_path.iterdir()) == []


def test_save_with_external_data_keeps_result_model_usable(tmp_path):
    result = bnfold.fold(str(sample("resnet_tiny.onnx")))
    values = {t.name: numpy_helper.to_array(t).copy() for t in result.model.graph.initializer}
    result.save(tmp_path / "a.onnx", external_data=True)
    for tensor in result.model.graph.initializer:
        assert tensor.data_location != onnx.TensorProto.EXTERNAL and not tensor.external_data
        np.testing.assert_array_equal(numpy_helper.to_array(tensor), values[tensor.name])
    result.save(tmp_path / "b.onnx", external_data=False)
    assert external_locations(tmp_path / "b.onnx") == set()


def test_save_with_external_data_does_not_alter_result_model_bytes(tmp_path):
    """model_io._serialize promises to reference the data file 'without altering `model` itself'."""
    result = bnfold.fold(str(sample("resnet_tiny.onnx")))
    before = result.model.SerializeToString()
    result.save(tmp_path / "a.onnx", external_data=True)
    assert result.model.SerializeToString() == before


# --- verification failures ----------------------------------------------------------------------


def test_wrong_fold_raises_verification_error(drop_epsilon):
    with pytest.raises(VerificationError) as caught:
        bnfold.fold(str(sample("mlp_bn1d.onnx")))
    error = caught.value
    assert error.exit_code == 1
    assert error.report.verification is not None
    assert error.report.verification.passed is False
    assert error.report.passed is False
    assert not error.report.verification.analytic_passed


def test_wrong_fold_caught_with_huge_tolerances(drop_epsilon):
    with pytest.raises(VerificationError) as caught:
        bnfold.fold(str(sample("mlp_bn1d.onnx")), atol=1e3, rtol=1e3)
    verification = caught.value.report.verification
    assert all(o.passed for o in verification.outputs)  # tolerances alone let it through
    assert any(not t.passed and t.max_ulp_error > 1 for t in verification.tensors)


def test_wrong_fold_without_raising(drop_epsilon):
    result = bnfold.fold(str(sample("mlp_bn1d.onnx")), raise_on_failure=False)
    assert result.report.passed is False
    assert result.report.verification.passed is False
    assert result.report.verification.failures()


def test_wrong_fold_on_model_proto(drop_epsilon):
    model = onnx.load(str(sample("mlp_bn1d.onnx")))
    with pytest.raises(VerificationError):
        bnfold.fold(model, atol=1e3, rtol=1e3)


# --- bnfold.verify ------------------------------------------------------------------------------


def test_verify_returns_verification():
    original = onnx.load(str(sample("resnet_tiny.onnx")))
    folded = bnfold.fold(original).model
    result = bnfold.verify(original, folded)
    assert isinstance(result, Verification)
    assert result.passed
    assert [o.name for o in result.outputs] == ["logits"]


def test_verify_paths(tmp_path):
    folded = bnfold.fold(str(sample("resnet_tiny.onnx")))
    folded.save(tmp_path / "folded.onnx")
    result = bnfold.verify(str(sample("resnet_tiny.onnx")), tmp_path / "folded.onnx", seed=3)
    assert result.passed and result.seed == 3


def test_verify_model_against_itself():
    model = onnx.load(str(sample("no_bn.onnx")))
    result = bnfold.verify(model, model)
    assert result.passed
    assert all(o.max_abs_error == 0 for o in result.outputs)


def test_verify_raises_for_models_that_differ():
    original = onnx.load(str(sample("no_bn.onnx")))
    changed = onnx.ModelProto()
    changed.CopyFrom(original)
    weight_name = changed.graph.node[0].input[1]  # the Conv weight
    tensor = initializer(changed, weight_name)
    values = numpy_helper.to_array(tensor).copy()
    values.flat[0] += 1.0
    tensor.CopyFrom(numpy_helper.from_array(values, weight_name))
    with pytest.raises(VerificationError) as caught:
        bnfold.verify(original, changed)
    assert caught.value.report.verification.passed is False
    assert any(not o.passed for o in caught.value.report.verification.outputs)


# --- external data ------------------------------------------------------------------------------


def save_external(model_path: Path, folder: Path, location: str = "weights.bin") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / "model.onnx"
    onnx.save_model(onnx.load(str(model_path)), str(target), save_as_external_data=True, location=location,
                    size_threshold=0)
    assert (folder / location).is_file()
    return target


def external_locations(path: Path) -> set[str]:
    model = onnx.load(str(path), load_external_data=False)
    locations = set()
    for tensor in onnx.external_data_helper._get_all_tensors(model):
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            locations.add({e.key: e.value for e in tensor.external_data}["location"])
    return locations


def test_external_data_input_folds_and_saves_fresh_data_file(tmp_path):
    model_path = save_external(sample("resnet_tiny.onnx"), tmp_path / "in")
    weights = tmp_path / "in" / "weights.bin"
    digest = sha256(weights)
    result = bnfold.fold(model_path)
    assert result.report.passed
    assert bn_count(result.model) == 1
    out = tmp_path / "out" / "model.folded.onnx"
    out.parent.mkdir()
    result.save(out)
    data = out.with_name(out.name + ".data")
    assert data.is_file() and data.stat().st_size > 0
    assert external_locations(out) == {data.name}
    assert sorted(p.name for p in out.parent.iterdir()) == sorted([out.name, data.name])
    assert sha256(weights) == digest
    assert sorted(p.name for p in (tmp_path / "in").iterdir()) == ["model.onnx", "weights.bin"]
    onnx.checker.check_model(str(out), full_check=True)
    assert bnfold.verify(str(sample("resnet_tiny.onnx")), out).passed


def test_external_data_output_beside_input(tmp_path):
    model_path = save_external(sample("resnet_tiny.onnx"), tmp_path)
    weights = tmp_path / "weights.bin"
    digest = sha256(weights)
    result = bnfold.fold(model_path)
    out = tmp_path / "model.folded.onnx"
    result.save(out)
    assert sha256(weights) == digest
    assert external_locations(out) == {"model.folded.onnx.data"}
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["model.onnx", "weights.bin", "model.folded.onnx", "model.folded.onnx.data"])
    assert bnfold.verify(model_path, out).passed


def test_external_data_saving_twice_does_not_grow_data_file(tmp_path):
    model_path = save_external(sample("resnet_tiny.onnx"), tmp_path / "in")
    result = bnfold.fold(model_path)
    out = tmp_path / "model.folded.onnx"
    result.save(out)
    data = out.with_name(out.name + ".data")
    size, content = data.stat().st_size, data.read_bytes()
    result.save(out)
    assert data.stat().st_size == size
    assert data.read_bytes() == content
    # A second fold of the same input, saved to the same place, also replaces (never appends).
    bnfold.fold(model_path).save(out)
    assert data.stat().st_size == size
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["in", out.name, data.name])
    assert bnfold.verify(model_path, out).passed


def test_external_data_never_writes_the_inputs_data_file(tmp_path):
    """The input's data file happens to be named like bnfold's default '<out>.data'."""
    model_path = save_external(sample("resnet_tiny.onnx"), tmp_path, location="model.folded.onnx.data")
    weights = tmp_path / "model.folded.onnx.data"
    digest = sha256(weights)
    result = bnfold.fold(model_path)
    out = tmp_path / "model.folded.onnx"
    result.save(out)
    assert sha256(weights) == digest
    assert "model.folded.onnx.data" not in external_locations(out)
    assert bnfold.verify(model_path, out).passed
    # The input still loads and is unchanged.
    assert bnfold.verify(str(sample("resnet_tiny.onnx")), model_path).passed


def test_external_data_save_can_be_switched_off(tmp_path):
    model_path = save_external(sample("resnet_tiny.onnx"), tmp_path / "in")
    result = bnfold.fold(model_path)
    out = tmp_path / "inline.onnx"
    result.save(out, external_data=False)
    assert external_locations(out) == set()
    assert [p.name for p in tmp_path.iterdir() if p.is_file()] == ["inline.onnx"]


def test_external_data_input_proto_not_written_back(tmp_path):
    """Folding a loaded external-data model in memory leaves the files alone."""
    model_path = save_external(sample("mlp_bn1d.onnx"), tmp_path)
    digest = sha256(tmp_path / "weights.bin"), sha256(model_path)
    bnfold.fold(model_path)
    bnfold.fold(onnx.load(str(model_path)))
    assert (sha256(tmp_path / "weights.bin"), sha256(model_path)) == digest
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx", "weights.bin"]


# --- precision ----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", FOLDING_SAMPLES)
def test_analytic_check_within_one_ulp(name):
    result = bnfold.fold(str(sample(name)))
    tensors = result.report.verification.tensors
    assert tensors, "no folded tensor was checked"
    assert max(t.max_ulp_error for t in tensors) <= 1.0
    assert all(t.passed for t in tensors)


@pytest.mark.parametrize("name", FP32_SAMPLES)
def test_fp32_outputs_within_1e_6_relative(name):
    result = bnfold.fold(str(sample(name)))
    outputs = result.report.verification.outputs
    assert outputs
    for output in outputs:
        assert output.max_rel_error <= 1e-6, (output.name, output.max_rel_error)
        assert output.passed


def test_fp16_weights_stay_fp16():
    result = bnfold.fold(str(sample("fp16_cnn.onnx")))
    assert result.report.passed
    for node in result.model.graph.node:
        if node.op_type == "Conv":
            for name in node.input[1:]:
                assert initializer(result.model, name).data_type == onnx.TensorProto.FLOAT16


def test_check_api():
    checked = bnfold.check(str(sample("resnet_tiny.onnx")))
    assert len(checked.foldable) == 4
    assert not checked.clean
    assert bnfold.check(str(sample("no_bn.onnx"))).clean


def test_sample_models_untouched_by_api(tmp_path):
    digests = {name: sha256(sample(name)) for name in SAMPLES}
    for name in SAMPLES:
        bnfold.fold(str(sample(name))).save(tmp_path / name)
    assert {name: sha256(sample(name)) for name in SAMPLES} == digests
    shutil.rmtree(tmp_path)
