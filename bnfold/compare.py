"""The element-wise comparison of a reference tensor with a candidate, and its default tolerances.

Criterion (docs/verification.md): per element |candidate - reference| <= atol + rtol * |reference|,
NaN/Inf in the same places, integers and bools exactly equal. The default atol is the dtype's atol
times a ROBUST scale of the values that flowed into the tensor: the largest 90th percentile of
|reference| (over finite elements, at least 1) among the tensor itself and the compared tensors
and graph inputs it is computed from. Rounding differences between two float evaluations are
made where values are large and carried on (a layer that shrinks its input keeps its input's
rounding error), so an absolute floor proportional to the typical upstream value is needed; a
percentile, unlike the maximum, cannot be raised by a few large elements.
"""

from __future__ import annotations

import numpy as np
import onnx

from bnfold.fold_math import is_bfloat16
from bnfold.report import OutputCheck

# Default output tolerances per element type: (rtol, atol at scale 1).
TOLERANCES = {
    onnx.TensorProto.FLOAT: (1e-4, 1e-5),
    onnx.TensorProto.DOUBLE: (1e-9, 1e-12),
    onnx.TensorProto.FLOAT16: (1e-2, 1e-3),
    onnx.TensorProto.BFLOAT16: (5e-2, 1e-2),
}
EXACT = (0.0, 0.0)
SCALE_QUANTILE = 0.9  # fewer than 10% of a tensor's elements cannot set its scale
NOTHING_COMPARED = "no finite reference values compared"


def default_tolerance(elem_type: int) -> tuple[float, float]:
    """(rtol, atol at scale 1) for a tensor of this element type; integers and bools compare exactly."""
    return TOLERANCES.get(elem_type, EXACT)


def _is_float(array: np.ndarray) -> bool:
    return array.dtype.kind in "fc" or is_bfloat16(array.dtype)


def robust_scale(arrays: list) -> float:
    """max over `arrays` of the 90th percentile ("lower": an element of the array, never an
    interpolation towards the largest) of |finite values|, at least 1."""
    scale = 1.0
    for values in arrays:
        array = np.asarray(values)
        if not _is_float(array):
            continue
        finite = np.abs(array[np.isfinite(array)].astype(np.float64))
        if finite.size:
            scale = max(scale, float(np.quantile(finite, SCALE_QUANTILE, method="lower")))
    return scale


def upstream_scales(graph: onnx.GraphProto, scales: dict[str, float]) -> dict[str, float]:
    """For each name in `scales` (compared tensors and graph inputs, with their robust scales): the
    largest scale among it and the named values it is computed from. One pass in graph order;
    inputs read only for their shape or dtype carry no values, hence no rounding."""
    from bnfold.rules.readers import reads_only_shape

    carried = {name: scale for name, scale in scales.items()}
    for node in graph.node:
        inflow = max((carried.get(name, 0.0) for name in node.input if name and not reads_only_shape(node, name)),
                     default=0.0)
        for name in node.output:
            if name:
                carried[name] = max(inflow, scales.get(name, 0.0))
    return {name: carried[name] for name in scales}


def tolerances_for(elem_type: int, scale: float, atol: float | None, rtol: float | None) -> tuple[float, float]:
    """(atol, rtol) for one tensor: the user's values, else the dtype's defaults at `scale`."""
    default_rtol, default_atol = default_tolerance(elem_type)
    if atol is None:
        atol = default_atol * scale if default_atol else 0.0
    return atol, default_rtol if rtol is None else rtol


def compare_arrays(name: str, reference: np.ndarray, candidate: np.ndarray, atol: float, rtol: float) -> OutputCheck:
    """Element-wise |a - b| <= atol + rtol * |b|; NaN/Inf must sit in the same places. A tensor
    with no finite reference value compared fails: a comparison of nothing proves nothing."""
    if reference.shape != candidate.shape:
        return OutputCheck(name, float("inf"), float("inf"), atol, rtol, reference.size, reference.size, False,
                           note=f"shapes differ: {list(reference.shape)} vs {list(candidate.shape)}")
    if reference.dtype != candidate.dtype:
        return OutputCheck(name, float("inf"), float("inf"), atol, rtol, reference.size, reference.size, False,
                           note=f"element types differ: {reference.dtype} vs {candidate.dtype}")
    if not _is_float(reference):
        mismatches = int((reference != candidate).sum())
        return _finish(OutputCheck(name, float(mismatches > 0), float(mismatches > 0), atol, rtol, mismatches,
                                   reference.size, mismatches == 0, compared=int(reference.size)))
    ref = reference.astype(np.float64)
    got = candidate.astype(np.float64)
    finite = np.isfinite(ref) & np.isfinite(got)
    same_special = (np.isnan(ref) & np.isnan(got)) | (np.isinf(ref) & (ref == got))
    with np.errstate(invalid="ignore"):  # inf - inf, 0 * inf where both sides agree on the same Inf
        error = np.abs(got - ref)
        within = finite & (error <= atol + rtol * np.abs(ref))
    mismatches = int((~(within | same_special)).sum())
    max_abs = float(error[finite].max(initial=0.0))
    scale = float(np.abs(ref[finite]).max(initial=0.0))
    max_rel = max_abs / scale if scale > 0 else max_abs
    compared = int(np.isfinite(ref).sum())
    return _finish(OutputCheck(name, max_abs, max_rel, atol, rtol, mismatches, int(ref.size), mismatches == 0,
                               compared=compared))


def _finish(check: OutputCheck) -> OutputCheck:
    if check.compared == 0:
        return OutputCheck(check.name, check.max_abs_error, check.max_rel_error, check.atol, check.rtol,
                           check.mismatches, check.elements, False, compared=0, note=NOTHING_COMPARED)
    return check


def merge_checks(checks: list[OutputCheck]) -> OutputCheck:
    """One check summarising the same tensor over several input batches (worst case); it fails when
    no batch compared a finite reference value."""
    first = checks[0]
    compared = sum(c.compared for c in checks)
    notes = [c.note for c in checks if c.note and c.note != NOTHING_COMPARED]
    merged = OutputCheck(first.name, max(c.max_abs_error for c in checks), max(c.max_rel_error for c in checks),
                         first.atol, first.rtol, sum(c.mismatches for c in checks), sum(c.elements for c in checks),
                         all(c.passed or c.note == NOTHING_COMPARED for c in checks) and compared > 0,
                         compared=compared, note=notes[0] if notes else (NOTHING_COMPARED if compared == 0 else ""))
    return merged
