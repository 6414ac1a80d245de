"""Regenerate the small ONNX sample models that bnfold's tests and docs use.

Every model is built with ``onnx.helper`` from seeded numpy draws, so running this
script twice produces byte-identical files (no timestamps, fixed producer and doc
strings). Each model exercises one folding situation; ``README.md`` beside this file
has a diagram and the expected folding result for each.

    python sample_models/build.py                 # write next to this script
    python sample_models/build.py --out DIR       # write somewhere else
    python sample_models/build.py --check         # also run each model in onnxruntime

Tests import ``build_all(out_dir)`` from this file via importlib.
"""

from __future__ import annotations

import argparse
import zlib
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

PRODUCER = "bnfold-sample-models"
OPSET = 15
IR_VERSION = 8
BASE_SEED = 20240601


class Graph:
    """Nodes and initializers of one model under construction, plus its RNG.

    A plain class rather than a dataclass: tests load this file with importlib without
    registering it in sys.modules, which @dataclass (with postponed annotations) needs.
    """

    def __init__(self, rng: np.random.Generator, dtype: type = np.float32) -> None:
        self.rng = rng
        self.dtype = dtype  # weights and activations; BN statistics always stay float32
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []

    def const(self, name: str, array: np.ndarray) -> str:
        self.inits.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

    def weight(self, name: str, shape: Sequence[int], fan_in: int) -> str:
        # N(0, 1/sqrt(fan_in)) keeps activations O(1) through the stack, so no model
        # saturates or underflows (important for the float16 one).
        w = self.rng.normal(0.0, 1.0 / np.sqrt(fan_in), size=tuple(shape))
        return self.const(name, w.astype(self.dtype))

    def node(self, op: str, name: str, inputs: Sequence[str], out: str | None = None,
             **attrs: object) -> str:
        """Append a node; its single output tensor is named after the node unless given."""
        out = out or name
        self.nodes.append(helper.make_node(op, list(inputs), [out], name=name, **attrs))
        return out


def conv(g: Graph, name: str, x: str, c_in: int, c_out: int, k: int, *, stride: int = 1,
         pad: int = 0, group: int = 1, dilation: int = 1, bias: bool = False,
         out: str | None = None) -> str:
    inputs = [x, g.weight(f"{name}.weight", [c_out, c_in // group, k, k], (c_in // group) * k * k)]
    if bias:
        inputs.append(g.weight(f"{name}.bias", [c_out], (c_in // group) * k * k))
    # Spell out every attribute so the fold code's defaults are not what is being tested.
    return g.node("Conv", name, inputs, out, kernel_shape=[k, k], strides=[stride, stride],
                  pads=[pad] * 4, dilations=[dilation, dilation], group=group)


def conv_transpose(g: Graph, name: str, x: str, c_in: int, c_out: int, k: int, *, stride: int,
                   pad: int, group: int = 1, output_padding: int = 0, bias: bool = False,
                   out: str | None = None) -> str:
    # ConvTranspose weight is [C_in, C_out/group, k, k]: output channels sit on axis 1.
    fan_in = (c_in // group) * k * k
    inputs = [x, g.weight(f"{name}.weight", [c_in, c_out // group, k, k], fan_in)]
    if bias:
        inputs.append(g.weight(f"{name}.bias", [c_out], fan_in))
    return g.node("ConvTranspose", name, inputs, out, kernel_shape=[k, k],
                  strides=[stride, stride], pads=[pad] * 4, group=group,
                  output_padding=[output_padding, output_padding])


def bn(g: Graph, name: str, x: str, c: int, *, eps: float = 1e-5, out: str | None = None) -> str:
    # Statistics far from the identity (mean 0 / var 1 / gamma 1 / beta 0), so a fold that
    # drops or swaps any of them changes the output visibly. Always float32: in the fp16
    # model this exercises BN-15's T1/T2 differing from T.
    r = g.rng
    params = {
        "scale": r.uniform(0.5, 1.5, c),
        "B": r.normal(0.0, 0.2, c),
        "mean": r.normal(0.0, 0.5, c),
        "var": r.uniform(0.25, 1.75, c),
    }
    inputs = [x] + [g.const(f"{name}.{k}", v.astype(np.float32)) for k, v in params.items()]
    return g.node("BatchNormalization", name, inputs, out, epsilon=eps)


def gemm(g: Graph, name: str, x: str, k_in: int, k_out: int, *, trans_b: int,
         alpha: float = 1.0, beta: float = 1.0, c_shape: Sequence[int] | None = None,
         out: str | None = None) -> str:
    b_shape = [k_out, k_in] if trans_b else [k_in, k_out]
    inputs = [x, g.weight(f"{name}.weight", b_shape, k_in)]
    if c_shape is not None:
        inputs.append(g.weight(f"{name}.bias", c_shape, k_in))
    return g.node("Gemm", name, inputs, out, transB=trans_b, alpha=alpha, beta=beta)


def classifier_head(g: Graph, x: str, c: int, classes: int) -> str:
    x = g.node("GlobalAveragePool", "head.gap", [x])
    x = g.node("Flatten", "head.flatten", [x], axis=1)
    return gemm(g, "head.fc", x, c, classes, trans_b=1, c_shape=[classes], out="logits")


def finish(g: Graph, name: str, doc: str, input_shape: Sequence[int | str],
           outputs: Sequence[tuple[str, Sequence[int | str]]]) -> onnx.ModelProto:
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(g.dtype))
    graph = helper.make_graph(
        g.nodes, name,
        [helper.make_tensor_value_info("input", elem, list(input_shape))],
        [helper.make_tensor_value_info(n, elem, list(s)) for n, s in outputs],
        initializer=g.inits, doc_string=doc)
    return helper.make_model(graph, producer_name=PRODUCER, doc_string=doc,
                             ir_version=IR_VERSION,
                             opset_imports=[helper.make_opsetid("", OPSET)])


# --------------------------------------------------------------------------- models


def resnet_tiny(g: Graph) -> onnx.ModelProto:
    x = conv(g, "stem.conv", "input", 3, 16, 3, pad=1)
    x = g.node("Relu", "stem.relu", [bn(g, "stem.bn", x, 16)])
    # Residual block: both convs feed exactly one BN, so both BNs fold.
    y = conv(g, "block1.conv1", x, 16, 16, 3, pad=1, bias=True)
    y = g.node("Relu", "block1.relu1", [bn(g, "block1.bn1", y, 16)])
    y = bn(g, "block1.bn2", conv(g, "block1.conv2", y, 16, 16, 3, pad=1), 16)
    x = g.node("Relu", "block1.relu2", [g.node("Add", "block1.add", [y, x])])
    x = conv(g, "down.conv", x, 16, 32, 3, stride=2, pad=1)
    x = g.node("Relu", "down.relu", [bn(g, "down.bn", x, 32)])
    # branch.conv's output is read by branch.bn AND branch.relu: folding the BN into the
    # conv would corrupt what branch.relu sees, so branch.bn must be skipped.
    c = conv(g, "branch.conv", x, 32, 32, 3, pad=1)
    x = g.node("Add", "branch.add", [bn(g, "branch.bn", c, 32), g.node("Relu", "branch.relu", [c])])
    classifier_head(g, x, 32, 10)
    return finish(g, "resnet_tiny", "Tiny ResNet: 5 BN, branch.bn shares its conv output.",
                  ["N", 3, 32, 32], [("logits", ["N", 10])])


def grouped_depthwise(g: Graph) -> onnx.ModelProto:
    x = conv(g, "grouped.conv", "input", 8, 16, 3, pad=1, group=2)
    x = g.node("Relu", "grouped.relu", [bn(g, "grouped.bn", x, 16)])
    x = conv(g, "dw.conv", x, 16, 16, 3, pad=1, group=16, dilation=1)
    x = g.node("Relu", "dw.relu", [bn(g, "dw.bn", x, 16)])
    x = conv(g, "pw.conv", x, 16, 8, 1, bias=True)
    bn(g, "pw.bn", x, 8, out="output")
    return finish(g, "grouped_depthwise", "Grouped, depthwise and pointwise Conv, each + BN.",
                  ["N", 8, 16, 16], [("output", ["N", 8, 16, 16])])


def convtranspose_decoder(g: Graph) -> onnx.ModelProto:
    x = conv_transpose(g, "up1.deconv", "input", 16, 8, 4, stride=2, pad=1)  # 4 -> 8
    x = g.node("Relu", "up1.relu", [bn(g, "up1.bn", x, 8)])
    # Grouped ConvTranspose: BN channel o lives at weight[g*4:(g+1)*4, o % 4], not axis 0.
    x = conv_transpose(g, "up2.deconv", x, 8, 8, 3, stride=2, pad=1, group=2,
                       output_padding=1, bias=True)  # 8 -> 16
    x = g.node("Relu", "up2.relu", [bn(g, "up2.bn", x, 8)])
    x = conv_transpose(g, "up3.deconv", x, 8, 3, 4, stride=2, pad=1)  # 16 -> 32
    g.node("Tanh", "up3.tanh", [x], out="output")
    return finish(g, "convtranspose_decoder", "DCGAN-style decoder: ConvTranspose + BN.",
                  ["N", 16, 4, 4], [("output", ["N", 3, 32, 32])])


def mlp_bn1d(g: Graph) -> onnx.ModelProto:
    eps = 1e-3  # Keras' default; the only model not using 1e-5, so eps handling is tested
    x = gemm(g, "fc1", "input", 20, 32, trans_b=1, alpha=1.0, beta=1.0, c_shape=[32])
    x = g.node("Relu", "relu1", [bn(g, "bn1", x, 32, eps=eps)])
    # alpha/beta != 1 and a [1, 16] C: the fold must account for both scalars.
    x = gemm(g, "fc2", x, 32, 16, trans_b=0, alpha=0.5, beta=2.0, c_shape=[1, 16])
    x = g.node("Relu", "relu2", [bn(g, "bn2", x, 16, eps=eps)])
    # MatMul + Add(bias) is how many exporters spell a Linear layer.
    x = g.node("MatMul", "fc3.matmul", [x, g.weight("fc3.weight", [16, 10], 16)])
    x = g.node("Add", "fc3.add", [x, g.weight("fc3.bias", [10], 16)])
    bn(g, "bn3", x, 10, eps=eps, out="logits")
    return finish(g, "mlp_bn1d", "MLP with BatchNorm1d after Gemm, Gemm and MatMul+Add.",
                  ["N", 20], [("logits", ["N", 10])])


def fp16_cnn(g: Graph) -> onnx.ModelProto:
    x = conv(g, "conv1", "input", 3, 8, 3, pad=1, bias=True)
    x = g.node("Relu", "relu1", [bn(g, "bn1", x, 8)])
    x = conv(g, "conv2", x, 8, 8, 3, pad=1)
    bn(g, "bn2", x, 8, out="output")
    return finish(g, "fp16_cnn", "float16 Conv/BN network with float32 BN parameters.",
                  ["N", 3, 16, 16], [("output", ["N", 8, 16, 16])])


def no_bn(g: Graph) -> onnx.ModelProto:
    x = g.node("Relu", "relu", [conv(g, "conv", "input", 3, 8, 3, pad=1, bias=True)])
    classifier_head(g, x, 8, 10)
    return finish(g, "no_bn", "No BatchNormalization: folding must be a no-op.",
                  ["N", 3, 16, 16], [("logits", ["N", 10])])


def bn_first(g: Graph) -> onnx.ModelProto:
    # in.bn reads the graph input, so there is no producer to fold it into; only a
    # forward fold into conv1 works, and only because conv1 has no padding.
    x = bn(g, "in.bn", "input", 3)
    x = conv(g, "conv1", x, 3, 8, 1, bias=True)
    x = conv(g, "conv2", g.node("Relu", "relu1", [x]), 8, 8, 3, pad=1)
    bn(g, "bn2", x, 8, out="output")
    return finish(g, "bn_first", "BN applied to the graph input, before an unpadded 1x1 conv.",
                  ["N", 3, 16, 16], [("output", ["N", 8, 16, 16])])


def conv_mul_add(g: Graph) -> onnx.ModelProto:
    x = conv(g, "conv1", "input", 3, 8, 3, pad=1, bias=True)
    # Caffe2 "AffineChannel": per-channel Mul [1,8,1,1] and Add [8,1,1] (both broadcast on C).
    scale = g.const("affine.scale", g.rng.uniform(0.5, 1.5, (1, 8, 1, 1)).astype(np.float32))
    shift = g.const("affine.shift", g.rng.normal(0.0, 0.2, (8, 1, 1)).astype(np.float32))
    x = g.node("Add", "affine.add", [g.node("Mul", "affine.mul", [x, scale]), shift])
    r = g.node("Relu", "relu", [x])
    bn(g, "bn", conv(g, "conv2", r, 8, 4, 1), 4, out="output")
    # Trap: a [16] constant right-aligns with W (=16), not C (=8), so it scales columns,
    # not channels. Folding it into side.conv would be wrong.
    side = conv(g, "side.conv", r, 8, 8, 1)
    w_scale = g.const("side.w_scale", g.rng.uniform(0.5, 1.5, 16).astype(np.float32))
    g.node("Mul", "side.mul", [side, w_scale], out="w_scaled")
    return finish(g, "conv_mul_add", "Conv + per-channel Mul/Add, and a Mul over W (no fold).",
                  ["N", 3, 16, 16], [("output", ["N", 4, 16, 16]), ("w_scaled", ["N", 8, 16, 16])])


MODELS: dict[str, tuple[Callable[[Graph], onnx.ModelProto], type]] = {
    "resnet_tiny.onnx": (resnet_tiny, np.float32),
    "grouped_depthwise.onnx": (grouped_depthwise, np.float32),
    "convtranspose_decoder.onnx": (convtranspose_decoder, np.float32),
    "mlp_bn1d.onnx": (mlp_bn1d, np.float32),
    "fp16_cnn.onnx": (fp16_cnn, np.float16),
    "no_bn.onnx": (no_bn, np.float32),
    "bn_first.onnx": (bn_first, np.float32),
    "conv_mul_add.onnx": (conv_mul_add, np.float32),
}


def build_model(file_name: str) -> onnx.ModelProto:
    builder, dtype = MODELS[file_name]
    # One RNG per model, seeded from its file name (crc32 is stable across runs, unlike
    # hash()), so adding or reordering models never changes the others' bytes.
    rng = np.random.default_rng([BASE_SEED, zlib.crc32(file_name.encode())])
    model = builder(Graph(rng=rng, dtype=dtype))
    onnx.checker.check_model(model, full_check=True)
    return model


def build_all(out_dir: Path | str) -> list[Path]:
    """Build, check and write every sample model into out_dir; return the written paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for file_name in MODELS:
        path = out / file_name
        path.write_bytes(build_model(file_name).SerializeToString())
        paths.append(path)
    return paths


def run_check(path: Path) -> str:
    """Run one model in onnxruntime (optimizations off, batch 2); return a summary line."""
    import onnxruntime as ort  # only needed for --check, not for importing build_all

    model = onnx.load(str(path))
    opts = ort.SessionOptions()
    # ORT fuses Conv+BN itself at ENABLE_BASIC; we want to run the graph exactly as stored.
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    inp = sess.get_inputs()[0]
    shape = [2 if isinstance(d, str) else d for d in inp.shape]
    dtype = np.float16 if inp.type == "tensor(float16)" else np.float32
    x = np.random.default_rng(0).standard_normal(shape).astype(dtype)
    for meta, y in zip(sess.get_outputs(), sess.run(None, {inp.name: x}), strict=True):
        if not np.isfinite(y).all():
            raise RuntimeError(f"{path.name}: output {meta.name} has non-finite values")
    ops = Counter(n.op_type for n in model.graph.node)
    op_str = ", ".join(f"{op}={n}" for op, n in sorted(ops.items()))
    return f"{path.name:28s} {path.stat().st_size:7d} B  {op_str}"


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent,
                        help="directory to write the models to (default: next to this script)")
    parser.add_argument("--check", action="store_true",
                        help="run every model in onnxruntime and print sizes and op counts")
    args = parser.parse_args(argv)
    paths = build_all(args.out)
    for path in paths:
        print(run_check(path) if args.check else path)


if __name__ == "__main__":
    main()
