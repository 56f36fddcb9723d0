"""Keeping a catalog in shape: what it holds (`catalog_info`), whether it is sound
(`check_catalog`), giving back the space deleted rows left (`vacuum_catalog`), and
folding another catalog into it (`merge_catalogs`).

Nothing here invents a second way to change a catalog: garbage goes through
`Catalog.collect_garbage`, rows through `upsert_files` and `put_embeddings`, work that
must land whole through `Catalog.transaction`, and a second writer is kept out by the
indexer's lock (`Catalog.updating`). SQLite's VACUUM is atomic by itself. Videos'
moments are counted, checked and merged by upkeep_videos.py.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cliplens.catalog import upkeep_videos as videos
from cliplens.catalog.db import SCHEMA_VERSION, Catalog, default_db_path
from cliplens.catalog.errors import SQLITE_MAGIC, CatalogError, not_a_catalog, sqlite_error
from cliplens.catalog.vectors import cache_dir
from cliplens.errors import InvalidInputError
from cliplens.paths import from_text
from cliplens.progress import progress_bar

__all__ = [
    "CatalogInfo",
    "CatalogSize",
    "CheckReport",
    "MergeReport",
    "ModelCount",
    "VacuumReport",
    "catalog_info",
    "catalog_size",
    "check_catalog",
    "merge_catalogs",
    "open_existing",
    "vacuum_catalog",
]

_CHUNK = 500  # rows per IN (...) list and per batch read from another catalog


def open_existing(path: str | os.PathLike[str] | None = None) -> Catalog:
    """A catalog that must exist already, opened for writing (`open_catalog` would make
    a new, empty one at a mistyped path)."""
    catalog_path = Path(path) if path else default_db_path()
    if not catalog_path.exists():
        raise CatalogError(f"catalog {catalog_path} does not exist; run 'cliplens index DIR' first")
    return Catalog(catalog_path)


# ------------------------------------------------------------------ info


@dataclass(frozen=True)
class CatalogSize:
    """Bytes on disk of a catalog's files: the database, its write-ahead log and shared
    memory, and the vector caches beside it (`.db.vectors/`: rebuilt when missing)."""

    db: int
    wal: int
    shm: int
    vectors: int

    @property
    def database(self) -> int:
        """What VACUUM can shrink: the database and its log."""
        return self.db + self.wal

    @property
    def total(self) -> int:
        return self.db + self.wal + self.shm + self.vectors

    def to_dict(self) -> dict[str, int]:
        return asdict(self) | {"total": self.total}


def _bytes(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def _folder_bytes(folder: Path) -> int:
    total = 0
    for root, _, names in os.walk(folder):
        total += sum(_bytes(Path(root) / name) for name in names)
    return total


def catalog_size(catalog: Catalog) -> CatalogSize:
    """The sizes of the files that make up the catalog (0 for those missing)."""
    db = catalog.path
    return CatalogSize(
        db=_bytes(db),
        wal=_bytes(db.with_name(db.name + "-wal")),
        shm=_bytes(db.with_name(db.name + "-shm")),
        vectors=_folder_bytes(cache_dir(catalog)),
    )


@dataclass(frozen=True)
class ModelCount:
    """A model in the catalog: its vectors (one per content hash: photos, videos' own
    rows and their moments), the readable files they cover (more than the vectors when
    files share content), the videos among those files, and its moments' vectors (one
    per moment of a video's content)."""

    model_id: str
    dim: int
    embeddings: int
    files: int
    videos: int = 0
    moments: int = 0


@dataclass
class CatalogInfo:
    """What `cliplens catalog info` shows.

    >>> import cliplens
    >>> from cliplens.catalog.upkeep import catalog_info
    >>> catalog_info(cliplens.open_catalog(readonly=True)).files  # {'ok': 812, 'failed': 3}
    """

    path: str
    schema: int
    generation: int
    files: dict[str, int]  # by status; "ok" and "failed" always present
    models: list[ModelCount]
    size: CatalogSize
    garbage_pending: bool  # embeddings may be unused since a killed run (vacuum drops them)
    videos: dict[str, int] = field(default_factory=dict)  # video files by status (in `files`)
    moments: int = 0  # moments stored, one set per video content

    @property
    def failed(self) -> int:
        return self.files.get("failed", 0)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self) | {"size": self.size.to_dict()}
        return d | {"total_files": sum(self.files.values()), "failed": self.failed}


def catalog_info(catalog: Catalog) -> CatalogInfo:
    """Counts and sizes of a catalog, read in one snapshot (an index run may be
    committing meanwhile).

    Why: how big it is, what it holds, by which models, and whether files failed."""
    with _snapshot(catalog):
        try:
            return _info(catalog)
        except sqlite3.Error as e:
            raise sqlite_error(catalog.path, e) from e


def _info(catalog: Catalog) -> CatalogInfo:
    db = catalog.db
    files = {"ok": 0, "failed": 0}
    files.update(db.execute("SELECT status, count(*) FROM files GROUP BY status").fetchall())
    keys = dict(db.execute("SELECT model_id, id FROM models"))
    models = [
        ModelCount(m.model_id, m.dim, m.count, *videos.model_video_counts(db, keys[m.model_id]))
        for m in catalog.models()
    ]
    video_files, moments = videos.video_counts(db)
    return CatalogInfo(
        path=str(catalog.path.resolve()),
        schema=_user_version(db),
        generation=catalog.generation,
        files=files,
        models=models,
        size=catalog_size(catalog),
        garbage_pending=catalog.garbage_pending,
        videos=video_files,
        moments=moments,
    )


@contextlib.contextmanager
def _snapshot(catalog: Catalog) -> Iterator[None]:
    """One read transaction: every query inside sees the same committed state."""
    try:
        catalog.db.execute("BEGIN")
    except sqlite3.Error as e:
        raise sqlite_error(catalog.path, e) from e
    try:
        yield
    finally:
        with contextlib.suppress(sqlite3.Error):
            catalog.db.execute("ROLLBACK")


def _user_version(db: sqlite3.Connection) -> int:
    return int(db.execute("PRAGMA user_version").fetchone()[0])


# ------------------------------------------------------------------ check


@dataclass
class CheckReport:
    """What `cliplens catalog check` found; `healthy` when none of it is a problem.

    Orphans are embeddings no file refers to, orphan frames the moments of videos no
    file holds, orphan moments moment embeddings whose frame is gone (left by a run
    killed before it collected its garbage, or by damage: `vacuum_catalog` drops them);
    unembedded files are readable files that have no embedding by any model, incomplete
    videos videos a model marked embedded whose moments lack its embeddings or are gone
    in part (indexing leaves neither: a damaged or hand-edited catalog; `vacuum_catalog`
    unmarks such videos, so the next index run embeds them again); bad vectors are
    embeddings whose size is not their model's dim; missing files are recorded but no
    longer on disk (the next `cliplens index` of their folder forgets them). Files named
    by URI are not looked for.

    >>> import cliplens
    >>> from cliplens.catalog.upkeep import check_catalog
    >>> report = check_catalog(cliplens.open_catalog(readonly=True))
    >>> report.healthy, report.problems()
    """

    path: str
    integrity: list[str] = field(default_factory=list)  # SQLite's messages; empty: sound
    foreign_keys: int = 0  # embeddings of a model the catalog does not list
    orphans: dict[str, int] = field(default_factory=dict)  # model_id -> embeddings
    orphan_frames: int = 0  # moments of videos no file holds
    orphan_moments: dict[str, int] = field(default_factory=dict)  # model_id -> embeddings
    incomplete_videos: dict[str, list[str]] = field(default_factory=dict)  # model_id -> paths
    bad_vectors: dict[str, int] = field(default_factory=dict)  # model_id -> embeddings
    unembedded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    files: int = 0  # files recorded
    not_checked: int = 0  # files named by URI: not looked for on disk

    @property
    def healthy(self) -> bool:
        return not self.problems()

    def problems(self) -> list[str]:
        """One line per kind of problem, with what to do about it."""
        found = [f"integrity: {line}" for line in self.integrity]
        if self.foreign_keys:
            found.append(f"{self.foreign_keys} embeddings belong to no model the catalog lists")
        for model_id, n in self.orphans.items():
            found.append(
                f"{n} embeddings of {model_id} belong to no file (orphans); "
                "'cliplens catalog vacuum' removes them"
            )
        if self.orphan_frames:
            found.append(
                f"{self.orphan_frames} moments belong to videos no file holds (orphan frames); "
                "'cliplens catalog vacuum' removes them and their embeddings"
            )
        for model_id, n in self.orphan_moments.items():
            found.append(
                f"{n} moment embeddings of {model_id} belong to no moment (orphans); "
                "'cliplens catalog vacuum' removes them"
            )
        for model_id, paths in self.incomplete_videos.items():
            found.append(
                f"{len(paths)} videos embedded by {model_id} lack some of their moments or "
                "their embeddings; 'cliplens catalog vacuum', then 'cliplens index' of their "
                "folders, embeds them again"
            )
        for model_id, n in self.bad_vectors.items():
            found.append(f"{n} embeddings of {model_id} do not have the model's size")
        if self.unembedded:
            found.append(
                f"{len(self.unembedded)} readable files have no embedding by any model; "
                "index their folders again"
            )
        if self.missing:
            found.append(
                f"{len(self.missing)} files are recorded but missing on disk; "
                "'cliplens index' of their folders forgets them"
            )
        return found

    def to_dict(self) -> dict[str, Any]:
        return asdict(self) | {"healthy": self.healthy, "problems": self.problems()}


def check_catalog(catalog: Catalog, progress: bool = False) -> CheckReport:
    """SQLite's integrity check, then the catalog's own invariants, then every recorded
    file looked for on disk (with `progress`, a bar over the files).

    Why: tell a sound catalog from one that needs vacuuming, re-indexing or restoring,
    without changing a byte of it (open it read-only)."""
    report = CheckReport(str(catalog.path.resolve()))
    try:
        _check_rows(catalog, report)
        _check_files(catalog, report, progress)
    except sqlite3.Error as e:
        raise sqlite_error(catalog.path, e) from e
    return report


def _check_rows(catalog: Catalog, report: CheckReport) -> None:
    db = catalog.db
    lines = [row[0] for row in db.execute("PRAGMA integrity_check(100)")]
    report.integrity = [] if lines == ["ok"] else lines
    report.foreign_keys = len(db.execute("PRAGMA foreign_key_check(embeddings)").fetchall())
    report.orphans = videos.orphans(db)
    report.orphan_frames = videos.orphan_frames(db)
    report.orphan_moments = videos.orphan_moments(db)
    report.incomplete_videos = videos.incomplete_videos(db)
    report.bad_vectors = dict(
        db.execute(
            "SELECT m.model_id, count(*) FROM embeddings e JOIN models m ON m.id = e.model "
            "WHERE length(e.vector) != 2 * m.dim GROUP BY m.id ORDER BY m.model_id"
        ).fetchall()
    )
    # by (model, hash), the embeddings' key, once per model (CROSS JOIN keeps SQLite
    # from scanning every embedding for each file instead)
    unembedded = db.execute(
        "SELECT path FROM files f WHERE status = 'ok' AND (hash IS NULL OR NOT EXISTS "
        "(SELECT 1 FROM models m CROSS JOIN embeddings e WHERE e.model = m.id "
        "AND e.hash = f.hash)) ORDER BY path"
    )
    report.unembedded = [from_text(p) for (p,) in unembedded]


def _check_files(catalog: Catalog, report: CheckReport, progress: bool) -> None:
    from cliplens.images import is_remote  # Pillow: only once the rows are checked

    db = catalog.db
    report.files = int(db.execute("SELECT count(*) FROM files").fetchone()[0])
    with progress_bar(report.files, "looking for files", progress) as advance:
        for (stored,) in db.execute("SELECT path FROM files ORDER BY path"):
            path = from_text(stored)
            if is_remote(path):
                report.not_checked += 1
            elif not Path(path).exists():
                report.missing.append(path)
            advance(1)


# ------------------------------------------------------------------ vacuum


@dataclass(frozen=True)
class VacuumReport:
    """Bytes of the database and its log before and after, and what was dropped first:
    unused embeddings (`garbage`), moments (`frames`: of videos no file holds, and of
    videos some of whose moments were gone), and the marks of videos whose moments lack
    a model's embeddings (`videos_unmarked`: the next index run over them embeds them
    again)."""

    path: str
    before: int
    after: int
    garbage: int
    frames: int = 0
    videos_unmarked: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def vacuum_catalog(catalog: Catalog) -> VacuumReport:
    """Drop embeddings no file refers to and moments of videos no file holds, unmark
    videos embedded without all their moments, then rewrite the database without its free
    pages (SQLite's VACUUM, atomic: a kill leaves the catalog as it was) and fold the
    write-ahead log back into it.

    Why: deleted photos leave free pages that SQLite reuses but never gives back. Holds
    the indexer's lock: while an index run updates the catalog this raises
    CatalogBusyError at once.

    >>> import cliplens
    >>> from cliplens.catalog.upkeep import vacuum_catalog
    >>> report = vacuum_catalog(cliplens.open_catalog())
    >>> report.before, report.after
    """
    if catalog.readonly:
        raise CatalogError(f"catalog {catalog.path} was opened read-only; it cannot be vacuumed")
    with catalog.updating():
        before = catalog_size(catalog).database
        with catalog.transaction() as db:
            frames = videos.frame_count(db)
            unmarked = videos.drop_incomplete_marks(db)
            if unmarked:
                catalog._bump()  # the videos' own rows are gone: caches of them are stale
            garbage = catalog.collect_garbage()
            frames -= videos.frame_count(db)
        try:
            catalog.db.execute("VACUUM")
            catalog.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        except sqlite3.Error as e:
            raise sqlite_error(catalog.path, e) from e
        after = catalog_size(catalog).database
    return VacuumReport(str(catalog.path.resolve()), before, after, garbage, frames, unmarked)


# ------------------------------------------------------------------ merge


@dataclass
class MergeReport:
    """What `merge_catalogs` copied. A path both catalogs hold keeps the record with the
    later mtime (the file as it was last seen); on a tie, the catalog's own. A video
    sampled at other moments in the other catalog keeps its own moments, and none of the
    other's embeddings of it are copied (`video_conflicts`: a path of each such video;
    the next index run by a model it lacks embeds it at its own moments).

    >>> import cliplens
    >>> from cliplens.catalog.upkeep import merge_catalogs
    >>> merge_catalogs(cliplens.open_catalog(), "laptop.db").to_dict()
    """

    other: str
    files_added: int = 0  # paths the catalog did not hold
    files_replaced: int = 0  # paths whose record in the other catalog is newer
    files_kept: int = 0  # paths whose own record is as new or newer
    embeddings_added: int = 0  # photos', videos' own and moments' vectors
    models_added: list[str] = field(default_factory=list)
    frames_added: int = 0  # moments of videos, copied with the videos
    video_conflicts: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def merge_catalogs(
    catalog: Catalog, other: str | os.PathLike[str], progress: bool = False
) -> MergeReport:
    """Copy another catalog's files, videos' moments and embeddings into `catalog`, in
    one transaction: a kill leaves it as it was. Embeddings are keyed by (model, content
    hash or moment), so none is stored twice and merging again adds nothing; models it
    lacks arrive with their dim. Refuses the catalog itself, another schema, and a model
    stored with another dim.

    Why: a laptop's and a desktop's catalogs, or one per disk, searched as one.
    """
    if catalog.readonly:
        raise CatalogError(
            f"catalog {catalog.path} was opened read-only; nothing can merge into it"
        )
    source = Path(other)
    _refuse_self(catalog, source)
    _require_schema(catalog, source)
    report = MergeReport(str(source.resolve()))
    with Catalog(source, readonly=True) as theirs, _snapshot(theirs), catalog.updating():
        models = _models_to_merge(catalog, theirs, report)
        total = int(theirs.db.execute("SELECT count(*) FROM files").fetchone()[0])
        total += int(theirs.db.execute("SELECT count(*) FROM embeddings").fetchone()[0])
        total += int(theirs.db.execute("SELECT count(*) FROM frames").fetchone()[0])
        with catalog.transaction(), progress_bar(total, "merging", progress) as advance:
            _merge_files(catalog, theirs, report, advance)
            frames = videos.merge_frames(catalog.db, theirs.db, advance)
            report.frames_added = frames.added
            report.video_conflicts = sorted(frames.conflicts.values())
            for their_key, (model_id, dim) in models.items():
                key = catalog.model_key(model_id, dim)
                _merge_embeddings(catalog, theirs, (their_key, key), frames, report, advance)
            if catalog.garbage_pending:  # replaced records may leave content unused
                catalog.collect_garbage()
    return report


def _refuse_self(catalog: Catalog, other: Path) -> None:
    same = catalog.path.resolve() == other.resolve()
    with contextlib.suppress(OSError):
        same = same or catalog.path.samefile(other)
    if same:
        raise InvalidInputError(
            f"cannot merge catalog {other} into itself; give another catalog to merge"
        )


def _require_schema(catalog: Catalog, other: Path) -> None:
    """Refuse, in one line naming both versions, a catalog of another schema (before it
    is opened: opening would only say that it is newer or needs upgrading)."""
    version = _schema_of(other)
    if version in (0, SCHEMA_VERSION):  # 0: empty or another program's; opening says which
        return
    if version > SCHEMA_VERSION:
        advice = "merge it with a cliplens that reads its schema"
    else:
        advice = "index it once with this cliplens to upgrade it, then merge"
    raise CatalogError(
        f"cannot merge catalog {other} (schema {version}) into catalog {catalog.path} "
        f"(schema {SCHEMA_VERSION}); {advice}"
    )


def _schema_of(path: Path) -> int:
    """PRAGMA user_version of a catalog file, read without writing a byte."""
    try:
        with path.open("rb") as f:
            head = f.read(len(SQLITE_MAGIC))
    except FileNotFoundError:
        raise CatalogError(f"catalog {path} does not exist; give the catalog to merge") from None
    except OSError as e:
        raise CatalogError(f"catalog {path} cannot be read ({e.strerror or e})") from None
    if head != SQLITE_MAGIC:
        raise not_a_catalog(path)
    try:
        db = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, timeout=30)
        try:
            return _user_version(db)
        finally:
            db.close()
    except sqlite3.Error as e:
        raise sqlite_error(path, e) from e


def _models_to_merge(
    catalog: Catalog, theirs: Catalog, report: MergeReport
) -> dict[int, tuple[str, int]]:
    """Their model keys -> (model_id, dim), each checked against ours."""
    ours = {m.model_id: m.dim for m in catalog.models()}
    found = theirs.db.execute("SELECT id, model_id, dim FROM models ORDER BY model_id")
    models: dict[int, tuple[str, int]] = {}
    for key, model_id, dim in found:
        if model_id in ours and ours[model_id] != dim:
            raise CatalogError(
                f"model {model_id} has dim {dim} in {theirs.path} but {ours[model_id]} in "
                f"{catalog.path}; these catalogs cannot be merged"
            )
        if model_id not in ours:
            report.models_added.append(model_id)
        models[key] = (model_id, dim)
    return models


def _merge_files(catalog: Catalog, theirs: Catalog, report: MergeReport, advance: Any) -> None:
    """Their file records, where ours lack the path or hold an older record of it."""
    rows = theirs.db.execute(
        "SELECT path, size, mtime_ns, hash, status, error, kind FROM files ORDER BY id"
    )
    while batch := rows.fetchmany(_CHUNK):
        marks = ",".join("?" * len(batch))
        ours = dict(
            catalog.db.execute(
                f"SELECT path, mtime_ns FROM files WHERE path IN ({marks})", [r[0] for r in batch]
            )
        )
        taken = [r for r in batch if r[0] not in ours or r[2] > ours[r[0]]]
        report.files_replaced += sum(r[0] in ours for r in taken)
        report.files_added += sum(r[0] not in ours for r in taken)
        report.files_kept += len(batch) - len(taken)
        if taken:
            catalog.upsert_files((from_text(r[0]), *r[1:]) for r in taken)
        advance(len(batch))


def _merge_embeddings(
    catalog: Catalog,
    theirs: Catalog,
    keys: tuple[int, int],
    frames: videos.FrameMerge,
    report: MergeReport,
    advance: Any,
) -> None:
    """Their vectors of one model (their key, ours) that ours lack, for content some file
    of ours holds now (their records kept or not: ours may share that content) and for
    the moments ours holds now, but none of a video whose moments differ in the two."""
    their_key, key = keys
    rows = theirs.db.execute("SELECT hash, vector FROM embeddings WHERE model = ?", (their_key,))
    while batch := rows.fetchmany(_CHUNK):
        marks = ",".join("?" * len(batch))
        hashes = [h for h, _ in batch]
        have = {
            h
            for (h,) in catalog.db.execute(
                f"SELECT hash FROM embeddings WHERE model = ? AND hash IN ({marks})",
                (key, *hashes),
            )
        }
        used = {
            h
            for (h,) in catalog.db.execute(
                f"SELECT DISTINCT hash FROM files WHERE hash IN ({marks}) "
                f"UNION SELECT key FROM frames WHERE key IN ({marks}) "
                "AND video IN (SELECT hash FROM files)",
                hashes * 2,
            )
        }
        new = [(h, v) for h, v in batch if h in used and h not in have and not frames.skips(h)]
        if new:
            vectors = np.stack([np.frombuffer(v, "<f2") for _, v in new])
            catalog.put_embeddings(key, [h for h, _ in new], vectors)
            report.embeddings_added += len(new)
        advance(len(batch))
