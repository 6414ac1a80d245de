"""Formatting of numbers, machine description and the RESULTS.md writer."""
from __future__ import annotations

import datetime as dt
import importlib.metadata as md
import os
import platform
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks.measure import Summary, child_env


@dataclass
class Table:
    """One benchmark's section of RESULTS.md."""
    title: str
    intro: str
    headers: list[str]
    rows: list[list[str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def markdown(self) -> str:
        out = [f"## {self.title}", "", self.intro, ""]
        out.append("| " + " | ".join(self.headers) + " |")
        out.append("|" + "|".join("---" for _ in self.headers) + "|")
        out += ["| " + " | ".join(r) + " |" for r in self.rows]
        out += [""] + [f"- {n}" for n in self.notes] + ([""] if self.notes else [])
        return "\n".join(out)


def sig(x: float, digits: int = 3) -> str:
    """2-3 significant digits without scientific notation for everyday magnitudes."""
    if x == 0:
        return "0"
    if abs(x) >= 10 ** digits:
        return f"{x:.0f}"
    return f"{float(f'{x:.{digits}g}'):g}"


def fmt_s(s: float | None) -> str:
    if s is None:
        return "–"
    if abs(s) < 1e-3:
        return f"{sig(s * 1e6)} µs"
    return f"{sig(s * 1e3)} ms" if abs(s) < 1 else f"{sig(s)} s"


def fmt_bytes(b: float | None) -> str:
    if b is None:
        return "–"
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(b) >= size:
            return f"{sig(b / size)} {unit}"
    return f"{b:.0f} B"


def fmt_rss(kib: int | None) -> str:
    return "–" if kib is None else fmt_bytes(kib * 1024.0)


def fmt_ratio(r: float | None) -> str:
    return "–" if r is None else f"{sig(r)}×"


def mark(ok: bool | None) -> str:
    return "–" if ok is None else ("✓" if ok else "✗")


def ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b == 0 else a / b


def time_cell(s: Summary | None) -> str:
    if s is None:
        return "–"
    return fmt_s(s.wall_s) if s.ok else str(s.error)


def rss_cell(s: Summary | None) -> str:
    if s is None:
        return "–"
    return fmt_rss(s.maxrss_kib) if s.ok else "–"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def ram_bytes() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def version(dist: str) -> str:
    try:
        return md.version(dist)
    except md.PackageNotFoundError:
        return "not installed"


def git_rev(repo: Path) -> str:
    r = subprocess.run(["git", "-C", str(repo), "rev-parse", "--short", "HEAD"],
                       capture_output=True, text=True)
    rev = r.stdout.strip() if r.returncode == 0 else "no commit yet"
    dirty = subprocess.run(["git", "-C", str(repo), "status", "--porcelain"],
                           capture_output=True, text=True).stdout.strip()
    return rev + (" (+ uncommitted changes)" if dirty else "")


def loadavg() -> str:
    try:
        return " / ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "unknown"


def machine_section(repo: Path, argv: list[str], load_at_start: str) -> str:
    dists = ["onnx", "onnxruntime", "numpy", "protobuf", "bnfold",
             "onnxsim", "onnxslim", "onnxoptimizer"]
    lines = [
        "# bnfold benchmark results", "",
        f"Generated {dt.datetime.now().astimezone().strftime('%Y-%m-%d %H:%M %Z')} by "
        f"`python benchmarks/{' '.join(argv)}` at bnfold commit {git_rev(repo)}.", "",
        "| machine | |", "|---|---|",
        f"| CPU | {cpu_model()} |",
        f"| cores (os.cpu_count) | {os.cpu_count()} |",
        f"| RAM | {fmt_bytes(ram_bytes())} |",
        f"| OS | {platform.system()} {platform.release()} |",
        # Other work on the machine inflates times; the load average tells a
        # reader how much to trust small differences.
        f"| load average 1/5/15 min, at start → at end | {load_at_start} → {loadavg()} |",
        f"| python | {platform.python_version()} ({sys.executable}) |",
        f"| children's bytecode cache | PYTHONPYCACHEPREFIX={child_env()['PYTHONPYCACHEPREFIX']} |",
    ]
    lines += [f"| {d} | {version(d)} |" for d in dists]
    return "\n".join(lines) + "\n"


METHOD = """## Method

- Every number is a whole process (`sys.executable -c ...` or `-m bnfold`) started with
  `subprocess.Popen`; wall time is measured around Popen..wait4, peak RSS is `ru_maxrss`
  from `os.wait4` (includes interpreter start-up and imports, as a CLI user pays them).
- Median of K runs; floor and tool runs are interleaved so drift affects both sides of a ratio.
- The **I/O floor** is a child doing only `onnx.load` + `onnx.save` of the same model
  (external data: load by path, save with external data to a fresh location).
- Outputs go to fresh scratch directories outside the repo and are deleted after each run;
  input files are warm in the page cache (they were just generated / read by the previous run).
- `os.sync()` runs (untimed) before every child, so the write-back of what earlier runs wrote
  (gigabytes, with the 2.2 GB model) is not billed to whichever measurement comes next.
- A cell reading `failed: ...` is the last stderr line of a child that exited non-zero;
  `timeout` means it was killed after the per-tool limit.
"""


def write_results(path: Path, header: str, tables: list[Table]) -> None:
    body = [header] + [t.markdown() for t in tables] + [METHOD]
    path.write_text("\n".join(body))
