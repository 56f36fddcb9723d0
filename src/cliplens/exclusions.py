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
from dataclasses import dataclass, field
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
    _cache: dict[str, object] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        for p in self.patterns:
            if not p.strip() or "\n" in p:
                raise InvalidInputError(
                    f"--exclude {p!r}: give one gitignore pattern, such as 'node_modules/' "
                    "or '*.tmp'"
                )
        self._given = _spec(list(self.patterns), "--exclude") if self.patterns else None

    def _file_spec(self, folder: str):
        """The `.cliplensignore` of `folder`, parsed once per walk (None where there is none)."""
        if folder not in self._cache:
            path = Path(folder) / IGNORE_FILE
            spec = None
            if self.ignore_files and path.is_file():
                text = read_text(path, IGNORE_FILE, "gitignore patterns, one a line")
                spec = _spec(text.splitlines(), str(path))
            self._cache[folder] = spec
        return self._cache[folder]

    def at_root(self, root: str) -> Specs:
        """The patterns that apply in a root folder: `--exclude`'s, then its own file's."""
        found = [(root, self._given), (root, self._file_spec(root))]
        return tuple((base, spec) for base, spec in found if spec is not None)

    def below(self, specs: Specs, folder: str) -> Specs:
        """The patterns that apply in `folder`: its parent's, then its own file's."""
        own = self._file_spec(folder)
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
        for base, spec in specs:
            rel = os.path.relpath(path, base).replace(os.sep, "/") + ("/" if is_dir else "")
            result = spec.check_file(rel)
            if result.include is not None:
                verdict = bool(result.include)
        return verdict


Specs = tuple[tuple[str, object], ...]  # (folder, its patterns), from the root down
NO_EXCLUSIONS = Exclusions(ignore_files=False)


def exclusions(patterns: Sequence[str] | None = None) -> Exclusions:
    """The exclusions of a command: its `--exclude` patterns and the `.cliplensignore` files."""
    return Exclusions(tuple(patterns or ()))
