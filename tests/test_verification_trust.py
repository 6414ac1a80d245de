"""Verification never passes what it did not prove (issue 11 C2-C5, F): a robust tolerance scale,
no pass on nothing compared, folded tensors compared, outputs behind discontinuous ops, onnxruntime
isolated in a child process with a timeout, providers as one string; a model with an op onnxruntime
does not know is not verified, so it does not pass."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from helpers import conv_bn_model, model_from_text, run
from onnx import TensorProto, helper, numpy_helper

import bnfold
import bnfold.render
from benchmarks.graph_builder import GraphBuilder
from bnfold import BadInputError
from bnfold.errors import VerificationError
from bnfold.report import Verification
from bnfold.run_config import RunConfig
from bnfold.runtime import Tensors, compare_outputs

# --- C2: one element must not widen every element's tolerance -------------------------------------


def _padded_conv(shift_folded_forward: bool, size: int = 33) -> onnx.ModelProto:
    """x -> BN with a shift -> Conv k=2 s=2 SAME_UPPER, plus an Add of a constant that holds one
    element of 1e6. The "wrong" variant folds the BN forward as if there were no padding (the
    fold from issue 11): wrong on the padded border."""
    rng = np.random.default_rng(3)
    weight = rng.uniform(0.5, 1.5, (4, 3, 2, 2)).astype(np.float32)
    scale, shift = np.full(3, 1.0, np.float32), np.full(3, 0.8, np.float32)
    g = GraphBuilder(rng=rng)
    x = g.input("x", [1, 3, size, size])
    out = (size + 1) // 2
    big = np.zeros((1, 4, out, out), np.float32)
    big[0, 0, 0, 0] = 1e6
    if shift_folded_forward:
        bias = (weight * shift[None, :, None, None]).sum(axis=(1, 2, 3)).astype(np.float32)
        y = g.node("Conv", [x, g.const(weight * scale[None, :, None, None], "w"), g.const(bias, "b")],
                   auto_pad="SAME_UPPER", kernel_shape=[2, 2], strides=[2, 2])
    else:
        bn = g.node("BatchNormalization", [x, g.const(scale), g.const(shift), g.const(np.zeros(3)), g.const(np.ones(3) - 1e-5)],
                    epsilon=1e-5)
        y = g.node("Conv", [bn, g.const(weight, "w")], auto_pad="SAME_UPPER", kernel_shape=[2, 2], strides=[2, 2])
    model = g.model([g.node("Add", [y, g.const(big, "big")])])
    model.graph.node[-1].output[0] = model.graph.output[0].name = "y"  # the same name in both variants
    return model


def test_wrong_fold_beside_one_huge_element_fails():
    original, wrong = _padded_conv(False), _padded_conv(True)
    with pytest.raises(bnfold.VerificationError) as failed:
        bnfold.verify(original, wrong)
    (output,) = failed.value.report.verification.outputs
    # The premise: the error is several units on values of tens, and under the former default
    # (atol = 1e-5 * max |reference| = 10) it would have passed.
    assert 1.0 < output.max_abs_error < 10.0
    assert not output.passed and output.mismatches > 0
    assert output.atol < 1e-3  # the 1e6 element did not set the scale


def _deep_cnn(layers: int = 128, channels: int = 8, gain: float = 1.0) -> onnx.ModelProto:
    """128 Conv -> BN -> Relu blocks; each block's gain is about `gain`."""
    g = GraphBuilder(rng=np.random.default_rng(11))
    x = g.input("x", [1, channels, 8, 8])
    for _ in range(layers):
        w = g.rng.normal(0, np.sqrt(2.0 / (channels * 9)), (channels, channels, 3, 3))
        y = g.node("Conv", [x, g.const(w, "w")], pads=[1, 1, 1, 1])
        gamma = g.rng.uniform(0.5, 1.5, channels)
        var = (gamma / gain) ** 2 * g.rng.uniform(0.9, 1.1, channels)
        params = [gamma, g.rng.normal(0, 0.1, channels), g.rng.normal(0, 0.1, channels), var]
        y = g.node("BatchNormalization", [y, *(g.const(p) for p in params)], epsilon=1e-5)
        x = g.node("Relu", [y])
    return g.model([x])


def test_deep_cnn_fed_large_values_still_passes():
    model = _deep_cnn()
    # Inputs of +-1000: the early layers carry large values, whose rounding propagates to the end.
    inputs = {"x": np.random.default_rng(0).uniform(-1000, 1000, (1, 1, 8, 8, 8)).astype(np.float32)}
    result = bnfold.fold(model, inputs=inputs)
    verification = result.report.verification
    assert verification.passed
    assert max(t.max_ulp_error for t in verification.tensors) <= 0.5
    (output,) = verification.outputs
    assert output.passed and output.compared == output.elements
    assert len(verification.intermediate_tensors) == 128  # every BN output is compared too


# --- C3: a comparison of nothing is not a pass ----------------------------------------------------


def _conv_bn() -> onnx.ModelProto:
    g = GraphBuilder(rng=np.random.default_rng(0))
    return g.model([g.bn(g.conv(g.input("x", [1, 3, 6, 6]), 3, 4), 4)])


def test_all_nan_inputs_fail_with_a_reason():
    inputs = {"x": np.full((2, 1, 3, 6, 6), np.nan, np.float32)}
    result = bnfold.fold(_conv_bn(), inputs=inputs, raise_on_failure=False)
    verification = result.report.verification
    assert not verification.passed
    (output,) = verification.outputs
    assert output.compared == 0 and output.note == "no finite reference values compared"
    assert any("no finite reference values compared" in line for line in verification.failures())


def test_zero_samples_are_bad_input():
    with pytest.raises(BadInputError, match="0 samples"):
        bnfold.fold(_conv_bn(), inputs={"x": np.zeros((0, 1, 3, 6, 6), np.float32)})


def test_user_arrays_are_named_in_the_report(tmp_path):
    model_path = tmp_path / "m.onnx"
    onnx.save(_conv_bn(), model_path)
    np.savez(tmp_path / "in.npz", x=np.random.default_rng(0).normal(size=(3, 1, 3, 6, 6)).astype(np.float32))
    cli = [sys.executable, "-m", "bnfold", str(model_path), "--inputs", str(tmp_path / "in.npz"), "-o"]
    text = subprocess.run(cli + [str(tmp_path / "a.onnx")], capture_output=True, text=True)
    assert text.returncode == 0, text.stderr
    assert "your --inputs arrays (3 samples)" in text.stdout and "seed 0" not in text.stdout
    data = subprocess.run(cli + [str(tmp_path / "b.onnx"), "--json"], capture_output=True, text=True)
    import json

    verification = json.loads(data.stdout)["verification"]
    assert verification["input_source"] == "user" and verification["samples"] == 3


# --- C4: folded tensors are compared; outputs behind discontinuous ops --------------------------


def _detection_head(pairs: int = 64) -> onnx.ModelProto:
    """Conv -> BN -> scores -> TopK (values and indices) and a box regression output. Channel pairs
    (2i, 2i+1) compute the same score in exact arithmetic through different weight/BN splits, so
    which one ranks first depends on rounding, and folding changes the rounding."""
    rng = np.random.default_rng(5)
    channels = 2 * pairs
    base = rng.uniform(-1, 1, (pairs, 3, 1, 1))
    factors = rng.uniform(0.5, 2.0, pairs)
    weight = np.empty((channels, 3, 1, 1))
    weight[0::2], weight[1::2] = base, base * factors[:, None, None, None]
    gamma = np.ones(channels)
    gamma[1::2] = 1.0 / factors  # BN undoes the factor: both channels equal before rounding
    g = GraphBuilder(rng=rng)
    x = g.input("x", [1, 3, 1, 1])
    conv = g.node("Conv", [x, g.const(weight, "w")])
    bn = g.node("BatchNormalization", [conv, g.const(gamma), g.const(np.zeros(channels)), g.const(np.zeros(channels)),
                                       g.const(np.ones(channels) - 1e-5)], epsilon=1e-5)
    scores = g.node("Flatten", [bn])
    values = g.node("TopK", [scores, g.const(np.array([channels]), "k", np.int64)], n_outputs=2)
    indices = g.nodes[-1].output[1]
    boxes = g.node("Relu", [scores])
    return g.model([values, indices, boxes])


def _seed_that_reorders(model: onnx.ModelProto, folded: onnx.ModelProto) -> int:
    for seed in range(50):
        feeds = {"x": np.random.default_rng(seed).uniform(-1, 1, (1, 3, 1, 1)).astype(np.float32)}
        if not np.array_equal(run(model, feeds)[1], run(folded, feeds)[1]):
            return seed
    pytest.fail("no input reorders the near-tied scores: the test lost its premise")


def test_near_tied_scores_reorder_after_a_correct_fold_and_are_not_comparable():
    model = _detection_head()
    folded = bnfold.fold(model, verify=False).model
    seed = _seed_that_reorders(model, folded)  # the premise: TopK's indices really differ
    result = bnfold.fold(model, seed=seed)
    verification = result.report.verification
    assert verification.passed
    values, indices, boxes = verification.outputs
    assert values.passed and boxes.passed
    assert not indices.passed and indices.not_comparable.startswith("downstream of TopK")
    assert verification.intermediate_tensors and all(t.passed for t in verification.intermediate_tensors)
    text = bnfold.render.to_text(result.report)
    assert "not comparable (downstream of TopK" in text and "folded tensors compared: 1" in text


def test_a_wrong_fold_behind_topk_still_fails():
    model = _detection_head()
    folded = bnfold.fold(model, verify=False).model
    wrong = onnx.ModelProto()
    wrong.CopyFrom(folded)
    conv = next(n for n in wrong.graph.node if n.op_type == "Conv")
    tensor = next(t for t in wrong.graph.initializer if t.name == conv.input[1])
    tensor.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(tensor) * np.float32(1.001), tensor.name))
    seed = _seed_that_reorders(model, folded)
    result = Verification()
    bn_output = next(n for n in model.graph.node if n.op_type == "BatchNormalization").output[0]
    compare_outputs(model, wrong, result, RunConfig(seed=seed), tensors=Tensors([bn_output], True))
    assert result.runtime_status == "failed"
    assert not result.intermediate_tensors[0].passed
    assert all(not o.not_comparable for o in result.outputs)
    assert any(not o.passed for o in result.outputs)


# --- C5: onnxruntime isolated ----------------------------------------------------------------------


def _endless_loop() -> onnx.ModelProto:
    """Conv -> BN -> a Loop of 10^15 iterations: onnxruntime runs it for ever."""
    g = GraphBuilder(rng=np.random.default_rng(0))
    y = g.bn(g.conv(g.input("x", [1, 3, 4, 4]), 3, 3), 3)
    body = helper.make_graph([helper.make_node("Identity", ["c"], ["c_out"]), helper.make_node("Identity", ["v"], ["v_out"])],
                             "body", [helper.make_tensor_value_info("i", onnx.TensorProto.INT64, []),
                                      helper.make_tensor_value_info("c", onnx.TensorProto.BOOL, []),
                                      helper.make_tensor_value_info("v", onnx.TensorProto.FLOAT, [1, 3, 4, 4])],
                             [helper.make_tensor_value_info("c_out", onnx.TensorProto.BOOL, []),
                              helper.make_tensor_value_info("v_out", onnx.TensorProto.FLOAT, [1, 3, 4, 4])])
    trips = g.const(np.array(10**15), "trips", np.int64)
    cond = g.const(np.array(True), "cond", np.bool_)
    out = g.node("Loop", [trips, cond, y], body=body)
    model = g.model([out], check=False)
    model.graph.output[0].CopyFrom(helper.make_tensor_value_info(out, onnx.TensorProto.FLOAT, [1, 3, 4, 4]))
    return model


def test_hang_past_the_timeout_fails_and_writes_nothing(tmp_path):
    model = tmp_path / "loop.onnx"
    onnx.save(_endless_loop(), model)
    out = tmp_path / "out.onnx"
    done = subprocess.run([sys.executable, "-m", "bnfold", str(model), "-o", str(out), "--timeout", "2"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 1, done.stderr
    assert "verification could not run: onnxruntime did not finish within the timeout (2 s" in done.stdout
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["loop.onnx"]


def test_the_reference_evaluator_fallback_runs_isolated_under_the_timeout(tmp_path):
    """onnxruntime refuses the endless Loop when its trip count and condition have shape [1] (not the
    scalars the spec asks for), so verification falls back to onnx's reference evaluator — which then loops for ever.
    It runs in a child process under the same timeout: a verdict, not a hang of bnfold."""
    loop = _endless_loop()
    trips, cond = next(node for node in loop.graph.node if node.op_type == "Loop").input[:2]
    for name, value in ((trips, np.array([10**15], np.int64)), (cond, np.array([True]))):
        tensor = next(t for t in loop.graph.initializer if t.name == name)
        tensor.CopyFrom(numpy_helper.from_array(value, name))
    model = tmp_path / "loop.onnx"
    onnx.save(loop, model)
    out = tmp_path / "out.onnx"
    done = subprocess.run([sys.executable, "-m", "bnfold", str(model), "-o", str(out), "--timeout", "2"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 1, done.stderr
    assert "onnxruntime cannot load the original model" in done.stdout
    assert "onnx's reference evaluator did not finish within the timeout (2 s" in done.stdout
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["loop.onnx"]


CRASH_HOOK = '''
import os, signal, sys
if any("forkserver" in arg for arg in getattr(sys, "orig_argv", sys.argv)):
    import onnxruntime
    def crash(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGSEGV)
    onnxruntime.InferenceSession.run = crash
'''


def test_onnxruntime_crash_is_a_failed_verification(tmp_path):
    """onnxruntime dies of SIGSEGV in the middle of a run (a hook in the child only): bnfold says so."""
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    (hooks / "sitecustomize.py").write_text(CRASH_HOOK)
    model = tmp_path / "m.onnx"
    onnx.save(_conv_bn(), model)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(hooks), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-m", "bnfold", str(model), "-o", str(tmp_path / "out.onnx")],
                          capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 1, done.stderr
    assert "verification could not run: onnxruntime crashed (signal 11" in done.stdout
    assert "Traceback" not in done.stderr and not (tmp_path / "out.onnx").exists()


def test_timeout_must_be_positive():
    with pytest.raises(BadInputError, match="timeout"):
        bnfold.fold(_conv_bn(), timeout=0)


# --- F: one provider as a string -------------------------------------------------------------------


def test_providers_may_be_one_string():
    result = bnfold.fold(_conv_bn(), providers="CPUExecutionProvider")
    names = [o.name for o in result.report.verification.outputs]
    assert any(name.endswith("@CPUExecutionProvider") for name in names)
    assert RunConfig(providers="CPUExecutionProvider").providers == ["CPUExecutionProvider"]


def test_custom_domain_node_is_left_alone_and_verification_says_it_could_not_run():
    g = GraphBuilder()
    x = g.input("x", [1, 3, 8, 8])
    y = g.bn(g.conv(x, 3, 4, pads=[1, 1, 1, 1]), 4)
    g.nodes.append(helper.make_node("Mystery", [y], ["z"], domain="com.example", name="mystery"))
    graph = helper.make_graph(g.nodes, "custom", g.inputs, [helper.make_tensor_value_info("z", TensorProto.FLOAT, [1, 4, 8, 8])],
                              g.initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.example", 1)])
    result = bnfold.fold(model, raise_on_failure=False)
    assert [n.op_type for n in result.model.graph.node] == ["Conv", "Mystery"]
    assert result.model.graph.node[1].domain == "com.example"
    verification = result.report.verification
    assert verification.runtime_status.startswith("not run:")
    assert "Mystery" in verification.runtime_status
    assert not verification.passed and not result.report.passed
    # Without verification the fold itself is fine, and says nothing was verified.
    unverified = bnfold.fold(model, verify=False)
    assert unverified.report.verification is None and unverified.report.passed


# --- comparisons that prove nothing never pass (issue 11, C2/C3) ---------------------------------------
# The same rules seen from the command line and the API:
# - the tolerance scale is robust: one element of 1e7 in an output does not let every other element of
#   that output be off by 100 (`bnfold.verify` fails models whose outputs differ by 200 % on most elements);
# - `--inputs` arrays that are all NaN (or Inf) compare nothing and do not pass, and the report does not
#   claim a seed when the user's arrays were used;
# - zero samples are bad input, not "unexpected error: IndexError".


C = 4


def _scaled(scale_of_element_1: float) -> onnx.ModelProto:
    """y = x * s + k, with k holding one huge element."""
    s = np.ones((1, 4), np.float32)
    s[0, 1] = scale_of_element_1
    k = np.zeros((1, 4), np.float32)
    k[0, 0] = 1e7
    return model_from_text("""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[1, 4] x) => (float[1, 4] y) {
            m = Mul(x, s)
            y = Add(m, k)
        }""", {"s": s, "k": k})


def test_one_large_element_does_not_widen_the_others_tolerance() -> None:
    with pytest.raises(VerificationError):
        bnfold.verify(_scaled(1.0), _scaled(3.0))


def _save_conv_bn(path: Path) -> None:
    onnx.save(conv_bn_model(C), path)


@pytest.mark.parametrize("fill", [np.nan, np.inf])
def test_inputs_without_a_finite_comparison_do_not_pass(tmp_path: Path, fill: float) -> None:
    _save_conv_bn(tmp_path / "m.onnx")
    np.savez(tmp_path / "x.npz", x=np.full((1, C, 4, 4), fill, np.float32))

    result = subprocess.run([sys.executable, "-m", "bnfold", "m.onnx", "-o", "out.onnx", "--inputs", "x.npz"],
                            cwd=tmp_path, capture_output=True, text=True)

    assert result.returncode in (1, 2), result.stdout
    assert not (tmp_path / "out.onnx").exists()


def test_report_says_user_arrays_were_used(tmp_path: Path) -> None:
    _save_conv_bn(tmp_path / "m.onnx")
    np.savez(tmp_path / "x.npz", x=np.ones((1, C, 4, 4), np.float32))

    result = subprocess.run([sys.executable, "-m", "bnfold", "m.onnx", "-o", "out.onnx", "--inputs", "x.npz"],
                            cwd=tmp_path, capture_output=True, text=True)

    assert result.returncode == 0
    assert "seed" not in result.stdout


def test_zero_samples_is_a_clear_bad_input(tmp_path: Path) -> None:
    _save_conv_bn(tmp_path / "m.onnx")
    np.savez(tmp_path / "x.npz", x=np.zeros((0, 1, C, 4, 4), np.float32))

    result = subprocess.run([sys.executable, "-m", "bnfold", "m.onnx", "-o", "out.onnx", "--inputs", "x.npz"],
                            cwd=tmp_path, capture_output=True, text=True)

    assert result.returncode == 2
    assert "unexpected error" not in result.stderr and "IndexError" not in result.stderr


# --- a correct fold behind a discontinuous op is not rejected (issue 11, C4) -------------------------
# Two output channels compute the same function two ways: channel 0 is Conv(w) followed by a BN scale
# of 3, channel 1 is Conv(fl(3w)) with scale 1. In the original the two channels differ by rounding;
# folded, both hold the weight fl(3w) exactly and tie. `TopK(k=1)` over the channels then picks other
# indices at some positions and the integer output differs, although every folded weight is within
# 0.5 ulp and the folded tensor itself matches. The BN output (which keeps its name) is compared, the
# TopK output is reported as not comparable: exit 0.


def test_correct_fold_behind_topk_is_not_rejected(tmp_path: Path) -> None:
    w = np.random.default_rng(5).normal(size=(1, 8, 1, 1)).astype(np.float32)
    weight = np.concatenate([w, (w.astype(np.float64) * 3).astype(np.float32)], 0)
    model = model_from_text("""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[1, 8, 16, 16] x) => (int64[1, 1, 16, 16] index) {
            c = Conv(x, w)
            s = BatchNormalization <epsilon = 0.0> (c, g, b, m, v)
            values, index = TopK <axis = 1> (s, k)
        }""", {"w": weight, "g": np.array([3, 1], np.float32), "b": np.zeros(2, np.float32),
               "m": np.zeros(2, np.float32), "v": np.ones(2, np.float32), "k": np.array([1], np.int64)})
    onnx.save(model, tmp_path / "m.onnx")

    result = subprocess.run([sys.executable, "-m", "bnfold", "m.onnx", "-o", "out.onnx"], cwd=tmp_path,
                            capture_output=True, text=True)

    assert result.returncode == 0, result.stdout + result.stderr
    assert (tmp_path / "out.onnx").exists()
