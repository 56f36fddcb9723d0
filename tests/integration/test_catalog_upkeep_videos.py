"""`cliplens catalog info | check | vacuum | merge | export` over catalogs holding videos:
moments counted, damage to them found and repaired, unions equal to one indexing, and
exports that leave videos out and say so. Real H.264 videos and real photos."""

from __future__ import annotations

import json
import shutil
import sqlite3
from pathlib import Path

import pytest
from PIL import Image
from skimage import data

from cliplens.catalog.db import Catalog
from cliplens.catalog.update import update_catalog
from cliplens.catalog.upkeep import check_catalog
from cliplens.models.ref import ModelRef
from cliplens.tasks.search import search
from cliplens.video import VideoSampling, read_moments
from conftest import TINY_CFG, make_tiny_clip
from tests_helpers import cli_json, make_video
from tests_helpers import run_cli as run

SAMPLING = VideoSampling(min_gap=0.5, max_gap=2)
CAT, ROCKET = data.chelsea(), data.rocket()


def index(db: Path, ref: ModelRef, *folders: Path, video: VideoSampling = SAMPLING) -> Path:
    with Catalog(db) as catalog:
        update_catalog(catalog, ref, list(folders), workers=0, video=video)
    return db


def contents(db: Path) -> dict[str, list[tuple]]:
    """Every file row (without its update time), moment and embedding, in order."""
    con = sqlite3.connect(f"{db.resolve().as_uri()}?mode=ro", uri=True)
    try:
        return {
            "files": sorted(
                con.execute("SELECT path, size, mtime_ns, hash, status, error, kind FROM files")
            ),
            "frames": sorted(con.execute("SELECT video, ordinal, t_ms, key FROM frames")),
            "embeddings": sorted(
                con.execute(
                    "SELECT m.model_id, e.hash, e.vector FROM embeddings e "
                    "JOIN models m ON m.id = e.model"
                )
            ),
        }
    finally:
        con.close()


def file_hash(db: Path, path: Path) -> str:
    with sqlite3.connect(db) as con:
        return con.execute("SELECT hash FROM files WHERE path = ?", (str(path),)).fetchone()[0]


def checked(capsys, db: Path) -> dict:
    """`catalog check --format json` of a damaged catalog: it exits 1."""
    code, out, err = run(capsys, "catalog", "check", "--db", db, "--format", "json")
    assert code == 1, err
    return json.loads(out)


def ranked(db: Path, ref: ModelRef) -> list[list[tuple[str, float]]]:
    with Catalog(db, readonly=True) as catalog:
        return [
            [(h.path, round(h.score, 5)) for h in search(catalog, ref, q, n=20)]
            for q in ("a cat", "a rocket")
        ]


@pytest.fixture(scope="module")
def ref(tiny_model_dir: Path) -> ModelRef:
    return ModelRef(f"local:{tiny_model_dir}", device="cpu", precision="fp32")


@pytest.fixture(scope="module")
def library(tmp_path_factory) -> tuple[Path, Path]:
    """Two folders of photos and videos (each a cat shot, then a rocket shot): one video
    and one photo in both, a video in each, and an unreadable video in b."""
    root = tmp_path_factory.mktemp("library")
    a, b = root / "a", root / "b"
    a.mkdir()
    b.mkdir()
    make_video(root / "shared.mp4", [(CAT, 2.0), (ROCKET, 2.0)])
    make_video(a / "walk-a.mp4", [(CAT, 3.0), (ROCKET, 2.0)])
    make_video(b / "walk-b.mp4", [(CAT, 2.0), (ROCKET, 3.0)])
    (b / "broken.mp4").write_bytes(b"not a video at all" * 50)
    Image.fromarray(CAT).save(a / "cat.jpg", quality=90)
    Image.fromarray(ROCKET).save(b / "rocket.jpg", quality=90)
    Image.fromarray(data.coffee()).save(root / "coffee.jpg", quality=90)
    for folder in (a, b):  # the same content in both: one embedding, its moments once
        shutil.copy2(root / "shared.mp4", folder / "shared.mp4")
        shutil.copy2(root / "coffee.jpg", folder / "coffee.jpg")
    return a, b


def videos_in(*folders: Path) -> list[Path]:
    return sorted(p for f in folders for p in f.iterdir() if p.suffix == ".mp4")


# ------------------------------------------------------------------ merge


def test_merged_catalogs_of_photos_and_videos_equal_one_index_run(capsys, tmp_path, library, ref):
    a, b = library
    mine = index(tmp_path / "a.db", ref, a)
    theirs = index(tmp_path / "b.db", ref, b)
    whole = index(tmp_path / "whole.db", ref, a, b)
    report = cli_json(capsys, "catalog", "merge", theirs, "--db", mine, "--format", "json")
    got, want = contents(mine), contents(whole)
    assert {row[6] for row in want["files"]} == {"image", "video"}
    assert want["frames"] and any("#" in h for _, h, _ in want["embeddings"])
    assert got == want  # same file rows and kinds, same moments, same vectors byte for byte
    shared = file_hash(theirs, b / "shared.mp4")
    their_frames = contents(theirs)["frames"]
    assert report["frames_added"] == sum(f[0] != shared for f in their_frames) > 0
    assert report["files_added"] == len(list(b.iterdir())) and report["video_conflicts"] == []
    assert ranked(mine, ref) == ranked(whole, ref)
    with Catalog(mine, readonly=True) as merged:
        assert check_catalog(merged).healthy
        generation = merged.generation
    again = cli_json(capsys, "catalog", "merge", theirs, "--db", mine, "--format", "json")
    assert again["frames_added"] == again["embeddings_added"] == again["files_added"] == 0
    assert contents(mine) == want
    with Catalog(mine, readonly=True) as merged:
        assert merged.generation == generation
    code, _, err = run(capsys, "catalog", "merge", theirs, "--db", mine)
    assert code == 0 and "0 video moments added" in err, err


def test_merge_keeps_our_moments_of_a_video_sampled_otherwise(capsys, tmp_path, library, ref):
    from cliplens.models.openclip import save_checkpoint

    a, _ = library
    other_dir = save_checkpoint(make_tiny_clip(seed=1), tmp_path / "m2", TINY_CFG, arch="t2")
    other = ModelRef(f"local:{other_dir}", device="cpu", precision="fp32")
    mine = index(tmp_path / "mine.db", ref, a)
    dense = VideoSampling(min_gap=0.5, max_gap=1)  # more moments of the same videos
    theirs = index(tmp_path / "theirs.db", other, a, video=dense)
    before = contents(mine)
    report = cli_json(capsys, "catalog", "merge", theirs, "--db", mine, "--format", "json")
    assert report["video_conflicts"] == [str(p) for p in videos_in(a)]
    assert report["frames_added"] == 0 and report["models_added"] == [other.info.model_id]
    after = contents(mine)
    assert after["frames"] == before["frames"]  # ours kept
    copied = [h for m, h, _ in after["embeddings"] if m == other.info.model_id]
    photo_hashes = {file_hash(mine, p) for p in a.iterdir() if p.suffix == ".jpg"}
    assert report["embeddings_added"] == len(copied) and set(copied) == photo_hashes
    with Catalog(mine, readonly=True) as merged:
        assert check_catalog(merged).healthy
    index(mine, other, a)  # embeds the videos at our moments
    with Catalog(mine, readonly=True) as merged:
        assert check_catalog(merged).healthy
    assert contents(mine)["frames"] == before["frames"]
    again = cli_json(capsys, "catalog", "merge", theirs, "--db", mine, "--format", "json")
    assert again["embeddings_added"] == 0 and len(again["video_conflicts"]) == 2
    code, _, err = run(capsys, "catalog", "merge", theirs, "--db", mine)
    assert code == 0 and "2 videos have other moments" in err, err
    assert f"other moments: {a / 'shared.mp4'}" in err, err


# ------------------------------------------------------------------ check and vacuum


def _damaged(db: Path, tmp_path: Path, name: str, *sql: tuple[str, tuple]) -> Path:
    copy = tmp_path / name
    shutil.copy2(db, copy)
    with sqlite3.connect(copy) as con:
        for statement, args in sql:
            con.execute(statement, args)
    con.close()
    return copy


def test_check_finds_damaged_moments_and_vacuum_then_index_repairs_them(
    capsys, tmp_path, library, ref
):
    a, _ = library
    db = index(tmp_path / "c.db", ref, a)
    model_id = ref.info.model_id
    healthy = cli_json(capsys, "catalog", "check", "--db", db, "--format", "json")
    assert healthy["healthy"] is True and healthy["problems"] == []
    want = contents(db)
    assert sum("#" in h for _, h, _ in want["embeddings"]) > 0  # moments: no orphans

    walk, shared = file_hash(db, a / "walk-a.mp4"), file_hash(db, a / "shared.mp4")
    n_walk = sum(f[0] == walk for f in want["frames"])
    n_shared = sum(f[0] == shared for f in want["frames"])
    assert n_shared > 1
    forgot = _damaged(db, tmp_path, "forgot.db", ("DELETE FROM files WHERE hash = ?", (walk,)))
    found = checked(capsys, forgot)
    assert found["orphan_frames"] == n_walk
    assert found["orphans"] == {model_id: 1}  # the video's own row
    assert found["orphan_moments"] == {} and found["incomplete_videos"] == {}
    assert any("orphan frames" in p and "vacuum" in p for p in found["problems"])
    vacuumed = cli_json(capsys, "catalog", "vacuum", "--db", forgot, "--format", "json")
    assert vacuumed["frames"] == n_walk and vacuumed["garbage"] == n_walk + 1
    with Catalog(forgot, readonly=True) as catalog:
        assert check_catalog(catalog).healthy

    lost = _damaged(
        db, tmp_path, "lost.db", ("DELETE FROM embeddings WHERE hash = ?", (f"{shared}#1",))
    )
    found = checked(capsys, lost)
    assert found["incomplete_videos"] == {model_id: [str(a / "shared.mp4")]}
    assert found["orphans"] == found["orphan_moments"] == {} and found["orphan_frames"] == 0
    code, _, err = run(capsys, "catalog", "check", "--db", lost)
    assert code == 1 and f"moments missing: {a / 'shared.mp4'}" in err, err
    vacuumed = cli_json(capsys, "catalog", "vacuum", "--db", lost, "--format", "json")
    assert vacuumed["videos_unmarked"] == 1 and vacuumed["frames"] == 0
    index(lost, ref, a)
    assert contents(lost) == want

    assert n_walk > 2
    delete_frame = "DELETE FROM frames WHERE video = ? AND ordinal = 1"
    damages = {  # the last moment's frame, then a middle one's with its embedding
        "shared.mp4": [(delete_frame, (shared,))],
        "walk-a.mp4": [
            (delete_frame, (walk,)),
            ("DELETE FROM embeddings WHERE hash = ?", (f"{walk}#1",)),
        ],
    }
    for name, sql in damages.items():
        gap = _damaged(db, tmp_path, f"gap-{name}.db", *sql)
        found = checked(capsys, gap)
        assert found["orphan_moments"] == ({model_id: 1} if len(sql) == 1 else {})
        assert found["incomplete_videos"] == {model_id: [str(a / name)]}
        assert len(found["problems"]) == len(found["orphan_moments"]) + 1
        vacuumed = cli_json(capsys, "catalog", "vacuum", "--db", gap, "--format", "json")
        n = n_shared if name == "shared.mp4" else n_walk
        assert vacuumed["videos_unmarked"] == 1 and vacuumed["frames"] == n - 1
        index(gap, ref, a)  # sampled afresh: as it was
        assert contents(gap) == want, name


# ------------------------------------------------------------------ info


def test_info_counts_videos_and_their_moments(capsys, tmp_path, library, ref):
    a, b = library
    db = index(tmp_path / "c.db", ref, a, b)
    readable = [p for p in videos_in(a, b) if p.name != "broken.mp4"]
    prep = ref.info.preprocessing
    moments = {p.read_bytes(): len(read_moments(str(p), prep, SAMPLING).times_ms) for p in readable}
    photos = [p for f in (a, b) for p in f.iterdir() if p.suffix == ".jpg"]
    data_ = cli_json(capsys, "catalog", "info", "--db", db, "--format", "json")
    assert data_["videos"] == {"ok": len(readable), "failed": 1}
    assert data_["files"] == {"ok": len(readable) + len(photos), "failed": 1}
    assert data_["moments"] == sum(moments.values())
    (model,) = data_["models"]
    distinct = len({p.read_bytes() for p in photos}) + len(moments)
    assert model == {
        "model_id": ref.info.model_id,
        "dim": 32,
        "embeddings": distinct + sum(moments.values()),
        "files": len(readable) + len(photos),
        "videos": len(readable),
        "moments": sum(moments.values()),
    }
    code, out, err = run(capsys, "catalog", "info", "--db", db)
    assert code == 0, err
    assert f"{len(readable) + 1} ({len(readable)} ok), {sum(moments.values())} moments" in out


# ------------------------------------------------------------------ export


def test_export_leaves_videos_out_and_says_so(capsys, tmp_path, library, ref):
    pq = pytest.importorskip("pyarrow.parquet")
    a, b = library
    db = index(tmp_path / "c.db", ref, a, b)
    videos = videos_in(a, b)
    photos = sorted(str(p) for f in (a, b) for p in f.iterdir() if p.suffix == ".jpg")
    out = tmp_path / "shards"
    report = cli_json(capsys, "catalog", "export", out, "--db", db, "-f", "json")
    assert report["videos"] == len(videos)
    assert report["notes"] == [
        f"{len(videos)} videos not exported: build-index holds photos only; "
        "search them in the catalog"
    ]
    assert report["rows"] == len(photos) and report["failures"] == report["not_embedded"] == 0
    exported = sorted(
        p for f in out.glob("part-*[0-9].parquet") for p in pq.read_table(f)["path"].to_pylist()
    )
    assert exported == photos
    assert json.loads((out / "manifest.json").read_text())["files"] == len(photos)
    built = cli_json(
        capsys, "build-index", out, "--out", tmp_path / "idx", "--kind", "flat", "-f", "json"
    )
    assert built["n"] == len(photos)
    code, _, err = run(capsys, "catalog", "export", tmp_path / "again", "--db", db)
    assert code == 0 and f"{len(videos)} videos not exported" in err, err
