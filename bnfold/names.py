"""Fresh names for the tensors and nodes a fold creates, unique across every scope of the model."""

from __future__ import annotations

import onnx

from bnfold.walk import iter_scopes


class NameRegistry:
    """Every name used anywhere in the model, so new names never collide across scopes."""

    def __init__(self, model: onnx.ModelProto) -> None:
        self._model = model
        self._used: set[str] | None = None  # collected on first use: most folds need no new name

    @property
    def used(self) -> set[str]:
        if self._used is None:
            used: set[str] = set()
            for _, body in iter_scopes(self._model):  # folds inside functions need fresh names there too
                if isinstance(body, onnx.GraphProto):
                    used.update(t.name for t in body.initializer)
                    used.update(s.values.name for s in body.sparse_initializer)
                    used.update(v.name for v in body.input)
                else:
                    used.update(body.input)  # a function's formal inputs
                for node in body.node:  # every node of the model: kept to plain set updates
                    used.update(node.input)
                    used.update(node.output)
                    used.add(node.name)
            self._used = used
        return self._used

    def fresh(self, base: str) -> str:
        name, counter = base, 0
        while name in self.used:
            counter += 1
            name = f"{base}_{counter}"
        self.used.add(name)
        return name
