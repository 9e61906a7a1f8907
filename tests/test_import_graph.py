"""DESIGN.md's import rules, checked on the source: no import cycles among the project's modules,
and imports run one way between its packages.

Every `import` statement counts -- at module level, inside functions (a lazy import that dodges a
cycle is still a cycle: it only moves the failure from start-up to the first call) and inside
`try` blocks -- except those under `if TYPE_CHECKING:`, which never run. Parsed with `ast`, so the
test imports nothing it checks and runs in well under a second.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("pipeline", "train", "filters", "embed")

# Cycles known to exist in files another change owns: {members (sorted): whose files, and why it
# stays for now}. Empty: there are none. The test fails once a listed cycle is gone, so an entry
# cannot outlive its cycle.
KNOWN_CYCLES: dict[tuple[str, ...], str] = {}


def module_files() -> dict[str, Path]:
    """{dotted module name: path} for every .py file in PACKAGES (a package is its __init__)."""
    out = {}
    for pkg in PACKAGES:
        for path in sorted((REPO / pkg).rglob("*.py")):
            parts = path.relative_to(REPO).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = path
    return out


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def imported_names(tree: ast.AST, module: str, is_package: bool) -> list[tuple[str, int]]:
    """(dotted name, line) for every name an import statement in `tree` can load: `import a.b`
    gives a.b; `from a.b import c` gives a.b.c and a.b (c may be a submodule or an attribute)."""
    found = []

    def visit(node):
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.extend((alias.name, node.lineno) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against this module's package
                pkg = module.split(".") if is_package else module.split(".")[:-1]
                pkg = pkg[: len(pkg) - (node.level - 1)]
                base = ".".join(pkg + ([base] if base else []))
            found.append((base, node.lineno))
            found.extend((f"{base}.{alias.name}", node.lineno) for alias in node.names)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def import_graph() -> dict[str, dict[str, int]]:
    """{module: {project module it imports: first line}}; an imported name maps to the longest
    project module that is a prefix of it (`from train.sample import Stage` -> train.sample)."""
    files = module_files()
    graph: dict[str, dict[str, int]] = {}
    for module, path in files.items():
        edges: dict[str, int] = {}
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for name, line in imported_names(tree, module, path.name == "__init__.py"):
            parts = name.split(".")
            for n in range(len(parts), 0, -1):
                target = ".".join(parts[:n])
                if target in files:
                    if target != module:
                        edges.setdefault(target, line)
                    break
        graph[module] = edges
    return graph


def cycles(graph: dict[str, dict[str, int]]) -> list[tuple[tuple[str, ...], list[str]]]:
    """(members, one cycle through them as a path back to its start) for every strongly connected
    component of more than one module (Tarjan), sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def strongconnect(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                strongconnect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                components.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            strongconnect(v)

    out = []
    for comp in sorted(components):
        members = set(comp)
        # A shortest path back to the first member, through the component (BFS).
        start, prev, frontier = comp[0], {}, [comp[0]]
        while frontier and start not in prev:
            nxt = []
            for v in frontier:
                for w in sorted(graph[v]):
                    if w in members and w not in prev:
                        prev[w] = v
                        nxt.append(w)
            frontier = nxt
        path, v = [start], prev[start]
        while v != start:
            path.append(v)
            v = prev[v]
        out.append((tuple(comp), [start, *reversed(path[1:]), start]))
    return out


def _describe(graph, members: tuple[str, ...], cycle: list[str]) -> str:
    path = " -> ".join(f"{a} (line {graph[a][b]})" for a, b in zip(cycle, cycle[1:])) + f" -> {cycle[-1]}"
    return f"{', '.join(members)}: e.g. {path}"


def test_graph_sees_function_level_and_from_imports():
    tree = ast.parse(
        "import a.b\n"
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    import never\n"
        "def f():\n    from train.sample import Stage\n"
        "try:\n    from . import sibling\nexcept ImportError:\n    pass\n"
    )
    names = {n for n, _ in imported_names(tree, "train.cli", is_package=False)}
    assert {"a.b", "train.sample", "train.sample.Stage", "train", "train.sibling"} <= names
    assert "never" not in names
    g = {"a": {"b": 1}, "b": {"c": 2}, "c": {"a": 3}, "d": {"a": 4}}
    assert cycles(g) == [(("a", "b", "c"), ["a", "b", "c", "a"])]
    assert cycles({"a": {"b": 1}, "b": {}}) == []


def test_no_import_cycles():
    graph = import_graph()
    assert {"train.cli", "train.sample", "train.trainer", "pipeline.cli"} <= set(graph)
    found = dict(cycles(graph))
    unexpected = [_describe(graph, key, c) for key, c in found.items() if key not in KNOWN_CYCLES]
    assert not unexpected, "import cycles:\n" + "\n".join(unexpected)
    gone = [key for key in KNOWN_CYCLES if key not in found]
    assert not gone, f"KNOWN_CYCLES lists cycles that no longer exist: {gone}"


@pytest.mark.parametrize("package, forbidden", [
    ("filters", ("pipeline", "train")),
    ("embed", ("pipeline", "train")),
    ("train", ("pipeline", "filters", "embed")),
])
def test_imports_run_one_way(package, forbidden):
    """DESIGN.md: filters/ and embed/ import nothing from pipeline/ or train/; train/ reads the
    shards as any outside reader would and imports nothing from the other three."""
    graph = import_graph()
    bad = sorted(f"{m} imports {t} (line {line})" for m, edges in graph.items()
                 if m.split(".")[0] == package for t, line in edges.items() if t.split(".")[0] in forbidden)
    assert not bad, "\n".join(bad)
