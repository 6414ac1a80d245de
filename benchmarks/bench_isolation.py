"""Verification cost of running onnxruntime in a child process, side by side with in-process runs.

    python -m benchmarks.bench_isolation [--repeat N]   (writes benchmarks/ISOLATION_RESULTS.md)

For each model: fold without verification, then time `bnfold.verify.verify` of the written
folded file against the original, alternating isolated (child process) and in-process runs;
the median of each is reported with their ratio.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

if not __package__:  # run as a script, not with -m: make the checkout's `benchmarks` package importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.models import ensure_model  # noqa: E402

import bnfold  # noqa: E402
from bnfold.run_config import RunConfig  # noqa: E402
from bnfold.verify import verify  # noqa: E402

MODELS = ("resnet_small", "deep_cnn")


def _time(original: Path, folded_path: Path, folded, isolated: bool) -> float:
    start = time.perf_counter()
    result = verify(str(original), folded, config=RunConfig(isolated=isolated), folded_file=folded_path)
    elapsed = time.perf_counter() - start
    assert result.passed, result.failures()
    return elapsed


def measure(name: str, repeat: int) -> tuple[float, float]:
    info = ensure_model(name)
    with tempfile.TemporaryDirectory() as folder:
        folded_path = Path(folder) / "folded.onnx"
        result = bnfold.fold(info.path, verify=False, output=folded_path)
        folded = result.model
        times = {True: [], False: []}
        for _ in range(repeat):
            for isolated in (False, True):
                times[isolated].append(_time(Path(info.path), folded_path, folded, isolated))
    return statistics.median(times[False]), statistics.median(times[True])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    lines = ["# Isolation cost: onnxruntime in a child process", "",
             f"median of {args.repeat} runs each, alternating; `python benchmarks/bench_isolation.py`", "",
             "| model | in-process verify (s) | child-process verify (s) | ratio |", "|---|---:|---:|---:|"]
    for name in MODELS:
        inside, child = measure(name, args.repeat)
        lines.append(f"| {name} | {inside:.3f} | {child:.3f} | {child / inside:.3f} |")
        print(lines[-1], flush=True)
    Path(__file__).with_name("ISOLATION_RESULTS.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
