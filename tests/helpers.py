"""What many test files share: running a model in onnxruntime with every optimization off, random
inputs for it, the CLI in-process, the committed sample models. Models themselves are built with
the one GraphBuilder (benchmarks/graph_builder.py), shared with the benchmarks."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper

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
