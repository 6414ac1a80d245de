"""Where does bnfold's time / memory go? cProfile or tracemalloc around one fold.

    python -m benchmarks.profile_fold MODEL [--verify] [--mem | --rss] [--top N]

Runs `bnfold.fold(MODEL, verify=...).save(OUT)` in this process (OUT in a temp
dir) and prints the top functions by cumulative time (cProfile), or, with
--mem, the allocation sites live near the peak of traced memory (tracemalloc:
Python and numpy allocations; protobuf's C++ arena is NOT traced, so compare
the traced peak with the process peak RSS that is printed too). --rss samples
the process RSS every 5 ms and names the bnfold function running at the time,
which also attributes untraced C++ memory (protobuf, onnxruntime). Use models from `benchmarks/models.py`.
"""
from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import resource
import sys
import tempfile
import threading
import time
import tracemalloc
from pathlib import Path
from types import FrameType


def fold_once(model: str, out_dir: Path, verify: bool) -> None:
    import bnfold  # imported here so import time is not attributed to the fold

    bnfold.fold(model, verify=verify).save(str(out_dir / "model.onnx"))


def profile_time(model: str, verify: bool, top: int) -> None:
    with tempfile.TemporaryDirectory() as d:
        prof = cProfile.Profile()
        t0 = time.perf_counter()
        prof.runcall(fold_once, model, Path(d), verify)
        total = time.perf_counter() - t0
    buf = io.StringIO()
    stats = pstats.Stats(prof, stream=buf)
    stats.sort_stats("cumulative").print_stats(top)
    stats.sort_stats("tottime").print_stats(top)
    print(f"fold+save wall time under cProfile: {total:.3f} s")
    print(buf.getvalue())


def profile_memory(model: str, verify: bool, top: int) -> None:
    """Snapshot allocations near the traced peak, not at the end (by then most are freed)."""
    tracemalloc.start(25)  # deep tracebacks so a bnfold frame shows above numpy/onnx ones
    best: dict[str, object] = {"size": 0, "snap": None}
    done = threading.Event()

    def watch() -> None:
        # A new snapshot only when the traced size grew by 5%: cheap enough,
        # and the last one taken is within 5% of the true peak.
        while not done.wait(0.02):
            cur, _ = tracemalloc.get_traced_memory()
            if cur > 1.05 * int(best["size"]):  # type: ignore[arg-type]
                best["size"], best["snap"] = cur, tracemalloc.take_snapshot()

    th = threading.Thread(target=watch, daemon=True)
    th.start()
    with tempfile.TemporaryDirectory() as d:
        fold_once(model, Path(d), verify)
    done.set()
    th.join()
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"traced peak {peak / 2**20:.1f} MiB, process peak RSS {rss:.1f} MiB; "
          f"allocations live at {int(best['size']) / 2**20:.1f} MiB:")  # type: ignore[arg-type]
    snap = best["snap"]
    if snap is None:
        return
    for stat in snap.statistics("traceback")[:top]:  # type: ignore[attr-defined]
        print(f"{stat.size / 2**20:9.1f} MiB in {stat.count} blocks")
        for line in stat.traceback.format()[-8:]:
            print("    " + line)


def _bnfold_frames(frame: FrameType | None) -> str:
    """The innermost bnfold function on a stack, e.g. 'serialize.py:write_model'."""
    names: list[str] = []
    while frame is not None:
        if "bnfold" in frame.f_code.co_filename:
            names.append(f"{Path(frame.f_code.co_filename).name}:{frame.f_code.co_name}")
        frame = frame.f_back
    return " < ".join(names[:3]) or "(outside bnfold)"


def profile_rss(model: str, verify: bool, top: int) -> None:
    """Sample VmRSS every 5 ms with the bnfold function running at that moment.

    tracemalloc cannot see protobuf's C++ buffers or ORT; RSS sampling can,
    and naming the function on the main thread's stack attributes each jump.
    """
    main_id = threading.get_ident()
    samples: list[tuple[float, int, str]] = []
    done = threading.Event()

    def sample() -> None:
        t0 = time.perf_counter()
        while not done.wait(0.005):
            rss = int(Path("/proc/self/status").read_text().split("VmRSS:")[1].split()[0])
            where = _bnfold_frames(sys._current_frames().get(main_id))
            samples.append((time.perf_counter() - t0, rss, where))

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    with tempfile.TemporaryDirectory() as d:
        fold_once(model, Path(d), verify)
    done.set()
    th.join()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(f"peak RSS {peak / 1024:.1f} MiB; per bnfold function: max RSS seen, first seen at")
    phases: dict[str, tuple[int, float]] = {}
    for t, rss, where in samples:
        first = phases.get(where, (0, t))[1]
        phases[where] = (max(rss, phases.get(where, (0, t))[0]), first)
    for where, (rss, first) in sorted(phases.items(), key=lambda kv: kv[1][1])[: top * 4]:
        print(f"  {rss / 1024:8.1f} MiB  t={first:6.2f}s  {where}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("--verify", action="store_true")
    ap.add_argument("--mem", action="store_true", help="tracemalloc instead of cProfile")
    ap.add_argument("--rss", action="store_true", help="RSS timeline by bnfold function")
    ap.add_argument("--top", type=int, default=25)
    args = ap.parse_args()
    run = profile_rss if args.rss else profile_memory if args.mem else profile_time
    run(args.model, args.verify, args.top)


if __name__ == "__main__":
    main()
