"""Layout-only steps of the random ONNX graph generator (random_graphs.py): the layouts exporters write
(Linear -> view -> BN2d, MatMul -> Transpose -> BN1d, NCHW -> NHWC -> Mul/Add, BN2d -> Flatten -> Linear)
and random permutations and reshapes, with the generator's guess of where the channel axis went."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from hypothesis import strategies as st
from onnx import helper, numpy_helper

MAX_FEATURES = 256  # Flatten only when C*H*W is at most this


@dataclass
class Value:
    name: str
    shape: tuple[int, ...]


def _follow(before: tuple[int, ...], after: tuple[int, ...], axis: int | None) -> int | None:
    """Where axis `axis` of `before` is after a row-major reshape to `after` (the generator's own
    guess, used only to aim constants): an axis of the same size with as many elements in front."""
    if axis is None:
        return None
    front = int(np.prod(before[:axis]))
    for q, size in enumerate(after):
        if size == before[axis] and int(np.prod(after[:q])) == front:
            return q
    return None


class LayoutSteps:
    """The layout-only steps of the random graph generator (random_graphs._Graph): Transpose, Reshape,
    Flatten, Squeeze, Unsqueeze, Identity between a layer and the affine chain after it, and between a
    chain and the layer it feeds; constants aimed at the axis the layer's channels went to."""

    def int_const(self, values, role: str) -> str:
        """An int64 constant (a shape or axes input): an initializer, a Constant node, or rarely an
        overridable initializer (then it is no constant, whatever its default)."""
        array = np.asarray(values, dtype=np.int64)
        name = self.name(role)
        if self.flag(4) and self.opset >= 9:  # Constant-1 holds floats only
            self.nodes.append(helper.make_node("Constant", [], [name], name=self.node_name(name),
                                               value=numpy_helper.from_array(array, name)))
        else:
            tensor = numpy_helper.from_array(array, name)
            self.initializers.append(tensor)
            if self.flag(25):
                self.overridable.append(tensor)
        return name

    def layout(self, v: Value, chan: int | None) -> tuple[Value, int | None]:
        """One random layout-only node after `v`."""
        rank = len(v.shape)
        kinds = ["transpose", "transpose", "reshape", "reshape", "identity", "flatten"]
        if rank < 4:
            kinds.append("unsqueeze")
        if 1 in v.shape:
            kinds.append("squeeze")
        kind = self.choice(kinds)
        if kind == "transpose":
            return self.transpose(v, chan)
        if kind == "identity":
            return self.node("Identity", [v.name], v.shape), chan
        if kind == "flatten":
            axis = self.choice([a for a in [1, 1, *range(rank + 1)] if np.prod(v.shape[a:]) <= MAX_FEATURES])
            shape = (int(np.prod(v.shape[:axis])), int(np.prod(v.shape[axis:])))
            return self.node("Flatten", [v.name], shape, axis=axis), _follow(v.shape, shape, chan)
        if kind == "unsqueeze":
            return self.unsqueeze(v, chan)
        if kind == "squeeze":
            return self.squeeze(v, chan)
        return self.reshape(v, chan)

    def transpose(self, v: Value, chan: int | None, perm: list[int] | None = None) -> tuple[Value, int | None]:
        rank = len(v.shape)
        named = {2: [[1, 0]], 3: [[0, 2, 1], [0, 2, 1], [1, 0, 2]],
                 4: [[0, 2, 3, 1], [0, 3, 1, 2], [0, 2, 1, 3], [0, 1, 3, 2]]}[rank]  # NHWC, NCHW, C <-> H
        mode = "given" if perm is not None else self.choice(["named", "named", "random", "reverse"])
        if mode == "named":
            perm = self.choice(named)
        elif mode == "random":
            perm = list(self.draw(st.permutations(range(rank))))
        elif mode == "reverse":
            perm = list(reversed(range(rank)))  # perm omitted: the default reverses the axes
        shape = tuple(v.shape[p] for p in perm)
        attrs = {} if mode == "reverse" else {"perm": perm}
        return self.node("Transpose", [v.name], shape, **attrs), None if chan is None else perm.index(chan)

    def axes_input(self, op: str, v: Value, axes: list[int], rank: int, shape: tuple[int, ...]) -> Value:
        """Squeeze / Unsqueeze with `axes` (of a tensor of `rank`): an input from opset 13 on, an
        attribute before; sometimes negative (opset 11 on)."""
        if self.opset >= 11 and self.flag(3):
            axes = [a - rank for a in axes]
        if self.opset >= 13:
            return self.node(op, [v.name, self.int_const(axes, "axes")], shape)
        return self.node(op, [v.name], shape, axes=axes)

    def unsqueeze(self, v: Value, chan: int | None) -> tuple[Value, int | None]:
        rank = len(v.shape)
        out_rank = self.draw(st.integers(rank + 1, 4))
        axes = sorted(self.draw(st.lists(st.integers(0, out_rank - 1), min_size=out_rank - rank,
                                         max_size=out_rank - rank, unique=True)))
        dims = iter(v.shape)
        shape = tuple(1 if q in axes else next(dims) for q in range(out_rank))
        return self.axes_input("Unsqueeze", v, axes, out_rank, shape), _follow(v.shape, shape, chan)

    def squeeze(self, v: Value, chan: int | None) -> tuple[Value, int | None]:
        rank = len(v.shape)
        ones = [q for q, d in enumerate(v.shape) if d == 1]
        if rank - len(ones) >= 2 and self.flag(4):  # no axes: every 1 goes
            shape = tuple(d for d in v.shape if d != 1)
            return self.node("Squeeze", [v.name], shape), _follow(v.shape, shape, chan)
        if rank <= 2:
            return self.node("Identity", [v.name], v.shape), chan
        axes = sorted(self.draw(st.lists(st.sampled_from(ones), min_size=1, max_size=rank - 2, unique=True)))
        shape = tuple(d for q, d in enumerate(v.shape) if q not in axes)
        return self.axes_input("Squeeze", v, axes, rank, shape), _follow(v.shape, shape, chan)

    def typical_layout(self, v: Value, chan: int | None) -> tuple[Value, int | None]:
        """The layouts exporters write after a layer: Linear -> view(N, C, 1, 1) / unsqueeze,
        MatMul [B, T, C] -> Transpose(0, 2, 1), TF's NCHW -> NHWC, Flatten, merging H and W."""
        rank = len(v.shape)
        kind = self.choice({2: ["view4", "view4", "view3", "unsqueeze"],
                            3: ["t021", "t021", "unsqueeze", "flatten"],
                            4: ["nhwc", "nhwc", "merge_hw", "flatten"]}[rank])
        if kind == "flatten" and np.prod(v.shape[1:]) > MAX_FEATURES:
            kind = "t021" if rank == 3 else "nhwc"
        if kind in ("view4", "view3"):
            return self.reshape(v, chan, (*v.shape, 1, 1) if kind == "view4" else (*v.shape, 1))
        if kind == "merge_hw":
            return self.reshape(v, chan, (*v.shape[:2], v.shape[2] * v.shape[3]))
        if kind == "unsqueeze":
            return self.unsqueeze(v, chan)
        if kind == "flatten":
            shape = (v.shape[0], int(np.prod(v.shape[1:])))
            return self.node("Flatten", [v.name], shape, axis=1), _follow(v.shape, shape, chan)
        return self.transpose(v, chan, [0, 2, 1] if kind == "t021" else [0, 2, 3, 1])

    def reshape(self, v: Value, chan: int | None, shape: tuple[int, ...] | None = None) -> tuple[Value, int | None]:
        """A Reshape of `v` to `shape` (default: a random target) by a constant shape input in which
        some dims are written as 0 (copy the input's) or -1 (inferred)."""
        s = v.shape
        shape = shape or self.reshape_target(s)
        spec = list(shape)
        for q in range(min(len(s), len(spec))):
            if spec[q] == s[q] and self.flag(4):
                spec[q] = 0
        if self.flag(2):
            spec[self.draw(st.integers(0, len(spec) - 1))] = -1
        return self.node("Reshape", [v.name, self.int_const(spec, "shape")], shape), _follow(s, shape, chan)

    def reshape_target(self, s: tuple[int, ...]) -> tuple[int, ...]:
        """Linear -> view(N, C, 1, 1); a merge or a split of axes (which may cut through the channel
        axis); the dims reinterpreted in another order (moves elements across channels); a 1 inserted
        or dropped. Ranks stay within 2..4."""
        rank = len(s)
        options = [(*s, 1, 1), (*s, 1)] if rank == 2 else []
        runs = [(i, j) for i in range(rank) for j in range(i + 2, rank + 1) if rank - (j - i) + 1 >= 2]
        if runs:
            i, j = self.choice(runs)
            options.append((*s[:i], int(np.prod(s[i:j])), *s[j:]))
        splits = [(q, a) for q, d in enumerate(s) for a in range(2, d) if d % a == 0] if rank < 4 else []
        if splits:
            q, a = self.choice(splits)
            options.append((*s[:q], a, s[q] // a, *s[q + 1:]))
        shuffled = tuple(self.draw(st.permutations(s)))
        if shuffled != s:
            options.append(shuffled)
        if rank < 4:
            q = self.draw(st.integers(0, rank))
            options.append((*s[:q], 1, *s[q:]))
        ones = [q for q, d in enumerate(s) if d == 1]
        if rank > 2 and ones:
            q = self.choice(ones)
            options.append((*s[:q], *s[q + 1:]))
        return self.choice(options) if options else s

    def axis_affine(self, v: Value, chan: int | None) -> Value:
        """Mul / Add / Sub / Div by a constant varying along one axis of `v` (often the tracked
        channel axis, e.g. a [C] constant on NHWC's last axis), or by a scalar."""
        rank = len(v.shape)
        axes = [chan, chan] if chan is not None else []
        axis = self.choice(axes + [rank - 1, 1, self.draw(st.integers(0, rank - 1)), None])
        if axis is None:
            return self.affine_node(v, self.choice([(), (1,)]))
        lead = self.draw(st.integers(0, axis))  # leading 1s: [C] or [1, 1, 1, C] on NHWC
        return self.affine_node(v, (1,) * lead + (v.shape[axis],) + (1,) * (rank - 1 - axis))

    def layouts(self, v: Value, chan: int | None) -> tuple[Value, int | None]:
        """Half the time a layout an exporter writes, otherwise one or two random layout nodes."""
        if self.draw(st.booleans()):
            return self.typical_layout(v, chan)
        for _ in range(self.draw(st.integers(1, 2))):
            v, chan = self.layout(v, chan)
        return v, chan

    def layout_block(self, v: Value) -> Value:
        """[layer ->] layout-only nodes -> an affine chain (BN on axis 1, or Mul/Add/... on the axis
        the layer's channels went to, or another) [-> Relu or a layout node]: the backward fold
        through layout nodes."""
        rank = len(v.shape)
        layers = (["gemm", "gemm", "matmul", None] if rank == 2 else
                  ["matmul", None] + (["conv", "conv", "conv_transpose"] if self.dtype == np.float32 else ["matmul"]))
        layer = self.choice(layers)
        chan = None
        if layer is not None:
            v = getattr(self, layer)(v)
            chan = len(v.shape) - 1 if layer == "matmul" else 1
            if self.flag(4):  # layer -> BN -> layout -> ...: foldable once the BN is gone
                v = self.bn(v) if chan == 1 else self.axis_affine(v, chan)
        v, chan = self.layouts(v, chan)
        for _ in range(0 if self.flag(6) else self.draw(st.integers(1, 2))):
            on_axis_1 = chan == 1 or (chan is None and self.draw(st.booleans()))
            v = self.bn(v) if self.flag(3) != on_axis_1 else self.axis_affine(v, chan)
        tail = self.choice(["relu", None, None, "layout"])
        if tail == "relu":
            v = self.relu(v)
        elif tail == "layout":
            v, _ = self.layout(v, chan)
        return v

    def affine_layout_layer(self, v: Value) -> Value:
        """An affine chain -> layout-only nodes -> a layer (BatchNorm2d -> Flatten -> Linear): the
        forward fold through layout nodes."""
        chan = 1
        for _ in range(self.draw(st.integers(1, 2))):
            kind = self.choice(["bn", "bn", "axis_affine", "scale"])
            if kind == "bn":
                v = self.bn(v)
            elif kind == "scale":
                v = self.pure_scale(v)
            else:
                v = self.axis_affine(v, chan)
        v, chan = self.layouts(v, chan)
        if len(v.shape) == 2:
            return self.gemm(v) if self.draw(st.booleans()) else self.matmul(v)
        if self.dtype != np.float32 or self.flag(4):
            return self.matmul(v)
        if self.flag(4):
            return self.conv_transpose(v)
        return self.conv(v, unpadded=not self.flag(4))
