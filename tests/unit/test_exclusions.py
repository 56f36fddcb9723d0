"""--exclude and .cliplensignore (cliplens.exclusions) in the one walk every command uses."""

from __future__ import annotations

from pathlib import Path

import pytest

from cliplens.errors import InvalidInputError
from cliplens.exclusions import Exclusions
from cliplens.images import iter_image_files

TREE = [
    "a.jpg",
    "node_modules/pkg/x.jpg",
    "Private/p.jpg",
    "Private/inner/q.jpg",
    "sub/b.jpg",
    "sub/draft.tmp.jpg",
    "sub/deep/keep.jpg",
    "sub/deep/drop.jpg",
    "exports/e.jpg",
    "sub/exports/e2.jpg",
]


@pytest.fixture
def tree(tmp_path) -> Path:
    for name in TREE:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"not decoded by the walk")
    return tmp_path


def walk(root: Path, rules: Exclusions | None = None) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in iter_image_files([root], exclude=rules))


def test_nothing_is_left_out_without_patterns(tree):
    assert walk(tree) == sorted(TREE)


def test_exclude_patterns_follow_gitignore(tree):
    rules = Exclusions(("node_modules/", "Private/", "/exports", "*.tmp.jpg"))
    assert walk(tree, rules) == [
        "a.jpg",
        "sub/b.jpg",
        "sub/deep/drop.jpg",
        "sub/deep/keep.jpg",
        "sub/exports/e2.jpg",  # "/exports" anchors at the root
    ]


def test_ignore_files_apply_below_their_folder_and_can_bring_back(tree):
    (tree / ".cliplensignore").write_text("# caches and private folders\nPrivate/\n*.tmp.jpg\n")
    (tree / "sub" / "deep" / ".cliplensignore").write_text("*.jpg\n!keep.jpg\n")
    assert walk(tree) == [
        "a.jpg",
        "exports/e.jpg",
        "node_modules/pkg/x.jpg",
        "sub/b.jpg",
        "sub/deep/keep.jpg",
        "sub/exports/e2.jpg",
    ]
    # --exclude adds to the files; ignore_files=False reads none of them
    assert "node_modules/pkg/x.jpg" not in walk(tree, Exclusions(("node_modules",)))
    assert walk(tree, Exclusions(ignore_files=False)) == sorted(TREE)


def test_a_folder_left_out_is_not_entered(tree, monkeypatch):
    import cliplens.images as images

    entered = []
    real = images._scandir_sorted

    def spy(path):
        entered.append(Path(path).relative_to(tree).as_posix())
        return real(path)

    monkeypatch.setattr(images, "_scandir_sorted", spy)
    walk(tree, Exclusions(("node_modules/",)))
    assert "node_modules" not in entered and "node_modules/pkg" not in entered
    assert "sub/deep" in entered


def test_a_file_named_on_the_command_line_is_taken_whatever_the_patterns(tree):
    got = list(iter_image_files([tree / "sub" / "b.jpg"], exclude=Exclusions(("*.jpg",))))
    assert got == [tree / "sub" / "b.jpg"]


@pytest.mark.parametrize("pattern", ["", "   ", "a\nb"])
def test_an_empty_pattern_is_refused(pattern):
    with pytest.raises(InvalidInputError, match="--exclude"):
        Exclusions((pattern,))


def test_object_store_names_are_matched_by_the_patterns():
    rules = Exclusions(("Private/", "*.tmp"))
    assert rules.excludes_relative("2024/Private/x.jpg")
    assert rules.excludes_relative("a/b.tmp")
    assert not rules.excludes_relative("2024/trip/x.jpg")
