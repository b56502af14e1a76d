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


def imports(tree: ast.Module, known: dict[str, Path], everywhere: bool = False) -> set[str]:
    """The package's modules this one imports at module level (what runs at import time), or with
    ``everywhere`` anywhere: inside functions (lazy imports) and under ``if TYPE_CHECKING:`` (annotations) too —
    an arrow is an arrow, whenever it is followed."""
    deps = set()
    for node in ast.walk(tree) if everywhere else tree.body:
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("fanlora"):
            for alias in node.names:
                name = f"{node.module}.{alias.name}"
                deps.add(name if name in known else node.module)
        elif isinstance(node, ast.Import):
            deps |= {a.name for a in node.names if a.name.startswith("fanlora")}
    return deps


def test_no_import_cycles():
    """No circle, lazy and TYPE_CHECKING imports counted (before, this check read module level only and missed
    tasks.base importing the tasks package inside known_tasks while the package imports tasks.base, and the
    scorer registry importing the study under TYPE_CHECKING while the study imports the registry)."""
    known = modules()
    graph = {
        name: imports(ast.parse(path.read_text()), known, everywhere=True) & set(known) - {name}
        for name, path in known.items()
    }

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


#: (importer prefix, forbidden prefix, why). Serving must not need the training stack; the stages and the
#: methods must not need the server; nothing below the CLI reaches up into the experiment grids.
FORBIDDEN = [
    ("fanlora.serving", "fanlora.methods", "serving loads adapters by their files, never by building a method"),
    ("fanlora.serving", "fanlora.latency", "the latency package measures serving, not the other way round"),
    ("fanlora.serving", "fanlora.experiments", "serving knows nothing of grids"),
    ("fanlora.stages", "fanlora.serving", "stage c costs settings from the latency profile, not the server"),
    ("fanlora.methods", "fanlora.serving", "a method trains; serving is downstream"),
    ("fanlora.methods", "fanlora.experiments", "a method is built by grids, never builds one"),
    ("fanlora.scoring", "fanlora.methods", "stage b scores stage a's gated LoRA only"),
    ("fanlora.scoring", "fanlora.serving", "stage b has nothing to serve"),
    ("fanlora.stages", "fanlora.experiments", "stages are what grids run"),
    ("fanlora.tasks", "fanlora.experiments", "tasks are what grids and stages use"),
    ("fanlora.setting", "fanlora.scoring", "the setting is an artifact; choosing one from scores is stage c's"),
]


def test_no_sideways_imports():
    known = modules()
    found = []
    for name, path in known.items():
        for dep in imports(ast.parse(path.read_text()), known, everywhere=True):
            for importer, forbidden, why in FORBIDDEN:
                if name.startswith(importer) and (dep == forbidden or dep.startswith(forbidden + ".")):
                    found.append(f"{name} imports {dep}: {why}")
    assert not found, found


def test_top_level_stays_small():
    """At most ~15 modules at the package's top level; the rest live in packages named for what they hold."""
    top = sorted(p.stem for p in PACKAGE.glob("*.py"))
    assert len(top) <= 15, top


def test_extensions_register_from_their_own_file():
    """A method, scorer and task is one file: each package imports its modules itself (methods and scorers by
    discovery), so no list elsewhere names them."""
    from fanlora import methods
    from fanlora.scoring import scorers
    from fanlora.tasks import known_tasks

    method_files = {p.stem for p in (PACKAGE / "methods").glob("*.py")} - {"__init__", "registry", "common", "searched"}
    assert {n.replace("-", "_") for n in methods.names()} == method_files
    scorer_files = {p.stem for p in (PACKAGE / "scoring" / "scorers").glob("*.py")} - {"__init__", "registry"}
    assert {n.replace("-", "_") for n in scorers.names()} == scorer_files
    task_files = {p.stem for p in (PACKAGE / "tasks").glob("*.py")} - {"__init__", "base"}
    assert set(known_tasks()) == task_files


def test_no_handler_branches_on_the_command_name():
    """What differs between commands is said where the parser binds them (set_defaults) or passed as an
    argument, never by testing ``args.command`` in shared code."""
    found = [
        f"{name}:{node.lineno}"
        for name, path in modules().items()
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.Attribute) and node.attr == "command" and getattr(node.value, "id", "") == "args"
    ]
    assert not found, found
