"""The package's shape: no import cycles, no imports hidden in functions to dodge one, small
modules, and models that know nothing of training, evaluation, analysis, plots or the CLI.

Read statically with ``ast`` (nothing is imported), so a cycle is caught even where Python's
import order happens to tolerate it today.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = "dydit_lab"
ROOT = Path(__file__).resolve().parents[1] / PACKAGE
MAX_LINES = 400
# What the model families may not depend on (each a subpackage or module of dydit_lab).
NOT_FOR_MODELS = ("training", "evaluation", "analysis", "viz", "bench", "cli")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES: dict[str, Path] = {_module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def _is_package(module: str) -> bool:
    return MODULES[module].name == "__init__.py"


def _resolve(module: str, level: int, target: str | None) -> str:
    """The absolute name ``from <level dots><target>`` means inside ``module``."""
    if level == 0:
        return target or ""
    base = module.split(".")
    if not _is_package(module):
        base = base[:-1]  # a plain module's relative imports start at its package
    if level > 1:
        base = base[: len(base) - (level - 1)]
    return ".".join(base + ([target] if target else []))


def _intra_imports(module: str) -> list[tuple[str, ast.stmt]]:
    """(imported dydit_lab module, statement) for every import statement of ``module``.

    ``from .x import y`` is an edge to ``x``, or to ``x.y`` when ``y`` is a submodule;
    ``import dydit_lab.a.b`` an edge to ``dydit_lab.a.b``. Parent packages' ``__init__``
    are not added: Python runs them, but they only re-export.
    """
    tree = ast.parse(MODULES[module].read_text(), filename=str(MODULES[module]))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == PACKAGE or alias.name.startswith(PACKAGE + "."):
                    found.append((alias.name, node))
        elif isinstance(node, ast.ImportFrom):
            base = _resolve(module, node.level, node.module)
            if base != PACKAGE and not base.startswith(PACKAGE + "."):
                continue
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                found.append((sub if sub in MODULES else base, node))
    return found


def _graph() -> dict[str, set[str]]:
    graph = {}
    for module in MODULES:
        edges = set()
        for target, _ in _intra_imports(module):
            if target not in MODULES:
                raise AssertionError(f"{module} imports {target}, which is no module of {PACKAGE}")
            if target != module:
                edges.add(target)
        graph[module] = edges
    return graph


def _find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as a closed path [a, b, ..., a], or None (iterative DFS, three colours)."""
    WHITE, GREY, BLACK = 0, 1, 2
    colour = dict.fromkeys(graph, WHITE)
    for start in sorted(graph):
        if colour[start] != WHITE:
            continue
        stack = [(start, iter(sorted(graph[start])))]
        path = [start]
        colour[start] = GREY
        while stack:
            node, children = stack[-1]
            child = next(children, None)
            if child is None:
                colour[node] = BLACK
                stack.pop()
                path.pop()
            elif colour[child] == GREY:
                return path[path.index(child):] + [child]
            elif colour[child] == WHITE:
                colour[child] = GREY
                stack.append((child, iter(sorted(graph[child]))))
                path.append(child)
    return None


def test_the_walk_sees_the_whole_package():
    assert {"dydit_lab", "dydit_lab.cli", "dydit_lab.models.dit", "dydit_lab.training.loop",
            "dydit_lab.viz.figures", "dydit_lab.bench.run"} <= set(MODULES)
    graph = _graph()
    # Resolution: relative, two-dot and submodule imports land on the right modules.
    assert "dydit_lab.models.configs" in graph["dydit_lab.models.dit"]
    assert "dydit_lab.models.flops" in graph["dydit_lab.models.dit"]  # `from . import flops`
    assert "dydit_lab.checkpoints" in graph["dydit_lab.training.loop"]


def test_cycle_finder_finds_and_prints_a_cycle():
    assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _find_cycle({"a": {"a"}}) == ["a", "a"]


def test_no_import_cycles():
    cycle = _find_cycle(_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_no_intra_package_imports_inside_functions():
    """Lazy imports were the way around cycles; with none left, imports sit at module level."""
    hidden = []
    for module in MODULES:
        tree = ast.parse(MODULES[module].read_text())
        for func in ast.walk(tree):
            if not isinstance(func, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            inner = {id(node) for node in ast.walk(func) if isinstance(node, (ast.Import, ast.ImportFrom))}
            for target, node in _intra_imports(module):
                if id(node) in inner:
                    hidden.append(f"{module}:{node.lineno} imports {target} inside {func.name}()")
    assert not hidden, "\n".join(sorted(set(hidden)))


@pytest.mark.parametrize("module", sorted(MODULES))
def test_modules_stay_small(module):
    lines = len(MODULES[module].read_text().splitlines())
    assert lines <= MAX_LINES, f"{MODULES[module]} has {lines} lines (at most {MAX_LINES})"


def test_models_import_nothing_above_them():
    graph = _graph()
    banned = tuple(f"{PACKAGE}.{name}" for name in NOT_FOR_MODELS)
    wrong = [f"{module} imports {target}"
             for module in graph if module == f"{PACKAGE}.models" or module.startswith(f"{PACKAGE}.models.")
             for target in graph[module]
             if any(target == b or target.startswith(b + ".") for b in banned)]
    assert not wrong, "\n".join(wrong)


def _unit(module: str) -> str:
    """The folder or top-level module a module belongs to: ``dydit_lab.models.dit`` -> ``dydit_lab.models``."""
    return ".".join(module.split(".")[:2])


def test_no_cycles_between_folders_and_top_level_modules():
    """Data flows one way between the package's parts too: no module of a folder imports a
    part that imports back into that folder (the package's own ``__init__`` only re-exports)."""
    units: dict[str, set[str]] = {}
    for module, targets in _graph().items():
        if module == PACKAGE:
            continue
        edges = units.setdefault(_unit(module), set())
        edges.update(_unit(t) for t in targets if t != PACKAGE and _unit(t) != _unit(module))
    cycle = _find_cycle(units)
    assert cycle is None, "folders import each other: " + " -> ".join(cycle)
