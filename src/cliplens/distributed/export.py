"""A catalog's embeddings of one model as an embed-dataset job folder: `export_shards`,
the way back of `import_shards`.

The folder is exactly what `embed_dataset` writes (embed.py): part-NNNNN.parquet shards
of `shard_size` files sorted by path (path, size, sha256, model_id, embedding), beside
each its part-NNNNN.failures.parquet (the files the indexer could not read), and
manifest.json (`ShardManifest`) naming the model and the finished shards. So
`cliplens build-index` builds a faiss index over a photo catalog, and `cliplens catalog
import` loads it into another. The vectors stay the catalog's float16 values.

Videos are left out, and counted: a shard row is a file by its path, which build-index
returns as a hit and `import_shards` records as a photo, so a video's moments (several
vectors of one path, each at a time) have no row to go in, and its own row (their mean)
would be searched as a photo that cannot be opened as one.

It is written whole or not at all: into a hidden folder beside OUT, renamed to OUT when
complete. A killed export leaves no OUT (build-index refuses a folder without a
manifest); the next export removes what it left.
"""

from __future__ import annotations

import glob
import hashlib
import os
import secrets
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from cliplens.distributed.embed import _write_shard, shard_name
from cliplens.distributed.manifest import ShardCounts, ShardManifest, save_manifest
from cliplens.errors import DependencyMissingError, InvalidInputError
from cliplens.progress import progress_bar

if TYPE_CHECKING:
    from cliplens.catalog.db import Catalog

__all__ = ["ExportReport", "export_shards"]

_FETCH = 1000  # rows read from the catalog at a time


@dataclass
class ExportReport:
    """What `export_shards` wrote: shards of `rows` embedded photos and `failures`
    unreadable ones; `not_embedded` readable photos have no vector of this model and
    `videos` are video files, both left out (`notes` says what to do about the videos).

    >>> import cliplens
    >>> from cliplens.distributed.export import export_shards
    >>> export_shards(cliplens.open_catalog(readonly=True), "shards/").to_dict()
    """

    out: str
    model_id: str
    model: str | None  # the name it was chosen by, when it was chosen by name
    dim: int
    shards: int
    rows: int
    failures: int
    not_embedded: int
    videos: int = 0
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def export_shards(
    catalog: Catalog,
    out: str | os.PathLike[str],
    model: str | None = None,
    shard_size: int = 10_000,
    progress: bool = False,
) -> ExportReport:
    """Write the catalog's embeddings of one model as an embed-dataset job folder at
    `out` (missing or empty), whole or not at all.

    Why: `build_index` over a photo catalog, for millions of photos served from a
    memory-mapped index. `model`: a model_id the catalog holds, or a model's name
    (default: the catalog's only model).

    >>> import cliplens
    >>> from cliplens.distributed.export import export_shards
    >>> export_shards(cliplens.open_catalog(readonly=True), "shards/", model="offline")
    >>> cliplens.build_index("shards/", "index/", kind="flat")
    """
    try:  # the distributed extra, as for every reader and writer of shards
        import pyarrow  # noqa: F401
    except ImportError as e:
        raise DependencyMissingError(
            f"export writes Parquet shards ({e}); pip install 'cliplens[distributed]'"
        ) from e
    if shard_size < 1:
        raise InvalidInputError("`shard_size` must be at least 1")
    model_id, dim, name = _choose_model(catalog, model)
    out = Path(out)
    _require_empty(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    _remove_abandoned(out)
    staging = out.with_name(f".{out.name}.export-{os.getpid()}-{secrets.token_hex(4)}")
    staging.mkdir()
    try:
        manifest = ShardManifest(model_id, dim, model=name, shard_size=shard_size)
        manifest.sources = [str(catalog.path.resolve())]
        _write_shards(catalog, staging, manifest, progress)
        save_manifest(staging, manifest)  # last, as embed-dataset does
        _into_place(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    rows = sum(s.rows for s in manifest.shards.values())
    failures = sum(s.failures for s in manifest.shards.values())
    readable, videos = catalog.db.execute(
        "SELECT coalesce(sum(kind = 'image' AND status = 'ok'), 0), "
        "coalesce(sum(kind = 'video'), 0) FROM files"
    ).fetchone()
    report = ExportReport(
        str(out), model_id, name, dim, len(manifest.shards), rows, failures, readable - rows
    )
    if videos:
        report.videos = videos
        report.notes.append(
            f"{videos} videos not exported: build-index holds photos only; search them in "
            "the catalog"
        )
    return report


def _choose_model(catalog: Catalog, model: str | None) -> tuple[str, int, str | None]:
    """(model_id, dim, name given) of the model to export."""
    stored = {m.model_id: m.dim for m in catalog.models() if m.count}
    choices = ", ".join(stored)
    if not stored:
        raise InvalidInputError(
            f"catalog {catalog.path} holds no embeddings; run 'cliplens index DIR' first"
        )
    if model is None:
        if len(stored) == 1:
            only = next(iter(stored))
            return only, stored[only], None
        raise InvalidInputError(
            f"catalog {catalog.path} holds embeddings of {len(stored)} models; "
            f"choose one with `model`: {choices}"
        )
    if model in stored:
        return model, stored[model], None
    from cliplens.models.ref import ModelRef  # a name: its identity says its model_id

    model_id = ModelRef(model).info.model_id
    if model_id not in stored:
        raise InvalidInputError(
            f"catalog {catalog.path} holds no embeddings of {model} ({model_id}); "
            f"choose one with `model`: {choices}"
        )
    return model_id, stored[model_id], model


def _require_empty(out: Path) -> None:
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise InvalidInputError(f"`out` {out} is not a folder; give a new folder for the shards")
    if out.is_dir() and any(out.iterdir()):
        raise InvalidInputError(
            f"`out` {out} is not empty; give a new folder (an export writes a whole job folder)"
        )


def _remove_abandoned(out: Path) -> None:
    """The hidden folders that killed exports to `out` left (their process is gone)."""
    for old in out.parent.glob(f".{glob.escape(out.name)}.export-*"):
        try:
            pid = int(old.name.rsplit("-", 2)[-2])
            os.kill(pid, 0)
        except ProcessLookupError:
            shutil.rmtree(old, ignore_errors=True)
        except (ValueError, IndexError, PermissionError):
            continue  # not ours, or another user's live process


def _into_place(staging: Path, out: Path) -> None:
    """Rename the finished folder to `out` (which may be an empty folder: rename replaces
    it); refuse if something else filled `out` meanwhile."""
    try:
        staging.replace(out)
    except OSError as e:
        raise InvalidInputError(
            f"`out` {out}: cannot put the shards there ({(e.strerror or str(e)).lower()}); "
            "give a new folder"
        ) from e


_ROWS = (  # photos only: the module's docstring says why
    "FROM files f LEFT JOIN embeddings e ON e.model = ? AND e.hash = f.hash "
    "WHERE f.kind = 'image' AND (f.status = 'failed' OR e.vector IS NOT NULL)"
)


def _write_shards(catalog: Catalog, folder: Path, manifest: ShardManifest, progress: bool) -> None:
    """Every photo of the catalog embedded by the model, or unreadable, in path order,
    cut into shards; the manifest records each shard and the listing."""
    (key,) = catalog.db.execute(
        "SELECT id FROM models WHERE model_id = ?", (manifest.model_id,)
    ).fetchone()
    total = int(catalog.db.execute(f"SELECT count(*) {_ROWS}", (key,)).fetchone()[0])
    cursor = catalog.db.execute(
        f"SELECT f.path, f.size, f.hash, f.status, f.error, e.vector {_ROWS} ORDER BY f.path",
        (key,),
    )
    listing = hashlib.sha256()  # embed.list_hash of the paths, without holding them all
    zeros = np.zeros(manifest.dim, np.float32)
    shard: list[dict[str, Any]] = []
    files = 0
    with progress_bar(total, "exporting", progress) as advance:
        while batch := cursor.fetchmany(_FETCH):
            for path, size, sha, status, error, vector in batch:
                listing.update(("\n" if files else "").encode() + path.encode())
                files += 1
                failed = status == "failed"
                shard.append(
                    {
                        "path": path,  # stored text (cliplens.paths), as shards hold it
                        "size": size,
                        "sha256": sha or "",
                        "error": (error or "could not be read") if failed else "",
                        "embedding": zeros if failed else np.frombuffer(vector, "<f2"),
                    }
                )
                if len(shard) == manifest.shard_size:
                    _finish(folder, manifest, shard)
                    shard = []
            advance(len(batch))
    if shard:
        _finish(folder, manifest, shard)
    manifest.files, manifest.list_hash = files, listing.hexdigest()


def _finish(folder: Path, manifest: ShardManifest, rows: list[dict[str, Any]]) -> None:
    name = shard_name(len(manifest.shards))
    ok, bad = _write_shard(folder, name, rows, manifest.model_id, manifest.dtype)
    manifest.shards[name] = ShardCounts(rows=ok, failures=bad)
