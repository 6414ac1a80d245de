import numpy as np
from helpers import op_types, random_feeds, run

import bnfold
from benchmarks.graph_builder import GraphBuilder


def test_conv_bn_folds_and_matches():
    g = GraphBuilder()
    x = g.input("x", [2, 3, 8, 8])
    y = g.bn(g.conv(x, 3, 4, pads=[1, 1, 1, 1]), 4)
    model = g.model([y])
    result = bnfold.fold(model)
    assert op_types(result.model) == ["Conv"]
    feeds = random_feeds(model)
    np.testing.assert_allclose(run(result.model, feeds)[0], run(model, feeds)[0], rtol=1e-5, atol=1e-6)
