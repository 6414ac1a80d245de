"""Export the real models that issue 13 (and issue 11 item C4) are measured on. Development only.

Needs torch, torchvision, timm, onnx, onnxruntime and onnxscript (the dynamo exporter); none of them
is a dependency of bnfold or of its tests, and no test imports this file. Nothing is downloaded:
every model is built with random weights (timm ``pretrained=False``, torchvision ``weights=None,
weights_backbone=None``). Set-up used for the recorded run (x86_64, Python 3.11):

    python3 -m venv /work/devenv
    /work/devenv/bin/pip install torch==2.14.1 torchvision==0.29.1 timm onnx onnxruntime onnxscript numpy
    /work/devenv/bin/python benchmarks/real_models/export_beyond.py --out /work/models-dev

Per model: seeded random weights, every BatchNorm's statistics and affine parameters randomised
(running_mean ~ N(0, 0.5), running_var ~ U(0.25, 1.75), weight ~ U(0.5, 1.5), bias ~ N(0, 0.2);
N(m, s) = mean m, standard deviation s), layer scales ~ U(0.5, 1.5) (timm's 1e-5 would hide
FastViT's scaled branches from the output), ``eval()``. The re-parameterized variants are made from a
copy of the SAME randomised model, so both forms compute the same function. Legacy exports use the
TorchScript exporter with ``training=PRESERVE`` and ``do_constant_folding=False`` so that every BN
node is kept; ``dynamo`` exports use ``dynamo=True, optimize=False``. Writes MODELS.md next to the
models, listing file, input shape, BN/Conv counts and export settings of each.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
import traceback
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import timm
import torch
import torchvision
from timm.utils.model import reparameterize_model
from torch import nn

SEED = 0
OPSET = 17


@dataclass
class Spec:
    """One export: how to build the model, what to feed it and which exporter to use."""
    name: str
    build: Callable[[], nn.Module]
    shape: tuple[int, ...]
    reparam: bool = False  # export the model after timm's reparameterize_model
    exporter: str = "legacy"  # "legacy" (TorchScript, PRESERVE) or "dynamo" (optimize=False)
    detection: bool = False  # torchvision detection model: input is a list of one CHW image
    opsets: tuple[int, ...] = (OPSET,)  # tried in order until one export works
    notes: list[str] = field(default_factory=list)


def timm_model(name: str, **kwargs: object) -> Callable[[], nn.Module]:
    return lambda: timm.create_model(name, pretrained=False, **kwargs)


def specs() -> list[Spec]:
    det = torchvision.models.detection
    ssd = lambda: det.ssdlite320_mobilenet_v3_large(weights=None, weights_backbone=None)
    # min_size/max_size 320: the default transform would resize every image to 800 px.
    retina = lambda: det.retinanet_resnet50_fpn(
        weights=None, weights_backbone=None, min_size=320, max_size=320)
    small, native = (1, 3, 96, 96), (1, 3, 224, 224)
    return [
        Spec("repvgg_a0", timm_model("repvgg_a0"), small),
        Spec("repvgg_a0_reparam", timm_model("repvgg_a0"), small, reparam=True),
        Spec("mobileone_s0", timm_model("mobileone_s0"), small),
        Spec("mobileone_s0_reparam", timm_model("mobileone_s0"), small, reparam=True),
        Spec("fastvit_t8", timm_model("fastvit_t8"), native),
        Spec("fastvit_t8_reparam", timm_model("fastvit_t8"), native, reparam=True),
        # LeViT's attention biases are sized for its resolution: export at the native 224.
        Spec("levit_128s", timm_model("levit_128s"), native),
        Spec("nf_regnet_b0", timm_model("nf_regnet_b0"), small),
        Spec("resnet18_dynamo", lambda: torchvision.models.resnet18(weights=None), small,
             exporter="dynamo"),
        Spec("mobileone_s0_dynamo", timm_model("mobileone_s0"), small, exporter="dynamo"),
        Spec("ssdlite320_mobilenet_v3_large", ssd, (3, 320, 320), detection=True,
             opsets=(OPSET, 16, 11)),
        Spec("retinanet_resnet50_fpn", retina, (3, 320, 320), detection=True,
             opsets=(OPSET, 16, 11)),
    ]


def randomize_bn(model: nn.Module, seed: int) -> int:
    """Give every BatchNorm non-trivial statistics, so a wrong fold cannot hide behind identity BNs."""
    gen = torch.Generator().manual_seed(seed)
    frozen = torchvision.ops.misc.FrozenBatchNorm2d
    count = 0
    with torch.no_grad():
        for module in model.modules():
            if not isinstance(module, (nn.modules.batchnorm._BatchNorm, frozen)):
                continue
            n = module.running_mean.numel()
            module.running_mean.copy_(torch.randn(n, generator=gen) * 0.5)
            module.running_var.copy_(torch.empty(n).uniform_(0.25, 1.75, generator=gen))
            if module.weight is not None:
                module.weight.copy_(torch.empty(n).uniform_(0.5, 1.5, generator=gen))
            if module.bias is not None:
                module.bias.copy_(torch.randn(n, generator=gen) * 0.2)
            count += 1
    return count


def randomize_layer_scales(model: nn.Module, seed: int) -> int:
    """timm initialises layer scales (FastViT's LayerScale2d) to 1e-5, which hides every scaled
    branch from the output, so a wrong fold there could not be seen: draw them ~ U(0.5, 1.5)."""
    gen = torch.Generator().manual_seed(seed + 1)
    count = 0
    with torch.no_grad():
        for module in model.modules():
            if type(module).__name__.startswith("LayerScale") and hasattr(module, "gamma"):
                module.gamma.copy_(torch.empty_like(module.gamma).uniform_(0.5, 1.5, generator=gen))
                count += 1
    return count


def example_args(spec: Spec) -> tuple:
    gen = torch.Generator().manual_seed(SEED)
    x = torch.rand(spec.shape, generator=gen)
    return ([x],) if spec.detection else (x,)


def export_legacy(model: nn.Module, args: tuple, path: Path, opset: int) -> None:
    torch.onnx.export(model, args, str(path), dynamo=False, opset_version=opset,
                      training=torch.onnx.TrainingMode.PRESERVE, do_constant_folding=False,
                      input_names=["input"])


def export_dynamo(model: nn.Module, args: tuple, path: Path, opset: int) -> None:
    # No opset_version: asking for 17 makes torch convert down from its own 18, which fails on
    # these graphs and leaves the model at 18 anyway. The opset recorded is read from the file.
    del opset
    torch.onnx.export(model, args, str(path), dynamo=True, optimize=False)


def op_counts(path: Path) -> Counter:
    model = onnx.load(str(path), load_external_data=False)
    counts: Counter = Counter(n.op_type for n in model.graph.node)
    for function in model.functions:  # BNs inside model-local functions count too
        counts.update(n.op_type for n in function.node)
    return counts


def file_opset(path: Path) -> int:
    model = onnx.load(str(path), load_external_data=False)
    return next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))


def training_mode_bns(path: Path) -> int:
    model = onnx.load(str(path), load_external_data=False)
    return sum(1 for n in model.graph.node if n.op_type == "BatchNormalization"
               and any(a.name == "training_mode" and a.i == 1 for a in n.attribute))


def run_ort(path: Path, spec: Spec) -> list[np.ndarray]:
    """The model's outputs in onnxruntime (optimizations off) on the seeded example input."""
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    x = example_args(spec)[0]
    x = x[0] if spec.detection else x
    return session.run(None, {session.get_inputs()[0].name: x.numpy()})


def describe_outputs(path: Path, spec: Spec, out: Path) -> dict:
    """Peak |output| (random BN statistics do not normalise, so deep nets can grow large values),
    and for a re-parameterized export its max rel difference from the training-form export."""
    outputs = run_ort(path, spec)
    info = {"peak": max(float(np.abs(o).max()) for o in outputs if o.size)}
    base = out / f"{spec.name.removesuffix('_reparam')}.onnx"
    if spec.reparam and base.exists():
        ref = run_ort(base, spec)[0].astype(np.float64)
        info["rel_vs_training_form"] = float(np.abs(ref - outputs[0]).max() / np.abs(ref).max())
    return info


def build(spec: Spec) -> tuple[nn.Module, int]:
    torch.manual_seed(SEED)
    model = spec.build().eval()
    n_bn = randomize_bn(model, SEED)
    randomize_layer_scales(model, SEED)
    if spec.reparam:
        model = reparameterize_model(copy.deepcopy(model)).eval()
    return model, n_bn


def export_one(spec: Spec, out: Path) -> dict:
    """Export one spec; returns the MODELS.md row (with an error instead of counts on failure)."""
    path = out / f"{spec.name}.onnx"
    row: dict = {"name": spec.name, "file": str(path), "shape": "x".join(map(str, spec.shape))}
    if spec.detection:
        row["shape"] = f"[{row['shape']}] (list of one image)"
    model, row["bn_modules"] = build(spec)
    args = example_args(spec)
    errors = []
    for opset in spec.opsets:
        t0 = time.perf_counter()
        try:
            with torch.no_grad():
                (export_legacy if spec.exporter == "legacy" else export_dynamo)(model, args, path, opset)
            onnx.checker.check_model(str(path), full_check=True)
        except Exception as exc:  # noqa: BLE001 -- any exporter failure is recorded, then the next opset tried
            errors.append(f"opset {opset}: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}")
            traceback.print_exc()
            continue
        counts = op_counts(path)
        data = path.with_name(path.name + ".data")  # the dynamo exporter writes weights beside
        row.update(opset=file_opset(path), external_data=data.name if data.exists() else "", seconds=round(time.perf_counter() - t0, 1),
                   bn=counts["BatchNormalization"], conv=counts["Conv"],
                   training_bn=training_mode_bns(path), nodes=sum(counts.values()),
                   mib=round(sum(f.stat().st_size for f in (path, data) if f.exists()) / 2**20, 1))
        row.update(describe_outputs(path, spec, out))
        break
    row["errors"] = errors
    row["settings"] = settings_text(spec, row.get("opset"), row.get("external_data", ""))
    return row


def settings_text(spec: Spec, opset: int | None, external_data: str) -> str:
    if spec.exporter == "dynamo":
        text = f"dynamo=True, optimize=False, opset {opset} (exporter default)"
    else:
        text = f"legacy (dynamo=False), PRESERVE, do_constant_folding=False, opset {opset}"
    if external_data:
        text += f", weights in {external_data}"
    return text + (", after timm reparameterize_model" if spec.reparam else "")


def write_table(rows: list[dict], out: Path) -> None:
    lines = [
        "# Development-only real-model exports (random weights, randomised BN)", "",
        (f"Written by `benchmarks/real_models/export_beyond.py` on {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; "
        f"torch {torch.__version__}, torchvision {torchvision.__version__}, timm {timm.__version__}, "
        f"onnx {onnx.__version__}. Seed {SEED}; BN running_mean ~ N(0, 0.5), running_var ~ "
        "U(0.25, 1.75), weight ~ U(0.5, 1.5), bias ~ N(0, 0.2); layer scales (FastViT) ~ U(0.5, 1.5) "
        "instead of timm's 1e-5; eval mode."), "",
        ("'peak |out|' is the largest output magnitude on the seeded input in onnxruntime: BN "
        "statistics that do not match the activations do not normalise them, so deep residual "
        "nets with random weights grow large outputs (judge errors relative to it). 'rel vs "
        "training form': max|a−b| / max|a| between a re-parameterized export and its training "
        "form on that input."), "",
        ("'BN (training)' counts BatchNormalization nodes with training_mode=1 (NF-Net weight "
        "standardisation); 'BN modules' counts nn.BatchNorm modules in the PyTorch model."), "",
        ("| file | input | BN nodes | BN (training) | Conv | nodes | BN modules | MiB | peak \\|out\\| "
        "| rel vs training form | export settings | problems |"),
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---|",
    ]
    for r in rows:
        problems = "; ".join(r["errors"]) or "none"
        compared = f"{r['rel_vs_training_form']:.1e}" if "rel_vs_training_form" in r else "–"
        if "bn" not in r:
            lines.append(f"| {Path(r['file']).name} | {r['shape']} | – | – | – | – | {r['bn_modules']} "
                         f"| – | – | – | export FAILED | {problems} |")
            continue
        lines.append(f"| {Path(r['file']).name} | {r['shape']} | {r['bn']} | {r['training_bn']} | "
                     f"{r['conv']} | {r['nodes']} | {r['bn_modules']} | {r['mib']} | {r['peak']:.2g} | "
                     f"{compared:} | {r['settings']} | {problems} |")
    (out / "MODELS.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("/work/models-dev"))
    parser.add_argument("--only", nargs="*", help="export only these names")
    opts = parser.parse_args()
    opts.out.mkdir(parents=True, exist_ok=True)
    record = opts.out / "models.json"  # rows of earlier runs, so --only updates one row
    rows = json.loads(record.read_text()) if record.exists() else {}
    for spec in specs():
        if opts.only and spec.name not in opts.only:
            continue
        print(f"== {spec.name}", flush=True)
        rows[spec.name] = export_one(spec, opts.out)
        print(rows[spec.name], flush=True)
        record.write_text(json.dumps(rows, indent=1))
        order = [s.name for s in specs()]  # after each model: others can start on what is done
        write_table(sorted(rows.values(), key=lambda r: order.index(r["name"])), opts.out)


if __name__ == "__main__":
    main()
