"""Reading the small text files users hand in (labels, templates, policies, listings).

Every reader goes through `read_text`, so a binary file, a folder or an unreadable path
given where text was expected is one typed error naming the file and what it should be,
never a UnicodeDecodeError from deep inside a parser.
"""

from __future__ import annotations

import os
from pathlib import Path

from cliplens.errors import InvalidInputError


def read_text(path: str | os.PathLike, what: str, expected: str) -> str:
    """The file's text, decoded as UTF-8 (a leading byte-order mark is dropped), with line
    endings as they are in the file. `what` names the input in errors ("policy",
    "training data"); `expected` says what it should hold ("a YAML policy")."""
    p = Path(path)
    try:
        data = p.read_bytes()
    except IsADirectoryError:
        raise InvalidInputError(f"{what} {p} is a folder; give {expected}") from None
    except FileNotFoundError:
        raise InvalidInputError(f"{what} {p}: no such file; give {expected}") from None
    except OSError as e:
        reason = e.strerror or type(e).__name__
        raise InvalidInputError(f"{what} {p} cannot be read ({reason}); give {expected}") from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise InvalidInputError(
            f"{what} {p} is not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start}); "
            f"give {expected}, saved as UTF-8"
        ) from None
