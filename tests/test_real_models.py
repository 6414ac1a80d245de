"""Opt-in: real torchvision exports (random weights, randomized BN statistics) from ../shared/models.

Skipped when that folder is absent, so the suite also runs outside this repository layout.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import onnx
import pytest

import bnfold

MODELS_DIR = Path(__file__).resolve().parents[2] / "shared" / "models"
MODEL_NAMES = ["mobilenet_v3_small.onnx", "efficientnet_b0.onnx", "lraspp_mobilenet_v3_large.onnx"]

if not MODELS_DIR.is_dir():
    pytest.skip(f"{MODELS_DIR} not found (opt-in real-model tests)", allow_module_level=True)


def model_path(name: str) -> Path:
    path = MODELS_DIR / name
    if not path.is_file():
        pytest.skip(f"{path} not found")
    return path


@pytest.fixture(scope="module", params=MODEL_NAMES)
def folded(request):
    path = model_path(request.param)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    result = bnfold.fold(path)
    return path, digest, result


def test_no_batchnorm_left(folded):
    _, _, result = folded
    assert result.report.ops_before.get("BatchNormalization", 0) > 0, "the export should contain BNs"
    assert result.report.ops_after.get("BatchNormalization", 0) == 0
    assert not any(node.op_type == "BatchNormalization" for node in result.model.graph.node)
    assert result.report.skipped == []
    bn_records = [r for r in result.report.folded if r.op_type == "BatchNormalization"]
    assert len(bn_records) == result.report.ops_before["BatchNormalization"]


def test_verification_passed(folded):
    _, _, result = folded
    verification = result.report.verification
    assert verification is not None
    assert verification.passed, verification.failures()
    assert verification.checker_passed
    assert verification.runtime_status == "passed"


def test_outputs_within_1e_6_relative(folded):
    _, _, result = folded
    outputs = result.report.verification.outputs
    assert outputs
    for output in outputs:
        assert output.max_rel_error <= 1e-6, (output.name, output.max_rel_error)


def test_analytic_check_within_one_ulp(folded):
    _, _, result = folded
    tensors = result.report.verification.tensors
    assert tensors
    # Every folded BN wrote at least a weight (and a bias) that was checked.
    assert len(tensors) >= 2 * result.report.ops_before["BatchNormalization"]
    assert max(t.max_ulp_error for t in tensors) <= 1.0
    assert all(t.passed for t in tensors)


def test_conv_count_unchanged(folded):
    _, _, result = folded
    assert result.report.ops_before["Conv"] == result.report.ops_after["Conv"]
    assert sum(node.op_type == "Conv" for node in result.model.graph.node) == result.report.ops_before["Conv"]


def test_graph_interface_unchanged(folded):
    path, _, result = folded
    original = onnx.load(str(path))
    assert [(v.name, v.type) for v in result.model.graph.input] == [(v.name, v.type) for v in original.graph.input]
    assert [(v.name, v.type) for v in result.model.graph.output] == \
        [(v.name, v.type) for v in original.graph.output]


def test_input_untouched(folded):
    path, digest, _ = folded
    assert hashlib.sha256(path.read_bytes()).hexdigest() == digest


def test_saved_model_verifies(folded, tmp_path):
    path, _, result = folded
    target = tmp_path / (path.stem + ".folded.onnx")
    result.save(target)
    assert [p.name for p in tmp_path.iterdir()] == [target.name]
    onnx.checker.check_model(str(target), full_check=True)
    assert bnfold.verify(path, target, seed=1).passed
    assert target.stat().st_size < path.stat().st_size
