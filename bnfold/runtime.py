"""Run original and folded model in onnxruntime (CPU, graph optimizations OFF, in a child process) and
compare their outputs and the folded layers' tensors."""

from __future__ import annotations

import dataclasses
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx

from bnfold.compare import compare_arrays, merge_checks, robust_scale, tolerances_for, upstream_scales
from bnfold.discontinuous import discontinuous_sources
from bnfold.errors import BadInputError
from bnfold.fold_math import is_float
from bnfold.model_io import EXTERNAL_ABOVE_BYTES, save_model_atomic
from bnfold.ort_child import Child, CouldNotRun, OrtJob, OrtRuns, run_job
from bnfold.report import Verification
from bnfold.run_config import RunConfig
from bnfold.serialize import estimated_size, write_model
from bnfold.tensors import TensorStore

DEFAULT_BATCH = 2
DEFAULT_DIM = 32


def model_file(model: onnx.ModelProto | str | os.PathLike, folder: str, store: TensorStore | None = None) -> str:
    """The file onnxruntime loads for `model`: its own path, or a copy written to `folder` (folded
    arrays streamed from `store`; external data beside it above 2 GB)."""
    if not isinstance(model, onnx.ModelProto):
        return str(model)
    path = Path(folder) / f"model{len(os.listdir(folder))}.onnx"
    if estimated_size(model) > EXTERNAL_ABOVE_BYTES:  # cannot be one protobuf
        save_model_atomic(model, path, external_data=True, store=store)
    else:
        with open(path, "wb") as handle:
            write_model(model, handle, store)
    return str(path)


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
    if count == 0:
        raise BadInputError("--inputs arrays hold 0 samples (the leading sample axis has length 0)")
    return [{name: np.asarray(v[i]) for name, v in samples.items()} for i in range(count)], {}


class _CannotRun(Exception):
    """onnxruntime cannot load or run the *original* model (an old opset, a custom op)."""


@dataclass
class Tensors:
    """Intermediate tensors (outputs of folded layers) to compare besides the graph outputs.
    `complete`: they cover every fold, so outputs behind discontinuous ops may be excused."""

    names: list[str] = field(default_factory=list)
    complete: bool = False


def compare_outputs(original, folded: onnx.ModelProto, result: Verification, config: RunConfig,
                    store: TensorStore | None = None, folded_file: str | os.PathLike | None = None,
                    tensors: Tensors | None = None, child: Child | None = None) -> None:
    """Fill `result.outputs`, `result.intermediate_tensors` and `result.runtime_status`; never
    reports a pass it did not compute. onnxruntime (in `child`, or a new child process) loads the
    folded model from `folded_file` when given (the same model, on disk).

    When onnxruntime has no kernel for the original model (BN-6 and other pre-opset-7 exports), both
    models are run by onnx's reference evaluator instead, and the report says so.
    """
    tensors = tensors or Tensors()
    # Folding never changes a graph's inputs or outputs, so the folded model describes both.
    batches, defaulted = feed_sets(graph_inputs(folded), config)
    result.input_shapes = {name: list(array.shape) for name, array in batches[0].items()} if batches else {}
    result.seeds = [config.seed + i for i in range(len(batches))] if config.inputs is None else []
    result.input_source, result.samples = ("random" if config.inputs is None else "user"), len(batches)
    result.timeout = config.timeout
    unavailable = _unavailable(config.providers)
    if unavailable:
        raise BadInputError(f"execution provider {unavailable} is not available in this onnxruntime "
                            f"(available: {', '.join(_available())})")
    try:
        job = OrtJob("", "", batches, tensors.names, config.providers)
        runs = _run_onnxruntime(original, folded, folded_file, job, config, defaulted, result, store, child)
    except CouldNotRun as why:
        result.runtime_status = f"could not run: {why}"
        return
    except _CannotRun as why:
        if config.providers:
            result.runtime_status = f"not run: --providers need onnxruntime, but {why}"
            return
        # The file that will be delivered, when there is one, as onnxruntime would have run it; in a
        # child process of its own, under the same timeout.
        fallback = OrtJob("", "", batches, engine="reference")
        try:
            runs = _run_in_child(original, folded, folded_file, fallback, config, store, None)
        except CouldNotRun as reason:
            result.runtime_status = f"could not run: {why}; {reason}"
            return
        if runs.error is not None:  # the evaluator cannot run it either: say both
            result.runtime_status = f"not run: {why}; onnx reference evaluator: {runs.error[2]}"
            return
        result.runtime_engine = f"onnx reference evaluator ({why})"
    except RuntimeError as error:
        result.runtime_status = str(error)
        return
    _compare_runs(runs, folded, result, config, batches)
    compared = set(runs.names[runs.outputs:])
    if tensors.complete and tensors.names and compared == set(tensors.names):
        excuse_discontinuous(folded.graph, result, set(tensors.names))
    # A folded tensor is checked at its source with the outputs' criterion: a wrong fold fails even
    # where downstream ops (a Relu, a pooling, a selection) hide it from every output.
    ok = all(o.passed or o.not_comparable for o in result.outputs) and \
        all(t.passed for t in result.intermediate_tensors)
    result.runtime_status = "passed" if ok else "failed"
    graph_outputs = runs.names[:runs.outputs]
    _save_arrays(config, batches, graph_outputs, [r[:runs.outputs] for r in runs.references],
                 [c[:runs.outputs] for c in runs.candidates[""]])


def _compare_runs(runs: OrtRuns, folded: onnx.ModelProto, result: Verification, config: RunConfig,
                  batches: list[dict[str, np.ndarray]]) -> None:
    """Every fetched tensor, for every provider, with the same criterion (bnfold.compare)."""
    own = {name: robust_scale([ref[position] for ref in runs.references]) for position, name in enumerate(runs.names)}
    own.update((name, robust_scale([feeds[name] for feeds in batches])) for name in (batches[0] if batches else {}))
    scales = upstream_scales(folded.graph, own)
    for provider, candidate_runs in runs.candidates.items():
        suffix = f"@{provider}" if provider else ""
        for position, name in enumerate(runs.names):
            references = [np.asarray(ref[position]) for ref in runs.references]
            # The original's dtype sets the tolerance: a candidate may not loosen it by what it declares.
            atol, rtol = tolerances_for(_elem_type(references[0]), scales[name], config.atol, config.rtol)
            checks = [compare_arrays(name + suffix, ref, np.asarray(got[position]), atol, rtol)
                      for ref, got in zip(references, candidate_runs)]
            target = result.outputs if position < runs.outputs else result.intermediate_tensors
            target.append(merge_checks(checks))


def excuse_discontinuous(graph: onnx.GraphProto, result: Verification, folded: set[str]) -> None:
    """Outputs that differ only behind a discontinuous op are "not comparable" — but only when every
    folded tensor and every output not behind such an op matched; otherwise all fail as they are."""
    failed = [o for o in result.outputs if not o.passed]
    if not failed or not all(t.passed for t in result.intermediate_tensors):
        return
    sources = discontinuous_sources(graph, folded)
    names = {o.name for o in graph.output}
    origin = {}
    for check in failed:
        base = check.name if check.name in names else check.name.rpartition("@")[0]
        if base not in sources:
            return
        origin[check.name] = sources[base]
    result.outputs = [dataclasses.replace(o, not_comparable=f"downstream of {origin[o.name]}")
                      if o.name in origin else o for o in result.outputs]


def _elem_type(array: np.ndarray) -> int:
    try:
        return onnx.helper.np_dtype_to_tensor_dtype(array.dtype)
    except (KeyError, TypeError, ValueError):
        return 0


def _run_onnxruntime(original, folded, folded_file, job: OrtJob, config: RunConfig, defaulted,
                     result: Verification, store, child: Child | None) -> OrtRuns:
    """Both models' runs; _CannotRun when the original cannot be run, RuntimeError(status) when the
    folded model cannot, CouldNotRun when onnxruntime's process died or hung."""
    runs = _run_in_child(original, folded, folded_file, job, config, store, child)
    if runs.error is None:
        return runs
    kind, provider, message = runs.error
    if kind == "original_load":
        raise _CannotRun(f"onnxruntime cannot load the original model: {message}")
    if kind == "original_run":
        _raise_for_shapes(config, message)
        hint = ""
        if defaulted:  # maybe the shapes chosen for symbolic dims are what the model cannot take
            name, dims = next(iter(defaulted.items()))
            hint = (f" on default input shapes {result.input_shapes} (symbolic dims of '{name}': {', '.join(dims)};"
                    f" choose them with --input-shape {name}:D0,D1,...)")
        raise _CannotRun(f"onnxruntime cannot run the original model{hint}: {message}")
    raise RuntimeError(f"failed: onnxruntime ({provider}) cannot run the folded model: {message}")


def _raise_for_shapes(config: RunConfig, message: str) -> None:
    """Arrays or shapes the user gave that onnxruntime rejects are bad input (exit 2)."""
    if config.inputs is not None:
        raise BadInputError(f"onnxruntime rejected the --inputs arrays: {message}") from None
    if config.input_shapes:
        raise BadInputError(f"onnxruntime rejected the --input-shape values {config.input_shapes}: "
                            f"{message}") from None


def _run_in_child(original, folded, folded_file, job: OrtJob, config: RunConfig, store,
                  child: Child | None) -> OrtRuns:
    """`job` on both models' files (in-memory ones written to a temporary folder first), in `child`
    or a new child process (in this process only when `config.isolated` is off)."""
    with tempfile.TemporaryDirectory(prefix="bnfold-verify-") as folder:
        job.original = model_file(original, folder)
        job.folded = model_file(folded if folded_file is None else folded_file, folder, store)
        if not config.isolated:
            return run_job(job)
        with child or Child() as running:
            return running.run(job, config.timeout)


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


