"""Progress bars for long work: a bar with count, rate and ETA on stderr."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Protocol


class Advance(Protocol):
    """Moves a bar on by `n` items; a note (e.g. the current similarity) shows after it."""

    def __call__(self, n: int, note: str | None = None) -> None: ...


def _no_bar(n: int, note: str | None = None) -> None:
    pass


@contextmanager
def progress_bar(total: int, description: str, enabled: bool = True) -> Iterator[Advance]:
    """Yields `advance(n, note=None)`, where a note (e.g. the current similarity) is shown
    after the bar; shows nothing when disabled or when stderr is not a terminal."""
    if not enabled or total <= 0:
        yield _no_bar
        return
    # rich loads only when a bar is shown: commands without one start faster
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TaskProgressColumn,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TaskProgressColumn(),
        TextColumn("[progress.data.speed]{task.fields[rate]}"),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
        TextColumn("{task.fields[note]}"),
    )
    with Progress(*columns, console=Console(stderr=True), transient=False) as bar:
        task = bar.add_task(description, total=total, rate="", note="")

        def advance(n: int, note: str | None = None) -> None:
            bar.advance(task, n)
            if note is not None:
                bar.update(task, note=note)
            speed = bar.tasks[task].speed
            if speed:
                bar.update(task, rate=f"{speed:.1f}/s")

        yield advance
