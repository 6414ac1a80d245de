"""Run original and folded model in onnxruntime (CPU, graph optimizations OFF) and compare outputs."""

from __future__ import annotations

import io
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx

from bnfold.errors import BadInputError, check_tolerance, first_line
from bnfold.fold_math import is_bfloat16, is_float
from bnfold.model_io import EXTERNAL_ABOVE_BYTES, save_model_atomic
from bnfold.report import OutputCheck, Verification
from bnfold.serialize import estimated_size, write_model
from bnfold.tensors import TensorStore

# Default output tolerances per element type: (rtol, atol).
TOLERANCES = {
    onnx.TensorProto.FLOAT: (1e-4, 1e-5),
    onnx.TensorProto.DOUBLE: (1e-9, 1e-12),
    onnx.TensorProto.FLOAT16: (1e-2, 1e-3),
    onnx.TensorProto.BFLOAT16: (5e-2, 1e-2),
}
EXACT = (0.0, 0.0)
DEFAULT_BATCH = 2
DEFAULT_DIM = 32


def session(model: onnx.ModelProto | str | os.PathLike, folder: str, provider: str = "CPUExecutionProvider",
            store: TensorStore | None = None):
    """An onnxruntime session with every graph optimization switched off. A model whose tensors
    are partly outside the proto (or above 2 GB) is streamed to `folder` and loaded from there."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 3
    if isinstance(model, onnx.ModelProto):
        if estimated_size(model) > EXTERNAL_ABOVE_BYTES:  # cannot be one protobuf: via the disk
            path = Path(folder) / f"model{len(os.listdir(folder))}.onnx"
            save_model_atomic(model, path, external_data=True, store=store)
            model = str(path)
        else:
            buffer = io.BytesIO()
            write_model(model, buffer, store)  # folded arrays streamed into the bytes, not the proto
            return ort.InferenceSession(buffer.getvalue(), options, providers=[provider])
    path = str(model)
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:
        # onnxruntime takes paths as UTF-8 text; a file name with other bytes is read here instead
        # (a model that needs its external data files then fails to load, and verification says so).
        return ort.InferenceSession(Path(path).read_bytes(), options, providers=[provider])
    return ort.InferenceSession(path, options, providers=[provider])


def graph_inputs(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    """Inputs the caller must feed: IR >= 4 initializers listed as inputs keep their defaults."""
    initializers = {t.name for t in model.graph.initializer}
    return [value for value in model.graph.input if value.name not in initializers]


def input_dtype(value: onnx.ValueInfoProto) -> np.dtype:
    """The numpy dtype of a graph input; BadInputError when its element type is missing or unknown."""
    try:
        return onnx.helper.tensor_dtype_to_np_dtype(value.type.tensor_type.elem_type)
    except KeyError:
        raise BadInputError(f"input '{value.name}' has no usable element type "
                            f"({value.type.tensor_type.elem_type}); verification cannot feed it (use --no-verify)") from None


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
        dtype = input_dtype(value)
        if is_float(dtype):
            feeds[value.name] = rng.uniform(-1.0, 1.0, size=shape).astype(dtype)
        elif dtype.kind in "iu":
            feeds[value.name] = rng.integers(0, 4, size=shape).astype(dtype)
        elif dtype.kind == "b":
            feeds[value.name] = rng.integers(0, 2, size=shape).astype(bool)
        else:
            raise BadInputError(f"input '{value.name}' has type {dtype}; verification cannot generate it")
    return feeds, defaulted


@dataclass
class RunConfig:
    """How verification feeds and runs the models (all optional)."""

    seed: int = 0
    input_shapes: dict[str, list[int]] = field(default_factory=dict)
    atol: float | None = None
    rtol: float | None = None
    inputs: dict[str, np.ndarray] | None = None  # user data; a leading extra axis holds samples
    iterations: int = 1  # random batches (seeds seed, seed+1, ...)
    providers: list[str] = field(default_factory=list)  # extra providers to run the folded model on
    save_inputs: str | None = None
    save_outputs: str | None = None

    def __post_init__(self) -> None:
        if self.seed < 0:
            raise BadInputError(f"seed must be a non-negative integer, got {self.seed}")
        if self.iterations < 1:
            raise BadInputError(f"iterations must be at least 1, got {self.iterations}")
        for name, value in (("atol", self.atol), ("rtol", self.rtol)):
            check_tolerance(name, value)


def feed_sets(inputs: list[onnx.ValueInfoProto], config: RunConfig) -> tuple[list[dict[str, np.ndarray]], dict]:
    """The input batches to run: the user's arrays (split along a leading sample axis), or
    `iterations` seeded random batches."""
    known = {v.name for v in inputs}
    named = set(config.input_shapes) | set(config.inputs or {})
    unknown = sorted(named - known)
    if unknown:
        raise BadInputError(f"unknown input '{unknown[0]}' (model inputs: {', '.join(sorted(known)) or 'none'})")
    ranks = {v.name: len(v.type.tensor_type.shape.dim) for v in inputs}
    for name, shape in config.input_shapes.items():
        if (rank := ranks.get(name)) and len(shape) != rank:
            raise BadInputError(f"--input-shape {name}: {len(shape)} dims given, the input has {rank}")
    if config.inputs is None:
        batches = [random_inputs(inputs, config.input_shapes, config.seed + i) for i in range(config.iterations)]
        return [feeds for feeds, _ in batches], batches[0][1] if batches else {}
    missing = sorted(known - set(config.inputs))
    if missing:
        raise BadInputError(f"--inputs has no array for input '{missing[0]}'")
    types = {v.name: input_dtype(v) for v in inputs}
    samples = {}
    for name, array in config.inputs.items():
        if array.dtype != types[name]:
            raise BadInputError(f"--inputs '{name}' has dtype {array.dtype}, the model input is {types[name]}")
        samples[name] = list(array) if array.ndim == ranks[name] + 1 else [array]
    counts = {len(v) for v in samples.values()}
    if len(counts) > 1:
        raise BadInputError(f"--inputs arrays hold different numbers of samples: {sorted(counts)}")
    count = counts.pop() if counts else 1
    return [{name: np.asarray(v[i]) for name, v in samples.items()} for i in range(count)], {}


class _CannotRun(Exception):
    """onnxruntime cannot load or run the *original* model (an old opset, a custom op)."""


def compare_outputs(original, folded: onnx.ModelProto, result: Verification, config: RunConfig,
                    store: TensorStore | None = None, folded_file: str | os.PathLike | None = None) -> None:
    """Fill `result.outputs` and `result.runtime_status`; never reports a pass it did not compute.
    onnxruntime loads the folded model from `folded_file` when given (the same model, on disk).

    When onnxruntime has no kernel for the original model (BN-6 and other pre-opset-7 exports), both
    models are run by onnx's reference evaluator instead, and the report says so.
    """
    # Folding never changes a graph's inputs or outputs, so the folded model describes both.
    batches, defaulted = feed_sets(graph_inputs(folded), config)
    result.input_shapes = {name: list(array.shape) for name, array in batches[0].items()} if batches else {}
    result.seeds = [config.seed + i for i in range(len(batches))] if config.inputs is None else []
    unavailable = _unavailable(config.providers)
    if unavailable:
        raise BadInputError(f"execution provider {unavailable} is not available in this onnxruntime "
                            f"(available: {', '.join(_available())})")
    try:
        names, references, candidates = _run_onnxruntime(original, folded if folded_file is None else str(folded_file),
                                                         batches, config, defaulted, result, store)
    except _CannotRun as why:
        if config.providers:
            result.runtime_status = f"not run: --providers need onnxruntime, but {why}"
            return
        try:
            # The file that will be delivered, when there is one, as onnxruntime would have run it.
            candidate = folded if folded_file is None else onnx.load(str(folded_file))
            names, references, candidates = _run_reference_evaluator(original, candidate, batches, store)
        except Exception as error:  # noqa: BLE001 - the evaluator cannot run it either: say both
            result.runtime_status = f"not run: {why}; onnx reference evaluator: {first_line(error)}"
            return
        result.runtime_engine = f"onnx reference evaluator ({why})"
    except RuntimeError as error:
        result.runtime_status = str(error)
        return
    output_types = {o.name: o.type.tensor_type.elem_type for o in folded.graph.output}
    for provider, runs in candidates.items():
        suffix = f"@{provider}" if provider else ""
        for position, name in enumerate(names):
            default_rtol, default_atol = default_tolerance(output_types.get(name, 0))
            rtol = default_rtol if config.rtol is None else config.rtol
            if config.atol is not None:
                atol = config.atol
            else:
                # Rounding differences accumulate in proportion to the values flowing through a
                # network, not to each output element: the default atol is relative to the output's
                # scale (max |reference|, at least 1), and the report states the value used.
                scale = max([1.0] + [_max_abs(ref[position]) for ref in references])
                atol = default_atol * scale
            checks = [compare_arrays(name + suffix, np.asarray(ref[position]), np.asarray(got[position]), atol, rtol)
                      for ref, got in zip(references, runs)]
            result.outputs.append(merge_checks(checks))
    result.runtime_status = "passed" if all(o.passed for o in result.outputs) else "failed"
    _save_arrays(config, batches, names, references, candidates[""])


def _run_onnxruntime(original, folded, batches, config: RunConfig, defaulted, result: Verification, store):
    """(output names, reference runs, {provider: folded runs}); _CannotRun when the original cannot
    be run, RuntimeError(status) when the folded model cannot."""
    with tempfile.TemporaryDirectory(prefix="bnfold-verify-") as folder:
        try:
            reference_session = session(original, folder)
        except Exception as error:  # noqa: BLE001 - whatever onnxruntime raises
            raise _CannotRun(f"onnxruntime cannot load the original model: {first_line(error)}") from None
        names = [o.name for o in reference_session.get_outputs()]
        try:
            references = [reference_session.run(None, feeds) for feeds in batches]
        except Exception as error:  # noqa: BLE001
            _raise_for_shapes(config, error)
            hint = ""
            if defaulted:  # maybe the shapes chosen for symbolic dims are what the model cannot take
                name, dims = next(iter(defaulted.items()))
                hint = (f" on default input shapes {result.input_shapes} (symbolic dims of '{name}': {', '.join(dims)};"
                        f" choose them with --input-shape {name}:D0,D1,...)")
            raise _CannotRun(f"onnxruntime cannot run the original model{hint}: {first_line(error)}") from None
        del reference_session
        candidates: dict[str, list] = {}  # "" is the CPU comparison every run makes
        for label, provider in [("", "CPUExecutionProvider"), *((p, p) for p in config.providers)]:
            try:
                candidate_session = session(folded, folder, provider, store)
                candidates[label] = [candidate_session.run(names, feeds) for feeds in batches]
            except Exception as error:  # noqa: BLE001
                raise RuntimeError(f"failed: onnxruntime ({provider}) cannot run the folded model: "
                                   f"{first_line(error)}") from None
    return names, references, candidates


def _raise_for_shapes(config: RunConfig, error: Exception) -> None:
    """Arrays or shapes the user gave that onnxruntime rejects are bad input (exit 2)."""
    if config.inputs is not None:
        raise BadInputError(f"onnxruntime rejected the --inputs arrays: {first_line(error)}") from None
    if config.input_shapes:
        raise BadInputError(f"onnxruntime rejected the --input-shape values {config.input_shapes}: "
                            f"{first_line(error)}") from None


def _run_reference_evaluator(original, folded: onnx.ModelProto, batches, store):
    from onnx.reference import ReferenceEvaluator

    model = original if isinstance(original, onnx.ModelProto) else onnx.load(str(original))
    if store is not None and store.has_deferred(folded):  # the evaluator needs self-contained models
        copy = onnx.ModelProto()
        copy.CopyFrom(folded)
        store.materialize(copy, keep_pending=True)
        folded = copy
    names = [o.name for o in model.graph.output]
    references = [ReferenceEvaluator(model).run(None, feeds) for feeds in batches]
    candidate = ReferenceEvaluator(folded)
    return names, references, {"": [candidate.run(names, feeds) for feeds in batches]}


def _max_abs(values) -> float:
    array = np.asarray(values)
    if array.dtype.kind not in "fc" and not is_bfloat16(array.dtype):
        return 0.0
    finite = np.abs(array[np.isfinite(array)].astype(np.float64))
    return float(finite.max(initial=0.0))


def merge_checks(checks: list[OutputCheck]) -> OutputCheck:
    """One check summarising the same output over several input batches (worst case)."""
    first = checks[0]
    return OutputCheck(first.name, max(c.max_abs_error for c in checks), max(c.max_rel_error for c in checks),
                       first.atol, first.rtol, sum(c.mismatches for c in checks), sum(c.elements for c in checks),
                       all(c.passed for c in checks))


def _save_arrays(config: RunConfig, batches, names, references, candidates) -> None:
    """--save-inputs / --save-outputs: npz files that reproduce a failure (samples stacked on axis 0)."""
    try:
        if config.save_inputs:
            _savez(config.save_inputs, {k: np.stack([b[k] for b in batches]) for k in batches[0]})
        if config.save_outputs:
            arrays = {f"reference/{n}": np.stack([r[i] for r in references]) for i, n in enumerate(names)}
            arrays.update({f"folded/{n}": np.stack([c[i] for c in candidates]) for i, n in enumerate(names)})
            _savez(config.save_outputs, arrays)
    except OSError as error:
        raise BadInputError(f"cannot write arrays: {error}") from None


def _savez(path: str, arrays: dict[str, np.ndarray]) -> None:
    with open(path, "wb") as handle:  # a file object: numpy would otherwise append ".npz" to the name
        np.savez(handle, **arrays)


def _available() -> list[str]:
    import onnxruntime as ort

    return ort.get_available_providers()


def _unavailable(providers: list[str]) -> str | None:
    return next((p for p in providers if p not in _available()), None)


def compare_arrays(name: str, reference: np.ndarray, candidate: np.ndarray, atol: float, rtol: float) -> OutputCheck:
    """Element-wise |a - b| <= atol + rtol * |b|; NaN/Inf must sit in the same places."""
    if reference.shape != candidate.shape:
        return OutputCheck(name, float("inf"), float("inf"), atol, rtol, reference.size, reference.size, False)
    if reference.dtype.kind not in "fc" and not is_bfloat16(reference.dtype):
        mismatches = int((reference != candidate).sum())
        return OutputCheck(name, float(mismatches > 0), float(mismatches > 0), atol, rtol, mismatches,
                           reference.size, mismatches == 0)
    ref = reference.astype(np.float64)
    got = candidate.astype(np.float64)
    finite = np.isfinite(ref) & np.isfinite(got)
    same_special = (np.isnan(ref) & np.isnan(got)) | (np.isinf(ref) & (ref == got))
    with np.errstate(invalid="ignore"):  # inf - inf where both sides agree on the same Inf
        error = np.abs(got - ref)
    within = finite & (error <= atol + rtol * np.abs(ref))
    mismatches = int((~(within | same_special)).sum())
    max_abs = float(error[finite].max(initial=0.0))
    scale = float(np.abs(ref[finite]).max(initial=0.0))
    max_rel = max_abs / scale if scale > 0 else max_abs
    return OutputCheck(name, max_abs, max_rel, atol, rtol, mismatches, int(ref.size), mismatches == 0)


def default_tolerance(elem_type: int) -> tuple[float, float]:
    """(rtol, atol) for an output of this element type; integers and bools compare exactly."""
    return TOLERANCES.get(elem_type, EXACT)
