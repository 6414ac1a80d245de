"""Benchmarks 1-4: I/O floor, fold cost vs floor, scaling, verification cost."""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import onnx

from benchmarks import children as ch
from benchmarks.measure import Summary, Workdir, measure, measure_interleaved, py, run_child
from benchmarks.models import ModelInfo
from benchmarks.report import Table, fmt_bytes, fmt_ratio, fmt_s, mark, ratio, rss_cell, time_cell

TIME_TARGET, RSS_TARGET, EXT_RSS_TARGET = 1.2, 1.1, 1.5
VERIFY_TARGET, PAIRS_10K_TARGET_S, LINEARITY_TARGET = 1.2, 2.0, 1.5


@dataclass
class Ctx:
    """State shared by all benchmark sections of one run."""
    k: int
    work: Workdir
    scratch: Path
    models: dict[str, ModelInfo]
    tool_timeout_s: float
    # (model, what) -> Summary, so a measurement made by one section is
    # reused by another (e.g. bnfold's fold time in the --compare table).
    cache: dict[tuple[str, str], Summary] = field(default_factory=dict)
    folded: dict[str, Path | str] = field(default_factory=dict)
    # Every target checked, for the summary at the top of RESULTS.md: (target id, model,
    # measured, limit, met).
    targets: list[tuple[str, str, str, str, bool | None]] = field(default_factory=list)

    def check(self, target: str, model: str, measured: str, limit: str, met: bool | None) -> str:
        """Record one target's outcome; returns its ✓/✗ cell."""
        self.targets.append((target, model, measured, limit, met))
        return mark(met)


def op_counts(path: Path) -> Counter[str]:
    """Node types in an output model; weights are not loaded (fast, low memory)."""
    m = onnx.load(str(path), load_external_data=False)
    return Counter(n.op_type for n in m.graph.node)


def folded_model(ctx: Ctx, name: str) -> Path | str:
    """A bnfold output kept on disk for ORT runs; unmeasured. Error string on failure."""
    if name not in ctx.folded:
        out = ctx.scratch / "folded" / name / "model.onnx"
        out.parent.mkdir(parents=True, exist_ok=True)
        r = run_child(ch.bnfold_argv(ctx.models[name].path)(out.parent))
        ctx.folded[name] = out if r.ok else str(r.error)
    return ctx.folded[name]


def floor_and_fold(ctx: Ctx, name: str) -> tuple[Summary, Summary]:
    info = ctx.models[name]
    res = measure_interleaved({"floor": ch.floor_argv(info.path, info.external),
                               "bnfold": ch.bnfold_argv(info.path)}, ctx.k, ctx.work)
    ctx.cache[(name, "floor")], ctx.cache[(name, "bnfold")] = res["floor"], res["bnfold"]
    return res["floor"], res["bnfold"]


def fold_vs_floor(ctx: Ctx, names: list[str]) -> Table:
    t = Table("1-2. Fold cost vs I/O floor",
              "`python -m bnfold MODEL -o OUT --no-verify` against a child that only does "
              f"`onnx.load` + `onnx.save`. Targets: time ≤ {TIME_TARGET}× floor, peak RSS ≤ "
              f"{RSS_TARGET}× floor; external data: peak RSS ≤ {EXT_RSS_TARGET}× weight bytes.",
              ["model", "weights", "floor time", "bnfold time", "time ×floor", "✓",
               "floor RSS", "bnfold RSS", "RSS ×floor", "✓", "RSS ×weights", "✓", "BN left"])
    for name in names:
        info = ctx.models[name]
        floor, fold = floor_and_fold(ctx, name)
        tr, rr = ratio(fold.wall_s, floor.wall_s), ratio(fold.maxrss_kib, floor.maxrss_kib)
        wr = ratio(fold.maxrss_kib * 1024 if fold.maxrss_kib else None, info.weight_bytes)
        t.rows.append([
            name + (" (external)" if info.external else ""), fmt_bytes(info.weight_bytes),
            time_cell(floor), time_cell(fold), fmt_ratio(tr),
            ctx.check("time", name, fmt_ratio(tr), f"≤ {TIME_TARGET}× floor", None if tr is None else tr <= TIME_TARGET),
            rss_cell(floor), rss_cell(fold), fmt_ratio(rr),
            ctx.check("rss", name, fmt_ratio(rr), f"≤ {RSS_TARGET}× floor", None if rr is None else rr <= RSS_TARGET),
            fmt_ratio(wr) if info.external else "–",
            ctx.check("external_rss", name, fmt_ratio(wr), f"≤ {EXT_RSS_TARGET}× weights",
                      None if wr is None else wr <= EXT_RSS_TARGET) if info.external else "–",
            bn_left(ctx, name)])
    t.notes.append("`BN left`: BatchNormalization nodes in bnfold's output (from one extra, "
                   "unmeasured run); `–` when that run was skipped or failed.")
    return t


def bn_left(ctx: Ctx, name: str) -> str:
    if ctx.models[name].external:
        return "–"  # a third 2 GB write only to count nodes is not worth it
    out = folded_model(ctx, name)
    return str(op_counts(out)["BatchNormalization"]) if isinstance(out, Path) else "–"


def scaling(ctx: Ctx, names: list[str]) -> Table:
    t = Table("3. Scaling with node count",
              "Chained Conv(1x1)→BN pairs. `net/pair` = (bnfold time − time of a process that "
              "only does `import onnx, numpy, bnfold`) / pairs, i.e. the cost that grows with the "
              f"graph. Targets: 10,000 pairs < {PAIRS_10K_TARGET_S:g} s; net/pair at the largest N "
              f"≤ {LINEARITY_TARGET}× net/pair at N=1000 (linear, not quadratic).",
              ["model", "nodes", "file", "floor time", "bnfold time", "bnfold RSS",
               "net/pair", "target", "✓"])
    base = measure(lambda d: py("import onnx, numpy, bnfold"), ctx.k, ctx.work, "import")
    per_pair: dict[int, float] = {}
    for name in names:
        info = ctx.models[name]
        pairs = info.bn_nodes
        floor, fold = ctx.cache.get((name, "floor")), ctx.cache.get((name, "bnfold"))
        if floor is None or fold is None:
            floor, fold = floor_and_fold(ctx, name)
        net = (fold.wall_s - base.wall_s) / pairs if fold.ok and base.ok else None
        if net is not None:
            per_pair[pairs] = net
        target, ok_cell = "", "–"
        if pairs >= 10000:
            target = f"< {PAIRS_10K_TARGET_S:g} s"
            ok_cell = ctx.check("pairs_10k", name, time_cell(fold), target,
                                fold.ok and fold.wall_s < PAIRS_10K_TARGET_S)
        elif pairs == 1000:
            target = "reference for linearity"
        t.rows.append([name, str(info.nodes), fmt_bytes(info.file_bytes), time_cell(floor),
                       time_cell(fold), rss_cell(fold), fmt_s(net), target, ok_cell])
    if 1000 in per_pair and len(per_pair) > 1:
        top = max(per_pair)
        lin = per_pair[top] / per_pair[1000]
        t.rows.append([f"linearity: net/pair at {top} ÷ at 1000", "", "", "", "", "",
                       fmt_ratio(lin), f"≤ {LINEARITY_TARGET}×",
                       ctx.check("linearity", f"pairs_{top} vs pairs_1000", fmt_ratio(lin),
                                 f"≤ {LINEARITY_TARGET}×", lin <= LINEARITY_TARGET)])
    t.notes.append(f"Start-up baseline (`import onnx, numpy, bnfold`): {time_cell(base)}, {rss_cell(base)}.")
    return t


def verification(ctx: Ctx, names: list[str]) -> Table:
    t = Table("4. Verification cost",
              "`bnfold MODEL -o OUT` (verify) minus `--no-verify`, against what verification "
              "fundamentally needs: a child that creates two ORT_DISABLE_ALL sessions (original "
              "+ folded) and runs each once, minus bare interpreter start-up (`python -c pass`). "
              f"Target: verification cost ≤ {VERIFY_TARGET}× that.",
              ["model", "no-verify", "verify", "verify cost", "2 ORT runs (child)",
               "2 ORT runs (net)", "ratio", "✓", "verify RSS", "ORT child RSS"])
    startup = measure(lambda d: py(ch.STARTUP), ctx.k, ctx.work, "startup")
    for name in names:
        info = ctx.models[name]
        folded = folded_model(ctx, name)
        if not isinstance(folded, Path):
            t.rows.append([name, folded] + ["–"] * 8)
            continue
        res = measure_interleaved({
            "noverify": ch.bnfold_argv(info.path),
            "verify": ch.bnfold_argv(info.path, verify=True),
            "ort": lambda d: py(ch.ORT_TWO_RUNS, info.path, folded),
        }, ctx.k, ctx.work)
        nv, v, o = res["noverify"], res["verify"], res["ort"]
        cost = v.wall_s - nv.wall_s if v.ok and nv.ok else None
        net = o.wall_s - startup.wall_s if o.ok and startup.ok else None
        r = ratio(cost, net)
        t.rows.append([name, time_cell(nv), time_cell(v), fmt_s(cost), time_cell(o), fmt_s(net),
                       fmt_ratio(r), ctx.check("verify", name, fmt_ratio(r), f"≤ {VERIFY_TARGET}× two ORT runs",
                                               None if r is None else r <= VERIFY_TARGET),
                       rss_cell(v), rss_cell(o)])
    t.notes.append(f"Bare interpreter start-up: {time_cell(startup)}.")
    return t


# Why a target can be missed: the mechanism, not the numbers (those are in the tables).
WHY_MISSED = {
    "time": "fixed costs the floor does not pay dominate small models: importing bnfold and click, "
            "onnx.checker on the input, and Python work per node (indexing, planning and rewriting, "
            "~170-190 µs per Conv→BN pair, section 3). On weight-heavy models bnfold is below the floor "
            "because it streams the output tensor by tensor instead of serialising the model in memory.",
    "rss": "Python objects per node (the graph index's name dictionaries, node wrappers, one record per "
           "fold) cost a few kB per node; the floor holds only the protobuf. Weight-heavy models stay "
           "below the floor's peak.",
    "external_rss": "the folded weights are held until they are written.",
    "pairs_10k": "per-node Python work (section 3); it is linear, so the limit moves with the machine.",
    "linearity": "some step rescans the graph per fold (a regression: tests/test_scaling.py should catch it).",
    "verify": "the analytic check re-derives every folded weight in float64 from the original parameters "
              "(the original weights stay in memory until it has run, and every weight is read and "
              "recomputed once more), and the graph checks run on top; the two onnxruntime runs themselves "
              "cost what the baseline costs. Small graphs pay onnx's reference evaluator per folded chain.",
}


def targets_table(ctx: Ctx) -> Table:
    """Every target at a glance; each missed one with the reason."""
    t = Table("Targets", "Each target of the suite, from the sections below (`–`: not measured).",
              ["target", "model", "measured", "limit", "✓", "if missed: why"])
    for target, model, measured, limit, met in ctx.targets:
        t.rows.append([target, model, measured, limit, mark(met), WHY_MISSED[target] if met is False else ""])
    return t
