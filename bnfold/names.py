"""Fresh names for the tensors and nodes a fold creates, unique across every scope of the model."""

from __future__ import annotations

import onnx

from bnfold.graph import function_graph, has_subgraphs, subgraphs_of


class NameRegistry:
    """Every name used anywhere in the model, so new names never collide across scopes."""

    def __init__(self, model: onnx.ModelProto) -> None:
        self._model = model
        self._used: set[str] | None = None  # collected on first use: most folds need no new name

    @property
    def used(self) -> set[str]:
        if self._used is None:
            self._used = set()
            self._collect(self._model.graph, self._used)
            for function in self._model.functions:  # folds inside functions need fresh names there too
                self._collect(function_graph(function), self._used)
        return self._used

    def _collect(self, graph: onnx.GraphProto, used: set[str]) -> None:
        used.update(t.name for t in graph.initializer)
        used.update(v.name for v in graph.input)
        for node in graph.node:  # every node of the model: kept to plain set updates
            used.update(node.input)
            used.update(node.output)
            used.add(node.name)
            if has_subgraphs(node):
                for body in subgraphs_of(node):
                    self._collect(body, used)

    def fresh(self, base: str) -> str:
        name, counter = base, 0
        while name in self.used:
            counter += 1
            name = f"{base}_{counter}"
        self.used.add(name)
        return name
