"""`bnfold.batch.run_jobs` on a caller's `concurrent.futures.Executor` (docs/batch.md): the jobs run
there, the results equal those of the in-process path, a job the executor cannot run becomes a
per-model result, and the executor is left open for its owner."""

from __future__ import annotations

import shutil
from concurrent.futures import Executor, Future, ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path

import onnx
import pytest

from bnfold.batch import Job, JobResult, discover, run_jobs
from bnfold.errors import ExitCode

SAMPLES_DIR = Path(__file__).resolve().parents[1] / "sample_models"
NAMES = ["resnet_tiny.onnx", "bn_first.onnx", "no_bn.onnx", "conv_mul_add.onnx"]


def models(folder: Path) -> list[Path]:
    folder.mkdir()
    for name in NAMES:
        shutil.copyfile(SAMPLES_DIR / name, folder / name)
    (folder / "broken.onnx").write_bytes(b"\x00garbage" * 10)
    return discover([folder])


def fold_jobs(paths: list[Path], out: Path) -> list[Job]:
    out.mkdir()
    return [Job(path, out / path.name, "fold", {"verify": True, "seed": 3}) for path in paths]


def comparable(result: JobResult, root: Path) -> tuple:
    """What a result says, with the output folder taken out of the paths."""
    report = None
    if result.report is not None:
        report = result.report.to_dict()
        report["output_path"] = report["output_path"] and Path(report["output_path"]).name
    return result.model.name, result.exit_code, report, result.error, result.findings


def test_process_pool_results_equal_the_in_process_ones(tmp_path):
    paths = models(tmp_path / "in")
    here = run_jobs(fold_jobs(paths, tmp_path / "here"))
    with ProcessPoolExecutor(max_workers=2) as pool:
        pooled = run_jobs(fold_jobs(paths, tmp_path / "pool"), executor=pool)
    assert [r.model for r in pooled] == paths  # job order, whatever the completion order
    assert [comparable(r, tmp_path / "pool") for r in pooled] == [comparable(r, tmp_path / "here") for r in here]
    assert {p.name: r.exit_code for p, r in zip(paths, pooled)} == {
        "broken.onnx": ExitCode.BAD_INPUT, **{name: ExitCode.OK for name in NAMES}}
    for name in NAMES:  # the pool's workers wrote the same bytes
        assert (tmp_path / "pool" / name).read_bytes() == (tmp_path / "here" / name).read_bytes()
        onnx.checker.check_model(str(tmp_path / "pool" / name), full_check=True)
    assert all(type(r.exit_code) is int for r in pooled)


class RecordingExecutor(ThreadPoolExecutor):
    """A stand-in for a cluster's executor: counts what is submitted to it."""

    def __init__(self) -> None:
        super().__init__(max_workers=2)
        self.submitted: list[tuple] = []

    def submit(self, fn, /, *args, **kwargs) -> Future:
        self.submitted.append(args)
        return super().submit(fn, *args, **kwargs)


def test_every_job_goes_to_the_given_executor_which_stays_open(tmp_path):
    paths = models(tmp_path / "in")
    jobs = [Job(path, None, "check", {}) for path in paths]
    seen: list[Path] = []
    executor = RecordingExecutor()
    try:
        results = run_jobs(jobs, workers=8, on_done=lambda r: seen.append(r.model), executor=executor)
        assert executor.submitted == [(job,) for job in jobs]
        assert sorted(seen) == sorted(paths)  # on_done once per job
        assert executor.submit(lambda: 42).result() == 42  # not shut down: it belongs to the caller
    finally:
        executor.shutdown()
    assert [(r.model.name, r.exit_code) for r in results] == [(r.model.name, r.exit_code) for r in run_jobs(jobs)]


class FailingExecutor(Executor):
    """An executor whose workers die: every future ends in an exception."""

    def submit(self, fn, /, *args, **kwargs) -> Future:
        future: Future = Future()
        future.set_exception(RuntimeError("worker lost\nremote traceback follows"))
        return future


def test_a_job_the_executor_loses_is_a_per_model_error(tmp_path):
    paths = models(tmp_path / "in")[:2]
    results = run_jobs([Job(path, None, "check", {}) for path in paths], executor=FailingExecutor())
    assert [r.model for r in results] == paths
    for result in results:
        assert result.exit_code == ExitCode.BAD_INPUT and result.report is None
        assert result.error == f"{result.model}: worker failed: worker lost"


@pytest.mark.parametrize("workers", [1, 3])
def test_without_an_executor_the_workers_argument_still_decides(tmp_path, workers):
    paths = models(tmp_path / "in")
    results = run_jobs([Job(path, None, "check", {}) for path in paths], workers=workers)
    assert [r.model for r in results] == paths
    assert {r.model.name: r.exit_code for r in results} == {
        "broken.onnx": 2, "resnet_tiny.onnx": 1, "bn_first.onnx": 1, "no_bn.onnx": 0, "conv_mul_add.onnx": 1}
