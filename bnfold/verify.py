"""Prove the folded model computes what the original computes.

1. onnx.checker (full: strict shape inference) on the folded model;
2. analytic: every folded weight/bias equals its float64 recomputation from the *original* stored
   parameters to within 1 ulp of its dtype. The affine maps are recomputed by running the original
   BN / Mul / Add nodes in onnx's reference evaluator, independently of `fold_math`, so a wrong fold
   formula (say, a dropped epsilon) is caught even where output tolerances would let it through;
3. both models run in onnxruntime on CPU with graph optimizations OFF (onnxruntime fuses Conv+BN
   itself from ORT_ENABLE_BASIC on, which would compare the fold with itself) on seeded random inputs,
   each output and each folded layer's tensor compared element-wise with bnfold.compare's
   criterion (docs/verification.md); onnxruntime runs in a child process (bnfold.ort_child).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import warnings
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import onnx

from bnfold.affine_probe import magnitude_constants, probe_affines, probe_spec
from bnfold.constants import EvaluatedConstant, recompute
from bnfold.errors import first_line
from bnfold.fold_math import ChannelAffine, compose_affines, is_bfloat16, spread_affine
from bnfold.ort_child import Child
from bnfold.provenance import LayerProvenance as Provenance
from bnfold.report import TensorCheck, Verification
from bnfold.rules.layers import fold_parameters, match_layer, peak_abs
from bnfold.run_config import RunConfig
from bnfold.runtime import Tensors, compare_outputs
from bnfold.tensors import TensorStore
from bnfold.walk import iter_scopes

# float64 slack of the recomputation itself, relative to the magnitude of the values involved.
RECOMPUTE_SLACK = 1e-12
ULP_SLICE = 1 << 16  # elements per slice of the ulp check (512 kB of float64)
SMALL_TENSOR = 4096  # tensors up to this size are checked in one batch per dtype

ModelSource = onnx.ModelProto | str | os.PathLike


def verify(
    original: ModelSource,
    folded: onnx.ModelProto,
    *,
    provenance: Sequence[Provenance] = (),
    config: RunConfig | None = None,
    run_onnxruntime: bool = True,
    store: TensorStore | None = None,
    folded_file: str | os.PathLike | None = None,
    evaluated: Sequence[EvaluatedConstant] = (),
) -> Verification:
    """Check `folded` against `original`; the result's `.passed` says whether every check passed.
    `folded_file`: the same model as written to disk, which onnxruntime then runs (so what is
    verified is exactly what was written, and no second serialisation is needed)."""
    config = config or RunConfig()
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        # Overflow/NaN warnings from numpy or onnx's evaluator would leak onto stderr; every
        # non-finite value is already compared and reported explicitly.
        warnings.simplefilter("ignore", RuntimeWarning)
        return _verify(original, folded, provenance, config, run_onnxruntime, store, folded_file, evaluated)


def _verify(original, folded, provenance, config: RunConfig, run_onnxruntime: bool,
            store: TensorStore | None, folded_file: str | os.PathLike | None,
            evaluated: Sequence[EvaluatedConstant] = ()) -> Verification:
    result = Verification(seed=config.seed)
    store = store or TensorStore()
    store.materialize(folded, nested_only=True)  # subgraph tensors are checked with their graphs
    result.checker_passed, result.checker_message = _check_model(folded, original, store)
    if not run_onnxruntime:
        result.tensors = analytic_checks(folded, provenance, store) + evaluated_checks(folded, evaluated, store)
        result.runtime_status = "not run: switched off"
        return result
    # The analytic check (numpy, one thread) runs while onnxruntime builds its sessions, which is
    # mostly single-threaded too: on two cores that hides most of its cost on large weights (numpy
    # releases the GIL). On graphs of many small layers both are GIL-bound Python work and the
    # thread neither helps nor hurts (measured). Both only read the models and the store.
    # onnxruntime's process starts first: its imports overlap with the checks below.
    with Child() if config.isolated else _no_child() as child, \
            ThreadPoolExecutor(max_workers=1, thread_name_prefix="bnfold-analytic") as pool:
        tensors = pool.submit(_analytic_checks_quietly, folded, provenance, store)
        compare_outputs(original, folded, result, config, store, folded_file, folded_tensors(folded, provenance),
                        child)
        result.tensors = tensors.result() + evaluated_checks(folded, evaluated, store)
    return result


@contextlib.contextmanager
def _no_child() -> Iterator[None]:
    yield None


def folded_tensors(folded: onnx.ModelProto, provenance: Sequence[Provenance]) -> Tensors:
    """The tensor each folded layer (or the chain it absorbed) produces, named alike in both models:
    a backward fold's chain end (the BN's output), a forward fold's layer output. Graph outputs are
    compared anyway. `complete` only when every fold is in the main graph and its tensor exists."""
    produced = {name for node in folded.graph.node for name in node.output}
    outputs = {o.name for o in folded.graph.output}
    names: list[str] = []
    complete = bool(provenance)
    for record in provenance:
        # A merged Conv of branches keeps the sum's name; a layer fold, its chain end's (or its own).
        post = getattr(record, "post", None)
        name = post[-1].nodes[-1].output[0] if post else record.output
        if record.scope != "main" or name not in produced:
            complete = False
        elif name not in outputs and name not in names:
            names.append(name)
    return Tensors(names, complete)


def _analytic_checks_quietly(folded: onnx.ModelProto, provenance: Sequence[Provenance], store: TensorStore
                             ) -> list[TensorCheck]:
    with np.errstate(all="ignore"):  # numpy's error state is per thread
        return analytic_checks(folded, provenance, store)


def _check_model(folded: onnx.ModelProto, original: ModelSource, store: TensorStore) -> tuple[bool, str]:
    try:
        _run_checker(folded, full_check=True)
        return True, "ok"
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError, ValueError) as error:
        strict_error = first_line(error)
    # Strict shape inference also fails on some valid exports (custom ops): if the original fails it
    # too, the fold did not cause it, and the folded model must still pass the plain checker.
    try:
        _run_checker(original if isinstance(original, onnx.ModelProto) else str(original), full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError, ValueError):
        try:
            _run_checker(folded, full_check=False)
            return True, f"ok (strict shape inference fails on the original too: {strict_error})"
        except (onnx.checker.ValidationError, ValueError) as error:
            return False, first_line(error)
    return False, strict_error


def _run_checker(model: onnx.ModelProto | str, full_check: bool) -> None:
    """onnx.checker, plus strict shape inference with `full_check` — both on the weight-free
    skeleton (weights cannot change either verdict; serialising them for the checker costs a full
    copy of the model and, above 2 GB, a trip through the disk)."""
    from bnfold.shapes import weight_free

    if isinstance(model, str):
        model = onnx.load(model, load_external_data=False)
    onnx.checker.check_model(weight_free(model, empty_stubs=True))
    if full_check:
        onnx.shape_inference.infer_shapes(weight_free(model), check_type=True, strict_mode=True)


# --- analytic check ------------------------------------------------------------------------------


def analytic_checks(folded: onnx.ModelProto, provenance: Sequence[Provenance], store: TensorStore) -> list[TensorCheck]:
    """Compare each written tensor with a float64 recomputation from the original parameters."""
    from bnfold.verify_branches import branch_checks

    tensors = _initializers_by_scope(folded)
    merged = [record for record in provenance if not isinstance(record, Provenance)]
    provenance = [record for record in provenance if isinstance(record, Provenance)]
    checks: list[TensorCheck] = branch_checks(merged, tensors, store) if merged else []
    small = _SmallTensorBatch()
    for record, expected in zip(provenance, _expected_parameters(provenance)):
        layer_name = record.layer_node.name or record.output
        if isinstance(expected, Exception):  # never a traceback, never a pass: each tensor fails
            why = f"not recomputed: {type(expected).__name__}: {first_line(expected)}"
            checks.extend(TensorCheck(name, layer_name, float("inf"), False, why[:200]) for name in record.written)
            continue
        for slot, (name, values) in enumerate(zip(record.written, expected.params)):
            # Only a bias sums terms that may cancel; weights are only ever scaled.
            floor = expected.magnitude if slot == 1 else 0.0
            written = tensors.get((record.scope, name))
            if written is None:
                checks.append(TensorCheck(name, layer_name, float("inf"), False))
                continue
            array = store.read(written)
            if array.size == values.size:
                # Same values, maybe another shape: a bias placed after a Transpose is stored as
                # [C, 1, ...] to broadcast on the channels' new axis. Compared in channel order.
                array, values = array.reshape(-1), values.reshape(-1)
            elif array.size == 1 and values.ndim == 1:
                # One value for every channel (a bias of scalar maps only, stored as [1] where the
                # channel axis moved): it must equal each channel's expected value.
                array = np.broadcast_to(array.reshape(-1), values.shape)
            if array.shape == values.shape and values.size <= SMALL_TENSOR:
                small.add(len(checks), array, values, floor)
                checks.append(TensorCheck(name, layer_name, float("nan"), False))  # filled in below
                continue
            error = ulp_error(array, values, floor)
            checks.append(TensorCheck(name, layer_name, error, error <= 1.0))
    for position, error in small.errors():
        checks[position] = dataclasses.replace(checks[position], max_ulp_error=error, passed=error <= 1.0)
    return checks


def evaluated_checks(folded: onnx.ModelProto, evaluated: Sequence[EvaluatedConstant], store: TensorStore
                     ) -> list[TensorCheck]:
    """Each training-mode BN replaced by its value, against the BN run again in float64 by onnx's
    reference evaluator: the initializer if still in the model, else the value the folds that
    consumed it read."""
    if not evaluated:
        return []
    tensors = _initializers_by_scope(folded)
    checks = []
    for record in evaluated:
        name, label = record.node.output[0], record.node.name or record.node.output[0]
        written = tensors.get((record.scope, name))
        values = store.read(written) if written is not None else record.values
        try:
            with np.errstate(all="ignore"):
                expected = recompute(record)
        except Exception as error:  # noqa: BLE001 - a check that cannot run fails, never passes
            checks.append(TensorCheck(name, label, float("inf"), False, f"not recomputed: {type(error).__name__}"))
            continue
        error = ulp_error(values, expected)
        checks.append(TensorCheck(name, label, error, error <= 1.0))
    return checks


class _SmallTensorBatch:
    """Small tensors (biases, the weights of small layers) checked together: one vectorised pass
    per dtype instead of a dozen numpy calls per tensor, which dominated graphs of many small layers."""

    def __init__(self) -> None:
        self._by_dtype: dict[np.dtype, list[tuple[int, np.ndarray, np.ndarray]]] = {}

    def add(self, position: int, written: np.ndarray, expected: np.ndarray, floor: float = 0.0) -> None:
        self._by_dtype.setdefault(written.dtype, []).append(
            (position, written.reshape(-1), expected.reshape(-1), floor))

    def errors(self) -> Iterator[tuple[int, float]]:
        for items in self._by_dtype.values():
            yield from ((position, 0.0) for position, _, expected, _ in items if not expected.size)
            items = [item for item in items if item[2].size]
            if not items:
                continue
            sizes = np.array([expected.size for _, _, expected, _ in items])
            expected = np.concatenate([e for _, _, e, _ in items]).astype(np.float64, copy=False)
            written = np.concatenate([w for _, w, _, _ in items])
            starts = np.concatenate(([0], np.cumsum(sizes)[:-1]))
            largest = np.maximum.reduceat(np.abs(expected), starts)  # NaN stays NaN: then no slack
            largest = np.maximum(np.where(np.isfinite(largest), largest, 0.0), [floor for *_, floor in items])
            slack = np.repeat(RECOMPUTE_SLACK * largest, sizes)
            worst = np.maximum.reduceat(_ulp_errors(written, expected, slack), starts)
            for (position, *_), error in zip(items, worst):
                yield position, float("inf") if np.isnan(error) else float(error)


def ulp_error(written: np.ndarray, expected: np.ndarray, floor: float = 0.0) -> float:
    """max |written - expected| in units of the written dtype's spacing at `expected`.

    A float64 slack proportional to the values' magnitude absorbs the recomputation's own rounding.
    Equal infinities and NaN against NaN count as exact; any other non-finite difference is inf.
    Computed in slices that stay in cache: this runs over every folded weight, and whole-array
    float64 temporaries would cost several copies of the model in memory and time. `floor`: a
    magnitude the slack is at least relative to (the terms a bias was summed from).
    """
    if written.shape != expected.shape:
        return float("inf")
    written, expected = written.reshape(-1), expected.reshape(-1)
    slices = [slice(start, start + ULP_SLICE) for start in range(0, expected.size, ULP_SLICE)]
    # NaN anywhere makes `largest` NaN, and then there is no slack (as for inf).
    largest = float(np.max([np.max(np.abs(expected[s])) for s in slices], initial=0.0))
    slack = RECOMPUTE_SLACK * max(largest if np.isfinite(largest) else 0.0, floor)
    worst = max((float(_ulp_errors(written[s], expected[s], slack).max(initial=0.0)) for s in slices), default=0.0)
    return float("inf") if np.isnan(worst) else worst


def _ulp_errors(written: np.ndarray, expected: np.ndarray, slack: float | np.ndarray) -> np.ndarray:
    """Per element: max(|written - expected| - slack, 0) in ulps of the written dtype at `expected`."""
    dtype = written.dtype if not is_bfloat16(written.dtype) else np.dtype(np.float32)
    with np.errstate(invalid="ignore", over="ignore"):
        error = written.astype(np.float64)
        error -= expected
        np.abs(error, out=error)
        special = not np.isfinite(error).all()
        if special:  # rare: only then pay for the special-value masks
            written64 = written.astype(np.float64)
            same = (written64 == expected) | (np.isnan(written64) & np.isnan(expected))
            error = np.where(same, 0.0, np.nan_to_num(error, nan=np.inf, posinf=np.inf))
        spacing = np.spacing(expected.astype(dtype))
        np.abs(spacing, out=spacing)
        if special:  # no spacing at NaN/Inf: there the error is already 0 (same) or inf
            spacing[~np.isfinite(spacing)] = 1.0
        if is_bfloat16(written.dtype):
            spacing *= 2.0**16  # bfloat16 keeps 8 of float32's 24 significant bits
        error -= slack
        np.maximum(error, 0.0, out=error)
        error /= spacing
    return error


@dataclass
class _Expected:
    """A folded layer's parameters recomputed in float64, and the magnitude of the terms that went
    into them: rounding slack is relative to that, not to the result, which cancellation can bring
    to ~0 (a BN whose beta equals mean * gamma / sqrt(var + eps) has shift 0 up to rounding)."""

    params: list[np.ndarray]
    magnitude: float


def _expected_parameters(provenance: Sequence[Provenance]) -> Iterator[_Expected | Exception]:
    """The float64 parameters each folded layer should hold, in `record.written` order (or why they
    could not be recomputed). A generator: the float64 weights of one layer at a time, never of the
    whole model."""
    from bnfold.graph import GraphIndex

    segments = [(record, segment) for record in provenance for segment in record.pre + record.post]
    specs = [probe_spec(segment.nodes, record.constants, segment.rank) for record, segment in segments]
    specs += [probe_spec(segment.nodes, magnitude_constants(segment.nodes, record.constants), segment.rank)
              for record, segment in segments]
    try:
        probed = probe_affines(specs)  # all chains at once: tiny arrays, evaluated in stacks
    except Exception as error:  # noqa: BLE001 - reported per tensor as "not checked"
        yield from (error for _ in provenance)
        return
    affines, bounds = iter(probed[:len(segments)]), iter(probed[len(segments):])
    for record in provenance:
        pre = [_spread(next(affines), segment) for segment in record.pre]
        post = [_restricted(next(affines), segment) for segment in record.post]
        pre_bound = max([_peak(next(bounds).shift) for _ in record.pre], default=0.0)
        post_bound = max([_peak(next(bounds).shift) for _ in record.post], default=0.0)
        try:
            layer = match_layer(record.layer_node, GraphIndex.of_constants([record.layer_node], record.layer_params, 21))
            params = fold_parameters(layer, compose_affines(pre), compose_affines(post))
        except Exception as error:  # noqa: BLE001
            yield error
            continue
        yield _Expected([params.weight] + ([params.bias] if params.bias is not None else []),
                        _magnitude(layer, pre, post, pre_bound, post_bound))


def _magnitude(layer, pre: list[ChannelAffine], post: list[ChannelAffine], pre_bound: float, post_bound: float) -> float:
    """A bound on the terms summed into any folded parameter: |W|·fan-in·|pre shift| for a forward
    fold's bias, |b|·|post scale| and the post shift's own terms for a backward one."""
    gain = max([1.0] + [abs(layer.attributes.get(k, 1.0)) for k in ("alpha", "beta")])
    scale = max([1.0] + [_peak(a.scale) for a in pre + post])
    bias = _peak(layer.bias) if layer.bias is not None else 0.0
    total = gain * scale * bias + post_bound * scale
    if pre:  # only a forward fold sums weights into the bias: only then read every weight once more
        fan_in = layer.weight.size // max(layer.out_channels, 1)
        total += gain * scale * _peak(layer.weight) * fan_in * (1.0 + pre_bound)
    return total if np.isfinite(total) else 0.0


def _peak(values: np.ndarray) -> float:
    """max |values|, 0 when not all finite (then no slack is added)."""
    peak = peak_abs(values)
    return peak if np.isfinite(peak) else 0.0


def _restricted(affine: ChannelAffine, segment) -> ChannelAffine:
    """The part of a chain's map a layer absorbed: its channel slice (after a Concat), or only the
    scale (the second layer of an Add: the shift went into the first)."""
    if segment.channels is not None:
        first, count = segment.channels
        affine = affine.expanded(max(affine.channels, first + count))
        affine = ChannelAffine(affine.scale[first:first + count], affine.shift[first:first + count])
    if segment.scale_only:
        affine = ChannelAffine(affine.scale, np.zeros_like(affine.shift))
    return affine


def _spread(affine: ChannelAffine, segment) -> ChannelAffine:
    return affine if segment.spread is None else spread_affine(affine, segment.spread)


def _initializers_by_scope(model: onnx.ModelProto) -> dict[tuple[str, str], onnx.TensorProto]:
    found: dict[tuple[str, str], onnx.TensorProto] = {}
    for scope, body in iter_scopes(model):
        if isinstance(body, onnx.GraphProto):
            found.update(((scope, t.name), t) for t in body.initializer)
        else:  # a fold inside a function body writes its parameters as Constant nodes there
            found.update(((scope, node.output[0]), node.attribute[0].t) for node in body.node
                         if node.op_type == "Constant" and len(node.attribute) == 1
                         and node.attribute[0].name == "value")
    return found

