"""The layout stays one a researcher can change: scripts parse arguments and call library modules (no
script, and no library module, imports a script), no function grows past one screen, and no modules import
each other round a circle, not even for type hints. The package satkit/ stands alone (pip installs it without the
root): it imports no root module and no tool. Every folder of code is walked: the root, satkit/ and its
subpackages, tools/. A module is its dotted path (`satkit.data.packing`), so modules of the same name in two
folders are distinct."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
MAX_FUNCTION_LINES = 60


def code_files(root: Path = ROOT) -> list[Path]:
    """Every module of the project: the root's, the library package's (satkit/**) and the tools'."""
    return sorted({*root.glob("*.py"), *root.glob("satkit/**/*.py"), *root.glob("tools/*.py")})


def module_name(path: Path, root: Path = ROOT) -> str:
    """The dotted name `path` is imported as from `root`: satkit/data/packing.py -> satkit.data.packing,
    satkit/data/__init__.py -> satkit.data."""
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = code_files()
NAMES = {module_name(p) for p in MODULES}
# Scripts: the root's entry points and every tool (run as `python -m tools.NAME`).
SCRIPTS = {"train", "eval", "caption", "create_input_files"} | {n for n in NAMES if n.startswith("tools.")}


def imported_modules(path: Path, root: Path | None = ROOT) -> set[str]:
    """Dotted names of every module `path` imports, at module level, inside functions or under `if TYPE_CHECKING:`
    (a type-only import still ties two modules together: each must be read to understand the other):
    `import a.b` gives a.b (and its packages a), `from a.b import c` gives a.b and a.b.c (c may be a
    submodule), relative imports are resolved against `path`'s package (`root`: where dotted names start)."""
    package = module_name(path, root).split(".") if root is not None and path.is_relative_to(root) else [path.stem]
    if path.name != "__init__.py":
        package = package[:-1]
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            dotted = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package[:len(package) - node.level + 1] if node.level else []
            module = ".".join([*base, *(node.module.split(".") if node.module else [])])
            dotted = ([module] if module else []) + [f"{module}.{a.name}" if module else a.name for a in node.names]
        else:
            continue
        for name in dotted:
            parts = name.split(".")
            names |= {".".join(parts[:i]) for i in range(1, len(parts) + 1)}
    return names


ROOT_MODULES = {n for n in NAMES if "." not in n and n not in ("satkit", "tools")}


@pytest.mark.parametrize("path", sorted(ROOT.glob("satkit/**/*.py")), ids=lambda p: str(p.relative_to(ROOT)))
def test_the_package_imports_no_root_module(path):
    """satkit/ is what `pip install` ships: an import of a root module (models, hubconf, a script) or of a tool
    works only from a checkout, with the root on sys.path."""
    outside = {n for n in imported_modules(path) if n in ROOT_MODULES or n == "tools" or n.startswith("tools.")}
    assert not outside, f"{path.relative_to(ROOT)} imports {', '.join(sorted(outside))} from outside satkit/"


def test_every_script_exists():
    assert {"train", "eval", "caption", "create_input_files", "tools.benchmark", "tools.gpu_bundle",
            "tools.gpu_check"} <= SCRIPTS


def test_the_root_holds_at_most_twelve_modules():
    """Entry points and core modules only; the library is satkit/, the developer tools tools/."""
    root = sorted(p.name for p in ROOT.glob("*.py"))
    assert len(root) <= 12, f"{len(root)} .py files at the root: {', '.join(root)}"


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_module_imports_a_script(path):
    assert not (imported_modules(path) & SCRIPTS) - {module_name(path)}, f"{path.name} imports a script"


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(ROOT)))
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
    assert "eval" in imported_modules(module, tmp_path)


def test_the_import_check_resolves_package_and_relative_imports(tmp_path):
    """The check of the check: `from pkg import mod`, `from . import mod` and `from ..x import y` name the
    submodule by its dotted path; an import under `if TYPE_CHECKING:` counts too."""
    (tmp_path / "pkg" / "sub").mkdir(parents=True)
    module = tmp_path / "pkg" / "sub" / "m.py"
    module.write_text("from typing import TYPE_CHECKING\nfrom . import a\nfrom ..b import c\nfrom tools import t\n"
                      "import pkg.sub.d\nif TYPE_CHECKING:\n    import pkg.e\n")
    assert {"pkg.sub.a", "pkg.b", "tools.t", "pkg.sub.d", "pkg.sub", "pkg"} <= imported_modules(module, tmp_path)
    assert "pkg.e" in imported_modules(module, tmp_path)
    assert module_name(tmp_path / "pkg" / "sub" / "__init__.py", tmp_path) == "pkg.sub"


def import_graph(paths: list[Path], root: Path = ROOT) -> dict[str, set[str]]:
    """Project module (dotted name) -> the project modules it imports (at module level or inside functions)."""
    names = {module_name(p, root) for p in paths}
    return {module_name(p, root): imported_modules(p, root) & names - {module_name(p, root)} for p in paths}


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
    assert import_circles(import_graph(sorted(tmp_path.glob("*.py")), tmp_path)) == [["a", "b", "c"]]


def test_the_circle_check_counts_type_only_imports(tmp_path):
    """The check of the check: the trainer/log loop of #34, closed by an import under `if TYPE_CHECKING:`."""
    (tmp_path / "trainer.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from logger import Log\n")
    (tmp_path / "logger.py").write_text("from trainer import Run\n")
    assert import_circles(import_graph(sorted(tmp_path.glob("*.py")), tmp_path)) == [["logger", "trainer"]]


def test_the_root_module_check_sees_an_import_of_the_root(tmp_path):
    """The check of the check: `from models import X` inside satkit/ names a root module."""
    (tmp_path / "satkit").mkdir()
    module = tmp_path / "satkit" / "m.py"
    module.write_text("def f():\n    from models import build_model\n")
    assert "models" in imported_modules(module, tmp_path)


def test_the_circle_check_tells_modules_of_one_name_apart(tmp_path):
    """The check of the check: in packages, a circle through `from pkg import mod` and a relative import is
    found, and two modules of the same name in two packages are two modules, not one."""
    for folder in ("pkg", "pkg/x", "pkg/y"):
        (tmp_path / folder).mkdir(exist_ok=True)
        (tmp_path / folder / "__init__.py").write_text("")
    (tmp_path / "pkg" / "x" / "util.py").write_text("from pkg.y import util\n")  # no circle: x.util -> y.util
    (tmp_path / "pkg" / "y" / "util.py").write_text("from . import core\n")
    (tmp_path / "pkg" / "y" / "core.py").write_text("def f():\n    from pkg.y.util import g\n")
    paths = sorted(tmp_path.rglob("*.py"))
    assert import_circles(import_graph(paths, tmp_path)) == [["pkg.y.core", "pkg.y.util"]]
