"""Many models at once: discovery, one independent job per model, run here, in worker processes,
or on any `concurrent.futures.Executor` the caller brings (docs/batch.md).

A model that fails (bad input, failed verification, even an unexpected crash) yields its own exit
code and message; it never stops the others. The overall exit code is the worst one.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Executor, ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path

from bnfold.errors import BadInputError, BnfoldError, ExitCode, first_line
from bnfold.report import Report


@dataclass
class Job:
    """One model to fold (output set) or check (output None)."""

    model: Path
    output: Path | None
    mode: str = "fold"  # "fold" | "check"
    options: dict = field(default_factory=dict)  # keyword arguments of bnfold.fold / bnfold.check


@dataclass
class JobResult:
    model: Path
    exit_code: int
    report: Report | None = None
    error: str | None = None
    findings: list[str] = field(default_factory=list)  # check mode: one line per problem

    def __post_init__(self) -> None:
        # A plain int: it goes into JSON, crosses process boundaries and is printed in tables.
        self.exit_code = int(self.exit_code)


def discover(paths: Iterable[Path], skip_folded: bool = True) -> list[Path]:
    """Files as given; folders searched recursively for *.onnx (bnfold's own *.folded.onnx outputs
    skipped when folding, so a second run does not fold its previous results)."""
    found: list[Path] = []
    for path in paths:
        if path.is_dir():
            found += sorted(p for p in path.rglob("*.onnx")
                            if p.is_file() and not (skip_folded and p.name.endswith(".folded.onnx")))
        else:
            found.append(path)
    return found


def run_job(job: Job) -> JobResult:
    """Process one model; every failure becomes an exit code, never an exception."""
    from bnfold import api

    try:
        if job.mode == "check":
            checked = api.check(job.model, **job.options)
            findings = [f"{r.node}: foldable BatchNormalization ({r.direction} into {', '.join(r.into)})"
                        for r in checked.foldable]
            findings += [f"{r.node}: {r.branches} branches mergeable into one Conv" for r in checked.mergeable_branches]
            findings += [f"{r.node}: BatchNormalization in training mode" for r in checked.training]
            if not checked.report.passed:
                findings += [f"verification: {line}" for line in checked.report.verification.failures()]
            return JobResult(job.model, ExitCode.OK if checked.clean else ExitCode.FAILED, checked.report, None, findings)
        # Written through a temporary file that is verified as written, then renamed into place.
        result = api.fold(job.model, raise_on_failure=False, output=job.output, **job.options)
        if not result.report.passed:
            return JobResult(job.model, ExitCode.FAILED, result.report, "verification failed; nothing written")
        return JobResult(job.model, ExitCode.OK, result.report)
    except BnfoldError as error:
        return JobResult(job.model, error.exit_code, getattr(error, "report", None), str(error))
    except MemoryError:
        return JobResult(job.model, ExitCode.BAD_INPUT, None, f"{job.model}: out of memory")
    except Exception as error:  # noqa: BLE001 - one broken model must not stop the batch
        return JobResult(job.model, ExitCode.BAD_INPUT, None,
                         f"{job.model}: unexpected error: {type(error).__name__}: {first_line(error)}")


def run_jobs(jobs: list[Job], workers: int = 1, on_done: Callable[[JobResult], None] | None = None,
             executor: Executor | None = None) -> list[JobResult]:
    """Results in job order. With `executor` (any `concurrent.futures.Executor`: a process pool,
    Dask's `Client.get_executor()`, ...) every job is submitted to it, and it stays open: it is the
    caller's. Otherwise `workers` > 1 runs the jobs in a process pool of that size, and 1 runs them
    here, one after the other. `on_done` sees each result as it arrives."""
    if executor is not None:
        return _run_on(executor, jobs, on_done)
    if workers <= 1 or len(jobs) <= 1:
        results = []
        for job in jobs:
            results.append(run_job(job))
            if on_done:
                on_done(results[-1])
        return results
    with ProcessPoolExecutor(max_workers=min(workers, len(jobs), os.cpu_count() or 1)) as pool, \
            _stop_on_interrupt(pool):
        return _run_on(pool, jobs, on_done)


def _run_on(executor: Executor, jobs: list[Job], on_done: Callable[[JobResult], None] | None) -> list[JobResult]:
    """Submit every job, collect the results as they complete; a job whose worker died (or that the
    executor could not run) becomes a bad-input result for its model, never an exception."""
    by_job: dict[int, JobResult] = {}
    futures = {executor.submit(run_job, job): i for i, job in enumerate(jobs)}
    for future in as_completed(futures):
        position = futures[future]
        try:
            by_job[position] = future.result()
        except Exception as error:  # noqa: BLE001 - a worker killed by the OS, an unpicklable job, ...
            by_job[position] = JobResult(jobs[position].model, ExitCode.BAD_INPUT, None,
                                         f"{jobs[position].model}: worker failed: {first_line(error)}")
        if on_done:
            on_done(by_job[position])
    return [by_job[i] for i in range(len(jobs))]


@contextlib.contextmanager
def _stop_on_interrupt(pool: ProcessPoolExecutor) -> Iterator[None]:
    """On a signal (bnfold.interrupts.Interrupted) the workers are stopped too — they remove their
    own temporary files — instead of being waited for while they finish and write their models."""
    try:
        yield
    except BaseException:
        for process in list((pool._processes or {}).values()):  # no public way to stop a running job
            process.terminate()
        pool.shutdown(wait=True, cancel_futures=True)
        raise


def output_paths(models: list[Path], output: Path | None, many: bool, in_place: bool) -> list[Path]:
    """Where each model's result goes: beside it, at -o (one model), or inside the -o folder."""
    if in_place:
        return list(models)
    if not many:
        return [output or models[0].with_name(models[0].stem + ".folded.onnx")]
    if output is None:
        return [m.with_name(m.stem + ".folded.onnx") for m in models]
    names = [m.stem + ".onnx" for m in models]
    if len(set(names)) != len(names):
        raise BadInputError(f"-o {output}: several inputs share a file name; fold them into separate folders")
    if output.exists() and not output.is_dir():
        raise BadInputError(f"-o {output}: several models need an output folder, this is a file")
    try:
        output.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise BadInputError(f"-o {output}: cannot create the output folder ({error.strerror})") from None
    return [output / name for name in names]

