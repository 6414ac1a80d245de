"""Benchmarks 5-6: other tools doing the same fold (--compare), and inference speed."""
from __future__ import annotations

import importlib.util
import json
import statistics
from pathlib import Path

import numpy as np

from benchmarks import children as ch
from benchmarks.bench_fold import Ctx, floor_and_fold, folded_model, op_counts
from benchmarks.measure import Run, Summary, py, run_child, summarize
from benchmarks.report import Table, fmt_ratio, fmt_s, ratio, rss_cell, sig, time_cell

NOISE = 0.05  # latency changes inside ±5% are reported as "no difference"


def installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


SLOW_TOOL_S = 20.0  # a tool this slow is measured once: a repeat cannot change the verdict


def _tool_run(ctx: Ctx, code: str, info_path: str, external: bool) -> tuple[Summary, str]:
    """Measure one tool; also inspect its last output for BN nodes left."""
    ops = "–"
    runs: list[Run] = []
    for _ in range(ctx.k):
        d = ctx.work.fresh("tool")
        try:
            runs.append(run_child(ch.tool_argv(code, info_path, external)(d), ctx.tool_timeout_s))
            if runs[-1].ok:
                counts = op_counts(ch.out_path(d))
                ops = f"{counts['BatchNormalization']} / {sum(counts.values())}"
        finally:
            ctx.work.clean(d)
        if not runs[-1].ok or (runs[-1].wall_s or 0) > SLOW_TOOL_S:
            break
    return summarize(runs), ops


def compare(ctx: Ctx, names: list[str]) -> Table:
    t = Table("5. Comparison with other tools (--compare)",
              "The same models through other tools that fold BN, each a whole process: load, "
              "transform, save (default options; onnxsim/onnxslim also do their other passes). "
              f"Per-tool timeout {sig(ctx.tool_timeout_s)} s.",
              ["model", "tool", "time", "time ×floor", "peak RSS", "RSS ×floor",
               "BN left / nodes out"])
    for name in names:
        info = ctx.models[name]
        floor, fold = ctx.cache.get((name, "floor")), ctx.cache.get((name, "bnfold"))
        if floor is None or fold is None:
            floor, fold = floor_and_fold(ctx, name)
        out = folded_model(ctx, name) if not info.external else None
        bn_ops = "–"
        if isinstance(out, Path):
            ops = op_counts(out)
            bn_ops = f"{ops['BatchNormalization']} / {sum(ops.values())}"
        rows = [("I/O floor (onnx load+save)", floor, "–"), ("**bnfold**", fold, bn_ops)]
        for tool, (module, code) in ch.COMPARE_TOOLS.items():
            if not installed(module):
                rows.append((tool, Summary(error="not installed"), "–"))
                continue
            rows.append((tool, *_tool_run(ctx, code, info.path, info.external)))
        for tool, s, ops in rows:
            once = " (1 run)" if s.ok and len(s.runs) == 1 and ctx.k > 1 else ""
            t.rows.append([f"{name} ({info.nodes} nodes)", tool, time_cell(s) + once,
                           fmt_ratio(ratio(s.wall_s, floor.wall_s)), rss_cell(s),
                           fmt_ratio(ratio(s.maxrss_kib, floor.maxrss_kib)), ops])
    t.notes += [
        "`BN left / nodes out`: a tool has really folded only if BN left is 0 *and* no extra "
        "nodes appeared. `onnxoptimizer` with only `fuse_bn_into_conv` replaces each BN by a "
        "small subgraph (Sqrt/Div/Mul/Sub/Add...) that computes the folded weights at run time, "
        "so its node count goes up; it needs constant folding afterwards.",
        f"`(1 run)`: a tool slower than {SLOW_TOOL_S:g} s is measured once; a repeat would not "
        "change the comparison.",
        "onnxruntime's offline optimizer writes what its BASIC level produces, which includes "
        "other rewrites; it is shown because it is the tool most users already have.",
    ]
    return t


def _infer(ctx: Ctx, orig: str, folded: str, level: str, runs: int,
           budget_s: float = 6.0) -> dict[str, float] | str:
    """k child processes, each timing both models alternately; medians over children."""
    per_child: list[dict[str, float]] = []
    for _ in range(ctx.k):
        d = ctx.work.fresh("infer")
        try:
            npz = d / "y.npz"
            r = run_child(py(ch.INFER, orig, folded, level, runs, budget_s, npz), ctx.tool_timeout_s * 5)
            if not r.ok:
                return str(r.error)
            res = json.loads(r.stdout.strip().splitlines()[-1])
            with np.load(npz) as y:
                # Relative to the output's range: the deep CNN's outputs are ~1e3.
                res["rel_err"] = float(np.abs(y["orig"] - y["folded"]).max()
                                       / max(float(np.abs(y["orig"]).max()), 1e-30))
            per_child.append(res)
        finally:
            ctx.work.clean(d)
    return {k: statistics.median(c[k] for c in per_child) for k in per_child[0]}


def _verdict(paired_ratio: float) -> str:
    change = paired_ratio - 1
    if abs(change) < NOISE:
        return f"no difference ({change:+.0%})"
    return f"{'faster' if change < 0 else 'slower'} ({change:+.0%})"


def inference(ctx: Ctx, names: list[str], runs: int) -> Table:
    t = Table("6. Inference: original vs folded model (onnxruntime CPU)",
              "Session creation time (median of 3) and median latency after 5 warm-up runs, over "
              f"≥ {runs} runs (fast models get more: ~6 s of runs per process, see `runs`). Original "
              "and folded model alternate inside one process so load on the machine affects both "
              f"alike, and `latency change` is the median of per-pair folded/original ratios; median "
              f"over {ctx.k} child process(es). Changes within ±{NOISE:.0%} are reported as no "
              "difference; `output rel. error` = max abs difference of the two outputs / max abs "
              "original output. At ORT_ENABLE_BASIC onnxruntime folds Conv+BN "
              "itself, so little or no gain is expected there; ORT_DISABLE_ALL shows what folding "
              "buys on its own.",
              ["model", "ORT level", "create (orig)", "create (folded)", "latency (orig)",
               "latency (folded)", "latency change", "runs", "output rel. error"])
    for name in names:
        folded = folded_model(ctx, name)
        for level in ("disable_all", "basic"):
            res = _infer(ctx, ctx.models[name].path, str(folded), level, runs) \
                if isinstance(folded, Path) else folded
            if isinstance(res, str):
                t.rows.append([name, level, res] + ["–"] * 6)
                continue
            t.rows.append([name, level, fmt_s(res["orig_create_s"]), fmt_s(res["folded_create_s"]),
                           fmt_s(res["orig_latency_s"]), fmt_s(res["folded_latency_s"]),
                           _verdict(res["paired_ratio"]),
                           str(int(res["runs"])), f"{res['rel_err']:.1e}"])
    return t
