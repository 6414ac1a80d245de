"""Every reason code bnfold can give for leaving a BatchNormalization in place.

Each test builds the smallest model that must be refused for exactly one reason and checks that
the BN is still there, that the report gives exactly that reason, that onnxruntime computes exactly
what the original computes, and that verification ran and passed.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import test_branch_refusals
from helpers import model_from_text, op_types, random_feeds, run
from onnx import TensorProto, helper
from test_affine_map_reasons import test_weight_on_the_left_of_a_matmul_is_refused_as_such

import bnfold
from benchmarks.graph_builder import GraphBuilder
from bnfold.report import Reason, SkippedRecord, op_counts

BN = "BatchNormalization"
Feeds = dict[str, np.ndarray]

# Reasons no valid model can produce for a BatchNormalization: ONNX types BN's data and parameters
# as floating point only, and onnxruntime rejects BN parameters whose length is not the channel count.
# no_gain: a BN always scales, so folding it removes a node (tested for Add/Sub in test_affine_map_reasons).
UNREACHABLE_FOR_BN = {Reason.UNSUPPORTED_DTYPE, Reason.CHANNEL_COUNT_MISMATCH, Reason.NO_GAIN}


# --- helpers --------------------------------------------------------------------------------------


def bn_names(model: onnx.ModelProto) -> list[str]:
    return [node.name for node in model.graph.node if node.op_type == BN]


def run_both(original: onnx.ModelProto, folded: onnx.ModelProto, feeds: Feeds) -> tuple[list, list]:
    return run(original, feeds), run(folded, feeds)


def refused(model: onnx.ModelProto, reason: Reason, feeds: Feeds | None = None,
            **fold_options) -> SkippedRecord:
    """Fold `model`; assert its single BN is kept for `reason` and nothing changed numerically."""
    before = model.SerializeToString()
    names = bn_names(model)
    assert len(names) == 1, "each refusal model holds exactly one BN"
    result = bnfold.fold(model, **fold_options)
    report = result.report
    assert model.SerializeToString() == before, "the input model was mutated"
    assert report.verification is not None and report.verification.passed, report.verification
    assert report.verification.runtime_status == "passed"
    assert report.verification.outputs, "onnxruntime compared no output"
    assert report.folded == []
    assert op_counts(result.model) == op_counts(model)
    assert op_counts(result.model)[BN] == 1
    assert op_types(result.model) == op_types(model)
    assert [(r.node, r.reason) for r in report.skipped] == [(names[0], reason)], report.skipped
    record = report.skipped[0]
    assert record.op_type == BN and record.graph == "main" and record.detail
    expected, got = run_both(model, result.model, feeds if feeds is not None else random_feeds(model))
    assert len(expected) == len(got)
    for want, have in zip(expected, got):
        np.testing.assert_array_equal(have, want)  # nothing was folded: bit-identical
    onnx.checker.check_model(result.model, full_check=True)
    return record


def conv_bn_graph(opset: int = 17) -> tuple[GraphBuilder, str]:
    """x[2,3,8,8] -> padded Conv(3->4); returns the builder and the conv output."""
    g = GraphBuilder(opset=opset)
    x = g.input("x", [2, 3, 8, 8])
    return g, g.conv(x, 3, 4, pads=[1, 1, 1, 1])


def float_output(name: str, shape: list[int | str | None] | None) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)


# --- BN attributes and outputs ---------------------------------------------------------------------


@pytest.mark.parametrize("opset", [14, 15])
def test_training_mode_is_refused(opset: int) -> None:
    g, conv = conv_bn_graph(opset)
    params = g.bn_params(4)
    g.nodes.append(helper.make_node(BN, [conv, *params], ["y", "running_mean", "running_var"], name="bn_train",
                                    training_mode=1))
    model = g.model([float_output("y", [2, 4, 8, 8])])
    record = refused(model, Reason.TRAINING_MODE)
    assert "training" in record.detail


@pytest.mark.parametrize("mean_is_graph_output", [True, False])
def test_running_mean_output_is_refused(mean_is_graph_output: bool) -> None:
    # BN-9 allows 1 or 5 outputs; declaring the running statistics makes it a training-style node.
    g, conv = conv_bn_graph(opset=9)
    params = g.bn_params(4)
    g.nodes.append(helper.make_node(BN, [conv, *params], ["y", "running_mean", "running_var", "saved_mean",
                                                          "saved_var"], name="bn_stats"))
    outputs = [float_output("y", [2, 4, 8, 8])]
    if mean_is_graph_output:
        outputs.append(float_output("running_mean", [4]))
    refused(g.model(outputs), Reason.EXTRA_OUTPUTS)


def test_spatial_0_is_refused() -> None:
    g, conv = conv_bn_graph(opset=7)
    r = g.rng
    params = [g.const(r.uniform(0.5, 1.5, (4, 8, 8)), "gamma"), g.const(r.normal(0, 0.2, (4, 8, 8)), "beta"),
              g.const(r.normal(0, 0.5, (4, 8, 8)), "mean"), g.const(r.uniform(0.5, 1.5, (4, 8, 8)), "var")]
    g.nodes.append(helper.make_node(BN, [conv, *params], ["y"], name="bn_elementwise", spatial=0))
    refused(g.model([float_output("y", [2, 4, 8, 8])]), Reason.NOT_SPATIAL)


# --- BN parameters ---------------------------------------------------------------------------------


def test_mean_from_graph_input_is_not_constant() -> None:
    g, conv = conv_bn_graph()
    gamma, beta, _, var = g.bn_params(4)
    mean = g.input("mean", [4])
    y = g.node(BN, [conv, gamma, beta, mean, var], "bn")
    record = refused(g.model([y]), Reason.PARAMS_NOT_CONSTANT)
    assert "mean" in record.detail and "graph input" in record.detail


def test_variance_computed_from_an_input_names_its_producer() -> None:
    g, conv = conv_bn_graph()
    gamma, beta, mean, _ = g.bn_params(4)
    var = g.node("Abs", [g.input("v", [4])])
    y = g.node(BN, [conv, gamma, beta, mean, var], "bn")
    record = refused(g.model([y]), Reason.PARAMS_NOT_CONSTANT)
    assert "computed by Abs" in record.detail


def test_overridable_initializer_is_not_constant() -> None:
    # IR >= 4: an initializer also listed as a graph input is only a default the caller may replace.
    g, conv = conv_bn_graph()
    params = g.bn_params(4)
    y = g.node(BN, [conv, *params], "bn")
    model = g.model([float_output(y, [2, 4, 8, 8])], ir_version=8, extra_inputs=g.initializer_inputs([params[3]]))
    refused(model, Reason.PARAMS_NOT_CONSTANT)
    # The override really changes the result: folding the default would have been wrong.
    feeds = random_feeds(model)
    default = run(model, feeds)[0]
    overridden = run(model, {**feeds, params[3]: np.full(4, 9.0, np.float32)})[0]
    assert not np.allclose(default, overridden)


def test_ir3_initializers_listed_as_inputs_are_constant() -> None:
    # IR 3 listed every initializer as a graph input; there that says nothing about overriding.
    g, conv = conv_bn_graph(opset=8)
    y = g.bn(conv, 4)
    model = g.model([float_output(y, [2, 4, 8, 8])], ir_version=3, extra_inputs=g.initializer_inputs())
    result = bnfold.fold(model)
    assert result.report.passed and result.report.verification is not None
    assert op_types(result.model) == ["Conv"]
    assert [(r.op_type, r.direction, r.into) for r in result.report.folded] == [(BN, "backward", [g.nodes[0].name])]
    assert result.report.skipped == []
    feeds = random_feeds(model)
    np.testing.assert_allclose(run(result.model, feeds)[0], run(model, feeds)[0], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kind", ["nan_gamma", "inf_mean", "inf_beta", "negative_var", "var_plus_eps_zero"])
def test_invalid_params_never_crash(kind: str) -> None:
    g, conv = conv_bn_graph()
    r = g.rng
    gamma, beta, mean = r.uniform(0.5, 1.5, 4), r.normal(0, 0.2, 4), r.normal(0, 0.5, 4)
    var = r.uniform(0.25, 1.75, 4)
    epsilon = 1e-5
    if kind == "nan_gamma":
        gamma[1] = np.nan
    elif kind == "inf_mean":
        mean[2] = np.inf
    elif kind == "inf_beta":
        beta[0] = -np.inf
    elif kind == "negative_var":
        var[3] = -1.0
    else:
        epsilon = 0.25
        var[0] = -0.25  # exactly representable: var + eps == 0
    names = [g.const(v, p) for v, p in zip((gamma, beta, mean, var), ("gamma", "beta", "mean", "var"))]
    y = g.node(BN, [conv, *names], "bn", epsilon=epsilon)
    model = g.model([y])
    record = refused(model, Reason.INVALID_PARAMS)
    assert record.detail
    output = run(model, random_feeds(model))[0]
    assert not np.isfinite(output).all(), "the model was meant to produce non-finite values"


# --- the producer side ---------------------------------------------------------------------------


def test_conv_weight_from_graph_input_is_refused() -> None:
    g = GraphBuilder()
    x = g.input("x", [2, 3, 8, 8])
    w = g.input("w", [4, 3, 3, 3])
    conv = g.node("Conv", [x, w, g.const(g.rng.normal(size=4), "b")], pads=[1, 1, 1, 1])
    y = g.bn(conv, 4)
    record = refused(g.model([y]), Reason.WEIGHT_NOT_CONSTANT)
    assert "'w'" in record.detail and "graph input" in record.detail


def test_dequantized_conv_weight_is_refused_and_stays_quantized() -> None:
    # QDQ models: folding would replace the int8 weight by a float one and undo the quantization.
    g = GraphBuilder()
    x = g.input("x", [2, 3, 8, 8])
    quantized = g.const(g.rng.integers(-100, 100, (4, 3, 3, 3)), "wq", dtype=np.int8)
    w = g.node("DequantizeLinear", [quantized, g.const(np.float32(0.01), "s"), g.const(np.int8(0), "z", np.int8)])
    y = g.bn(g.node("Conv", [x, w], pads=[1, 1, 1, 1]), 4)
    record = refused(g.model([y]), Reason.WEIGHT_NOT_CONSTANT)
    assert "DequantizeLinear" in record.detail and "quantized" in record.detail


def test_conv_weight_overridable_initializer_is_refused() -> None:
    g, conv = conv_bn_graph()
    y = g.bn(conv, 4)
    weight = g.nodes[0].input[1]
    model = g.model([float_output(y, [2, 4, 8, 8])], extra_inputs=g.initializer_inputs([weight]))
    record = refused(model, Reason.WEIGHT_NOT_CONSTANT)
    assert "also a graph input" in record.detail


def test_producer_with_other_consumers_is_refused() -> None:
    g, conv = conv_bn_graph()
    y = g.bn(conv, 4)
    z = g.relu(conv)
    refused(g.model([y, z]), Reason.PRODUCER_HAS_OTHER_CONSUMERS)


def test_producer_that_is_graph_output_is_refused() -> None:
    g, conv = conv_bn_graph()
    y = g.bn(conv, 4)
    refused(g.model([y, conv]), Reason.PRODUCER_IS_GRAPH_OUTPUT)


@pytest.mark.parametrize("time_steps", [4, 5])
def test_bn_after_rank3_matmul_is_channel_axis_mismatch(time_steps: int) -> None:
    # MatMul [B,T,K] x [K,C] -> [B,T,C]: its features are the last axis, BN normalises axis 1 (T).
    # With T == C every shape lines up, so folding along C would be silently wrong.
    g = GraphBuilder()
    x = g.input("x", [2, time_steps, 3])
    mm = g.matmul(x, 3, 4)
    y = g.bn(mm, time_steps)
    refused(g.model([y]), Reason.CHANNEL_AXIS_MISMATCH)


def test_matmul_of_unknown_rank_is_unknown_shape() -> None:
    # The If yields a rank-2 or a rank-3 tensor, so the MatMul's output channel axis is unknown; in
    # the rank-3 branch BN axis 1 is not the MatMul's feature axis.
    g = GraphBuilder()
    g.input("x", [4, 3])
    cond = g.input("cond", [], dtype=np.bool_)
    then_graph = helper.make_graph([helper.make_node("Identity", ["x"], ["then_out"])], "then", [],
                                   [float_output("then_out", [4, 3])])
    else_graph = helper.make_graph(
        [helper.make_node("Unsqueeze", ["x", "else_axes"], ["else_out"])], "else", [],
        [float_output("else_out", [1, 4, 3])],
        [onnx.numpy_helper.from_array(np.array([0], np.int64), "else_axes")])
    g.nodes.append(helper.make_node("If", [cond], ["either"], name="if_rank", then_branch=then_graph,
                                    else_branch=else_graph))
    y = g.bn(g.matmul("either", 3, 4), 4)
    total = g.node("ReduceSum", [y], keepdims=0)
    model = g.model([float_output(total, [])])
    assert model.graph.value_info and not any(v.type.tensor_type.HasField("shape") for v in model.graph.value_info
                                              if v.name == "either")
    for flag in (True, False):
        refused(model, Reason.UNKNOWN_SHAPE, feeds={"x": random_feeds(model)["x"], "cond": np.array(flag)})


# --- the consumer side ---------------------------------------------------------------------------


@pytest.mark.parametrize("padding", [{"pads": [1, 1, 1, 1]}, {"pads": [0, 0, 1, 0]}, {"auto_pad": "SAME_UPPER"},
                                     {"auto_pad": "SAME_LOWER"}])
def test_bn_before_padded_conv_is_refused(padding: dict) -> None:
    g = GraphBuilder()
    x = g.input("x", [2, 3, 8, 8])
    y = g.conv(g.bn(x, 3), 3, 4, **padding)
    record = refused(g.model([y]), Reason.PADDED_CONSUMER)
    assert "pad" in record.detail


@pytest.mark.parametrize("other", ["Relu", "ConvTranspose"])
def test_bn_with_a_consumer_that_cannot_absorb_it(other: str) -> None:
    g = GraphBuilder()
    x = g.input("x", [2, 3, 8, 8])
    bn = g.bn(x, 3)
    y = g.conv(bn, 3, 4)  # unpadded: could take the BN alone
    z = g.relu(bn) if other == "Relu" else g.conv_transpose(bn, 3, 2)
    refused(g.model([y, z]), Reason.CONSUMER_NOT_FOLDABLE)


def test_bn_feeding_only_conv_transpose_is_refused() -> None:
    g = GraphBuilder()
    x = g.input("x", [2, 3, 8, 8])
    y = g.conv_transpose(g.bn(x, 3), 3, 4)
    refused(g.model([y]), Reason.CONSUMER_NOT_FOLDABLE)


def test_bn_output_that_is_graph_output_is_refused() -> None:
    g = GraphBuilder()
    x = g.input("x", [2, 3, 8, 8])
    bn = g.bn(x, 3)
    y = g.conv(bn, 3, 4)  # unpadded
    refused(g.model([y, bn]), Reason.OUTPUT_IS_GRAPH_OUTPUT)


def test_bn_before_gemm_trans_a_is_unsupported_attribute() -> None:
    g = GraphBuilder()
    x = g.input("x", [4, 3])  # transA=1: A is [K=4, M=3], the BN scales M (rows of the output)
    y = g.gemm(g.bn(x, 3), 4, 5, transA=1)
    record = refused(g.model([y]), Reason.UNSUPPORTED_ATTRIBUTE)
    assert "transA" in record.detail


@pytest.mark.parametrize("consumer", ["Relu", "output"])
def test_bn_between_non_layers_has_no_foldable_neighbour(consumer: str) -> None:
    g = GraphBuilder()
    a = g.input("a", [2, 2, 8, 8])
    b = g.input("b", [2, 3, 8, 8])
    y = g.bn(g.node("Concat", [a, b], axis=1), 5)
    if consumer == "Relu":
        y = g.relu(y)
    refused(g.model([y]), Reason.NO_FOLDABLE_NEIGHBOUR)


REASON_TESTS = {
    Reason.TRAINING_MODE: test_training_mode_is_refused,
    Reason.EXTRA_OUTPUTS: test_running_mean_output_is_refused,
    Reason.NOT_SPATIAL: test_spatial_0_is_refused,
    Reason.PARAMS_NOT_CONSTANT: test_mean_from_graph_input_is_not_constant,
    Reason.INVALID_PARAMS: test_invalid_params_never_crash,
    Reason.WEIGHT_NOT_CONSTANT: test_conv_weight_from_graph_input_is_refused,
    Reason.PRODUCER_HAS_OTHER_CONSUMERS: test_producer_with_other_consumers_is_refused,
    Reason.PRODUCER_IS_GRAPH_OUTPUT: test_producer_that_is_graph_output_is_refused,
    Reason.CHANNEL_AXIS_MISMATCH: test_bn_after_rank3_matmul_is_channel_axis_mismatch,
    Reason.UNKNOWN_SHAPE: test_matmul_of_unknown_rank_is_unknown_shape,
    Reason.PADDED_CONSUMER: test_bn_before_padded_conv_is_refused,
    Reason.CONSUMER_NOT_FOLDABLE: test_bn_with_a_consumer_that_cannot_absorb_it,
    Reason.OUTPUT_IS_GRAPH_OUTPUT: test_bn_output_that_is_graph_output_is_refused,
    Reason.UNSUPPORTED_ATTRIBUTE: test_bn_before_gemm_trans_a_is_unsupported_attribute,
    Reason.NO_FOLDABLE_NEIGHBOUR: test_bn_between_non_layers_has_no_foldable_neighbour,
    Reason.BRANCH_GEOMETRY_MISMATCH: test_branch_refusals.test_dilation_and_group_mismatches,
    Reason.BRANCH_INTERMEDIATE_READ: test_branch_refusals.test_intermediate_value_read_elsewhere,
    Reason.BRANCH_NOT_LINEAR: test_branch_refusals.test_non_linear_op_inside_a_branch,
    Reason.WEIGHT_ON_LEFT: test_weight_on_the_left_of_a_matmul_is_refused_as_such,
}


def test_every_reachable_reason_has_a_refusal_test() -> None:
    # A new reason code needs a refusal test here (or a note on why no valid model produces it).
    assert set(REASON_TESTS) == set(Reason) - UNREACHABLE_FOR_BN


# --- a fold whose result does not fit the dtype --------------------------------------------------


def test_fold_that_would_overflow_float16_is_refused():
    weight = np.full((2, 2, 1, 1), 0.01, np.float16)
    weight[0, 0] = 40000.0  # times gamma 4 does not fit in float16
    params = {n: np.array(v, np.float16) for n, v in
              [("g", [4.0, 1.0]), ("b", [0.0, 0.0]), ("m", [0.0, 0.0]), ("v", [1.0, 1.0])]}
    model = model_from_text("""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float16[1, 2, 2, 2] x) => (float16[1, 2, 2, 2] y) {
            c = Conv(x, W)
            y = BatchNormalization <epsilon = 0.0> (c, g, b, m, v)
        }""", {"W": weight, **params})
    result = bnfold.fold(model, verify=False)
    assert not result.report.folded
    [skipped] = result.report.skipped
    assert skipped.reason == Reason.INVALID_PARAMS and "overflow" in skipped.detail
    feeds = {"x": np.full((1, 2, 2, 2), 1e-3, np.float16)}
    np.testing.assert_array_equal(run(result.model, feeds)[0], run(model, feeds)[0])
