"""Run bnfold and the other BN-folding tools on every model of a folder; compare what they leave.

Development only (never imported by tests). Run it with a Python that has onnx, onnxruntime and
numpy, plus whichever of onnxsim, onnxslim, onnxoptimizer are installed (a missing one is reported
as "not installed"); bnfold runs in the Python given by ``--bnfold-python`` (any checkout's venv):

    /work/devenv/bin/python benchmarks/real_models/measure_beyond.py /work/models-dev \\
        --bnfold-python /work/main/.venv/bin/python --out benchmarks/real_models/BEYOND_RESULTS.md

Per model and tool: BN nodes before/after, Conv nodes after, ``onnx.checker`` full check of the
output, and the largest abs/rel difference of every output against the original model, both run in
onnxruntime with graph optimizations OFF on the same seeded input. Every tool and every comparison
runs in a child process with a timeout, so one that crashes or hangs becomes a table entry.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import onnx

SEED = 0
NEUTRAL_DIR = "/"

# Each snippet runs as ``python -c SNIPPET SRC DST``; the first name is the module that must import.
TOOLS: dict[str, tuple[str, str]] = {
    "onnxruntime EXTENDED": ("onnxruntime", """
import os, sys, onnxruntime as ort
so = ort.SessionOptions()
so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
so.optimized_model_filepath = sys.argv[2]
if os.path.exists(sys.argv[1] + ".data"):  # else ORT points the new model at the source's data file
    so.add_session_config_entry("session.optimized_model_external_initializers_file_name",
                                os.path.basename(sys.argv[2]) + ".data")
ort.InferenceSession(sys.argv[1], so, providers=["CPUExecutionProvider"])
"""),
    "onnxsim": ("onnxsim", """
import sys, onnx, onnxsim
model, ok = onnxsim.simplify(onnx.load(sys.argv[1]))
if not ok:
    sys.exit("onnxsim: its own check of the simplified model failed")
onnx.save(model, sys.argv[2])
"""),
    "onnxslim": ("onnxslim", """
import sys, onnx, onnxslim
onnx.save(onnxslim.slim(onnx.load(sys.argv[1])), sys.argv[2])
"""),
    # The fuse-and-elimination set (fuse_bn_into_conv, fuse_add_bias_into_conv, ...) is what
    # onnxoptimizer applies when no pass list is given.
    "onnxoptimizer": ("onnxoptimizer", """
import sys, onnx, onnxoptimizer
passes = onnxoptimizer.get_fuse_and_elimination_passes()
onnx.save(onnxoptimizer.optimize(onnx.load(sys.argv[1]), passes), sys.argv[2])
"""),
}

# Child of --compare: original and candidate under ORT with optimizations off, same input.
COMPARE = """
import json, sys
import numpy as np, onnx, onnxruntime as ort
orig, cand, seed = sys.argv[1], sys.argv[2], int(sys.argv[3])
result = {}
try:
    onnx.checker.check_model(cand, full_check=True)
    result["checker"] = "ok"
except Exception as exc:
    result["checker"] = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:160]}"
so = ort.SessionOptions()
so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
ref_sess = ort.InferenceSession(orig, so, providers=["CPUExecutionProvider"])
rng = np.random.default_rng(seed)
graph = onnx.load(orig, load_external_data=False).graph
dtypes = {i.name: onnx.helper.tensor_dtype_to_np_dtype(i.type.tensor_type.elem_type) for i in graph.input}
feeds = {}
for arg in ref_sess.get_inputs():
    shape = [d if isinstance(d, int) else 1 for d in arg.shape]
    feeds[arg.name] = rng.uniform(-1, 1, shape).astype(dtypes[arg.name])
ref = dict(zip([o.name for o in ref_sess.get_outputs()], ref_sess.run(None, feeds)))
sess = ort.InferenceSession(cand, so, providers=["CPUExecutionProvider"])
got = sess.run(None, {k: v for k, v in feeds.items() if k in {i.name for i in sess.get_inputs()}})
names = [o.name for o in sess.get_outputs()]
outputs = {}
for i, (name, ref_value) in enumerate(ref.items()):
    value = got[names.index(name)] if name in names else (got[i] if i < len(got) else None)
    if value is None or value.shape != ref_value.shape:
        outputs[name] = {"note": f"shape {getattr(value, 'shape', None)} vs {ref_value.shape}"}
        continue
    a, b = ref_value.astype(np.float64), value.astype(np.float64)
    diff = float(np.abs(a - b).max()) if a.size else 0.0
    scale = float(np.abs(a).max()) if a.size else 0.0
    outputs[name] = {"abs": diff, "rel": diff / scale if scale else diff, "elements": int(a.size)}
result["outputs"] = outputs
print(json.dumps(result))
"""


@dataclass
class Row:
    """One tool's result on one model."""
    model: str
    tool: str
    status: str = ""
    bn_before: int | None = None
    bn_after: int | None = None
    conv_after: int | None = None
    checker: str = "–"
    outputs: dict = field(default_factory=dict)
    notes: str = ""
    seconds: float | None = None


def op_counts(path: Path) -> Counter:
    """Node counts of the main graph and of model-local functions (a BN hidden there still counts)."""
    model = onnx.load(str(path), load_external_data=False)
    counts: Counter = Counter(n.op_type for n in model.graph.node)
    for function in model.functions:
        counts.update(n.op_type for n in function.node)
    return counts


def tool_installed(module: str) -> bool:
    code = f"import importlib.util, sys; sys.exit(importlib.util.find_spec({module!r}) is None)"
    return subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


def run(argv: list[str], timeout: float) -> tuple[subprocess.CompletedProcess | None, str, float]:
    """Run a child; returns (result or None, error text, seconds). Crash and timeout become text.

    The child starts in a neutral folder: `python -m bnfold` run from inside a checkout would import
    that checkout's bnfold instead of the one installed for --bnfold-python."""
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, cwd=NEUTRAL_DIR, check=False)
    except subprocess.TimeoutExpired:
        return None, f"timeout after {timeout:g} s", time.perf_counter() - t0
    seconds = time.perf_counter() - t0
    if proc.returncode < 0:
        return proc, f"killed by signal {-proc.returncode}", seconds
    return proc, "", seconds


def last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1][:200] if lines else ""


def bnfold_notes(stdout: str) -> tuple[str, str]:
    """(status, notes) from bnfold's --json report: verdict plus skipped BNs by reason."""
    try:
        report = json.loads(stdout)
    except json.JSONDecodeError:
        return "no JSON report", last_line(stdout)
    verification = report.get("verification") or {}
    verdict = "PASSED" if verification.get("passed") else verification.get("runtime_status", "not verified")
    reasons = Counter(s["reason"] for s in report.get("skipped", []))
    parts = [report["error"][:160]] if report.get("error") else []
    parts.append(f"{len(report.get('folded', []))} folded")
    parts += [f"{n}× {r}" for r, n in reasons.most_common()]
    return f"exit {report.get('exit_code')}, {verdict}", ", ".join(parts)


def run_tool(model: Path, tool: str, out: Path, bnfold_python: str, timeout: float) -> Row:
    row = Row(model.stem, tool, bn_before=op_counts(model)["BatchNormalization"])
    if tool == "bnfold":
        argv = [bnfold_python, "-m", "bnfold", str(model), "-o", str(out), "--json"]
    else:
        module, code = TOOLS[tool]
        if not tool_installed(module):
            row.status = "not installed"
            return row
        argv = [sys.executable, "-c", code, str(model), str(out)]
    proc, error, row.seconds = run(argv, timeout)
    if tool == "bnfold" and proc is not None and not error:
        row.status, row.notes = bnfold_notes(proc.stdout)
    elif error or proc is None or proc.returncode != 0:
        row.status = error or f"exit {proc.returncode}"
        row.notes = last_line(proc.stderr) if proc is not None else ""
    else:
        row.status = "ok"
    if out.exists():
        counts = op_counts(out)
        row.bn_after, row.conv_after = counts["BatchNormalization"], counts["Conv"] + counts["FusedConv"]
        compare(model, out, row, timeout)
    return row


def compare(model: Path, out: Path, row: Row, timeout: float) -> None:
    proc, error, _ = run([sys.executable, "-c", COMPARE, str(model), str(out), str(SEED)], timeout)
    if error or proc is None or proc.returncode != 0:
        row.checker = "–"
        row.notes = f"{row.notes}; comparison failed: {error or last_line(proc.stderr)}".strip("; ")
        return
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    row.checker, row.outputs = result["checker"], result["outputs"]


def worst_output(outputs: dict) -> tuple[str, str]:
    """(max abs, max rel) cells over all outputs; an output that could not be compared says why."""
    if not outputs:
        return "–", "–"
    broken = [f"{name}: {o['note']}" for name, o in outputs.items() if "note" in o]
    if broken:
        return "not comparable", "; ".join(broken)
    name = max(outputs, key=lambda n: outputs[n]["rel"])
    where = f" ({name})" if len(outputs) > 1 else ""
    return f"{max(o['abs'] for o in outputs.values()):.1e}", f"{outputs[name]['rel']:.1e}{where}"


def bnfold_version(python: str) -> str:
    code = "import bnfold, os; print(os.path.dirname(os.path.dirname(os.path.abspath(bnfold.__file__))))"
    proc, error, _ = run([python, "-c", code], 60)
    if error or proc is None or proc.returncode != 0:
        return "unknown (bnfold does not import)"
    root = proc.stdout.strip()
    git = ["git", "-C", root]
    commit = subprocess.run(git + ["rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False).stdout.strip()
    dirty = subprocess.run(git + ["status", "--porcelain", "bnfold"], capture_output=True, text=True, check=False).stdout.strip()
    return f"{root} at {commit or '?'} ({'bnfold/ modified' if dirty else 'bnfold/ clean'})"


def versions() -> str:
    code = ("import importlib.metadata as m\nfor p in ('onnx','onnxruntime','numpy','onnxsim','onnxslim',"
            "'onnxoptimizer'):\n    try: print(p, m.version(p))\n    except Exception: print(p, 'not installed')")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    return ", ".join(proc.stdout.split("\n")[:-1])


def write_markdown(rows: list[Row], path: Path, bnfold_python: str, folder: Path) -> None:
    lines = [
        "# bnfold and other tools on the issue-13 / issue-11 (C4) real models", "",
        (f"Written by `benchmarks/real_models/measure_beyond.py` on "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} from the models in `{folder}` "
        "(made by `export_beyond.py`; their list with export settings is `BEYOND_MODELS.md`)."), "",
        f"- bnfold: `{bnfold_python} -m bnfold MODEL -o OUT --json`, checkout {bnfold_version(bnfold_python)}",
        f"- tools: {versions()}",
        ("- onnxruntime EXTENDED: offline optimizer (`optimized_model_filepath`); onnxsim: "
        "`simplify`; onnxslim: `slim`; onnxoptimizer: its fuse-and-elimination passes "
        "(incl. `fuse_bn_into_conv`). Each runs in a child process with a timeout."),
        (f"- differences: each output of the tool's model against the original, both in onnxruntime "
        f"with graph optimizations OFF, input uniform(-1, 1) from numpy default_rng({SEED}), symbolic "
        "dims set to 1; rel = max|a−b| / max|reference| of the worst output (named when several). "
        "Post-NMS detection outputs are not continuous in their inputs: a tiny change may reorder "
        "or drop boxes, so a large or shape difference there is not by itself a wrong fold."),
        ("- Conv after counts Conv and onnxruntime's FusedConv nodes; checker = "
        "`onnx.checker.check_model(path, full_check=True)` on the written model."), "",
        "| model | tool | status | BN before → after | Conv after | checker | max abs | max rel | notes | s |",
        "|---|---|---|---|---:|---|---:|---|---|---:|",
    ]
    for r in rows:
        bn = f"{r.bn_before} → {r.bn_after}" if r.bn_after is not None else f"{r.bn_before} → –"
        conv = "–" if r.conv_after is None else str(r.conv_after)
        abs_cell, rel_cell = worst_output(r.outputs)
        seconds = "–" if r.seconds is None else f"{r.seconds:.1f}"
        lines.append(f"| {r.model} | {r.tool} | {r.status} | {bn} | {conv} | {r.checker} | {abs_cell} "
                     f"| {rel_cell} | {r.notes.replace('|', '/')} | {seconds} |")
    path.write_text("\n".join(lines) + "\n")
    path.with_suffix(".json").write_text(json.dumps([r.__dict__ for r in rows], indent=1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path, help="folder of *.onnx models")
    parser.add_argument("--bnfold-python", default=sys.executable,
                        help="Python executable whose `-m bnfold` is measured")
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("BEYOND_RESULTS.md"))
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/bnfold-beyond"),
                        help="where the tools' output models are written (kept for inspection)")
    parser.add_argument("--tools", nargs="*", default=["bnfold", *TOOLS], help="subset of tools")
    parser.add_argument("--models", nargs="*", help="only these model names (file stems)")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds per tool run")
    opts = parser.parse_args()
    opts.folder, opts.workdir = opts.folder.resolve(), opts.workdir.resolve()  # children run in /
    rows: list[Row] = []
    for model in sorted(opts.folder.glob("*.onnx")):
        if opts.models and model.stem not in opts.models:
            continue
        for tool in opts.tools:
            out_dir = opts.workdir / model.stem
            out_dir.mkdir(parents=True, exist_ok=True)
            out = out_dir / f"{tool.split()[0]}.onnx"
            for stale in (out, out.with_name(out.name + ".data")):
                stale.unlink(missing_ok=True)
            rows.append(run_tool(model, tool, out, opts.bnfold_python, opts.timeout))
            r = rows[-1]
            print(f"{r.model:32} {r.tool:22} {r.status:24} BN {r.bn_before}->{r.bn_after} "
                  f"Conv {r.conv_after} {r.checker[:20]} {worst_output(r.outputs)}", flush=True)
            write_markdown(rows, opts.out, opts.bnfold_python, opts.folder)


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "2")
    main()
