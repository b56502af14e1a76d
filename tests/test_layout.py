"""The package's shape: no import cycles, short functions, modules under ~400 lines unless they say why."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).parent.parent / "fanlora"


def modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def imports(tree: ast.Module, known: dict[str, Path]) -> set[str]:
    """The package's modules this one imports at module level (what runs at import time)."""
    deps = set()
    for node in tree.body:
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("fanlora"):
            for alias in node.names:
                name = f"{node.module}.{alias.name}"
                deps.add(name if name in known else node.module)
        elif isinstance(node, ast.Import):
            deps |= {a.name for a in node.names if a.name.startswith("fanlora")}
    return deps


def test_no_import_cycles():
    known = modules()
    graph = {name: imports(ast.parse(path.read_text()), known) & set(known) - {name} for name, path in known.items()}

    def visit(name: str, stack: list[str], done: set[str]) -> None:
        for dep in graph[name]:
            assert dep not in stack, "import cycle: " + " -> ".join([*stack[stack.index(dep) :], dep])
            if dep not in done:
                visit(dep, [*stack, dep], done)
        done.add(name)

    done: set[str] = set()
    for name in graph:
        visit(name, [name], done)


def test_functions_and_modules_stay_small():
    long_functions, long_modules = [], []
    for name, path in modules().items():
        text = path.read_text()
        tree = ast.parse(text)
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.end_lineno - node.lineno >= 80:
                long_functions.append(f"{name}.{node.name}")
        if len(text.splitlines()) > 400 and "Long by design:" not in (ast.get_docstring(tree) or ""):
            long_modules.append(name)
    assert not long_functions and not long_modules, (long_functions, long_modules)
