"""Conv / ConvTranspose attributes the operator spec requires to be positive.

onnx.checker lets `group=0`, `strides=[0, 0]` or `dilations=[0, 0]` through; onnxruntime refuses them
at run time, and fold arithmetic would divide by them. A layer with such an attribute is left alone,
with a reason, before any of its numbers are used.
"""

from __future__ import annotations

import onnx

from bnfold.protos import attribute
from bnfold.report import Reason
from bnfold.rules.refusal import Refusal

POSITIVE_INTS = ("group", "strides", "dilations", "kernel_shape")


def invalid_attribute(node: onnx.NodeProto) -> Refusal | None:
    """Why the node's integer attributes break the spec (each must be >= 1), or None."""
    for name in POSITIVE_INTS:
        value = attribute(node, name, None)
        values = [value] if isinstance(value, int) else list(value or [])
        if any(v < 1 for v in values):
            return Refusal(Reason.UNSUPPORTED_ATTRIBUTE, f"{node.op_type} '{node.name or node.output[0]}' has "
                           f"{name}={value}: the operator spec requires values >= 1")
    pads = attribute(node, "pads", None)
    if pads is not None and any(p < 0 for p in pads):
        return Refusal(Reason.UNSUPPORTED_ATTRIBUTE, f"{node.op_type} '{node.name or node.output[0]}' has "
                       f"pads={list(pads)}: negative padding")
    return None
