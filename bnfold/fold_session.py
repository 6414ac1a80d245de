"""What one fold of a model remembers across passes and scopes: the records for the report, the
provenance for the analytic check, the original parameters of folded layers, and which tensors
earlier passes wrote. Passes read and extend it; only `bnfold.edits.PassEdits` edits the graph.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import onnx

from bnfold.constants import EvaluatedConstant
from bnfold.graph import names_used_inside
from bnfold.names import NameRegistry
from bnfold.provenance import BranchProvenance, LayerProvenance, OriginalLayer
from bnfold.report import FoldedRecord, MergedBranchesRecord, SkippedRecord
from bnfold.rules.affine_ops import AffineOp
from bnfold.shapes import infer_value_infos
from bnfold.tensors import TensorStore

RecordKey = tuple[str, str]  # (scope, output name of the folded layer or merged node)


@dataclass
class RewriteLog:
    """What the rewrite did to a model: the report's records, and the evidence the analytic check
    recomputes (kept only with verification)."""

    folded: list[FoldedRecord] = field(default_factory=list)
    skipped: list[SkippedRecord] = field(default_factory=list)
    merged_branches: list[MergedBranchesRecord] = field(default_factory=list)
    provenance: list[LayerProvenance | BranchProvenance] = field(default_factory=list)
    evaluated: list[EvaluatedConstant] = field(default_factory=list)
    passes: int = 0


def trained_names(model: onnx.ModelProto) -> frozenset[str]:
    """Every name the model's training_info binds or reads (its algorithm and initialization
    graphs run against the main graph's initializers and values)."""
    names: set[str] = set()
    for info in model.training_info:
        for binding in [*info.initialization_binding, *info.update_binding]:
            names.update((binding.key, binding.value))
        for part in (info.initialization, info.algorithm):
            names |= names_used_inside(part)
    return frozenset(names)


class FoldSession:
    def __init__(self, model: onnx.ModelProto, opset: int, keep_provenance: bool, store: TensorStore | None,
                 merge_branches: bool = True) -> None:
        self.model = model
        self.opset = opset  # of the scope being folded (a function body may import another)
        self.store = store  # where new tensor data goes; None: into the proto
        self.keep_provenance = keep_provenance
        self.merge_branches = merge_branches
        self.names = NameRegistry(model)
        self.trained_names = trained_names(model)
        self.log = RewriteLog()
        self._value_infos: dict[str, dict] | None = None
        self.evaluated_names: set[RecordKey] = set()  # (scope, name): never overwritten in place
        self.outer_values_unread: set[str] = set()  # values of enclosing scopes a subgraph fold stopped reading
        self.created_biases: set[RecordKey] = set()  # outputs of the bias Adds folds wrote: not the user's maps
        # Only kept with verification (they hold the original weights of folded layers).
        self.originals: dict[RecordKey, OriginalLayer] = {}
        self.provenance: dict[RecordKey, LayerProvenance | BranchProvenance] = {}
        self.checked_by: dict[str, RecordKey] = {}  # tensor name -> the provenance record that checks it
        self.joined_records: dict[RecordKey, FoldedRecord] = {}

    @property
    def value_infos(self) -> dict[str, dict]:
        """Shapes of every scope, inferred once, when a rule first asks for one."""
        if self._value_infos is None:
            self._value_infos = infer_value_infos(self.model)
        return self._value_infos

    def inferred_scope(self, scope: str) -> dict | None:
        """The shapes inferred for `scope`, if inference has run (never runs it)."""
        return None if self._value_infos is None else self._value_infos.get(scope)


def folded_record(op: AffineOp, into: list[str], direction: str, scope: str, became: str = "") -> FoldedRecord:
    return FoldedRecord(op.node.name or op.output, op.node.op_type, op.output, into, direction, scope, became)
