"""The package's shape: no import cycle, no module past 400 lines, no workflow name written outside states/."""

from __future__ import annotations

import ast
from importlib import resources
from pathlib import Path

import retracer
from retracer.workflow import load_spec
from retracer.workflow.effects import CRASH_FIELDS

SRC = Path(retracer.__file__).parent
MODULES = {p: ".".join(("retracer", *p.relative_to(SRC).with_suffix("").parts)).removesuffix(".__init__")
           for p in sorted(SRC.rglob("*.py")) if "migrations" not in p.parts}


def runtime_imports(path: Path, module: str) -> set[str]:
    """The retracer modules ``path`` imports when it runs: every import statement, at any depth, except those
    under ``if TYPE_CHECKING:``."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    typing_only = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If)
                   and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"
                   for stmt in node.body for n in ast.walk(stmt)}
    found: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("retracer")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("retracer"):
            for alias in node.names:  # "from retracer.x import y" imports retracer.x.y when y is a module
                sub = f"{node.module}.{alias.name}"
                found.add(sub if sub in MODULES.values() else node.module)
    return found - {module}


def test_no_import_cycle() -> None:
    """No chain of runtime imports leads from a module back to itself (the click idiom aside: retracer.cli
    imports its command modules at its end so that they register on the group they import)."""
    graph = {m: runtime_imports(p, m) for p, m in MODULES.items()}
    for m in graph:
        if m.startswith("retracer.cli."):
            graph[m].discard("retracer.cli")
    cycles: list[list[str]] = []
    state: dict[str, int] = {}

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for n in sorted(graph.get(m, ())):
            if state.get(n) == 1:
                cycles.append([*path[path.index(n):], n])
            elif n not in state:
                visit(n, [*path, n])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert cycles == []


def test_no_module_over_400_lines() -> None:
    """Small modules named after one concept: none is longer than 400 lines (generated migrations aside)."""
    long = {str(p.relative_to(SRC)): n for p in MODULES if (n := len(p.read_text().splitlines())) > 400}
    assert long == {}


def test_workflow_names_are_read_from_states() -> None:
    """No state or trigger name is written in the code (docstrings aside): it asks the workflow file's roles.
    A crash field that shares a trigger's name ("release") is a field, not the trigger."""
    spec = load_spec()
    names = (set(spec.states) | {t.trigger for t in spec.transitions}) - set(CRASH_FIELDS)
    written = []
    for path in MODULES:
        tree = ast.parse(path.read_text(encoding="utf-8"))
        docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                      if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef)
                      and node.body and isinstance(node.body[0], ast.Expr)
                      and isinstance(node.body[0].value, ast.Constant)}
        written += [f"{path.relative_to(SRC)}:{node.lineno}: {node.value!r}" for node in ast.walk(tree)
                    if isinstance(node, ast.Constant) and node.value in names and id(node) not in docstrings]
    assert written == []


def test_the_shipped_workflow_is_the_repository_file() -> None:
    """The roles the code reads come from the states/workflow.toml that ships in the package."""
    text = resources.files("retracer.states").joinpath("workflow.toml").read_text(encoding="utf-8")
    assert "[roles]" in text and load_spec().roles.queue in text
