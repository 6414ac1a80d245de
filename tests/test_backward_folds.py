"""End-to-end backward folds (layer -> BatchNormalization) on hand-built graphs.

Every case folds through the public API (`bnfold.fold`, verification on) and then checks, independently
of bnfold's own verification:
- the BN is gone and the op list is exactly what the fold should leave;
- the folded model's outputs match the original's under onnxruntime with optimizations off (or onnx's
  reference evaluator where onnxruntime's CPU provider has no kernel for the dtype);
- the written weight/bias equal a float64 recomputation made here from the original initializers to
  within half an ulp of their dtype (they are rounded once);
- the report names each BN and the layer it went into, verification passed with <= 1 ulp;
- the BN's output name is produced by the folded layer and the BN's parameters are gone.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import onnx
import pytest
from backward_fold_checks import (
    BF16,
    C_KINDS,
    F16,
    F32,
    F64,
    Built,
    assert_rounded_once,
    bn_scale_shift,
    conv_model,
    conv_transpose_model,
    find_node,
    finish,
    fold_and_check,
    gemm_model,
    get_attr,
    initializers,
    matmul_model,
    node_name,
    run_reference,
    ulp,
)
from helpers import op_types, random_feeds, run
from onnx import helper, numpy_helper

import bnfold
from benchmarks.graph_builder import GraphBuilder

# --- Conv -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("geometry", ["default", "strided-padded-dilated", "same_upper", "valid"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize("group_kind", ["group1", "grouped", "depthwise"])
@pytest.mark.parametrize("dims", [1, 2, 3], ids=["1d", "2d", "3d"])
def test_conv_bn(dims: int, group_kind: str, bias: bool, geometry: str) -> None:
    fold_and_check(conv_model(dims, group_kind, bias, geometry))


# --- ConvTranspose --------------------------------------------------------------------------------


@pytest.mark.parametrize("geometry", ["plain", "strided-output-padding"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize("group", [1, 2], ids=["group1", "group2"])
@pytest.mark.parametrize("dims", [1, 2], ids=["1d", "2d"])
def test_conv_transpose_bn(dims: int, group: int, bias: bool, geometry: str) -> None:
    fold_and_check(conv_transpose_model(dims, group, bias, geometry))


# --- Gemm -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("c_kind", list(C_KINDS))
@pytest.mark.parametrize("alpha, beta", [(1.0, 1.0), (0.5, 2.0)], ids=["alpha1-beta1", "alpha0.5-beta2"])
@pytest.mark.parametrize("trans_b", [0, 1], ids=["transB0", "transB1"])
@pytest.mark.parametrize("trans_a", [0, 1], ids=["transA0", "transA1"])
def test_gemm_bn(trans_a: int, trans_b: int, alpha: float, beta: float, c_kind: str) -> None:
    result = fold_and_check(gemm_model(trans_a, trans_b, alpha, beta, c_kind))
    gemm = result.model.graph.node[0]
    # alpha and beta live inside B and C now: the folded Gemm must not apply them again.
    assert get_attr(gemm, "alpha", 1.0) == 1.0 and get_attr(gemm, "beta", 1.0) == 1.0
    assert get_attr(gemm, "transA", 0) == trans_a and get_attr(gemm, "transB", 0) == trans_b


# --- MatMul ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("with_add", [False, True], ids=["matmul-bn", "matmul-add-bn"])
def test_matmul_bn_becomes_gemm(with_add: bool) -> None:
    built = matmul_model(with_add)
    result = fold_and_check(built)
    gemm = result.model.graph.node[0]
    assert "Add" not in op_types(result.model)
    assert list(gemm.input[:1]) == ["x"]
    assert get_attr(gemm, "transA", 0) == 0 and get_attr(gemm, "transB", 0) == 0


# --- dtypes ---------------------------------------------------------------------------------------

LAYER_FACTORIES: dict[str, Callable[..., Built]] = {
    "conv": lambda **kw: conv_model(2, "grouped", True, "strided-padded-dilated", **kw),
    "conv_transpose": lambda **kw: conv_transpose_model(2, 2, True, "strided-output-padding", **kw),
    "gemm": lambda **kw: gemm_model(0, 1, 0.5, 2.0, "[N]", **kw),
    "matmul": lambda **kw: matmul_model(True, **kw),
}


@pytest.mark.parametrize("dtype", [F32, F64, F16], ids=["float32", "float64", "float16"])
@pytest.mark.parametrize("layer", list(LAYER_FACTORIES))
def test_dtypes(layer: str, dtype: np.dtype) -> None:
    built = LAYER_FACTORIES[layer](dtype=dtype)
    result = fold_and_check(built)
    assert all(numpy_helper.to_array(t).dtype == dtype for t in result.model.graph.initializer)


@pytest.mark.parametrize("layer", list(LAYER_FACTORIES))
def test_bfloat16(layer: str) -> None:
    """onnxruntime's CPU provider has no bfloat16 Conv/Gemm/MatMul kernels: fold_and_check then
    compares the written weights with float64 and runs both models in onnx's reference evaluator."""
    opset = 22 if layer.startswith("conv") else 17  # Conv/ConvTranspose accept bfloat16 from opset 22
    built = LAYER_FACTORIES[layer](dtype=BF16, opset=opset)
    result = fold_and_check(built)
    assert all(numpy_helper.to_array(t).dtype == BF16 for t in result.model.graph.initializer)


# --- BN opsets ------------------------------------------------------------------------------------


@pytest.mark.parametrize("opset", [7, 9, 14, 15])
@pytest.mark.parametrize("layer", ["conv", "gemm", "matmul"])
def test_bn_opsets(layer: str, opset: int) -> None:
    result = fold_and_check(LAYER_FACTORIES[layer](opset=opset))
    assert [(o.domain, o.version) for o in result.model.opset_import] == [("", opset)]


@pytest.mark.parametrize("layer", ["conv", "conv_transpose", "gemm", "matmul"])
def test_bn15_float32_params_on_float16_data(layer: str) -> None:
    """BN-15 lets scale/B/mean/var be float32 while X is float16: the folded weights must still be
    float16 (the layer's type), or the model is invalid."""
    if layer == "conv_transpose":  # the factory has no BN dtype knob: build it here
        g = GraphBuilder(np.random.default_rng(0), dtype=F16, opset=15)
        x = g.input("x", [2, 4, 4, 3])
        y = g.conv_transpose(x, 4, 6, group=2, strides=[2, 2], output_padding=[1, 1])
        built = finish(g, y, 1, 6, ["ConvTranspose"], bn_param_dtype=F32)
    else:
        built = LAYER_FACTORIES[layer](dtype=F16, opset=15, bn_param_dtype=F32)
    bn = find_node(built.model, built.bns[0])
    assert {initializers(built.model)[i].dtype for i in bn.input[1:]} == {F32}
    result = fold_and_check(built)
    onnx.checker.check_model(result.model, full_check=True)
    for name in result.model.graph.node[-1].input[1:]:
        assert initializers(result.model)[name].dtype == F16


# --- chains ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("bn_count", [2, 3])
@pytest.mark.parametrize("layer", ["conv", "gemm"])
def test_chain_of_bns_folds_completely(layer: str, bn_count: int) -> None:
    if layer == "conv":
        built = conv_model(2, "group1", True, "default", bn_count=bn_count)
    else:
        built = gemm_model(1, 0, 0.5, 2.0, "[1,N]", bn_count=bn_count)
    result = fold_and_check(built)
    assert len([r for r in result.report.folded if r.op_type == "BatchNormalization"]) == bn_count


# --- idempotence ----------------------------------------------------------------------------------


IDEMPOTENCE_CASES: dict[str, Callable[[], Built]] = {
    "conv": lambda: conv_model(2, "depthwise", False, "same_upper"),
    "conv-bn-bn": lambda: conv_model(1, "grouped", True, "default", bn_count=2),
    "conv_transpose": lambda: conv_transpose_model(2, 2, False, "strided-output-padding"),
    "gemm": lambda: gemm_model(1, 1, 0.5, 2.0, "scalar"),
    "matmul-add": lambda: matmul_model(True),
    "float16": lambda: conv_model(2, "group1", True, "default", dtype=F16),
}


@pytest.mark.parametrize("case", list(IDEMPOTENCE_CASES))
def test_folding_twice_changes_nothing(case: str) -> None:
    first = fold_and_check(IDEMPOTENCE_CASES[case]())
    first_bytes = first.model.SerializeToString()
    second = bnfold.fold(first.model)
    assert second.report.folded == []
    assert second.report.passes == 0
    assert second.report.verification is not None and second.report.verification.passed
    assert second.model.SerializeToString() == first_bytes
    assert first.model.SerializeToString() == first_bytes


# --- what the fold keeps --------------------------------------------------------------------------


KEEP_CASES: dict[str, Callable[[], Built]] = {
    "conv": lambda: conv_model(2, "group1", True, "strided-padded-dilated"),
    "conv_transpose": lambda: conv_transpose_model(2, 1, True, "plain"),
    "gemm": lambda: gemm_model(0, 1, 0.5, 2.0, "[N]"),
    "matmul": lambda: matmul_model(False),
}


@pytest.mark.parametrize("case", list(KEEP_CASES))
def test_names_doc_strings_metadata_opset_ir_are_kept(case: str) -> None:
    built = KEEP_CASES[case]()
    model = built.model
    model.ir_version = 9
    model.producer_name = "hand-built"
    model.producer_version = "1.2.3"
    model.domain = "org.example"
    model.model_version = 42
    model.doc_string = "model doc"
    model.graph.doc_string = "graph doc"
    helper.set_model_props(model, {"author": "tests", "license": "MIT"})
    layer = find_node(model, built.layer)
    layer.doc_string = "the layer"
    before_opsets = [(o.domain, o.version) for o in model.opset_import]

    result = fold_and_check(built)
    folded = result.model

    assert folded.ir_version == 9
    assert [(o.domain, o.version) for o in folded.opset_import] == before_opsets
    assert (folded.producer_name, folded.producer_version, folded.domain, folded.model_version) == (
        "hand-built", "1.2.3", "org.example", 42)
    assert folded.doc_string == "model doc" and folded.graph.doc_string == "graph doc"
    assert {p.key: p.value for p in folded.metadata_props} == {"author": "tests", "license": "MIT"}
    assert folded.graph.name == model.graph.name
    new_layer = find_node(folded, built.layer)
    assert new_layer.doc_string == "the layer"
    assert list(new_layer.input[:1]) == list(layer.input[:1])
    assert list(new_layer.output) == [find_node(model, built.bns[-1]).output[0]]


def test_unshared_weight_is_overwritten_under_its_own_name() -> None:
    built = conv_model(2, "group1", True, "default")
    layer = find_node(built.model, built.layer)
    result = fold_and_check(built)
    assert list(result.model.graph.node[0].input) == list(layer.input)
    assert len(result.model.graph.initializer) == 2


def test_shared_weight_gets_a_new_initializer() -> None:
    """Two Convs read one weight; only one is followed by a BN. The folded Conv gets a new, uniquely
    named weight; the other still reads the original name and values."""
    g = GraphBuilder(np.random.default_rng(3))
    x = g.input("x", [2, 3, 6, 6])
    weight_values = g.weights(4, 3, 3, 3)
    weight = g.const(weight_values, "w")
    bias = g.const(g.rng.normal(size=4), "b")
    folded_conv = g.node("Conv", [x, weight, bias], pads=[1, 1, 1, 1])
    y = g.bn(folded_conv, 4)
    plain_conv = g.node("Conv", [x, weight, bias], pads=[1, 1, 1, 1])
    model = g.model([y, plain_conv])
    original_weight = initializers(model)[weight]
    names_before = {t.name for t in model.graph.initializer} | {n for node in model.graph.node for n in
                                                              [*node.input, *node.output]}

    result = bnfold.fold(model)
    folded = result.model

    assert op_types(folded) == ["Conv", "Conv"]
    values = initializers(folded)
    new_conv = find_node(folded, node_name(folded_conv))
    old_conv = find_node(folded, node_name(plain_conv))
    assert list(old_conv.input) == [x, weight, bias]
    np.testing.assert_array_equal(values[weight], original_weight)
    new_weight, new_bias = new_conv.input[1], new_conv.input[2]
    assert new_weight not in names_before and new_bias not in names_before
    assert len({t.name for t in folded.graph.initializer}) == len(folded.graph.initializer) == 4
    scale, shift = bn_scale_shift(model, [node_name(y)])
    assert_rounded_once(values[new_weight], original_weight.astype(np.float64) * scale[:, None, None, None],
                        F32, new_weight)
    assert_rounded_once(values[new_bias], initializers(model)[bias].astype(np.float64) * scale + shift, F32,
                        new_bias)
    assert new_conv.output[0] == y
    feeds = random_feeds(model)
    for got, want in zip(run(folded, feeds), run(model, feeds), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    assert result.report.verification is not None and result.report.verification.passed
    assert [(r.node, r.into) for r in result.report.folded] == [(node_name(y), [node_name(folded_conv)])]


def test_bn_params_shared_with_another_bn_are_kept_for_it() -> None:
    """A BN parameter initializer is dropped only when nothing reads it any more."""
    g = GraphBuilder(np.random.default_rng(5))
    x = g.input("x", [2, 3, 5, 5])
    params = g.bn_params(4)
    conv = g.conv(x, 3, 4)
    y = g.node("BatchNormalization", [conv, *params], "bn", epsilon=1e-5)
    other = g.node("BatchNormalization", [g.relu(g.conv(x, 3, 4)), *params], "bn", epsilon=1e-5)
    model = g.model([y, other])

    result = bnfold.fold(model)

    assert op_types(result.model).count("BatchNormalization") == 1
    assert set(params) <= {t.name for t in result.model.graph.initializer}
    assert [r.node for r in result.report.folded] == [node_name(y)]
    feeds = random_feeds(model)
    for got, want in zip(run(result.model, feeds), run(model, feeds), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_ulp_helper_matches_numpy_spacing() -> None:
    values = np.array([1.0, 1.5, 3.0, 1e-3, 6e4, 1e-6])
    for dtype in (F16, F32, F64):
        cast = values.astype(dtype)
        np.testing.assert_array_equal(ulp(cast.astype(np.float64), dtype), np.spacing(cast).astype(np.float64))
    assert ulp(np.array([1.0]), BF16)[0] == 2.0**-7
    assert math.isclose(ulp(np.array([1e-40]), BF16)[0], 2.0**-133)


@pytest.mark.parametrize("geometry", ["plain", "strided-output-padding"])
def test_reference_runner_matches_onnxruntime_on_grouped_conv_transpose(geometry: str) -> None:
    """The reference-evaluator fallback (used where onnxruntime has no kernel) agrees with onnxruntime."""
    built = conv_transpose_model(2, 2, True, geometry)
    feeds = random_feeds(built.model)
    for got, want in zip(run_reference(built.model, feeds), run(built.model, feeds), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
