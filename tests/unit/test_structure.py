"""The shape of the package: no import cycles, no torch on start-up, ruff owns the layout,
files and functions a reader can hold in mind."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SRC = ROOT / "src"
PACKAGE = SRC / "cliplens"
MAX_FILE_LINES = 600
MAX_FUNCTION_LINES = 80  # the body, after the signature and the docstring


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(tree: ast.AST) -> list[ast.Import | ast.ImportFrom]:
    """Every import that runs, function-level ones included; `if TYPE_CHECKING:` blocks
    never run, so they are left out."""
    found: list[ast.Import | ast.ImportFrom] = []

    def walk(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                for other in child.orelse:
                    walk(other)
                continue
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                found.append(child)
            walk(child)

    walk(tree)
    return found


def _owner(name: str) -> str | None:
    """The package module that `name` (a module, or a name inside one) lives in."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def _targets(module: str, node: ast.Import | ast.ImportFrom) -> set[str]:
    if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
    else:
        base = node.module or ""
        if node.level:
            package = module.split(".")
            if MODULES[module].name != "__init__.py":
                package.pop()
            package = package[: len(package) - node.level + 1]
            base = ".".join([*package, base] if base else package)
        names = [f"{base}.{alias.name}" for alias in node.names]
    owners = {_owner(n) for n in names if n.split(".")[0] == "cliplens"}
    return {o for o in owners if o}


def import_graph() -> dict[str, set[str]]:
    """module -> the package modules it imports (its own ancestors, whose __init__ runs
    anyway, left out)."""
    graph: dict[str, set[str]] = {}
    for module, path in MODULES.items():
        edges: set[str] = set()
        for node in _imports(ast.parse(path.read_text(), str(path))):
            edges |= _targets(module, node)
        graph[module] = {t for t in edges if t != module and not module.startswith(t + ".")}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one node (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def _subpackage(module: str) -> str:
    """cliplens.tasks.search -> cliplens.tasks; top-level modules stand for themselves."""
    parts = module.split(".")
    return ".".join(parts[:2])


def test_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_graph_sees_function_level_imports():
    graph = import_graph()
    # cli/main.py imports the command modules at module level, and those import the
    # library inside the command functions (to keep torch off --help)
    assert "cliplens.cli.main" in graph
    assert any(graph[m] for m in graph if m.startswith("cliplens.cli."))
    assert len(graph) == len(MODULES) > 50


def test_no_import_cycle_between_modules():
    found = cycles(import_graph())
    assert not found, f"import cycles: {found}"


def test_no_import_cycle_between_subpackages():
    graph: dict[str, set[str]] = {}
    for module, targets in import_graph().items():
        a = _subpackage(module)
        if a == "cliplens":  # the lazy front door names everything by string
            continue
        graph.setdefault(a, set()).update(
            b for t in targets if (b := _subpackage(t)) not in (a, "cliplens")
        )
    found = cycles(graph)
    assert not found, f"subpackages that import each other: {found}"


def _modules_after(code: str) -> set[str]:
    out = subprocess.run(
        [sys.executable, "-c", f"{code}\nimport sys\nprint(' '.join(sys.modules))"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert out.returncode == 0, out.stderr
    return set(out.stdout.split())


def test_import_cliplens_imports_no_torch():
    loaded = _modules_after("import cliplens\nassert cliplens.__all__")
    assert "cliplens" in loaded
    assert "torch" not in loaded
    assert "numpy" not in loaded  # the front door itself is free


def test_help_imports_no_torch():
    code = (
        "import contextlib, io\n"
        "from cliplens.cli.main import main\n"
        "with contextlib.redirect_stdout(io.StringIO()) as out:\n"
        "    code = main(['--help'])\n"
        "assert code == 0 and 'Usage' in out.getvalue(), out.getvalue()\n"
    )
    loaded = _modules_after(code)
    assert "cliplens.cli.main" in loaded
    assert "torch" not in loaded


def test_checker_sees_torch():
    assert "torch" in _modules_after("import torch")


def test_ruff_owns_the_layout():
    marked = [
        f"{p.relative_to(ROOT)}:{i}"
        for folder in ("src", "tests", "benchmarks", "scripts")
        for p in sorted((ROOT / folder).rglob("*.py"))
        for i, line in enumerate(p.read_text().splitlines(), 1)
        if "# fmt: " + "skip" in line or "# fmt: " + "off" in line
    ]
    assert not marked, f"layout kept from the formatter at {marked}"


def test_files_are_short():
    long = {
        str(p.relative_to(ROOT)): n
        for p in MODULES.values()
        if (n := len(p.read_text().splitlines())) > MAX_FILE_LINES
    }
    assert not long, f"files over {MAX_FILE_LINES} lines: {long}"


def _body_lines(fn: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    body = fn.body
    first = body[0]
    has_docstring = isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant)
    if has_docstring and len(body) > 1:
        first = body[1]
    return fn.end_lineno - first.lineno + 1


def test_functions_are_short():
    long = {
        f"{p.relative_to(ROOT)}:{node.lineno} {node.name}": n
        for p in MODULES.values()
        for node in ast.walk(ast.parse(p.read_text()))
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
        and (n := _body_lines(node)) > MAX_FUNCTION_LINES
    }
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines: {long}"


@pytest.mark.parametrize(
    "source, expected",
    [
        ("def f():\n    '''doc'''\n    a = 1\n    return a\n", 2),
        ("def f():\n    return 1\n", 1),
    ],
)
def test_body_lines_counts_the_body(source, expected):
    (fn,) = ast.parse(source).body
    assert _body_lines(fn) == expected
