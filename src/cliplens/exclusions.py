"""Folders and files left out of every walk: `--exclude PATTERN` and `.cliplensignore` files.

Both use gitignore's syntax (through pathspec, as git itself reads it): `node_modules/`
leaves out every folder of that name, `Private/` too, `/exports` only the one at the top,
`*.tmp` files anywhere, `!keep.jpg` brings one back. A `--exclude` pattern is read as a
line of a `.cliplensignore` at the top of each folder walked. A `.cliplensignore` file in
any folder applies below it, its patterns relative to it, after those above (so a deeper
file can bring back what a higher one left out, as in git).

Why: caches, exports, previews and private folders have no place in a photo search
(rclip#16), and the walk (images.iter_image_files) is shared by index, search's update,
duplicates, quality, moderate and embed-dataset, so all of them leave out the same files.
A file that a catalog held and that is now left out leaves the catalog at the next update,
as a deleted one does.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cliplens.errors import InvalidInputError
from cliplens.textfile import read_text

IGNORE_FILE = ".cliplensignore"


def _spec(lines: Sequence[str], label: str):  # -> pathspec.GitIgnoreSpec
    import pathspec  # light, but only where a walk runs

    try:
        return pathspec.GitIgnoreSpec.from_lines(lines)
    except (ValueError, TypeError) as e:  # pathspec raises GitWildMatchPatternError(ValueError)
        raise InvalidInputError(f"{label}: not a gitignore pattern ({e}); fix or remove it") from e


@dataclass
class Exclusions:
    """What a walk leaves out: `patterns` (gitignore lines, as if in a `.cliplensignore` at
    each root) and the `.cliplensignore` files it meets (`ignore_files`)."""

    patterns: tuple[str, ...] = ()
    ignore_files: bool = True

    def __post_init__(self) -> None:
        for p in self.patterns:
            if not p.strip() or "\n" in p:
                raise InvalidInputError(
                    f"--exclude {p!r}: give one gitignore pattern, such as 'node_modules/' "
                    "or '*.tmp'"
                )
        self._given = _spec(list(self.patterns), "--exclude") if self.patterns else None

    def _file_spec(self, folder: str, present: bool):
        """The patterns of `folder`'s `.cliplensignore` where the walk saw one, else None."""
        if not (present and self.ignore_files):
            return None
        path = Path(folder) / IGNORE_FILE
        return _spec(
            read_text(path, IGNORE_FILE, "gitignore patterns, one a line").splitlines(), str(path)
        )

    def at_root(self, root: str, has_file: bool) -> Specs:
        """The patterns that apply in a root folder: `--exclude`'s, then its own file's
        (`has_file`: its listing holds a `.cliplensignore`)."""
        found = [(root, self._given), (root, self._file_spec(root, has_file))]
        return tuple((base, spec) for base, spec in found if spec is not None)

    def below(self, specs: Specs, folder: str, has_file: bool) -> Specs:
        """The patterns that apply in `folder`: its parent's, then its own file's."""
        own = self._file_spec(folder, has_file)
        return specs if own is None else (*specs, (folder, own))

    def excludes_relative(self, rel: str) -> bool:
        """Whether `--exclude`'s patterns leave out a file named `rel` (with / between its
        parts) below a root: for listings that are not walked, such as an object store's."""
        return self._given is not None and bool(self._given.match_file(rel))

    @staticmethod
    def excluded(specs: Specs, path: str, is_dir: bool) -> bool:
        """Whether `path` is left out: the last of the patterns that matches it decides, as in
        git (a folder's pattern also matches the folder with a trailing /)."""
        verdict = False
        for base, spec in specs:  # `path` lies below `base`: the walk made it from it
            rel = path[len(base) :].lstrip(os.sep).replace(os.sep, "/") + ("/" if is_dir else "")
            result = spec.check_file(rel)
            if result.include is not None:
                verdict = bool(result.include)
        return verdict


Specs = tuple[tuple[str, object], ...]  # (folder, its patterns), from the root down


def exclusions(patterns: Sequence[str] | None = None) -> Exclusions:
    """The exclusions of a command: its `--exclude` patterns and the `.cliplensignore` files."""
    return Exclusions(tuple(patterns or ()))
