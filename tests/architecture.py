"""The shape of featcache's code, read from its source: every import (inside functions and under
``TYPE_CHECKING`` too), the import cycles, the longest functions, the widest signatures, the longest files.

``python tests/architecture.py`` prints the figures that issue 43 records before and after;
``tests/test_architecture.py`` holds the code to the limits below.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "featcache"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imports_of(path: Path, known: set[str]) -> set[str]:
    """The featcache modules ``path`` imports anywhere in its text (a name imported from a package that is a
    module of it counts as that module), with the packages above each (Python runs them first)."""
    tree = ast.parse(path.read_text())
    own = module_name(path)
    package = own if path.name == "__init__.py" else own.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            # ``from featcache.a import b`` imports the module featcache.a.b when there is one, else featcache.a
            names = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names]
        else:
            continue
        # importing a.b.c runs the packages a.b (and a) first: each is imported too. The top package is left out:
        # its __init__ imports its names on first use only, so it runs nothing of the others
        names += [".".join(name.split(".")[:k]) for name in names for k in range(2, name.count(".") + 1)]
        found.update(name for name in names if name in known and name != own)
    return found


def import_graph() -> dict[str, set[str]]:
    found = modules()
    known = set(found)
    return {name: imports_of(path, known) for name, path in found.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    result: list[list[str]] = []
    counter = [0]
    sys.setrecursionlimit(10_000)

    def visit(node: str) -> None:
        index[node] = low[node] = counter[0]
        counter[0] += 1
        stack.append(node)
        on_stack.add(node)
        for nxt in graph.get(node, ()):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                result.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return result


def functions() -> list[tuple[str, int, int]]:
    """(where, lines, parameters) of every function and method."""
    found = []
    for name, path in modules().items():
        tree = ast.parse(path.read_text())
        owner = {id(item): node.name for node in ast.walk(tree) if isinstance(node, ast.ClassDef) for item in node.body}
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                args = node.args
                count = len(args.posonlyargs) + len(args.args) + len(args.kwonlyargs)
                count -= 1 if args.args and args.args[0].arg in ("self", "cls") else 0
                where = f"{owner[id(node)]}.{node.name}" if id(node) in owner else node.name
                found.append((f"{name}:{where}", node.end_lineno - node.lineno + 1, count))
    return found


def file_lines() -> dict[str, int]:
    return {name: len(path.read_text().splitlines()) for name, path in modules().items()}


def figures() -> dict:
    graph = import_graph()
    found = functions()
    lines = file_lines()
    in_cycles = sorted({m for c in cycles(graph) for m in c})
    return {"longest function": max(found, key=lambda f: f[1])[:2],
            "widest signature": max(((w, n) for w, _, n in found), key=lambda f: f[1]),
            "api.py lines": lines.get("featcache.api", 0),
            "modules in import cycles": len(in_cycles),
            "functions over 90 lines": sum(1 for f in found if f[1] > 90),
            "signatures over 10 parameters": sum(1 for f in found if f[2] > 10),
            "files over 650 lines": sorted(m for m, n in lines.items() if n > 650)}


if __name__ == "__main__":
    for key, value in figures().items():
        print(f"{key}: {value}")
