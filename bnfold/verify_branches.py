"""Analytic check of merged branch sums: each merged Conv's weight and bias recomputed in float64
from the ORIGINAL parameters of its branch Convs (with the BNs and maps folded into them, as for any
folded layer), the maps inside the sum re-derived by running their original nodes in onnx's
reference evaluator (`bnfold.affine_probe`), then summed by `bnfold.branch_math` and compared in ulps.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx

from bnfold.affine_probe import probe_affines, probe_spec
from bnfold.branch_math import ConvBranch, evaluate, magnitude
from bnfold.errors import first_line
from bnfold.provenance import BranchProvenance
from bnfold.report import TensorCheck
from bnfold.rules.branches import conv_branch
from bnfold.rules.refusal import Refusal
from bnfold.tensors import TensorStore
from bnfold.verify import _expected_parameters, ulp_error


def branch_checks(records: Sequence[BranchProvenance], tensors: dict[tuple[str, str], onnx.TensorProto],
                  store: TensorStore) -> list[TensorCheck]:
    checks = []
    for record in records:
        layer_name = record.output
        try:
            expected, magnitude_of_terms = _expected(record)
        except Exception as error:  # noqa: BLE001 - never a traceback, never a pass
            why = f"not recomputed: {type(error).__name__}: {first_line(error)}"
            checks.extend(TensorCheck(name, layer_name, float("inf"), False, why[:200]) for name in record.written)
            continue
        for name, values in zip(record.written, expected):
            written = tensors.get((record.scope, name))
            error = float("inf") if written is None else ulp_error(store.read(written), values, magnitude_of_terms)
            checks.append(TensorCheck(name, layer_name, error, error <= 1.0))
    return checks


def _expected(record: BranchProvenance) -> tuple[list[np.ndarray], float]:
    """The merged [weight, bias] in float64, and the magnitude of the terms summed into them."""
    branches: dict[str, ConvBranch] = {}
    for (name, conv), expected in zip(record.convs.items(), _expected_parameters(list(record.convs.values()))):
        if isinstance(expected, Exception):
            raise expected
        weight, bias = expected.params[0], (expected.params[1] if len(expected.params) > 1 else None)
        branch = conv_branch(conv.layer_node, weight, bias)
        if isinstance(branch, Refusal):
            raise ValueError(branch.detail)
        branches[name] = branch
    names = list(record.affine_nodes)
    specs = [probe_spec([record.affine_nodes[name]], record.constants, record.rank) for name in names]
    affines = dict(zip(names, probe_affines(specs)))
    term = evaluate(record.expr, branches.__getitem__, affines.__getitem__)
    return [term.weight, term.bias], magnitude(record.expr, branches.__getitem__, affines.__getitem__)
