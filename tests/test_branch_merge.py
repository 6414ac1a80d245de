"""Re-parameterizable branch blocks exported in training form merge into one Conv, exactly.

    RepVGG     x ─┬─ Conv3x3 ─ BN ─┐
                  ├─ Conv1x1 ─ BN ─┼─ Add ─ Add ─ Relu      ->   x ─ Conv3x3 ─ Relu
                  └────────── BN ──┘
    RepMixer   x + s * ((BN(DWConv(x)) + BN(x)) - BN(x))    ->   x ─ DWConv3x3

Every merge is checked with real numbers: both models in onnxruntime with optimizations off, the
analytic check of the merged tensors, and the node counts.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from helpers import invoke, op_types, random_feeds, run

import bnfold
from benchmarks.graph_builder import GraphBuilder
from bnfold.errors import VerificationError


def fold_and_compare(model: onnx.ModelProto, **options) -> bnfold.api.FoldResult:
    result = bnfold.fold(model, **options)
    feeds = random_feeds(model)
    for before, after in zip(run(model, feeds), run(result.model, feeds)):
        np.testing.assert_allclose(after, before, rtol=1e-4, atol=1e-5)
    verification = result.report.verification
    assert verification.passed and verification.tensors and all(t.passed for t in verification.tensors)
    return result


def repvgg(g: GraphBuilder, x: str, c: int, stride: int = 1, identity: bool = True) -> str:
    a = g.bn(g.conv(x, c, c, kernel=3, pads=[1, 1, 1, 1], strides=[stride] * 2, bias=False), c)
    b = g.bn(g.conv(x, c, c, kernel=1, strides=[stride] * 2, bias=False), c)
    total = g.node("Add", [a, b])
    return g.node("Add", [total, g.bn(x, c)]) if identity else total


def test_repvgg_block_becomes_one_conv():
    g = GraphBuilder()
    x = g.relu(g.input("x", [2, 8, 10, 10]))
    y = g.relu(repvgg(g, x, 8))
    result = fold_and_compare(g.model([y]))
    assert op_types(result.model) == ["Relu", "Conv", "Relu"]
    conv = result.model.graph.node[1]
    assert conv.output[0] == g.nodes[-2].output[0]  # the sum's output name is kept
    [record] = result.report.merged_branches
    assert record.branches == 3 and len(record.convs) == 2
    assert sorted(r.direction for r in result.report.folded if r.op_type == "BatchNormalization") == \
        ["backward", "backward", "branches"]


def test_strided_repvgg_block_without_identity():
    g = GraphBuilder()
    x = g.input("x", [1, 4, 9, 9])
    result = fold_and_compare(g.model([g.relu(repvgg(g, x, 4, stride=2, identity=False))]))
    assert op_types(result.model) == ["Conv", "Relu"]


def test_mobileone_block_with_scale_branch_and_depthwise_convs():
    g = GraphBuilder()
    x = g.relu(g.input("x", [1, 6, 8, 8]))
    branches = [g.bn(g.conv(x, 6, 6, kernel=3, group=6, pads=[1] * 4, bias=False), 6) for _ in range(3)]
    branches.append(g.bn(g.conv(x, 6, 6, kernel=1, group=6, bias=False), 6))  # the scale branch
    branches.append(g.bn(x, 6))
    y = g.relu(g.node("Sum", branches))
    result = fold_and_compare(g.model([y]))
    assert op_types(result.model) == ["Relu", "Conv", "Relu"]
    assert result.report.merged_branches[0].branches == 5


def test_acnet_asymmetric_kernels_merge_into_the_square_one():
    g = GraphBuilder()
    x = g.input("x", [1, 4, 7, 7])
    square = g.bn(g.conv(x, 4, 4, kernel=3, pads=[1] * 4), 4)
    row = g.bn(g.conv(x, 4, 4, kernel=(1, 3), pads=[0, 1, 0, 1]), 4)
    column = g.bn(g.conv(x, 4, 4, kernel=(3, 1), pads=[1, 0, 1, 0]), 4)
    result = fold_and_compare(g.model([g.node("Add", [g.node("Add", [square, row]), column])]))
    assert op_types(result.model) == ["Conv"]


def test_fastvit_repmixer():
    """x + s * (mixer(x) - norm(x)), mixer = BN(DWConv3x3(x)) + BN(x), s a per-channel layer scale."""
    g = GraphBuilder()
    x = g.relu(g.input("x", [1, 8, 6, 6]))
    mixer = g.node("Add", [g.bn(g.conv(x, 8, 8, kernel=3, group=8, pads=[1] * 4, bias=False), 8), g.bn(x, 8)])
    scaled = g.node("Mul", [g.node("Sub", [mixer, g.bn(x, 8)]), g.const(np.full((8, 1, 1), 1e-2) * g.rng.uniform(1, 3, (8, 1, 1)))])
    y = g.relu(g.node("Add", [x, scaled]))
    result = fold_and_compare(g.model([y]))
    assert op_types(result.model) == ["Relu", "Conv", "Relu"]
    assert sum(r.op_type == "BatchNormalization" for r in result.report.folded) == 3


@pytest.mark.parametrize("identity_first", [True, False])
def test_sub_order_is_kept(identity_first):
    g = GraphBuilder()
    x = g.relu(g.input("x", [1, 4, 5, 5]))
    conv, norm = g.bn(g.conv(x, 4, 4, kernel=3, pads=[1] * 4), 4), g.bn(x, 4)
    y = g.node("Sub", [norm, conv] if identity_first else [conv, norm])
    result = fold_and_compare(g.model([y]))
    assert op_types(result.model) == ["Relu", "Conv"]


def test_same_upper_at_stride_one_merges():
    g = GraphBuilder()
    x = g.input("x", [1, 4, 6, 6])
    a = g.conv(x, 4, 4, kernel=4, auto_pad="SAME_UPPER")  # even kernel: the extra pad goes at the end
    b = g.conv(x, 4, 4, kernel=1, auto_pad="SAME_UPPER")
    result = fold_and_compare(g.model([g.node("Add", [a, b])]))
    assert op_types(result.model) == ["Conv"]


def test_shifted_but_exact_paddings_merge_into_the_union_of_taps():
    """pads (1,1) and (0,2) read o-1..o+1 and o..o+2 with the same output size: one 4-tap kernel."""
    g = GraphBuilder()
    x = g.input("x", [1, 2, 6, 6])
    a = g.conv(x, 2, 2, kernel=3, pads=[1, 1, 1, 1])
    b = g.conv(x, 2, 2, kernel=3, pads=[0, 0, 2, 2])
    result = fold_and_compare(g.model([g.node("Add", [a, b])]))
    assert [n.op_type for n in result.model.graph.node] == ["Conv"]
    weight = next(t for t in result.model.graph.initializer if t.dims[-1] == 4)
    assert list(weight.dims) == [2, 2, 4, 4]


def test_conv1d_and_dilated_branches():
    g = GraphBuilder()
    x = g.input("x", [1, 3, 12])
    a = g.bn(g.conv(x, 3, 3, kernel=3, dims=1, pads=[2, 2], dilations=[2]), 3)
    b = g.bn(g.conv(x, 3, 3, kernel=1, dims=1), 3)
    result = fold_and_compare(g.model([g.node("Add", [g.node("Add", [a, b]), g.bn(x, 3)])]))
    assert op_types(result.model) == ["Conv"]


def test_float16_block_is_rounded_once():
    g = GraphBuilder(dtype=np.float16)
    x = g.input("x", [1, 4, 6, 6])
    result = bnfold.fold(g.model([repvgg(g, x, 4)]))
    assert op_types(result.model) == ["Conv"]
    assert all(t.max_ulp_error <= 1.0 for t in result.report.verification.tensors)


def test_no_merge_branches_keeps_the_identity_bn():
    g = GraphBuilder()
    x = g.relu(g.input("x", [1, 4, 6, 6]))
    model = g.model([repvgg(g, x, 4)])
    result = bnfold.fold(model, merge_branches=False)
    assert op_types(result.model).count("BatchNormalization") == 1
    assert not result.report.merged_branches
    assert result.report.skipped[0].reason.value == "no_foldable_neighbour"


def test_cli_flag_json_record_and_check(tmp_path):
    g = GraphBuilder()
    x = g.relu(g.input("x", [1, 4, 6, 6]))
    path, plain = tmp_path / "rep.onnx", tmp_path / "plain.onnx"
    onnx.save(g.model([repvgg(g, x, 4)]), path)
    g = GraphBuilder()
    x = g.relu(g.input("x", [1, 4, 6, 6]))
    a, b = g.conv(x, 4, 4, kernel=3, pads=[1] * 4), g.conv(x, 4, 4, kernel=1)  # BNs already folded
    onnx.save(g.model([g.node("Add", [g.node("Add", [a, b]), g.bn(x, 4)])]), plain)
    assert invoke(["check", plain]).exit_code == 1  # the block (and its identity BN) is foldable
    assert invoke(["check", "--no-merge-branches", plain]).exit_code == 0  # the identity BN has no layer
    out = tmp_path / "out.onnx"
    result = invoke(["fold", path, "-o", out, "--json"])
    assert result.exit_code == 0
    data = json.loads(result.stdout)
    [record] = data["merged_branches"]
    assert record["branches"] == 3 and len(record["convs"]) == 2
    assert invoke(["check", out]).exit_code == 0
    text = invoke(["fold", path, "-o", tmp_path / "b.onnx"]).stdout
    assert "merged 3 branches into Conv" in text
    kept = invoke(["fold", path, "-o", tmp_path / "c.onnx", "--no-merge-branches", "--json"])
    assert json.loads(kept.stdout)["ops_after"]["BatchNormalization"] == 1


def test_analytic_check_covers_the_merged_kernel(monkeypatch):
    """A merged weight off by a few ulps (outputs still within tolerance) fails the analytic check."""
    import bnfold.branch_merge as branch_merge

    real = branch_merge.round_to_dtype
    monkeypatch.setattr(branch_merge, "round_to_dtype", lambda values, dtype: real(values * (1 + 1e-6), dtype))
    g = GraphBuilder()
    x = g.relu(g.input("x", [1, 4, 6, 6]))
    with pytest.raises(VerificationError) as error:
        bnfold.fold(g.model([repvgg(g, x, 4)]))
    failed = [t for t in error.value.report.verification.tensors if not t.passed]
    assert {t.tensor.split("_bnfold_merged_")[1] for t in failed} == {"weight", "bias"}
    assert error.value.report.verification.runtime_status == "passed"


def test_json_with_merges_and_branch_refusals_matches_the_schema(tmp_path):
    pytest.importorskip("jsonschema")
    from test_json_schema import run_json

    g = GraphBuilder()
    x = g.relu(g.input("x", [1, 4, 6, 6]))
    merged = repvgg(g, x, 4)
    z = g.input("z", [1, 4, 6, 6])
    other = g.node("Add", [g.conv(x, 4, 4, kernel=3, pads=[1] * 4), g.bn(z, 4)])  # the BN reads another tensor
    path = tmp_path / "m.onnx"
    onnx.save(g.model([merged, other]), path)
    data = run_json(["fold", path, "-o", tmp_path / "o.onnx"], 0)
    assert [r["branches"] for r in data["merged_branches"]] == [3]
    assert [r["reason"] for r in data["skipped"]] == ["branch_not_linear"]
    assert "branches" in {r["direction"] for r in data["folded"]}


@pytest.mark.parametrize("bn_first", [True, False])
def test_identity_minus_its_bn_in_both_orders(bn_first):
    """conv(x) + (x - BN(x)) and conv(x) + (BN(x) - x): a sign error in either order changes outputs."""
    g = GraphBuilder()
    x = g.relu(g.input("x", [1, 4, 5, 5]))
    norm = g.bn(x, 4)
    difference = g.node("Sub", [norm, x] if bn_first else [x, norm])
    y = g.node("Add", [g.conv(x, 4, 4, kernel=3, pads=[1] * 4), difference])
    result = fold_and_compare(g.model([y]))
    assert op_types(result.model) == ["Relu", "Conv"]
