"""fp16 accuracy: how far each tool's folded float16 ResNet is from the original float16 model.

    python -m benchmarks.fp16_accuracy        # writes benchmarks/FP16_RESULTS.md

The model is `resnet_small` from models.py with every weight and activation in float16. Each tool
folds it in its own process; original and folded models then run in onnxruntime (CPU, graph
optimizations OFF) on the same 5 seeded uniform(-1, 1) inputs. The error is max |folded - original|
/ max |original| over the outputs. Tools that are not installed are reported as such.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, numpy_helper

if not __package__:  # run as a script, not with -m: make the checkout's `benchmarks` package importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.models import build_resnet_small  # noqa: E402

HERE = Path(__file__).parent
TOOLS = {
    "bnfold": "import bnfold; bnfold.fold('{src}', verify=False).save('{out}')",
    "onnxruntime offline (ORT_ENABLE_BASIC)": (
        "import onnxruntime as ort; o = ort.SessionOptions(); "
        "o.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC; "
        "o.optimized_model_filepath = '{out}'; ort.InferenceSession('{src}', o, providers=['CPUExecutionProvider'])"),
    "onnxsim": "import onnx, onnxsim; m, _ = onnxsim.simplify(onnx.load('{src}')); onnx.save(m, '{out}')",
    "onnxslim": "import onnxslim; onnxslim.slim('{src}', '{out}')",
    "onnxoptimizer (fuse_bn_into_conv)": (
        "import onnx, onnxoptimizer; "
        "onnx.save(onnxoptimizer.optimize(onnx.load('{src}'), ['fuse_bn_into_conv']), '{out}')"),
}


def to_float16(model: onnx.ModelProto) -> onnx.ModelProto:
    """Every float32 initializer, input and output in float16 (BN parameters included)."""
    half = onnx.ModelProto()
    half.CopyFrom(model)
    for tensor in half.graph.initializer:
        if tensor.data_type == TensorProto.FLOAT:
            tensor.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(tensor).astype(np.float16), tensor.name))
    for value in [*half.graph.input, *half.graph.output]:
        value.type.tensor_type.elem_type = TensorProto.FLOAT16
    del half.graph.value_info[:]
    onnx.checker.check_model(half, full_check=True)
    return half


def run(path: str, feeds: dict[str, np.ndarray]) -> np.ndarray:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    return session.run(None, feeds)[0].astype(np.float64)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=HERE / "FP16_RESULTS.md", help="results markdown file")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        source = str(Path(folder) / "resnet_small_fp16.onnx")
        model = to_float16(build_resnet_small())
        onnx.save(model, source)
        value = model.graph.input[0]
        shape = [d.dim_value or 1 for d in value.type.tensor_type.shape.dim]
        rng = np.random.default_rng(0)
        feeds = [{value.name: rng.uniform(-1, 1, shape).astype(np.float16)} for _ in range(5)]
        references = [run(source, f) for f in feeds]
        for tool, code in TOOLS.items():
            out = str(Path(folder) / f"{len(rows)}.onnx")
            done = subprocess.run([sys.executable, "-c", code.format(src=source, out=out)],
                                  capture_output=True, text=True, check=False)
            if done.returncode:
                last = (done.stderr.strip().splitlines() or ["failed"])[-1]
                rows.append((tool, "not installed" if "ModuleNotFoundError" in last else f"failed: {last[:120]}",
                             "", ""))
                continue
            folded = onnx.load(out)
            left = sum(n.op_type == "BatchNormalization" for n in folded.graph.node)
            errors = [np.abs(run(out, f) - r).max() / np.abs(r).max() for f, r in zip(feeds, references)]
            rows.append((tool, f"{max(errors):.3g}", str(left), str(len(folded.graph.node))))
    bn = sum(n.op_type == "BatchNormalization" for n in model.graph.node)
    lines = [
        "# fp16 accuracy of folded models",
        "",
        f"Generated {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC by `python benchmarks/fp16_accuracy.py`; "
        f"onnx {onnx.__version__}, onnxruntime {ort.__version__}.",
        "",
        f"`resnet_small` in float16 ({len(model.graph.node)} nodes, {bn} BatchNormalization, input {shape}); "
        "error = max |folded − original| / max |original| over 5 seeded inputs, both models in onnxruntime "
        "with graph optimizations off.",
        "",
        "| tool | max relative output error | BN left | nodes |",
        "|---|---:|---:|---:|",
        *[f"| {tool} | {error} | {left} | {nodes} |" for tool, error, left, nodes in rows],
        "",
        "onnxoptimizer's `fuse_bn_into_conv` alone does not fold: it replaces each BN by nodes that compute",
        "the folded weights at run time (hence more nodes and, in fp16, no folding error at all).",
    ]
    args.output.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
