"""Tiny models shared by the tests/test_attack_*.py files: a Conv -> BatchNormalization pair with
random weights (the smallest model bnfold folds), and its parts."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def bn_initializers(rng: np.random.Generator, channels: int, names=("g", "b", "m", "v")) -> list[onnx.TensorProto]:
    """Scale, bias, mean and variance (positive) of a BatchNormalization over `channels`."""
    values = (rng.uniform(0.5, 2, channels), rng.normal(size=channels), rng.normal(size=channels),
              rng.uniform(0.5, 2, channels))
    return [numpy_helper.from_array(v.astype(np.float32), name) for name, v in zip(names, values)]


def conv_bn_model(channels: int = 4, kernel: int = 1, size: int = 4, **conv_attrs) -> onnx.ModelProto:
    """x [1, C, size, size] -> Conv(w: [C, C, k, k]) -> BatchNormalization(g, b, m, v) -> y."""
    rng = np.random.default_rng(0)
    weight = rng.normal(size=(channels, channels, kernel, kernel)).astype(np.float32)
    out = size - kernel + 1 if not conv_attrs else None
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["c"], **conv_attrs),
         helper.make_node("BatchNormalization", ["c", "g", "b", "m", "v"], ["y"])],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, channels, size, size])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, channels, out, out] if out else [None] * 4)],
        [numpy_helper.from_array(weight, "w"), *bn_initializers(rng, channels)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model
