"""Real PyTorch architectures, exported with their BatchNormalization nodes kept, folded by bnfold.

Run with a Python that has torch, torchvision, onnx, onnxruntime, numpy and bnfold installed
(torch is NOT a dependency of bnfold or of its test suite; this script is an opt-in benchmark):

    python -m venv /work/torchvenv
    /work/torchvenv/bin/pip install torch torchvision onnx onnxruntime numpy click
    /work/torchvenv/bin/pip install -e .
    /work/torchvenv/bin/python benchmarks/real_models/export_and_fold.py

torch and torchvision must be matching builds: a CPU-only torch ("+cpu") with PyPI's default (CUDA)
torchvision fails at ``import torchvision`` with "operator torchvision::nms does not exist". The
recorded run used PyPI's default torch 2.14.1 + torchvision 0.29.1 (both +cu130; runs on CPU).

What it does, per model:

1. builds the model with random weights (fixed seed), randomizes every BatchNorm's statistics and
   affine parameters (running_mean ~ N(0, 0.5), running_var ~ U(0.5, 2), weight ~ U(0.5, 1.5),
   bias ~ N(0, 0.2); "N(m, s)" means mean m, standard deviation s), calls model.eval();
2. exports it with the TorchScript exporter (torch.onnx.export(..., dynamo=False)), opset 17,
   dynamic batch axis, do_constant_folding=False. The exporter's default TrainingMode.EVAL fuses
   Conv+BN itself; if the exported graph has fewer BatchNormalization nodes than the model has BN
   modules, the model is re-exported with TrainingMode.PRESERVE (model still in eval mode) and every
   BN node is checked to be an inference BN (training_mode absent or 0, exactly one output);
3. runs ``python -m bnfold MODEL -o OUT --json`` as a subprocess (wall time measured around it),
   and records the BN count before/after, every skipped BN with its reason code, verification
   status, per-output max relative error (bnfold's ``max_rel_error`` = max|a-b| / max|reference|),
   the worst analytic ulp error;
4. independently of bnfold, runs the original and the folded file in onnxruntime (graph
   optimizations ORT_DISABLE_ALL on both, input uniform(-1, 1), batch 2, numpy default_rng(0)) and
   computes max|a-b| / max|reference| per output;
5. for every BN left in the folded model, inspects the ORIGINAL graph around it (producer, the
   producer output's consumer count, the BN's consumers and their padding) and decides whether
   leaving it is correct: a BN whose producer is Conv/ConvTranspose/Gemm/MatMul whose output has no
   other reader must be folded (backward); a BN whose every consumer is an unpadded Conv or a
   Gemm(transA=0)/2-D MatMul could be folded forward. Anything else is legitimately unfoldable.

Writes results.json and RESULTS.md next to this script (every number in RESULTS.md comes from the
run that wrote it). Scratch models go to /tmp/bnfold-real (``--workdir``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
import torch.nn as nn
import torchvision

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
FOLDABLE_LAYERS = {"Conv", "ConvTranspose", "Gemm", "MatMul"}
REL_LIMIT = 1e-6  # fp32 budget from the brief


# --------------------------------------------------------------------------- models

class DCGANGenerator(nn.Module):
    """DCGAN generator (Radford et al.): ConvTranspose2d -> BatchNorm2d -> ReLU x3, then ConvTranspose2d -> Tanh."""

    def __init__(self, nz: int = 100, ngf: int = 64, nc: int = 3):
        super().__init__()
        self.main = nn.Sequential(
            nn.ConvTranspose2d(nz, ngf * 4, 4, 1, 0, bias=False), nn.BatchNorm2d(ngf * 4), nn.ReLU(True),  # 4x4
            nn.ConvTranspose2d(ngf * 4, ngf * 2, 4, 2, 1, bias=False), nn.BatchNorm2d(ngf * 2), nn.ReLU(True),  # 8x8
            nn.ConvTranspose2d(ngf * 2, ngf, 4, 2, 1, bias=False), nn.BatchNorm2d(ngf), nn.ReLU(True),  # 16x16
            nn.ConvTranspose2d(ngf, nc, 4, 2, 1, bias=False), nn.Tanh(),  # 32x32
        )

    def forward(self, z):
        return self.main(z)


class BNMLP(nn.Module):
    """(Linear -> BatchNorm1d -> ReLU) x3, then BatchNorm1d -> Linear (a BN that can only fold forward)."""

    def __init__(self, d_in: int = 64, hidden: int = 128, d_out: int = 10):
        super().__init__()
        self.body = nn.Sequential(
            nn.Linear(d_in, hidden), nn.BatchNorm1d(hidden), nn.ReLU(),
            nn.Linear(hidden, hidden), nn.BatchNorm1d(hidden), nn.ReLU(),
            nn.Linear(hidden, hidden), nn.BatchNorm1d(hidden), nn.ReLU(),
        )
        self.head_bn = nn.BatchNorm1d(hidden)
        self.head = nn.Linear(hidden, d_out)

    def forward(self, x):
        return self.head(self.head_bn(self.body(x)))


def build_models():
    """name -> (factory, input shape without batch). Every factory builds with random weights."""
    tv = torchvision.models
    return {
        "resnet18": (lambda: tv.resnet18(weights=None), (3, 224, 224)),
        "resnet50": (lambda: tv.resnet50(weights=None), (3, 224, 224)),
        "mobilenet_v2": (lambda: tv.mobilenet_v2(weights=None), (3, 224, 224)),
        "densenet121": (lambda: tv.densenet121(weights=None), (3, 224, 224)),
        "shufflenet_v2_x1_0": (lambda: tv.shufflenet_v2_x1_0(weights=None), (3, 224, 224)),
        "googlenet": (lambda: tv.googlenet(weights=None, aux_logits=False, init_weights=True), (3, 224, 224)),
        "r3d_18": (lambda: tv.video.r3d_18(weights=None), (3, 8, 112, 112)),
        "dcgan_generator": (lambda: DCGANGenerator(nz=100), (100, 1, 1)),
        "mlp_bn1d": (lambda: BNMLP(), (64,)),
    }


def randomize_bn(model: nn.Module, seed: int) -> int:
    gen = torch.Generator().manual_seed(seed)
    count = 0
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                n = module.num_features
                module.running_mean.copy_(torch.randn(n, generator=gen) * 0.5)
                module.running_var.copy_(torch.empty(n).uniform_(0.5, 2.0, generator=gen))
                module.weight.copy_(torch.empty(n).uniform_(0.5, 1.5, generator=gen))
                module.bias.copy_(torch.randn(n, generator=gen) * 0.2)
                count += 1
    return count


# --------------------------------------------------------------------------- export

def bn_nodes(model: onnx.ModelProto):
    return [n for n in model.graph.node if n.op_type == "BatchNormalization"]


def inference_bn_problems(model: onnx.ModelProto) -> list[str]:
    problems = []
    for node in bn_nodes(model):
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        outputs = [o for o in node.output if o]
        if attrs.get("training_mode", 0) != 0 or len(outputs) != 1:
            problems.append(f"{node.name}: training_mode={attrs.get('training_mode', 0)} outputs={len(outputs)}")
    return problems


def export(name: str, model: nn.Module, shape, path: Path, n_bn_modules: int) -> dict:
    dummy = torch.zeros((2, *shape))
    dynamic = {"input": {0: "batch"}, "output": {0: "batch"}}
    info = {}
    for mode in (torch.onnx.TrainingMode.EVAL, torch.onnx.TrainingMode.PRESERVE):
        t0 = time.perf_counter()
        torch.onnx.export(model, (dummy,), str(path), dynamo=False, opset_version=17,
                          input_names=["input"], output_names=["output"], dynamic_axes=dynamic,
                          do_constant_folding=False, training=mode)
        exported = onnx.load(str(path))
        info = {"training_mode_arg": mode.name, "export_seconds": time.perf_counter() - t0,
                "bn_nodes": len(bn_nodes(exported)), "bn_modules": n_bn_modules,
                "ops": dict(Counter(n.op_type for n in exported.graph.node)),
                "opset": next(o.version for o in exported.opset_import if o.domain in ("", "ai.onnx")),
                "file_bytes": path.stat().st_size}
        if info["bn_nodes"] >= n_bn_modules:
            break
    problems = inference_bn_problems(exported)
    info["inference_bn_problems"] = problems
    if info["bn_nodes"] != n_bn_modules or problems:
        raise RuntimeError(f"{name}: exported {info['bn_nodes']} BN nodes for {n_bn_modules} BN modules; {problems}")
    onnx.checker.check_model(exported, full_check=True)
    return info


# --------------------------------------------------------------------------- analysis of left-over BNs

def graph_maps(model: onnx.ModelProto):
    producer, consumers = {}, {}
    for node in model.graph.node:
        for out in node.output:
            producer[out] = node
        for inp in node.input:
            if inp:
                consumers.setdefault(inp, []).append(node)
    return producer, consumers


def conv_unpadded(node: onnx.NodeProto) -> bool:
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    pads = attrs.get("pads", [])
    auto_pad = attrs.get("auto_pad", b"NOTSET")
    auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad
    if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        return all(k == 1 for k in attrs.get("kernel_shape", [0]))
    return all(p == 0 for p in pads)


def analyse_leftover(original: onnx.ModelProto, bn_name: str) -> dict:
    producer, consumers = graph_maps(original)
    graph_outputs = {o.name for o in original.graph.output}
    node = next(n for n in original.graph.node if n.name == bn_name or n.output[0] == bn_name)
    x, y = node.input[0], node.output[0]
    prod = producer.get(x)
    prod_op = prod.op_type if prod is not None else "(graph input)"
    x_readers = len(consumers.get(x, []))
    y_consumers = consumers.get(y, [])
    cons_desc = []
    forward_ok = bool(y_consumers) and y not in graph_outputs
    for c in y_consumers:
        if c.op_type == "Conv":
            unpadded = conv_unpadded(c)
            cons_desc.append(f"Conv({'unpadded' if unpadded else 'padded'})")
            forward_ok &= unpadded and c.input[0] == y
        elif c.op_type == "Gemm":
            attrs = {a.name: onnx.helper.get_attribute_value(a) for a in c.attribute}
            cons_desc.append(f"Gemm(transA={attrs.get('transA', 0)})")
            forward_ok &= attrs.get("transA", 0) == 0 and c.input[0] == y
        elif c.op_type == "MatMul":
            cons_desc.append("MatMul")
            forward_ok &= c.input[0] == y
        else:
            cons_desc.append(c.op_type)
            forward_ok = False
    backward_required = prod is not None and prod.op_type in FOLDABLE_LAYERS and x_readers == 1 and x not in graph_outputs
    if backward_required:
        verdict = "WRONG: producer is a foldable layer whose output has no other reader; must fold backward"
    elif forward_ok:
        verdict = "SUSPECT: every consumer is an unpadded Conv / Gemm(transA=0) / MatMul; could fold forward"
    else:
        why = []
        if prod is None or prod.op_type not in FOLDABLE_LAYERS:
            why.append(f"producer {prod_op} is not a foldable layer")
        elif x_readers > 1:
            why.append(f"producer {prod_op} output has {x_readers} readers")
        else:
            why.append(f"producer {prod_op} output is a graph output")
        why.append("consumers " + (", ".join(cons_desc) or "none") + " cannot absorb it exactly")
        verdict = "correct: " + "; ".join(why)
    return {"producer": prod_op, "producer_readers": x_readers, "consumers": cons_desc,
            "backward_required": backward_required, "forward_possible": forward_ok, "verdict": verdict}


# --------------------------------------------------------------------------- running

def ort_session(path: Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def independent_check(original: Path, folded: Path, shape, seed: int = 0, batch: int = 2) -> dict:
    rng = np.random.default_rng(seed)
    x = rng.uniform(-1.0, 1.0, size=(batch, *shape)).astype(np.float32)
    ref_sess, new_sess = ort_session(original), ort_session(folded)
    ref = ref_sess.run(None, {"input": x})
    new = new_sess.run(None, {"input": x})
    outputs = {}
    for meta, a, b in zip(ref_sess.get_outputs(), ref, new):
        a64, b64 = a.astype(np.float64), b.astype(np.float64)
        max_abs = float(np.max(np.abs(a64 - b64)))
        scale = float(np.max(np.abs(a64)))
        outputs[meta.name] = {"max_abs_error": max_abs, "max_abs_reference": scale,
                              "max_rel_error": max_abs / scale if scale > 0 else max_abs,
                              "shape": list(a.shape), "finite": bool(np.isfinite(b).all())}
    return outputs


def as_float(v):
    try:
        return float(v)
    except (TypeError, ValueError):
        return float("nan")


def run_bnfold(model_path: Path, out_path: Path) -> dict:
    cmd = [sys.executable, "-m", "bnfold", str(model_path), "-o", str(out_path), "--json"]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    result = {"command": " ".join(cmd[1:]), "exit_code": proc.returncode, "wall_seconds": wall,
              "stderr_tail": proc.stderr[-2000:]}
    try:
        report = json.loads(proc.stdout)
    except json.JSONDecodeError:
        result["error"] = "no JSON on stdout: " + proc.stdout[-1000:]
        return result
    ver = report.get("verification") or {}
    tensors = ver.get("tensors") or []
    result.update({
        "bn_before": report["ops_before"].get("BatchNormalization", 0),
        "bn_after": report["ops_after"].get("BatchNormalization", 0),
        "ops_before": report["ops_before"], "ops_after": report["ops_after"],
        "folded": [{k: f[k] for k in ("node", "op_type", "direction", "into")} for f in report["folded"]],
        "skipped": [{k: s[k] for k in ("node", "op_type", "output", "reason", "detail")} for s in report["skipped"]],
        "passed": report["passed"], "verification_passed": ver.get("passed"),
        "checker_passed": ver.get("checker_passed"), "runtime_status": ver.get("runtime_status"),
        "outputs": [{k: o[k] for k in ("name", "max_abs_error", "max_rel_error", "atol", "rtol", "mismatches",
                                       "elements", "passed")} for o in ver.get("outputs", [])],
        "analytic_tensors": len(tensors),
        "analytic_failed": sum(not t["passed"] for t in tensors),
        "worst_ulp": max((as_float(t["max_ulp_error"]) for t in tensors), default=None),
        "error": report.get("error"),
    })
    return result


def fmt(v, spec=".2g"):
    if v is None:
        return "–"
    if isinstance(v, float) and v != v:
        return "nan"
    return format(v, spec)


def write_markdown(results: dict, path: Path) -> None:
    env = results["environment"]
    lines = [
        "# bnfold on real PyTorch exports (BatchNormalization kept)",
        "",
        "Generated by `benchmarks/real_models/export_and_fold.py` — every number below comes from the run",
        f"that wrote this file ({env['date']}). Random weights (seed {results['seed']}), every BN's statistics",
        "randomized (running_mean ~ N(0, 0.5), running_var ~ U(0.5, 2), weight ~ U(0.5, 1.5), bias ~ N(0, 0.2);",
        "N(m, s) = mean m, standard deviation s), `model.eval()`, TorchScript exporter (`dynamo=False`), opset 17,",
        "dynamic batch axis, `do_constant_folding=False`. bnfold run as `python -m bnfold MODEL -o OUT --json`.",
        "",
        "## Versions",
        "",
        "| package | version |",
        "|---|---|",
    ]
    for key in ("python", "torch", "torchvision", "onnx", "onnxruntime", "numpy", "bnfold_commit", "machine"):
        lines.append(f"| {key} | {env[key]} |")
    lines += [
        "",
        "## Results",
        "",
        "\"export mode\": the exporter's TrainingMode argument that kept every BN (the script tries EVAL first and",
        "falls back to PRESERVE, model still in eval mode, only if EVAL fused any BN away). "
        + export_sentence(results) + " Every exported BN node was checked to be an inference BN",
        "(training_mode absent or 0, exactly one output), and the count equals the model's BN modules.",
        "\"rel err (bnfold)\" is bnfold's `max_rel_error` (max|a−b| / max|reference|) for each output;",
        "\"rel err (indep., seed 0)\" is the same quantity computed by this script with its own onnxruntime",
        "sessions (ORT_DISABLE_ALL on both models, uniform(−1, 1) input, batch 2, numpy default_rng(0)) — bnfold",
        "draws its verification input the same way, so the two agree to the digit; \"rel err (indep., seed 1 ×3)\"",
        "uses an input bnfold never saw (default_rng(1), batch 3).",
        "\"worst ulp\" is the worst analytic-check error over all tensors bnfold wrote. Wall time is the whole",
        "`python -m bnfold` process, including verification (2-core machine; the 1-minute load average just",
        "before each run is in results.json).",
        "",
        "| model | input | export mode | BN modules / BN nodes exported | BN before | BN after | skipped (reason) | verification | rel err (bnfold) | rel err (indep., seed 0) | rel err (indep., seed 1 ×3) | worst ulp | bnfold wall s |",
        "|---|---|---|---:|---:|---:|---|---|---:|---:|---:|---:|---:|",
    ]
    for name, r in results["models"].items():
        if "bnfold" not in r:
            lines.append(f"| {name} | – | – | – | – | – | – | FAILED: {r.get('error', '?')} | – | – | – | – | – |")
            continue
        b, e = r["bnfold"], r["export"]
        reasons = Counter(s["reason"] for s in b.get("skipped", []))
        skipped = ", ".join(f"{n}× {k}" for k, n in sorted(reasons.items())) or "none"
        ver = "PASSED" if b.get("verification_passed") else f"FAILED (exit {b['exit_code']})"
        rel_b = ", ".join(fmt(o["max_rel_error"]) for o in b.get("outputs", []))
        rel_i = ", ".join(fmt(o["max_rel_error"]) for o in r["independent"].values())
        rel_i1 = ", ".join(fmt(o["max_rel_error"]) for o in r["independent_seed1_batch3"].values())
        shape = "×".join(str(d) for d in (2, *r["input_shape"]))
        lines.append(f"| {name} | {shape} | {e['training_mode_arg']} | {e['bn_modules']} / {e['bn_nodes']} | "
                     f"{b.get('bn_before')} | {b.get('bn_after')} | {skipped} | {ver} | {rel_b} | {rel_i} | {rel_i1} | "
                     f"{fmt(b.get('worst_ulp'), '.3g')} | "
                     f"{b['wall_seconds']:.2f} |")
    lines += ["", "Other op counts are unchanged by folding except as listed:", ""]
    for name, r in results["models"].items():
        if "bnfold" not in r:
            continue
        b = r["bnfold"]
        keys = sorted(set(b["ops_before"]) | set(b["ops_after"]))
        diff = [f"{k} {b['ops_before'].get(k, 0)}→{b['ops_after'].get(k, 0)}" for k in keys
                if b["ops_before"].get(k, 0) != b["ops_after"].get(k, 0)]
        directions = Counter(f["direction"] for f in b["folded"] if f["op_type"] == "BatchNormalization")
        lines.append(f"- {name}: {', '.join(diff) or 'no change'}; BN folds by direction: "
                     f"{', '.join(f'{k} {v}' for k, v in sorted(directions.items())) or 'none'}")
    lines += ["", "## Every BN left behind, and whether leaving it is correct", ""]
    lines += ["The verdict is computed from the original graph: \"WRONG\" = the producer is Conv/ConvTranspose/",
              "Gemm/MatMul whose output nobody else reads (must fold backward); \"SUSPECT\" = every consumer is an",
              "unpadded Conv or Gemm(transA=0)/MatMul (a forward fold would be exact); otherwise \"correct\".", ""]
    any_left = False
    for name, r in results["models"].items():
        left = r.get("leftover", [])
        if not left:
            continue
        any_left = True
        verdicts = Counter(x["analysis"]["verdict"] for x in left)
        reasons = Counter(x["reason"] for x in left)
        lines.append(f"### {name}: {len(left)} BN left ({', '.join(f'{n}× {k}' for k, n in reasons.items())})")
        lines.append("")
        lines.append("BNs with the same pattern are grouped; every node is listed in results.json.")
        lines.append("")
        lines.append("| count | pattern in the original graph | reason code (bnfold detail, first case) | verdict | BN nodes |")
        lines.append("|---:|---|---|---|---|")
        groups = {}
        for x in left:
            a = x["analysis"]
            parts = x["node"].strip("/").split("/")
            role = parts[-2] if len(parts) >= 2 else x["node"]  # the torch module name, e.g. norm1, norm5
            key = (f"{a['producer']} (output read by {a['producer_readers']}) → BN `{role}` → {', '.join(a['consumers'])}",
                   x["reason"], a["verdict"])
            groups.setdefault(key, []).append(x)
        for (pattern, reason, verdict), members in groups.items():
            names = [m["node"] for m in members]
            shown = ", ".join(f"`{n}`" for n in names[:3]) + (f", … ({len(names) - 3} more)" if len(names) > 3 else "")
            lines.append(f"| {len(members)} | {pattern} | `{reason}` ({members[0]['detail']}) | {verdict} | {shown} |")
        lines.append("")
        lines.append("Summary: " + "; ".join(f"{n}× {v}" for v, n in verdicts.items()))
        lines.append("")
    if not any_left:
        lines.append("None: every BN in every model was folded.")
        lines.append("")
    problems = results["problems"]
    lines += ["## Problems found", ""]
    lines += [f"- {p}" for p in problems] if problems else ["None: no crash, no wrongly skipped BN, every "
                                                              "verification passed, every relative error ≤ 1e-6."]
    lines.append("")
    path.write_text("\n".join(lines))


def export_sentence(results: dict) -> str:
    modes = Counter(r["export"]["training_mode_arg"] for r in results["models"].values() if "export" in r)
    if set(modes) == {"EVAL"}:
        return ("In this run EVAL with do_constant_folding=False kept every BN for every model, so PRESERVE "
                "was never needed.")
    return "Modes used: " + ", ".join(f"{k} for {v} model(s)" for k, v in modes.items()) + "."


def versions() -> dict:
    try:
        commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "bnfold"], capture_output=True,
                               text=True).stdout.split()
        if dirty:
            import hashlib
            diff = subprocess.run(["git", "-C", str(REPO), "diff", "HEAD", "--", "bnfold"], capture_output=True).stdout
            files = ", ".join(f for f in dirty if f.startswith("bnfold/"))
            commit += f" + uncommitted changes to {files} (diff sha256 {hashlib.sha256(diff).hexdigest()[:12]})"
        else:
            commit += " (bnfold/ clean)"
    except OSError:
        commit = "?"
    return {"python": platform.python_version(), "torch": torch.__version__, "torchvision": torchvision.__version__,
            "onnx": onnx.__version__, "onnxruntime": ort.__version__, "numpy": np.__version__,
            "bnfold_commit": commit, "machine": f"{platform.machine()}, {os.cpu_count()} cores",
            "date": time.strftime("%Y-%m-%d %H:%M:%S %Z")}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="/tmp/bnfold-real")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--only", nargs="*", help="model names (default: all)")
    parser.add_argument("--results", default=str(HERE / "results.json"))
    parser.add_argument("--markdown", default=str(HERE / "RESULTS.md"))
    args = parser.parse_args()

    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    results = {"environment": versions(), "seed": args.seed, "models": {}, "problems": []}
    problems = results["problems"]
    for name, (factory, shape) in build_models().items():
        if args.only and name not in args.only:
            continue
        print(f"== {name}", flush=True)
        entry = results["models"][name] = {"input_shape": list(shape)}
        torch.manual_seed(args.seed)
        model = factory()
        n_bn = randomize_bn(model, args.seed + 1)
        model.eval()
        src, out = workdir / f"{name}.onnx", workdir / f"{name}.folded.onnx"
        try:
            entry["export"] = export(name, model, shape, src, n_bn)
        except Exception as exc:  # noqa: BLE001 - report and go on
            entry["error"] = f"export failed: {exc}"
            problems.append(f"{name}: export failed: {exc}")
            continue
        print(f"   exported {entry['export']['bn_nodes']} BN ({entry['export']['training_mode_arg']})", flush=True)
        out.unlink(missing_ok=True)
        entry["loadavg_before_bnfold"] = os.getloadavg()[0]
        b = entry["bnfold"] = run_bnfold(src, out)
        if b["exit_code"] != 0 or b.get("error"):
            problems.append(f"{name}: bnfold exit {b['exit_code']}: {b.get('error')} {b['stderr_tail'][-500:]}")
        if not out.exists():
            entry["error"] = "bnfold wrote no output"
            continue
        folded_model = onnx.load(str(out))
        entry["bn_in_folded_file"] = len(bn_nodes(folded_model))
        entry["independent"] = independent_check(src, out, shape)
        # A second input set that bnfold's own verification (seed 0, batch 2) never saw.
        entry["independent_seed1_batch3"] = independent_check(src, out, shape, seed=1, batch=3)
        original = onnx.load(str(src))
        entry["leftover"] = []
        for s in b.get("skipped", []):
            if s["op_type"] != "BatchNormalization":
                continue
            analysis = analyse_leftover(original, s["node"] or s["output"])
            entry["leftover"].append({"node": s["node"], "reason": s["reason"], "detail": s["detail"],
                                      "analysis": analysis})
            if not analysis["verdict"].startswith("correct"):
                problems.append(f"{name}: BN {s['node']} left ({s['reason']}: {s['detail']}) — {analysis['verdict']}")
        if entry["bn_in_folded_file"] != b.get("bn_after"):
            problems.append(f"{name}: folded file has {entry['bn_in_folded_file']} BN, report says {b.get('bn_after')}")
        if not b.get("verification_passed"):
            problems.append(f"{name}: verification did not pass ({b.get('runtime_status')})")
        for o in b.get("outputs", []):
            if as_float(o["max_rel_error"]) > REL_LIMIT:
                problems.append(f"{name}: bnfold max_rel_error {o['max_rel_error']} on {o['name']} > {REL_LIMIT}")
        for key in ("independent", "independent_seed1_batch3"):
            for oname, o in entry[key].items():
                if not o["max_rel_error"] <= REL_LIMIT:
                    problems.append(f"{name}: {key} max rel error {o['max_rel_error']:.3g} on {oname} > {REL_LIMIT}")
        print(f"   BN {b.get('bn_before')} -> {b.get('bn_after')}, verification "
              f"{b.get('verification_passed')}, rel {[o['max_rel_error'] for o in b.get('outputs', [])]}, "
              f"independent {[round(o['max_rel_error'], 12) for o in entry['independent'].values()]}, "
              f"{b['wall_seconds']:.2f} s", flush=True)

    Path(args.results).write_text(json.dumps(results, indent=1, default=str) + "\n")
    write_markdown(results, Path(args.markdown))
    print(f"wrote {args.results} and {args.markdown}; {len(problems)} problem(s)")
    for p in problems:
        print("  PROBLEM:", p)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
