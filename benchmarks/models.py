"""Deterministic benchmark model generators for bnfold.

Every model is built with onnx.helper + numpy from a fixed seed, so two runs
on any machine produce byte-identical files and nothing is downloaded.
Models are written to a scratch directory (default /tmp/bnfold-bench), never
inside the repository, because the large ones are hundreds of MB to >2 GB.

    python -m benchmarks.models [--dir DIR] [--only NAME ...] [--huge]
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

if not __package__:  # run as a script, not with -m: make the checkout's `benchmarks` package importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.graph_builder import GraphBuilder  # noqa: E402

DEFAULT_DIR = Path("/tmp/bnfold-bench")
OPSET = 17
DEEP_BLOCKS, DEEP_C = 128, 255   # 128*255*255*9*4 B = 299.6 MB of conv weights
NO_BN_BLOCKS = 32
HUGE_BLOCKS, HUGE_C = 8, 2765    # 8*2765*2765*9*4 B = 2.20 GB (> 2 GiB protobuf limit)
PAIR_COUNTS = (250, 1000, 4000, 10000)
# Bump when a generator changes: cached models with another version are rebuilt.
GENERATOR_VERSION = 2


@dataclass
class ModelInfo:
    """What the report needs to know about a generated model."""
    name: str
    path: str
    nodes: int
    bn_nodes: int
    weight_bytes: int
    file_bytes: int
    external: bool
    version: int = GENERATOR_VERSION


# The benchmark models' own layer recipes on the shared builder: tensors are named after their
# layer (`conv3.w`, `bn3.scale`), nodes after the layer (`conv3`) with output `conv3.y`.


def conv_weight(rng: np.random.Generator, cout: int, cin: int, k: int) -> np.ndarray:
    # He-scaled so activations neither explode nor vanish over 128 layers
    # (an unscaled N(0,1) net overflows fp32 and makes verification moot).
    w = rng.standard_normal((cout, cin, k, k), dtype=np.float32)
    w *= np.float32(np.sqrt(2.0 / (cin * k * k)))
    return w


def bn_params(rng: np.random.Generator, c: int) -> list[np.ndarray]:
    return [rng.uniform(0.5, 1.5, c).astype(np.float32),       # scale
            (0.1 * rng.standard_normal(c)).astype(np.float32),  # bias
            (0.1 * rng.standard_normal(c)).astype(np.float32),  # mean
            rng.uniform(0.5, 1.5, c).astype(np.float32)]        # var


def op(g: GraphBuilder, op_type: str, inputs: list[str], tag: str, **attrs: object) -> str:
    return g.node(op_type, inputs, output=f"{tag}.y", node_name=tag, **attrs)


def conv(g: GraphBuilder, x: str, tag: str, w: np.ndarray | str, bias: np.ndarray | None = None,
         stride: int = 1) -> str:
    """Conv with `same` padding; `w` is an array (stored as `tag.w`) or the name of a stored weight (3x3)."""
    k = w.shape[-1] if isinstance(w, np.ndarray) else 3
    inputs = [x, g.initializer(f"{tag}.w", w) if isinstance(w, np.ndarray) else w]
    if bias is not None:
        inputs.append(g.initializer(f"{tag}.b", bias))
    return op(g, "Conv", inputs, tag, kernel_shape=[k, k], pads=[k // 2] * 4, strides=[stride, stride])


def bn(g: GraphBuilder, x: str, tag: str, c: int, params: list[np.ndarray] | None = None) -> str:
    params = params if params is not None else bn_params(g.rng, c)
    names = [g.initializer(f"{tag}.{p}", a) for p, a in zip(("scale", "bias", "mean", "var"), params)]
    return op(g, "BatchNormalization", [x, *names], tag, epsilon=1e-5)


def finish(g: GraphBuilder, name: str, in_shape: list[int], out: str, out_shape: list[int]) -> onnx.ModelProto:
    """The model of `g`: one float input "input", one declared output, no checker run (the huge model's
    weights are external and not loaded)."""
    g.input("input", in_shape)
    return g.model([helper.make_tensor_value_info(out, TensorProto.FLOAT, out_shape)], ir_version=onnx.IR_VERSION,
                   check=False, infer_shapes=False, graph_name=name, producer_name="bnfold-bench")


def conv_stack(blocks: int, c: int, with_bn: bool) -> tuple[GraphBuilder, str]:
    """Conv(3x3, pad 1)[->BN]->Relu repeated; bias only where no BN follows.

    BN keeps activations O(1) as in a trained net: var ~ scale**2 (x0.8-1.25)
    so each BN's gain is ~1 and He-scaled convs preserve magnitude. Fully
    random stats let magnitudes drift to ~1e3-1e7 over 128 layers, where
    float32 re-association noise alone fails any per-element verification.
    """
    g = GraphBuilder()
    x = "input"
    for i in range(blocks):
        bias = None if with_bn else np.zeros(c, np.float32) + np.float32(0.01)
        x = conv(g, x, f"conv{i}", conv_weight(g.rng, c, c, 3), bias)
        if with_bn:
            scale, beta, mean, _ = bn_params(g.rng, c)
            var = (scale * scale * g.rng.uniform(0.8, 1.25, c)).astype(np.float32)
            x = bn(g, x, f"bn{i}", c, [scale, beta, mean, var])
        x = op(g, "Relu", [x], f"relu{i}")
    return g, x


def build_deep_cnn() -> onnx.ModelProto:
    g, out = conv_stack(DEEP_BLOCKS, DEEP_C, with_bn=True)
    return finish(g, "deep_cnn", [1, DEEP_C, 8, 8], out, [1, DEEP_C, 8, 8])


def build_no_bn() -> onnx.ModelProto:
    g, out = conv_stack(NO_BN_BLOCKS, DEEP_C, with_bn=False)
    return finish(g, "no_bn", [1, DEEP_C, 8, 8], out, [1, DEEP_C, 8, 8])


def build_pairs(n: int) -> onnx.ModelProto:
    """n chained Conv(1x1, 4->4, no bias)->BN pairs: many tiny nodes, stresses per-node cost."""
    g = GraphBuilder()
    x = "input"
    for i in range(n):
        # No Relu between pairs, so a 10,000-deep linear chain must be norm
        # preserving to stay finite: orthogonal 1x1 kernels, and BN with
        # var = scale**2 so each BN only shifts (plus the tiny eps shrink).
        q, _ = np.linalg.qr(g.rng.standard_normal((4, 4)))
        x = conv(g, x, f"conv{i}", q.astype(np.float32).reshape(4, 4, 1, 1))
        scale, bias, mean, _ = bn_params(g.rng, 4)
        x = bn(g, x, f"bn{i}", 4, [scale, bias, mean, scale * scale])
    return finish(g, f"pairs_{n}", [1, 4, 8, 8], x, [1, 4, 8, 8])


def build_resnet_small() -> onnx.ModelProto:
    """ResNet-18-like (basic blocks, 3 stages) at 64x64 input, ~2.8M params."""
    g = GraphBuilder()
    x = op(g, "Relu", [bn(g, conv(g, "input", "stem", conv_weight(g.rng, 32, 3, 3)), "stem.bn", 32)], "stem.relu")
    cin = 32
    for s, c in enumerate((32, 64, 128)):
        for b in range(2):
            t, stride = f"s{s}b{b}", (2 if s > 0 and b == 0 else 1)
            y = bn(g, conv(g, x, f"{t}.c1", conv_weight(g.rng, c, cin, 3), stride=stride), f"{t}.bn1", c)
            y = op(g, "Relu", [y], f"{t}.r1")
            y = bn(g, conv(g, y, f"{t}.c2", conv_weight(g.rng, c, c, 3)), f"{t}.bn2", c)
            skip = x
            if stride != 1 or cin != c:
                skip = bn(g, conv(g, x, f"{t}.down", conv_weight(g.rng, c, cin, 1), stride=stride), f"{t}.dbn", c)
            x = op(g, "Relu", [op(g, "Add", [y, skip], f"{t}.add")], f"{t}.r2")
            cin = c
    x = op(g, "Flatten", [op(g, "GlobalAveragePool", [x], "gap")], "flat")
    fc_w = g.initializer("fc.w", (0.05 * g.rng.standard_normal((cin, 10))).astype(np.float32))
    fc_b = g.initializer("fc.b", np.zeros(10, np.float32))
    return finish(g, "resnet_small", [1, 3, 64, 64], op(g, "Gemm", [x, fc_w, fc_b], "fc"), [1, 10])


def write_huge_external(path: Path) -> tuple[onnx.ModelProto, int]:
    """>2 GB Conv->BN->Relu stack with all weights in one external file.

    Weights are streamed block by block straight into the .data file and the
    TensorProtos only reference offsets, so generation needs ~1 block (275 MB)
    of RAM instead of holding 2.2 GB twice as onnx.save_model would.
    """
    data_name = path.name + ".data"
    g = GraphBuilder()
    x, external_bytes = "input", 0
    with open(path.parent / data_name, "wb") as fh:
        for i in range(HUGE_BLOCKS):
            w = conv_weight(g.rng, HUGE_C, HUGE_C, 3)
            t = TensorProto(name=f"conv{i}.w", data_type=TensorProto.FLOAT, dims=w.shape,
                            data_location=TensorProto.EXTERNAL)
            for k, v in (("location", data_name), ("offset", str(fh.tell())), ("length", str(w.nbytes))):
                t.external_data.add(key=k, value=v)
            w.tofile(fh)
            g.initializers.append(t)
            external_bytes += w.nbytes
            del w
            x = conv(g, x, f"conv{i}", f"conv{i}.w")  # weight given by name: already external
            x = op(g, "Relu", [bn(g, x, f"bn{i}", HUGE_C)], f"relu{i}")
    model = finish(g, "huge_external", [1, HUGE_C, 4, 4], x, [1, HUGE_C, 4, 4])
    onnx.save_model(model, str(path))  # small tensors stay inline; the big ones already external
    inline_bytes = sum(numpy_helper.to_array(t).nbytes for t in g.initializers
                       if t.data_location != TensorProto.EXTERNAL)  # the BN parameters
    return model, external_bytes + inline_bytes


BUILDERS: dict[str, Callable[[], onnx.ModelProto]] = {
    "deep_cnn": build_deep_cnn,
    "no_bn": build_no_bn,
    "resnet_small": build_resnet_small,
    **{f"pairs_{n}": (lambda n=n: build_pairs(n)) for n in PAIR_COUNTS},
}


def _info(name: str, path: Path, model: onnx.ModelProto, weight: int, external: bool) -> ModelInfo:
    files = [path] + ([path.parent / (path.name + ".data")] if external else [])
    return ModelInfo(name, str(path), len(model.graph.node),
                     sum(n.op_type == "BatchNormalization" for n in model.graph.node),
                     int(weight), sum(f.stat().st_size for f in files), external)


def ensure_model(name: str, out_dir: Path = DEFAULT_DIR, regen: bool = False) -> ModelInfo:
    """Generate `name` into out_dir unless a cached copy with metadata exists."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path, meta = out_dir / f"{name}.onnx", out_dir / f"{name}.json"
    if path.exists() and meta.exists() and not regen:
        cached = json.loads(meta.read_text())
        if cached.get("version") == GENERATOR_VERSION:
            return ModelInfo(**cached)
    if name == "huge_external":
        model, weight = write_huge_external(path)
        info = _info(name, path, model, weight, external=True)
    else:
        model = BUILDERS[name]()
        onnx.save(model, str(path))
        weight = sum(numpy_helper.to_array(t).nbytes for t in model.graph.initializer)
        info = _info(name, path, model, weight, external=False)
    meta.write_text(json.dumps(asdict(info)))
    return info


def remove_model(info: ModelInfo) -> None:
    """Delete a generated model (used for the >2 GB one after the run)."""
    p = Path(info.path)
    for f in (p, p.with_suffix(".json"), p.parent / (p.name + ".data")):
        f.unlink(missing_ok=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", type=Path, default=DEFAULT_DIR)
    ap.add_argument("--only", nargs="*", default=list(BUILDERS))
    ap.add_argument("--huge", action="store_true", help="also write huge_external (2.2 GB)")
    args = ap.parse_args()
    for name in args.only + (["huge_external"] if args.huge else []):
        print(ensure_model(name, args.dir, regen=True))


if __name__ == "__main__":
    main()
