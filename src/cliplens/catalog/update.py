"""Indexing: scan -> decide what changed -> decode in worker processes -> encode in
batches -> commit each batch. A killed run loses at most the batch in flight; the next
run skips what was committed and carries on.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, NamedTuple

import numpy as np

from cliplens.catalog.db import Catalog, open_catalog, resolve_folders
from cliplens.catalog.errors import CatalogBusyError, CatalogReadOnlyError
from cliplens.catalog.frames import put_moments
from cliplens.catalog.vectors import refresh_ann
from cliplens.models.info import INT8_SUFFIX
from cliplens.progress import progress_bar

if TYPE_CHECKING:
    from cliplens.catalog.worker import CropDecoder, Decoded, FileJob
    from cliplens.models.batched import BatchedEncoder
    from cliplens.models.encoder import Encoder
    from cliplens.models.info import ModelInfo
    from cliplens.video import VideoSampling


class FileFailure(NamedTuple):
    """A file the run could not read, and why."""

    path: str
    error: str


@dataclass
class UpdateStats:
    """What one `update_catalog` run found and did, counted per file.

    Why: the CLI prints `summary()`, and a caller can tell what changed without reading
    the catalog again.

    >>> import cliplens
    >>> stats = cliplens.update_catalog(cliplens.open_catalog(), cliplens.ModelRef(), ["photos/"])
    >>> stats.new, stats.failed, stats.errors[:3]
    """

    new: int = 0
    changed: int = 0
    moved: int = 0  # new paths whose content was already embedded (renamed, moved, copied)
    unchanged: int = 0
    removed: int = 0
    failed: int = 0  # newly failed in this run
    failed_before: int = 0  # failed earlier and unchanged since: not retried
    encoded: int = 0  # crops encoded: photos and video moments
    videos: int = 0  # videos embedded in this run (their moments are counted in `encoded`)
    engine: str = ""  # what encoded, e.g. "openvino bf16" (empty when nothing was encoded)
    timings: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)  # what the user should know about the run
    errors: list[FileFailure] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """The counts and timings, then each failure as {"path", "error"}."""
        counts = {k: v for k, v in vars(self).items() if k != "errors"}
        return counts | {"errors": [f._asdict() for f in self.errors]}

    def summary(self) -> str:
        parts = [
            f"{self.new} new",
            f"{self.changed} changed",
            f"{self.moved} moved or copied",
            f"{self.removed} removed",
            f"{self.failed} failed",
            f"{self.unchanged} unchanged",
        ]
        if self.failed_before:
            parts.append(f"{self.failed_before} failed before, not retried")
        if self.videos:
            parts.append(f"{self.videos} video{'' if self.videos == 1 else 's'} embedded")
        return ", ".join(parts)


def _scan(
    roots: Sequence[str], exclude: Sequence[str], notes: list[str]
) -> dict[str, tuple[int, int]]:
    """Every photo and video under the roots, with its size and mtime; videos only where
    PyAV can read them (else a note says how many were left out)."""
    from cliplens import video
    from cliplens.exclusions import exclusions
    from cliplens.images import IMAGE_EXTENSIONS, iter_image_files  # Pillow: not on --no-index

    extensions = {*IMAGE_EXTENSIONS, *video.VIDEO_EXTENSIONS}
    videos = video.available()
    found: dict[str, tuple[int, int]] = {}
    left_out = 0
    for path in iter_image_files(roots, extensions=extensions, exclude=exclusions(exclude)):
        if not videos and video.is_video(path):
            left_out += 1
            continue
        try:
            st = path.stat()
        except OSError:
            continue
        found[str(path)] = (st.st_size, st.st_mtime_ns)
    if left_out:
        notes.append(f"{left_out} videos were not indexed: they need PyAV ({video.INSTALL})")
    return found


def update_catalog(
    catalog: Catalog,
    model: Encoder,
    roots: Sequence[str | os.PathLike],
    batch_size: int | None = None,
    workers: int | None = None,
    progress: bool = False,
    max_megapixels: float | None = None,
    exclude: Sequence[str] = (),
    video: VideoSampling | None = None,
) -> UpdateStats:
    """Bring the catalog up to date with the photos and videos under `roots` for one model.

    Why: search reads embeddings from the catalog; this embeds only what is new or
    changed since the last run (a ModelRef loads the network only if some file needs
    encoding), and a killed run loses at most the batch in flight. One index run at a
    time per catalog: a second one gets CatalogBusyError at once. Files that `exclude`
    (gitignore patterns) or a `.cliplensignore` leaves out are not indexed, and leave the
    catalog if it held them (cliplens.exclusions). A video is embedded at the moments
    `video` chooses (`VideoSampling`; PyAV, the `video` extra), whole or not at all.

    >>> import cliplens
    >>> catalog = cliplens.open_catalog("photos.db")
    >>> cliplens.update_catalog(catalog, cliplens.ModelRef("offline"), ["photos/"]).summary()
    """
    with catalog.updating():
        return _update_catalog(
            catalog,
            model,
            roots,
            batch_size=batch_size,
            workers=workers,
            progress=progress,
            max_megapixels=max_megapixels,
            exclude=exclude,
            video=video,
        )


#: why a query searched the catalog as it was: another run is updating it, or it cannot
#: be written
NotUpdated = Literal["busy", "read_only"]


@dataclass
class QueryCatalog:
    """The catalog a query searches, brought up to date first where it could be.

    Why: a search goes on while another run updates the catalog (over the photos that run
    has committed so far) and where the catalog cannot be written (as it is):
    `not_updated` says which, `detail` what happened, and `stats` what an update did.

    >>> import cliplens
    >>> from cliplens.catalog.update import catalog_for_query
    >>> found = catalog_for_query(None, cliplens.ModelRef(), ["photos/"])
    >>> found.not_updated, found.to_dict()  # doctest: +SKIP
    """

    catalog: Catalog
    stats: UpdateStats | None = None  # the update that ran; None: none did
    not_updated: NotUpdated | None = None  # why no update ran, where one was asked for
    detail: str = ""  # the busy or read-only catalog's words, without advice

    def to_dict(self) -> dict[str, Any]:
        stats = self.stats.to_dict() if self.stats is not None else None
        return {"stats": stats, "not_updated": self.not_updated, "detail": self.detail}


def catalog_for_query(
    db: str | os.PathLike[str] | None,
    model: Encoder,
    roots: Sequence[str | os.PathLike],
    update: bool = True,
    progress: bool = False,
    exclude: Sequence[str] = (),
) -> QueryCatalog:
    """The catalog at `db` for a query by `model`: `roots` brought up to date first (unless
    not `update`); a busy or read-only catalog is searched as it is, and says so.

    Why: `search`, `similar` and `duplicates` from the CLI decide this one way.
    """
    if not update:
        return QueryCatalog(open_catalog(db, readonly=True))
    try:
        catalog = open_catalog(db)
        stats = update_catalog(catalog, model, roots, progress=progress, exclude=exclude)
    except CatalogBusyError as e:  # that run encodes the new photos: search what it has
        return QueryCatalog(open_catalog(db, readonly=True), not_updated="busy", detail=e.what)
    except CatalogReadOnlyError as e:
        return QueryCatalog(open_catalog(db, readonly=True), not_updated="read_only", detail=e.what)
    return QueryCatalog(catalog, stats)


@dataclass
class _Plan:
    """What a run has to do: files to decode (new or changed), and paths that are gone."""

    jobs: list[FileJob]
    kinds: dict[str, Literal["new", "changed"]]  # of each job's path, for the counts
    gone: list[str]


def _plan(
    catalog: Catalog,
    folders: Sequence[str],
    known: set[str],
    stats: UpdateStats,
    exclude: Sequence[str],
) -> _Plan:
    found = _scan(folders, exclude, stats.notes)
    existing = catalog.files_under(folders)
    jobs: list[FileJob] = []
    kinds: dict[str, Literal["new", "changed"]] = {}
    for path, (size, mtime) in found.items():
        row = existing.get(path)
        if row is not None and (row.size, row.mtime_ns) == (size, mtime):
            if row.status == "failed":
                stats.failed_before += 1
                continue
            if row.hash in known:
                stats.unchanged += 1
                continue
            kinds[path] = "new"  # readable, but not embedded by this model yet
        else:
            kinds[path] = "new" if row is None else "changed"
        jobs.append((path, size, mtime))
    from cliplens import video

    gone = [p for p in existing if p not in found]
    if not video.available():  # videos were not looked at: they are not gone
        gone = [p for p in gone if existing[p].kind != "video"]
    return _Plan(jobs, kinds, gone)


def _update_catalog(
    catalog: Catalog,
    model: Encoder,
    roots: Sequence[str | os.PathLike],
    *,
    batch_size: int | None,
    workers: int | None,
    progress: bool,
    max_megapixels: float | None,
    exclude: Sequence[str],
    video: VideoSampling | None,
) -> UpdateStats:
    t0 = time.perf_counter()
    stats = UpdateStats()
    folders = resolve_folders(roots)
    info = model.info
    key = catalog.model_key(info.model_id, info.dim)
    known = catalog.hashes_with_embedding(key)
    plan = _plan(catalog, folders, known, stats, exclude)
    if plan.jobs:
        stats.notes += _precision_notes(catalog, info)
    stats.timings["scan"] = time.perf_counter() - t0
    if video is not None:  # kept even by a run with nothing to read
        _keep_sampling(catalog, video)
    if not plan.jobs and not plan.gone:
        if catalog.garbage_pending:  # left by a run killed before it collected
            with catalog.transaction():
                catalog.collect_garbage()
        refresh_ann(catalog, info.model_id, changed=False)
        stats.timings["total"] = time.perf_counter() - t0
        return stats
    encoder = model.ready() if plan.jobs else None
    if encoder is not None:
        stats.engine = f"{encoder.info.engine} {encoder.info.precision}"
    bs = batch_size or (encoder.default_batch_size if encoder else 1)
    from cliplens.catalog.frames import sampled_times
    from cliplens.catalog.worker import CropDecoder  # here: a no-op run decodes nothing

    sampled = sampled_times(catalog, key)
    video = video or kept_sampling(catalog)
    decoder = CropDecoder(info.preprocessing, max_megapixels, frozenset(known), video, sampled)
    writer = _BatchWriter(catalog, encoder, key, stats)
    with progress_bar(len(plan.jobs), "indexing", progress) as advance:
        for item in _decoded(plan.jobs, decoder, workers, bs):
            _count(item, plan, known, stats)
            writer.add(item, bs)
            advance(1)
        writer.flush()
    if plan.gone:
        with catalog.transaction():
            stats.removed = catalog.remove_files(plan.gone)
    if catalog.garbage_pending:  # changed or removed files, now or in a killed run
        with catalog.transaction():
            catalog.collect_garbage()
    t = time.perf_counter()
    refresh_ann(catalog, info.model_id, changed=True)
    stats.timings.update(decode_cpu=writer.t_decode, encode=writer.t_encode)
    stats.timings.update(write=writer.t_write, ann=time.perf_counter() - t)
    stats.timings["total"] = time.perf_counter() - t0
    return stats


def _keep_sampling(catalog: Catalog, video: VideoSampling) -> None:
    """Keep `video` as the catalog's sampling for its later runs (a search's update too)."""
    import json

    with catalog.transaction() as db:
        db.execute(
            "INSERT OR REPLACE INTO meta (key, value) VALUES ('video_sampling', ?)",
            (json.dumps(dataclasses.asdict(video)),),
        )


def kept_sampling(catalog: Catalog) -> VideoSampling:
    """The video sampling the catalog keeps for its runs (the defaults if none)."""
    import json

    from cliplens.video import VideoSampling

    row = catalog.db.execute("SELECT value FROM meta WHERE key = 'video_sampling'").fetchone()
    if row is None:
        return VideoSampling()
    try:
        return VideoSampling(**json.loads(row[0]))
    except (ValueError, TypeError):  # written by another version: the defaults
        return VideoSampling()


def _precision_notes(catalog: Catalog, info: ModelInfo) -> list[str]:
    """A note when the catalog holds this model's vectors at the other kind of precision:
    an int8 network's vectors are kept apart from fp32 and bf16 ones, never mixed."""
    sibling = info.quantized_from or info.model_id + INT8_SUFFIX
    held = catalog.count_embedded(sibling) if catalog.has_model(sibling) else 0
    if not held:
        return []
    if info.quantized_from:
        return [
            f"the catalog holds {held} full-precision vectors of this model; int8 vectors are "
            f"kept apart from them, so this run embeds these photos again at int8 (search "
            f"with `precision` int8 to use them)"
        ]
    return [
        f"the catalog also holds {held} int8 vectors of this model, kept apart; this run "
        f"makes full-precision ones (search with `precision` int8 to use the int8 ones)"
    ]


def _count(item: Decoded, plan: _Plan, known: set[str], stats: UpdateStats) -> None:
    if item.error:
        stats.failed += 1
        stats.errors.append(FileFailure(item.path, item.error))
    elif item.crop is None:
        stats.moved += 1
        known.add(item.hash or "")
    elif plan.kinds[item.path] == "changed":
        stats.changed += 1
    else:
        stats.new += 1
    if item.kind == "video" and item.crop is not None:
        stats.videos += 1


class _BatchWriter:
    """Encodes the decoded crops and commits them with their files, one transaction a
    batch: a killed run loses at most the batch in flight."""

    def __init__(
        self, catalog: Catalog, encoder: BatchedEncoder | None, key: int, stats: UpdateStats
    ) -> None:
        self.catalog, self.encoder, self.key, self.stats = catalog, encoder, key, stats
        self.pending: list[Decoded] = []
        self.crops = 0  # crops the pending items hold (a video's moments are several)
        self.bs = 1
        self.t_decode = self.t_encode = self.t_write = 0.0

    def add(self, item: Decoded, bs: int) -> None:
        """Queue one file; commit once a batch of crops (or 4x as many files) is queued."""
        self.t_decode += item.seconds
        self.pending.append(item)
        self.crops += item.n_crops
        self.bs = bs
        if self.crops >= bs or len(self.pending) >= 4 * bs:
            self.flush()

    def flush(self) -> None:
        if not self.pending:
            return
        pending, catalog = self.pending, self.catalog
        encoded = [d for d in pending if d.crop is not None]
        t = time.perf_counter()
        vectors = self._encode(encoded)
        self.t_encode += time.perf_counter() - t
        t = time.perf_counter()
        with catalog.transaction():
            photos = [i for i, d in enumerate(encoded) if d.kind == "image"]
            if photos:
                rows = np.asarray([vectors[i][0] for i in photos])
                catalog.put_embeddings(self.key, [encoded[i].hash for i in photos], rows)
            for d, vecs in zip(encoded, vectors, strict=True):
                if d.kind == "video":
                    assert d.hash is not None and d.times_ms is not None
                    put_moments(catalog, self.key, d.hash, d.times_ms, vecs)
            catalog.upsert_files(
                (d.path, d.size, d.mtime_ns, d.hash, "failed" if d.error else "ok", d.error, d.kind)
                for d in pending
            )
        self.t_write += time.perf_counter() - t
        self.stats.encoded += sum(d.n_crops for d in encoded)
        self.pending, self.crops = [], 0

    def _encode(self, encoded: list[Decoded]) -> list[np.ndarray]:
        """Each item's vectors (1 x D for a photo, F x D for a video), encoded in batches."""
        if not encoded:
            return []
        assert self.encoder is not None, "crops come only from jobs, which load the model"
        crops = np.concatenate([d.crop if d.kind == "video" else d.crop[None] for d in encoded])
        bs = max(1, self.bs)
        out = np.concatenate(
            [self.encoder.encode_crops(crops[i : i + bs]) for i in range(0, len(crops), bs)]
        )
        ends = np.cumsum([d.n_crops for d in encoded])
        return np.split(out, ends[:-1])


def _decoded(
    jobs: list[FileJob], decoder: CropDecoder, workers: int | None, bs: int
) -> Iterator[Decoded]:
    """Decoded files in job order, from a process pool with a bounded window in flight
    (in this process with `workers` 0)."""
    if not jobs:
        return
    from cliplens.catalog.worker import decode_file, init_worker
    from cliplens.decode_ahead import INLINE, decode_ahead, process_pool

    n = workers if workers is not None else (os.cpu_count() or 1)
    args = (decoder,)
    if n <= 0:
        init_worker(*args)
        for _, batch in decode_ahead(jobs, decode_file, bs, INLINE, ahead=0):
            yield from batch
        return
    window = max(4 * n, 2 * bs)  # files in flight: this batch and those decoding ahead
    ahead = max(1, window // bs - 1)
    with process_pool(n, init_worker, args) as pool:
        for _, batch in decode_ahead(jobs, decode_file, bs, pool, ahead):
            yield from batch
