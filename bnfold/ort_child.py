"""onnxruntime runs in a child process: a crash, an out-of-memory kill or a hang of onnxruntime is
then a verdict about the model ("verification could not run"), never the death of bnfold.

The parent hands the child an `OrtJob` (model files by path, the input batches, tensor names to add
as extra graph outputs) and receives an `OrtRuns` with every array, or the child's error. The child
is started early (`start`), so importing onnxruntime overlaps with the parent's other checks.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import signal
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx

from bnfold.errors import first_line

CPU = "CPUExecutionProvider"


@dataclass
class OrtJob:
    original: str  # model files onnxruntime loads (external data beside each)
    folded: str
    batches: list[dict[str, np.ndarray]]
    extra: list[str] = field(default_factory=list)  # intermediate tensors to fetch from both models
    providers: list[str] = field(default_factory=list)  # extra providers for the folded model
    # "onnxruntime", or "reference": onnx's reference evaluator, for models onnxruntime cannot run
    # (graph outputs only; it runs in the child for the same reasons: a hang or crash is a verdict).
    engine: str = "onnxruntime"


@dataclass
class OrtRuns:
    names: list[str] = field(default_factory=list)  # graph outputs, then the extra tensors fetched
    outputs: int = 0  # how many of `names` are graph outputs
    references: list[list[np.ndarray]] = field(default_factory=list)  # per batch
    candidates: dict[str, list[list[np.ndarray]]] = field(default_factory=dict)  # "" = CPU; per batch
    # Set when a run failed: ("original_load" | "original_run" | "folded", provider, message).
    error: tuple[str, str, str] | None = None


def _session(path: str, extra: list[str], provider: str):
    """A session with every graph optimization off (onnxruntime would fuse Conv+BN itself). The
    extra outputs are appended to the file's bytes as a second serialized ModelProto, which protobuf
    merges into the first (repeated fields append): no parse and re-serialise of the weights."""
    import onnxruntime as ort

    ort.set_default_logger_severity(4)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    # FATAL only: onnxruntime's ERROR records would precede bnfold's own one-line message.
    options.log_severity_level = 4
    # Loaded from bytes (also file names that are not UTF-8): external data is found beside the file.
    folder = str(Path(path).parent.resolve())
    if folder.encode("utf-8", "surrogateescape").decode("utf-8", "replace") == folder:  # onnxruntime takes UTF-8
        options.add_session_config_entry("session.model_external_initializers_file_folder_path", folder)
    data = Path(path).read_bytes()
    if extra:
        outputs = onnx.ModelProto(graph=onnx.GraphProto(output=[onnx.ValueInfoProto(name=n) for n in extra]))
        data += outputs.SerializeToString()
    return ort.InferenceSession(data, options, providers=[provider])


def run_job(job: OrtJob) -> OrtRuns:
    """Both models on every batch; extra tensors are dropped (not failed) when onnxruntime cannot
    add them as outputs, so the caller sees which were compared."""
    if job.engine == "reference":
        return _run_reference_evaluator(job)
    runs = OrtRuns()
    extra = list(job.extra)
    try:
        try:
            reference = _session(job.original, extra, CPU)
        except Exception:  # noqa: BLE001 - maybe only the extra outputs: retry without them
            if not extra:
                raise
            extra = []
            reference = _session(job.original, extra, CPU)
    except Exception as error:  # noqa: BLE001 - whatever onnxruntime raises
        runs.error = ("original_load", CPU, first_line(error))
        return runs
    runs.names = [o.name for o in reference.get_outputs()]
    runs.outputs = len(runs.names) - len(extra)
    try:
        runs.references = [reference.run(None, feeds) for feeds in job.batches]
    except Exception as error:  # noqa: BLE001
        runs.error = ("original_run", CPU, first_line(error))
        return runs
    del reference
    for label, provider in [("", CPU), *((p, p) for p in job.providers)]:
        try:
            candidate = _session(job.folded, extra, provider)
            runs.candidates[label] = [candidate.run(runs.names, feeds) for feeds in job.batches]
        except Exception as error:  # noqa: BLE001
            runs.error = ("folded", provider, first_line(error))
            return runs
    return runs


def _run_reference_evaluator(job: OrtJob) -> OrtRuns:
    """Both models' graph outputs from onnx's reference evaluator; any failure is the run's error."""
    from onnx.reference import ReferenceEvaluator

    runs = OrtRuns()
    try:
        reference = ReferenceEvaluator(onnx.load(job.original))  # external data beside each file
        runs.names = [o.name for o in reference.proto_.graph.output]
        runs.outputs = len(runs.names)
        runs.references = [reference.run(None, feeds) for feeds in job.batches]
        candidate = ReferenceEvaluator(onnx.load(job.folded))
        runs.candidates[""] = [candidate.run(runs.names, feeds) for feeds in job.batches]
    except Exception as error:  # noqa: BLE001 - whatever the evaluator raises
        runs.error = ("reference", "", first_line(error))
    return runs


def _child_main(connection) -> None:
    try:
        job = connection.recv()
    except BaseException:  # noqa: BLE001 - the parent closed without a job (it found bad input first)
        return  # or was interrupted: leave quietly, multiprocessing would print a traceback
    try:
        runs = run_job(job)
    except BaseException as error:  # noqa: BLE001 - reported to the parent, not as a traceback here
        runs = OrtRuns(error=("original_load", CPU, first_line(error)))
    with contextlib.suppress(BaseException):  # the parent may have stopped waiting (timeout, interrupt)
        connection.send(runs)
        connection.close()


class CouldNotRun(Exception):
    """The child died (signal, out of memory) or did not answer within the timeout."""


def _forget_inherited_forkserver() -> None:
    """A process forked from one that had started the forkserver (a worker of a fork-based process
    pool, say) inherits the handle to that server, which is not its child: using it fails with
    "No child processes". The fork starts its own server when it needs one."""
    from multiprocessing import forkserver

    server = getattr(forkserver, "_forkserver", None)
    if server is None or getattr(server, "_forkserver_pid", None) is None:
        return
    alive = getattr(server, "_forkserver_alive_fd", None)
    if alive is not None:
        with contextlib.suppress(OSError):
            os.close(alive)
    server._forkserver_address = server._forkserver_alive_fd = server._forkserver_pid = None


os.register_at_fork(after_in_child=_forget_inherited_forkserver)


def _context():
    """A forkserver: one clean server process (never a fork of the threaded parent) that imported
    onnxruntime once; each child is then a cheap fork of it."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["bnfold.ort_child", "onnxruntime", "numpy", "onnx"])
    return context


@contextlib.contextmanager
def _caller_script_hidden() -> Iterator[None]:
    """multiprocessing re-runs the parent's __main__ script in a new child (as `__mp_main__`): a user's
    pipeline script without an `if __name__ == "__main__"` guard would fold again in there, and a
    script read from stdin cannot be found at all. The child needs only bnfold, so it is started
    while __main__ names no script."""
    main = sys.modules.get("__main__")
    saved = {name: main.__dict__[name] for name in ("__file__", "__spec__") if main and name in main.__dict__}
    try:
        if main is not None:
            main.__dict__.pop("__file__", None)
            main.__spec__ = None
        yield
    finally:
        if main is not None:
            main.__dict__.pop("__spec__", None)
            main.__dict__.update(saved)


class Child:
    """One child process that runs one job. Use as a context manager: the child is always killed and
    reaped on exit, also when the parent is interrupted."""

    def __init__(self) -> None:
        self._closed = False
        context = _context()
        self._connection, child_end = context.Pipe()
        self._process = context.Process(target=_child_main, args=(child_end,), name="bnfold-onnxruntime",
                                        daemon=False)
        with _caller_script_hidden():
            self._process.start()
        child_end.close()

    def __enter__(self) -> Child:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def run(self, job: OrtJob, timeout: float) -> OrtRuns:
        deadline = time.monotonic() + timeout
        try:
            self._connection.send(job)
            if self._connection.poll(max(deadline - time.monotonic(), 0.0)):
                return self._connection.recv()
        except (EOFError, BrokenPipeError, ConnectionResetError, OSError):
            pass  # the child died: its exit status says how
        self._process.join(max(min(deadline - time.monotonic(), 5.0), 0.1))
        raise CouldNotRun(self._why(timeout, "onnxruntime" if job.engine == "onnxruntime" else
                                    "onnx's reference evaluator"))

    def _why(self, timeout: float, engine: str) -> str:
        code = self._process.exitcode
        if code is None:
            return f"{engine} did not finish within the timeout ({timeout:g} s; raise it with --timeout)"
        if code < 0:
            name = signal.Signals(-code).name if -code in signal.valid_signals() else "unknown"
            hint = " (likely out of memory)" if -code == signal.SIGKILL else ""
            return f"{engine} crashed (signal {-code}, {name}){hint}"
        return f"{engine}'s process exited with code {code}"

    def close(self) -> None:
        """Kill (if still running) and reap the child; safe to call more than once."""
        if self._closed:
            return
        self._closed = True
        self._connection.close()
        if self._process.is_alive():
            self._process.kill()
        self._process.join()
        self._process.close()


