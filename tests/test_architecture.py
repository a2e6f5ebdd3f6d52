"""The shape of `src/ia3`, checked from its source: the import graph has no cycle, the server and the recipe do not
import each other, no private name crosses a module boundary, and no function is longer than 100 lines."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
MAX_FUNCTION_LINES = 100


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


MODULES = {_module_name(p): p for p in sorted((SRC / "ia3").rglob("*.py"))}
TREES = {name: ast.parse(path.read_text(encoding="utf-8"), str(path)) for name, path in MODULES.items()}


def _imports(name: str) -> list[tuple[str, str | None, int]]:
    """`(imported ia3 module, imported name or None, line)` for every import in module `name`, at any depth
    (function-level imports included: a lazy import still makes a dependency)."""
    package = name if MODULES[name].name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(TREES[name]):
        if isinstance(node, ast.Import):
            found += [(a.name, None, node.lineno) for a in node.names if a.name.split(".")[0] == "ia3"]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative import
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            if base.split(".")[0] != "ia3":
                continue
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                if sub in MODULES:  # `from ia3.serve.routes import native` imports a module
                    found.append((sub, None, node.lineno))
                else:
                    found.append((base, alias.name, node.lineno))
    return found


GRAPH = {name: sorted({m for m, _, _ in _imports(name) if m in MODULES and m != name}) for name in MODULES}


def _cycles(graph: dict[str, list[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each a cycle of imports."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_the_checker_sees_imports():
    """The walk finds module-level, function-level and `from package import module` imports."""
    assert "ia3.tasks" in GRAPH["ia3.serve.engine"]
    assert "ia3.serve.routes.native" in GRAPH["ia3.serve.app"]
    assert "ia3.families" in GRAPH["ia3.tasks"]
    assert _cycles({"a": ["b"], "b": ["c"], "c": ["a"], "d": ["a"]}) == [["a", "b", "c"]]
    assert _cycles({"a": ["b"], "b": []}) == []


def test_no_import_cycle():
    assert _cycles(GRAPH) == []


@pytest.mark.parametrize(("importer", "forbidden"), [("ia3.serve", "ia3.recipe"), ("ia3.recipe", "ia3.serve")])
def test_serve_and_recipe_stand_beside_each_other(importer, forbidden):
    crossing = [
        f"{name} -> {target}"
        for name, targets in GRAPH.items()
        if name == importer or name.startswith(importer + ".")
        for target in targets
        if target == forbidden or target.startswith(forbidden + ".")
    ]
    assert crossing == []


def test_the_core_imports_neither_recipe_nor_serve():
    core = [
        n for n in MODULES if not n.startswith(("ia3.recipe", "ia3.serve")) and n not in ("ia3.cli", "ia3.__main__")
    ]
    crossing = [f"{n} -> {t}" for n in core for t in GRAPH[n] if t.startswith(("ia3.recipe", "ia3.serve"))]
    assert crossing == []


def test_no_private_name_crosses_a_module():
    private = [
        f"{name}:{line} imports {target}.{imported}"
        for name in MODULES
        for target, imported, line in _imports(name)
        if imported and imported.startswith("_") and not imported.startswith("__") and target != name
    ]
    assert private == []


def test_no_function_longer_than_100_lines():
    long = [
        f"{name}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1} lines)"
        for name, tree in TREES.items()
        for node in ast.walk(tree)
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
        and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES
    ]
    assert long == []
