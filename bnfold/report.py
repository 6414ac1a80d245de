"""What bnfold decided and measured: reason codes, per-BN records, op counts, verification results.

Every line a user sees about a BN (text, JSON, Markdown) is rendered from these records; the engine
never prints.
"""

from __future__ import annotations

import enum
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

import onnx

from bnfold.walk import iter_scopes

JSON_SCHEMA_VERSION = 1


class Reason(str, enum.Enum):
    """Stable reason codes for a BN (or affine op) that was left in the model."""

    TRAINING_MODE = "training_mode"  # training_mode=1: batch statistics, not an affine map
    EXTRA_OUTPUTS = "extra_outputs"  # running mean/var outputs are consumed or declared
    NOT_SPATIAL = "not_spatial"  # BN-1..7 spatial=0: statistics per element, not per channel
    PARAMS_NOT_CONSTANT = "params_not_constant"  # scale/B/mean/var computed or fed at run time
    INVALID_PARAMS = "invalid_params"  # NaN / Inf, var + eps <= 0, wrong length
    UNSUPPORTED_DTYPE = "unsupported_dtype"  # not float16/bfloat16/float/double
    NO_FOLDABLE_NEIGHBOUR = "no_foldable_neighbour"  # producer and consumers are not foldable layers
    PRODUCER_HAS_OTHER_CONSUMERS = "producer_has_other_consumers"
    PRODUCER_IS_GRAPH_OUTPUT = "producer_is_graph_output"
    WEIGHT_NOT_CONSTANT = "weight_not_constant"
    CHANNEL_AXIS_MISMATCH = "channel_axis_mismatch"  # e.g. BN (axis 1) after a rank-3 MatMul
    UNKNOWN_SHAPE = "unknown_shape"
    CHANNEL_COUNT_MISMATCH = "channel_count_mismatch"
    PADDED_CONSUMER = "padded_consumer"  # forward fold into a Conv with zero padding is not exact
    CONSUMER_NOT_FOLDABLE = "consumer_not_foldable"
    OUTPUT_IS_GRAPH_OUTPUT = "output_is_graph_output"  # forward fold would delete a graph output
    UNSUPPORTED_ATTRIBUTE = "unsupported_attribute"  # e.g. Gemm transA=1 for a forward fold
    # Branches summed into one Conv (RepVGG-style) that cannot be merged exactly:
    BRANCH_GEOMETRY_MISMATCH = "branch_geometry_mismatch"  # stride/dilation/group/padding/channels differ
    BRANCH_INTERMEDIATE_READ = "branch_intermediate_read"  # a branch's value is also read elsewhere
    BRANCH_NOT_LINEAR = "branch_not_linear"  # a branch is not a linear map of the shared input
    WEIGHT_ON_LEFT = "weight_on_left"  # MatMul(W, x) / Gemm(A=W, B=x): the constant is the left operand
    NO_GAIN = "no_gain"  # foldable, but folding would remove no node (a rank-3 MatMul's bias Add)


# What each reason means, for users: docs/rules.md's reason table is generated from this
# (`python docs/generate_reason_table.py`), and a test keeps the two, the JSON schema and the
# README in agreement.
REASON_MEANINGS: dict[Reason, str] = {
    Reason.TRAINING_MODE: "`training_mode=1` on activations: batch statistics, not an affine map — never folded "
                          "(a training-mode BN of a *constant* is evaluated instead)",
    Reason.EXTRA_OUTPUTS: "running mean/var outputs are produced and read",
    Reason.NOT_SPATIAL: "BN-1..7 with `spatial=0` (statistics per element)",
    Reason.PARAMS_NOT_CONSTANT: "scale/B/mean/var are computed or fed at run time (includes IR ≥ 4 initializers that "
                                "are also graph inputs, which callers may override, inputs of a model-local "
                                "function, and initializers the model's training_info updates)",
    Reason.INVALID_PARAMS: "NaN/Inf, `var + eps ≤ 0`, parameters of different lengths, or folded parameters that "
                           "would overflow the layer's dtype",
    Reason.UNSUPPORTED_DTYPE: "weights or parameters that are not float16/bfloat16/float/double",
    Reason.NO_FOLDABLE_NEIGHBOUR: "neither the producer nor the consumers are foldable layers",
    Reason.PRODUCER_HAS_OTHER_CONSUMERS: "the layer's output (or a value on the way to the map) is also read for its "
                                         "numbers elsewhere: folding would change that reader (readers of only its "
                                         "shape or dtype — Shape, Size, EyeLike, CastLike's type input — do not count)",
    Reason.PRODUCER_IS_GRAPH_OUTPUT: "the layer's output is a graph output",
    Reason.WEIGHT_NOT_CONSTANT: "the layer's weight or bias (or Gemm's C) is not a constant, nor computed from "
                                "constants and the inputs' declared types and static dims",
    Reason.CHANNEL_AXIS_MISMATCH: "the map acts on another axis than the layer's channels — e.g. BN (axis 1) after a "
                                  "MatMul with a rank-3 output `[B, T, C]`, even when T == C; a `[C]`-shaped constant "
                                  "on NCHW (it broadcasts over W); layout nodes that mix the channels",
    Reason.UNKNOWN_SHAPE: "a rank or dim the rule needs is not fixed by the declared graph inputs and constants "
                          "(value_info is never taken as evidence)",
    Reason.CHANNEL_COUNT_MISMATCH: "the map's length differs from the layer's channel count",
    Reason.PADDED_CONSUMER: "forward fold of a map with a shift into a Conv with zero padding: the padding sees 0, "
                            "not the shift, so the fold would not be exact",
    Reason.CONSUMER_NOT_FOLDABLE: "some consumer of the map is not a layer that can absorb it (a shift before a "
                                  "ConvTranspose included: it does not reach every output position equally)",
    Reason.OUTPUT_IS_GRAPH_OUTPUT: "a forward fold would delete a graph output",
    Reason.UNSUPPORTED_ATTRIBUTE: "e.g. forward fold into Gemm with `transA=1`; a function body whose attributes "
                                  "come from its callers",
    Reason.BRANCH_GEOMETRY_MISMATCH: "branches summed into one Conv differ in stride, dilation, group layout, "
                                     "padding/output size or channel count: no single Conv computes the sum",
    Reason.BRANCH_INTERMEDIATE_READ: "a value inside a sum of branches (a branch Conv's or BN's output, a partial "
                                     "sum) is also read elsewhere",
    Reason.BRANCH_NOT_LINEAR: "a branch of a sum reads another tensor or holds a non-linear op",
    Reason.WEIGHT_ON_LEFT: "MatMul(W, x) / Gemm(A=W, B=x): the constant is the left operand; only x·W folds",
    Reason.NO_GAIN: "the map could fold but no node would go (shifts after a MatMul on a rank-3 input stay its bias "
                    "Add)",
}


@dataclass(frozen=True)
class FoldedRecord:
    """One BN (or per-channel Mul/Add/Sub/Div) removed from the model."""

    node: str  # node name, or its output name when the node is unnamed
    op_type: str
    output: str
    into: list[str]  # the layer node(s) that absorbed it; for "evaluated", the initializer now holding its value
    # "backward" (into the producer) | "forward" (into consumers) | "merged" (into one BN) |
    # "branches" (a map inside a sum of branches merged into one Conv) | "evaluated" (a
    # training-mode BN of a constant, replaced by its value)
    direction: str
    graph: str = "main"  # the graph scope (subgraph path) it lived in
    became: str = ""  # the op type the layer became when the fold changed it (a MatMul now a Gemm)


@dataclass(frozen=True)
class MergedBranchesRecord:
    """Linear branches reading one tensor, summed into one Conv (RepVGG-style re-parameterization)."""

    node: str  # the merged Conv's name (that of the largest branch Conv), or its output name
    output: str  # the sum's output name, which the merged Conv keeps
    branches: int  # Conv and identity branches merged
    convs: list[str]  # the branch Conv nodes
    removed: list[str]  # the other nodes that went: maps (BN, Mul, ...) and sums (Add, Sub, Sum)
    graph: str = "main"


@dataclass(frozen=True)
class SkippedRecord:
    """One BN left in the model, or a per-channel Mul/Add/Sub/Div by a constant left next to a layer,
    with a stable reason code and a human explanation."""

    node: str
    op_type: str
    output: str
    reason: Reason
    detail: str
    graph: str = "main"


@dataclass(frozen=True)
class Repair:
    """Something in the input that breaks the ONNX spec but that onnxruntime accepts: bnfold accepted
    it and repaired it in its output. `code` is stable (see `bnfold.conformance`)."""

    code: str
    detail: str


@dataclass(frozen=True)
class TensorCheck:
    """Analytic check of one written weight/bias against its float64 recomputation."""

    tensor: str
    layer: str
    max_ulp_error: float
    passed: bool
    error: str = ""  # why it could not be recomputed (then it fails)


@dataclass(frozen=True)
class OutputCheck:
    """One graph output compared between the original and folded model in onnxruntime."""

    name: str
    max_abs_error: float
    max_rel_error: float  # max |a - b| / max |reference|
    atol: float
    rtol: float
    mismatches: int
    elements: int
    passed: bool  # every element within tolerance, and at least one finite reference value compared
    compared: int = 0  # finite reference values compared (all elements for integer/bool tensors)
    note: str = ""  # why it failed beyond the numbers, e.g. "no finite reference values compared"
    # Set when the values differ but the output is downstream of a discontinuous op (TopK, NMS,
    # a comparison, ...) and every folded tensor and every other output matched: names that op.
    not_comparable: str = ""


@dataclass
class Verification:
    """Everything verification computed; `passed` is True only if every check ran and passed."""

    checker_passed: bool = False
    checker_message: str = ""
    tensors: list[TensorCheck] = field(default_factory=list)
    outputs: list[OutputCheck] = field(default_factory=list)
    runtime_status: str = "not run"  # "passed" | "failed" | "not run: <why>"
    runtime_engine: str = "onnxruntime"  # or "onnx reference evaluator (<why onnxruntime could not>)"
    seed: int = 0
    seeds: list[int] = field(default_factory=list)  # one per random batch; empty for user data
    input_shapes: dict[str, list[int]] = field(default_factory=dict)
    input_source: str = "random"  # "random" (seeded) | "user" (the --inputs arrays)
    samples: int = 0  # input batches compared
    # Folded-layer tensors compared between the two models in the same onnxruntime runs.
    intermediate_tensors: list[OutputCheck] = field(default_factory=list)
    timeout: float | None = None  # seconds onnxruntime was given

    @property
    def analytic_passed(self) -> bool:
        return all(check.passed for check in self.tensors)

    @property
    def passed(self) -> bool:
        return self.checker_passed and self.analytic_passed and self.runtime_status == "passed"

    def failures(self) -> list[str]:
        """One line per failed check, for error messages."""
        lines = [] if self.checker_passed else [f"onnx checker: {self.checker_message}"]
        lines += [f"tensor {t.tensor} ({t.layer}) " + (t.error or f"off by {t.max_ulp_error:.3g} ulp")
                  for t in self.tensors if not t.passed]
        lines += [_check_failure("output", o) for o in self.outputs if not o.passed and not o.not_comparable]
        lines += [_check_failure("tensor", t) for t in self.intermediate_tensors if not t.passed]
        if self.runtime_status.startswith("could not run"):
            lines.append(f"verification {self.runtime_status}")
        elif self.runtime_status not in ("passed", "failed"):
            lines.append(f"onnxruntime comparison {self.runtime_status}")
        return lines


def _check_failure(kind: str, check: OutputCheck) -> str:
    if check.note:
        return f"{kind} {check.name}: {check.note}"
    return (f"{kind} {check.name}: {check.mismatches}/{check.elements} elements outside atol={check.atol:g} "
            f"rtol={check.rtol:g} (max abs error {check.max_abs_error:.3g})")


def op_counts(model: onnx.ModelProto) -> dict[str, int]:
    """Op type histogram of the main graph, every subgraph and every model-local function body."""
    counts: Counter[str] = Counter()
    for _, body in iter_scopes(model):
        counts.update(node.op_type for node in body.node)
    return dict(sorted(counts.items()))


@dataclass
class Report:
    """The outcome of one `fold` call."""

    input_path: str | None = None
    output_path: str | None = None
    folded: list[FoldedRecord] = field(default_factory=list)
    skipped: list[SkippedRecord] = field(default_factory=list)
    merged_branches: list[MergedBranchesRecord] = field(default_factory=list)
    ops_before: dict[str, int] = field(default_factory=dict)
    ops_after: dict[str, int] = field(default_factory=dict)
    verification: Verification | None = None
    passes: int = 0
    repairs: list[Repair] = field(default_factory=list)  # spec deviations of the input, repaired in the output

    @property
    def passed(self) -> bool:
        """True when verification ran and passed, or was switched off on purpose."""
        return self.verification is None or self.verification.passed

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["schema_version"] = JSON_SCHEMA_VERSION
        data["passed"] = self.passed
        data["verified"] = self.verification is not None
        if self.verification is not None:
            data["verification"]["passed"] = self.verification.passed
        for record in data["skipped"]:
            record["reason"] = Reason(record["reason"]).value
        return data
