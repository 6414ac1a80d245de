"""The analytic check's own machinery: recovering affine maps by running the original nodes (stacked
across chains that differ only in their constants) and the batched ulp check of small tensors.

Stacking and batching are optimisations; these tests pin them to the unbatched results.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper

from bnfold.affine_probe import probe_affines, probe_spec
from bnfold.fold_math import bn_affine
from bnfold.verify import _SmallTensorBatch, ulp_error


def bn_chain(rng: np.random.Generator, tag: str, channels: int, epsilon: float = 1e-5):
    names = [f"{tag}_{p}" for p in ("gamma", "beta", "mean", "var")]
    values = [rng.uniform(0.5, 1.5, channels), rng.normal(0, 0.2, channels), rng.normal(0, 0.5, channels),
              rng.uniform(0.25, 1.75, channels)]
    node = helper.make_node("BatchNormalization", [f"{tag}_x", *names], [f"{tag}_y"], epsilon=epsilon)
    return [node], dict(zip(names, values)), values


def mul_add_chain(rng: np.random.Generator, tag: str, scale_shape: tuple, shift_shape: tuple):
    scale, shift = rng.uniform(0.5, 2, scale_shape), rng.normal(0, 1, shift_shape)
    nodes = [helper.make_node("Mul", [f"{tag}_x", f"{tag}_s"], [f"{tag}_m"]),
             helper.make_node("Add", [f"{tag}_t", f"{tag}_m"], [f"{tag}_y"])]  # constant first
    return nodes, {f"{tag}_s": scale, f"{tag}_t": shift}, (scale, shift)


def one_by_one(chains) -> list:
    return [probe_affines([probe_spec(nodes, constants, rank)])[0] for nodes, constants, rank in chains]


def together(chains) -> list:
    return probe_affines([probe_spec(nodes, constants, rank) for nodes, constants, rank in chains])


def assert_same_affines(got: list, want: list) -> None:
    assert len(got) == len(want)
    for a, b in zip(got, want):
        np.testing.assert_array_equal(a.scale, b.scale)
        np.testing.assert_array_equal(a.shift, b.shift)


def test_stacked_bn_chains_match_one_by_one_and_the_bn_formula() -> None:
    rng = np.random.default_rng(0)
    chains, params = [], []
    for i in range(5):
        nodes, constants, values = bn_chain(rng, f"b{i}", 6)
        chains.append((nodes, constants, 4))
        params.append(values)
    stacked = together(chains)
    assert_same_affines(stacked, one_by_one(chains))
    for affine, values in zip(stacked, params):
        expected = bn_affine(*values, eps=1e-5)
        # scale = f(1) - f(0) carries the float64 rounding of f: close, not bit-equal, to the formula
        np.testing.assert_allclose(affine.scale, expected.scale, rtol=1e-12)
        np.testing.assert_allclose(affine.shift, expected.shift, rtol=1e-12, atol=1e-12)


def test_chains_with_different_epsilon_are_not_mixed() -> None:
    rng = np.random.default_rng(1)
    chains = [(*bn_chain(rng, f"b{i}", 3, epsilon=eps)[:2], 4) for i, eps in enumerate([1e-5, 1e-3, 1e-5, 0.5])]
    assert_same_affines(together(chains), one_by_one(chains))


@pytest.mark.parametrize(("scale_shape", "shift_shape", "rank"), [
    ((1, 4, 1, 1), (4, 1, 1), 4),   # per-channel on axis 1 of NCHW
    ((), (1, 4, 1, 1), 4),          # a scalar scale stacked with a per-channel shift
    ((1,), (), 4),                  # scalars only
    ((4,), (1, 4), 2),              # rank 2, last axis
    ((1, 1, 4), (4,), 3),           # rank 3, last axis
])
def test_stacked_mul_add_chains_match_one_by_one(scale_shape: tuple, shift_shape: tuple, rank: int) -> None:
    rng = np.random.default_rng(2)
    chains = [(*mul_add_chain(rng, f"c{i}", scale_shape, shift_shape)[:2], rank) for i in range(4)]
    got = together(chains)
    assert_same_affines(got, one_by_one(chains))
    for (nodes, constants, _), affine in zip(chains, got):
        scale, shift = (constants[n.input[1 if n.op_type == "Mul" else 0]] for n in nodes)
        np.testing.assert_allclose(affine.scale, np.broadcast_to(scale.reshape(-1), affine.scale.shape), rtol=1e-12)
        np.testing.assert_array_equal(affine.shift, np.broadcast_to(shift.reshape(-1), affine.shift.shape))


def test_mixed_groups_keep_their_order() -> None:
    rng = np.random.default_rng(3)
    chains = []
    for i in range(6):
        if i % 2:
            chains.append((*bn_chain(rng, f"b{i}", 5)[:2], 4))
        else:
            chains.append((*mul_add_chain(rng, f"m{i}", (1, 3, 1, 1), (1, 3, 1, 1))[:2], 4))
    specs = [probe_spec(nodes, constants, rank) for nodes, constants, rank in chains]
    got = probe_affines([None, *specs, None])
    assert got[0] is None and got[-1] is None
    assert_same_affines(got[1:-1], one_by_one(chains))


def test_a_constant_varying_along_two_axes_is_never_stacked() -> None:
    from bnfold.affine_probe import _stack

    rng = np.random.default_rng(4)
    specs = [probe_spec([helper.make_node("Mul", [f"x{i}", f"k{i}"], [f"y{i}"])], {f"k{i}": rng.normal(size=(1, 2, 1, 3))}, 4)
             for i in range(3)]
    assert len({spec.key for spec in specs}) == 1
    assert _stack(specs) is None


# --- batched ulp check of small tensors -------------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.float32, np.float16, np.float64])
def test_small_tensor_batch_equals_ulp_error_per_tensor(dtype) -> None:
    rng = np.random.default_rng(5)
    pairs = []
    for size in (1, 7, 64, 0, 300):
        expected = rng.normal(0, 10, size)
        written = expected.astype(dtype)
        if size > 3:
            written[2] = np.nextafter(written[2], np.inf, dtype=dtype)  # exactly one more ulp
            written[3] = np.nextafter(np.nextafter(written[3], -np.inf, dtype=dtype), -np.inf, dtype=dtype)
        pairs.append((written, expected))
    expected_nan = np.array([1.0, np.nan, np.inf]); pairs.append((expected_nan.astype(dtype), expected_nan))
    wrong_inf = np.array([1.0, 2.0]); pairs.append((np.array([1.0, np.inf], dtype), wrong_inf))
    batch = _SmallTensorBatch()
    for position, (written, expected) in enumerate(pairs):
        batch.add(position, written, expected)
    got = dict(batch.errors())
    assert sorted(got) == list(range(len(pairs)))
    for position, (written, expected) in enumerate(pairs):
        assert got[position] == pytest.approx(ulp_error(written, expected), rel=1e-12, abs=0), position
    assert got[len(pairs) - 1] == float("inf") and got[len(pairs) - 2] == 0.0
    assert got[3] == 0.0  # the empty tensor is exact
    if dtype != np.float64:  # (float64 nudges vanish in the recomputation slack of 1e-12 relative)
        assert 1.5 < got[1] <= 2.5  # the two-ulp nudge is seen


def test_small_tensor_batch_is_used_by_the_analytic_check_and_catches_a_wrong_bias() -> None:
    """End to end: a folded bias nudged by 3 ulp in a many-layer model fails, the rest pass."""
    import importlib

    import bnfold

    verify_module = importlib.import_module("bnfold.verify")

    g_nodes, inits = [], []
    rng = np.random.default_rng(6)
    x = "x"
    for i in range(6):
        w = onnx.numpy_helper.from_array(rng.normal(size=(3, 3, 1, 1)).astype(np.float32), f"w{i}")
        params = [rng.uniform(0.5, 1.5, 3), rng.normal(0, 0.2, 3), rng.normal(0, 0.5, 3), rng.uniform(0.5, 1.5, 3)]
        names = [f"bn{i}_{p}" for p in range(4)]
        inits += [w] + [onnx.numpy_helper.from_array(v.astype(np.float32), n) for v, n in zip(params, names)]
        g_nodes += [helper.make_node("Conv", [x, f"w{i}"], [f"c{i}"], name=f"conv{i}"),
                    helper.make_node("BatchNormalization", [f"c{i}", *names], [f"y{i}"], name=f"bn{i}")]
        x = f"y{i}"
    graph = helper.make_graph(g_nodes, "g", [helper.make_tensor_value_info("x", 1, [1, 3, 4, 4])],
                              [helper.make_tensor_value_info(x, 1, [1, 3, 4, 4])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    result = bnfold.fold(model)
    assert all(t.passed for t in result.report.verification.tensors)
    tampered = onnx.ModelProto()
    tampered.CopyFrom(result.model)
    bias = next(t for t in tampered.graph.initializer if "bias" in t.name)
    values = onnx.numpy_helper.to_array(bias).copy()
    for _ in range(3):
        values[1] = np.nextafter(values[1], np.inf, dtype=np.float32)
    bias.CopyFrom(onnx.numpy_helper.from_array(values, bias.name))
    report = verify_module.verify(model, tampered, provenance=_provenance(model), run_onnxruntime=False)
    failed = [t for t in report.tensors if not t.passed]
    assert [t.tensor for t in failed] == [bias.name]
    assert 2.0 < failed[0].max_ulp_error <= 3.5


def _provenance(model: onnx.ModelProto):
    from bnfold.rewrite import fold_model

    working = onnx.ModelProto()
    working.CopyFrom(model)
    return fold_model(working, keep_provenance=True).provenance


@pytest.mark.parametrize("size", [5, 70_000])  # the batched path and the sliced one
def test_equal_infinities_and_nans_are_exact_in_both_paths(size: int) -> None:
    expected = np.linspace(-3, 3, size)
    expected[1], expected[2], expected[3] = np.inf, -np.inf, np.nan
    written = expected.astype(np.float32)
    assert ulp_error(written, expected) <= 0.5
    batch = _SmallTensorBatch()
    batch.add(0, written, expected)
    assert dict(batch.errors())[0] <= 0.5
    written[2] = np.inf  # the wrong infinity
    assert ulp_error(written, expected) == float("inf")


def test_a_layer_with_non_finite_weights_folds_and_verifies() -> None:
    """Inf/NaN weights stay Inf/NaN after scaling; the analytic check used to call them inf ulp off
    (no spacing at Inf), failing a correct fold."""
    import bnfold

    rng = np.random.default_rng(7)
    weight = rng.normal(size=(4, 3, 3, 3)).astype(np.float32)
    weight[1, 0, 0, 0], weight[2, 1, 1, 1] = np.inf, np.nan
    inits = [onnx.numpy_helper.from_array(weight, "w")]
    params = [rng.uniform(0.5, 1.5, 4), rng.normal(0, 0.2, 4), rng.normal(0, 0.5, 4), rng.uniform(0.5, 1.5, 4)]
    inits += [onnx.numpy_helper.from_array(v.astype(np.float32), f"p{i}") for i, v in enumerate(params)]
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("BatchNormalization", ["c", "p0", "p1", "p2", "p3"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", 1, [1, 3, 5, 5])],
                              [helper.make_tensor_value_info("y", 1, [1, 4, 5, 5])], inits)
    result = bnfold.fold(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    verification = result.report.verification
    assert verification.passed and verification.runtime_status == "passed"
    assert [n.op_type for n in result.model.graph.node] == ["Conv"]
    assert max(t.max_ulp_error for t in verification.tensors) <= 0.5
    folded = onnx.numpy_helper.to_array(next(t for t in result.model.graph.initializer if t.name == "w"
                                             or t.name.startswith("w")))
    assert np.isposinf(folded[1, 0, 0, 0]) == (params[0][1] > 0) and np.isnan(folded[2, 1, 1, 1])


def test_an_analytic_check_that_cannot_run_fails_its_tensors_with_the_reason(monkeypatch, tmp_path) -> None:
    """Never a traceback and never a pass: if the float64 recomputation itself raises, every tensor
    it should have checked fails with the reason, and the CLI exits 1 without writing."""
    import importlib

    from helpers import invoke

    import bnfold
    from benchmarks.graph_builder import GraphBuilder

    verify_module = importlib.import_module("bnfold.verify")

    def broken(specs):
        raise RuntimeError("probe exploded")

    monkeypatch.setattr(verify_module, "probe_affines", broken)
    g = GraphBuilder(rng=np.random.default_rng(0))
    y = g.bn(g.conv(g.input("x", [1, 3, 6, 6]), 3, 4, pads=[1, 1, 1, 1]), 4)
    model = g.model([y])
    result = bnfold.fold(model, raise_on_failure=False)
    tensors = result.report.verification.tensors
    assert tensors and all(not t.passed and "probe exploded" in t.error for t in tensors)
    assert not result.report.passed
    assert any("not recomputed" in line for line in result.report.verification.failures())
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    cli = invoke([path, "-o", tmp_path / "out.onnx"])
    assert cli.exit_code == 1 and not (tmp_path / "out.onnx").exists()


def test_folds_in_several_threads_share_the_evaluator_cache_safely() -> None:
    """A pipeline may fold models in threads: the probe cache is shared and locked."""
    from concurrent.futures import ThreadPoolExecutor

    import bnfold
    from benchmarks.graph_builder import GraphBuilder

    def build(seed: int) -> onnx.ModelProto:
        g = GraphBuilder(rng=np.random.default_rng(seed))
        y = g.input("x", [1, 3, 6, 6])
        for _ in range(4):
            y = g.relu(g.bn(g.conv(y, 3, 3, pads=[1, 1, 1, 1]), 3, epsilon=1e-3 * (1 + seed % 3)))
        return g.model([y])

    models = [build(seed) for seed in range(8)]
    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(bnfold.fold, models))
    for result in results:
        assert result.report.passed and len(result.report.folded) == 4
        assert max(t.max_ulp_error for t in result.report.verification.tensors) <= 0.5
