"""The random ONNX graph generator behind test_fuzz_graphs.py: the `graphs()` hypothesis strategy grows
a small valid graph op by op from one input, tracking every value's shape itself (see that file's
docstring for what it draws)."""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import onnx
from hypothesis import assume, note
from hypothesis import strategies as st
from onnx import helper, numpy_helper
from random_graph_layouts import MAX_FEATURES, LayoutSteps, Value

MAX_STEPS = 8  # a step adds one op or a block (a layer, up to two affine ops and a Relu)
MAX_SPATIAL = 16  # ConvTranspose never grows H/W past this
MAX_CHANNELS = 16  # Concat never grows C past this
# Constants of these roles may be shared with each other (a Conv bias also used as a Mul constant, ...).
SHARE_GROUP = {"b": "vector", "c": "vector", "k": "vector", "gamma": "vector", "beta": "vector", "mean": "vector"}


# --- the generator ---------------------------------------------------------------------------------


@dataclass
class FuzzModel:
    model: onnx.ModelProto
    dtype: np.dtype
    ops: list[str] = field(default_factory=list)


class _Graph(LayoutSteps):
    """Grows one graph; every structural choice is a hypothesis draw, every number comes from `rng`."""

    def __init__(self, draw, rng: np.random.Generator, dtype: np.dtype, opset: int) -> None:
        self.draw = draw
        self.rng = rng
        self.dtype = dtype
        self.opset = opset
        self.elem_type = helper.np_dtype_to_tensor_dtype(dtype)
        self.anonymous = draw(st.integers(0, 4)) == 4  # sometimes every node is unnamed
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self.overridable: list[onnx.TensorProto] = []  # initializers also listed as graph inputs
        self.inputs: list[onnx.ValueInfoProto] = []
        self.values: list[Value] = []
        self.consumers: Counter[str] = Counter()
        self.extra_outputs: list[str] = []
        self.shared: dict[tuple, list[str]] = {}  # (role, shape) -> initializer names to share
        self.ops: list[str] = []
        self._count = 0

    # --- plumbing --------------------------------------------------------------------------------

    def name(self, prefix: str) -> str:
        self._count += 1
        return f"{prefix}{self._count}"

    def flag(self, one_in: int) -> bool:
        """True with probability ~1/one_in (shrinks to False)."""
        return self.draw(st.integers(0, one_in - 1)) == one_in - 1

    def choice(self, options: list):
        return self.draw(st.sampled_from(options))

    def node(self, op: str, inputs: list[str], shape: tuple[int, ...], **attrs) -> Value:
        output = self.name(op.lower())
        self.nodes.append(helper.make_node(op, inputs, [output], name=self.node_name(output), **attrs))
        self.consumers.update(i for i in inputs if i)
        value = Value(output, tuple(shape))
        self.values.append(value)
        self.ops.append(op)
        if self.flag(12):  # an intermediate value that is also a graph output
            self.extra_outputs.append(output)
        return value

    def const(self, values: np.ndarray, role: str, shareable: bool = True, overridable: bool | None = None) -> str:
        """A constant input. Usually an initializer; sometimes one shared with an earlier node, an
        overridable initializer (also a graph input: never a constant), a Constant node, or the
        output of Identity / Reshape of an initializer (as exporters write them)."""
        array = np.asarray(values, dtype=np.float64).astype(self.dtype)
        key = (SHARE_GROUP.get(role, role), array.shape)
        if shareable and key in self.shared and self.flag(3):
            return self.choice(self.shared[key])
        name = self.name(role)
        mode = self.choice(["initializer"] * 6 + ["constant_node", "identity", "reshape"])
        if mode == "constant_node":
            self.nodes.append(helper.make_node("Constant", [], [name], name=self.node_name(name),
                                               value=numpy_helper.from_array(array, name)))
        elif mode == "identity":
            source = self.name(role + "_src")
            self.initializers.append(numpy_helper.from_array(array, source))
            self.nodes.append(helper.make_node("Identity", [source], [name], name=self.node_name(name)))
        elif mode == "reshape":
            source, target = self.name(role + "_flat"), self.name(role + "_shape")
            self.initializers.append(numpy_helper.from_array(array.reshape(-1), source))
            self.initializers.append(numpy_helper.from_array(np.array(array.shape, dtype=np.int64), target))
            self.nodes.append(helper.make_node("Reshape", [source, target], [name], name=self.node_name(name)))
        else:
            tensor = numpy_helper.from_array(array, name)
            self.initializers.append(tensor)
            if self.flag(25) if overridable is None else overridable:
                self.overridable.append(tensor)  # a default the caller may override: never a constant
        if shareable:
            self.shared.setdefault(key, []).append(name)
        return name

    def node_name(self, output: str) -> str:
        return "" if self.anonymous else output + "_node"

    def weights(self, *shape: int) -> np.ndarray:
        fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else 1
        return self.rng.normal(0.0, 1.0 / np.sqrt(max(fan_in, 1)), size=shape)

    def pick(self) -> Value:
        """Usually the newest value (a chain), sometimes an older one (a branch: two consumers)."""
        if len(self.values) > 1 and self.flag(4):
            return self.values[self.draw(st.integers(0, len(self.values) - 2))]
        return self.values[-1]

    # --- ops -------------------------------------------------------------------------------------

    def conv(self, v: Value, unpadded: bool = False, padded: bool = False) -> Value:
        """`padded`: the Conv pads (explicit pads with at least one 1, or SAME), as a pure scale
        before it may still fold forward."""
        n, c, *spatial = v.shape
        dims = len(spatial)
        c_out = self.draw(st.integers(1, 8))
        group = self.choice([g for g in range(1, min(c, c_out) + 1) if c % g == 0 and c_out % g == 0])
        kernel, stride = self.choice([1, 3]), self.choice([1, 2])
        if padded:
            kernel = 3
        dilation = self.choice([1, 1, 1, 2]) if kernel == 3 else 1
        pads = [self.choice([0, 1])] * 2 * dims
        if self.flag(6):
            pads = [self.choice([0, 1]) for _ in range(2 * dims)]  # asymmetric
        if unpadded:
            pads = [0] * 2 * dims
        elif padded and not any(pads):
            pads[self.draw(st.integers(0, 2 * dims - 1))] = 1
        attrs = {}
        if self.flag(8) and not unpadded:
            attrs["auto_pad"] = self.choice(["SAME_UPPER", "SAME_LOWER"] + ([] if padded else ["VALID"]))
            pads = [0] * 2 * dims
            if attrs["auto_pad"] != "VALID":
                dilation = 1  # onnxruntime: "Dilation not supported for AutoPadType::SAME_*"
        else:
            attrs["pads"] = pads
        span = dilation * (kernel - 1) + 1
        if any(d + pads[i] + pads[i + dims] < span for i, d in enumerate(spatial)):
            kernel, dilation, span = 1, 1, 1
        weight = self.const(self.weights(c_out, c // group, *[kernel] * dims), "w")
        inputs = [v.name, weight]
        if self.draw(st.booleans()):
            inputs.append(self.const(self.rng.normal(0, 0.5, c_out), "b"))
        if attrs.get("auto_pad", "VALID") == "VALID":
            out = [(d + pads[i] + pads[i + dims] - span) // stride + 1 for i, d in enumerate(spatial)]
        else:
            out = [-(-d // stride) for d in spatial]
        if self.draw(st.booleans()):
            attrs["kernel_shape"] = [kernel] * dims  # optional: inferred from the weight otherwise
        if stride != 1 or self.draw(st.booleans()):
            attrs["strides"] = [stride] * dims
        if dilation != 1:
            attrs["dilations"] = [dilation] * dims
        return self.node("Conv", inputs, (n, c_out, *out), group=group, **attrs)

    def conv_transpose(self, v: Value) -> Value:
        n, c, *spatial = v.shape
        dims = len(spatial)
        c_out = self.draw(st.integers(1, 8))
        group = self.choice([g for g in range(1, min(c, c_out) + 1) if c % g == 0 and c_out % g == 0])
        kernel, stride = self.choice([1, 3]), self.choice([1, 2])
        pad = self.choice([0, 1]) if kernel == 3 else 0
        out_pad = self.choice([0, 1]) if stride == 2 else 0

        def size(d: int) -> int:
            return stride * (d - 1) + out_pad + kernel - 2 * pad

        if max(size(d) for d in spatial) > MAX_SPATIAL:
            stride, out_pad = 1, 0
        weight = self.const(self.weights(c, c_out // group, *[kernel] * dims), "w")
        inputs = [v.name, weight]
        if self.draw(st.booleans()):
            inputs.append(self.const(self.rng.normal(0, 0.5, c_out), "b"))
        return self.node("ConvTranspose", inputs, (n, c_out, *(size(d) for d in spatial)),
                         kernel_shape=[kernel] * dims, pads=[pad] * 2 * dims, strides=[stride] * dims,
                         output_padding=[out_pad] * dims, group=group)

    def gemm(self, v: Value) -> Value:
        m, k = v.shape
        trans_a = int(self.flag(6))
        if trans_a:
            m, k = k, m
        n_out = self.draw(st.integers(1, 8))
        trans_b = int(self.draw(st.booleans()))
        weight = self.const(self.weights(n_out, k).T.copy() if not trans_b else self.weights(n_out, k), "w")
        attrs = {"transA": trans_a, "transB": trans_b}
        if self.flag(3):
            attrs["alpha"] = self.choice([0.5, 2.0, -1.5])
        c_shape = self.choice([(n_out,), None, (1, n_out), (m, n_out), (m, 1), (), (1,)])
        inputs = [v.name, weight]
        if c_shape is not None:
            inputs.append(self.const(self.rng.normal(0, 0.5, c_shape), "c"))
            if self.flag(3):
                attrs["beta"] = self.choice([0.5, 2.0, -1.0])
        elif self.opset < 11:
            inputs.append(self.const(np.zeros(n_out), "c"))
        return self.node("Gemm", inputs, (m, n_out), **attrs)

    def matmul(self, v: Value) -> Value:
        n_out = self.draw(st.integers(1, 8))
        weight = self.const(self.weights(n_out, v.shape[-1]).T, "w")
        return self.node("MatMul", [v.name, weight], (*v.shape[:-1], n_out))

    def bn(self, v: Value, zero_shift: bool = False) -> Value:
        """`zero_shift`: beta = mean * gamma / sqrt(var + eps), a pure scale (exactly, with mean =
        beta = 0; up to rounding otherwise, which must then be refused or folded as a shift)."""
        channels = v.shape[1]
        if self.flag(8):
            self.extra_outputs.append(v.name)  # the BN's producer is a graph output
        key = ("bn", channels)
        if zero_shift:
            r = self.rng
            eps = self.choice([1e-5, 1e-3, 0.0])
            gamma = r.uniform(0.5, 1.5, channels) * r.choice([-1.0, 1.0], channels)
            var = r.uniform(0.25, 1.75, channels)
            if self.draw(st.booleans()):
                mean = beta = np.zeros(channels)
            else:
                mean = r.normal(0, 0.5, channels)
                beta = mean * gamma / np.sqrt(var + eps)
            params = [self.const(p, role, shareable=False) for p, role in
                      zip((gamma, beta, mean, var), ("gamma", "beta", "mean", "var"))]
            return self.node("BatchNormalization", [v.name, *params], v.shape, epsilon=eps)
        if key in self.shared and self.flag(4):
            params = self.choice(self.shared[key])  # all four statistics shared with an earlier BN
        else:
            r = self.rng
            gamma = r.uniform(0.5, 1.5, channels) * r.choice([-1.0, 1.0], channels)
            if self.flag(8):
                gamma[r.integers(channels)] = 0.0
            beta = r.normal(0, 0.2, channels)
            mean = r.normal(0, 0.5, channels)
            kind = self.choice(["normal", "normal", "small", "large"])
            var = {"normal": r.uniform(0.25, 1.75, channels), "small": r.uniform(1e-3, 2e-2, channels),
                   "large": r.uniform(5.0, 50.0, channels)}[kind]
            if kind == "small" and self.draw(st.booleans()):
                gamma = gamma * np.sqrt(var)  # keep the map's scale near 1 so magnitudes stay moderate
            overridable = self.flag(25)
            params = [self.const(p, role, overridable=overridable) for p, role in
                      zip((gamma, beta, mean, var), ("gamma", "beta", "mean", "var"))]
            self.shared.setdefault(key, []).append(params)
        eps = self.choice([1e-5, 1e-3, 0.1, 0.0, 1e-9])
        return self.node("BatchNormalization", [v.name, *params], v.shape, epsilon=eps)

    def relu(self, v: Value) -> Value:
        return self.node("Relu", [v.name], v.shape)

    def add(self, v: Value) -> Value:
        same = [u for u in self.values if u.shape == v.shape]  # may be v itself: Add(v, v)
        other = self.choice(same)
        inputs = [v.name, other.name] if self.draw(st.booleans()) else [other.name, v.name]
        return self.node("Add", inputs, v.shape)

    def concat(self, v: Value) -> Value:
        fits = [u for u in self.values if len(u.shape) == len(v.shape) and u.shape[0] == v.shape[0]
                and u.shape[2:] == v.shape[2:] and u.shape[1] + v.shape[1] <= MAX_CHANNELS]
        if not fits:
            return self.relu(v)
        other = self.choice(fits)
        shape = (v.shape[0], v.shape[1] + other.shape[1], *v.shape[2:])
        return self.node("Concat", [v.name, other.name], shape, axis=1)

    def affine_const(self, v: Value) -> Value:
        """Mul / Add / Sub / Div by a constant of a per-channel, scalar or trap shape."""
        if len(v.shape) == 4:
            n, c, h, w = v.shape
            shapes = {"chan": (c, 1, 1), "chan4": (1, c, 1, 1), "scalar": (), "one": (1,), "trap_w": (w,),
                      "trap_h": (h, 1), "full": (c, h, w)}
        elif len(v.shape) == 3:
            n, c, w = v.shape
            shapes = {"chan": (c, 1), "chan4": (1, c, 1), "scalar": (), "one": (1,), "trap_w": (w,),
                      "trap_h": (n, 1, 1), "full": (c, w)}
        else:
            n, f = v.shape
            shapes = {"chan": (f,), "chan4": (1, f), "scalar": (), "one": (1,), "trap_w": (n, 1), "trap_h": (n, 1),
                      "full": (n, f)}
        kind = self.choice(["chan", "chan", "scalar", "trap_w", "chan4", "one", "trap_h", "full"])
        return self.affine_node(v, shapes[kind])

    def affine_node(self, v: Value, shape: tuple[int, ...], ops: tuple[str, ...] = ("Mul", "Mul", "Add", "Sub", "Div")
                    ) -> Value:
        """`v` op constant (or constant op `v`) for a constant of `shape`."""
        op = self.choice(list(ops))
        r = self.rng
        if op == "Mul":
            values = r.normal(1.0, 0.5, shape)
        elif op == "Div":
            values = r.uniform(0.5, 2.0, shape) * r.choice([-1.0, 1.0], shape)
        else:
            values = r.normal(0.0, 0.5, shape)
        const = self.const(values, "k")
        const_first = self.flag(2) if op == "Sub" else self.flag(5)  # c - x: scale -1, shift c
        inputs = [const, v.name] if const_first else [v.name, const]
        if op == "Div" and const_first:
            op = "Mul"  # c / x is not affine (and may divide by zero)
        return self.node(op, inputs, v.shape)

    def global_pool(self, v: Value) -> Value:
        return self.node("GlobalAveragePool", [v.name], (*v.shape[:2], *[1] * (len(v.shape) - 2)))

    def flatten(self, v: Value) -> Value:
        return self.node("Flatten", [v.name], (v.shape[0], int(np.prod(v.shape[1:]))), axis=1)

    # --- layout-only nodes ------------------------------------------------------------------------
    # Each takes a value and the axis its channels are on (None: not tracked, or spread over an axis),
    # and returns the new value and where those channels went. Ranks stay within 2..4.

    def pure_scale(self, v: Value) -> Value:
        """A per-channel (or scalar) map with no shift: Mul, Div (x / c) or a BN with shift 0."""
        rank = len(v.shape)
        kind = self.choice(["chan", "chan", "chan4", "scalar", "bn"])
        if kind == "bn":
            return self.bn(v, zero_shift=True)
        shape = {"chan": (v.shape[1],) + (1,) * (rank - 2), "chan4": (1, v.shape[1]) + (1,) * (rank - 2),
                 "scalar": self.choice([(), (1,)])}[kind]
        return self.affine_node(v, shape, ops=("Mul", "Mul", "Div"))

    def scale_then_layer(self, v: Value) -> Value:
        """A pure scale (one or two links) -> ConvTranspose or a padded Conv: folds forward."""
        for _ in range(self.draw(st.integers(1, 2))):
            v = self.pure_scale(v)
        return self.conv_transpose(v) if self.draw(st.booleans()) else self.conv(v, padded=True)

    def same_conv(self, v: Value) -> Value:
        """Conv with auto_pad SAME_UPPER / SAME_LOWER, stride 2, kernel 2 or 3 per axis: pads 0 on
        some input sizes (even size and kernel 2, odd size and kernel 3) and 1 on the others."""
        n, c, *spatial = v.shape
        dims = len(spatial)
        c_out = self.draw(st.integers(1, 8))
        group = self.choice([g for g in range(1, min(c, c_out) + 1) if c % g == 0 and c_out % g == 0])
        kernel = [self.choice([2, 3])] * dims if self.draw(st.booleans()) else \
            [self.choice([2, 3]) for _ in range(dims)]
        strides = [2] * dims if not self.flag(4) else [self.choice([1, 2]) for _ in range(dims)]
        weight = self.const(self.weights(c_out, c // group, *kernel), "w")
        inputs = [v.name, weight]
        if self.draw(st.booleans()):
            inputs.append(self.const(self.rng.normal(0, 0.5, c_out), "b"))
        attrs = {"auto_pad": self.choice(["SAME_UPPER", "SAME_LOWER"]), "strides": strides, "group": group}
        if self.draw(st.booleans()):
            attrs["kernel_shape"] = kernel
        out = [-(-d // stride) for d, stride in zip(spatial, strides)]
        return self.node("Conv", inputs, (n, c_out, *out), **attrs)

    def bn_same_conv(self, v: Value) -> Value:
        """BN (sometimes with a Mul/Add after it) -> SAME-padded stride-2 Conv: a forward fold when
        SAME pads 0 for this input size, refused (padded_consumer) otherwise."""
        v = self.bn(v)
        if self.flag(3):
            v = self.affine_const(v)
        return self.same_conv(v)

    def layer_block(self, v: Value, layer: str) -> Value:
        """A layer, usually followed by a chain of one or two affine ops (mostly BN), maybe a Relu."""
        out = getattr(self, layer)(v)
        if self.flag(4):
            return out
        for _ in range(self.draw(st.integers(1, 2))):
            out = self.bn(out) if self.choice(["bn", "bn", "affine_const"]) == "bn" else self.affine_const(out)
        if self.draw(st.booleans()):
            out = self.relu(out)
        return out

    def affine_then_layer(self, v: Value) -> Value:
        """One or two affine ops (mostly BN) feeding a layer: the forward-fold pattern."""
        for _ in range(self.draw(st.integers(1, 2))):
            v = self.bn(v) if self.choice(["bn", "bn", "affine_const"]) == "bn" else self.affine_const(v)
        if len(v.shape) == 2:
            return self.gemm(v) if self.draw(st.booleans()) else self.matmul(v)
        if self.dtype != np.float32:
            return self.matmul(v)
        return self.conv(v, unpadded=not self.flag(4))

    def step(self) -> None:
        v = self.pick()
        if len(v.shape) > 2:
            kinds = ["conv_block", "conv_block", "bn", "affine_const", "relu", "add", "conv_transpose_block",
                     "concat", "matmul_block", "conv", "global_pool", "flatten", "affine_then_layer"]
            if self.dtype != np.float32:  # onnxruntime CPU has no float64 Conv/ConvTranspose/GlobalAveragePool
                kinds = [k for k in kinds if not k.startswith(("conv", "global_pool"))]
            if int(np.prod(v.shape[1:])) > MAX_FEATURES:
                kinds.remove("flatten")
            kinds += ["layout_block", "layout_block", "layout", "affine_layout_layer"]
            if self.dtype == np.float32:
                kinds += ["scale_then_layer", "bn_same_conv"]
        else:
            kinds = ["gemm_block", "matmul_block", "bn", "affine_const", "relu", "add", "concat", "gemm", "matmul",
                     "affine_then_layer", "layout_block", "layout_block", "layout", "affine_layout_layer"]
        kind = self.choice(kinds)
        if kind in ("layout_block", "layout"):
            self.layout_block(v) if kind == "layout_block" else self.layout(v, None)
        elif kind.endswith("_block"):
            self.layer_block(v, kind[: -len("_block")])
        else:
            getattr(self, kind)(v)

    def build(self) -> onnx.ModelProto:
        outputs = [v.name for v in self.values[1:] if self.consumers[v.name] == 0]
        outputs += [o for o in dict.fromkeys(self.extra_outputs) if o not in outputs]
        shapes = {v.name: v.shape for v in self.values}
        inputs = self.inputs + [helper.make_tensor_value_info(t.name, t.data_type, list(t.dims))
                                for t in self.overridable]
        graph = helper.make_graph(
            self.nodes, "fuzz", inputs,
            [helper.make_tensor_value_info(o, self.elem_type, list(shapes[o])) for o in outputs],
            self.initializers,
        )
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", self.opset)])
        model.ir_version = 8
        if self.draw(st.booleans()):
            model = onnx.shape_inference.infer_shapes(model)  # sometimes the model carries value_info
        return model


@st.composite
def graphs(draw) -> FuzzModel:
    dtype = np.dtype(draw(st.sampled_from([np.float32] * 5 + [np.float64])))
    opset = draw(st.sampled_from([17, 15, 13, 11, 9, 7]))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    g = _Graph(draw, rng, dtype, opset)
    batch = draw(st.integers(1, 2))
    rank = draw(st.sampled_from([4, 4, 2, 3]))
    if rank > 2:
        channels = draw(st.integers(1, 8))
        w = channels if channels >= 4 and g.flag(3) else draw(st.integers(4, 8))  # W == C: the [W] trap bites
        shape = (batch, channels, w) if rank == 3 else (batch, channels, draw(st.integers(4, 8)), w)
    else:
        shape = (batch, draw(st.integers(1, 8)))
    g.inputs.append(helper.make_tensor_value_info("x", g.elem_type, list(shape)))
    g.values.append(Value("x", shape))
    steps = draw(st.integers(1, MAX_STEPS))
    for _ in range(steps):
        g.step()
    model = g.build()
    try:
        onnx.checker.check_model(model, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as error:
        note(f"generator produced an invalid model: {error}")
        if os.environ.get("BNFOLD_FUZZ_STRICT"):
            raise
        assume(False)
    return FuzzModel(model, dtype, g.ops)
