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
from dataclasses import dataclass, field
from typing import Any

import ml_dtypes
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from helpers import op_types, random_feeds, run
from onnx import helper, numpy_helper
from onnx.reference import ReferenceEvaluator
from onnx.reference.ops.op_conv_transpose import ConvTranspose as _ReferenceConvTranspose

import bnfold
from benchmarks.graph_builder import GraphBuilder
from bnfold.api import FoldResult

BF16 = np.dtype(ml_dtypes.bfloat16)
F16 = np.dtype(np.float16)
F32 = np.dtype(np.float32)
F64 = np.dtype(np.float64)

# Output tolerances (rtol, atol) for original-vs-folded, per data dtype. Outputs are O(1).
OUTPUT_TOLERANCES: dict[str, tuple[float, float]] = {
    "float32": (1e-5, 1e-5),
    "float64": (1e-12, 1e-12),
    "float16": (5e-3, 5e-3),
    "bfloat16": (4e-2, 4e-2),
}


# --- model construction ---------------------------------------------------------------------------


@dataclass
class Built:
    """A model with one layer followed by BN(s), and the names the checks need."""

    model: onnx.ModelProto
    layer: str  # node name of the layer
    bns: list[str]  # BN node names, in data order
    expected_ops: list[str]  # op types of the folded model
    post_bias_add: str | None = None  # node name of an Add(bias) between a MatMul and its BN
    extra: dict = field(default_factory=dict)


def node_name(output: str) -> str:
    """GraphBuilder names every node after its first output."""
    return output + "_node"


def finish(g: GraphBuilder, layer_out: str, bn_count: int, channels: int, expected_ops: list[str],
           bn_param_dtype: np.dtype | None = None, post_bias_add: str | None = None,
           source: str | None = None) -> Built:
    y = source or layer_out
    bns = []
    for _ in range(bn_count):
        y = g.bn(y, channels, epsilon=1e-3, param_dtype=bn_param_dtype)
        bns.append(node_name(y))
    return Built(g.model([y]), node_name(layer_out), bns, expected_ops, post_bias_add)


def conv_model(dims: int, group_kind: str, bias: bool, geometry: str, dtype: np.dtype = F32, opset: int = 17,
               bn_count: int = 1, seed: int = 0, bn_param_dtype: np.dtype | None = None) -> Built:
    c_in, c_out, group = {"group1": (3, 4, 1), "grouped": (4, 6, 2), "depthwise": (4, 4, 4)}[group_kind]
    sizes = {1: [9], 2: [7, 6], 3: [5, 5, 4]}[dims]
    attrs: dict = {
        "default": {},
        "strided-padded-dilated": {"strides": [2] * dims, "dilations": [2] + [1] * (dims - 1),
                                   "pads": {1: [1, 2], 2: [1, 0, 2, 1], 3: [1, 1, 0, 0, 1, 1]}[dims]},
        "same_upper": {"auto_pad": "SAME_UPPER", "strides": [2] * dims},
        "valid": {"auto_pad": "VALID", "strides": [1] + [2] * (dims - 1)},
    }[geometry]
    g = GraphBuilder(np.random.default_rng(seed), dtype=dtype, opset=opset)
    x = g.input("x", [2, c_in, *sizes])
    y = g.conv(x, c_in, c_out, kernel=3, group=group, bias=bias, dims=dims, **attrs)
    return finish(g, y, bn_count, c_out, ["Conv"], bn_param_dtype)


def conv_transpose_model(dims: int, group: int, bias: bool, geometry: str, dtype: np.dtype = F32,
                         opset: int = 17, seed: int = 0) -> Built:
    c_in, c_out = (3, 4) if group == 1 else (4, 6)
    sizes = {1: [5], 2: [4, 3]}[dims]
    attrs: dict = {
        "plain": {},
        "strided-output-padding": {"strides": [2] * dims, "output_padding": [1] * dims, "pads": [1] * (2 * dims)},
    }[geometry]
    g = GraphBuilder(np.random.default_rng(seed), dtype=dtype, opset=opset)
    x = g.input("x", [2, c_in, *sizes])
    y = g.conv_transpose(x, c_in, c_out, kernel=3, group=group, bias=bias, dims=dims, **attrs)
    return finish(g, y, 1, c_out, ["ConvTranspose"])


GEMM_M, GEMM_K, GEMM_N = 5, 3, 4
C_KINDS: dict[str, tuple | None] = {"absent": None, "scalar": (), "[N]": (GEMM_N,), "[1,N]": (1, GEMM_N),
                                    "[M,N]": (GEMM_M, GEMM_N)}


def gemm_model(trans_a: int, trans_b: int, alpha: float, beta: float, c_kind: str, dtype: np.dtype = F32,
               opset: int = 17, bn_count: int = 1, seed: int = 0, bn_param_dtype: np.dtype | None = None) -> Built:
    g = GraphBuilder(np.random.default_rng(seed), dtype=dtype, opset=opset)
    x = g.input("x", [GEMM_K, GEMM_M] if trans_a else [GEMM_M, GEMM_K])
    attrs = {"transA": trans_a}
    if alpha != 1.0:
        attrs["alpha"] = alpha
    if beta != 1.0:
        attrs["beta"] = beta
    y = g.gemm(x, GEMM_K, GEMM_N, trans_b=trans_b, c_shape=C_KINDS[c_kind], **attrs)
    return finish(g, y, bn_count, GEMM_N, ["Gemm"], bn_param_dtype)


def matmul_model(with_add: bool, dtype: np.dtype = F32, opset: int = 17, seed: int = 0,
                 bn_param_dtype: np.dtype | None = None) -> Built:
    g = GraphBuilder(np.random.default_rng(seed), dtype=dtype, opset=opset)
    x = g.input("x", [5, 3])
    y = g.matmul(x, 3, 4)
    source = None
    add = None
    if with_add:
        source = g.node("Add", [y, g.const(g.rng.normal(size=4), "bias")])
        add = node_name(source)
    return finish(g, y, 1, 4, ["Gemm"], bn_param_dtype, post_bias_add=add, source=source)


# --- independent float64 recomputation of the folded parameters ----------------------------------


def initializers(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def find_node(model: onnx.ModelProto, name: str) -> onnx.NodeProto:
    matches = [n for n in model.graph.node if n.name == name]
    assert len(matches) == 1, f"{len(matches)} nodes named {name!r}"
    return matches[0]


def get_attr(node: onnx.NodeProto, name: str, default: Any) -> Any:
    for attr in node.attribute:
        if attr.name == name:
            return helper.get_attribute_value(attr)
    return default


def bn_scale_shift(model: onnx.ModelProto, bn_names: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Composed (scale, shift) of the BNs in data order, from y = g*(x-m)/sqrt(v+e)+b, in float64."""
    values = initializers(model)
    scale: np.ndarray | None = None
    shift: np.ndarray | None = None
    for name in bn_names:
        bn = find_node(model, name)
        gamma, beta, mean, var = (values[i].astype(np.float64) for i in bn.input[1:5])
        eps = float(np.float32(get_attr(bn, "epsilon", 1e-5)))
        s = gamma / np.sqrt(var + eps)
        t = beta - mean * s
        scale, shift = (s, t) if scale is None else (scale * s, shift * s + t)
    assert scale is not None and shift is not None
    return scale, shift


def expected_parameters(built: Built) -> list[np.ndarray]:
    """Folded (weight, bias) computed here in float64 from the original model's initializers."""
    model = built.model
    values = initializers(model)
    layer = find_node(model, built.layer)
    scale, shift = bn_scale_shift(model, built.bns)
    weight = values[layer.input[1]].astype(np.float64)
    bias = values[layer.input[2]].astype(np.float64) if len(layer.input) > 2 and layer.input[2] else None
    if layer.op_type == "Conv":
        out_shape = (-1,) + (1,) * (weight.ndim - 1)
        return [weight * scale.reshape(out_shape), (0.0 if bias is None else bias) * scale + shift]
    if layer.op_type == "ConvTranspose":
        group = get_attr(layer, "group", 1)
        new_weight = weight.copy()
        in_per_group, out_per_group = weight.shape[0] // group, weight.shape[1]
        for c in range(weight.shape[0]):
            for j in range(out_per_group):
                new_weight[c, j] *= scale[(c // in_per_group) * out_per_group + j]
        return [new_weight, (0.0 if bias is None else bias) * scale + shift]
    if layer.op_type == "Gemm":
        alpha, beta = get_attr(layer, "alpha", 1.0), get_attr(layer, "beta", 1.0)
        trans_b = get_attr(layer, "transB", 0)
        new_b = alpha * weight * (scale[:, None] if trans_b else scale[None, :])
        new_c = shift if bias is None else beta * bias * scale + shift
        return [new_b, new_c]
    assert layer.op_type == "MatMul"
    if built.post_bias_add is not None:
        add = find_node(model, built.post_bias_add)
        bias = values[add.input[1]].astype(np.float64)
    return [weight * scale[None, :], (0.0 if bias is None else bias) * scale + shift]


def ulp(values: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """Spacing of `dtype` at |values| (the spacing of the binade each value lies in)."""
    info = ml_dtypes.finfo(dtype) if dtype == BF16 else np.finfo(dtype)
    _, exponent = np.frexp(np.abs(values))  # |v| = m * 2**exponent, 0.5 <= m < 1
    return np.ldexp(1.0, np.maximum(exponent - 1, info.minexp) - info.nmant)


def assert_rounded_once(written: np.ndarray, expected: np.ndarray, dtype: np.dtype, label: str) -> None:
    """`written` is `expected` rounded to nearest in `dtype` (<= 0.5 ulp; float64: a few ulp of
    evaluation-order difference)."""
    assert written.dtype == dtype, f"{label}: written as {written.dtype}, layer dtype is {dtype}"
    assert written.shape == np.shape(expected), f"{label}: shape {written.shape} != {np.shape(expected)}"
    error = np.abs(written.astype(np.float64) - expected)
    if dtype == F64:
        limit = 8 * ulp(expected, dtype)
    else:
        limit = 0.5 * ulp(expected, dtype) + 1e-12 * np.abs(expected)
    worst = float((error / limit).max(initial=0.0))
    assert worst <= 1.0, f"{label}: off by {worst:.3g} x the allowed rounding error"


# --- running --------------------------------------------------------------------------------------


def ort_can_run(model: onnx.ModelProto) -> bool:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 3
    try:
        ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    except Exception as error:
        if "NOT_IMPLEMENTED" not in str(error):
            raise
        return False
    return True


class ConvTranspose(_ReferenceConvTranspose):
    """onnx's reference ConvTranspose slices a grouped weight along the wrong axis (onnx 1.23): run
    each group separately with group=1 instead. Weight [C_in, C_out/g, k...]: group g reads input
    channels and weight rows g*C_in/g.., and writes output channels g*C_out/g.."""

    op_domain = ""

    def _run(self, X: np.ndarray, W: np.ndarray, B: np.ndarray | None = None, group: int | None = None,
             **attributes: Any) -> tuple[np.ndarray]:
        group = group or 1
        if group == 1:
            return super()._run(X, W, B, group=1, **attributes)
        in_per_group, out_per_group = X.shape[1] // group, W.shape[1]
        outputs = []
        for g in range(group):
            rows = slice(g * in_per_group, (g + 1) * in_per_group)
            bias = None if B is None else B[g * out_per_group:(g + 1) * out_per_group]
            outputs.append(super()._run(X[:, rows], W[rows], bias, group=1, **attributes)[0])
        return (np.concatenate(outputs, axis=1),)


def run_reference(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    return list(ReferenceEvaluator(model, new_ops=[ConvTranspose]).run(None, feeds))


Runner = Callable[[onnx.ModelProto, dict[str, np.ndarray]], list[np.ndarray]]


def data_dtype(model: onnx.ModelProto) -> np.dtype:
    return helper.tensor_dtype_to_np_dtype(model.graph.input[0].type.tensor_type.elem_type)


# --- the shared check -----------------------------------------------------------------------------


def fold_and_check(built: Built) -> FoldResult:
    """Fold `built.model` and check everything a backward fold must guarantee."""
    model = built.model
    dtype = data_dtype(model)
    runnable = ort_can_run(model)
    before = model.SerializeToString()

    result = bnfold.fold(model, raise_on_failure=runnable)
    folded = result.model

    assert model.SerializeToString() == before, "the input model was mutated"
    # 1. structure: BN gone, exactly the expected ops left.
    assert op_types(folded) == built.expected_ops
    # 2. the folded layer produces the (last) BN's output name, which is still the graph output.
    original_output = find_node(model, built.bns[-1]).output[0]
    assert [o.name for o in folded.graph.output] == [o.name for o in model.graph.output]
    assert folded.graph.node[-1].output[0] == original_output
    assert folded.graph.node[-1].name == built.layer
    # 3. BN parameters (and a folded Add's bias) are no longer initializers.
    gone = {i for name in built.bns for i in find_node(model, name).input[1:]}
    if built.post_bias_add is not None:
        gone.add(find_node(model, built.post_bias_add).input[1])
    assert gone.isdisjoint(t.name for t in folded.graph.initializer)
    assert {t.name for t in folded.graph.initializer} == set(folded.graph.node[-1].input[1:])
    # 4. the written parameters equal the float64 recomputation, rounded once to the layer's dtype.
    written = initializers(folded)
    layer_dtype = initializers(model)[find_node(model, built.layer).input[1]].dtype
    folded_inputs = list(folded.graph.node[-1].input[1:])
    expected = expected_parameters(built)
    assert len(folded_inputs) == len(expected)
    for name, values in zip(folded_inputs, expected):
        assert_rounded_once(written[name], values, layer_dtype, name)
    # 5. the report names each BN and the layer it went into.
    records = {r.node: r for r in result.report.folded}
    for bn in built.bns:
        assert bn in records, f"{bn} not reported as folded: {result.report.folded}"
        record = records[bn]
        assert (record.op_type, record.output, record.into, record.direction) == (
            "BatchNormalization", find_node(model, bn).output[0], [built.layer], "backward")
    assert not [r for r in result.report.skipped if r.op_type == "BatchNormalization"]
    # 6. bnfold's own verification passed, with <= 1 ulp on every written tensor.
    verification = result.report.verification
    assert verification is not None and verification.checker_passed and verification.analytic_passed
    assert verification.tensors and max(t.max_ulp_error for t in verification.tensors) <= 1.0
    if runnable:
        assert verification.passed and verification.runtime_status == "passed"
    onnx.checker.check_model(folded, full_check=True)
    # 7. outputs match the original's (onnxruntime, optimizations off; else onnx's reference evaluator).
    runner: Runner = run if runnable else run_reference
    feeds = random_feeds(model, seed=7)
    rtol, atol = OUTPUT_TOLERANCES[dtype.name]
    for got, want in zip(runner(folded, feeds), runner(model, feeds), strict=True):
        assert got.dtype == want.dtype == dtype
        np.testing.assert_allclose(got.astype(np.float64), want.astype(np.float64), rtol=rtol, atol=atol)
    return result


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
