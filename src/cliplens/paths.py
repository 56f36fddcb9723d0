"""File names that are not UTF-8: stored losslessly, shown readably.

On POSIX a file name is bytes. Python hands names that are not valid UTF-8 to us with
each undecodable byte as a lone surrogate (U+DC80..U+DCFF, PEP 383), and SQLite, Arrow
and JSON all refuse lone surrogates. So where a path is written as text it goes through
`to_text`, which spells each such byte as U+FFFF and two hex digits (U+FFFF itself,
a noncharacter no real name uses, is doubled), and `from_text` reverses it exactly.
Names that are valid UTF-8, nearly all of them, are stored unchanged, and the encoding
works character by character, so a folder's stored prefix is still the prefix of its
files' stored paths (the catalog's range scans rely on that).
"""

from __future__ import annotations

import re

_ESC = "\uffff"
_SURROGATE = re.compile("[\udc80-\udcff]")
_ESCAPED = re.compile(f"{_ESC}({_ESC}|[0-9a-f]{{2}})")


def _plain(path: str) -> bool:
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return _ESC not in path


def to_text(path: str) -> str:
    """The path as valid Unicode text that `from_text` turns back into the same path."""
    if _plain(path):
        return path
    doubled = path.replace(_ESC, _ESC + _ESC)
    return _SURROGATE.sub(lambda m: f"{_ESC}{ord(m.group()) - 0xDC00:02x}", doubled)


def from_text(text: str) -> str:
    """The path that `to_text` made `text` from."""
    if _ESC not in text:
        return text

    def back(m: re.Match[str]) -> str:
        code = m.group(1)
        return _ESC if code == _ESC else chr(0xDC00 + int(code, 16))

    return _ESCAPED.sub(back, text)


def readable(text: str) -> str:
    """A path (or any text holding one) for people: undecodable bytes as \\xNN."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        try:
            raw = text.encode("utf-8", "surrogateescape")
        except UnicodeEncodeError:  # a lone surrogate that is no file-name byte
            return text.encode("utf-8", "backslashreplace").decode("ascii", "replace")
        return raw.decode("utf-8", "backslashreplace")
    return text
