"""Formatting results for people (a table) and for programs (JSON, CSV), and messages.

File names that are not UTF-8 appear in tables, JSON, CSV and messages with their odd
bytes as \\xNN (JSON and CSV must be valid UTF-8), and in tables and messages their
control characters too (a name can hold an escape sequence a terminal would obey);
`--format paths` writes the names' own bytes, so a pipe into xargs gets files that exist."""

from __future__ import annotations

import csv
import json
import re
import sys
from collections.abc import Sequence
from enum import Enum
from typing import Any

from cliplens.paths import readable

# control characters in text shown on a terminal (a file may be named with an escape
# sequence); a newline stays, as tables put one path a line in a cell
_CONTROL = re.compile(r"[\x00-\x09\x0b-\x1f\x7f-\x9f]")


def shown(text: str, newlines: bool = True) -> str:
    """Text for a terminal: undecodable bytes and control characters as \\xNN (newlines
    too, unless `newlines`)."""
    text = _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", readable(text))
    return text if newlines else text.replace("\n", "\\x0a")


def clock(seconds: float) -> str:
    """A moment of a video as people read it: 01:23, or 1:02:03 past an hour."""
    whole = int(seconds)
    h, m, sec = whole // 3600, whole // 60 % 60, whole % 60
    return f"{h}:{m:02d}:{sec:02d}" if h else f"{m:02d}:{sec:02d}"


def hit_label(path: str, time: float | None, moments: Sequence[tuple[float, float]] = ()) -> str:
    """A result's path; a video's with its moment, and its other best moments:
    "trip.mp4 @ 01:23 (also 00:12, 02:40)"."""
    if time is None:
        return path
    others = [clock(t) for t, _ in moments if abs(t - time) > 1e-6]
    also = f" (also {', '.join(others)})" if others else ""
    return f"{path} @ {clock(time)}{also}"


# Commands import the library inside their bodies, so that `cliplens --help` and every
# other command start without torch (tests/unit/test_structure.py checks --help).


class Format(str, Enum):
    table = "table"
    json = "json"
    csv = "csv"


def warn(message: str) -> None:
    print(f"warning: {shown(message)}", file=sys.stderr)


def info(message: str) -> None:
    print(shown(message), file=sys.stderr)


def _readable(data: Any) -> Any:
    if isinstance(data, str):
        return readable(data)
    if isinstance(data, dict):
        return {_readable(k): _readable(v) for k, v in data.items()}
    if isinstance(data, list | tuple):
        return [_readable(v) for v in data]
    return data


def print_json(data: Any) -> None:
    json.dump(_readable(data), sys.stdout, indent=2, ensure_ascii=False)
    sys.stdout.write("\n")


def print_csv(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    writer = csv.writer(sys.stdout, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(_readable(list(rows)))


def print_paths(paths: Sequence[str]) -> None:
    """One path a line, as the file system names them: the CLI's stdout writes
    undecodable bytes as themselves (surrogateescape, set in cli.main)."""
    for path in paths:
        print(path)


def print_table(
    header: Sequence[str], rows: Sequence[Sequence[Any]], title: str | None = None
) -> None:
    from rich.console import Console  # here: every `cliplens` run imports this module
    from rich.table import Table

    table = Table(*header, title=title, title_justify="left", header_style="bold")
    for row in rows:
        table.add_row(*(shown(str(c)) for c in row))
    # piped output keeps whole rows (a table is only as wide as its content)
    Console(width=None if sys.stdout.isatty() else 1000).print(table)


def show_progress() -> bool:
    return sys.stderr.isatty()
