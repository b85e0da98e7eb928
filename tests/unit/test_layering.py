"""The packages' one-way arrows (ARCHITECTURE.md, "Layers"), read from the source:

    core  ◀──  streams  ◀──  projections  ◀──  app  ──▶  devserver

A package imports only those to its left (and itself): the framework (`core`,
`streams`, `projections`) never imports the application (`app`), `streams` never
imports `projections`, the dev tooling never imports the application, and no
module imports, however indirectly, one that imports it (no cycle). Every import
statement counts, also one inside a function or under `TYPE_CHECKING`.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("core", "streams", "projections", "app", "devserver")
MAY_IMPORT = {
    "core": {"core"},
    "streams": {"core", "streams"},
    "projections": {"core", "streams", "projections"},
    "app": {"core", "streams", "projections", "app", "devserver"},
    "devserver": {"devserver"},
}


def modules() -> dict[str, Path]:
    """Every module of Eddy's packages, by dotted name."""
    found: dict[str, Path] = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            found[name] = path
    return found


def imports(name: str, path: Path, known: dict[str, Path]) -> Iterator[str]:
    """The modules of Eddy's packages that module `name` imports, anywhere in it."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the package, `level - 1` packages up
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            # `from pkg import module` imports the module; `from module import name` the module
            targets = [
                f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names
            ]
        else:
            continue
        for target in targets:
            if target.split(".")[0] in PACKAGES:
                yield target


def graph() -> dict[str, set[str]]:
    known = modules()
    return {
        name: {t for t in imports(name, path, known) if t != name} for name, path in known.items()
    }


def test_each_package_imports_only_the_layers_below_it() -> None:
    wrong = sorted(
        f"{module} imports {target}"
        for module, targets in graph().items()
        for target in targets
        if target.split(".")[0] not in MAY_IMPORT[module.split(".")[0]]
    )
    assert wrong == []


def test_no_module_imports_itself_through_others() -> None:
    edges = graph()
    cycles = [component for component in strongly_connected(edges) if len(component) > 1]
    assert cycles == []


def test_the_guard_sees_what_it_guards() -> None:
    """The two tests above fail on what they forbid: the reading finds imports inside
    functions and relative ones, and the cycle search finds a cycle."""
    tree = graph()
    assert "core.errors" in tree["core.messages"]
    assert "app.web" in tree["app.runtime"]  # imported inside `web_process`
    assert strongly_connected({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [
        ["a", "b", "c"],
        ["d"],
    ]


def strongly_connected(edges: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's strongly connected components of a directed graph, each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(edges.get(node, ())):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            components.append(sorted(component))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return sorted(components)
