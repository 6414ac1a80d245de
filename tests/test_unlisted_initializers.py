"""IR < 4 models whose initializers are not all listed as graph inputs (onnxruntime's own test models,
e.g. `fuse-conv-bn-no-bias.onnx`): onnxruntime loads them, so bnfold folds them, records the repair
and writes a model the ONNX checker accepts in full. Other checker failures stay bad input (exit 2).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from helpers import invoke, run
from onnx import TensorProto, helper

import bnfold
from benchmarks.graph_builder import GraphBuilder
from bnfold.errors import BadInputError

OPSET = 9


def _ir3_conv_bn(listed: bool = False) -> onnx.ModelProto:
    """x -> Conv (no bias) -> BN -> y, IR 3, opset 9, with no initializer listed as a graph input
    (or, with `listed`, the BN's four listed and the Conv weight not)."""
    g = GraphBuilder(np.random.default_rng(4), opset=OPSET)
    x = g.input("x", [1, 3, 6, 6])
    y = g.bn(g.conv(x, 3, 5, bias=False, pads=[1, 1, 1, 1]), 5)
    inputs = list(g.inputs)
    if listed:
        inputs += [helper.make_tensor_value_info(t.name, t.data_type, t.dims) for t in g.initializers[1:]]
    graph = helper.make_graph(g.nodes, "ir3", inputs, [helper.make_tensor_value_info(y, TensorProto.FLOAT, [1, 5, 6, 6])],
                              g.initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = 3
    return model


def _feeds() -> dict[str, np.ndarray]:
    return {"x": np.random.default_rng(8).normal(size=(1, 3, 6, 6)).astype(np.float32)}


@pytest.mark.parametrize("listed", [False, True])
def test_unlisted_initializers_are_accepted_folded_and_listed_in_the_output(listed: bool) -> None:
    model = _ir3_conv_bn(listed)
    with pytest.raises(onnx.checker.ValidationError, match="in initializer but not in graph input"):
        onnx.checker.check_model(model)
    reference = run(model, _feeds())  # onnxruntime loads the original as it is
    result = bnfold.fold(model)
    assert [n.op_type for n in result.model.graph.node] == ["Conv"]
    assert [r.code for r in result.report.repairs] == ["initializer_not_graph_input"]
    assert result.report.verification.passed
    folded = result.model
    assert folded.ir_version == 3 and folded.opset_import[0].version == OPSET  # repaired, not upgraded
    assert {t.name for t in folded.graph.initializer} <= {v.name for v in folded.graph.input}
    onnx.checker.check_model(folded, full_check=True)
    np.testing.assert_allclose(run(folded, _feeds())[0], reference[0], rtol=1e-5, atol=1e-5)


def test_the_input_proto_is_not_modified_by_the_repair() -> None:
    model = _ir3_conv_bn()
    before = model.SerializeToString()
    bnfold.fold(model, verify=False)
    assert model.SerializeToString() == before


def test_cli_folds_an_unlisted_initializer_model_and_says_it_repaired_it(tmp_path: Path) -> None:
    source, target = tmp_path / "ir3.onnx", tmp_path / "ir3.folded.onnx"
    onnx.save(_ir3_conv_bn(), source)
    result = invoke([source, "-o", target])
    assert result.exit_code == 0, result.stderr
    assert "repaired initializer_not_graph_input" in result.stdout
    written = onnx.load(target)
    onnx.checker.check_model(written, full_check=True)
    ort.InferenceSession(str(target), providers=["CPUExecutionProvider"])
    as_json = invoke([source, "-o", tmp_path / "again.onnx", "--json"])
    assert as_json.exit_code == 0
    assert [r["code"] for r in json.loads(as_json.stdout)["repairs"]] == ["initializer_not_graph_input"]


def test_a_listed_ir3_model_needs_no_repair() -> None:
    model = _ir3_conv_bn()
    model.graph.input.extend(helper.make_tensor_value_info(t.name, t.data_type, t.dims) for t in model.graph.initializer)
    assert bnfold.fold(model, verify=False).report.repairs == []


def test_other_checker_failures_of_such_a_model_stay_bad_input(tmp_path: Path) -> None:
    # Besides the unlisted initializers, a node reads a value nothing produces: onnxruntime refuses
    # that too, so bnfold does.
    model = _ir3_conv_bn()
    model.graph.node[-1].input[0] = "nowhere"
    with pytest.raises(Exception):
        ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    with pytest.raises(BadInputError, match="nowhere"):
        bnfold.fold(model)
    onnx.save(model, tmp_path / "broken.onnx")
    result = invoke([tmp_path / "broken.onnx", "-o", tmp_path / "out.onnx"])
    assert result.exit_code == 2
    assert not (tmp_path / "out.onnx").exists()


def test_ir4_initializers_need_not_be_listed() -> None:
    model = _ir3_conv_bn()
    model.ir_version = 4
    result = bnfold.fold(model)
    assert result.report.repairs == [] and len(result.model.graph.input) == 1
