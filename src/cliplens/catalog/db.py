"""The catalog: one SQLite file (WAL) holding files and their embeddings per model.

Embeddings are keyed by (model, content hash), not by path, so a renamed, moved or
copied photo reuses its embedding and several models coexist. Every write happens in
a transaction; `generation` counts committed changes so readers can tell when their
cached vector matrix is stale. Readers never block the indexer (WAL).
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from cliplens.catalog import frames
from cliplens.catalog.errors import (
    SQLITE_MAGIC,
    CatalogBusyError,
    CatalogError,
    CatalogReadOnlyError,
    not_a_catalog,
    sqlite_error,
)
from cliplens.catalog.schema import MIGRATIONS, SCHEMA_VERSION
from cliplens.catalog.vectors import CatalogSearch
from cliplens.errors import ImageNotFoundError, InvalidInputError
from cliplens.paths import from_text, to_text
from cliplens.settings import get_settings

__all__ = [
    "Catalog",
    "CatalogBusyError",
    "CatalogError",
    "CatalogReadOnlyError",
    "FileRow",
    "open_catalog",
]

#: a file the indexer read as an image, or one it could not read
FileStatus = Literal["ok", "failed"]
#: a photo, or a video (searched by its moments: catalog/frames.py)
FileKind = Literal["image", "video"]


@dataclass(frozen=True)
class FileRow:
    id: int
    path: str
    size: int
    mtime_ns: int
    hash: str | None
    status: FileStatus
    error: str | None
    kind: FileKind = "image"


_FILE_COLUMNS = "id, path, size, mtime_ns, hash, status, error, kind"


def _file_row(r: tuple) -> FileRow:
    return FileRow(r[0], from_text(r[1]), *r[2:])


def default_db_path() -> Path:
    return get_settings().home / "catalog.db"


def open_catalog(path: str | os.PathLike[str] | None = None, readonly: bool = False) -> Catalog:
    """The photo catalog of `cliplens index` (default: CLIPLENS_HOME/catalog.db).

    Why: one call for what search, similar and duplicates read, and what `update_catalog`
    writes; `readonly` opens an existing catalog without writing a byte.

    >>> import cliplens
    >>> catalog = cliplens.open_catalog(readonly=True)
    >>> cliplens.search(catalog, cliplens.load_model("offline"), "a cat", n=3)
    """
    return Catalog(path, readonly=readonly)


def folder_range(folder: str | os.PathLike) -> tuple[str, str]:
    """[low, high) bounds of the stored paths under an absolute folder, for an indexed
    range scan."""
    prefix = to_text(os.fspath(folder)).rstrip(os.sep) + os.sep
    return prefix, prefix[:-1] + chr(ord(os.sep) + 1)


class Catalog(CatalogSearch):
    """Files, content hashes and embeddings per model, in one SQLite database; searchable
    (the `Searchable` protocol: see catalog/vectors.py `CatalogSearch`).

    Why: a photo is encoded once, whatever its path, and found again by any model's query.

    >>> import cliplens
    >>> with cliplens.Catalog("photos.db", readonly=True) as catalog:
    ...     cliplens.search(catalog, cliplens.load_model("offline"), "a cat")
    """

    def __init__(self, path: str | os.PathLike | None = None, readonly: bool = False) -> None:
        self.path = Path(path) if path else default_db_path()
        self.readonly = readonly
        if readonly and not self.path.exists():
            raise CatalogError(
                f"catalog {self.path} does not exist; run 'cliplens index DIR' first"
            )
        self._check_header()
        if not readonly:
            self._check_writable()
        try:
            if not readonly:
                self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            reason = e.strerror or e
            raise CatalogError(f"catalog {self.path}: cannot create its folder ({reason})") from e
        try:
            self.db = self._connect()
            self._migrate()
        except sqlite3.Error as e:
            raise sqlite_error(self.path, e) from e
        self._model_ids: dict[str, int] = {}

    def _check_header(self) -> None:
        """Refuse a file that is not an SQLite database, before SQLite, which takes a file
        shorter than its header for an empty database, writes over it."""
        try:
            with self.path.open("rb") as f:
                head = f.read(len(SQLITE_MAGIC))
        except FileNotFoundError:
            return
        except IsADirectoryError:
            raise CatalogError(f"catalog {self.path} is a folder; give a file path") from None
        except NotADirectoryError:
            raise CatalogError(
                f"catalog {self.path}: a part of its folder is a file; give another path"
            ) from None
        except OSError as e:
            raise CatalogError(f"catalog {self.path} cannot be read ({e.strerror})") from None
        if head and head != SQLITE_MAGIC:
            raise not_a_catalog(self.path)

    def _check_writable(self) -> None:
        """A catalog to update must be writable, and so must its folder (SQLite keeps its
        journal there); access(2) also says no on a read-only file system, even to root."""
        folder = self.path.parent
        for what in (self.path, folder):
            if what.exists() and not os.access(what, os.W_OK):
                whose = "it" if what == self.path else "its folder"
                raise CatalogReadOnlyError(self.path, f"no permission to write {whose}")

    def _connect(self) -> sqlite3.Connection:
        if self.readonly:
            db = self._connect_readonly()
            self._refuse_foreign(db)
            return db
        db = sqlite3.connect(self.path, timeout=30, isolation_level=None)
        self._refuse_foreign(db)  # before the journal switch, which writes to the file
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")
        db.execute("PRAGMA foreign_keys=ON")
        return db

    def _connect_readonly(self) -> sqlite3.Connection:
        """No journal change (that is a write). A WAL catalog in a folder nobody can write
        (no -shm file can be made there, so SQLite cannot open it) is read as immutable:
        safe, as nothing can change it there, unless a -wal file holds changes that
        immutable reading would not see."""
        uri = self.path.resolve().as_uri()
        db = sqlite3.connect(f"{uri}?mode=ro", uri=True, timeout=30, isolation_level=None)
        try:
            db.execute("SELECT count(*) FROM sqlite_master").fetchone()
            return db
        except sqlite3.OperationalError as e:
            db.close()
            cannot_open = getattr(e, "sqlite_errorname", "") == "SQLITE_CANTOPEN"
            if not cannot_open or os.access(self.path.parent, os.W_OK):
                raise
        if self._unmerged_wal():
            raise CatalogError(
                f"catalog {self.path}: its recent changes (in {self.path.name}-wal) cannot "
                "be read where the folder is read-only; open it once where it is writable"
            )
        uri = f"{uri}?mode=ro&immutable=1"
        return sqlite3.connect(uri, uri=True, timeout=30, isolation_level=None)

    def close(self) -> None:
        self.db.close()

    def __enter__(self) -> Catalog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------ schema

    def _version(self) -> int:
        return int(self.db.execute("PRAGMA user_version").fetchone()[0])

    def _unmerged_wal(self) -> bool:
        wal = self.path.with_name(self.path.name + "-wal")
        try:
            return wal.stat().st_size > 0
        except OSError:
            return False

    def _refuse_foreign(self, db: sqlite3.Connection) -> None:
        """Refuse, without writing a byte, a database this cliplens must not change."""
        version = int(db.execute("PRAGMA user_version").fetchone()[0])
        if version == 0 and db.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]:
            raise CatalogError(
                f"{self.path} is an SQLite database of another program, not a "
                "cliplens catalog; give another catalog path"
            )
        if version > SCHEMA_VERSION:
            raise CatalogError(
                f"catalog {self.path} was written by a newer cliplens (schema {version}, this "
                f"one reads up to {SCHEMA_VERSION}); upgrade cliplens or use another catalog"
            )

    def _migrate(self) -> None:
        version = self._version()
        if self.readonly and version == 0:
            raise CatalogError(f"catalog {self.path} is empty; run 'cliplens index DIR' first")
        if self.readonly and version < SCHEMA_VERSION:
            raise CatalogError(
                f"catalog {self.path} needs upgrading (schema {version}); index "
                "it once with this cliplens"
            )
        while version < SCHEMA_VERSION:
            # one script, one transaction: a migration lands whole or not at all. The
            # version is read again under the write lock: another process that opened the
            # catalog at the same time may have upgraded it while this one waited
            with self.transaction() as db:
                version = self._version()
                if version >= SCHEMA_VERSION:
                    break
                for statement in _statements(MIGRATIONS[version]):
                    db.execute(statement)
                db.execute(f"PRAGMA user_version={version + 1}")
            version += 1

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """One atomic unit of work: all of it lands, or none of it (a kill loses only this)."""
        try:
            self.db.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as e:
            raise sqlite_error(self.path, e) from e
        try:
            yield self.db
            self.db.execute("COMMIT")
        except BaseException as e:
            with contextlib.suppress(sqlite3.Error):
                self.db.execute("ROLLBACK")
            self._model_ids.clear()  # a model added inside is gone again
            if isinstance(e, sqlite3.Error):
                raise sqlite_error(self.path, e) from e
            raise

    @contextmanager
    def updating(self) -> Iterator[None]:
        """Held while one process brings the catalog up to date, so that a second indexer
        (or a search that would index) does not encode the same files again: it gets
        CatalogBusyError at once. An OS lock (flock), so a killed holder releases it."""
        try:
            import fcntl  # optional: POSIX only (Windows has no flock)
        except ImportError:  # no flock on this platform: no guard
            yield
            return
        lock = self.path.with_name(self.path.name + ".lock")
        writable = True
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)
        except PermissionError:  # another user's lock file: flock works read-only too
            fd, writable = os.open(lock, os.O_RDONLY), False
        except OSError as e:
            why = f"cannot create its lock file {lock}: {(e.strerror or str(e)).lower()}"
            raise CatalogReadOnlyError(self.path, why) from e
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise CatalogBusyError(self.path, os.pread(fd, 32, 0).decode().strip()) from None
            if writable:  # the holder's pid, for the message the next one gets
                os.ftruncate(fd, 0)
                os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
            yield
        finally:
            os.close(fd)  # closing releases the lock

    def _bump(self) -> None:
        self.db.execute("UPDATE meta SET value = value + 1 WHERE key = 'generation'")

    @property
    def generation(self) -> int:
        return int(self.db.execute("SELECT value FROM meta WHERE key='generation'").fetchone()[0])

    # ------------------------------------------------------------ models

    def has_model(self, model_id: str) -> bool:
        """Whether the catalog has ever held vectors of `model_id`."""
        found = self.db.execute("SELECT 1 FROM models WHERE model_id=?", (model_id,))
        return found.fetchone() is not None

    def model_key(self, model_id: str, dim: int) -> int:
        if model_id in self._model_ids:
            return self._model_ids[model_id]
        row = self.db.execute("SELECT id, dim FROM models WHERE model_id=?", (model_id,)).fetchone()
        if row is None:
            self.db.execute(
                "INSERT OR IGNORE INTO models (model_id, dim) VALUES (?, ?)", (model_id, dim)
            )
            row = self.db.execute(
                "SELECT id, dim FROM models WHERE model_id=?", (model_id,)
            ).fetchone()
        if row[1] != dim:
            raise CatalogError(f"model {model_id} is stored with dim {row[1]}, not {dim}")
        self._model_ids[model_id] = row[0]
        return row[0]

    # ------------------------------------------------------------ files

    def files_under(self, folders: Sequence[str | os.PathLike]) -> dict[str, FileRow]:
        rows: dict[str, FileRow] = {}
        for folder in folders:
            low, high = folder_range(folder)
            for r in self.db.execute(
                f"SELECT {_FILE_COLUMNS} FROM files WHERE (path >= ? AND path < ?) OR path = ?",
                (low, high, to_text(os.fspath(folder))),
            ):
                row = _file_row(r)
                rows[row.path] = row
        return rows

    def file(self, file_id: int) -> FileRow | None:
        """The file with this id, or None."""
        query = f"SELECT {_FILE_COLUMNS} FROM files WHERE id=?"
        r = self.db.execute(query, (int(file_id),)).fetchone()
        return _file_row(r) if r else None

    def hashes_with_embedding(self, model: int) -> set[str]:
        return {
            h for (h,) in self.db.execute("SELECT hash FROM embeddings WHERE model=?", (model,))
        }

    def upsert_files(
        self,
        rows: Iterable[tuple],
    ) -> None:
        """(path, size, mtime_ns, hash, status, error[, kind]) rows (kind: "image" when
        left out); call inside a transaction."""
        now = time.time()
        rows = [(to_text(r[0]), *r[1:6], r[6] if len(r) > 6 else "image") for r in rows]
        if self._replaces_content(rows):
            self._mark_garbage()
        self.db.executemany(
            "INSERT INTO files (path, size, mtime_ns, hash, status, error, kind, updated_at) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT(path) DO UPDATE SET size=excluded.size, "
            "mtime_ns=excluded.mtime_ns, hash=excluded.hash, status=excluded.status, "
            "error=excluded.error, kind=excluded.kind, updated_at=excluded.updated_at",
            [(*r, now) for r in rows],
        )
        self._bump()

    def _replaces_content(self, rows: list[tuple]) -> bool:
        """Whether any of these (stored path, ..., hash, ...) rows gives a known file
        other content, which may leave the old content's embedding unused."""
        for start in range(0, len(rows), 500):
            chunk = rows[start : start + 500]
            marks = ",".join("?" * len(chunk))
            old = dict(
                self.db.execute(
                    f"SELECT path, hash FROM files WHERE path IN ({marks})", [r[0] for r in chunk]
                )
            )
            if any(r[0] in old and old[r[0]] != r[3] for r in chunk):
                return True
        return False

    def _mark_garbage(self) -> None:
        """Record, in the transaction that may orphan embeddings, that some may be unused:
        the flag is committed with the change, so a run killed before `collect_garbage`
        leaves it for the next one."""
        self.db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('garbage', '1')")

    @property
    def garbage_pending(self) -> bool:
        row = self.db.execute("SELECT value FROM meta WHERE key = 'garbage'").fetchone()
        return row is not None and row[0] == "1"

    def put_embeddings(self, model: int, hashes: Sequence[str], vectors: np.ndarray) -> None:
        """Store float16 vectors by content hash; call inside a transaction."""
        blobs = np.ascontiguousarray(vectors, dtype="<f2")
        self.db.executemany(
            "INSERT OR REPLACE INTO embeddings (model, hash, vector) VALUES (?, ?, ?)",
            [(model, h, blobs[i].tobytes()) for i, h in enumerate(hashes)],
        )
        self._bump()

    def remove_files(self, paths: Iterable[str]) -> int:
        """Forget files; inside a transaction."""
        n = 0
        for path in paths:
            n += self.db.execute("DELETE FROM files WHERE path=?", (to_text(path),)).rowcount
        if n:
            self._mark_garbage()
            self._bump()
        return n

    def collect_garbage(self) -> int:
        """Drop embeddings that no file refers to any more (deleted or changed content),
        and the moments of videos no file holds."""
        self.db.execute(frames.GARBAGE_SQL[0])
        n = self.db.execute(frames.GARBAGE_SQL[1]).rowcount
        self.db.execute("DELETE FROM meta WHERE key = 'garbage'")
        if n:
            self._bump()
        return n

    # ------------------------------------------------------------ reading vectors

    def vectors(self, model_id: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(row ids, content keys, float16 matrix) of every readable photo and video moment
        embedded by the model, by row id (a photo's is its file id; a moment's:
        catalog/frames.py). A content key is the first 60 bits of the file's hash (with a
        moment's time mixed in: `frames.content_key`): it changes when the file does, which
        tells an ANN index which rows to replace."""
        row = self.db.execute("SELECT id, dim FROM models WHERE model_id=?", (model_id,)).fetchone()
        if row is None:
            return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros((0, 0), np.float16)
        model, dim = row
        rows = self.db.execute(frames.VECTORS_SQL, {"model": model}).fetchall()
        ids = np.fromiter((r[0] for r in rows), np.int64, len(rows))
        keys = np.fromiter((frames.content_key(r[1], r[3]) for r in rows), np.int64, len(rows))
        matrix = np.frombuffer(b"".join(r[2] for r in rows), "<f2").reshape(len(rows), dim)
        return ids, keys, matrix

    def holds_only(self, folders: Sequence[str | os.PathLike]) -> bool:
        """True when every file in the catalog lies under one of `folders` (absolute):
        then a folder filter excludes nothing. Two index lookups, whatever the size."""
        for folder in folders:
            low, high = folder_range(folder)
            outside = self.db.execute(
                "SELECT 1 FROM files WHERE path < ? OR path >= ? LIMIT 1", (low, high)
            ).fetchone()
            if outside is None:
                return True
        return False

    def count_embedded(self, model_id: str) -> int:
        """How many readable photos and video moments have an embedding by the model (rows
        of `vectors`)."""
        row = self.db.execute("SELECT id FROM models WHERE model_id = ?", (model_id,)).fetchone()
        if row is None:
            return 0
        return int(self.db.execute(frames.COUNT_SQL, {"model": row[0]}).fetchone()[0])

    def paths(self, ids: Iterable[int]) -> dict[int, str]:
        ids = [int(i) for i in ids]
        out: dict[int, str] = {}
        for start in range(0, len(ids), 500):
            chunk = ids[start : start + 500]
            marks = ",".join("?" * len(chunk))
            found = self.db.execute(f"SELECT id, path FROM files WHERE id IN ({marks})", chunk)
            out.update((i, from_text(p)) for i, p in found)
        return out

    def ids_under(self, folders: Sequence[str | os.PathLike]) -> np.ndarray:
        ids: list[int] = []
        for folder in folders:
            low, high = folder_range(folder)
            found = self.db.execute(
                "SELECT id FROM files WHERE (path >= ? AND path < ?) OR path = ?",
                (low, high, to_text(os.fspath(folder))),
            )
            ids += [i for (i,) in found]
        return np.asarray(sorted(set(ids)), np.int64)

    def ids_within(self, folders: Sequence[str | os.PathLike[str]]) -> np.ndarray | None:
        """The ids of the files under `folders` (as given: resolved here), or None when
        every file is under them, so that a filter would exclude nothing."""
        resolved = resolve_folders(folders)
        return None if self.holds_only(resolved) else self.ids_under(resolved)

    def embedding_of(self, path: str, model_id: str) -> np.ndarray | None:
        r = self.db.execute(
            "SELECT e.vector FROM files f JOIN embeddings e ON e.hash = f.hash "
            "JOIN models m ON m.id = e.model WHERE f.path = ? AND m.model_id = ?",
            (to_text(path), model_id),
        ).fetchone()
        return np.frombuffer(r[0], "<f2").astype(np.float32) if r else None

    def fresh_embeddings(self, paths: Sequence[str], model_id: str) -> dict[str, np.ndarray]:
        """Stored embeddings of those paths whose file is unchanged since it was indexed
        (same size and mtime), as float32 rows keyed by path."""
        out: dict[str, np.ndarray] = {}
        for start in range(0, len(paths), 500):
            chunk = [to_text(p) for p in paths[start : start + 500]]
            marks = ",".join("?" * len(chunk))
            rows = self.db.execute(
                "SELECT f.path, f.size, f.mtime_ns, e.vector FROM files f "
                "JOIN embeddings e ON e.hash = f.hash JOIN models m ON m.id = e.model "
                f"WHERE m.model_id = ? AND f.status = 'ok' AND f.path IN ({marks})",
                (model_id, *chunk),
            ).fetchall()
            for stored, size, mtime_ns, blob in rows:
                path = from_text(stored)
                try:
                    st = Path(path).stat()
                except OSError:
                    continue
                if (st.st_size, st.st_mtime_ns) == (size, mtime_ns):
                    out[path] = np.frombuffer(blob, "<f2").astype(np.float32)
        return out

    def failures(self) -> list[tuple[str, str]]:
        rows = self.db.execute("SELECT path, error FROM files WHERE status='failed' ORDER BY path")
        return [(from_text(p), e) for p, e in rows]

    def duplicate_hashes(self, folders: Sequence[str | os.PathLike]) -> list[list[str]]:
        """Groups of paths with identical content (same hash), under the folders."""
        under = set(self.files_under(folders))
        groups: dict[str, list[str]] = {}
        for path, h in self.db.execute(
            "SELECT path, hash FROM files WHERE hash IN "
            "(SELECT hash FROM files WHERE hash IS NOT NULL GROUP BY hash HAVING COUNT(*) > 1) "
            "ORDER BY hash, path"
        ):
            path = from_text(path)
            if path in under:
                groups.setdefault(h, []).append(path)
        return [g for g in groups.values() if len(g) > 1]

    def integrity_check(self) -> str:
        return self.db.execute("PRAGMA integrity_check").fetchone()[0]


def resolve_folders(roots: Sequence[str | os.PathLike]) -> list[str]:
    """Absolute, resolved paths, as the catalog stores them; a missing one is an error."""
    if not roots:
        raise InvalidInputError("name at least one folder to index")
    out = []
    for root in roots:
        p = Path(root).expanduser()
        if not p.exists():
            raise ImageNotFoundError(str(root), "no such file or folder")
        out.append(str(p.resolve()))
    return out


def _statements(script: str) -> Iterator[str]:
    """The SQL statements of a script, one at a time (`executescript` would commit the
    transaction they must run in)."""
    pending = ""
    for piece in script.split(";"):
        pending += piece + ";"
        if sqlite3.complete_statement(pending):  # not a ';' inside a string or a trigger
            if pending.strip(" \n\t;"):
                yield pending.strip()
            pending = ""
