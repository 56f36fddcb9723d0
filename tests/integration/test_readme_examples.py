"""Every Python example in the README and in docs/ runs as written, importing only
`cliplens`.

Each file's examples run in order in one folder of their own that holds the demo photos
(`photos/`), so a later example may use what an earlier one wrote, as a reader following
along would. A block fenced as ```python {test="skip"} needs what the tests do not have (a
download, a GPU, a trained run folder, a server, or minutes): it is compiled, not run.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from pytest_examples import CodeExample, find_examples

ROOT = Path(__file__).resolve().parents[2]
# docs/results.md is benchmarks/RESULTS.md, copied in by `make docs`: figures, not examples
SOURCES = [
    ROOT / "README.md",
    *sorted(p for p in (ROOT / "docs").rglob("*.md") if p != ROOT / "docs" / "results.md"),
]
EXAMPLES = [
    e
    for source in SOURCES
    for e in sorted(find_examples(source), key=lambda e: e.start_line)
    if e.prefix.split()[0] in ("python", "py")
]


def _skipped(example: CodeExample) -> bool:
    return example.prefix_settings().get("test") == "skip"


RUNNABLE = [e for e in EXAMPLES if not _skipped(e)]


def _imports(example: CodeExample) -> list[str]:
    names = []
    for node in ast.walk(ast.parse(example.source)):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            names.append(f"from {node.module}")
    return names


def _compiled(example: CodeExample):
    # compiled at its own line of its file, so a traceback points into the Markdown
    # (pytest-examples finds the blocks; its runner's tracebacks crash pytest 9's report)
    source = "\n" * example.start_line + example.source
    return compile(source, str(example.path), "exec")


def test_the_readme_and_the_guides_have_examples():
    assert any(e.path.name == "README.md" for e in RUNNABLE)
    assert len({e.path for e in RUNNABLE}) >= 8
    assert len(RUNNABLE) >= 10


@pytest.mark.parametrize("example", EXAMPLES, ids=str)
def test_example_imports_only_cliplens(example: CodeExample):
    assert _imports(example) == ["cliplens"], f"{example}: import cliplens, and only it"


@pytest.mark.parametrize("example", [e for e in EXAMPLES if _skipped(e)], ids=str)
def test_skipped_example_compiles(example: CodeExample):
    _compiled(example)


@pytest.fixture(scope="module")
def folders() -> dict[Path, Path]:
    return {}


@pytest.fixture
def folder(example: CodeExample, folders: dict[Path, Path], tmp_path_factory) -> Path:
    if example.path not in folders:
        from cliplens.datasets.photos import write_photos

        where = tmp_path_factory.mktemp(example.path.stem)
        write_photos(where / "photos")
        folders[example.path] = where
    return folders[example.path]


@pytest.mark.parametrize("example", RUNNABLE, ids=str)
def test_example_runs(example: CodeExample, folder: Path, monkeypatch):
    monkeypatch.chdir(folder)
    exec(_compiled(example), {"__name__": "__docs__"})
