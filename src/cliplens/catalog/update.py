"""Indexing: scan -> decide what changed -> decode in worker processes -> encode in
batches -> commit each batch. A killed run loses at most the batch in flight; the next
run skips what was committed and carries on.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import sys
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from cliplens.catalog.db import Catalog, resolve_folders
from cliplens.catalog.vectors import refresh_ann
from cliplens.catalog.worker import Decoded, decode_file, init_worker
from cliplens.images import iter_image_files
from cliplens.models.ref import ModelRef
from cliplens.progress import progress_bar

if TYPE_CHECKING:
    from cliplens.models.encoder import Encoder


@dataclass
class UpdateStats:
    new: int = 0
    changed: int = 0
    moved: int = 0  # new paths whose content was already embedded (renamed, moved, copied)
    unchanged: int = 0
    removed: int = 0
    failed: int = 0  # newly failed in this run
    failed_before: int = 0  # failed earlier and unchanged since: not retried
    encoded: int = 0
    timings: dict[str, float] = field(default_factory=dict)
    errors: list[tuple[str, str]] = field(default_factory=list)

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
        return ", ".join(parts)


def _scan(roots: Sequence[str]) -> dict[str, tuple[int, int]]:
    found: dict[str, tuple[int, int]] = {}
    for path in iter_image_files(roots):
        try:
            st = path.stat()
        except OSError:
            continue
        found[str(path)] = (st.st_size, st.st_mtime_ns)
    return found


def update_catalog(
    catalog: Catalog,
    model: Encoder | ModelRef,
    roots: Sequence[str | os.PathLike],
    batch_size: int | None = None,
    workers: int | None = None,
    progress: bool = False,
    max_megapixels: float | None = None,
) -> UpdateStats:
    """Bring the catalog up to date with the image files under `roots` for one model.

    With a ModelRef, the network is loaded only if some file needs encoding. One index
    run at a time per catalog: a second one gets CatalogBusyError at once.
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
        )


def _update_catalog(
    catalog: Catalog,
    model: Encoder | ModelRef,
    roots: Sequence[str | os.PathLike],
    *,
    batch_size: int | None,
    workers: int | None,
    progress: bool,
    max_megapixels: float | None,
) -> UpdateStats:
    t0 = time.perf_counter()
    stats = UpdateStats()
    folders = resolve_folders(roots)
    found = _scan(folders)
    existing = catalog.files_under(folders)
    info = model.info
    key = catalog.model_key(info.model_id, info.dim)
    known = catalog.hashes_with_embedding(key)
    jobs: list[tuple[str, int, int]] = []
    kinds: dict[str, str] = {}
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
    gone = [p for p in existing if p not in found]
    stats.timings["scan"] = time.perf_counter() - t0
    if not jobs and not gone:
        if catalog.garbage_pending:  # left by a run killed before it collected
            with catalog.transaction():
                catalog.collect_garbage()
        refresh_ann(catalog, info.model_id, changed=False)
        stats.timings["total"] = time.perf_counter() - t0
        return stats
    encoder = model.load() if jobs else None

    bs = batch_size or (encoder.default_batch_size if encoder else 1)
    pending: list[Decoded] = []
    t_encode = t_write = t_decode = 0.0

    def flush() -> None:
        nonlocal t_encode, t_write
        crops = [d for d in pending if d.crop is not None]
        t = time.perf_counter()
        vectors = encoder.encode_crops(np.stack([d.crop for d in crops])) if crops else None
        t_encode += time.perf_counter() - t
        t = time.perf_counter()
        with catalog.transaction():
            if vectors is not None:
                catalog.put_embeddings(key, [d.hash for d in crops], vectors)
            catalog.upsert_files(
                (d.path, d.size, d.mtime_ns, d.hash, "failed" if d.error else "ok", d.error)
                for d in pending
            )
        t_write += time.perf_counter() - t
        stats.encoded += len(crops)
        pending.clear()

    with progress_bar(len(jobs), "indexing", progress) as advance:
        for item in _decoded(jobs, known, encoder, workers, max_megapixels):
            t_decode += item.seconds
            if item.error:
                stats.failed += 1
                stats.errors.append((item.path, item.error))
            elif item.crop is None:
                stats.moved += 1
                known.add(item.hash or "")
            elif kinds[item.path] == "changed":
                stats.changed += 1
            else:
                stats.new += 1
            pending.append(item)
            if sum(d.crop is not None for d in pending) >= bs or len(pending) >= 4 * bs:
                flush()
            advance(1)
        if pending:
            flush()
    if gone:
        with catalog.transaction():
            stats.removed = catalog.remove_files(gone)
    if catalog.garbage_pending:  # changed or removed files, now or in a killed run
        with catalog.transaction():
            catalog.collect_garbage()
    t = time.perf_counter()
    refresh_ann(catalog, info.model_id, changed=True)
    stats.timings.update(decode_cpu=t_decode, encode=t_encode, write=t_write,
                         ann=time.perf_counter() - t, total=time.perf_counter() - t0)  # fmt: skip
    return stats


def _decoded(
    jobs: list[tuple[str, int, int]],
    known: set[str],
    encoder: Encoder,
    workers: int | None,
    max_megapixels: float | None,
):
    """Decoded files in job order, from a process pool with a bounded window in flight."""
    if not jobs:
        return
    n = workers if workers is not None else (os.cpu_count() or 1)
    args = (frozenset(known), encoder.info.preprocessing, max_megapixels)
    if n <= 0:
        init_worker(*args)
        yield from (decode_file(j) for j in jobs)
        return
    method = "fork" if sys.platform == "linux" else "spawn"
    window = max(4 * n, 2 * (encoder.default_batch_size or 32))
    with mp.get_context(method).Pool(n, initializer=init_worker, initargs=args) as pool:
        queue: deque = deque()
        it = iter(jobs)
        for job in it:
            queue.append(pool.apply_async(decode_file, (job,)))
            if len(queue) >= window:
                break
        while queue:
            result = queue.popleft().get()
            nxt = next(it, None)
            if nxt is not None:
                queue.append(pool.apply_async(decode_file, (nxt,)))
            yield result
