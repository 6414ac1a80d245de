"""Source of the child processes the harness measures, plus argv builders.

Each snippet is run as `python -c SNIPPET args...` so that it is measured as
a whole process (start-up and imports included), the same way the bnfold CLI
is. Snippets import only what they need, so start-up cost is comparable.
"""
from __future__ import annotations

import sys
from pathlib import Path

from benchmarks.measure import ArgvFactory, py

# Interpreter start-up alone: subtracted where we want the cost of the work
# inside a process rather than of launching one.
STARTUP = "pass"
IMPORT_BNFOLD = "import bnfold"

# I/O floor: the least any tool must do, read the model and write it back.
FLOOR = r"""
import os, sys, onnx
src, dst, ext = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
m = onnx.load(src)
if ext:
    onnx.save_model(m, dst, save_as_external_data=True, all_tensors_to_one_file=True,
                    location=os.path.basename(dst) + ".data")
else:
    onnx.save(m, dst)
"""

# Cost of what verification does: two plain ORT sessions (no optimisation,
# so ORT itself folds nothing) on the original and folded model, one run each.
ORT_TWO_RUNS = r"""
import sys, numpy as np, onnxruntime as ort
so = ort.SessionOptions()
so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
for path in sys.argv[1:3]:
    s = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
    i = s.get_inputs()[0]
    shape = [d if isinstance(d, int) else 1 for d in i.shape]
    s.run(None, {i.name: np.random.default_rng(0).standard_normal(shape, dtype=np.float32)})
"""

# Inference latency, original vs folded in ONE process with alternating runs,
# so drift and other load on the machine hit both models alike (paired
# measurement). A discarded first session pays ORT's one-time start-up so it
# is not billed to whichever model happens to go first.
INFER = r"""
import json, statistics, sys, time, numpy as np, onnxruntime as ort
orig, folded, level, min_runs, budget_s, out_npz = sys.argv[1:4] + [int(sys.argv[4]), float(sys.argv[5]), sys.argv[6]]
so = ort.SessionOptions()
so.graph_optimization_level = {"disable_all": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
                               "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC}[level]
def create(path):
    t = time.perf_counter()
    s = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
    return s, time.perf_counter() - t
create(orig)
created = {"orig": [], "folded": []}
for _ in range(3):
    for key, path in (("orig", orig), ("folded", folded)):
        sess, dt = create(path)
        created[key].append(dt)
sess = {"orig": create(orig)[0], "folded": create(folded)[0]}
i = sess["orig"].get_inputs()[0]
feed = {i.name: np.random.default_rng(0).standard_normal([d if isinstance(d, int) else 1 for d in i.shape], dtype=np.float32)}
out, lat = {}, {"orig": [], "folded": []}
def run_both(keep, flip=False):
    # Alternate which model goes first: the second run of a pair finds ORT's
    # thread pool already awake, a ~10-20% edge for ms-scale models.
    for key, s in (reversed(sess.items()) if flip else sess.items()):
        t = time.perf_counter()
        out[key] = s.run(None, feed)[0]
        if keep:
            lat[key].append(time.perf_counter() - t)
for _ in range(5):
    run_both(False)
t = time.perf_counter()
for _ in range(3):  # after warm-up: sizes the timed loop
    run_both(False)
# Fast models get more runs (a few ms of noise is a big share of a 5 ms run).
runs = max(min_runs, int(budget_s / ((time.perf_counter() - t) / 3)))
for n in range(runs):
    run_both(True, flip=n % 2 == 1)
np.savez(out_npz, **out)
res = {f"{k}_{m}": statistics.median(v) for m, d in (("create_s", created), ("latency_s", lat)) for k, v in d.items()}
# Median of per-pair ratios: each pair ran back to back, so a burst of other
# load on the machine cancels out instead of landing on one model.
ratio = statistics.median(f / o for o, f in zip(lat["orig"], lat["folded"]))
print(json.dumps({**res, "runs": runs, "paired_ratio": ratio}))
"""

# --compare tools. Each loads, transforms and saves, like FLOOR, so their
# numbers are directly comparable with the floor and with bnfold.
_SAVE = r"""
def save(m, dst, ext):
    import os, onnx
    if ext:
        onnx.save_model(m, dst, save_as_external_data=True, all_tensors_to_one_file=True,
                        location=os.path.basename(dst) + ".data")
    else:
        onnx.save(m, dst)
import sys, onnx
src, dst, ext = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
"""

COMPARE_TOOLS: dict[str, tuple[str, str]] = {
    # name: (module whose import decides "installed", child source)
    "onnxruntime (offline, BASIC)": ("onnxruntime", r"""
import os, sys, onnxruntime as ort
src, dst, ext = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
so = ort.SessionOptions()
so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
so.optimized_model_filepath = dst
if ext:  # >2 GB cannot be written as one protobuf; ORT needs an external file name
    so.add_session_config_entry("session.optimized_model_external_initializers_file_name",
                                os.path.basename(dst) + ".data")
ort.InferenceSession(src, so, providers=["CPUExecutionProvider"])
"""),
    "onnxsim": ("onnxsim", _SAVE + r"""
import onnxsim
m, ok = onnxsim.simplify(onnx.load(src))
save(m, dst, ext)
"""),
    "onnxslim": ("onnxslim", _SAVE + r"""
import onnxslim
save(onnxslim.slim(onnx.load(src)), dst, ext)
"""),
    "onnxoptimizer (fuse_bn_into_conv)": ("onnxoptimizer", _SAVE + r"""
import onnxoptimizer
save(onnxoptimizer.optimize(onnx.load(src), ["fuse_bn_into_conv"]), dst, ext)
"""),
}


def out_path(out_dir: Path) -> Path:
    return out_dir / "model.onnx"


def floor_argv(src: str, external: bool) -> ArgvFactory:
    return lambda d: py(FLOOR, src, out_path(d), int(external))


def bnfold_argv(src: str, verify: bool = False) -> ArgvFactory:
    def make(d: Path) -> list[str]:
        argv = [sys.executable, "-m", "bnfold", src, "-o", str(out_path(d))]
        return argv if verify else argv + ["--no-verify"]
    return make


def tool_argv(code: str, src: str, external: bool) -> ArgvFactory:
    return lambda d: py(code, src, out_path(d), int(external))
