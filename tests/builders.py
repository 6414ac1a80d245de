"""Tiny graph factories for tests: append nodes and initializers, build a checked model.

    g = GraphBuilder(rng)
    x = g.input("x", [2, 3, 8, 8])
    y = g.conv(x, 3, 8, kernel=3, pads=1)
    y = g.bn(y, 8)
    model = g.model([y])
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

if TYPE_CHECKING:  # pragma: no cover
    from click.testing import Result

FLOAT = TensorProto.FLOAT


class GraphBuilder:
    def __init__(self, rng: np.random.Generator | None = None, dtype=np.float32, opset: int = 17) -> None:
        self.rng = rng or np.random.default_rng(0)
        self.dtype = np.dtype(dtype)
        self.opset = opset
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self.inputs: list[onnx.ValueInfoProto] = []
        self._count = 0

    # --- plumbing ----------------------------------------------------------------------------

    def name(self, prefix: str) -> str:
        self._count += 1
        return f"{prefix}{self._count}"

    @property
    def elem_type(self) -> int:
        return helper.np_dtype_to_tensor_dtype(self.dtype)

    def input(self, name: str, shape: list, dtype=None) -> str:
        elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype)) if dtype is not None else self.elem_type
        self.inputs.append(helper.make_tensor_value_info(name, elem, shape))
        return name

    def const(self, values, prefix: str = "c", dtype=None) -> str:
        name = self.name(prefix)
        array = np.asarray(values).astype(dtype or self.dtype)
        self.initializers.append(numpy_helper.from_array(array, name))
        return name

    def node(self, op: str, inputs: list[str], prefix: str | None = None, n_outputs: int = 1, **attrs) -> str:
        outputs = [self.name(prefix or op.lower()) for _ in range(n_outputs)]
        self.nodes.append(helper.make_node(op, inputs, outputs, name=outputs[0] + "_node", **attrs))
        return outputs[0]

    def model(self, outputs: list[str], ir_version: int = 8, check: bool = True) -> onnx.ModelProto:
        graph = helper.make_graph(
            self.nodes, "test", self.inputs,
            [helper.make_empty_tensor_value_info(o) for o in outputs], self.initializers,
        )
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", self.opset)])
        model.ir_version = ir_version
        model = onnx.shape_inference.infer_shapes(model)
        if check:
            onnx.checker.check_model(model, full_check=True)
        return model

    def weights(self, *shape: int, scale: float | None = None) -> np.ndarray:
        fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else shape[0]
        return self.rng.normal(0.0, scale or 1.0 / np.sqrt(max(fan_in, 1)), size=shape)

    # --- layers ------------------------------------------------------------------------------

    def conv(self, x: str, c_in: int, c_out: int, kernel=3, group: int = 1, bias: bool = True, dims: int = 2,
             **attrs) -> str:
        kernel = (kernel,) * dims if isinstance(kernel, int) else tuple(kernel)
        w = self.const(self.weights(c_out, c_in // group, *kernel), "w")
        inputs = [x, w] + ([self.const(self.rng.normal(size=c_out), "b")] if bias else [])
        return self.node("Conv", inputs, group=group, **attrs)

    def conv_transpose(self, x: str, c_in: int, c_out: int, kernel=3, group: int = 1, bias: bool = True,
                       dims: int = 2, **attrs) -> str:
        kernel = (kernel,) * dims if isinstance(kernel, int) else tuple(kernel)
        w = self.const(self.weights(c_in, c_out // group, *kernel), "w")
        inputs = [x, w] + ([self.const(self.rng.normal(size=c_out), "b")] if bias else [])
        return self.node("ConvTranspose", inputs, group=group, **attrs)

    def gemm(self, x: str, k: int, n: int, trans_b: int = 0, c_shape: tuple | None = (None,), **attrs) -> str:
        w = self.const(self.weights(n, k) if trans_b else self.weights(k, n), "w")
        inputs = [x, w]
        if c_shape is not None:
            shape = (n,) if c_shape == (None,) else c_shape
            inputs.append(self.const(self.rng.normal(size=shape), "c"))
        return self.node("Gemm", inputs, transB=trans_b, **attrs)

    def matmul(self, x: str, k: int, n: int) -> str:
        return self.node("MatMul", [x, self.const(self.weights(k, n), "w")])

    def bn_params(self, channels: int, dtype=None) -> list[str]:
        r = self.rng
        values = [r.uniform(0.5, 1.5, channels), r.normal(0, 0.2, channels), r.normal(0, 0.5, channels),
                  r.uniform(0.25, 1.75, channels)]
        return [self.const(v, p, dtype) for v, p in zip(values, ("gamma", "beta", "mean", "var"))]

    def bn(self, x: str, channels: int, epsilon: float = 1e-5, param_dtype=None, **attrs) -> str:
        return self.node("BatchNormalization", [x, *self.bn_params(channels, param_dtype)], "bn",
                         epsilon=epsilon, **attrs)

    def relu(self, x: str) -> str:
        return self.node("Relu", [x])


def run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    """Run with every onnxruntime graph optimization off (so ORT's own BN fusion never hides a bug)."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def random_feeds(model: onnx.ModelProto, seed: int = 1) -> dict[str, np.ndarray]:
    """Inputs for every graph input of fixed shape."""
    rng = np.random.default_rng(seed)
    initializers = {t.name for t in model.graph.initializer}
    feeds = {}
    for value in model.graph.input:
        if value.name in initializers:
            continue
        shape = [d.dim_value for d in value.type.tensor_type.shape.dim]
        dtype = helper.tensor_dtype_to_np_dtype(value.type.tensor_type.elem_type)
        feeds[value.name] = rng.uniform(-1, 1, size=shape).astype(dtype)
    return feeds


def op_types(model: onnx.ModelProto) -> list[str]:
    return [node.op_type for node in model.graph.node]


def invoke(args: list) -> Result:
    """The CLI in-process; any exception but SystemExit fails the test."""
    from click.testing import CliRunner

    from bnfold.cli import main

    result = CliRunner().invoke(main, [str(a) for a in args])
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise AssertionError(f"unexpected exception {result.exception!r}\nstdout: {result.stdout}\n"
                             f"stderr: {result.stderr}") from result.exception
    return result


def sample_model_names() -> list[str]:
    """The committed sample models (sample_models/build.py's list) — not whatever else a user's
    run left in that folder, such as the README's `resnet_tiny.folded.onnx`."""
    import importlib.util
    from pathlib import Path

    build = Path(__file__).resolve().parents[1] / "sample_models" / "build.py"
    spec = importlib.util.spec_from_file_location("sample_models_build", build)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return sorted(module.MODELS)
