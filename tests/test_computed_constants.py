"""Constants that depend on a graph input only through its element type or static dims (torch.onnx
dynamo's zero bias of a bias-free Conv), and training-mode BNs of constants (NF-Net weight
standardisation): evaluated, folded, verified — and the look-alikes that are not constants refused.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from helpers import op_types, random_feeds, run
from onnx import TensorProto, helper, numpy_helper

import bnfold
from benchmarks.graph_builder import GraphBuilder
from bnfold.report import Reason

BN = "BatchNormalization"


# --- helpers -------------------------------------------------------------------------------------


def dynamo_zero_bias(g: GraphBuilder, data: str, weight: str) -> str:
    """torch.onnx dynamo, optimize=False: `Expand(CastLike(0, data), Expand(Shape(W, 0, 1), [1]))`."""
    zero = g.node("Constant", [], "zero", value=numpy_helper.from_array(np.array(0.0, np.float32)))
    like = g.node("CastLike", [zero, data])
    out_channels = g.node("Shape", [weight], start=0, end=1)
    shape = g.node("Expand", [out_channels, g.node("Constant", [], value_ints=[1])])
    return g.node("Expand", [like, shape])


def conv_with_bias(g: GraphBuilder, x: str, c_in: int, c_out: int, bias_of) -> str:
    """A 3x3 Conv whose bias input is built by `bias_of(g, x, weight)`."""
    weight = g.const(g.weights(c_out, c_in, 3, 3), "w")
    return g.node("Conv", [x, weight, bias_of(g, x, weight)], pads=[1, 1, 1, 1])


def initializers(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def folded_bias(original: onnx.ModelProto, bn: onnx.NodeProto, conv_bias: np.ndarray) -> np.ndarray:
    """beta + (b - mean) * gamma / sqrt(var + eps) in float64, from the original's stored values."""
    values = initializers(original)
    gamma, beta, mean, var = (values[name].astype(np.float64) for name in bn.input[1:5])
    eps = next(a.f for a in bn.attribute if a.name == "epsilon")
    return beta + (conv_bias.astype(np.float64) - mean) * gamma / np.sqrt(var + np.float64(eps))


def assert_same_outputs(original: onnx.ModelProto, folded: onnx.ModelProto, rtol: float = 1e-4,
                        atol: float = 1e-5) -> None:
    feeds = random_feeds(original)
    for expected, actual in zip(run(original, feeds), run(folded, feeds)):
        np.testing.assert_allclose(actual.astype(np.float64), expected.astype(np.float64), rtol=rtol, atol=atol)


def conv_nodes(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    return [n for n in model.graph.node if n.op_type == "Conv"]


def skipped_reason(result: bnfold.FoldResult) -> tuple[Reason, str]:
    (record,) = result.report.skipped
    return record.reason, record.detail


# --- dtype / static-shape dependent constants ----------------------------------------------------


@pytest.mark.parametrize("dtype, rtol, atol", [(np.float32, 1e-4, 1e-5), (np.float16, 2e-2, 2e-2)])
def test_dynamo_zero_bias_folds_on_the_input_and_on_activations(dtype, rtol: float, atol: float) -> None:
    """The first Conv's CastLike reads the graph input, the second's an activation (whose type only
    shape inference from the inputs knows); both BNs fold, the bias subgraphs disappear."""
    g = GraphBuilder(dtype=dtype, opset=18)
    x = g.input("x", [1, 3, 8, 8])
    first = g.bn(conv_with_bias(g, x, 3, 4, dynamo_zero_bias), 4)
    second = g.bn(conv_with_bias(g, g.relu(first), 4, 5, dynamo_zero_bias), 5)
    model = g.model([second])
    bns = [n for n in model.graph.node if n.op_type == BN]

    result = bnfold.fold(model)

    folded = result.model
    assert result.report.passed
    assert [(r.op_type, r.direction) for r in result.report.folded] == [(BN, "backward"), (BN, "backward")]
    assert set(op_types(folded)) == {"Conv", "Relu"}
    values = initializers(folded)
    for conv, bn in zip(conv_nodes(folded), bns):
        bias = values[conv.input[2]]
        assert bias.dtype == dtype
        expected = folded_bias(model, bn, np.zeros(bias.shape))
        np.testing.assert_array_max_ulp(bias, expected.astype(dtype), maxulp=1)
    assert_same_outputs(model, folded, rtol, atol)


def zeros_sized_by_dims_of_x(start: int, end: int):
    """A zero bias as long as Shape(x, start, end) says (the dynamo pattern reading the input)."""
    def build(g: GraphBuilder, x: str, weight: str) -> str:
        like = g.node("CastLike", [g.node("Constant", [], value=numpy_helper.from_array(np.array(0.0, np.float32))), x])
        return g.node("Expand", [like, g.node("Shape", [x], start=start, end=end)])
    return build


def test_symbolic_dim_read_by_shape_keeps_the_bias_dynamic() -> None:
    """The zero bias's length comes from the batch dim N: not a constant."""
    g = GraphBuilder(opset=18)
    x = g.input("x", ["N", 4, 8, 8])
    y = g.bn(conv_with_bias(g, x, 4, 4, zeros_sized_by_dims_of_x(0, 1)), 4)
    model = g.model([y], check=False)

    result = bnfold.fold(model, verify=False)

    assert op_types(result.model).count(BN) == 1
    reason, detail = skipped_reason(result)
    assert reason == Reason.WEIGHT_NOT_CONSTANT
    assert "dims of 'x' ['N', 4, 8, 8]" in detail


def test_static_dims_a_shape_reads_are_enough() -> None:
    """Shape(x, start=1, end=2) reads only the channel dim, which is fixed although N is not."""
    g = GraphBuilder(opset=18)
    x = g.input("x", ["N", 4, 8, 8])
    y = g.bn(conv_with_bias(g, x, 4, 4, zeros_sized_by_dims_of_x(1, 2)), 4)
    model = g.model([y])

    result = bnfold.fold(model, input_shapes={"x": [2, 4, 8, 8]})

    assert result.report.passed
    assert op_types(result.model) == ["Conv"]
    feeds = {"x": np.random.default_rng(3).uniform(-1, 1, (3, 4, 8, 8)).astype(np.float32)}
    np.testing.assert_allclose(run(result.model, feeds)[0], run(model, feeds)[0], rtol=1e-4, atol=1e-5)


def _bias_over_batch(reader: str):
    """b / N, with N read by Shape (then Gather) or Size (then divided by the other dims)."""
    def build(g: GraphBuilder, x: str, weight: str) -> str:
        b = g.const(g.rng.normal(size=4), "b")
        if reader == "Shape":
            n = g.node("Gather", [g.node("Shape", [x]), g.const(0, "i", np.int64)])
        else:
            n = g.node("Div", [g.node("Size", [x]), g.const(3 * 8 * 8, "i", np.int64)])
        return g.node("Div", [b, g.node("Cast", [n], to=TensorProto.FLOAT)])
    return build


@pytest.mark.parametrize("reader", ["Shape", "Size"])
def test_bias_computed_from_static_input_dims_folds(reader: str) -> None:
    g = GraphBuilder(opset=17)
    x = g.input("x", [2, 3, 8, 8])
    y = g.bn(conv_with_bias(g, x, 3, 4, _bias_over_batch(reader)), 4)
    model = g.model([y])
    b = next(t for t in model.graph.initializer if t.name.startswith("b"))

    result = bnfold.fold(model)

    assert result.report.passed
    assert op_types(result.model) == ["Conv"]
    bias = initializers(result.model)[conv_nodes(result.model)[0].input[2]]
    expected = folded_bias(model, model.graph.node[-1], numpy_helper.to_array(b).astype(np.float64) / 2)
    np.testing.assert_array_max_ulp(bias, expected.astype(np.float32), maxulp=1)
    assert_same_outputs(model, result.model)


@pytest.mark.parametrize("reader", ["Shape", "Size"])
def test_bias_computed_from_a_symbolic_input_dim_is_refused(reader: str) -> None:
    g = GraphBuilder(opset=17)
    x = g.input("x", ["N", 3, 8, 8])
    y = g.bn(conv_with_bias(g, x, 3, 4, _bias_over_batch(reader)), 4)
    model = g.model([y])

    result = bnfold.fold(model)

    assert result.report.passed and op_types(result.model).count(BN) == 1
    reason, detail = skipped_reason(result)
    assert reason == Reason.WEIGHT_NOT_CONSTANT
    assert "dims of 'x' ['N', 3, 8, 8]" in detail


def test_value_info_cannot_make_a_symbolic_dim_static() -> None:
    """value_info is not checked by anyone: a declared [4, 4, 8, 8] for an activation of an
    [N, 4, 8, 8] input must not turn Shape(activation) into a constant."""
    g = GraphBuilder(opset=17)
    x = g.input("x", ["N", 4, 8, 8])
    activation = g.relu(x)
    y = g.bn(conv_with_bias(g, activation, 4, 4, _bias_over_batch("Shape")), 4)
    model = g.model([y], check=False)
    del model.graph.value_info[:]
    model.graph.value_info.append(helper.make_tensor_value_info(activation, TensorProto.FLOAT, [4, 4, 8, 8]))

    result = bnfold.fold(model, verify=False)

    assert op_types(result.model).count(BN) == 1
    reason, detail = skipped_reason(result)
    assert reason == Reason.WEIGHT_NOT_CONSTANT
    assert f"dims of '{activation}'" in detail


# --- training-mode BN of a constant (NF-Net weight standardisation) ------------------------------


def standardised_weight(g: GraphBuilder, c_out: int, c_in: int, running_outputs: bool = True) -> tuple[str, str]:
    """timm's ScaledStdConv2d as torch exports it: Reshape(W, [1, out, -1]) -> BN(training_mode=1,
    scale=gain) -> Reshape(., Shape(W)); the running statistics are computed (ReduceMean) and unread.
    Returns (standardised weight, BN output)."""
    weight = g.const(g.weights(c_out, c_in, 3, 3), "w")
    flat = g.node("Reshape", [weight, g.const([1, c_out, -1], "s", np.int64)])
    gain = g.const(g.rng.uniform(0.5, 1.5, c_out), "gain")
    mean = g.node("ReduceMean", [flat], axes=[0, 2], keepdims=0)
    var = g.node("ReduceMean", [g.node("Mul", [flat, flat])], axes=[0, 2], keepdims=0)
    outputs = 3 if running_outputs else 1
    y = g.node(BN, [flat, gain, g.const(np.zeros(c_out), "beta"), mean, var], "std", n_outputs=outputs,
               epsilon=1e-5, momentum=0.0, training_mode=1)
    return g.node("Reshape", [y, g.node("Shape", [weight])]), y


def nf_model(g: GraphBuilder, outputs: dict[str, list[int]]) -> onnx.ModelProto:
    """The builder's model with its outputs' shapes declared: shape inference cannot see through
    Reshape(BN(...), Shape(W)) to the Conv's output shape, and the checker wants it declared."""
    model = g.model(list(outputs), check=False)
    del model.graph.output[:]
    model.graph.output.extend(helper.make_tensor_value_info(name, g.elem_type, shape) for name, shape in outputs.items())
    onnx.checker.check_model(model)
    return model


def expected_standardised(model: onnx.ModelProto, bn_output: str) -> np.ndarray:
    """Y of the training-mode BN in float64, written out directly from the operator spec."""
    node = next(n for n in model.graph.node if n.output[0] == bn_output)
    values = initializers(model)
    producer = next(n for n in model.graph.node if n.output[0] == node.input[0])
    x = values[producer.input[0]].astype(np.float64).reshape(1, values[node.input[1]].size, -1)
    gain = values[node.input[1]].astype(np.float64)
    centred = x - x.mean(axis=(0, 2), keepdims=True)
    return centred / np.sqrt((centred**2).mean(axis=(0, 2), keepdims=True) + np.float64(1e-5)) * gain[:, None]


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_training_bn_of_a_constant_weight_becomes_an_initializer(dtype) -> None:
    g = GraphBuilder(dtype=dtype, opset=17)
    x = g.input("x", [1, 3, 8, 8])
    weight, bn_output = standardised_weight(g, 4, 3)
    y = g.node("Conv", [x, weight, g.const(g.rng.normal(size=4), "b")], pads=[1, 1, 1, 1])
    model = nf_model(g, {y: [1, 4, 8, 8]})

    result = bnfold.fold(model)

    report = result.report
    assert report.passed
    assert [(r.op_type, r.direction, r.into) for r in report.folded] == [(BN, "evaluated", [bn_output])]
    assert op_types(result.model) == ["Shape", "Reshape", "Conv"]  # the statistics' ReduceMean & co. are gone
    written = initializers(result.model)[bn_output]
    assert written.dtype == dtype
    np.testing.assert_array_max_ulp(written, expected_standardised(model, bn_output).astype(dtype), maxulp=1)
    (check,) = [t for t in report.verification.tensors if t.tensor == bn_output]
    assert check.passed and check.max_ulp_error <= 1.0
    assert_same_outputs(model, result.model, *((1e-4, 1e-5) if dtype == np.float32 else (2e-2, 2e-2)))


def test_conv_with_a_standardised_weight_folds_its_bn_in_the_same_run() -> None:
    g = GraphBuilder(opset=17)
    x = g.input("x", [1, 3, 8, 8])
    weight, bn_output = standardised_weight(g, 4, 3)
    y = g.bn(g.node("Conv", [x, weight], pads=[1, 1, 1, 1]), 4)
    model = nf_model(g, {y: [1, 4, 8, 8]})

    result = bnfold.fold(model)

    assert result.report.passed
    assert [(r.op_type, r.direction) for r in result.report.folded] == [(BN, "evaluated"), (BN, "backward")]
    assert op_types(result.model) == ["Conv"]
    conv = conv_nodes(result.model)[0]
    bn = model.graph.node[-1]
    values = initializers(model)
    scale = values[bn.input[1]].astype(np.float64) / np.sqrt(values[bn.input[4]].astype(np.float64) + 1e-5)
    expected_weight = expected_standardised(model, bn_output).reshape(4, 3, 3, 3) * scale[:, None, None, None]
    np.testing.assert_array_max_ulp(initializers(result.model)[conv.input[1]], expected_weight.astype(np.float32),
                                    maxulp=2)  # the evaluated weight is rounded once, then the fold once
    assert [t.tensor for t in result.report.verification.tensors if t.tensor == bn_output] == [bn_output]
    assert_same_outputs(model, result.model)


def test_training_bn_on_activations_is_still_refused() -> None:
    g = GraphBuilder(opset=15)
    x = g.input("x", [2, 3, 8, 8])
    conv = g.conv(x, 3, 4)
    g.nodes.append(helper.make_node(BN, [conv, *g.bn_params(4)], ["y", "rm", "rv"], name="bn_train", training_mode=1))
    model = g.model(["y"])

    result = bnfold.fold(model)

    assert result.report.passed and result.report.folded == []
    reason, detail = skipped_reason(result)
    assert reason == Reason.TRAINING_MODE
    assert f"batch statistics of '{conv}'" in detail


@pytest.mark.parametrize("reader", ["graph output", "node"])
def test_training_bn_of_a_constant_with_read_running_stats_is_refused(reader: str) -> None:
    g = GraphBuilder(opset=17)
    x = g.input("x", [1, 3, 8, 8])
    weight, bn_output = standardised_weight(g, 4, 3)
    y = g.node("Conv", [x, weight], pads=[1, 1, 1, 1])
    bn = next(n for n in g.nodes if n.op_type == BN)
    running_mean = bn.output[1] if reader == "graph output" else g.node("Identity", [bn.output[1]])
    model = nf_model(g, {y: [1, 4, 8, 8], running_mean: [4]})

    result = bnfold.fold(model)

    assert result.report.passed and result.report.folded == []
    assert op_types(result.model).count(BN) == 1
    reason, detail = skipped_reason(result)
    assert reason == Reason.TRAINING_MODE
    assert f"running mean/var output '{bn.output[1]}' is read" in detail


def test_analytic_check_recomputes_the_evaluated_bn_independently(monkeypatch) -> None:
    """A wrong evaluation (epsilon dropped) is caught by the analytic check, not only by tolerances."""
    import bnfold.constants as constants

    real = constants.batch_statistics_normalized
    monkeypatch.setattr(constants, "batch_statistics_normalized", lambda x, s, b, eps: real(x, s, b, 0.0))
    g = GraphBuilder(opset=17)
    x = g.input("x", [1, 3, 8, 8])
    weight, bn_output = standardised_weight(g, 4, 3)
    model = nf_model(g, {g.node("Conv", [x, weight], pads=[1, 1, 1, 1]): [1, 4, 8, 8]})

    result = bnfold.fold(model, raise_on_failure=False)

    assert not result.report.passed
    (check,) = [t for t in result.report.verification.tensors if t.tensor == bn_output]
    assert not check.passed and check.max_ulp_error > 1


def test_evaluated_bn_is_reported_in_json_and_counted_by_check() -> None:
    from pathlib import Path

    from test_json_schema import strict_loads, validate

    from bnfold import render
    from bnfold.batch import JobResult

    g = GraphBuilder(opset=17)
    x = g.input("x", [1, 3, 8, 8])
    weight, bn_output = standardised_weight(g, 4, 3, running_outputs=False)
    model = nf_model(g, {g.node("Conv", [x, weight], pads=[1, 1, 1, 1]): [1, 4, 8, 8]})

    report = bnfold.fold(model).report
    data = strict_loads(render.results_to_json([JobResult(Path("m.onnx"), 0, report, "", [])], "fold", False))
    validate(data)
    assert [(r["direction"], r["into"]) for r in data["folded"]] == [("evaluated", [bn_output])]
    assert f"evaluated into {bn_output}" in render.to_text(report)
    assert [r.output for r in bnfold.check(model).foldable] == [bn_output]


def test_training_bn_of_a_constant_that_is_a_graph_output_stays() -> None:
    """An output that is an initializer is not portable: the node stays, with its reason."""
    g = GraphBuilder(opset=17)
    x = g.input("x", [1, 3, 8, 8])
    weight, bn_output = standardised_weight(g, 4, 3, running_outputs=False)
    y = g.node("Conv", [x, weight], pads=[1, 1, 1, 1])
    model = nf_model(g, {y: [1, 4, 8, 8], bn_output: [1, 4, 27]})

    result = bnfold.fold(model)

    assert result.report.passed and result.report.folded == []
    reason, detail = skipped_reason(result)
    assert (reason, detail) == (Reason.TRAINING_MODE, "training_mode=1 on a constant, but its output is a graph output")
