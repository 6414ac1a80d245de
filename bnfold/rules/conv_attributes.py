"""Conv / ConvTranspose attributes the operator spec requires to be positive.

onnx.checker lets `group=0`, `strides=[0, 0]` or `dilations=[0, 0]` through; onnxruntime refuses them
at run time, and fold arithmetic would divide by them. A layer with such an attribute is left alone,
with a reason, before any of its numbers are used.
"""

from __future__ import annotations

import onnx

from bnfold.report import Reason
from bnfold.rules.refusal import Refusal

POSITIVE_INTS = frozenset({"group", "strides", "dilations", "kernel_shape"})


def invalid_attribute(node: onnx.NodeProto) -> Refusal | None:
    """Why the node's integer attributes break the spec (each must be >= 1), or None."""
    for attr in node.attribute:  # one pass: this runs for every layer a rule looks at
        if attr.name in POSITIVE_INTS:
            values = [attr.i] if attr.type == onnx.AttributeProto.INT else list(attr.ints)
            value = values[0] if attr.type == onnx.AttributeProto.INT else values
            if any(v < 1 for v in values):
                return Refusal(Reason.UNSUPPORTED_ATTRIBUTE, f"{node.op_type} '{node.name or node.output[0]}' has "
                               f"{attr.name}={value}: the operator spec requires values >= 1")
        elif attr.name == "pads" and any(p < 0 for p in attr.ints):
            return Refusal(Reason.UNSUPPORTED_ATTRIBUTE, f"{node.op_type} '{node.name or node.output[0]}' has "
                           f"pads={list(attr.ints)}: negative padding")
    return None
