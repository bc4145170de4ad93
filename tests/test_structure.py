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
