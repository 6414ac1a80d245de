"""branch_math: sums of Conv / identity branches as one Conv, against a direct float64 evaluation of
each branch (a plain numpy convolution) summed, on random geometries."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bnfold.branch_math import (
    Branch,
    Combined,
    ConvBranch,
    GeometryMismatch,
    IdentityTerm,
    KernelTerm,
    Mapped,
    evaluate,
    magnitude,
)
from bnfold.fold_math import ChannelAffine


def conv_reference(x: np.ndarray, branch: ConvBranch) -> np.ndarray:
    """Conv of x [N, C, *spatial] by the ONNX definition, in float64: zero padding, then taps."""
    weight = branch.weight
    spatial = weight.ndim - 2
    begin, end = branch.pads[:spatial], branch.pads[spatial:]
    padded = np.pad(x, [(0, 0), (0, 0)] + list(zip(begin, end)))
    kernel = weight.shape[2:]
    sizes = [(padded.shape[2 + a] - (kernel[a] - 1) * branch.dilations[a] - 1) // branch.strides[a] + 1
             for a in range(spatial)]
    out_channels, in_per_group = weight.shape[:2]
    out_per_group = out_channels // branch.group
    y = np.zeros((x.shape[0], out_channels, *sizes))
    for tap in np.ndindex(*kernel):
        window = tuple(slice(t * d, t * d + (n - 1) * s + 1, s)
                       for t, d, n, s in zip(tap, branch.dilations, sizes, branch.strides))
        for g in range(branch.group):
            xs = padded[(slice(None), slice(g * in_per_group, (g + 1) * in_per_group)) + window]
            ws = weight[(slice(g * out_per_group, (g + 1) * out_per_group), slice(None)) + tap]
            y[:, g * out_per_group:(g + 1) * out_per_group] += np.einsum("oc,nc...->no...", ws, xs)
    if branch.bias is not None:
        y += branch.bias.reshape((1, -1) + (1,) * spatial)
    return y


def term_as_branch(term: KernelTerm) -> ConvBranch:
    return ConvBranch(term.weight, term.bias, term.group, term.strides, term.dilations, tuple(term.pads))


@st.composite
def block(draw):
    """A random 2-D block of Conv branches with compatible geometry, maybe with an identity branch."""
    group = draw(st.sampled_from([1, 2, 4]))
    channels = 4
    stride = draw(st.sampled_from([1, 2]))
    dilation = draw(st.sampled_from([1, 2]))
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    big = draw(st.sampled_from([3, 5]))
    half = (big - 1) * dilation // 2
    branches = []
    for kh, kw in draw(st.lists(st.sampled_from([(big, big), (1, 1), (1, big), (big, 1)]), min_size=1, max_size=3)):
        # each kernel centred: pad = the big kernel's pad minus the centre offset, per axis
        ph, pw = half - (big - kh) * dilation // 2, half - (big - kw) * dilation // 2
        weight = rng.normal(size=(channels, channels // group, kh, kw))
        branches.append(ConvBranch(weight, rng.normal(size=channels), group, (stride,) * 2, (dilation,) * 2,
                                   (ph, pw, ph, pw)))
    identity = stride == 1 and draw(st.booleans())
    return branches, identity, rng


@given(block())
@settings(max_examples=60, deadline=None)
def test_merged_branches_equal_the_sum_of_branch_convolutions(case):
    branches, identity, rng = case
    names = [f"c{i}" for i in range(len(branches))]
    affines = {f"a{i}": ChannelAffine(rng.uniform(0.5, 2, 4), rng.normal(size=4)) for i in range(len(branches) + 1)}
    children = [Mapped(Branch(name), f"a{i}") for i, name in enumerate(names)]
    signs = [1] * len(children)
    if identity:
        children.append(Mapped(Branch(None), f"a{len(branches)}"))
        signs.append(-1)  # a Sub: the identity branch subtracted
    expr = Combined(tuple(children), tuple(signs))
    term = evaluate(expr, dict(zip(names, branches)).__getitem__, affines.__getitem__)
    x = rng.normal(size=(2, 4, 9, 8))
    expected = sum(conv_reference(x, b) * a.scale.reshape(1, -1, 1, 1) + a.shift.reshape(1, -1, 1, 1)
                   for b, a in zip(branches, affines.values()))
    if identity:
        last = affines[f"a{len(branches)}"]
        expected = expected - (x * last.scale.reshape(1, -1, 1, 1) + last.shift.reshape(1, -1, 1, 1))
    np.testing.assert_allclose(conv_reference(x, term_as_branch(term)), expected, rtol=1e-10, atol=1e-10)


def test_one_by_one_lands_in_the_centre_of_three_by_three():
    three = ConvBranch(np.zeros((1, 1, 3, 3)), None, 1, (1, 1), (1, 1), (1, 1, 1, 1))
    one = ConvBranch(np.ones((1, 1, 1, 1)), np.array([2.0]), 1, (1, 1), (1, 1), (0, 0, 0, 0))
    term = evaluate(Combined((Branch("a"), Branch("b")), (1, 1)), {"a": three, "b": one}.__getitem__, None)
    assert term.weight[0, 0].tolist() == [[0, 0, 0], [0, 1, 0], [0, 0, 0]]
    assert term.pads == [1, 1, 1, 1] and term.bias.tolist() == [2.0]


def test_identity_is_a_delta_per_channel_in_every_group():
    conv = ConvBranch(np.zeros((4, 2, 1, 1)), None, 2, (1, 1), (1, 1), (0, 0, 0, 0))
    term = evaluate(Combined((Branch("a"), Branch(None)), (1, 1)), {"a": conv}.__getitem__, None)
    # output o sits in group o // 2, whose inputs are 2g, 2g+1: input o is column o % 2
    assert term.weight[:, :, 0, 0].tolist() == [[1, 0], [0, 1], [1, 0], [0, 1]]


def _mismatch(first: ConvBranch, second: ConvBranch) -> str:
    with pytest.raises(GeometryMismatch) as error:
        evaluate(Combined((Branch("a"), Branch("b")), (1, 1)), {"a": first, "b": second}.__getitem__, None)
    return str(error.value)


def _conv(kernel, pads, stride=1, dilation=1, group=1, c_in=4, c_out=4):
    return ConvBranch(np.ones((c_out, c_in // group, *kernel)), None, group, (stride,) * 2, (dilation,) * 2, pads)


def test_mismatched_geometries_are_refused():
    assert "strides" in _mismatch(_conv((3, 3), (1, 1, 1, 1)), _conv((1, 1), (0, 0, 0, 0), stride=2))
    assert "output sizes" in _mismatch(_conv((3, 3), (1, 1, 1, 1)), _conv((1, 1), (1, 1, 1, 1)))
    assert "channel layouts" in _mismatch(_conv((3, 3), (1, 1, 1, 1)), _conv((1, 1), (0, 0, 0, 0), group=2))
    assert "dilations" in _mismatch(_conv((3, 3), (2, 2, 2, 2), dilation=2), _conv((3, 3), (1, 1, 1, 1)))
    # taps at -2, 0, 2 and at -1, 1: same output size, but no kernel of dilation 2 holds both
    assert "align" in _mismatch(_conv((3, 3), (2, 2, 2, 2), dilation=2), _conv((2, 2), (1, 1, 1, 1), dilation=2))


def test_identity_needs_as_many_inputs_as_outputs():
    conv = ConvBranch(np.ones((4, 1, 1, 1)), None, 1, (1, 1), (1, 1), (0, 0, 0, 0))
    with pytest.raises(GeometryMismatch, match="as many input as output"):
        evaluate(Combined((Branch("a"), Branch(None)), (1, 1)), {"a": conv}.__getitem__, None)


def test_identity_needs_stride_one():
    conv = _conv((1, 1), (0, 0, 0, 0), stride=2)
    with pytest.raises(GeometryMismatch, match="strides"):
        evaluate(Combined((Branch("a"), Branch(None)), (1, 1)), {"a": conv}.__getitem__, None)


def test_identity_only_sum_stays_an_identity_term():
    term = evaluate(Combined((Branch(None), Branch(None)), (1, -1)), None, None)
    assert isinstance(term, IdentityTerm) and term.scale.tolist() == [0.0]


def test_magnitude_bounds_the_cancelled_terms():
    a = ConvBranch(np.ones((1, 1, 1, 1)), np.array([1e6]), 1, (1, 1), (1, 1), (0, 0, 0, 0))
    b = ConvBranch(np.ones((1, 1, 1, 1)), np.array([1e6]), 1, (1, 1), (1, 1), (0, 0, 0, 0))
    expr = Combined((Branch("a"), Branch("b")), (1, -1))
    term = evaluate(expr, {"a": a, "b": b}.__getitem__, None)
    assert term.bias.tolist() == [0.0]
    assert magnitude(expr, {"a": a, "b": b}.__getitem__, None) == 2e6
