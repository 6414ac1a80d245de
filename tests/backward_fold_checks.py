"""What the backward-fold tests build and check: layer -> BN models of every kind, geometry and dtype,
an independent float64 recomputation of the folded parameters (rounded once into the dtype), and
`fold_and_check`, which folds through the public API and checks the result against both."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import ml_dtypes
import numpy as np
import onnx
import onnxruntime as ort
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


GEMM_M, GEMM_K, GEMM_N = 5, 3, 4


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
