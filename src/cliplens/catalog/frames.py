"""A video's moments in the catalog: the `frames` table (schema.py) and the rows they give
the vector matrix.

Each moment of a video is a row of the matrix searched, beside the photos. A photo's row
id is its file id; a moment's is `FRAME_ROW | file id << 20 | ordinal`, so the id alone
says which file it belongs to (`file_of`), an ANN index keeps one entry per moment, and
two copies of one video (two file rows, one content hash) each have their own rows.
Moments are stored by the video's content hash, so a moved or renamed video keeps them,
and a second model embeds the moments the first one chose (`sampled_times`).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from cliplens.catalog.db import Catalog

FRAME_ROW = 1 << 62
ORDINAL_BITS = 20
MAX_MOMENTS = (1 << ORDINAL_BITS) - 1  # moments one video may have
_FILE_BITS = (1 << 42) - 1


def frame_key(video_hash: str, ordinal: int) -> str:
    """The hash a moment's embeddings are stored under."""
    return f"{video_hash}#{ordinal}"


def file_of(rows: np.ndarray) -> np.ndarray:
    """The file id of each matrix row id (a photo's is its own)."""
    rows = np.asarray(rows, np.int64)
    return np.where(rows >= FRAME_ROW, (rows >> ORDINAL_BITS) & _FILE_BITS, rows)


def has_moments(rows: np.ndarray) -> bool:
    return bool(len(rows)) and int(rows[-1]) >= FRAME_ROW  # rows are sorted


# the matrix of one model: photos (their file's hash) and moments (their frame key), the
# rows of ok files only, by row id; a moment's content key is its video's
VECTORS_SQL = f"""
SELECT f.id, substr(f.hash, 1, 15), e.vector, NULL FROM files f
    JOIN embeddings e ON e.model = :model AND e.hash = f.hash
    WHERE f.status = 'ok' AND f.kind = 'image'
UNION ALL
SELECT {FRAME_ROW} | (f.id << {ORDINAL_BITS}) | fr.ordinal, substr(f.hash, 1, 15), e.vector,
    fr.t_ms
    FROM files f JOIN frames fr ON fr.video = f.hash
    JOIN embeddings e ON e.model = :model AND e.hash = fr.key
    WHERE f.status = 'ok' AND f.kind = 'video'
ORDER BY 1
"""

_KEY_BITS = (1 << 60) - 1


def content_key(hash_prefix: str, t_ms: int | None) -> int:
    """A row's content key (VECTORS_SQL's second and fourth columns): a photo's is the
    first 60 bits of its hash; a moment's also mixes in its time, so that a video sampled
    again (the same ordinals at other times) changes the keys of the rows it moved."""
    key = int(hash_prefix, 16)
    if t_ms is None:
        return key
    return key ^ (((t_ms + 1) * 0x9E3779B97F4A7C15) & _KEY_BITS)


COUNT_SQL = """
SELECT (SELECT count(*) FROM files f JOIN embeddings e ON e.model = :model AND e.hash = f.hash
        WHERE f.status = 'ok' AND f.kind = 'image')
     + (SELECT count(*) FROM files f JOIN frames fr ON fr.video = f.hash
        JOIN embeddings e ON e.model = :model AND e.hash = fr.key
        WHERE f.status = 'ok' AND f.kind = 'video')
"""

# moments of videos no file holds any more, then embeddings nothing refers to
GARBAGE_SQL = (
    "DELETE FROM frames WHERE video NOT IN (SELECT hash FROM files WHERE hash IS NOT NULL)",
    "DELETE FROM embeddings WHERE hash NOT IN (SELECT hash FROM files WHERE hash IS NOT NULL) "
    "AND hash NOT IN (SELECT key FROM frames)",
)


def put_moments(
    catalog: Catalog, model: int, video_hash: str, times_ms: Sequence[int], vectors: np.ndarray
) -> None:
    """Store a video's moments and their vectors by the model, and the video's own vector
    (their normalised mean); inside a transaction, with the video's file row, so that a
    video is embedded whole or not at all."""
    rows = [(video_hash, i, int(t), frame_key(video_hash, i)) for i, t in enumerate(times_ms)]
    stored = dict(
        catalog.db.execute("SELECT ordinal, t_ms FROM frames WHERE video = ?", (video_hash,))
    )
    if stored and stored != {i: t for _, i, t, _ in rows}:
        # sampled again otherwise (another model read it before it was ever whole)
        catalog.db.execute("DELETE FROM frames WHERE video = ?", (video_hash,))
        catalog.db.execute(  # a content hash is hex: no LIKE wildcard in it
            "DELETE FROM embeddings WHERE hash = ? OR hash LIKE ?", (video_hash, video_hash + "#%")
        )
    catalog.db.executemany(
        "INSERT OR IGNORE INTO frames (video, ordinal, t_ms, key) VALUES (?, ?, ?, ?)", rows
    )
    catalog.put_embeddings(model, [r[3] for r in rows], vectors)
    mean = np.asarray(vectors, np.float32).mean(axis=0)
    mean /= max(float(np.linalg.norm(mean)), 1e-12)
    catalog.put_embeddings(model, [video_hash], mean[None])


def sampled_times(catalog: Catalog, model: int) -> dict[str, tuple[int, ...]]:
    """The moments (times in ms) of videos sampled for another model but not embedded by
    this one: this model embeds the same moments."""
    rows = catalog.db.execute(
        "SELECT video, t_ms FROM frames WHERE video NOT IN "
        "(SELECT hash FROM embeddings WHERE model = ?) ORDER BY video, ordinal",
        (model,),
    )
    out: dict[str, list[int]] = {}
    for video, t in rows:
        out.setdefault(video, []).append(int(t))
    return {v: tuple(ts) for v, ts in out.items()}


def moment_times(catalog: Catalog, rows: Iterable[int]) -> dict[int, float]:
    """Seconds from its video's start of each moment row among `rows` (photos' left out)."""
    wanted = [int(r) for r in rows if int(r) >= FRAME_ROW]
    files = sorted({int(f) for f in file_of(np.asarray(wanted, np.int64))}) if wanted else []
    out: dict[int, float] = {}
    for start in range(0, len(files), 500):
        chunk = files[start : start + 500]
        marks = ",".join("?" * len(chunk))
        found = catalog.db.execute(
            f"SELECT f.id, fr.ordinal, fr.t_ms FROM files f JOIN frames fr ON fr.video = f.hash "
            f"WHERE f.id IN ({marks})",
            chunk,
        )
        for file_id, ordinal, t_ms in found:
            out[FRAME_ROW | (file_id << ORDINAL_BITS) | ordinal] = t_ms / 1000
    return {r: out[r] for r in wanted if r in out}
