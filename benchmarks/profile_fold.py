"""Where does bnfold's time / memory go? cProfile or tracemalloc around one fold.

    python benchmarks/profile_fold.py MODEL [--verify] [--mem] [--top N]

Runs `bnfold.fold(MODEL, verify=...).save(OUT)` in this process (OUT in a temp
dir) and prints the top functions by cumulative time (cProfile), or, with
--mem, the allocation sites live near the peak of traced memory (tracemalloc:
Python and numpy allocations; protobuf's C++ arena is NOT traced, so compare
the traced peak with the process peak RSS that is printed too). Use models from `benchmarks/models.py`.
"""
from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import resource
import tempfile
import threading
import time
import tracemalloc
from pathlib import Path


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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("--verify", action="store_true")
    ap.add_argument("--mem", action="store_true", help="tracemalloc instead of cProfile")
    ap.add_argument("--top", type=int, default=25)
    args = ap.parse_args()
    (profile_memory if args.mem else profile_time)(args.model, args.verify, args.top)


if __name__ == "__main__":
    main()
