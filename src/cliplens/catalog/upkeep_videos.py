"""The videos' part of catalog upkeep (upkeep.py): counting, checking and merging a
catalog's moments (the `frames` table and the embeddings stored under `frames.key`,
catalog/frames.py).

A video is embedded whole by a model when its own row (under its content hash: the mean
of its moments' vectors) exists; its moments then have that model's embeddings, one per
frame. These queries keep that promise checked, repaired and carried across a merge.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from cliplens.paths import from_text

__all__ = [
    "FrameMerge",
    "drop_incomplete_marks",
    "frame_count",
    "incomplete_videos",
    "merge_frames",
    "model_video_counts",
    "orphan_frames",
    "orphan_moments",
    "orphans",
    "video_counts",
]

_CHUNK = 500  # videos per IN (...) list

# videos no file holds any more, yet whose moments are stored (frames.GARBAGE_SQL[0])
_ORPHAN_FRAMES = "frames WHERE video NOT IN (SELECT hash FROM files WHERE hash IS NOT NULL)"

# videos some of whose moments are gone: their ordinals are 0..n-1 when whole, and no
# embedding is left of a moment they lack
_GAPPED = """
SELECT video FROM frames GROUP BY video HAVING count(*) != max(ordinal) + 1
UNION SELECT substr(e.hash, 1, instr(e.hash, '#') - 1) FROM embeddings e
    WHERE instr(e.hash, '#') > 0 AND NOT EXISTS (SELECT 1 FROM frames fr WHERE fr.key = e.hash)
"""

# (model key, model_id, path, content hash) of readable videos a model marked embedded
# (their own row exists) whose moments lack that model's embeddings, or are gone
_INCOMPLETE = f"""
SELECT m.id, m.model_id, f.path, f.hash FROM models m CROSS JOIN files f
    JOIN embeddings e ON e.model = m.id AND e.hash = f.hash
    WHERE f.kind = 'video' AND f.status = 'ok' AND (
        NOT EXISTS (SELECT 1 FROM frames fr WHERE fr.video = f.hash)
        OR f.hash IN ({_GAPPED})
        OR EXISTS (SELECT 1 FROM frames fr WHERE fr.video = f.hash AND NOT EXISTS
            (SELECT 1 FROM embeddings x WHERE x.model = m.id AND x.hash = fr.key)))
    ORDER BY m.model_id, f.path
"""


def video_counts(db: sqlite3.Connection) -> tuple[dict[str, int], int]:
    """(video files by status, "ok" and "failed" always present; moments stored)."""
    videos = {"ok": 0, "failed": 0}
    videos.update(
        db.execute("SELECT status, count(*) FROM files WHERE kind = 'video' GROUP BY status")
    )
    moments = int(db.execute("SELECT count(*) FROM frames").fetchone()[0])
    return videos, moments


def model_video_counts(db: sqlite3.Connection, model: int) -> tuple[int, int, int]:
    """(readable files embedded, readable videos among them, moment embeddings) of one
    model: a file counts once per path, a moment once per video content."""
    files, videos = db.execute(
        "SELECT count(*), coalesce(sum(f.kind = 'video'), 0) FROM files f JOIN embeddings e "
        "ON e.model = ? AND e.hash = f.hash WHERE f.status = 'ok'",
        (model,),
    ).fetchone()
    (moments,) = db.execute(
        "SELECT count(*) FROM frames fr JOIN embeddings e ON e.model = ? AND e.hash = fr.key",
        (model,),
    ).fetchone()
    return int(files), int(videos), int(moments)


def frame_count(db: sqlite3.Connection) -> int:
    return int(db.execute("SELECT count(*) FROM frames").fetchone()[0])


def orphans(db: sqlite3.Connection) -> dict[str, int]:
    """model_id -> embeddings under a content hash no file holds (a moment's key holds
    '#': a content hash never does; `orphan_moments` counts those)."""
    rows = db.execute(
        "SELECT m.model_id, count(*) FROM embeddings e JOIN models m ON m.id = e.model "
        "WHERE instr(e.hash, '#') = 0 AND NOT EXISTS "
        "(SELECT 1 FROM files f WHERE f.hash = e.hash) GROUP BY m.id ORDER BY m.model_id"
    )
    return dict(rows.fetchall())


def orphan_frames(db: sqlite3.Connection) -> int:
    """Moments of videos no file holds (left by a run killed before it collected)."""
    return int(db.execute(f"SELECT count(*) FROM {_ORPHAN_FRAMES}").fetchone()[0])


def orphan_moments(db: sqlite3.Connection) -> dict[str, int]:
    """model_id -> moment embeddings (a key with '#') whose frame is gone."""
    rows = db.execute(
        "SELECT m.model_id, count(*) FROM embeddings e JOIN models m ON m.id = e.model "
        "WHERE instr(e.hash, '#') > 0 AND NOT EXISTS "
        "(SELECT 1 FROM frames fr WHERE fr.key = e.hash) GROUP BY m.id ORDER BY m.model_id"
    )
    return dict(rows.fetchall())


def incomplete_videos(db: sqlite3.Connection) -> dict[str, list[str]]:
    """model_id -> paths of readable videos marked embedded by it whose moments lack its
    embeddings (search finds them by no moment, or by only some)."""
    out: dict[str, list[str]] = {}
    for _, model_id, path, _ in db.execute(_INCOMPLETE):
        out.setdefault(model_id, []).append(from_text(path))
    return out


def drop_incomplete_marks(db: sqlite3.Connection) -> int:
    """Delete the own rows of the videos `incomplete_videos` finds, inside a transaction:
    no longer marked embedded, they are embedded again by the next index run over them,
    at their stored moments, or sampled afresh where some moments were gone (those
    videos' moments are deleted here: the garbage collection that follows drops their
    embeddings). How many (model, video content) marks went."""
    db.execute(f"DELETE FROM frames WHERE video IN ({_GAPPED})")
    marks = {(key, h) for key, _, _, h in db.execute(_INCOMPLETE)}
    db.executemany("DELETE FROM embeddings WHERE model = ? AND hash = ?", sorted(marks))
    return len(marks)


@dataclass
class FrameMerge:
    """What `merge_frames` did: moments copied, and the videos whose moments differ in
    the two catalogs (content hash -> a path of ours holding it): ours are kept, and
    none of the other catalog's embeddings of them may be copied."""

    added: int = 0
    conflicts: dict[str, str] = field(default_factory=dict)

    def skips(self, key: str) -> bool:
        """Whether an embedding's key (a content hash, or a moment's) is of a video
        whose moments differ."""
        return key.split("#", 1)[0] in self.conflicts


def merge_frames(
    ours: sqlite3.Connection, theirs: sqlite3.Connection, advance: Callable[[int], object]
) -> FrameMerge:
    """Copy the other catalog's moments of the videos some file of ours holds now (call
    after the files are merged, inside the merge's transaction): all of a video's, where
    ours has none; none where ours has the same; ours kept where they differ (the video
    was sampled otherwise), and that video named in the result."""
    found = FrameMerge()
    videos = theirs.execute("SELECT DISTINCT video FROM frames ORDER BY video")
    while batch := [v for (v,) in videos.fetchmany(_CHUNK)]:
        marks = ",".join("?" * len(batch))
        held = dict(
            ours.execute(
                f"SELECT hash, min(path) FROM files WHERE hash IN ({marks}) GROUP BY hash", batch
            )
        )
        their_rows = theirs.execute(
            f"SELECT video, ordinal, t_ms, key FROM frames WHERE video IN ({marks})", batch
        ).fetchall()
        other: dict[str, list[tuple]] = {}
        for row in their_rows:
            other.setdefault(row[0], []).append(row)
        mine = _times(
            ours.execute(f"SELECT video, ordinal, t_ms FROM frames WHERE video IN ({marks})", batch)
        )
        new: list[tuple] = []
        for video, path in held.items():
            if video not in mine:
                new += other[video]
            elif mine[video] != _times(other[video])[video]:
                found.conflicts[video] = from_text(path)
        ours.executemany(
            "INSERT OR IGNORE INTO frames (video, ordinal, t_ms, key) VALUES (?, ?, ?, ?)", new
        )
        found.added += len(new)
        advance(len(their_rows))
    return found


def _times(rows: Iterable[tuple]) -> dict[str, dict[int, int]]:
    """video -> {ordinal: t_ms} of (video, ordinal, t_ms[, key]) rows."""
    out: dict[str, dict[int, int]] = {}
    for video, ordinal, t_ms, *_ in rows:
        out.setdefault(video, {})[int(ordinal)] = int(t_ms)
    return out
