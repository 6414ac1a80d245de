"""BNs inside model-local functions (`ModelProto.functions`): folded where the body fixes their
parameters (Constant nodes), otherwise reported with a reason code — never invisible, and
`bnfold check` never calls such a model clean without looking inside.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from helpers import invoke, run
from onnx import TensorProto, helper, numpy_helper

import bnfold
from bnfold.report import Reason

OPSET = 17
DOMAIN = "custom"
SCOPE = "function:custom:Block"


def _constant(name: str, values: np.ndarray) -> onnx.NodeProto:
    return helper.make_node("Constant", [], [name], value=numpy_helper.from_array(values.astype(np.float32), name))


def _block(rng: np.random.Generator, gamma_is_input: bool = False, epsilon_from_caller: bool = False
           ) -> onnx.FunctionProto:
    """Block(x[, gamma]) = BN(Conv(x, W, b)) with W, b, beta, mean, var (and gamma) as Constant nodes."""
    nodes = [_constant("W", rng.normal(0, 0.3, (4, 3, 3, 3))), _constant("b", rng.normal(size=4)),
             _constant("beta", rng.normal(0, 0.5, 4)), _constant("mean", rng.normal(0, 0.5, 4)),
             _constant("var", rng.uniform(0.3, 2.0, 4))]
    if not gamma_is_input:
        nodes.append(_constant("gamma", rng.uniform(0.5, 1.5, 4)))
    nodes.append(helper.make_node("Conv", ["x", "W", "b"], ["conv"], name="block_conv", pads=[1, 1, 1, 1]))
    bn = helper.make_node("BatchNormalization", ["conv", "gamma", "beta", "mean", "var"], ["y"], name="block_bn")
    if epsilon_from_caller:
        bn.attribute.append(onnx.AttributeProto(name="epsilon", ref_attr_name="eps", type=onnx.AttributeProto.FLOAT))
    nodes.append(bn)
    return helper.make_function(DOMAIN, "Block", ["x", "gamma"] if gamma_is_input else ["x"], ["y"], nodes,
                                [helper.make_opsetid("", OPSET)], attributes=["eps"] if epsilon_from_caller else [])


def _model(gamma_is_input: bool = False, epsilon_from_caller: bool = False, calls: int = 1) -> onnx.ModelProto:
    """x -> Block -> Relu -> ... (`calls` times) -> y; the channel count stays 3 -> 4 -> Conv back to 3."""
    rng = np.random.default_rng(12)
    function = _block(rng, gamma_is_input, epsilon_from_caller)
    initializers, nodes, current = [], [], "x"
    for call in range(calls):
        inputs = [current]
        if gamma_is_input:
            initializers.append(numpy_helper.from_array(rng.uniform(0.5, 1.5, 4).astype(np.float32), f"g{call}"))
            inputs.append(f"g{call}")
        attrs = {"eps": 1e-3} if epsilon_from_caller else {}
        nodes.append(helper.make_node("Block", inputs, [f"block{call}"], name=f"call{call}", domain=DOMAIN, **attrs))
        initializers.append(numpy_helper.from_array(rng.normal(0, 0.3, (3, 4, 1, 1)).astype(np.float32), f"back{call}"))
        nodes.append(helper.make_node("Conv", [f"block{call}", f"back{call}"], [f"out{call}"], name=f"back{call}"))
        current = f"out{call}"
    graph = helper.make_graph(nodes, "with_functions", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 6, 6])],
                              [helper.make_tensor_value_info(current, TensorProto.FLOAT, [2, 3, 6, 6])], initializers)
    model = helper.make_model(graph, functions=[function],
                              opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid(DOMAIN, 1)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def _feeds() -> dict[str, np.ndarray]:
    return {"x": np.random.default_rng(2).normal(size=(2, 3, 6, 6)).astype(np.float32)}


def _function_ops(model: onnx.ModelProto) -> list[str]:
    return [node.op_type for node in model.functions[0].node]


@pytest.mark.parametrize("calls", [1, 2])
def test_a_bn_inside_a_function_folds_into_its_conv(calls: int) -> None:
    model = _model(calls=calls)
    result = bnfold.fold(model)
    assert "BatchNormalization" not in _function_ops(result.model)
    assert [(r.node, r.direction, r.graph) for r in result.report.folded] == [("block_bn", "backward", SCOPE)]
    assert result.report.ops_before["BatchNormalization"] == 1 and "BatchNormalization" not in result.report.ops_after
    verification = result.report.verification
    assert verification.passed
    # The analytic check found and recomputed the function's new weight and bias (Constant nodes).
    assert len(verification.tensors) == 2 and all(t.passed and t.layer == "block_conv" for t in verification.tensors)
    onnx.checker.check_model(result.model, full_check=True)
    np.testing.assert_allclose(run(result.model, _feeds())[0], run(model, _feeds())[0], rtol=1e-5, atol=1e-5)


def test_the_analytic_check_reads_the_tensors_written_into_a_function(monkeypatch: pytest.MonkeyPatch) -> None:
    # A wrong fold inside a function body must fail verification at its source.
    from bnfold import layer_folds

    real = layer_folds.build_nodes

    def off_by_a_little(*args, **kwargs):
        nodes, tensors = real(*args, **kwargs)
        return nodes, {name: values * np.float32(1.001) if values.ndim == 4 else values
                       for name, values in tensors.items()}

    monkeypatch.setattr(layer_folds, "build_nodes", off_by_a_little)
    result = bnfold.fold(_model(), raise_on_failure=False)
    assert [t.passed for t in result.report.verification.tensors] == [False, True]


def test_a_bn_whose_parameter_is_a_function_input_is_reported() -> None:
    result = bnfold.fold(_model(gamma_is_input=True), verify=False)
    assert result.report.folded == []
    [skipped] = result.report.skipped
    assert (skipped.node, skipped.reason, skipped.graph) == ("block_bn", Reason.PARAMS_NOT_CONSTANT, SCOPE)
    assert "input of function 'Block'" in skipped.detail


def test_a_function_taking_attributes_from_its_callers_is_not_folded() -> None:
    model = _model(epsilon_from_caller=True)
    result = bnfold.fold(model)
    assert [(s.node, s.reason) for s in result.report.skipped] == [("block_bn", Reason.UNSUPPORTED_ATTRIBUTE)]
    assert _function_ops(result.model) == _function_ops(model)
    assert result.report.verification.passed


def test_refusal_inside_a_function_is_in_text_and_json(tmp_path: Path) -> None:
    source = tmp_path / "block.onnx"
    onnx.save(_model(gamma_is_input=True), source)
    text = invoke([source, "-o", tmp_path / "out.onnx"])
    assert text.exit_code == 0, text.stderr
    assert "skipped BatchNormalization 'block_bn': params_not_constant" in text.stdout
    data = json.loads(invoke([source, "-o", tmp_path / "out2.onnx", "--json"]).stdout)
    assert [(s["node"], s["reason"], s["graph"]) for s in data["skipped"]] == [("block_bn", "params_not_constant", SCOPE)]


def test_check_fails_on_a_foldable_bn_inside_a_function(tmp_path: Path) -> None:
    source = tmp_path / "block.onnx"
    onnx.save(_model(), source)
    result = invoke(["check", source])
    assert result.exit_code == 1
    assert "block_bn: foldable BatchNormalization" in result.stdout
    assert "ok" not in result.stdout
    assert not bnfold.check(str(source)).clean


def test_check_passes_a_function_bn_it_looked_at_and_cannot_fold(tmp_path: Path) -> None:
    source = tmp_path / "block.onnx"
    onnx.save(_model(gamma_is_input=True), source)
    result = invoke(["check", source, "--json"])
    assert result.exit_code == 0
    assert [s["reason"] for s in json.loads(result.stdout)["skipped"]] == ["params_not_constant"]
