"""Benchmarks 5-6: other tools doing the same fold (--compare), and inference speed."""
from __future__ import annotations

import importlib.util
import json
import statistics
from pathlib import Path

import numpy as np

import children as ch
from bench_fold import Ctx, floor_and_fold, folded_model, op_counts
from measure import Run, Summary, py, run_child, summarize
from report import Table, fmt_ratio, fmt_s, ratio, rss_cell, sig, time_cell

NOISE = 0.05  # latency changes inside ±5% are reported as "no difference"


def installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def _tool_run(ctx: Ctx, code: str, info_path: str, external: bool) -> tuple[Summary, str]:
    """Measure one tool; also inspect its last output for BN nodes left."""
    seen: dict[str, str] = {}

    def make(d: Path) -> list[str]:
        seen["dir"] = str(d)
        return ch.tool_argv(code, info_path, external)(d)

    runs: list[Run] = []
    for _ in range(ctx.k):
        d = ctx.work.fresh("tool")
        try:
            runs.append(run_child(make(d), ctx.tool_timeout_s))
            if runs[-1].ok:
                ops = op_counts(ch.out_path(d))
                seen["ops"] = f"{ops['BatchNormalization']} / {sum(ops.values())}"
        finally:
            ctx.work.clean(d)
        if not runs[-1].ok:
            break
    return summarize(runs), seen.get("ops", "–")


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
            t.rows.append([f"{name} ({info.nodes} nodes)", tool, time_cell(s),
                           fmt_ratio(ratio(s.wall_s, floor.wall_s)), rss_cell(s),
                           fmt_ratio(ratio(s.maxrss_kib, floor.maxrss_kib)), ops])
    t.notes += [
        "`BN left / nodes out`: a tool has really folded only if BN left is 0 *and* no extra "
        "nodes appeared. `onnxoptimizer` with only `fuse_bn_into_conv` replaces each BN by a "
        "small subgraph (Sqrt/Div/Mul/Sub/Add...) that computes the folded weights at run time, "
        "so its node count goes up; it needs constant folding afterwards.",
        "onnxruntime's offline optimizer writes what its BASIC level produces, which includes "
        "other rewrites; it is shown because it is the tool most users already have.",
    ]
    return t


def _infer(ctx: Ctx, path: str, level: str, runs: int, tag: str) -> tuple[dict[str, float] | str, np.ndarray | None]:
    """k child processes, each: create a session, warm up, time `runs` inferences."""
    per_child: list[dict[str, float]] = []
    y = None
    for _ in range(ctx.k):
        d = ctx.work.fresh(tag)
        try:
            npy = d / "y.npy"
            r = run_child(py(ch.INFER, path, level, runs, 5, npy), ctx.tool_timeout_s * 5)
            if not r.ok:
                return str(r.error), None
            per_child.append(json.loads(r.stdout.strip().splitlines()[-1]))
            y = np.load(npy)
        finally:
            ctx.work.clean(d)
    med = {k: statistics.median(c[k] for c in per_child) for k in per_child[0]}
    return med, y


def _verdict(orig: float, folded: float) -> str:
    change = folded / orig - 1
    if abs(change) < NOISE:
        return f"no difference ({change:+.0%})"
    return f"{'faster' if change < 0 else 'slower'} ({change:+.0%})"


def inference(ctx: Ctx, names: list[str], runs: int) -> Table:
    t = Table("6. Inference: original vs folded model (onnxruntime CPU)",
              f"Session creation time and median latency over {runs} runs after 5 warm-up runs, "
              f"median over {ctx.k} child process(es). Changes within ±{NOISE:.0%} are reported "
              "as no difference; `output rel. error` = max abs difference of the two outputs / "
              "max abs original output. At ORT_ENABLE_BASIC onnxruntime folds Conv+BN itself, so little "
              "or no gain is expected there; ORT_DISABLE_ALL shows what folding buys on its own.",
              ["model", "ORT level", "create (orig)", "create (folded)", "latency (orig)",
               "latency (folded)", "latency change", "output rel. error"])
    for name in names:
        folded = folded_model(ctx, name)
        for level in ("disable_all", "basic"):
            orig, y0 = _infer(ctx, ctx.models[name].path, level, runs, "infer")
            fold, y1 = (_infer(ctx, str(folded), level, runs, "infer") if isinstance(folded, Path)
                        else (folded, None))
            if isinstance(orig, str) or isinstance(fold, str):
                err = orig if isinstance(orig, str) else fold
                t.rows.append([name, level, str(err)] + ["–"] * 5)
                continue
            err = float(np.abs(y0 - y1).max() / max(np.abs(y0).max(), 1e-30))
            t.rows.append([name, level, fmt_s(orig["create_s"]), fmt_s(fold["create_s"]),
                           fmt_s(orig["latency_s"]), fmt_s(fold["latency_s"]),
                           _verdict(orig["latency_s"], fold["latency_s"]), f"{err:.1e}"])
    return t
