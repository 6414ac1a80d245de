"""What many test files share: running a model in onnxruntime with every optimization off, random
inputs for it, the CLI in-process, the committed sample models, the smallest foldable model. Models
are built with the one GraphBuilder (benchmarks/graph_builder.py), shared with the benchmarks."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import onnx
import onnx.parser
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from benchmarks.graph_builder import GraphBuilder

if TYPE_CHECKING:  # pragma: no cover
    from click.testing import Result


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


def conv_bn_model(channels: int = 4, kernel: int = 1, size: int = 4, **conv_attrs: object) -> onnx.ModelProto:
    """The smallest model bnfold folds: x [1, C, size, size] -> Conv(w: [C, C, k, k]) -> c ->
    BatchNormalization(g, b, m, v) -> y, random weights (seed 0), unchecked (some callers pass
    attributes the checker rejects)."""
    g = GraphBuilder(np.random.default_rng(0))
    x = g.input("x", [1, channels, size, size])
    weight = g.initializer("w", g.rng.normal(size=(channels, channels, kernel, kernel)).astype(np.float32))
    conv = g.node("Conv", [x, weight], output="c", node_name="", **conv_attrs)  # unnamed, as exporters may
    r = g.rng
    statistics = (r.uniform(0.5, 2, channels), r.normal(size=channels), r.normal(size=channels),
                  r.uniform(0.5, 2, channels))  # variance positive
    params = [g.initializer(name, v.astype(np.float32)) for name, v in zip(("g", "b", "m", "v"), statistics)]
    y = g.node("BatchNormalization", [conv, *params], output="y", node_name="")
    out = size - kernel + 1 if not conv_attrs else None
    shape = [1, channels, out, out] if out else [None] * 4
    return g.model([helper.make_tensor_value_info(y, TensorProto.FLOAT, shape)], check=False, infer_shapes=False)


def model_from_text(text: str, initializers: dict[str, np.ndarray] | None = None, check: bool = True) -> onnx.ModelProto:
    """A model written in ONNX's text format (onnx.parser), plus initializers given as arrays, which the
    text format can only spell out literally. `check` runs the full ONNX checker."""
    model = onnx.parser.parse_model(text)
    model.graph.initializer.extend(numpy_helper.from_array(a, name) for name, a in (initializers or {}).items())
    if check:
        onnx.checker.check_model(model, full_check=True)
    return model
