"""Property-based fuzzing of `bnfold.fold` on random, valid ONNX graphs.

The `graphs()` strategy grows a small graph op by op from one input, tracking every value's shape
itself: chains and branches of Conv / ConvTranspose / Gemm / MatMul / BatchNormalization / Relu /
residual Add / channel Concat / Mul-Add-Sub-Div by a constant (per-channel, scalar, and the traps:
a [W]-shaped constant, a constant varying along H or the batch, a full-shape constant). It also
shares weights between layers, gives values several consumers, makes intermediate values (and BN
producers) graph outputs, stores some constants as Constant nodes or as overridable initializers
(IR >= 4 graph inputs), and draws float64 graphs (without Conv, which onnxruntime's CPU provider
only runs in float32).

Properties (for every generated model):
- `bnfold.fold` succeeds and never mutates its input;
- the folded model passes `onnx.checker.check_model(full_check=True)`;
- its outputs equal the original's under onnxruntime with optimizations off;
- folding it again folds nothing and leaves the serialized bytes identical;
- the BN count never increases, and every BN removed is reported as folded;
- every remaining BN has exactly one skipped record with a reason code.

Plus one property with `verify=True` asserting `report.verification.passed`, and explicit
regression tests for the failures the fuzzer found (the `@example`s below).

Example count, per property: BNFOLD_FUZZ_EXAMPLES if set, else max(50, the hypothesis profile's
max_examples), i.e. 50 with the "dev" profile and 200 with "ci". BNFOLD_FUZZ_EXAMPLES=1000 runs the
1,000 examples the issue asks for. BNFOLD_FUZZ_STRICT=1 turns a generator bug (an invalid model,
normally discarded with `assume`) into an error.
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import onnx
import pytest
from builders import GraphBuilder, random_feeds, run
from hypothesis import assume, example, given, note, settings
from hypothesis import strategies as st
from hypothesis.errors import InvalidArgument
from onnx import helper, numpy_helper

import bnfold
from bnfold.report import Reason

FUZZ_EXAMPLES = int(os.environ.get("BNFOLD_FUZZ_EXAMPLES") or max(50, settings.default.max_examples))

MAX_STEPS = 8  # a step adds one op or a block (a layer, up to two affine ops and a Relu)
MAX_SPATIAL = 16  # ConvTranspose never grows H/W past this
MAX_CHANNELS = 16  # Concat never grows C past this
MAX_FEATURES = 256  # Flatten only when C*H*W is at most this
# Constants of these roles may be shared with each other (a Conv bias also used as a Mul constant, ...).
SHARE_GROUP = {"b": "vector", "c": "vector", "k": "vector", "gamma": "vector", "beta": "vector", "mean": "vector"}
TOLERANCE = {np.dtype(np.float32): (1e-4, 1e-5), np.dtype(np.float64): (1e-9, 1e-12)}  # (rtol, atol)


# --- the generator ---------------------------------------------------------------------------------


@dataclass
class Value:
    name: str
    shape: tuple[int, ...]


@dataclass
class FuzzModel:
    model: onnx.ModelProto
    dtype: np.dtype
    ops: list[str] = field(default_factory=list)


class _Graph:
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

    def conv(self, v: Value, unpadded: bool = False) -> Value:
        n, c, *spatial = v.shape
        dims = len(spatial)
        c_out = self.draw(st.integers(1, 8))
        group = self.choice([g for g in range(1, min(c, c_out) + 1) if c % g == 0 and c_out % g == 0])
        kernel, stride = self.choice([1, 3]), self.choice([1, 2])
        dilation = self.choice([1, 1, 1, 2]) if kernel == 3 else 1
        pads = [self.choice([0, 1])] * 2 * dims
        if self.flag(6):
            pads = [self.choice([0, 1]) for _ in range(2 * dims)]  # asymmetric
        if unpadded:
            pads = [0] * 2 * dims
        attrs = {}
        if self.flag(8) and not unpadded:
            attrs["auto_pad"] = self.choice(["SAME_UPPER", "SAME_LOWER", "VALID"])
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

    def bn(self, v: Value) -> Value:
        channels = v.shape[1]
        if self.flag(8):
            self.extra_outputs.append(v.name)  # the BN's producer is a graph output
        key = ("bn", channels)
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
        shape = shapes[kind]
        op = self.choice(["Mul", "Mul", "Add", "Sub", "Div"])
        r = self.rng
        if op == "Mul":
            values = r.normal(1.0, 0.5, shape)
        elif op == "Div":
            values = r.uniform(0.5, 2.0, shape) * r.choice([-1.0, 1.0], shape)
        else:
            values = r.normal(0.0, 0.5, shape)
        const = self.const(values, "k")
        inputs = [const, v.name] if self.flag(5) else [v.name, const]  # Sub/Div: c - x, c / x are not affine
        if op == "Div" and inputs[0] == const:
            op = "Mul"  # c / x may divide by zero
        return self.node(op, inputs, v.shape)

    def global_pool(self, v: Value) -> Value:
        return self.node("GlobalAveragePool", [v.name], (*v.shape[:2], *[1] * (len(v.shape) - 2)))

    def flatten(self, v: Value) -> Value:
        return self.node("Flatten", [v.name], (v.shape[0], int(np.prod(v.shape[1:]))), axis=1)

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
        else:
            kinds = ["gemm_block", "matmul_block", "bn", "affine_const", "relu", "add", "concat", "gemm", "matmul", "affine_then_layer"]
        kind = self.choice(kinds)
        if kind.endswith("_block"):
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


# --- helpers ---------------------------------------------------------------------------------------


def _note(text: str) -> None:
    """`hypothesis.note` inside a property; a no-op in the plain regression tests."""
    try:
        note(text)
    except InvalidArgument:
        pass


def _ops(model: onnx.ModelProto, op_type: str) -> list[onnx.NodeProto]:
    return [n for n in model.graph.node if n.op_type == op_type]


def _run_by_name(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return dict(zip([o.name for o in model.graph.output], run(model, feeds)))


def _assert_same_outputs(original: onnx.ModelProto, folded: onnx.ModelProto, dtype: np.dtype) -> None:
    feeds = random_feeds(original)
    expected = _run_by_name(original, feeds)
    got = _run_by_name(folded, feeds)
    assert list(got) == list(expected), "graph outputs changed"
    rtol, atol = TOLERANCE[dtype]
    for name in expected:
        np.testing.assert_allclose(got[name], expected[name], rtol=rtol, atol=atol, err_msg=f"output {name}")


def check_fold_properties(fuzz: FuzzModel) -> None:
    model = fuzz.model
    _note(onnx.printer.to_text(model.graph))
    before = model.SerializeToString()
    result = bnfold.fold(model, verify=False)
    folded = result.model
    report = result.report
    _note(f"folded: {[(r.node, r.op_type, r.direction, r.into) for r in report.folded]}")
    _note(f"skipped: {[(r.node, r.reason.value, r.detail) for r in report.skipped]}")

    assert model.SerializeToString() == before, "fold mutated its input model"
    onnx.checker.check_model(folded, full_check=True)
    assert [i.name for i in folded.graph.input] == [i.name for i in model.graph.input]
    assert [o.name for o in folded.graph.output] == [o.name for o in model.graph.output]

    bn_before, bn_after = len(_ops(model, "BatchNormalization")), len(_ops(folded, "BatchNormalization"))
    assert bn_after <= bn_before, "the number of BN nodes increased"
    folded_bns = [r for r in report.folded if r.op_type == "BatchNormalization"]
    assert len(folded_bns) == bn_before - bn_after, "BNs removed and BNs reported as folded differ"

    skipped = Counter(r.output for r in report.skipped)
    for node in _ops(folded, "BatchNormalization"):
        assert skipped[node.output[0]] == 1, f"remaining BN '{node.output[0]}' has {skipped[node.output[0]]} " \
                                             "skipped records"
    for record in report.skipped:
        assert isinstance(record.reason, Reason) and record.detail
        assert record.output in {n.output[0] for n in _ops(folded, "BatchNormalization")}

    _assert_same_outputs(model, folded, fuzz.dtype)

    again = bnfold.fold(folded, verify=False)
    assert again.report.folded == [], f"second fold folded {again.report.folded}"
    assert again.model.SerializeToString() == folded.SerializeToString(), "second fold changed the model"


# --- reproducers of failures found by the fuzzer ---------------------------------------------------


def _pre_and_post_of_different_widths() -> onnx.ModelProto:
    """BN(2 ch) -> unpadded 1x1 Conv 2->1 -> BN(1 ch): a forward and a backward fold into one Conv,
    with chains of different channel counts (verify's probe once mixed both chains' constants)."""
    g = GraphBuilder(np.random.default_rng(1))
    x = g.input("x", [1, 2, 4, 4])
    return g.model([g.bn(g.conv(g.bn(x, 2), 2, 1, kernel=1, bias=False), 1)])


def _conv_folded_in_two_passes() -> onnx.ModelProto:
    """x -> m1 = Mul(k1) -> {m2 = Mul(k2) -> conv_a, conv_b}. Pass 1 folds m2 forward into conv_a
    (m1 has a non-layer consumer); pass 2 folds m1 forward into conv_a and conv_b."""
    g = GraphBuilder(np.random.default_rng(2))
    x = g.input("x", [1, 4, 4, 4])
    m1 = g.node("Mul", [x, g.const(np.array([1.5, 0.8, 1.7, 1.6]).reshape(4, 1, 1), "k")])
    m2 = g.node("Mul", [m1, g.const(np.array([1.3, -0.1, 1.0, 1.3]).reshape(4, 1, 1), "k")])
    return g.model([g.conv(m2, 4, 1, kernel=1, bias=False), g.conv(m1, 4, 2, kernel=1, bias=False)])


def _matmul_folded_in_two_passes() -> onnx.ModelProto:
    """Add(k) -> MatMul (2-D) -> Add(b). Pass 1 folds the first Add forward (MatMul becomes a Gemm
    with a bias); pass 2 folds the second Add backward into that Gemm."""
    g = GraphBuilder(np.random.default_rng(3))
    x = g.input("x", [1, 3])
    a = g.node("Add", [x, g.const(np.array([0.25, -0.5, 0.125]), "k")])
    return g.model([g.node("Add", [g.matmul(a, 3, 2), g.const(np.array([0.5, -0.25]), "k")])])


def _normalized_dense_layer() -> onnx.ModelProto:
    """The common exported form of input normalization + Dense: Sub(mean) -> Div(std) -> MatMul ->
    Add(bias). Same two-pass situation as `_matmul_folded_in_two_passes`."""
    g = GraphBuilder(np.random.default_rng(4))
    x = g.input("x", [2, 8])
    a = g.node("Sub", [x, g.const(np.linspace(-0.5, 0.5, 8), "mean")])
    a = g.node("Div", [a, g.const(np.linspace(0.5, 2.0, 8), "std")])
    return g.model([g.node("Add", [g.matmul(a, 8, 4), g.const(np.linspace(-1, 1, 4), "bias")])])


REPRODUCERS = {
    "pre_and_post_of_different_widths": _pre_and_post_of_different_widths,
    "conv_folded_in_two_passes": _conv_folded_in_two_passes,
    "matmul_folded_in_two_passes": _matmul_folded_in_two_passes,
    "normalized_dense_layer": _normalized_dense_layer,
}


def _fuzz_model(build) -> FuzzModel:
    model = build()
    return FuzzModel(model, np.dtype(np.float32), [n.op_type for n in model.graph.node])


# --- properties ------------------------------------------------------------------------------------


@settings(max_examples=FUZZ_EXAMPLES)
@given(graphs())
@example(fuzz=_fuzz_model(_pre_and_post_of_different_widths))
@example(fuzz=_fuzz_model(_conv_folded_in_two_passes))
@example(fuzz=_fuzz_model(_matmul_folded_in_two_passes))
def test_fold_random_graph(fuzz: FuzzModel) -> None:
    check_fold_properties(fuzz)


# The two-pass reproducers are not @examples here: while that bug stands they would fail before any
# random graph is tried. `test_regression_fold_and_verify` covers them.
@settings(max_examples=FUZZ_EXAMPLES)
@given(graphs())
@example(fuzz=_fuzz_model(_pre_and_post_of_different_widths))
def test_fold_random_graph_verified(fuzz: FuzzModel) -> None:
    _note(onnx.printer.to_text(fuzz.model.graph))
    result = bnfold.fold(fuzz.model, verify=True, raise_on_failure=False)
    verification = result.report.verification
    assert verification is not None
    assert verification.passed, verification.failures()


# --- explicit regression tests -------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(REPRODUCERS))
def test_regression_fold_and_verify(name: str) -> None:
    """Each reproducer folds correctly (outputs match) AND passes bnfold's own verification.

    Found by the properties above. `pre_and_post_of_different_widths` made verify=True raise
    ValueError in verify._probe_affine (it sized the probe from the pre AND post chains' constants;
    fixed in ae0ed5f). The other three failed with a false VerificationError (analytic check off
    by ~1e7 ulp while the onnxruntime outputs matched; fixed in cb5bd2e): a layer folded in two
    passes kept the first pass's provenance, then compared with the tensor the second pass overwrote.
    """
    model = REPRODUCERS[name]()
    check_fold_properties(_fuzz_model(lambda: model))
    result = bnfold.fold(model, verify=True, raise_on_failure=False)
    verification = result.report.verification
    assert verification.runtime_status == "passed"  # the fold itself is right
    assert verification.passed, verification.failures()
