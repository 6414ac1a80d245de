"""Branch sums that must NOT be merged into one Conv: each is left as it was (numbers unchanged) and
the identity BN inside says why, with a stable reason code. Conv attributes the spec forbids are a
clean refusal, never an internal error.

    x ─┬─ Conv (stride 1, 3x3, pads 0) ─┐
       └─ Conv (stride 2, 1x1)  ────────┴─ Add      same output size on a 5x5 input, not the same taps
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from helpers import op_types, random_feeds, run
from onnx import TensorProto, helper, numpy_helper

import bnfold
from benchmarks.graph_builder import GraphBuilder


def fold_unmerged(model: onnx.ModelProto, merges: int = 0) -> bnfold.api.FoldResult:
    result = bnfold.fold(model)
    assert len(result.report.merged_branches) == merges
    feeds = random_feeds(model)
    for before, after in zip(run(model, feeds), run(result.model, feeds)):
        np.testing.assert_allclose(after, before, rtol=1e-4, atol=1e-5)
    return result


def reasons(result: bnfold.api.FoldResult) -> list[str]:
    return [record.reason.value for record in result.report.skipped]


def with_identity(g: GraphBuilder, x: str, branch: str, channels: int) -> onnx.ModelProto:
    return g.model([g.node("Add", [branch, g.bn(x, channels)])])


def test_different_strides_with_the_same_output_size():
    g = GraphBuilder()
    x = g.input("x", [1, 4, 5, 5])
    a = g.bn(g.conv(x, 4, 4, kernel=3), 4)  # 5 -> 3
    b = g.bn(g.conv(x, 4, 4, kernel=1, strides=[2, 2]), 4)  # 5 -> 3
    result = fold_unmerged(g.model([g.node("Add", [a, b])]))
    assert op_types(result.model).count("Conv") == 2


def test_padding_that_changes_the_output_size_is_broadcast_not_merged():
    """[1,C,1,1] + [1,C,3,3]: the Add broadcasts one branch; a merged Conv could not."""
    g = GraphBuilder()
    x = g.input("x", [1, 4, 3, 3])
    a = g.conv(x, 4, 4, kernel=3)  # -> 1x1
    b = g.conv(x, 4, 4, kernel=3, pads=[1] * 4)  # -> 3x3
    result = fold_unmerged(g.model([g.node("Add", [g.node("Add", [a, b]), g.bn(x, 4)])]))
    assert reasons(result) == ["branch_geometry_mismatch"]
    assert "output sizes" in result.report.skipped[0].detail


def test_dilation_and_group_mismatches():
    for attrs in ({"dilations": [2, 2], "pads": [2] * 4}, {"group": 2, "pads": [1] * 4}):
        g = GraphBuilder()
        x = g.input("x", [1, 4, 6, 6])
        a = g.conv(x, 4, 4, kernel=3, pads=[1] * 4)
        b = g.conv(x, 4, 4, kernel=3, **attrs)
        result = fold_unmerged(with_identity(g, x, g.node("Add", [a, b]), 4))
        assert reasons(result) == ["branch_geometry_mismatch"]


def test_same_padding_with_stride_two_is_refused():
    g = GraphBuilder()
    x = g.input("x", [1, 4, 6, 6])
    a = g.conv(x, 4, 4, kernel=3, strides=[2, 2], auto_pad="SAME_UPPER")
    b = g.conv(x, 4, 4, kernel=1, strides=[2, 2], auto_pad="SAME_UPPER")
    result = fold_unmerged(g.model([g.node("Add", [a, b])]))
    assert op_types(result.model) == ["Conv", "Conv", "Add"]


def test_intermediate_value_read_elsewhere():
    g = GraphBuilder()
    x = g.input("x", [1, 4, 6, 6])
    conv = g.conv(x, 4, 4, kernel=3, pads=[1] * 4)
    norm = g.bn(x, 4)
    result = fold_unmerged(g.model([g.node("Add", [conv, norm]), norm]))  # the BN output is also an output
    assert reasons(result) == ["branch_intermediate_read"]


def test_partial_sum_read_elsewhere():
    g = GraphBuilder()
    x = g.input("x", [1, 4, 6, 6])
    partial = g.node("Add", [g.conv(x, 4, 4, kernel=3, pads=[1] * 4), g.conv(x, 4, 4, kernel=1)])
    total = g.node("Add", [partial, g.bn(x, 4)])
    result = fold_unmerged(g.model([total, g.relu(partial)]), merges=1)
    assert reasons(result) == ["branch_intermediate_read"]
    # the two Convs still merge below the shared partial sum, which the merged Conv produces
    assert result.report.merged_branches[0].output == partial
    assert op_types(result.model) == ["Conv", "BatchNormalization", "Add", "Relu"]


def test_branch_reading_another_tensor():
    g = GraphBuilder()
    x, z = g.input("x", [1, 4, 6, 6]), g.input("z", [1, 4, 6, 6])
    result = fold_unmerged(with_identity(g, z, g.conv(x, 4, 4, kernel=3, pads=[1] * 4), 4))
    assert reasons(result) == ["branch_not_linear"]


def test_non_linear_op_inside_a_branch():
    g = GraphBuilder()
    x = g.input("x", [1, 4, 6, 6])
    squared = g.node("Mul", [x, x])
    result = fold_unmerged(g.model([g.node("Add", [g.conv(x, 4, 4, kernel=3, pads=[1] * 4), g.bn(squared, 4)])]))
    assert reasons(result) == ["branch_not_linear"]


def test_identity_with_fewer_input_than_output_channels():
    """Conv 1 -> 4 channels plus BN(x) of 1 channel: the Add broadcasts x over the channels."""
    g = GraphBuilder()
    x = g.input("x", [1, 1, 6, 6])
    result = fold_unmerged(with_identity(g, x, g.conv(x, 1, 4, kernel=3, pads=[1] * 4), 1))
    assert reasons(result) == ["branch_geometry_mismatch"]
    assert "as many input as output" in result.report.skipped[0].detail


def test_identity_beside_a_strided_conv():
    g = GraphBuilder()
    x = g.input("x", [1, 4, 1, 1])  # stride 2 on a 1x1 input keeps 1x1: the Add is valid
    result = fold_unmerged(with_identity(g, x, g.conv(x, 4, 4, kernel=1, strides=[2, 2]), 4))
    assert reasons(result) == ["branch_geometry_mismatch"]


def test_plain_residual_sum_is_no_candidate():
    """ResNet's Add(conv(relu(conv(x))), x): the branches read different tensors and hold no BN left."""
    g = GraphBuilder()
    x = g.relu(g.input("x", [1, 4, 6, 6]))
    inner = g.conv(g.relu(g.conv(x, 4, 4, kernel=3, pads=[1] * 4)), 4, 4, kernel=3, pads=[1] * 4)
    model = g.model([g.node("Add", [inner, x])])
    result = fold_unmerged(model)
    assert op_types(result.model) == op_types(model)
    assert not result.report.skipped


# --- Conv attributes the spec forbids: a clean refusal, never an internal error --------------------
# A branch sum `Conv3x3(x, dilations=[0, 0]) + Conv1x1(x)`: the checker lets dilation 0 through, and the
# slack of the 3x3 (no padding, zero dilation) equals the 1x1's, so merging would compute
# `(begin_a - begin_b) % dilation`. Strides/dilations/group below 1 refuse the merge before any
# arithmetic: no "unexpected error", with or without verification, in fold and in check.


C = 4


def _branch_sum(path: Path, **conv_attrs) -> None:
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.normal(size=(C, C, 3, 3)).astype(np.float32), "w3"),
             numpy_helper.from_array(rng.normal(size=(C, C, 1, 1)).astype(np.float32), "w1")]
    for name, v in (("g", rng.uniform(0.5, 2, C)), ("b", rng.normal(size=C)), ("m", rng.normal(size=C)),
                    ("v", rng.uniform(0.5, 2, C))):
        inits.append(numpy_helper.from_array(v.astype(np.float32), name))
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w3"], ["c3"], **conv_attrs),
         helper.make_node("BatchNormalization", ["c3", "g", "b", "m", "v"], ["n3"]),
         helper.make_node("Conv", ["x", "w1"], ["c1"]), helper.make_node("Add", ["n3", "c1"], ["y"])],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, C, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, None, None, None])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, path)


@pytest.mark.parametrize("args", [["m.onnx", "-o", "out.onnx"], ["m.onnx", "-o", "out.onnx", "--no-verify"],
                                  ["check", "m.onnx"]], ids=["fold", "no-verify", "check"])
def test_zero_dilation_is_no_internal_error(tmp_path: Path, args: list[str]) -> None:
    _branch_sum(tmp_path / "m.onnx", dilations=[0, 0])

    result = subprocess.run([sys.executable, "-m", "bnfold", *args], cwd=tmp_path, capture_output=True, text=True)

    assert "unexpected error" not in result.stderr, result.stderr
    assert result.returncode in (0, 1, 2)
