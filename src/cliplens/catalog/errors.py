"""What can go wrong with a catalog, as one-line errors that say what to do.

SQLite's errors are mapped by their name (full disk, I/O, read-only, busy, not a
database, damaged); only a damaged file is ever said to be worth moving aside.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

from cliplens.errors import ClipLensError, one_line


class CatalogError(ClipLensError):
    """The catalog cannot be opened or used."""


class CatalogReadOnlyError(CatalogError):
    """The catalog (or its folder) cannot be written: it can still be read as it is.
    `what` says what happened, without the advice (a search that goes on says its own)."""

    def __init__(self, path: Path, why: str) -> None:
        self.path, self.what = path, f"catalog {path} is read-only ({why})"
        super().__init__(f"{self.what}; search it as it is, or use a writable catalog")


class CatalogBusyError(CatalogError):
    """Another process is updating the catalog (an index run holds its lock)."""

    def __init__(self, path: Path, pid: str) -> None:
        who = f" (pid {pid})" if pid else ""
        self.path, self.pid = path, pid
        self.what = f"another cliplens index{who} is updating catalog {path}"
        super().__init__(f"{self.what}; wait for it to finish")


def not_a_catalog(path: Path) -> CatalogError:
    return CatalogError(
        f"{path} is not a cliplens catalog (not an SQLite database); give another catalog path"
    )


SQLITE_MAGIC = b"SQLite format 3\x00"


def sqlite_error(path: Path, e: sqlite3.Error) -> CatalogError:
    """A sqlite error as a one-line CatalogError that says what happened to which file and
    what to do; only a damaged file is worth moving aside."""
    name = getattr(e, "sqlite_errorname", "")
    what = one_line(e)
    if name.startswith("SQLITE_FULL"):
        return CatalogError(
            f"catalog {path}: the disk is full; free some space and run again "
            "(everything committed so far is kept)"
        )
    if name.startswith("SQLITE_IOERR") or name.startswith("SQLITE_CANTOPEN"):
        return CatalogError(
            f"catalog {path}: cannot read or write it ({what}); check that its "
            "disk has free space and is mounted, then run again; the catalog "
            "itself is not known to be damaged, keep it"
        )
    if name.startswith("SQLITE_READONLY"):
        return CatalogReadOnlyError(path, "no permission to write it or its folder")
    if name.startswith("SQLITE_BUSY") or name.startswith("SQLITE_LOCKED"):
        return CatalogError(
            f"catalog {path} is locked by another process ({what}); try again when it has finished"
        )
    if name.startswith("SQLITE_NOTADB"):
        return not_a_catalog(path)
    if name.startswith("SQLITE_CORRUPT"):
        return CatalogError(
            f"catalog {path} is damaged ({what}); restore it from a backup, "
            "or move it aside and index again"
        )
    return CatalogError(f"catalog {path}: {what}")
