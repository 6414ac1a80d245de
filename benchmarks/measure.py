"""Whole-process measurement: wall time and peak RSS of one child process.

Each measured step runs as its own child (`sys.executable -c CODE` or
`-m bnfold`) so its peak RSS is not polluted by the harness or by earlier
steps. Peak RSS comes from os.wait4's rusage (ru_maxrss, KiB on Linux), which
covers the child and any descendants it waited for; wall time is taken
around Popen..wait4, so interpreter start-up and imports count, exactly as a
user running the CLI would pay them. See LAUNCHER for why there is one
small process in between.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

DEFAULT_TIMEOUT_S = 1800.0


@dataclass
class Run:
    """One child process: either measured numbers or an error string."""
    wall_s: float | None = None
    maxrss_kib: int | None = None
    error: str | None = None          # "failed: <last stderr line>" or "timeout"
    stdout: str = ""

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass
class Summary:
    """Median over repeated runs; `error` set if any run failed (then no medians)."""
    wall_s: float | None = None
    maxrss_kib: int | None = None
    error: str | None = None
    runs: list[Run] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.error is None and self.wall_s is not None


def _last_line(text: str) -> str:
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1][:200] if lines else "no output"


# Why a launcher: on Linux a child's ru_maxrss starts at the RSS high-water
# mark of the process that spawned it (exec records the pre-exec mm's peak,
# and with vfork/posix_spawn that mm is the parent's). The harness itself
# may have held a 300 MB model, so children it spawns directly would all
# report >= that. A bare `python -I -S` launcher (~10 MB) spawns the measured
# command instead; its children start from ~10 MB, below anything we measure.
# The launcher times Popen..wait4 itself and enforces the timeout, so its own
# start-up is not counted.
LAUNCHER = r"""
import json, os, signal, subprocess, sys, time
result, timeout, cmd = sys.argv[1], float(sys.argv[2]), sys.argv[3:]
timed_out = []
t0 = time.perf_counter()
p = subprocess.Popen(cmd)
def on_alarm(signum, frame):
    timed_out.append(1)
    p.kill()
signal.signal(signal.SIGALRM, on_alarm)
signal.setitimer(signal.ITIMER_REAL, timeout)
_, status, ru = os.wait4(p.pid, 0)
wall = time.perf_counter() - t0
signal.setitimer(signal.ITIMER_REAL, 0)
p.returncode = os.waitstatus_to_exitcode(status)
with open(result, "w") as fh:
    json.dump({"wall_s": wall, "maxrss_kib": ru.ru_maxrss, "rc": p.returncode,
               "timeout": bool(timed_out)}, fh)
"""


def child_env() -> dict[str, str]:
    """The environment measured children run in: with cached bytecode.

    Some sandboxes set PYTHONDONTWRITEBYTECODE, which makes a source checkout
    of bnfold recompile every module in every process (~30 ms) while onnx,
    from site-packages, has its .pyc: unfair, and not what an installed user
    sees. Caches go to a prefix outside the repository.
    """
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    env.setdefault("PYTHONPYCACHEPREFIX", str(Path(tempfile.gettempdir()) / "bnfold-bench-pycache"))
    return env


def run_child(argv: Sequence[str], timeout_s: float = DEFAULT_TIMEOUT_S,
              env: dict[str, str] | None = None) -> Run:
    """Run argv to completion (via LAUNCHER) and return wall time + peak RSS from wait4.

    Output goes to temp files rather than pipes: with pipes a chatty child
    would block once the pipe buffer fills while nobody reads it.
    """
    # Flush what earlier runs wrote (the 2.2 GB model alone writes gigabytes): otherwise the kernel's
    # write-back of *their* data bills this run's fsync and reads, and the order of sections decides
    # the numbers. Not timed.
    os.sync()
    with tempfile.TemporaryDirectory() as tmp, open(Path(tmp) / "out", "w+b") as out, \
            open(Path(tmp) / "err", "w+b") as err:
        result = Path(tmp) / "result.json"
        # Own session so that, if even the launcher hangs, killpg reaches the
        # measured command too and nothing is left running.
        launcher = subprocess.Popen(
            [sys.executable, "-I", "-S", "-c", LAUNCHER, str(result), str(timeout_s), *argv],
            stdout=out, stderr=err, stdin=subprocess.DEVNULL, env=env or child_env(),
            start_new_session=True)
        try:
            launcher.wait(timeout_s + 60)
        except subprocess.TimeoutExpired:
            os.killpg(launcher.pid, signal.SIGKILL)
            launcher.wait()
        out.seek(0)
        err.seek(0)
        stdout = out.read().decode(errors="replace")
        stderr = err.read().decode(errors="replace")
        info = json.loads(result.read_text()) if result.exists() else None
    if info is None:
        return Run(error=f"failed: launcher: {_last_line(stderr)}", stdout=stdout)
    if info["timeout"]:
        return Run(error="timeout", stdout=stdout)
    if info["rc"] != 0:
        return Run(error=f"failed: {_last_line(stderr or stdout)}", stdout=stdout)
    return Run(wall_s=info["wall_s"], maxrss_kib=int(info["maxrss_kib"]), stdout=stdout)


def summarize(runs: list[Run]) -> Summary:
    bad = next((r for r in runs if not r.ok), None)
    if bad is not None:
        return Summary(error=bad.error, runs=runs)
    return Summary(wall_s=statistics.median(r.wall_s for r in runs),          # type: ignore[misc]
                   maxrss_kib=int(statistics.median(r.maxrss_kib for r in runs)),  # type: ignore[misc]
                   runs=runs)


class Workdir:
    """Fresh, disposable output directories under the scratch dir.

    Every run writes to a new directory (a "fresh location" for external data)
    that is removed right after, so 2 GB outputs never pile up on disk.
    """

    def __init__(self, root: Path) -> None:
        self.root = root / "out"
        self.root.mkdir(parents=True, exist_ok=True)
        self._n = 0

    def fresh(self, tag: str) -> Path:
        self._n += 1
        d = self.root / f"{tag}-{self._n}"
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir(parents=True)
        return d

    def clean(self, d: Path) -> None:
        shutil.rmtree(d, ignore_errors=True)


ArgvFactory = Callable[[Path], list[str]]


def measure_interleaved(factories: dict[str, ArgvFactory], k: int, work: Workdir,
                        timeout_s: float = DEFAULT_TIMEOUT_S) -> dict[str, Summary]:
    """Run each named command k times, round-robin, and take medians.

    Round-robin (floor, tool, floor, tool, ...) rather than k floors then k
    tools, so slow drift (page cache, thermal, noisy neighbours) hits both
    sides of a ratio equally. A command that fails or times out is not
    retried: its error is recorded and the others go on.
    """
    runs: dict[str, list[Run]] = {name: [] for name in factories}
    for _ in range(k):
        for name, make_argv in factories.items():
            if runs[name] and not runs[name][-1].ok:
                continue
            out_dir = work.fresh(name)
            try:
                runs[name].append(run_child(make_argv(out_dir), timeout_s))
            finally:
                work.clean(out_dir)
    return {name: summarize(r) for name, r in runs.items()}


def measure(make_argv: ArgvFactory, k: int, work: Workdir, tag: str,
            timeout_s: float = DEFAULT_TIMEOUT_S) -> Summary:
    return measure_interleaved({tag: make_argv}, k, work, timeout_s)[tag]


def py(code: str, *args: object) -> list[str]:
    """argv for `python -c CODE args...` with this interpreter (same venv as the harness)."""
    return [sys.executable, "-c", code, *map(str, args)]
