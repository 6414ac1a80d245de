"""Prove the folded model computes what the original computes.

1. onnx.checker (full: strict shape inference) on the folded model;
2. analytic: every folded weight/bias equals its float64 recomputation from the *original* stored
   parameters to within 1 ulp of its dtype. The affine maps are recomputed by running the original
   BN / Mul / Add nodes in onnx's reference evaluator, independently of `fold_math`, so a wrong fold
   formula (say, a dropped epsilon) is caught even where output tolerances would let it through;
3. both models run in onnxruntime on CPU with graph optimizations OFF (onnxruntime fuses Conv+BN
   itself from ORT_ENABLE_BASIC on, which would compare the fold with itself) on seeded random inputs,
   each output compared element-wise: |a - b| <= atol + rtol * |b|, NaN/Inf in the same places.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import onnx

from bnfold.fold_math import ChannelAffine, is_bfloat16
from bnfold.graph import scoped_subgraphs
from bnfold.report import TensorCheck, Verification
from bnfold.rewrite import Provenance
from bnfold.rules.layers import fold_parameters, match_layer
from bnfold.runtime import RunConfig, compare_outputs
from bnfold.tensors import TensorStore

# float64 slack of the recomputation itself, relative to the magnitude of the values involved.
RECOMPUTE_SLACK = 1e-12
ULP_SLICE = 1 << 16  # elements per slice of the ulp check (512 kB of float64)

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
) -> Verification:
    """Check `folded` against `original`; the result's `.passed` says whether every check passed.
    `folded_file`: the same model as written to disk, which onnxruntime then runs (so what is
    verified is exactly what was written, and no second serialisation is needed)."""
    config = config or RunConfig()
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        # Overflow/NaN warnings from numpy or onnx's evaluator would leak onto stderr; every
        # non-finite value is already compared and reported explicitly.
        warnings.simplefilter("ignore", RuntimeWarning)
        return _verify(original, folded, provenance, config, run_onnxruntime, store, folded_file)


def _verify(original, folded, provenance, config: RunConfig, run_onnxruntime: bool,
            store: TensorStore | None, folded_file: str | os.PathLike | None) -> Verification:
    result = Verification(seed=config.seed)
    store = store or TensorStore()
    store.materialize(folded, nested_only=True)  # subgraph tensors are checked with their graphs
    result.checker_passed, result.checker_message = _check_model(folded, original, store)
    if not run_onnxruntime:
        result.tensors = analytic_checks(folded, provenance, store)
        result.runtime_status = "not run: switched off"
        return result
    # The analytic check (numpy, one thread) runs while onnxruntime builds its sessions, which is
    # mostly single-threaded too: on two cores that hides most of its cost. Both only read the
    # models and the store.
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="bnfold-analytic") as pool:
        tensors = pool.submit(_analytic_checks_quietly, folded, provenance, store)
        compare_outputs(original, folded, result, config, store, folded_file)
        result.tensors = tensors.result()
    return result


def _analytic_checks_quietly(folded: onnx.ModelProto, provenance: Sequence[Provenance], store: TensorStore
                             ) -> list[TensorCheck]:
    with np.errstate(all="ignore"):  # numpy's error state is per thread
        return analytic_checks(folded, provenance, store)


def _check_model(folded: onnx.ModelProto, original: ModelSource, store: TensorStore) -> tuple[bool, str]:
    try:
        _run_checker(folded, full_check=True)
        return True, "ok"
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError, ValueError) as error:
        strict_error = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    # Strict shape inference also fails on some valid exports (custom ops): if the original fails it
    # too, the fold did not cause it, and the folded model must still pass the plain checker.
    try:
        _run_checker(original if isinstance(original, onnx.ModelProto) else str(original), full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError, ValueError):
        try:
            _run_checker(folded, full_check=False)
            return True, f"ok (strict shape inference fails on the original too: {strict_error})"
        except (onnx.checker.ValidationError, ValueError) as error:
            return False, str(error).strip().splitlines()[0]
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
    tensors = _initializers_by_scope(folded)
    checks = []
    for record in provenance:
        expected = _expected_parameters(record)
        layer_name = record.layer_node.name or record.output
        for name, values in zip(record.written, expected):
            written = tensors.get((record.scope, name))
            if written is None:
                checks.append(TensorCheck(name, layer_name, float("inf"), False))
                continue
            error = ulp_error(store.read(written), values)
            checks.append(TensorCheck(name, layer_name, error, error <= 1.0))
    return checks


def ulp_error(written: np.ndarray, expected: np.ndarray) -> float:
    """max |written - expected| in units of the written dtype's spacing at `expected`.

    A float64 slack proportional to the values' magnitude absorbs the recomputation's own rounding.
    Equal infinities and NaN against NaN count as exact; any other non-finite difference is inf.
    Computed in slices that stay in cache: this runs over every folded weight, and whole-array
    float64 temporaries would cost several copies of the model in memory and time.
    """
    if written.shape != expected.shape:
        return float("inf")
    written, expected = written.reshape(-1), expected.reshape(-1)
    slices = [slice(start, start + ULP_SLICE) for start in range(0, expected.size, ULP_SLICE)]
    # NaN anywhere makes `largest` NaN, and then there is no slack (as for inf).
    largest = float(np.max([np.max(np.abs(expected[s])) for s in slices], initial=0.0))
    slack = RECOMPUTE_SLACK * (largest if np.isfinite(largest) else 0.0)
    return max((_ulp_error_slice(written[s], expected[s], slack) for s in slices), default=0.0)


def _ulp_error_slice(written: np.ndarray, expected: np.ndarray, slack: float) -> float:
    dtype = written.dtype if not is_bfloat16(written.dtype) else np.dtype(np.float32)
    with np.errstate(invalid="ignore", over="ignore"):
        error = written.astype(np.float64)
        error -= expected
        np.abs(error, out=error)
        if not np.isfinite(error).all():  # rare: only then pay for the special-value masks
            written64 = written.astype(np.float64)
            same = (written64 == expected) | (np.isnan(written64) & np.isnan(expected))
            error = np.where(same, 0.0, np.nan_to_num(error, nan=np.inf))
        spacing = np.spacing(expected.astype(dtype))
        np.abs(spacing, out=spacing)
        if is_bfloat16(written.dtype):
            spacing *= 2.0**16  # bfloat16 keeps 8 of float32's 24 significant bits
        error -= slack
        np.maximum(error, 0.0, out=error)
        error /= spacing
        worst = float(error.max(initial=0.0))
    return float("inf") if np.isnan(worst) else worst


def _expected_parameters(record: Provenance) -> list[np.ndarray]:
    """The float64 parameters the folded node(s) should hold, in `record.written` order."""
    from bnfold.graph import GraphIndex

    layer = match_layer(record.layer_node, GraphIndex.of_constants([record.layer_node], record.layer_params, 21))
    pre = _probe_affine(record.pre, record.constants, record.pre_rank)
    post = _probe_affine(record.post, record.constants, record.rank)
    params = fold_parameters(layer, pre, post)
    return [params.weight] + ([params.bias] if params.bias is not None else [])


def _probe_affine(nodes: list[onnx.NodeProto], constants: dict[str, np.ndarray], rank: int | None) -> ChannelAffine | None:
    """Recover (scale, shift) of a chain of original affine nodes by evaluating it on 0 and 1.

    The chain is run in float64 by onnx's reference evaluator on a probe tensor with one element
    per channel; f(0) = shift and f(1) - f(0) = scale. Constants are fed as inputs, so chains of
    the same shape (every Conv -> BN of a network) share one evaluator.
    """
    if not nodes:
        return None
    used = {name for node in nodes for name in node.input}
    constants = {name: value for name, value in constants.items() if name in used}
    rank = max([rank or 2] + [v.ndim for v in constants.values()])
    channels = max(max((v.size for v in constants.values()), default=1), 1)
    axis = _probe_axis(nodes, constants, rank)
    shape = [1] * rank
    shape[axis] = channels
    renamed, feeds = _renamed_chain(nodes, constants)
    key = (tuple(node.SerializeToString() for node in renamed), tuple(shape),
           tuple((name, value.shape) for name, value in feeds.items()))
    evaluator = _EVALUATORS.get(key)
    if evaluator is None:
        evaluator = _EVALUATORS[key] = _probe_evaluator(renamed, shape, feeds)
        if len(_EVALUATORS) > 256:
            _EVALUATORS.pop(next(iter(_EVALUATORS)))
    zero = evaluator.run(None, {"x": np.zeros(shape), **feeds})[0].reshape(-1)
    one = evaluator.run(None, {"x": np.ones(shape), **feeds})[0].reshape(-1)
    return ChannelAffine(one - zero, zero)


_EVALUATORS: dict[tuple, object] = {}


def _renamed_chain(nodes: list[onnx.NodeProto], constants: dict[str, np.ndarray]):
    """The chain with positional names (x, c0.., v0.., y) and its constants as float64 feeds."""
    names = {_data_input(nodes[0], constants): "x", nodes[-1].output[0]: "y"}
    feeds: dict[str, np.ndarray] = {}
    renamed = []
    for position, node in enumerate(nodes):
        copy = _as_opset15(node)
        copy = _copy_node(copy)
        copy.name = ""
        for i, name in enumerate(copy.input):
            if name in constants and name not in names:
                names[name] = f"c{len(feeds)}"
                feeds[names[name]] = np.asarray(constants[name], dtype=np.float64)
            copy.input[i] = names.get(name, name)
        if copy.output[0] not in names:
            names[copy.output[0]] = f"v{position}"
        copy.output[0] = names[copy.output[0]]
        renamed.append(copy)
    return renamed, feeds


def _probe_evaluator(nodes: list[onnx.NodeProto], shape: list[int], feeds: dict[str, np.ndarray]):
    from onnx.reference import ReferenceEvaluator

    double = onnx.TensorProto.DOUBLE
    inputs = [onnx.helper.make_tensor_value_info("x", double, shape)]
    inputs += [onnx.helper.make_tensor_value_info(name, double, value.shape) for name, value in feeds.items()]
    graph = onnx.helper.make_graph(nodes, "probe", inputs, [onnx.helper.make_tensor_value_info("y", double, None)])
    return ReferenceEvaluator(onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 15)]))


def _copy_node(node: onnx.NodeProto) -> onnx.NodeProto:
    copy = onnx.NodeProto()
    copy.CopyFrom(node)
    return copy


def _probe_axis(nodes: list[onnx.NodeProto], constants: dict[str, np.ndarray], rank: int) -> int:
    if any(node.op_type == "BatchNormalization" for node in nodes):
        return 1
    for node in nodes:
        for name in node.input:
            if name in constants and constants[name].size > 1:
                shape = constants[name].shape
                return rank - len(shape) + next(i for i, d in enumerate(shape) if d != 1)
    return rank - 1


def _data_input(node: onnx.NodeProto, constants: dict[str, np.ndarray]) -> str:
    return next(name for name in node.input if name and name not in constants)


def _as_opset15(node: onnx.NodeProto) -> onnx.NodeProto:
    """BN of any opset as BN-15 (same math): the probe model needs one opset for every node."""
    if node.op_type != "BatchNormalization":
        return node
    eps = next((a.f for a in node.attribute if a.name == "epsilon"), 1e-5)
    return onnx.helper.make_node("BatchNormalization", list(node.input[:5]), [node.output[0]], epsilon=eps)


def _initializers_by_scope(model: onnx.ModelProto) -> dict[tuple[str, str], onnx.TensorProto]:
    found: dict[tuple[str, str], onnx.TensorProto] = {}

    def visit(graph: onnx.GraphProto, scope: str) -> None:
        found.update(((scope, t.name), t) for t in graph.initializer)
        for path, body in scoped_subgraphs(graph, scope):
            visit(body, path)

    visit(model.graph, "main")
    return found

