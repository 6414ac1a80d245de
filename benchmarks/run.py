"""bnfold benchmark suite: one command that generates models, measures, writes RESULTS.md.

    python -m benchmarks.run [--quick] [--runs K] [--skip-huge] [--compare]   (or python benchmarks/run.py ...)

--quick: 1 run, small models only (a smoke test of the harness: ~1 min, ~2 min with
--compare because onnxoptimizer is slow on the 1000-pair chain).
Full run: median of K=3 runs over all models, including a 2.2 GB external-data
model that is generated into the scratch dir and deleted afterwards.
Needs bnfold importable by this interpreter (`pip install -e .`); the
--compare tools are optional (benchmarks/requirements.txt).
"""
from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Callable

if not __package__:  # run as a script, not with -m: make the checkout's `benchmarks` package importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks import bench_fold, bench_tools, models  # noqa: E402
from benchmarks.measure import Workdir  # noqa: E402
from benchmarks.report import Table, fmt_bytes, loadavg, machine_section, write_results  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).resolve().parent / "RESULTS.md"

FULL = {"floor": ["deep_cnn", "no_bn", "resnet_small", "pairs_10000", "huge_external"],
        "scaling": [f"pairs_{n}" for n in models.PAIR_COUNTS],
        "verify": ["resnet_small", "pairs_1000", "deep_cnn"],
        "compare": ["resnet_small", "pairs_10000", "deep_cnn", "huge_external"],
        "inference": ["resnet_small", "deep_cnn"]}
QUICK = {"floor": ["resnet_small", "pairs_1000"],
         "scaling": [f"pairs_{n}" for n in models.PAIR_COUNTS],
         "verify": ["resnet_small", "pairs_1000"],
         "compare": ["resnet_small", "pairs_1000"],
         "inference": ["resnet_small"]}


def parse_args(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="1 run, small models only")
    ap.add_argument("--runs", type=int, default=None, help="runs per measurement (median); default 3")
    ap.add_argument("--skip-huge", action="store_true", help="skip the 2.2 GB external-data model")
    ap.add_argument("--compare", action="store_true", help="also time onnxruntime/onnxsim/onnxslim/onnxoptimizer")
    ap.add_argument("--scratch", type=Path, default=models.DEFAULT_DIR, help="where models and outputs go")
    ap.add_argument("--tool-timeout", type=float, default=120.0, help="seconds per --compare tool run")
    ap.add_argument("--latency-runs", type=int, default=50, help="timed inferences per session")
    ap.add_argument("--output", type=Path, default=RESULTS, help="results markdown file")
    args = ap.parse_args(argv)
    args.runs = args.runs or (1 if args.quick else 3)
    return args


def require_bnfold() -> None:
    """Fail early and clearly: every fold measurement depends on `-m bnfold` working."""
    r = subprocess.run([sys.executable, "-m", "bnfold", "--help"], capture_output=True, text=True)
    if r.returncode != 0:
        last = (r.stderr.strip().splitlines() or ["no output"])[-1]
        sys.exit(f"error: `{sys.executable} -m bnfold --help` failed ({last}).\n"
                 f"Install bnfold into this interpreter first: {sys.executable} -m pip install -e {REPO}")


def check_scratch(scratch: Path) -> None:
    # Models are up to 2.2 GB: never let them land in the git work tree.
    if scratch.resolve().is_relative_to(REPO):
        sys.exit(f"error: scratch dir {scratch} is inside the repository {REPO}")


def model_table(infos: list[models.ModelInfo]) -> Table:
    t = Table("Models", "Generated deterministically by `benchmarks/models.py` (seed 0, nothing "
              "downloaded).", ["model", "nodes", "BN nodes", "weights", "file(s)", "external data"])
    for m in infos:
        t.rows.append([m.name, str(m.nodes), str(m.bn_nodes), fmt_bytes(m.weight_bytes),
                       fmt_bytes(m.file_bytes), "yes" if m.external else "no"])
    return t


def step(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    load_at_start = loadavg()
    check_scratch(args.scratch)
    require_bnfold()
    plan = {k: [n for n in v if not (args.skip_huge and n == "huge_external")]
            for k, v in (QUICK if args.quick else FULL).items()}
    wanted = sorted({n for names in plan.values() for n in names})
    step(f"generating {len(wanted)} models in {args.scratch}")
    infos = {n: models.ensure_model(n, args.scratch) for n in wanted}
    ctx = bench_fold.Ctx(args.runs, Workdir(args.scratch), args.scratch, infos, args.tool_timeout)
    shutil.rmtree(args.scratch / "folded", ignore_errors=True)  # never reuse a stale bnfold output
    sections = [("1-2. Fold cost vs I/O floor", lambda: bench_fold.fold_vs_floor(ctx, plan["floor"])),
                ("3. Scaling", lambda: bench_fold.scaling(ctx, plan["scaling"])),
                ("4. Verification cost", lambda: bench_fold.verification(ctx, plan["verify"])),
                ("6. Inference", lambda: bench_tools.inference(ctx, plan["inference"], args.latency_runs))]
    if args.compare:
        sections.insert(3, ("5. Comparison (--compare)", lambda: bench_tools.compare(ctx, plan["compare"])))
    tables: list[Table] = []
    try:
        for title, run_section in sections:
            step(title)
            tables.append(run_guarded(title, run_section))
            print(tables[-1].markdown(), flush=True)
    finally:
        if "huge_external" in infos:
            models.remove_model(infos["huge_external"])  # 2.2 GB: generated per run, not kept
        shutil.rmtree(args.scratch / "folded", ignore_errors=True)
        # Written even after Ctrl-C or a crash, so a long run is never all lost.
        header = machine_section(REPO, ["run.py", *argv], load_at_start)
        write_results(args.output, header,
                      [bench_fold.targets_table(ctx), model_table(list(infos.values())), *tables])
        step(f"wrote {args.output}")
    return 0


def run_guarded(title: str, run_section: Callable[[], Table]) -> Table:
    """A harness bug in one section must not cost the other sections' results."""
    try:
        return run_section()
    except Exception as exc:  # noqa: BLE001 - reported in RESULTS.md instead
        traceback.print_exc()
        return Table(title, f"**harness error**: `{type(exc).__name__}: {exc}`", ["-"])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
