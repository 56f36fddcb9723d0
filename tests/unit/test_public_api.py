"""The front door: every public name comes from `import cliplens`, typed and documented."""

from __future__ import annotations

import inspect

import pytest

import cliplens

NAMES = [n for n in cliplens.__all__ if n != "__version__"]


def test_all_is_sorted_into_a_stable_list():
    assert len(NAMES) == len(set(NAMES)) > 40


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
