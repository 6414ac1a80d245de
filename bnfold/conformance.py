"""Deviations from the ONNX spec that onnxruntime accepts, and how bnfold repairs them in its output.

IR < 4 requires every initializer of the main graph to be listed as a graph input too. Several
exports (and onnxruntime's own test models, e.g. `fuse-conv-bn-no-bias.onnx`) leave some out; the
checker refuses them, onnxruntime loads them: in IR < 4 an initializer is a constant whether it is
listed or not (only IR >= 4 lets a listed one be overridden). bnfold accepts such a model, records
it as a repair in the report, and writes the missing listings: the IR version and the meaning of every initializer
stay what they were. Raising the IR version to 4 instead would not: every initializer the model
does list would become an input a caller may override, which is no longer a constant to fold.
"""

from __future__ import annotations

import onnx

from bnfold.report import Repair

# Where the checker's own rule ends: from IR 4 on an initializer need not be a graph input.
LISTED_INITIALIZERS_BELOW_IR = 4


INITIALIZER_NOT_GRAPH_INPUT = "initializer_not_graph_input"


def unlisted_initializers(model: onnx.ModelProto) -> list[onnx.TensorProto]:
    """The main graph's initializers an IR < 4 model fails to list among its graph inputs."""
    if model.ir_version >= LISTED_INITIALIZERS_BELOW_IR:
        return []
    listed = {value.name for value in model.graph.input}
    return [tensor for tensor in model.graph.initializer if tensor.name not in listed]


def list_initializers_as_inputs(model: onnx.ModelProto, tensors: list[onnx.TensorProto]) -> None:
    """Append a graph input of each tensor's type and dims (as IR < 4 requires) to `model`."""
    model.graph.input.extend(
        onnx.helper.make_tensor_value_info(tensor.name, tensor.data_type, list(tensor.dims)) for tensor in tensors
    )


def repair(model: onnx.ModelProto) -> list[Repair]:
    """Repair what `unlisted_initializers` finds in `model` (which the caller owns); what was repaired."""
    missing = unlisted_initializers(model)
    if not missing:
        return []
    list_initializers_as_inputs(model, missing)
    names = ", ".join(f"'{tensor.name}'" for tensor in missing[:3]) + (", ..." if len(missing) > 3 else "")
    return [Repair(INITIALIZER_NOT_GRAPH_INPUT,
                    f"IR {model.ir_version} model: {len(missing)} initializer(s) not listed as graph inputs ({names}), "
                    "as IR < 4 requires; onnxruntime treats them as constants, and the output lists them")]
