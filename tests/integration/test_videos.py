"""Videos in the catalog end to end: found at their moments, one row per video, indexed
incrementally, shared between models, reported when damaged, compared with photos by
`similar` and `duplicates`, and an old catalog upgraded to hold them. Real videos are
written from real photos (a cat shot, then a rocket shot)."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from skimage import data

import cliplens
from cliplens.catalog.db import Catalog, CatalogError
from cliplens.catalog.schema import MIGRATIONS, SCHEMA_VERSION
from cliplens.catalog.update import update_catalog
from cliplens.cli.main import main
from cliplens.tasks.search import duplicates, search, similar
from tests_helpers import make_video, run_json

CAT, ROCKET = data.chelsea(), data.rocket()
QUICK = cliplens.VideoSampling(min_gap=0.5, max_gap=2.0)
CAT_SHOT, ROCKET_SHOT = (0.0, 5.0), (5.0, 10.0)  # seconds of each shot in the trip video


@pytest.fixture(scope="module")
def library(tmp_path_factory) -> Path:
    """A phone library: the trip video (a cat shot, then a rocket shot) beside two photos."""
    folder = tmp_path_factory.mktemp("library")
    make_video(folder / "trip.mp4", [(CAT, 5.0), (ROCKET, 5.0)])
    Image.fromarray(data.coffee()).save(folder / "coffee.jpg")
    Image.fromarray(data.astronaut()).save(folder / "astronaut.jpg")
    return folder


def _inside(t: float, shot: tuple[float, float]) -> bool:
    return shot[0] <= t < shot[1]


def test_a_cat_and_a_rocket_are_found_at_their_moments_of_one_video(
    tmp_path, library, capsys, monkeypatch
):
    monkeypatch.setenv("CLIPLENS_MODEL", "offline")
    db = str(tmp_path / "c.db")
    gaps = ["--min-frame-gap", "0.5", "--max-frame-gap", "2"]
    stats = run_json(
        capsys, ["index", str(library), "--db", db, "--workers", "0", "-f", "json", *gaps]
    )
    assert (stats["new"], stats["videos"], stats["failed"]) == (3, 1, 0)
    assert stats["encoded"] == 2 + 6  # two photos, and the video's moments at 0, 2, 4, 5, 7, 9 s
    for query, shot in (("a cat", CAT_SHOT), ("a rocket", ROCKET_SHOT)):
        argv = ["search", query, "--in", str(library), "--db", db, "--no-index", "-f", "json"]
        hits = run_json(capsys, argv)
        assert len({h["path"] for h in hits}) == len(hits) == 3  # one row per video
        best = hits[0]
        assert Path(best["path"]).name == "trip.mp4" and _inside(best["time"], shot), best
        assert best["moments"][0] == {"time": best["time"], "score": best["score"]}
        assert [m["score"] for m in best["moments"]] == sorted(
            (m["score"] for m in best["moments"]), reverse=True
        )
        assert all(_inside(m["time"], shot) for m in best["moments"][:2])
        assert all("time" not in h for h in hits if not h["path"].endswith(".mp4"))
    table = ["search", "a rocket", "--in", str(library), "--db", db, "--no-index"]
    assert main(table) == 0
    shown = capsys.readouterr().out
    assert "trip.mp4 @ 00:0" in shown and "(also 00:0" in shown
    # --each-moment: the video's moments as rows of their own
    argv = ["search", "a cat", "--in", str(library), "--db", db, "--no-index", "-n", "20"]
    rows = run_json(capsys, [*argv, "--each-moment", "-f", "json"])
    times = [h["time"] for h in rows if h["path"].endswith("trip.mp4")]
    assert sorted(times) == [0, 2, 4, 5, 7, 9] and len(rows) == 8
    assert main([*argv, "--each-moment"]) == 0
    shown = capsys.readouterr().out
    assert shown.count("trip.mp4 @ ") == 6 and "(also" not in shown


def test_paging_and_a_cut_off_count_a_video_once(tmp_path, library, offline):
    with Catalog(tmp_path / "c.db") as cat:
        update_catalog(cat, offline, [library], workers=0, video=QUICK)
        whole = search(cat, offline, "a rocket", n=3)
        assert [h.path for h in whole] == sorted(
            {h.path for h in whole}, key=[h.path for h in whole].index
        )
        pages = [search(cat, offline, "a rocket", n=1, offset=i) for i in range(3)]
        assert [p[0].path for p in pages] == [h.path for h in whole]
        cut = whole[1].score
        assert [h.path for h in search(cat, offline, "a rocket", n=3, min_score=cut)] == [
            h.path for h in whole[:2]
        ]


def test_each_moment_lists_a_videos_moments_as_results_of_their_own(tmp_path, library, offline):
    """`each_moment`: every moment found is a result with its own time, in the order of
    their scores; the grouped result is the best of them with the next best as its
    moments; photos are the same either way; pages are slices of the one list."""
    with Catalog(tmp_path / "c.db") as cat:
        update_catalog(cat, offline, [library], workers=0, video=QUICK)
        every = search(cat, offline, "a cat", n=20, each_moment=True)
        grouped = search(cat, offline, "a cat", n=20)
        video = [h for h in every if h.path.endswith("trip.mp4")]
        assert len(every) == 2 + 6 and len({h.time for h in video}) == 6  # 0, 2, 4, 5, 7, 9 s
        assert [h.score for h in every] == sorted((h.score for h in every), reverse=True)
        assert all(h.moments == ((h.time, h.score),) for h in video)
        assert all(_inside(h.time, CAT_SHOT) for h in video[:2])
        one = next(h for h in grouped if h.path.endswith("trip.mp4"))
        assert (one.time, one.score) == (video[0].time, video[0].score)
        assert list(one.moments) == [(h.time, h.score) for h in video[:3]]
        photos = [(h.path, h.score, h.time) for h in every if not h.path.endswith(".mp4")]
        assert photos == [(h.path, h.score, h.time) for h in grouped if h is not one]
        pages = [search(cat, offline, "a cat", n=3, offset=o, each_moment=True) for o in (0, 3, 6)]
        assert [h for page in pages for h in page] == every
        # leaving out the video leaves out all its moments, however many rows they fill
        query = offline.encode_texts(["a cat"])[0]
        model_id = offline.info.model_id
        rest = cat.search(query, 2, model_id, exclude=video[0].path, each_moment=True)
        assert [h.path for h in rest] == [p for p, _, _ in photos]
        (batched,) = cat.search_many(query[None], 20, model_id, each_moment=True)
        assert [(h.path, h.time) for h in batched] == [(h.path, h.time) for h in every]
        assert [h.score for h in batched] == pytest.approx([h.score for h in every], abs=1e-5)


def test_a_moment_sampled_again_at_another_time_is_replaced_in_the_ann_index(
    tmp_path, library, tiny
):
    """A moment's content key holds its time: a video read again into other times (same
    ordinals) changes those rows' keys, so the IVF index replaces their vectors instead
    of keeping the old ones (the photos' and the other moments' rows stay)."""
    from cliplens.catalog import ivf

    with Catalog(tmp_path / "c.db") as cat:
        update_catalog(cat, tiny, [library], workers=0, video=QUICK)
        model_id = tiny.info.model_id
        ids, keys, matrix = cat.vectors(model_id)
        moments = ids >= (1 << 62)
        assert moments.sum() == 6 and len(set(keys[moments].tolist())) == 6
        ann = ivf.build(ids, keys, matrix.astype(np.float32))
        with cat.transaction() as db:
            db.execute("UPDATE frames SET t_ms = t_ms + 250 WHERE ordinal = 2")
        ids2, keys2, matrix2 = cat.vectors(model_id)
        moved = moments & ((ids & 0xFFFFF) == 2)  # ordinal 2, in the low 20 bits
        assert (ids2 == ids).all() and ((keys2 != keys) == moved).all()
        assert ivf.update(ann, ids2, keys2, matrix2.astype(np.float32)) == 2  # out, then in


def test_videos_are_indexed_incrementally_and_moved_ones_keep_their_moments(tmp_path, tiny):
    folder = tmp_path / "clips"
    folder.mkdir()
    make_video(folder / "a.mp4", [(CAT, 2.0), (ROCKET, 2.0)])
    with Catalog(tmp_path / "c.db") as cat:
        first = update_catalog(cat, tiny, [folder], workers=0, video=QUICK)
        assert (first.new, first.videos, first.encoded) == (1, 1, 2)  # at 0 and 2 s
        assert update_catalog(cat, tiny, [folder], workers=0).unchanged == 1
        (folder / "a.mp4").rename(folder / "b.mp4")
        moved = update_catalog(cat, tiny, [folder], workers=0)
        assert (moved.moved, moved.removed, moved.encoded) == (1, 1, 0)
        hits = search(cat, tiny, "a rocket", n=1)
        assert Path(hits[0].path).name == "b.mp4" and hits[0].time is not None
        make_video(folder / "b.mp4", [(ROCKET, 1.0)])  # new content under the same name
        changed = update_catalog(cat, tiny, [folder], workers=0)
        assert (changed.changed, changed.videos) == (1, 1)
        (video_hash,) = cat.db.execute("SELECT hash FROM files").fetchone()
        assert cat.db.execute("SELECT DISTINCT video FROM frames").fetchall() == [(video_hash,)]
        (folder / "b.mp4").unlink()
        assert update_catalog(cat, tiny, [folder], workers=0).removed == 1
        for table in ("frames", "embeddings"):
            assert cat.db.execute(f"SELECT count(*) FROM {table}").fetchone()[0] == 0, table


def test_a_second_model_embeds_the_moments_the_first_one_chose(tmp_path, library, tiny, offline):
    with Catalog(tmp_path / "c.db") as cat:
        update_catalog(cat, offline, [library], workers=0, video=QUICK)
        chosen = cat.db.execute("SELECT ordinal, t_ms FROM frames ORDER BY ordinal").fetchall()
        # the tiny model's run uses the defaults (one moment per 10 s), yet embeds the same
        later = update_catalog(cat, tiny, [library], workers=0, video=cliplens.VideoSampling())
        assert later.encoded == 2 + len(chosen)
        assert (
            cat.db.execute("SELECT ordinal, t_ms FROM frames ORDER BY ordinal").fetchall() == chosen
        )
        for model in (offline, tiny):
            hit = next(h for h in search(cat, model, "a rocket", n=3) if h.time is not None)
            assert round(hit.time * 1000) in {t for _, t in chosen}


def test_a_truncated_video_is_reported_with_its_reason_and_not_retried(
    tmp_path, tiny, capsys, monkeypatch, tiny_model_dir
):
    folder = tmp_path / "clips"
    folder.mkdir()
    whole = make_video(tmp_path / "whole.mp4", [(CAT, 3.0), (ROCKET, 3.0)]).read_bytes()
    (folder / "cut.mp4").write_bytes(whole[: len(whole) * 3 // 4])
    make_video(folder / "fine.mp4", [(CAT, 1.0)])
    monkeypatch.setenv("CLIPLENS_MODEL", f"local:{tiny_model_dir}")
    db = str(tmp_path / "c.db")
    stats = run_json(capsys, ["index", str(folder), "--db", db, "--workers", "0", "-f", "json"])
    assert (stats["new"], stats["failed"], stats["videos"]) == (1, 1, 1)
    (error,) = stats["errors"]
    assert error["path"].endswith("cut.mp4")
    assert error["error"].startswith("truncated: its frames end at ") and "6.0 s" in error["error"]
    again = run_json(capsys, ["index", str(folder), "--db", db, "--workers", "0", "-f", "json"])
    assert (again["failed"], again["failed_before"]) == (0, 1)
    with Catalog(db, readonly=True) as cat:
        assert [Path(p).name for p, _ in cat.failures()] == ["cut.mp4"]
        assert all(not h.path.endswith("cut.mp4") for h in search(cat, tiny, "a cat", n=5))


def test_videos_decode_in_worker_processes_as_in_the_indexer(tmp_path, library, tiny):
    states = []
    for workers in (0, 2):
        with Catalog(tmp_path / f"w{workers}.db") as cat:
            update_catalog(cat, tiny, [library], workers=workers, video=QUICK)
            _, _, matrix = cat.vectors(tiny.info.model_id)
            states.append((cat.db.execute("SELECT t_ms FROM frames").fetchall(), matrix))
    assert states[0][0] == states[1][0]
    np.testing.assert_allclose(states[0][1], states[1][1], atol=2e-3)


def test_similar_and_duplicates_compare_photos_with_moments(tmp_path, library, offline):
    folder = tmp_path / "mixed"
    folder.mkdir()
    for name in ("trip.mp4", "coffee.jpg"):
        (folder / name).write_bytes((library / name).read_bytes())
    Image.fromarray(CAT).save(folder / "cat.png")
    with Catalog(tmp_path / "c.db") as cat:
        update_catalog(cat, offline, [folder], workers=0, video=QUICK)
        hits = similar(cat, offline, folder / "cat.png", n=2)
        assert Path(hits[0].path).name == "trip.mp4" and _inside(hits[0].time, CAT_SHOT)
        video_id = hits[0].id
        like_video = similar(cat, offline, video_id, n=2)  # the video's own vector: its mean
        assert all(h.id != video_id for h in like_video)
        groups = duplicates(cat, offline.info.model_id, [folder], threshold=0.9)
    (group,) = [g for g in groups if g.kind == "near"]
    members = group.members()
    assert (str((folder / "cat.png").resolve()), None) in members
    moments = [t for p, t in members if p.endswith("trip.mp4")]
    assert moments and all(_inside(t, CAT_SHOT) for t in moments)
    assert group.to_dict()["times"] == [None if t is None else round(t, 3) for _, t in members]


def test_a_catalog_of_the_first_schema_is_upgraded_to_hold_videos(tmp_path, tiny, library):
    db = tmp_path / "old.db"
    con = sqlite3.connect(db)
    con.executescript(f"BEGIN; {MIGRATIONS[0]}; PRAGMA user_version=1; COMMIT;")
    con.execute(
        "INSERT INTO files (path, size, mtime_ns, hash, status, error, updated_at) "
        "VALUES ('/gone/a.jpg', 1, 1, 'abc', 'failed', 'damaged', 0)"
    )
    con.commit()
    con.close()
    with pytest.raises(CatalogError, match="needs upgrading"):
        Catalog(db, readonly=True)
    with Catalog(db) as cat:
        assert cat.db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 2
        (row,) = cat.files_under(["/gone"]).values()
        assert (row.kind, row.status, row.error) == ("image", "failed", "damaged")
        update_catalog(cat, tiny, [library], workers=0, video=QUICK)
        assert search(cat, tiny, "a cat", n=3)


def test_a_catalog_upgraded_by_another_process_meanwhile_is_not_upgraded_twice(tmp_path):
    """Two processes open an old catalog at once: the second waits for the first one's
    upgrade, then sees it done (it had run the migration again: duplicate column)."""
    import threading
    import time

    db = tmp_path / "old.db"
    other = sqlite3.connect(db, isolation_level=None)
    other.executescript(f"BEGIN; {MIGRATIONS[0]}; PRAGMA user_version=1; COMMIT;")
    other.execute("PRAGMA journal_mode=WAL")
    other.execute("BEGIN IMMEDIATE")  # the other process, upgrading
    opened: dict[str, object] = {}

    def open_it() -> None:
        try:
            with Catalog(db) as cat:
                opened["version"] = cat.db.execute("PRAGMA user_version").fetchone()[0]
        except Exception as e:  # what the test reports
            opened["error"] = e

    waiting = threading.Thread(target=open_it)
    waiting.start()
    time.sleep(1.0)  # it has read version 1 and waits for the lock
    for statement in MIGRATIONS[1].split(";"):
        if statement.strip():
            other.execute(statement)
    other.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
    other.execute("COMMIT")
    waiting.join(timeout=60)
    other.close()
    assert opened == {"version": SCHEMA_VERSION}


def test_without_pyav_videos_are_left_as_they_are_with_a_note(tmp_path, library, tiny, monkeypatch):
    import cliplens.video

    with Catalog(tmp_path / "c.db") as cat:
        update_catalog(cat, tiny, [library], workers=0, video=QUICK)
        monkeypatch.setattr(cliplens.video, "available", lambda: False)
        stats = update_catalog(cat, tiny, [library], workers=0)
        assert stats.removed == 0 and stats.unchanged == 2
        assert stats.notes == [
            "1 videos were not indexed: they need PyAV (pip install 'cliplens[video]')"
        ]
        assert any(h.time is not None for h in search(cat, tiny, "a cat", n=3))


def test_the_catalog_keeps_the_video_sampling_it_was_given(tmp_path, tiny):
    folder = tmp_path / "clips"
    folder.mkdir()
    make_video(folder / "a.mp4", [(CAT, 5.0)])
    with Catalog(tmp_path / "c.db") as cat:
        update_catalog(cat, tiny, [folder], workers=0, video=QUICK)
        make_video(folder / "b.mp4", [(ROCKET, 5.0)])
        update_catalog(cat, tiny, [folder], workers=0)  # a later run, as a search's update
        rows = cat.db.execute(
            "SELECT f.path, count(*) FROM files f JOIN frames fr ON fr.video = f.hash "
            "GROUP BY f.path"
        ).fetchall()
    assert sorted((Path(p).name, n) for p, n in rows) == [("a.mp4", 3), ("b.mp4", 3)]


def test_one_frame_gap_given_changes_only_that_gap_of_the_kept_sampling(tmp_path, tiny_model_dir):
    """`index --max-frame-gap` alone keeps the catalog's other settings, and brings the
    minimum gap down where the two would cross (it had failed: min 1 s > max 0.5 s)."""
    import json

    from cliplens.catalog.update import kept_sampling

    folder = tmp_path / "clips"
    folder.mkdir()
    make_video(folder / "a.mp4", [(CAT, 2.0)])
    db = tmp_path / "c.db"
    model = ["--model", f"local:{tiny_model_dir}", "--workers", "0", "--db", str(db)]
    kept = {"min_gap": 1.5, "max_gap": 6.0, "change": 0.2, "max_frames": 50}
    with Catalog(db) as cat, cat.transaction() as con:  # settings the command line lacks
        con.execute(
            "INSERT INTO meta (key, value) VALUES ('video_sampling', ?)", (json.dumps(kept),)
        )
    assert main(["index", str(folder), *model, "--max-frame-gap", "8"]) == 0
    with Catalog(db) as cat:
        got = kept_sampling(cat)
    assert (got.min_gap, got.max_gap, got.change, got.max_frames) == (1.5, 8.0, 0.2, 50)
    assert main(["index", str(folder), *model, "--max-frame-gap", "0.5"]) == 0
    with Catalog(db) as cat:
        got = kept_sampling(cat)
    assert (got.min_gap, got.max_gap, got.change) == (0.5, 0.5, 0.2)
