"""The layout stays one a researcher can change: scripts parse arguments and call library modules (no
script, and no library module, imports a script), and no function grows past one screen."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = {"train", "eval", "caption", "create_input_files", "benchmark", "gpu_bundle", "gpu_check"}
MODULES = sorted(p for p in ROOT.glob("*.py"))
MAX_FUNCTION_LINES = 60


def imported_modules(path: Path) -> set[str]:
    """Top-level names of every module `path` imports, at module level or inside functions."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_every_script_exists():
    assert SCRIPTS <= {p.stem for p in MODULES}


@pytest.mark.parametrize("path", MODULES, ids=lambda p: p.name)
def test_no_module_imports_a_script(path):
    assert not (imported_modules(path) & SCRIPTS) - {path.stem}, f"{path.name} imports a script"


@pytest.mark.parametrize("path", MODULES, ids=lambda p: p.name)
def test_no_function_is_longer_than_a_screen(path):
    long = [f"{node.name} ({node.end_lineno - node.lineno + 1} lines)"
            for node in ast.walk(ast.parse(path.read_text()))
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
            and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES]
    assert not long, f"{path.name}: {', '.join(long)}"


def test_the_import_check_sees_function_local_imports(tmp_path):
    """The check of the check: an import hidden inside a function is found."""
    module = tmp_path / "report.py"
    module.write_text("def write():\n    from eval import COLLAPSE\n    return COLLAPSE\n")
    assert "eval" in imported_modules(module)


def import_graph(paths: list[Path]) -> dict[str, set[str]]:
    """Project module -> the project modules it imports (at module level or inside functions)."""
    names = {p.stem for p in paths}
    return {p.stem: imported_modules(p) & names - {p.stem} for p in paths}


def import_circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Each set of modules that import each other, directly or round a loop (strongly connected components
    of more than one module, Tarjan's algorithm), as a sorted list."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    circles: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in sorted(graph[node]):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                circles.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return circles


def test_no_import_circles():
    circles = import_circles(import_graph(MODULES))
    assert not circles, "modules that import each other: " + "; ".join(" <-> ".join(c) for c in circles)


def test_the_circle_check_finds_a_hidden_circle(tmp_path):
    """The check of the check: a circle closed by an import inside a function, through a third module."""
    (tmp_path / "a.py").write_text("import b\n")
    (tmp_path / "b.py").write_text("def f():\n    from c import x\n    return x\n")
    (tmp_path / "c.py").write_text("from a import y\n")
    (tmp_path / "d.py").write_text("import a\n")
    assert import_circles(import_graph(sorted(tmp_path.glob("*.py")))) == [["a", "b", "c"]]
