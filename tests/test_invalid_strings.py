"""Every string field of a model must be valid UTF-8, wherever it is.

Protobuf parses a proto2 string that is not valid UTF-8 without complaint and hands it out as
`bytes`. Code that then compares, copies or prints it as text either misses a match or raises
(a `UnicodeDecodeError` while copying the model's top-level fields was reached by a byte-level
mutant of `mlp_bn1d.onnx` seed 326, in `producer_name`). The loader refuses such a model as bad
input, naming the field, before anything is folded or written — in every field, not only names.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import helper

import bnfold
from benchmarks.graph_builder import GraphBuilder
from bnfold.cli import main

MARK = "QQQQ"  # replaced in the serialized bytes by the same number of bytes that are not UTF-8
INVALID = b"\x80\xfe\xff\x84"


def _model() -> onnx.ModelProto:
    g = GraphBuilder(np.random.default_rng(3))
    x = g.input("x", [1, 3, 6, 6])
    return g.model([g.bn(g.conv(x, 3, 4, kernel=3, pads=[1, 1, 1, 1]), 4)])


def _mark(model: onnx.ModelProto, where: str) -> None:
    graph, conv = model.graph, model.graph.node[0]
    if where == "producer_name":
        model.producer_name = MARK
    elif where == "model doc_string":
        model.doc_string = MARK
    elif where == "metadata value":
        model.metadata_props.add(key="note", value=MARK)
    elif where == "graph name":
        graph.name = MARK
    elif where == "value_info name":
        graph.value_info.append(helper.make_tensor_value_info(MARK, onnx.TensorProto.FLOAT, None))
    elif where == "dim_param":
        graph.input[0].type.tensor_type.shape.dim[0].dim_param = MARK
    elif where == "node doc_string":
        conv.doc_string = MARK
    elif where == "attribute doc_string":
        conv.attribute[0].doc_string = MARK
    elif where == "initializer doc_string":
        graph.initializer[0].doc_string = MARK
    elif where == "function name":
        model.functions.append(helper.make_function("local", MARK, ["a"], ["b"], [helper.make_node("Relu", ["a"], ["b"])],
                                                    [helper.make_opsetid("", 17)]))
        model.opset_import.append(helper.make_opsetid("local", 1))
    else:
        raise AssertionError(where)


PLACES = ["producer_name", "model doc_string", "metadata value", "graph name", "value_info name", "dim_param",
          "node doc_string", "attribute doc_string", "initializer doc_string", "function name"]


def _write_invalid(tmp_path: Path, where: str) -> Path:
    model = _model()
    _mark(model, where)
    data = model.SerializeToString()
    assert data.count(MARK.encode()) == 1
    source = tmp_path / "model.onnx"
    source.write_bytes(data.replace(MARK.encode(), INVALID))
    return source


@pytest.mark.parametrize("where", PLACES)
def test_cli_refuses_a_string_that_is_not_utf8(tmp_path: Path, where: str) -> None:
    source = _write_invalid(tmp_path, where)
    before = source.read_bytes()
    result = CliRunner().invoke(main, ["fold", str(source), "-o", str(tmp_path / "out.onnx")])
    assert result.exit_code == 2, result.output
    assert result.stderr.count("\n") == 1 and "not valid UTF-8" in result.stderr, result.stderr
    assert repr(INVALID[:2])[2:-1] in result.stderr  # the offending bytes are shown
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]
    assert source.read_bytes() == before


@pytest.mark.parametrize("where", ["producer_name", "node doc_string", "function name"])
def test_api_and_check_refuse_a_string_that_is_not_utf8(tmp_path: Path, where: str) -> None:
    source = _write_invalid(tmp_path, where)
    with pytest.raises(bnfold.BadInputError, match="not valid UTF-8"):
        bnfold.fold(source, output=tmp_path / "out.onnx")
    with pytest.raises(bnfold.BadInputError, match="not valid UTF-8"):
        bnfold.check(source)
    result = CliRunner().invoke(main, ["check", str(source)])
    assert result.exit_code == 2 and "not valid UTF-8" in result.stderr


def test_the_same_models_with_valid_strings_fold(tmp_path: Path) -> None:
    """The marks alone are harmless: each model above folds once its string is valid."""
    for where in PLACES:
        model = _model()
        _mark(model, where)
        source = tmp_path / f"{where.replace(' ', '_')}.onnx"
        onnx.save(model, source)
        result = bnfold.fold(source, output=tmp_path / "out.onnx", verify=False)
        report = result.report
        assert report.ops_before["BatchNormalization"] == 1 and "BatchNormalization" not in report.ops_after, where
