"""Every Python example in the README runs as written, importing only `cliplens`.

The examples run in order in one folder that holds the demo photos (`photos/`), so a
later example may use what an earlier one wrote, as a reader following along would.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from pytest_examples import CodeExample, find_examples

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = [e for e in find_examples(ROOT / "README.md") if e.prefix == "python"]


def _imports(example: CodeExample) -> list[str]:
    names = []
    for node in ast.walk(ast.parse(example.source)):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            names.append(f"from {node.module}")
    return names


def test_the_readme_has_examples():
    assert len(EXAMPLES) >= 6


@pytest.mark.parametrize("example", EXAMPLES, ids=str)
def test_example_imports_only_cliplens(example: CodeExample):
    assert _imports(example) == ["cliplens"], f"{example}: import cliplens, and only it"


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from cliplens.datasets.photos import write_photos

    where = tmp_path_factory.mktemp("readme")
    write_photos(where / "photos")
    return where


@pytest.mark.parametrize("example", EXAMPLES, ids=str)
def test_example_runs(example: CodeExample, folder: Path, monkeypatch):
    monkeypatch.chdir(folder)
    # compiled at its own line of the README, so a traceback points into the README
    # (pytest-examples finds the blocks; its runner's tracebacks crash pytest 9's report)
    code = compile("\n" * example.start_line + example.source, str(example.path), "exec")
    exec(code, {"__name__": "__readme__"})
