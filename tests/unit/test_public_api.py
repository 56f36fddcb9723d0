"""The front door: every public name comes from `import cliplens`, typed and documented."""

from __future__ import annotations

import inspect

import pytest

import cliplens

NAMES = [n for n in cliplens.__all__ if n != "__version__"]


def test_exports_name_each_public_name_once():
    # a dict literal keeps the last of two equal keys: look at the source, not the dict
    import ast
    from pathlib import Path

    tree = ast.parse(Path(cliplens.__file__).read_text())
    (table,) = [
        n.value
        for n in tree.body
        if isinstance(n, ast.Assign) and getattr(n.targets[0], "id", "") == "_EXPORTS"
    ]
    keys = [k.value for k in table.keys]
    assert len(keys) == len(set(keys)) > 40, sorted(k for k in keys if keys.count(k) > 1)
    assert keys == NAMES


@pytest.mark.parametrize("name", NAMES)
def test_public_name_resolves_and_is_documented(name):
    obj = getattr(cliplens, name)
    assert obj.__module__.startswith("cliplens"), obj.__module__
    assert getattr(obj, "__name__", name) == name  # no alias under another name
    doc = inspect.getdoc(obj) or ""
    assert len(doc.split()) >= 5, f"{name} needs a docstring that says why"


@pytest.mark.parametrize("name", [n for n in NAMES if inspect.isfunction(getattr(cliplens, n))])
def test_entry_point_shows_an_example_and_is_typed(name):
    fn = getattr(cliplens, name)
    doc = inspect.getdoc(fn) or ""
    assert f"cliplens.{name}" in doc, f"{name}: the docstring's example should call it"
    sig = inspect.signature(fn)
    untyped = [p.name for p in sig.parameters.values() if p.annotation is p.empty]
    assert not untyped, f"{name}: untyped parameters {untyped}"
    assert sig.return_annotation is not sig.empty, f"{name}: no return type"


def test_unknown_name_is_a_clear_attribute_error():
    with pytest.raises(AttributeError, match="no attribute 'nonesuch'"):
        cliplens.nonesuch  # noqa: B018


def test_dir_lists_the_public_names():
    assert set(NAMES) <= set(dir(cliplens))


def _example_names(doc: str) -> set[str]:
    """The `cliplens.X` an example's `>>>` lines use."""
    import re

    lines = [line for line in doc.splitlines() if line.strip().startswith((">>>", "..."))]
    return set(re.findall(r"\bcliplens\.([A-Za-z_]\w*)", "\n".join(lines)))


@pytest.mark.parametrize("name", NAMES)
def test_examples_use_only_public_names(name):
    doc = inspect.getdoc(getattr(cliplens, name)) or ""
    unknown = sorted(_example_names(doc) - set(cliplens.__all__))
    assert not unknown, f"{name}: its example uses cliplens.{unknown}, not public names"


def test_example_names_are_found():
    doc = ">>> import cliplens\n>>> cliplens.search(x)\nnot cliplens.other here"
    assert _example_names(doc) == {"search"}
