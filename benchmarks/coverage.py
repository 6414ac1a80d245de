"""Fold coverage: which BatchNormalization nodes does each tool remove, and is its output still right?

    /work/benchvenv/bin/python -m benchmarks.coverage      # writes benchmarks/COVERAGE_RESULTS.md

Small models (channels <= 16, spatial <= 16) of families seen in real converted exports are built with
onnx.helper + numpy from fixed seeds. Each one goes through bnfold (`python -m bnfold MODEL -o OUT
--json`, verification on) and through the other tools exactly as `benchmarks/children.py` runs them for
`run.py --compare` (onnxruntime offline optimizer at ORT_ENABLE_BASIC, onnxsim.simplify, onnxslim.slim,
onnxoptimizer ["fuse_bn_into_conv"]), each in its own process with a timeout. Every output (and the
original) is then inspected in another child process: op counts (subgraphs included), onnx.checker
with full_check=True, and one onnxruntime CPU run with graph optimizations DISABLED on the same seeded
uniform(-1, 1) inputs; the parent compares outputs with the original's.

Nothing here depends on wall time: the same installed packages give the same file.
"""
from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import subprocess
import sys
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import numpy.typing as npt
import onnx
from onnx import TensorProto, helper, numpy_helper

HERE = Path(__file__).resolve().parent
if not __package__:  # run as a script, not with -m: make the checkout's `benchmarks` package importable
    sys.path.insert(0, str(HERE.parent))
from benchmarks import children as ch  # noqa: E402  (tool invocation code shared with run.py --compare)
from benchmarks.graph_builder import GraphBuilder  # noqa: E402
from benchmarks.measure import child_env, py, run_child  # noqa: E402

TIMEOUT_S = 120.0
SEED = 0
AFFINE_OPS = ("Mul", "Add", "Sub", "Div")
BNFOLD = "**bnfold**"
ORIGINAL = "original"
# An output "matches" when max|out - orig| / max|orig| is at most this (per output dtype).
MATCH_REL = {np.dtype(np.float32): 1e-4, np.dtype(np.float16): 1e-2}

# Child that inspects one model: op counts, full checker, one ORT run (optimizations off) per feed.
EVAL = r"""
import json, sys
from collections import Counter
import numpy as np, onnx
path, feeds_path, out_path, engine = sys.argv[1:5]
def line(e):
    s = str(e).strip().splitlines()
    return (type(e).__name__ + ": " + (s[0] if s else ""))[:160]
res = {}
m = onnx.load(path)
ops = Counter()
def walk(g):
    for n in g.node:
        ops[n.op_type] += 1
        for a in n.attribute:
            if a.type == onnx.AttributeProto.GRAPH:
                walk(a.g)
            for sub in a.graphs:
                walk(sub)
walk(m.graph)
res["ops"] = dict(ops)
try:
    onnx.checker.check_model(m, full_check=True)
    res["checker"] = "ok"
except Exception as e:
    res["checker"] = line(e)
try:
    if engine == "onnxruntime":
        import onnxruntime as ort
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        s = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
        names = {i.name for i in s.get_inputs()}
    else:
        from onnx.reference import ReferenceEvaluator
        s = ReferenceEvaluator(m)
        names = set(s.input_names)
    outs = {}
    with np.load(feeds_path) as f:
        n_feeds = int(f["n_feeds"])
        for k in range(n_feeds):
            prefix = f"f{k}__"
            feed = {key[len(prefix):]: f[key] for key in f.files if key.startswith(prefix)}
            feed = {key: v for key, v in feed.items() if key in names}
            for j, y in enumerate(s.run(None, feed)):
                outs[f"f{k}__o{j}"] = y
    np.savez(out_path, **outs)
    res["ort"] = "ok"
except Exception as e:
    res["ort"] = line(e)
print(json.dumps(res))
"""


# ---------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------

# The coverage models' own layer recipes on the shared builder: tensors named after their layer
# (`b0.conv.w`, `b0.bn.scale`), nodes after their output. These statistics (BN scales of either sign)
# are the ones COVERAGE_RESULTS.md was measured with.


def weight(g: GraphBuilder, shape: tuple[int, ...], fan_in: int, dtype: npt.DTypeLike = np.float32) -> np.ndarray:
    return g.weights(*shape, scale=1.0 / np.sqrt(fan_in)).astype(dtype)


def bn_statistics(rng: np.random.Generator, c: int, dtype: npt.DTypeLike = np.float32) -> list[np.ndarray]:
    """Scale (either sign), bias, mean, variance of a BN over `c` channels."""
    gamma = rng.uniform(0.5, 1.5, c) * rng.choice([-1.0, 1.0], c)
    return [a.astype(dtype) for a in (gamma, rng.uniform(-0.5, 0.5, c), rng.uniform(-0.5, 0.5, c),
                                      rng.uniform(0.5, 2.0, c))]


def bn(g: GraphBuilder, x: str, c: int, tag: str, dtype: npt.DTypeLike = np.float32, eps: float = 1e-5) -> str:
    names = [g.initializer(f"{tag}.{p}", a)
             for p, a in zip(("scale", "bias", "mean", "var"), bn_statistics(g.rng, c, dtype))]
    return g.node("BatchNormalization", [x, *names], output=tag, epsilon=eps)


def conv(g: GraphBuilder, x: str, cin: int, cout: int, tag: str, k: int = 3, pad: int = 1,
         dtype: npt.DTypeLike = np.float32, bias: bool = True) -> str:
    w = g.initializer(f"{tag}.w", weight(g, (cout, cin, k, k), cin * k * k, dtype))
    ins = [x, w]
    if bias:
        ins.append(g.initializer(f"{tag}.b", (0.1 * g.rng.standard_normal(cout)).astype(dtype)))
    return g.node("Conv", ins, output=tag, kernel_shape=[k, k], pads=[pad] * 4)


def builder(seed: int, opset: int = 13) -> GraphBuilder:
    return GraphBuilder(np.random.default_rng(seed), opset=opset)


def finish(g: GraphBuilder, inputs: list[onnx.ValueInfoProto], outputs: list[onnx.ValueInfoProto], ir: int = 8,
           initializers_as_inputs: bool = False) -> onnx.ModelProto:
    """The model of `g` with these graph inputs and outputs (declared, no shape inference), fully checked."""
    g.inputs += inputs
    return g.model(outputs, ir_version=ir, extra_inputs=g.initializer_inputs() if initializers_as_inputs else (),
                   infer_shapes=False, graph_name="g", producer_name="bnfold-coverage")


def vi(name: str, shape, dtype=TensorProto.FLOAT):
    return helper.make_tensor_value_info(name, dtype, shape)


def caffe2_affine(channel_shape: str) -> onnx.ModelProto:
    """Conv → BN → Mul(const) → Add(const) → Relu, 3 blocks (Caffe2 AffineChannel exports), opset 9."""
    b = builder(1, opset=9)
    x, cin = "x", 3
    for i, c in enumerate((8, 12, 16)):
        y = bn(b, conv(b, x, cin, c, f"b{i}.conv"), c, f"b{i}.bn")
        shape = (1, c, 1, 1) if channel_shape == "1C11" else (c, 1, 1)
        mul = b.initializer(f"b{i}.mul.c", b.rng.uniform(0.5, 1.5, shape).astype(np.float32))
        add = b.initializer(f"b{i}.add.c", b.rng.uniform(-0.5, 0.5, shape).astype(np.float32))
        y = b.node("Mul", [y, mul], output=f"b{i}.mul")
        y = b.node("Add", [y, add], output=f"b{i}.add")
        x, cin = b.node("Relu", [y], output=f"b{i}.relu" if i < 2 else "y"), c
    return finish(b, [vi("x", [1, 3, 16, 16])], [vi("y", [1, 16, 16, 16])], ir=4)


def trap_mul_c_on_w() -> onnx.ModelProto:
    """Conv → Mul by a [C] constant on NCHW with C == W: broadcasts over W, not channels."""
    b = builder(2)
    y = conv(b, "x", 3, 8, "conv")
    m = b.initializer("mul.c", b.rng.uniform(0.5, 1.5, 8).astype(np.float32))
    y = b.node("Mul", [y, m], output="mul")
    b.node("Relu", [y], output="y")
    return finish(b, [vi("x", [1, 3, 6, 8])], [vi("y", [1, 8, 6, 8])])


def ir3_inits_as_inputs() -> onnx.ModelProto:
    """IR version 3, opset 7, every initializer also a graph input (old model-zoo style)."""
    b = builder(3, opset=7)
    x, cin = "x", 3
    for i, c in enumerate((8, 16)):
        y = bn(b, conv(b, x, cin, c, f"b{i}.conv"), c, f"b{i}.bn")
        x, cin = b.node("Relu", [y], output=f"b{i}.relu" if i < 1 else "y"), c
    return finish(b, [vi("x", [1, 3, 16, 16])], [vi("y", [1, 16, 16, 16])], ir=3, initializers_as_inputs=True)


def mlp_bn1d() -> onnx.ModelProto:
    """[N, F] → BN → Gemm(transB=1) → Relu → BN → MatMul(const) → Add(const)."""
    b = builder(4)
    y = bn(b, "x", 16, "bn0")
    w = b.initializer("fc1.w", weight(b, (12, 16), 16))
    bias = b.initializer("fc1.b", (0.1 * b.rng.standard_normal(12)).astype(np.float32))
    y = b.node("Gemm", [y, w, bias], output="fc1", transB=1)
    y = b.node("Relu", [y], output="relu")
    y = bn(b, y, 12, "bn1")
    w2 = b.initializer("fc2.w", weight(b, (12, 8), 12))
    b2 = b.initializer("fc2.b", (0.1 * b.rng.standard_normal(8)).astype(np.float32))
    y = b.node("MatMul", [y, w2], output="fc2")
    b.node("Add", [y, b2], output="y")
    return finish(b, [vi("x", [4, 16])], [vi("y", [4, 8])])


def bn_on_input(pad: int) -> onnx.ModelProto:
    """Graph input → BN → 3x3 Conv (pads 0: forward-foldable; pads 1: not exact, must stay)."""
    b = builder(5 + pad)
    y = bn(b, "x", 4, "bn")
    y = conv(b, y, 4, 8, "conv", pad=pad)
    b.node("Relu", [y], output="y")
    s = 16 - 2 * (1 - pad)
    return finish(b, [vi("x", [1, 4, 16, 16])], [vi("y", [1, 8, s, s])])


def in_graph_constants() -> onnx.ModelProto:
    """Conv weight from a Constant node, BN parameters through Identity of initializers."""
    b = builder(7)
    w = weight(b, (8, 3, 3, 3), 27)
    b.nodes.append(helper.make_node("Constant", [], ["conv.w"], name="conv.w",
                                    value=numpy_helper.from_array(w, "conv.w")))
    bias = b.initializer("conv.b", (0.1 * b.rng.standard_normal(8)).astype(np.float32))
    y = b.node("Conv", ["x", "conv.w", bias], output="conv", kernel_shape=[3, 3], pads=[1, 1, 1, 1])
    params = []
    for p, a in zip(("scale", "bias", "mean", "var"), bn_statistics(b.rng, 8)):
        params.append(b.node("Identity", [b.initializer(f"bn.{p}.init", a)], output=f"bn.{p}"))
    y = b.node("BatchNormalization", [y, *params], output="bn")
    b.node("Relu", [y], output="y")
    return finish(b, [vi("x", [1, 3, 16, 16])], [vi("y", [1, 8, 16, 16])])


def gemm_alpha_beta() -> onnx.ModelProto:
    """Gemm(alpha=0.5, beta=2.0, transB=1) → BN → Relu."""
    b = builder(8)
    w = b.initializer("fc.w", weight(b, (12, 16), 16))
    c = b.initializer("fc.c", (0.1 * b.rng.standard_normal(12)).astype(np.float32))
    y = b.node("Gemm", ["x", w, c], output="fc", alpha=0.5, beta=2.0, transB=1)
    y = bn(b, y, 12, "bn")
    b.node("Relu", [y], output="y")
    return finish(b, [vi("x", [4, 16])], [vi("y", [4, 12])])


def bn_in_if_branches() -> onnx.ModelProto:
    """If(cond): both branches Conv → BN. Then-branch weights are the branch's own initializers,
    else-branch weights are outer-graph initializers read from the branch (outer scope)."""
    outer, then_b = builder(9), builder(10)
    bn(then_b, conv(then_b, "x", 4, 8, "then.conv"), 8, "then_out")
    then_g = helper.make_graph(then_b.nodes, "then", [], [vi("then_out", [1, 8, 8, 8])], then_b.initializers)
    else_b = builder(11)
    bn(else_b, conv(else_b, "x", 4, 8, "else.conv"), 8, "else_out")
    else_g = helper.make_graph(else_b.nodes, "else", [], [vi("else_out", [1, 8, 8, 8])])
    outer.initializers += else_b.initializers
    y = outer.node("If", ["cond"], output="if", then_branch=then_g, else_branch=else_g)
    outer.node("Relu", [y], output="y")
    return finish(outer, [vi("x", [1, 4, 8, 8]), vi("cond", [], TensorProto.BOOL)], [vi("y", [1, 8, 8, 8])])


def fp16_conv_fp32_bn() -> onnx.ModelProto:
    """float16 Conv → BatchNormalization-15 with float32 scale/B/mean/var → Relu, 2 blocks."""
    b = builder(12, opset=15)
    x, cin = "x", 3
    for i, c in enumerate((8, 16)):
        y = bn(b, conv(b, x, cin, c, f"b{i}.conv", dtype=np.float16), c, f"b{i}.bn", dtype=np.float32)
        x, cin = b.node("Relu", [y], output=f"b{i}.relu" if i < 1 else "y"), c
    return finish(b, [vi("x", [1, 3, 16, 16], TensorProto.FLOAT16)], [vi("y", [1, 16, 16, 16], TensorProto.FLOAT16)])


def linear_view_bn2d() -> onnx.ModelProto:
    """Gemm(transB=1) → Reshape to [N, C, 1, 1] → BatchNorm2d → Relu (Linear → view → BN2d)."""
    b = builder(13)
    w = b.initializer("fc.w", weight(b, (12, 16), 16))
    c = b.initializer("fc.b", (0.1 * b.rng.standard_normal(12)).astype(np.float32))
    y = b.node("Gemm", ["x", w, c], output="fc", transB=1)
    y = b.node("Reshape", [y, b.initializer("view.shape", np.array([-1, 12, 1, 1], np.int64))], output="view")
    b.node("Relu", [bn(b, y, 12, "bn")], output="y")
    return finish(b, [vi("x", [4, 16])], [vi("y", [4, 12, 1, 1])])


def matmul_transpose_bn1d() -> onnx.ModelProto:
    """[B, T, K] MatMul [K, C] → Transpose(0, 2, 1) → BatchNorm1d over C → Relu (sequence models)."""
    b = builder(14)
    y = b.node("MatMul", ["x", b.initializer("proj.w", weight(b, (16, 12), 16))], output="proj")
    y = b.node("Transpose", [y], output="to_nct", perm=[0, 2, 1])
    b.node("Relu", [bn(b, y, 12, "bn")], output="y")
    return finish(b, [vi("x", [2, 10, 16])], [vi("y", [2, 12, 10])])


def tf_nhwc_affine() -> onnx.ModelProto:
    """TF export: Conv → Transpose to NHWC → Mul by [C] → Add [C] (channels last) → Transpose back."""
    b = builder(15)
    y = b.node("Transpose", [conv(b, "x", 3, 8, "conv")], output="to_nhwc", perm=[0, 2, 3, 1])
    y = b.node("Mul", [y, b.initializer("bn.mul", b.rng.uniform(0.5, 1.5, 8).astype(np.float32))], output="bn_mul")
    y = b.node("Add", [y, b.initializer("bn.add", b.rng.uniform(-0.5, 0.5, 8).astype(np.float32))], output="bn_add")
    y = b.node("Transpose", [y], output="to_nchw", perm=[0, 3, 1, 2])
    b.node("Relu", [y], output="y")
    return finish(b, [vi("x", [1, 3, 8, 8])], [vi("y", [1, 8, 8, 8])])


def arcface_head() -> onnx.ModelProto:
    """ArcFace-style head: residual Add → BatchNorm2d → Flatten → Gemm(transB=1) → BatchNorm1d."""
    b = builder(17)
    y = b.node("Add", ["x", "x"], output="residual")
    y = b.node("Flatten", [bn(b, y, 8, "bn2")], output="flatten")
    w = b.initializer("fc.w", weight(b, (6, 8 * 3 * 3), 72))
    c = b.initializer("fc.b", (0.1 * b.rng.standard_normal(6)).astype(np.float32))
    y = b.node("Gemm", [y, w, c], output="fc", transB=1)
    bn(b, y, 6, "y")
    return finish(b, [vi("x", [2, 8, 3, 3])], [vi("y", [2, 6])])


def trap_reshape_moves_channels() -> onnx.ModelProto:
    """MatMul [4, 6]·[6, 6] → Reshape [2, 6, 2] → BN over 6 channels: after the reshape, axis 1 does
    NOT index the MatMul's output features (element (n, c) lands on channel (6n + c) // 2 mod 6)."""
    b = builder(16)
    y = b.node("MatMul", ["x", b.initializer("fc.w", weight(b, (6, 6), 6))], output="fc")
    y = b.node("Reshape", [y, b.initializer("shape", np.array([2, 6, 2], np.int64))], output="reshape")
    b.node("Relu", [bn(b, y, 6, "bn")], output="y")
    return finish(b, [vi("x", [4, 6])], [vi("y", [2, 6, 2])])


def repvgg_block() -> onnx.ModelProto:
    """RepVGG training form: Relu → (Conv3x3 → BN) + (Conv1x1 → BN) + BN(identity) → Relu, twice."""
    b = builder(17)
    x = b.node("Relu", ["x"], output="stem")
    for i in range(2):
        a = bn(b, conv(b, x, 8, 8, f"b{i}.c3", bias=False), 8, f"b{i}.bn3")
        c = bn(b, conv(b, x, 8, 8, f"b{i}.c1", k=1, pad=0, bias=False), 8, f"b{i}.bn1")
        total = b.node("Add", [b.node("Add", [a, c], output=f"b{i}.add0"), bn(b, x, 8, f"b{i}.bnid")], output=f"b{i}.add1")
        x = b.node("Relu", [total], output=f"b{i}.relu" if i == 0 else "y")
    return finish(b, [vi("x", [1, 8, 8, 8])], [vi("y", [1, 8, 8, 8])])


def mobileone_block() -> onnx.ModelProto:
    """MobileOne depthwise block: 2 × (DWConv3x3 → BN) + (DWConv1x1 → BN) (scale branch) + BN(identity)."""
    b = builder(18)
    x = b.node("Relu", ["x"], output="stem")
    branches = []
    for i, (k, pad) in enumerate([(3, 1), (3, 1), (1, 0)]):
        w = b.initializer(f"dw{i}.w", weight(b, (8, 1, k, k), k * k))
        depthwise = b.node("Conv", [x, w], output=f"dw{i}", group=8, kernel_shape=[k, k], pads=[pad] * 4)
        branches.append(bn(b, depthwise, 8, f"dw{i}.bn"))
    branches.append(bn(b, x, 8, "id.bn"))
    b.node("Relu", [b.node("Sum", branches, output="sum")], output="y")
    return finish(b, [vi("x", [1, 8, 8, 8])], [vi("y", [1, 8, 8, 8])])


def concat_bn() -> onnx.ModelProto:
    """CSP-style: Concat(Conv_a(x), Conv_b(Relu(x)), axis=1) → BN → Relu."""
    b = builder(19)
    a = conv(b, "x", 8, 6, "a")
    c = conv(b, b.node("Relu", ["x"], output="r"), 8, 4, "b", k=1, pad=0)
    b.node("Relu", [bn(b, b.node("Concat", [a, c], output="cat", axis=1), 10, "bn")], output="y")
    return finish(b, [vi("x", [1, 8, 8, 8])], [vi("y", [1, 10, 8, 8])])


def add_bn() -> onnx.ModelProto:
    """Add(Conv_a(x), Conv_b(Relu(x))) → BN → Relu (pre-activation style)."""
    b = builder(20)
    a = conv(b, "x", 8, 8, "a")
    c = conv(b, b.node("Relu", ["x"], output="r"), 8, 8, "b", k=1, pad=0)
    b.node("Relu", [bn(b, b.node("Add", [a, c], output="add"), 8, "bn")], output="y")
    return finish(b, [vi("x", [1, 8, 8, 8])], [vi("y", [1, 8, 8, 8])])


def levit_linear_norm() -> onnx.ModelProto:
    """timm LeViT LinearNorm (legacy export): MatMul [B,T,K]·[K,C] → Flatten(0,1) → BN → Reshape back
    to Shape(MatMul output) (`reshape_as`): the Shape reads only the MatMul output's shape."""
    b = builder(21)
    y = b.node("MatMul", ["x", b.initializer("linear.w", weight(b, (16, 12), 16))], output="linear")
    shape = b.node("Shape", [y], output="shape")
    z = bn(b, b.node("Flatten", [y], output="flatten", axis=2), 12, "bn")
    b.node("Relu", [b.node("Reshape", [z, shape], output="reshape_as")], output="y")
    return finish(b, [vi("x", [2, 10, 16])], [vi("y", [2, 10, 12])])


def matmul_bias(full: bool) -> onnx.ModelProto:
    """2-D MatMul(x, W) + bias ([N], or a full [M, N]) → BN → Relu."""
    b = builder(22 + full)
    y = b.node("MatMul", ["x", b.initializer("fc.w", weight(b, (16, 12), 16))], output="fc")
    bias = (0.1 * b.rng.standard_normal((4, 12) if full else 12)).astype(np.float32)
    y = b.node("Add", [y, b.initializer("fc.b", bias)], output="fc_bias")
    b.node("Relu", [bn(b, y, 12, "bn")], output="y")
    return finish(b, [vi("x", [4, 16])], [vi("y", [4, 12])])


@dataclass
class Spec:
    key: str
    title: str
    build: Callable[[], onnx.ModelProto]
    expect: str          # what a correct, complete folder does (by construction)
    expect_bn_left: int
    expect_affine_left: int  # Mul/Add/Sub/Div nodes a complete folder leaves


SPECS = [
    Spec("1a", "Caffe2-era Conv → BN → Mul → Add → Relu, constants [1,C,1,1] (opset 9, 3 blocks)",
         lambda: caffe2_affine("1C11"),
         "all 3 BN and all 6 Mul/Add are per-channel and foldable into the Convs", 0, 0),
    Spec("1b", "Caffe2-era Conv → BN → Mul → Add → Relu, constants [C,1,1] (opset 9, 3 blocks)",
         lambda: caffe2_affine("C11"),
         "all 3 BN and all 6 Mul/Add are per-channel and foldable into the Convs", 0, 0),
    Spec("2", "Trap: Conv → Mul by a [C] constant on NCHW with C == W == 8 (opset 13)", trap_mul_c_on_w,
         "the Mul broadcasts over W, not channels: it must NOT be folded (no BN in the model)", 0, 1),
    Spec("3", "IR 3 / opset 7, every initializer also a graph input; Conv → BN → Relu ×2",
         ir3_inits_as_inputs, "both BN foldable (IR < 4: initializers listed as inputs are constants)",
         0, 0),
    Spec("4", "MLP: [N,F] → BN → Gemm(transB=1) → Relu → BN → MatMul(const) → Add(const) (opset 13)",
         mlp_bn1d, "BN0 folds forward into the Gemm, BN1 forward into the MatMul (Add can merge into a Gemm)",
         0, 0),
    Spec("5a", "Graph input → BN → 3×3 Conv, pads 0 (opset 13)", lambda: bn_on_input(0),
         "the BN folds forward into the unpadded Conv", 0, 0),
    Spec("5b", "Graph input → BN → 3×3 Conv, pads 1 (opset 13)", lambda: bn_on_input(1),
         "must NOT be folded forward: the zero padding is applied after the BN", 1, 0),
    Spec("6", "Conv weight from a Constant node, BN params via Identity of initializers (opset 13)",
         in_graph_constants, "the BN is foldable once the in-graph constants are evaluated", 0, 0),
    Spec("7", "Gemm(alpha=0.5, beta=2.0, transB=1) → BN → Relu (opset 13)", gemm_alpha_beta,
         "the BN is foldable into the Gemm if alpha/beta are taken into account", 0, 0),
    Spec("8", "If(cond) with Conv → BN in both branches (then: branch initializers, else: outer-scope "
         "initializers; opset 13)", bn_in_if_branches, "both branch BNs are foldable", 0, 0),
    Spec("9", "float16 Conv → BatchNormalization-15 with float32 params → Relu ×2 (opset 15)",
         fp16_conv_fp32_bn, "both BN foldable; weights must stay float16", 0, 0),
    Spec("10a", "Gemm → Reshape [N,C,1,1] → BN → Relu (Linear → view → BatchNorm2d; opset 13)", linear_view_bn2d,
         "the BN is foldable into the Gemm: the reshape keeps every element's channel", 0, 0),
    Spec("10b", "MatMul [B,T,K]·[K,C] → Transpose(0,2,1) → BN → Relu (BatchNorm1d over C; opset 13)",
         matmul_transpose_bn1d, "the BN is foldable into the MatMul; a rank-3 MatMul has no bias input, so its "
         "bias stays as one Add", 0, 1),
    Spec("10c", "TF NHWC: Conv → Transpose → Mul [C] → Add [C] → Transpose (opset 13)", tf_nhwc_affine,
         "the Mul and Add act on the Conv's channels (last axis after the Transpose): foldable", 0, 0),
    Spec("10d", "ArcFace head: Add → BN2d → Flatten → Gemm → BN1d (opset 13)", arcface_head,
         "BN1d folds into the Gemm; BN2d folds forward through the Flatten (channel c covers inputs c·9 … c·9+8); "
         "the residual Add (of two activations) stays", 0, 1),
    Spec("11", "Trap: MatMul → Reshape [2,6,2] → BN over 6 channels (opset 13)", trap_reshape_moves_channels,
         "must NOT be folded: the reshape moves elements across channels", 1, 0),
    Spec("12a", "RepVGG block (training form): (Conv3x3→BN) + (Conv1x1→BN) + BN(x) → Relu ×2 (opset 13)",
         repvgg_block, "each block re-parameterizes exactly into one Conv3x3 (no BN, no Add left)", 0, 0),
    Spec("12b", "MobileOne block: Sum of 2 × (DWConv3x3→BN), (DWConv1x1→BN), BN(x) (opset 13)",
         mobileone_block, "the block re-parameterizes exactly into one depthwise Conv3x3", 0, 0),
    Spec("13a", "Concat(Conv_a, Conv_b, axis=1) → BN → Relu (opset 13)", concat_bn,
         "the BN's channel slices fold into the two Convs", 0, 0),
    Spec("13b", "Add(Conv_a(x), Conv_b(Relu(x))) → BN → Relu (opset 13)", add_bn,
         "the BN's scale folds into both Convs and its shift into one; the Add of two activations stays", 0, 1),
    Spec("14", "LeViT LinearNorm: MatMul → Flatten → BN → Reshape to Shape(MatMul output) (opset 13)",
         levit_linear_norm, "the BN is foldable: the Shape reads only the MatMul output's shape, which the fold "
         "keeps; a rank-3 MatMul's bias stays as one Add", 0, 1),
    Spec("15a", "2-D MatMul + bias [N] → BN → Relu (opset 13)", lambda: matmul_bias(False),
         "MatMul, Add and BN become one Gemm", 0, 0),
    Spec("15b", "2-D MatMul + full bias [M, N] → BN → Relu (opset 13)", lambda: matmul_bias(True),
         "MatMul and Add become one Gemm (C = [M, N]), and the BN folds into it", 0, 0),
]


def make_feeds(model: onnx.ModelProto) -> list[dict[str, np.ndarray]]:
    """uniform(-1, 1) from seed 0 for each real input; a bool input doubles the feeds (True, False)."""
    rng = np.random.default_rng(SEED)
    inits = {t.name for t in model.graph.initializer}
    base, bools = {}, []
    for v in model.graph.input:
        if v.name in inits:
            continue
        t = v.type.tensor_type
        shape = [d.dim_value for d in t.shape.dim]
        if t.elem_type == TensorProto.BOOL:
            bools.append(v.name)
            continue
        dtype = helper.tensor_dtype_to_np_dtype(t.elem_type)
        base[v.name] = rng.uniform(-1, 1, shape).astype(dtype)
    feeds = [base]
    for name in bools:
        feeds = [{**f, name: np.array(val)} for f in feeds for val in (True, False)]
    return feeds


# ---------------------------------------------------------------------------------------------
# Running tools and inspecting outputs
# ---------------------------------------------------------------------------------------------

@dataclass
class Cell:
    error: str | None = None            # tool failed / wrote nothing
    ops: dict[str, int] = field(default_factory=dict)
    checker: str = "–"
    ort: str = "–"
    max_abs: float | None = None
    max_rel: float | None = None
    match: bool | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def bn(self) -> int | None:
        return None if self.error else self.ops.get("BatchNormalization", 0)

    @property
    def affine(self) -> int | None:
        return None if self.error else sum(self.ops.get(o, 0) for o in AFFINE_OPS)

    @property
    def nodes(self) -> int | None:
        return None if self.error else sum(self.ops.values())

    @property
    def good(self) -> bool:
        """Produced a model that passes the checker and matches the original numerically."""
        return self.error is None and self.checker == "ok" and bool(self.match)


def one_line(text: str) -> str:
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1][:200] if lines else "no output"


def inspect(path: Path, feeds_npz: Path, out_npz: Path,
            engine: str) -> tuple[dict, dict[str, np.ndarray] | None]:
    r = run_child(py(EVAL, path, feeds_npz, out_npz, engine), TIMEOUT_S)
    if not r.ok:
        return {"error": f"inspection {r.error}"}, None
    res = json.loads(r.stdout.strip().splitlines()[-1])
    outs = None
    if res.get("ort") == "ok":
        with np.load(out_npz) as f:
            outs = {k: f[k] for k in f.files}
    return res, outs


def compare(cell: Cell, ref: dict[str, np.ndarray] | None, outs: dict[str, np.ndarray] | None) -> None:
    if ref is None or outs is None:
        return
    if sorted(ref) != sorted(outs):
        cell.notes.append(f"outputs differ in number ({len(outs)} vs {len(ref)} values)")
        cell.match = False
        return
    worst_abs, worst_rel, match = 0.0, 0.0, True
    for k, r in ref.items():
        o = outs[k]
        if o.shape != r.shape or o.dtype != r.dtype:
            cell.notes.append(f"output {k}: {o.dtype}{list(o.shape)} vs original {r.dtype}{list(r.shape)}")
            match = False
            if o.shape != r.shape:
                continue
        d = np.abs(o.astype(np.float64) - r.astype(np.float64))
        a = float(np.max(d)) if d.size else 0.0
        if not np.isfinite(a):
            a = float("nan")
        rel = a / max(float(np.abs(r.astype(np.float64)).max()), 1e-30)
        worst_abs = a if np.isnan(a) else max(worst_abs, a)
        worst_rel = rel if np.isnan(rel) else max(worst_rel, rel)
        if not rel <= MATCH_REL.get(r.dtype, 1e-4):
            match = False
    cell.max_abs, cell.max_rel, cell.match = worst_abs, worst_rel, match


def delta_note(before: dict[str, int], after: dict[str, int]) -> str:
    ops = sorted(set(before) | set(after))
    parts = [f"{after.get(o, 0) - before.get(o, 0):+d} {o}" for o in ops if after.get(o, 0) != before.get(o, 0)]
    return "ops " + ", ".join(parts) if parts else "ops unchanged"


def run_bnfold(src: Path, d: Path, cell: Cell) -> Path | None:
    argv = ch.bnfold_argv(str(src), verify=True)(d) + ["--json"]
    try:
        p = subprocess.run(argv, capture_output=True, text=True, timeout=TIMEOUT_S, env=child_env(),
                           stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        cell.error = f"timeout ({TIMEOUT_S:g} s)"
        return None
    cell.notes.append(f"exit {p.returncode}")
    try:
        rep = json.loads(p.stdout)
    except json.JSONDecodeError:
        rep = None
    if rep:
        if rep.get("folded"):
            kinds = Counter(f"{f['op_type']} {f['direction']}" for f in rep["folded"])
            cell.notes.append("folded " + ", ".join(f"{n}× {k}" for k, n in sorted(kinds.items())))
        if rep.get("skipped"):
            kinds = Counter(f"{s['op_type']}: {s['reason']}" for s in rep["skipped"])
            cell.notes.append("kept " + ", ".join(f"{n}× {k}" for k, n in sorted(kinds.items())))
        v = rep.get("verification")
        if v:
            cell.notes.append(f"own verification {'passed' if v.get('passed') else 'FAILED'}"
                              f" ({v.get('runtime_engine', '?')})")
    out = ch.out_path(d)
    if p.returncode != 0:
        cell.error = f"failed (exit {p.returncode}): {one_line(p.stderr or p.stdout)}"
        return None
    if not out.exists():
        cell.error = "exit 0 but no output written"
        return None
    return out


def run_tool(code: str, src: Path, d: Path, cell: Cell) -> Path | None:
    r = run_child(ch.tool_argv(code, str(src), False)(d), TIMEOUT_S)
    if not r.ok:
        cell.error = r.error if r.error.startswith("failed") else f"failed: {r.error}"
        return None
    out = ch.out_path(d)
    if not out.exists():
        cell.error = "failed: no output written"
        return None
    return out


def scrub(cell: Cell, work: Path) -> None:
    """Temporary paths out of messages, so the report is the same on every run."""
    fix = lambda t: t.replace(str(work), "<tmp>")  # noqa: E731
    cell.error = fix(cell.error) if cell.error else None
    cell.checker, cell.ort = fix(cell.checker), fix(cell.ort)
    cell.notes = [fix(n) for n in cell.notes]


def evaluate(spec: Spec, work: Path) -> dict[str, Cell]:
    mdir = work / spec.key
    mdir.mkdir()
    model = spec.build()
    src = mdir / "original.onnx"
    onnx.save(model, src)
    feeds = make_feeds(model)
    feeds_npz = mdir / "feeds.npz"
    np.savez(feeds_npz, n_feeds=np.array(len(feeds)),
             **{f"f{k}__{name}": v for k, f in enumerate(feeds) for name, v in f.items()})

    cells: dict[str, Cell] = {}
    orig = Cell()
    engine = "onnxruntime"
    res, ref = inspect(src, feeds_npz, mdir / "orig_out.npz", engine)
    orig.ops, orig.checker, orig.ort = res.get("ops", {}), res.get("checker", "–"), res.get("ort", "–")
    if res.get("error"):
        orig.error = res["error"]
    if orig.ort != "ok":
        orig.notes.append(f"onnxruntime cannot run it: {orig.ort}")
        engine = "reference"
        res, ref = inspect(src, feeds_npz, mdir / "orig_out.npz", engine)
        orig.ort = res.get("ort", "–")
        orig.notes.append("all models of this table compared with onnx.reference.ReferenceEvaluator instead"
                          + ("" if orig.ort == "ok" else f", which fails too: {orig.ort}"))
    if len(feeds) > 1:
        orig.notes.append(f"{len(feeds)} feeds (every bool input True and False)")
    scrub(orig, work)
    cells[ORIGINAL] = orig

    tools: list[tuple[str, Callable[[Path, Cell], Path | None]]] = [
        (BNFOLD, lambda d, c: run_bnfold(src, d, c))]
    for name, (module, code) in ch.COMPARE_TOOLS.items():
        tools.append((name, lambda d, c, code=code: run_tool(code, src, d, c)))
    for i, (name, run) in enumerate(tools):
        d = mdir / f"tool{i}"
        d.mkdir()
        cell = Cell()
        out = run(d, cell)
        if out is not None:
            res, outs = inspect(out, feeds_npz, d / "out.npz", engine)
            if res.get("error"):
                cell.error = res["error"]
            else:
                cell.ops, cell.checker, cell.ort = res["ops"], res["checker"], res["ort"]
                if cell.ort != "ok":
                    cell.notes.append(f"{engine}: {cell.ort}")
                compare(cell, ref, outs)
                cell.notes.append(delta_note(orig.ops, cell.ops))
                m = onnx.load(out)
                dtypes = sorted({TensorProto.DataType.Name(t.data_type) for t in m.graph.initializer})
                if spec.key == "9":
                    cell.notes.append("initializer dtypes " + "/".join(dtypes))
        scrub(cell, work)
        cells[name] = cell
        print(f"  {spec.key} {name}: BN {cell.bn} nodes {cell.nodes} checker {cell.checker[:40]} "
              f"abs {cell.max_abs} {cell.error or ''}", file=sys.stderr, flush=True)
    return cells


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------

def num(x: float | None) -> str:
    if x is None:
        return "–"
    if x != x:
        return "nan"
    return "0" if x == 0 else f"{x:.1e}"


def cell_row(name: str, c: Cell) -> str:
    if c.error:
        return f"| {name} | {c.error} | – | – | – | – | – | – | {'; '.join(c.notes)} |"
    checker = "ok" if c.checker == "ok" else f"NO: {c.checker}"
    matches = "–" if c.match is None else ("yes" if c.match else "**NO**")
    if name == ORIGINAL:
        matches = "(reference)" if c.ort == "ok" else "cannot run"
    notes = "; ".join(c.notes).replace("|", "\\|")
    return (f"| {name} | {c.bn} | {c.affine} | {c.nodes} | {checker.replace('|', '/')} | "
            f"{num(c.max_abs) if name != ORIGINAL else '–'} | {num(c.max_rel) if name != ORIGINAL else '–'} | "
            f"{matches} | {notes} |")


def short(name: str) -> str:
    return name.strip("*").split(" ")[0]


def counts_text(c: Cell) -> str:
    if c.error:
        return "failed"
    flag = "" if c.good else (" (WRONG output)" if c.match is False else
                              " (checker fails)" if c.checker != "ok" else " (not compared)")
    return f"{c.bn}/{c.affine}{flag}"


def summary_line(spec: Spec, cells: dict[str, Cell]) -> str:
    orig, bf = cells[ORIGINAL], cells[BNFOLD]
    others = {k: c for k, c in cells.items() if k not in (ORIGINAL, BNFOLD)}
    head = (f"**Model {spec.key}** — BN / Mul+Add+Sub+Div left: original {orig.bn}/{orig.affine}; "
            + ", ".join(f"{short(k)} {counts_text(c)}" for k, c in cells.items() if k != ORIGINAL)
            + f". Expected: {spec.expect_bn_left}/{spec.expect_affine_left}. ")
    if orig.ort != "ok":
        head += f"The original could not be run ({orig.ort}), so outputs were not compared. "
    parts = []
    good = {k: c for k, c in others.items() if c.good}
    if bf.error:
        parts.append(f"bnfold {bf.error}")
    else:
        if not bf.good:
            parts.append("**bnfold output is "
                         + ("WRONG" if bf.match is False else "rejected by the checker" if bf.checker != "ok"
                            else "not compared") + "**")
        if (bf.bn, bf.affine) != (spec.expect_bn_left, spec.expect_affine_left):
            parts.append(f"**bnfold differs from the expected result** ({spec.expect})")
        beaten = {k: c for k, c in good.items() if _removes_more(c, bf, orig)}
        if beaten:
            parts.append("**another tool removes more: " + ", ".join(
                f"{short(k)} ({c.bn} BN, {c.affine} Mul/Add/Sub/Div)" for k, c in beaten.items()) + "**")
        else:
            parts.append("bnfold removed everything any other tool removed with a correct output")
        if bf.good:
            best_bn = min((c.bn for c in good.values()), default=orig.bn)
            best_aff = min((c.affine for c in good.values()), default=orig.affine)
            gained = []
            if bf.bn < best_bn:
                gained.append(f"{best_bn - bf.bn} BN")
            if bf.affine < best_aff:
                gained.append(f"{best_aff - bf.affine} Mul/Add/Sub/Div")
            parts.append("removed by bnfold and by no other tool (correctly): "
                         + (" and ".join(gained) if gained else "nothing"))
            rt = [short(k) for k, c in good.items() if c.bn < orig.bn and c.ops.get("Sqrt", 0) > orig.ops.get("Sqrt", 0)]
            if rt:
                parts.append(f"({', '.join(rt)} removes BN only by computing the folded weights at run time "
                             "with added nodes)")
    wrong = [f"{short(k)} (max rel {num(c.max_rel)})" for k, c in others.items() if not c.error and c.match is False]
    if wrong:
        parts.append("wrong output from " + ", ".join(wrong))
    bad = [short(k) for k, c in others.items() if not c.error and c.checker != "ok"]
    if bad:
        parts.append("checker rejects the output of " + ", ".join(bad))
    failed = [short(k) for k, c in others.items() if c.error]
    if failed:
        parts.append("failed: " + ", ".join(failed))
    return "- " + head + "; ".join(parts) + "."


def _removes_more(other: Cell, bf: Cell, orig: Cell) -> bool:
    """Does `other` remove a node bnfold leaves? An Add bnfold creates (a rank-3 MatMul's bias) is
    not one: compared against the original's count, not bnfold's."""
    return other.bn < bf.bn or other.affine < min(bf.affine, orig.affine)


def bottom_line(results: list[tuple[Spec, dict[str, Cell]]]) -> str:
    bf_bad = [s.key for s, c in results if not c[BNFOLD].good]
    bf_off = [s.key for s, c in results
              if (c[BNFOLD].bn, c[BNFOLD].affine) != (s.expect_bn_left, s.expect_affine_left)]
    beaten, alone, wrong_others = [], [], []
    for spec, cells in results:
        bf = cells[BNFOLD]
        good = [c for k, c in cells.items() if k not in (ORIGINAL, BNFOLD) and c.good]
        if bf.error:
            continue
        if any(_removes_more(c, bf, cells[ORIGINAL]) for c in good):
            beaten.append(spec.key)
        best = min((c.bn for c in good), default=cells[ORIGINAL].bn)
        if bf.good and bf.bn < best:
            alone.append(f"{best - bf.bn} in model {spec.key}")
        wrong_others += [f"{short(k)} in model {spec.key}" for k, c in cells.items()
                         if k not in (ORIGINAL, BNFOLD) and not c.error and c.match is False]
    lines = [
        "- bnfold output correct (checker ok, matches the original) in "
        + ("every model" if not bf_bad else "all models but " + ", ".join(bf_bad)) + "; "
        + ("it leaves exactly the expected nodes everywhere" if not bf_off
           else "it differs from the expected result in model(s) " + ", ".join(bf_off)) + ".",
        "- Another tool correctly removes a BN or Mul/Add/Sub/Div that bnfold leaves: "
        + ("never" if not beaten else "in model(s) " + ", ".join(beaten)) + ".",
        "- BNs removed by bnfold and by no other tool (correctly): "
        + (", ".join(alone) if alone else "none") + ".",
        "- Other tools producing wrong outputs: " + (", ".join(wrong_others) if wrong_others else "none") + ".",
    ]
    return "\n".join(lines)


def versions() -> str:
    pk = []
    for p in ("bnfold", "onnx", "onnxruntime", "onnxsim", "onnxslim", "onnxoptimizer", "numpy"):
        try:
            pk.append(f"{p} {importlib.metadata.version(p)}")
        except importlib.metadata.PackageNotFoundError:
            pk.append(f"{p} not installed")
    try:
        git = lambda *a: subprocess.run(["git", *a], cwd=HERE.parent, capture_output=True, text=True,  # noqa: E731
                                        check=True).stdout.strip()
        rev = git("rev-parse", "--short", "HEAD")
        dirty = git("status", "--porcelain", "--", "bnfold")
        src = f"bnfold source at git {rev}" + (" with uncommitted changes in bnfold/" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        src = "bnfold source: not a git checkout"
    return (f"Python {platform.python_version()} on {platform.system()} {platform.machine()}, "
            f"{os.cpu_count()} CPUs; " + ", ".join(pk) + f" ({src})")


def write_report(results: list[tuple[Spec, dict[str, Cell]]], path: Path) -> str:
    L = [
        "# Fold coverage: bnfold vs other tools",
        "",
        "Generated by `/work/benchvenv/bin/python benchmarks/coverage.py` (deterministic: fixed seeds, no "
        "timings). " + versions() + ".",
        "",
        "Question: does bnfold leave any BatchNormalization (BN) that another tool removes, and which does it "
        "remove that none of them does? Each model is small and built from a fixed seed (see `coverage.py`); "
        "the comparison is by node counts, and a tool's removal only counts when its output passes "
        "`onnx.checker.check_model(full_check=True)` and matches the original.",
        "",
        "## Summary",
        "",
        bottom_line(results),
        "",
        "Per model (`(WRONG output)` / `(checker fails)` mark results that do not count as removals):",
        "",
        *[summary_line(spec, cells) for spec, cells in results],
        "",
        "## Method",
        "",
        f"- Each tool runs in its own process (timeout {TIMEOUT_S:g} s); a failure is recorded as "
        "`failed: <last stderr line>`.",
        "- **bnfold**: `python -m bnfold MODEL -o OUT --json` (verification on; its exit code is in the notes, "
        "with its own folded/kept records and reason codes).",
        "- The other tools run the exact child code `benchmarks/children.py` uses for `run.py --compare`:",
        *[line for name, (_, code) in ch.COMPARE_TOOLS.items()
          for line in (f"  <details><summary>{name}</summary>", "", "  ```python",
                       *["  " + ln for ln in code.strip().splitlines()], "  ```", "  </details>", "")],
        "- onnxoptimizer " + (importlib.metadata.version("onnxoptimizer") if _installed("onnxoptimizer") else "")
        + " has no constant-folding pass (its passes include `extract_constant_to_initializer`, which only "
        "moves Constant nodes to initializers), so only `fuse_bn_into_conv` is run. That pass replaces each "
        "BN by nodes (Cast/Add/Sqrt/Div/Unsqueeze/Mul/Sub) that compute the folded weights at run time: BN "
        "left 0, but more nodes (see the `ops` delta in the notes).",
        "- Every output (and the original) is inspected in a child process: op counts include subgraph "
        "nodes; `checker` = `onnx.checker.check_model(model, full_check=True)`; onnxruntime CPU with "
        "`ORT_DISABLE_ALL` on both sides, inputs uniform(-1, 1) from `numpy.random.default_rng(0)` (a bool "
        "input is run both True and False). If onnxruntime cannot run the original, every model of that "
        "table is run by `onnx.reference.ReferenceEvaluator` instead (said in the original's notes).",
        "- `max abs diff` = max |output − original output| over all outputs and feeds; `max rel` = that "
        "divided by max |original output| (the figure to read for float16). `matches` = max rel ≤ "
        "1e-4 (float32 outputs) / 1e-2 (float16 outputs).",
        "- `Mul/Add/Sub/Div`: nodes of those types left (Caffe2 affine pairs, the trap's Mul, the MLP's bias "
        "Add).",
        "",
    ]
    for spec, cells in results:
        L += [f"## Model {spec.key}: {spec.title}", "", f"Correct, complete result: {spec.expect}.", "",
              "| tool | BN left | Mul/Add/Sub/Div | nodes | checker (full) | max abs diff | max rel | matches | notes |",
              "|---|---:|---:|---:|---|---:|---:|---|---|"]
        L += [cell_row(name, c) for name, c in cells.items()]
        L.append("")
    text = "\n".join(L)
    path.write_text(text)
    return text


def _installed(dist: str) -> bool:
    try:
        importlib.metadata.version(dist)
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*", metavar="KEY", help="model keys (1a, 2, ...; default: all)")
    parser.add_argument("--output", type=Path, default=HERE / "COVERAGE_RESULTS.md", help="results markdown file")
    args = parser.parse_args()
    results = []
    with tempfile.TemporaryDirectory(prefix="bnfold-coverage-") as tmp:
        for spec in SPECS:
            if args.only and spec.key not in args.only:
                continue
            print(f"model {spec.key}: {spec.title}", file=sys.stderr, flush=True)
            results.append((spec, evaluate(spec, Path(tmp))))
    text = write_report(results, args.output)
    print(text)


if __name__ == "__main__":
    main()
