"""The one ONNX graph builder of the tests and the benchmarks: append inputs, initializers and nodes,
then assemble a model.

    g = GraphBuilder(np.random.default_rng(0))
    x = g.input("x", [2, 3, 8, 8])
    y = g.conv(x, 3, 8, kernel=3, pads=[1, 1, 1, 1])
    y = g.bn(y, 8)
    model = g.model([y])

Names are generated (`prefix` + a counter) unless given: the benchmarks name every tensor after its
layer (`conv3.w`, `bn3.scale`), because their models were measured with exactly those names. The
layer methods draw their numbers from `rng` in a fixed order, so one seed gives one model; the
benchmarks keep their own weight statistics (coverage.py, models.py) and use only the plumbing.
A builder for an If/Loop body gets a `scope`, which prefixes every generated name, and `subgraph()`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import numpy.typing as npt
import onnx
from onnx import helper, numpy_helper


class GraphBuilder:
    def __init__(self, rng: np.random.Generator | None = None, dtype: npt.DTypeLike = np.float32,
                 opset: int = 17, scope: str = "") -> None:
        self.rng = rng or np.random.default_rng(0)
        self.scope = scope  # prefix of every generated name: a subgraph body never reuses an outer name
        self.dtype = np.dtype(dtype)
        self.opset = opset
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self.inputs: list[onnx.ValueInfoProto] = []
        self._count = 0

    # --- plumbing ----------------------------------------------------------------------------

    def name(self, prefix: str) -> str:
        self._count += 1
        return f"{self.scope}_{prefix}{self._count}" if self.scope else f"{prefix}{self._count}"

    @property
    def elem_type(self) -> int:
        return helper.np_dtype_to_tensor_dtype(self.dtype)

    def input(self, name: str, shape: Sequence[int | str | None] | None,
              dtype: npt.DTypeLike | None = None) -> str:
        elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype)) if dtype is not None else self.elem_type
        self.inputs.append(helper.make_tensor_value_info(name, elem, shape))
        return name

    def initializer(self, name: str, array: np.ndarray) -> str:
        """An initializer holding `array` exactly as given (its dtype, shape and name; 0-d stays 0-d)."""
        self.initializers.append(numpy_helper.from_array(np.asarray(array), name))
        return name

    def const(self, values: object, prefix: str = "c", dtype: npt.DTypeLike | None = None) -> str:
        """An initializer of a fresh name, in the builder's dtype unless `dtype` says otherwise."""
        return self.initializer(self.name(prefix), np.asarray(values).astype(dtype or self.dtype))

    def node(self, op: str, inputs: list[str], prefix: str | None = None, n_outputs: int = 1, *,
             output: str | None = None, node_name: str | None = None, **attrs: object) -> str:
        """Append one node; returns its first output.

        Outputs get fresh names from `prefix` (default: the op type) and the node is named after its
        first output plus "_node"; `output` names a single output exactly, and then also the node
        (unless `node_name` says otherwise).
        """
        if output is not None:
            outputs = [output]
            node_name = node_name if node_name is not None else output
        else:
            outputs = [self.name(prefix or op.lower()) for _ in range(n_outputs)]
        name = node_name if node_name is not None else outputs[0] + "_node"
        self.nodes.append(helper.make_node(op, inputs, outputs, name=name, **attrs))
        return outputs[0]

    def initializer_inputs(self, names: Sequence[str] | None = None) -> list[onnx.ValueInfoProto]:
        """Graph-input declarations of the initializers (all of them when `names` is None), as IR < 4
        models list them and as IR >= 4 models make an initializer overridable."""
        return [helper.make_tensor_value_info(t.name, t.data_type, list(t.dims))
                for t in self.initializers if names is None or t.name in names]

    def subgraph(self, inputs: Sequence[onnx.ValueInfoProto], outputs: Sequence[onnx.ValueInfoProto]) -> onnx.GraphProto:
        """The nodes and initializers appended so far as a body (If branch, Loop body) named after the scope."""
        return helper.make_graph(self.nodes, self.scope, inputs, outputs, self.initializers)

    def model(self, outputs: Sequence[str | onnx.ValueInfoProto], ir_version: int = 8, check: bool = True, *,
              extra_inputs: Sequence[onnx.ValueInfoProto] = (), infer_shapes: bool = True,
              graph_name: str = "test", producer_name: str = "") -> onnx.ModelProto:
        """The model of everything appended so far.

        An output given by name has no declared type (shape inference fills it in); a ValueInfoProto
        is declared as it is. `check` runs the full ONNX checker.
        """
        declared = [o if isinstance(o, onnx.ValueInfoProto) else helper.make_empty_tensor_value_info(o)
                    for o in outputs]
        graph = helper.make_graph(self.nodes, graph_name, [*self.inputs, *extra_inputs], declared,
                                  self.initializers)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", self.opset)])
        model.ir_version = ir_version
        if producer_name:
            model.producer_name = producer_name
        if infer_shapes:
            model = onnx.shape_inference.infer_shapes(model)
        if check:
            onnx.checker.check_model(model, full_check=True)
        return model

    def weights(self, *shape: int, scale: float | None = None) -> np.ndarray:
        """normal(0, scale) of `shape`; the default scale is 1/sqrt(fan-in), fan-in = prod(shape[1:])."""
        fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else shape[0]
        return self.rng.normal(0.0, scale or 1.0 / np.sqrt(max(fan_in, 1)), size=shape)

    # --- layers ------------------------------------------------------------------------------

    def conv(self, x: str, c_in: int, c_out: int, kernel: int | Sequence[int] = 3, group: int = 1,
             bias: bool = True, dims: int = 2, **attrs: object) -> str:
        kernel = (kernel,) * dims if isinstance(kernel, int) else tuple(kernel)
        w = self.const(self.weights(c_out, c_in // group, *kernel), "w")
        inputs = [x, w] + ([self.const(self.rng.normal(size=c_out), "b")] if bias else [])
        return self.node("Conv", inputs, group=group, **attrs)

    def conv_transpose(self, x: str, c_in: int, c_out: int, kernel: int | Sequence[int] = 3, group: int = 1,
                       bias: bool = True, dims: int = 2, **attrs: object) -> str:
        kernel = (kernel,) * dims if isinstance(kernel, int) else tuple(kernel)
        w = self.const(self.weights(c_in, c_out // group, *kernel), "w")
        inputs = [x, w] + ([self.const(self.rng.normal(size=c_out), "b")] if bias else [])
        return self.node("ConvTranspose", inputs, group=group, **attrs)

    def gemm(self, x: str, k: int, n: int, trans_b: int = 0, c_shape: tuple | None = (None,), **attrs: object) -> str:
        w = self.const(self.weights(n, k) if trans_b else self.weights(k, n), "w")
        inputs = [x, w]
        if c_shape is not None:
            shape = (n,) if c_shape == (None,) else c_shape
            inputs.append(self.const(self.rng.normal(size=shape), "c"))
        return self.node("Gemm", inputs, transB=trans_b, **attrs)

    def matmul(self, x: str, k: int, n: int) -> str:
        return self.node("MatMul", [x, self.const(self.weights(k, n), "w")])

    def bn_params(self, channels: int, dtype: npt.DTypeLike | None = None) -> list[str]:
        r = self.rng
        values = [r.uniform(0.5, 1.5, channels), r.normal(0, 0.2, channels), r.normal(0, 0.5, channels),
                  r.uniform(0.25, 1.75, channels)]
        return [self.const(v, p, dtype) for v, p in zip(values, ("gamma", "beta", "mean", "var"))]

    def bn(self, x: str, channels: int, epsilon: float = 1e-5, param_dtype: npt.DTypeLike | None = None,
           **attrs: object) -> str:
        return self.node("BatchNormalization", [x, *self.bn_params(channels, param_dtype)], "bn",
                         epsilon=epsilon, **attrs)

    def relu(self, x: str) -> str:
        return self.node("Relu", [x])
