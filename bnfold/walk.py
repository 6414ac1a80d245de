"""Where the graphs, nodes and tensors of a model are: the one walk over its scopes.

A model computes in several graph scopes: the main graph, the bodies of If / Loop / Scan (graph
attributes of nodes, nested to any depth) and the bodies of model-local functions (with subgraphs of
their own). Tensors sit in initializers, in the values and indices of sparse initializers, in
tensor-valued node attributes (a Constant's `value`, any op's TENSOR(S) / SPARSE_TENSOR(S)
attribute), in the default attribute values of a function, and in the training-info graphs.

Every module that needs "all scopes" or "all tensors" asks here, so a new place a graph or tensor can
hide is taught to bnfold once. `bnfold.model_io._scan_model` is the one other walk: it must visit
every message anyway (to check each string is UTF-8), and tests/test_walk.py checks the tensors it
finds are the ones `iter_tensors` finds.

This module imports nothing from bnfold, so anything may import it.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Iterator

import onnx

MAIN_SCOPE = "main"
FUNCTION_SCOPE_PREFIX = "function:"

# A scope's body: a graph, or a function (which has nodes, inputs and outputs but no initializers).
ScopeBody = onnx.GraphProto | onnx.FunctionProto

# Default-domain ops with graph attributes; nodes of other domains are always inspected.
_SUBGRAPH_OPS = frozenset({"If", "Loop", "Scan", "SequenceMap"})
_DEFAULT_DOMAINS = ("", "ai.onnx")
_GRAPH_KINDS = (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
_TENSOR_KINDS = frozenset({onnx.AttributeProto.TENSOR, onnx.AttributeProto.TENSORS,
                           onnx.AttributeProto.SPARSE_TENSOR, onnx.AttributeProto.SPARSE_TENSORS})


def has_subgraphs(node: onnx.NodeProto) -> bool:
    """Cheap pre-test: only these ops (or custom-domain ones) can carry graph attributes."""
    return node.op_type in _SUBGRAPH_OPS or node.domain not in _DEFAULT_DOMAINS


def subgraphs_of(node: onnx.NodeProto) -> Iterator[onnx.GraphProto]:
    """The bodies of If / Loop / Scan (and any other graph-valued attribute) of one node."""
    if not has_subgraphs(node):
        return
    for attribute in node.attribute:
        if attribute.type == onnx.AttributeProto.GRAPH:
            yield attribute.g
        elif attribute.type == onnx.AttributeProto.GRAPHS:
            yield from attribute.graphs


def scoped_subgraphs(body: ScopeBody, scope: str) -> Iterator[tuple[str, onnx.GraphProto]]:
    """The subgraphs of `body`'s own nodes (not deeper), each with a path naming its scope, e.g.
    `main/loop.body`, `main/if.then_branch`, `main/seq.graphs[1]`."""
    for path, graph, _ in subgraphs_with_owners(body, scope):
        yield path, graph


def subgraphs_with_owners(body: ScopeBody, scope: str) -> Iterator[tuple[str, onnx.GraphProto, onnx.NodeProto]]:
    """`scoped_subgraphs`, each with the node whose attribute holds it.

    The owner is the node's name (else its first output). Names may repeat, or equal another node's
    output, so a repeated owner gets `@<first output>` (outputs are unique): two bodies must never
    share a path, because shapes and provenance are looked up by it.
    """
    owners = [(node, node.name or (node.output[0] if node.output else node.op_type))
              for node in body.node if has_subgraphs(node)]
    if not owners:
        return
    counts = Counter(owner for _, owner in owners)
    for node, owner in owners:
        if counts[owner] > 1:
            owner = f"{owner}@{node.output[0] if node.output else id(node)}"
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield f"{scope}/{owner}.{attr.name}", attr.g, node
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for position, graph in enumerate(attr.graphs):
                    yield f"{scope}/{owner}.{attr.name}[{position}]", graph, node


def sees_callers_scope(node: onnx.NodeProto) -> bool:
    """Whether the graphs in `node`'s attributes run in the scope of the graph holding `node`, as
    the bodies of If / Loop / Scan / SequenceMap do by the ONNX spec. A graph given to any other op
    — a call of a model-local function (where it runs inside the function body, whose names differ),
    a custom op — has no outer scope bnfold can know."""
    return node.op_type in _SUBGRAPH_OPS and node.domain in _DEFAULT_DOMAINS


def function_scope(function: onnx.FunctionProto) -> str:
    """The scope path of a model-local function body, e.g. `function:custom:Block` (its identity
    is domain, name and, from IR 10, overload)."""
    overload = f":{function.overload}" if function.overload else ""
    return f"{FUNCTION_SCOPE_PREFIX}{function.domain}:{function.name}{overload}"


def iter_scopes(source: onnx.ModelProto | ScopeBody, scope: str | None = None, *,
                training_info: bool = False) -> Iterator[tuple[str, ScopeBody]]:
    """Every graph scope of `source` as (scope path, body), each scope before the ones nested in it.

    A model: the main graph (`main`) and its subgraphs, then each model-local function body
    (`function:<domain>:<name>`) and its subgraphs. With `training_info`, also the training-info
    graphs (`training_info[<i>].initialization` / `.algorithm`): they say how to train the model,
    not what it computes, so only walks that must see every tensor ask for them.
    A graph or a function: itself (named `scope`, by default `main` or the function's scope) and
    the subgraphs nested in it.
    """
    roots: list[tuple[str, ScopeBody]]
    if isinstance(source, onnx.ModelProto):
        roots = [(MAIN_SCOPE, source.graph)]
        roots += [(function_scope(function), function) for function in source.functions]
        if training_info:
            for position, info in enumerate(source.training_info):
                roots += [(f"training_info[{position}].{part}", getattr(info, part))
                          for part in ("initialization", "algorithm") if info.HasField(part)]
    elif isinstance(source, onnx.FunctionProto):
        roots = [(scope or function_scope(source), source)]
    else:
        roots = [(scope or MAIN_SCOPE, source)]
    pending = roots[::-1]  # a stack: popped in order, children pushed reversed (depth first)
    while pending:
        path, body = pending.pop()
        yield path, body
        children = list(scoped_subgraphs(body, path))
        pending.extend(reversed(children))


def iter_nodes(nodes: Iterable[onnx.NodeProto]) -> Iterator[onnx.NodeProto]:
    """`nodes` and every node of their subgraphs, at any depth; each node before the nodes inside
    it, and those before the node that follows it (the order a reader of the graph meets them)."""
    pending: list[Iterator[onnx.NodeProto]] = [iter(nodes)]
    while pending:
        node = next(pending[-1], None)
        if node is None:
            pending.pop()
            continue
        yield node
        if has_subgraphs(node):
            for body in reversed(list(subgraphs_of(node))):
                pending.append(iter(body.node))


def iter_tensors(source: onnx.ModelProto | ScopeBody, *,
                 main_initializers: bool = True) -> Iterator[onnx.TensorProto]:
    """Every TensorProto of `source`, in every scope (training-info graphs included): initializers,
    the values and indices of sparse initializers, tensors in node attributes (TENSOR, TENSORS,
    SPARSE_TENSOR, SPARSE_TENSORS) and in a function's default attribute values.

    `main_initializers=False` leaves out the main graph's own initializers, which the writer
    streams itself (`bnfold.serialize`): everything else it serialises as it is."""
    for path, body in iter_scopes(source, training_info=True):
        if isinstance(body, onnx.GraphProto):
            if main_initializers or path != MAIN_SCOPE:
                yield from body.initializer
            for sparse in body.sparse_initializer:
                yield from _sparse_parts(sparse)
        else:
            for default in body.attribute_proto:
                yield from _attribute_tensors(default)
                if default.type in _GRAPH_KINDS:  # a default body is no scope until a call uses it
                    for graph in (default.g,) if default.type == onnx.AttributeProto.GRAPH else default.graphs:
                        yield from iter_tensors(graph)
        for node in body.node:  # every node of the model: a plain loop, one type test per attribute
            for attr in node.attribute:
                if attr.type in _TENSOR_KINDS:
                    yield from _attribute_tensors(attr)


def _attribute_tensors(attr: onnx.AttributeProto) -> Iterator[onnx.TensorProto]:
    kind = attr.type
    if kind == onnx.AttributeProto.TENSOR:
        yield attr.t
    elif kind == onnx.AttributeProto.TENSORS:
        yield from attr.tensors
    elif kind == onnx.AttributeProto.SPARSE_TENSOR:
        yield from _sparse_parts(attr.sparse_tensor)
    elif kind == onnx.AttributeProto.SPARSE_TENSORS:
        for sparse in attr.sparse_tensors:
            yield from _sparse_parts(sparse)


def _sparse_parts(sparse: onnx.SparseTensorProto) -> Iterator[onnx.TensorProto]:
    if sparse.HasField("values"):
        yield sparse.values
    if sparse.HasField("indices"):
        yield sparse.indices
