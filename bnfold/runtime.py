"""Run original and folded model in onnxruntime (CPU, graph optimizations OFF) and compare outputs."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import onnx

from bnfold.errors import BadInputError
from bnfold.model_io import PROTOBUF_LIMIT, save_model_atomic
from bnfold.report import OutputCheck, Verification

DEFAULT_BATCH = 2
DEFAULT_DIM = 32


def session(model: onnx.ModelProto | str | os.PathLike, folder: str):
    """An onnxruntime CPU session with every graph optimization switched off."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 3
    if isinstance(model, onnx.ModelProto):
        if model.ByteSize() > PROTOBUF_LIMIT:
            path = Path(folder) / f"model{len(os.listdir(folder))}.onnx"
            save_model_atomic(model, path, external_data=True)
            model = str(path)
        else:
            return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])


def graph_inputs(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    """Inputs the caller must feed: IR >= 4 initializers listed as inputs keep their defaults."""
    initializers = {t.name for t in model.graph.initializer}
    return [value for value in model.graph.input if value.name not in initializers]


def random_inputs(
    inputs: list[onnx.ValueInfoProto], shapes: dict[str, list[int]], seed: int
) -> tuple[dict[str, np.ndarray], dict[str, list[str]]]:
    """Seeded inputs; symbolic dims default to 2 (batch, axis 0) or 32. Also returns which
    symbolic dims were defaulted, per input, for the error message if onnxruntime rejects them."""
    rng = np.random.default_rng(seed)
    feeds: dict[str, np.ndarray] = {}
    defaulted: dict[str, list[str]] = {}
    for value in inputs:
        tensor_type = value.type.tensor_type
        if not value.type.HasField("tensor_type"):
            raise BadInputError(f"input '{value.name}' is not a tensor; verification cannot feed it (use --no-verify)")
        if value.name in shapes:
            shape = list(shapes[value.name])
        else:
            shape = []
            for axis, dim in enumerate(tensor_type.shape.dim):
                if dim.HasField("dim_value"):
                    shape.append(dim.dim_value)
                else:
                    shape.append(DEFAULT_BATCH if axis == 0 else DEFAULT_DIM)
                    defaulted.setdefault(value.name, []).append(dim.dim_param or f"axis {axis}")
        dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor_type.elem_type)
        if dtype.kind == "f" or dtype.name == "bfloat16":
            feeds[value.name] = rng.uniform(-1.0, 1.0, size=shape).astype(dtype)
        elif dtype.kind in "iu":
            feeds[value.name] = rng.integers(0, 4, size=shape).astype(dtype)
        elif dtype.kind == "b":
            feeds[value.name] = rng.integers(0, 2, size=shape).astype(bool)
        else:
            raise BadInputError(f"input '{value.name}' has type {dtype}; verification cannot generate it")
    return feeds, defaulted


def compare_outputs(
    original, folded: onnx.ModelProto, result: Verification, shapes: dict[str, list[int]],
    atol: float | None, rtol: float | None,
) -> None:
    """Fill `result.outputs` and `result.runtime_status`; never reports a pass it did not compute."""
    from bnfold.verify import default_tolerance

    # Folding never changes a graph's inputs or outputs, so the folded model describes both.
    inputs = graph_inputs(folded)
    unknown = sorted(set(shapes) - {v.name for v in inputs})
    if unknown:
        raise BadInputError(f"--input-shape names unknown input '{unknown[0]}' "
                            f"(inputs: {', '.join(v.name for v in inputs) or 'none'})")
    feeds, defaulted = random_inputs(inputs, shapes, result.seed)
    result.input_shapes = {name: list(array.shape) for name, array in feeds.items()}
    output_types = {o.name: o.type.tensor_type.elem_type for o in folded.graph.output}
    with tempfile.TemporaryDirectory(prefix="bnfold-verify-") as folder:
        try:
            reference_session = session(original, folder)
        except Exception as error:  # noqa: BLE001 - whatever onnxruntime raises, say so and fail
            result.runtime_status = f"not run: onnxruntime cannot load the original model: {_line(error)}"
            return
        try:
            reference = reference_session.run(None, feeds)
        except Exception as error:  # noqa: BLE001
            if defaulted:
                name, dims = next(iter(defaulted.items()))
                raise BadInputError(
                    f"onnxruntime rejected the default shape {result.input_shapes[name]} for input '{name}' "
                    f"(symbolic dims: {', '.join(dims)}): pass --input-shape {name}:D0,D1,... ({_line(error)})"
                ) from None
            result.runtime_status = f"not run: onnxruntime cannot run the original model: {_line(error)}"
            return
        names = [o.name for o in reference_session.get_outputs()]
        del reference_session
        try:
            candidate = session(folded, folder).run(names, feeds)
        except Exception as error:  # noqa: BLE001
            result.runtime_status = f"failed: onnxruntime cannot run the folded model: {_line(error)}"
            return
    for name, ref, got in zip(names, reference, candidate):
        default_rtol, default_atol = default_tolerance(output_types.get(name, 0))
        result.outputs.append(compare_arrays(name, np.asarray(ref), np.asarray(got),
                                             default_atol if atol is None else atol,
                                             default_rtol if rtol is None else rtol))
    result.runtime_status = "passed" if all(o.passed for o in result.outputs) else "failed"


def compare_arrays(name: str, reference: np.ndarray, candidate: np.ndarray, atol: float, rtol: float) -> OutputCheck:
    """Element-wise |a - b| <= atol + rtol * |b|; NaN/Inf must sit in the same places."""
    if reference.shape != candidate.shape:
        return OutputCheck(name, float("inf"), float("inf"), atol, rtol, reference.size, reference.size, False)
    if reference.dtype.kind not in "fc" and reference.dtype.name != "bfloat16":
        mismatches = int((reference != candidate).sum())
        return OutputCheck(name, float(mismatches > 0), float(mismatches > 0), atol, rtol, mismatches,
                           reference.size, mismatches == 0)
    ref = reference.astype(np.float64)
    got = candidate.astype(np.float64)
    finite = np.isfinite(ref) & np.isfinite(got)
    same_special = (np.isnan(ref) & np.isnan(got)) | (np.isinf(ref) & (ref == got))
    error = np.abs(got - ref)
    within = finite & (error <= atol + rtol * np.abs(ref))
    mismatches = int((~(within | same_special)).sum())
    max_abs = float(error[finite].max(initial=0.0))
    scale = float(np.abs(ref[finite]).max(initial=0.0))
    max_rel = max_abs / scale if scale > 0 else max_abs
    return OutputCheck(name, max_abs, max_rel, atol, rtol, mismatches, int(ref.size), mismatches == 0)


def _line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0][:300] if text else type(error).__name__
