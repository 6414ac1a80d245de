"""Folding inside model-local functions (`ModelProto.functions`).

A function body is folded like a graph scope of its own, with one difference in what counts as a
constant: its formal inputs are values of each call, so only what the body itself fixes (Constant
nodes, and constant subgraphs of them) can be folded. The body is folded as a graph (its inputs as
graph inputs, its outputs as graph outputs); the parameters a fold writes, which a graph would keep
as initializers, become Constant nodes at the start of the body.

A body that takes attributes from its callers (`ref_attr_name`) is not folded at all: there a node's
attribute (a Constant's value, a BN's epsilon, a Conv's group) is whatever each call passes. Its BNs
are still reported, each with a reason code.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Protocol

import onnx

from bnfold.graph import GraphIndex, function_graph
from bnfold.report import Reason, SkippedRecord
from bnfold.walk import function_scope, iter_nodes

if TYPE_CHECKING:  # pragma: no cover
    from bnfold.fold_session import FoldSession


class ScopeFolder(Protocol):
    """What folding a function body needs of `bnfold.rewrite.Rewriter` (which calls this module, so
    the module names the interface rather than importing the class)."""

    session: FoldSession

    def fold_graph(self, graph: onnx.GraphProto, scope: str, outer: GraphIndex | None,
                   input_kind: str = "graph input") -> None: ...


def fold_function(rewriter: ScopeFolder, function: onnx.FunctionProto) -> None:
    """Fold inside `function` (part of the rewriter's model, edited in place) with its passes."""
    scope = function_scope(function)
    session = rewriter.session
    if references_attributes(function.node):
        session.log.skipped.extend(_attribute_refusals(function, scope))
        return
    body = function_graph(function)
    model_opset, store = session.opset, session.store
    session.opset = next((o.version for o in function.opset_import if o.domain in ("", "ai.onnx")), model_opset)
    session.store = None  # no initializers to defer: new tensors go into Constant nodes, in the proto
    try:
        rewriter.fold_graph(body, scope, None, input_kind=f"input of function '{function.name}' (a value of each call)")
    finally:
        session.opset, session.store = model_opset, store
    constants = [onnx.helper.make_node("Constant", [], [tensor.name], value=tensor) for tensor in body.initializer]
    del function.node[:]
    function.node.extend(constants + list(body.node))


def _attribute_refusals(function: onnx.FunctionProto, scope: str) -> Iterator[SkippedRecord]:
    detail = (f"function '{function.name}' takes attributes from its callers (ref_attr_name): its body has no "
              "fixed values to fold")
    for node in iter_nodes(function.node):
        if node.op_type == "BatchNormalization" and node.domain in ("", "ai.onnx") and node.output:
            yield SkippedRecord(node.name or node.output[0], node.op_type, node.output[0],
                                Reason.UNSUPPORTED_ATTRIBUTE, detail, scope)


def references_attributes(nodes: Iterable[onnx.NodeProto]) -> bool:
    """Does any node (or subgraph node) take an attribute from its function's caller (`ref_attr_name`)?
    Such an attribute has no value in the body: it is whatever each call passes."""
    return any(attr.ref_attr_name for node in iter_nodes(nodes) for attr in node.attribute)
