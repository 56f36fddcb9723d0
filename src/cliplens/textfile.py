"""Reading the small text files users hand in (labels, templates, policies, listings).

Every reader goes through `read_text`, so a binary file, a folder or an unreadable path
given where text was expected is one typed error naming the file and what it should be,
never a UnicodeDecodeError from deep inside a parser.
"""

from __future__ import annotations

import os
from pathlib import Path

from cliplens.errors import InvalidInputError


def read_text(
    path: str | os.PathLike,
    what: str,
    expected: str,
    error: type[InvalidInputError] = InvalidInputError,
) -> str:
    """The file's text, decoded as UTF-8 (a leading byte-order mark is dropped), with line
    endings as they are in the file. `what` names the input in errors ("policy",
    "training data"); `expected` says what it should hold ("a YAML policy"); `error` is
    the class raised, so a reader's callers catch the error they already know."""
    p = Path(path)
    try:
        data = p.read_bytes()
    except IsADirectoryError:
        raise error(f"{what} {p} is a folder; give {expected}") from None
    except FileNotFoundError:
        raise error(f"{what} {p}: no such file; give {expected}") from None
    except OSError as e:
        reason = e.strerror or type(e).__name__
        raise error(f"{what} {p} cannot be read ({reason}); give {expected}") from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise error(
            f"{what} {p} is not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start}); "
            f"give {expected}, saved as UTF-8"
        ) from None


def read_lines(
    path: str | os.PathLike,
    what: str,
    expected: str,
    *,
    comments: bool = False,
    required: bool = False,
) -> list[str]:
    """The file's lines (`str.splitlines`), stripped, blank ones left out; with `comments`,
    lines starting with "#" too. With `required`, a file with no line left is an error."""
    lines = [x.strip() for x in read_text(path, what, expected).splitlines()]
    lines = [x for x in lines if x and not (comments and x.startswith("#"))]
    if required and not lines:
        raise InvalidInputError(f"{what} {path}: no lines in it")
    return lines
