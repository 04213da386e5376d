"""The house rules of ``src/pyqmail``: small rooms, no import cycles, a map that is true.

Each concept has one file (``src/pyqmail/README.md`` names it). These checks keep it so: no
module over 600 lines, no function over 80, no import cycle between modules (imports only
needed by the type checker do not count: they never run), and every module the map names
exists while every module that exists is on the map.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pyqmail

PACKAGE = Path(pyqmail.__file__).parent
MAX_LINES = 600
MAX_FUNCTION = 80


def _modules() -> dict[str, Path]:
    """Dotted name under pyqmail -> file; a package's ``__init__`` has the package's name."""
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts) or "__init__"] = path
    return found


def _runtime_imports(tree: ast.Module, known: set[str]) -> set[str]:
    """The pyqmail modules a module imports when it runs (not under ``if TYPE_CHECKING``)."""
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip |= {id(n) for stmt in node.body for n in ast.walk(stmt)}
    found: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("pyqmail"):
            base = (node.module or "").removeprefix("pyqmail").lstrip(".")
            for alias in node.names:
                sub = f"{base}.{alias.name}" if base else alias.name
                found.add(sub if sub in known else base)
        elif isinstance(node, ast.Import):
            found |= {
                a.name.removeprefix("pyqmail.") for a in node.names if a.name.startswith("pyqmail.")
            }
    return found & known


def _functions(tree: ast.AST) -> list[ast.FunctionDef | ast.AsyncFunctionDef]:
    return [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]


def test_no_module_over_600_lines_and_no_function_over_80() -> None:
    too_big = []
    for name, path in _modules().items():
        text = path.read_text()
        if text.count("\n") > MAX_LINES:
            too_big.append(f"{name}: {text.count(chr(10))} lines")
        for func in _functions(ast.parse(text)):
            length = (func.end_lineno or func.lineno) - func.lineno + 1
            if length > MAX_FUNCTION:
                too_big.append(f"{name}:{func.lineno} {func.name}: {length} lines")
    assert not too_big, "rooms too big:\n" + "\n".join(too_big)


def test_no_import_cycles() -> None:
    """A cycle means two rooms that cannot be understood (or imported) one without the other.

    A package's ``__init__`` that re-exports its submodules' names is an edge from the
    package to them; a submodule importing its own package back would close a cycle.
    """
    modules = _modules()
    graph = {
        name: _runtime_imports(ast.parse(path.read_text()), set(modules)) - {name}
        for name, path in modules.items()
    }
    done: set[str] = set()

    def visit(name: str, path: tuple[str, ...]) -> None:
        assert name not in path, f"import cycle: {' -> '.join((*path, name))}"
        if name in done:
            return
        for dep in sorted(graph[name]):
            visit(dep, (*path, name))
        done.add(name)

    for name in sorted(graph):
        visit(name, ())


def test_the_room_map_names_every_module_and_only_those() -> None:
    text = (PACKAGE / "README.md").read_text()
    named = set(re.findall(r"`([a-z_]+(?:/[a-z_]+)?\.py)`", text)) - {"__init__.py"}
    existing = {
        str(path.relative_to(PACKAGE))
        for path in PACKAGE.rglob("*.py")
        if path.name != "__init__.py"
    }
    assert named - existing == set(), "the map names files that do not exist"
    assert existing - named == set(), "files missing from src/pyqmail/README.md"
