"""bnfold's modules import each other without a cycle.

The graph is built from each module's top-level `import` / `from ... import` statements, including
those under `if TYPE_CHECKING:` (a cycle hidden there is still a cycle: the modules cannot be
understood, tested or split apart one without the other) and under `try` / `if` blocks. Imports
inside functions are left out: they run late on purpose (e.g. onnx's reference evaluator, or the
checker's helpers, only when needed). A submodule is not counted as importing its package
`bnfold/__init__.py`: Python does that for every submodule, no module chooses it.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "bnfold"

# (importer, imported) edges allowed to close a cycle, each with its reason. Keep it empty.
KNOWN_EDGES: dict[tuple[str, str], str] = {}


def _module_names() -> dict[str, Path]:
    modules = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


def _top_level_imports(statements: list[ast.stmt]) -> list[ast.Import | ast.ImportFrom]:
    """Import statements run when the module is imported: at top level, or inside top-level `if`
    (TYPE_CHECKING included), `try` and `with` blocks; never inside a function or class body."""
    found: list[ast.Import | ast.ImportFrom] = []
    for statement in statements:
        if isinstance(statement, (ast.Import, ast.ImportFrom)):
            found.append(statement)
        elif isinstance(statement, (ast.If, ast.With)):
            found += _top_level_imports(statement.body) + _top_level_imports(getattr(statement, "orelse", []))
        elif isinstance(statement, ast.Try):
            found += _top_level_imports(statement.body + statement.orelse + statement.finalbody)
            for handler in statement.handlers:
                found += _top_level_imports(handler.body)
    return found


def _imported_modules(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    imported: set[str] = set()
    for statement in _top_level_imports(ast.parse(path.read_text()).body):
        if isinstance(statement, ast.Import):
            imported.update(alias.name for alias in statement.names)
            continue
        base = statement.module or ""
        if statement.level:  # a relative import: `from .x import y`
            anchor = package.split(".")[: len(package.split(".")) - statement.level + 1]
            base = ".".join(anchor + ([statement.module] if statement.module else []))
        for alias in statement.names:  # `from bnfold import walk` imports the submodule bnfold.walk
            submodule = f"{base}.{alias.name}"
            imported.add(submodule if submodule in modules else base)
    return {module for module in imported if module in modules and module != name}


def import_graph() -> dict[str, set[str]]:
    modules = _module_names()
    return {name: _imported_modules(name, path, modules) for name, path in modules.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle (as a path of modules) through each strongly connected group of modules."""
    cycles, state = [], {}  # state: 1 = on the current path, 2 = done

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for imported in sorted(graph[module]):
            if state.get(imported) == 1:
                cycles.append(path[path.index(imported):] + [imported])
            elif imported not in state:
                visit(imported, path + [imported])
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    return cycles


def test_the_graph_sees_type_checking_imports() -> None:
    """The parser must not miss the imports that matter most here (else the test proves nothing)."""
    graph = import_graph()

    assert "bnfold.report" in graph["bnfold.errors"]  # under `if TYPE_CHECKING:` only
    assert "bnfold.constants" in graph["bnfold.graph"]  # `from bnfold import constants as computed`
    assert "bnfold.walk" in graph["bnfold.tensors"]
    assert len(graph) > 40


def test_bnfold_imports_have_no_cycle() -> None:
    graph = import_graph()
    for importer, imported in KNOWN_EDGES:
        graph[importer].discard(imported)

    assert _cycles(graph) == []


def test_known_edges_are_still_imports() -> None:
    """An allowed edge that no module takes any more is removed from KNOWN_EDGES."""
    graph = import_graph()

    assert [edge for edge in KNOWN_EDGES if edge[1] not in graph.get(edge[0], set())] == []


def test_the_walker_and_the_proto_readers_import_nothing_from_bnfold() -> None:
    """Every module may import them: they must stay leaves."""
    graph = import_graph()

    assert graph["bnfold.walk"] == set()
    assert graph["bnfold.protos"] == set()


def test_the_cycle_finder_finds_a_cycle() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}

    assert _cycles(graph) == [["a", "b", "c", "a"]]
