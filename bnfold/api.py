"""The public Python surface: `fold`, `verify`, `check`. No click, no printing."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import onnx

from bnfold import conformance, file_access
from bnfold.errors import BadInputError, VerificationError
from bnfold.model_io import check_structure, check_supported, load_model, save_model_atomic
from bnfold.report import Reason, Report, Verification, op_counts
from bnfold.rewrite import fold_model
from bnfold.run_config import RUN_CONFIG_FIELDS, RunConfig
from bnfold.tensors import TensorStore
from bnfold.verify import ModelSource
from bnfold.verify import verify as _verify
from bnfold.walk import iter_tensors


@dataclass
class FoldResult:
    """A folded model (a new ModelProto: the input is never mutated) and what was done to it.

    Folded weights stay in numpy (and an external-data input's weights in its files) until they
    are needed: `save` streams them to disk; `model` puts them into the proto on first access.
    """

    _model: onnx.ModelProto
    report: Report
    external_data: bool = False  # save with external data (the input had it)
    protected_files: set[Path] = field(default_factory=set)  # the input's data files
    store: TensorStore = field(default_factory=TensorStore)
    input_path: Path | None = None  # the input model's file (written only in place)

    @property
    def model(self) -> onnx.ModelProto:
        """The folded model as a self-contained ModelProto (every tensor's data inside it)."""
        self.store.materialize(self._model)
        return self._model

    def save(self, path: str | os.PathLike, external_data: bool | None = None,
             accept: Callable[[Path | None], bool] | None = None, *, in_place: bool = False) -> Path | None:
        """Write atomically; external data goes to a fresh `<path>.data`, never a file the input
        reads. `path` may be the input model only with `in_place`. `accept` may veto the complete
        temporary file before it replaces anything (see `save_model_atomic`); the saved path, or
        None when it did."""
        use_external = self.external_data if external_data is None else external_data
        saved = save_model_atomic(self._model, path, use_external, self.protected_files, self.store, accept,
                                  input_model=self.input_path, in_place=in_place)
        if saved is not None:
            self.report.output_path = str(saved)
        return saved


def run_config(verify: bool | RunConfig, options: dict[str, Any], caller: str) -> RunConfig:
    """The verification settings: `verify` if it is a RunConfig (else the defaults) with the
    keyword `options` replacing its fields. An unknown keyword is a TypeError, as for any call."""
    unknown = sorted(set(options) - RUN_CONFIG_FIELDS)
    if unknown:
        raise TypeError(f"{caller}() got an unexpected keyword argument '{unknown[0]}'")
    if isinstance(verify, RunConfig):
        return dataclasses.replace(verify, **options) if options else verify
    if not isinstance(verify, bool):  # "no" would be truthy: verification must be asked for exactly
        raise TypeError(f"{caller}() verify must be True, False or a RunConfig, got {type(verify).__name__}")
    return RunConfig(**options)


def _open(model: ModelSource) -> tuple[onnx.ModelProto, ModelSource, Path | None, set[Path], TensorStore]:
    """A model bnfold may edit, the untouched original for verification, its path, its data files,
    and the store that reads its tensors."""
    if isinstance(model, onnx.ModelProto):
        check_supported(model, "model")
        check_structure(model, "model", lambda tensors: file_access.refuse_external_data(tensors, "model"))
        working = onnx.ModelProto()
        working.CopyFrom(model)
        return working, model, None, set(), TensorStore()
    if not isinstance(model, (str, os.PathLike)):
        raise BadInputError(f"expected an onnx.ModelProto or a path, got {type(model).__name__}")
    loaded = load_model(model)
    # The loaded copy is ours to edit; onnxruntime reads the original from its file.
    return loaded.model, loaded.path, loaded.path, loaded.external_files, loaded.store


def fold(
    model: ModelSource,
    *,
    verify: bool | RunConfig = True,
    output: str | os.PathLike | None = None,
    in_place: bool = False,
    merge_branches: bool = True,
    raise_on_failure: bool = True,
    **run_options: Any,
) -> FoldResult:
    """Fold every exactly-foldable BatchNormalization (and per-channel Mul/Add) of `model`.

    With `verify` (the default) the result is checked (onnx checker, analytic weight check,
    onnxruntime with optimizations off); a failed check raises `VerificationError` carrying the
    report, unless `raise_on_failure=False`, in which case `result.report.passed` is False.
    How verification feeds and compares the models is a `RunConfig`: pass one as `verify`, or
    its fields as keywords (`seed`, `input_shapes`, `atol`, `rtol`, `inputs`, `iterations`,
    `providers`, `save_inputs`, `save_outputs`, `timeout`), which override the given config.
    With `output`, the result is also written there atomically — and verified as written:
    onnxruntime runs the complete temporary file, which replaces `output` only if it passed
    (nothing is written otherwise; `result.report.output_path` says where it went).
    `merge_branches`: merge sums of linear branches reading one tensor (RepVGG, MobileOne, ...)
    into one Conv (see docs/branch-merging.md). `output` may be the input model's path only with
    `in_place=True` (a symlink's target is replaced, the link stays); it may never be one of the
    input's external data files.
    onnxruntime runs in a child process; if it crashes or takes longer than `timeout` seconds,
    verification fails ("could not run").
    """
    config = run_config(verify, run_options, "fold")  # checks the options before any work
    verifying = bool(verify)
    working, original, path, protected, store = _open(model)
    written = [] if output is None else [Path(output)]
    if output is not None:  # before any work: a refused output must not cost a fold
        file_access.output_target(written[0], path, protected, in_place)
    for flag, side in (("--save-inputs", config.save_inputs), ("--save-outputs", config.save_outputs)):
        if side is not None:
            file_access.check_side_output(Path(side), flag, [*protected, *([path] if path else [])], written)
    report = Report(input_path=None if path is None else str(path), ops_before=op_counts(working))
    report.repairs = conformance.repair(working)  # before folding: new initializers are listed the same way
    outcome = fold_model(working, keep_provenance=verifying, store=store, merge_branches=merge_branches)
    report.folded, report.skipped, report.passes = outcome.folded, outcome.skipped, outcome.passes
    report.merged_branches = outcome.merged_branches
    report.ops_after = op_counts(working)
    result = FoldResult(working, report, external_data=bool(protected), protected_files=protected, store=store,
                        input_path=path)
    if not verifying:
        if output is not None:
            result.save(output, in_place=in_place)
        return result

    def verified(written: Path | None) -> bool:
        report.verification = _verify(original, working, provenance=outcome.provenance, config=config, store=store,
                                      folded_file=written, evaluated=outcome.evaluated)
        return report.verification.passed

    if output is None:
        verified(None)
    else:
        result.save(output, accept=verified, in_place=in_place)
    if raise_on_failure and not report.verification.passed:
        raise VerificationError("verification failed: " + "; ".join(report.verification.failures()), report)
    return result


def verify(original: ModelSource, folded: ModelSource, config: RunConfig | None = None,
           **run_options: Any) -> Verification:
    """Compare any two models with the same inputs and outputs (checker + onnxruntime, optimizations
    off), fed and compared as `config` and the `RunConfig` fields given as keywords say. Raises
    `VerificationError` when they differ; returns the per-output numbers otherwise."""
    config = run_config(config or True, run_options, "verify")
    folded_file = None
    if isinstance(folded, onnx.ModelProto):
        file_access.refuse_external_data(iter_tensors(folded), "folded model")
        folded_model, store = folded, TensorStore()
    else:
        loaded = load_model(folded)
        folded_model, store, folded_file = loaded.model, loaded.store, loaded.path
    if isinstance(original, onnx.ModelProto):
        file_access.refuse_external_data(iter_tensors(original), "original model")
    else:
        original = load_model(original).path
    result = _verify(original, folded_model, config=config, store=store, folded_file=folded_file)
    if not result.passed:
        report = Report(verification=result)
        raise VerificationError("verification failed: " + "; ".join(result.failures()), report)
    return result


@dataclass
class CheckResult:
    """What `bnfold check` reports for one model: BNs that could still be folded, BNs in training mode."""

    report: Report

    @property
    def foldable(self) -> list:
        return [r for r in self.report.folded if r.op_type == "BatchNormalization"]

    @property
    def mergeable_branches(self) -> list:
        """Sums of linear branches that fold into one Conv (counted as foldable)."""
        return self.report.merged_branches

    @property
    def training(self) -> list:
        return [r for r in self.report.skipped if r.reason == Reason.TRAINING_MODE]

    @property
    def clean(self) -> bool:
        return not self.foldable and not self.mergeable_branches and not self.training and self.report.passed


def check(model: ModelSource, *, verify: bool | RunConfig = False, merge_branches: bool = True,
          **run_options: Any) -> CheckResult:
    """Fold in memory (nothing is written) and list what a CI gate should reject; with `verify`
    (True or a `RunConfig`, whose fields may also be given as keywords) the fold is verified too."""
    result = fold(model, verify=verify, raise_on_failure=False, merge_branches=merge_branches, **run_options)
    return CheckResult(result.report)
