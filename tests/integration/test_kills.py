"""Every long job, killed with SIGKILL as a subprocess and run again, loses nothing and ends
as a run never killed: `index` (at three seeded moments, and inside a video), a re-index
after renames and deletes, `build-index` (after training, mid-add, before index.json),
`build-index --update` (before and after its commit record), `train clip` (at an epoch's
checkpoint and between checkpoints) and `caption train`. `embed-dataset`'s kill is in
test_distributed.py, beside its Ray instance.

Two ways to kill: from outside, when what the job has committed reaches a seeded random
amount (the catalog's rows), or from inside, at the Nth call of one of the job's own
functions (`KILL_AT` below): the process sends itself SIGKILL, so nothing of Python's
clean-up runs, exactly as when the machine loses power there. A video index is killed
inside a video's transaction, after its moments were written there."""

from __future__ import annotations

import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest

from cliplens.catalog.db import Catalog
from cliplens.catalog.update import update_catalog
from cliplens.models.ref import ModelRef
from cliplens.tasks.search import search
from conftest import make_photos
from tests_helpers import job_with, write_synthetic_shards

# python -c KILL_AT MODULE:OWNER.NAME before|after N ARGS...: `cliplens ARGS` with the Nth
# call of that function (a module function or a class's method) ending in SIGKILL, just
# before it runs or just after it returns
KILL_AT = r"""
import importlib, os, signal, sys
target, when, nth = sys.argv[1], sys.argv[2], int(sys.argv[3])
module_name, _, attr = target.partition(":")
owner = importlib.import_module(module_name)
*path, name = attr.split(".")
for part in path:
    owner = getattr(owner, part)
real, calls = getattr(owner, name), [0]
def dying(*args, **kwargs):
    calls[0] += 1
    if when == "before" and calls[0] == nth:
        os.kill(os.getpid(), signal.SIGKILL)
    out = real(*args, **kwargs)
    if when == "after" and calls[0] == nth:
        os.kill(os.getpid(), signal.SIGKILL)
    return out
setattr(owner, name, dying)
from cliplens.cli.main import main
sys.exit(main(sys.argv[4:]))
"""


def _env(tiny_model_dir: Path) -> dict[str, str]:
    return {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(sys.path),
        "CLIPLENS_MODEL": f"local:{tiny_model_dir}",
    }


def _cliplens(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    """`cliplens ARGS` to the end; it must succeed."""
    cmd = [sys.executable, "-m", "cliplens.cli.main", *map(str, args)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return done


def _killed_at(target: str, when: str, nth: int, args: list[str], env: dict[str, str]) -> None:
    """`cliplens ARGS`, killed at the Nth call of `target`: it must die there."""
    cmd = [sys.executable, "-c", KILL_AT, target, when, str(nth), *map(str, args)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == -signal.SIGKILL, (
        f"{target} #{nth} was never reached (exit {done.returncode}): {done.stderr[-2000:]}"
    )


def _killed_when(args: list[str], env: dict[str, str], reached) -> None:
    """`cliplens ARGS`, killed (with every process it started) as soon as `reached()`."""
    cmd = [sys.executable, "-m", "cliplens.cli.main", *map(str, args)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None and not reached():
        time.sleep(0.01)
    assert proc.poll() is None, "the job ended before the moment it was to be killed at"
    tree = [*psutil.Process(proc.pid).children(recursive=True)]
    proc.send_signal(signal.SIGKILL)
    for child in tree:
        child.kill()
    proc.wait(30)
    proc.stderr.close()


# ------------------------------------------------------------ the catalog


def _count(db: Path, sql: str) -> int:
    """A count read beside the writer; 0 while the catalog does not exist yet."""
    if not db.exists():
        return 0
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5) as con:
            return con.execute(sql).fetchone()[0]
    except sqlite3.OperationalError:  # created but its tables not yet
        return 0


EMBEDDED = "SELECT COUNT(*) FROM files f JOIN embeddings e ON e.hash = f.hash"


def _catalog_state(db: Path, model: ModelRef) -> dict[str, np.ndarray]:
    """path -> vector of every file the catalog embedded, after checking that it is whole:
    each good file once, with its vector; no vector without a file."""
    with sqlite3.connect(db) as con:
        assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        twice = con.execute("SELECT path FROM files GROUP BY path HAVING COUNT(*) > 1").fetchall()
        assert twice == []
        unembedded = con.execute(
            "SELECT COUNT(*) FROM files f WHERE f.status = 'ok' AND NOT EXISTS "
            "(SELECT 1 FROM embeddings e WHERE e.hash = f.hash)"
        ).fetchone()[0]
        assert unembedded == 0
        orphans = con.execute(
            "SELECT COUNT(*) FROM embeddings e WHERE NOT EXISTS "
            "(SELECT 1 FROM files f WHERE f.hash = e.hash)"
        ).fetchone()[0]
        assert orphans == 0
    with Catalog(db, readonly=True) as cat:
        ids, _, matrix = cat.vectors(model.info.model_id)
        paths = cat.paths(ids.tolist())
        return {paths[i]: v.astype(np.float32) for i, v in zip(ids.tolist(), matrix, strict=True)}


def _same_catalog(db: Path, reference: Path, model: ModelRef) -> None:
    """The catalog holds what the reference (a run never killed) holds, and searches alike."""
    got, want = _catalog_state(db, model), _catalog_state(reference, model)
    assert sorted(got) == sorted(want)
    for path, v in want.items():
        np.testing.assert_allclose(got[path], v, atol=2e-3, err_msg=path)
    for query in ("a photo", "noise", "a red square"):
        with Catalog(db, readonly=True) as a, Catalog(reference, readonly=True) as b:
            hits, expected = search(a, model, query, n=10), search(b, model, query, n=10)
        assert [h.path for h in hits] == [h.path for h in expected], query
        assert [h.score for h in hits] == pytest.approx([h.score for h in expected], abs=2e-3)


@pytest.fixture(scope="module")
def model(tiny_model_dir) -> ModelRef:
    return ModelRef(f"local:{tiny_model_dir}", precision="fp32")


def test_an_index_killed_three_times_loses_nothing(tmp_path, tiny_model_dir, model):
    folder = tmp_path / "photos"
    make_photos(folder, 100, size=(480, 360))
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a whole jpeg")
    env = _env(tiny_model_dir)
    db = tmp_path / "c.db"
    args = ["index", folder, "--db", db, "-b", "2", "--workers", "0", "--precision", "fp32"]
    rng = np.random.default_rng(20)
    for at in sorted(rng.integers(4, 90, size=3)):  # seeded moments, by rows committed
        _killed_when(args, env, lambda at=at: _count(db, EMBEDDED) >= at)
        kept = _count(db, EMBEDDED)
        assert kept >= at  # what was committed before the kill is there
    _cliplens(args, env)
    reference = tmp_path / "reference.db"
    with Catalog(reference) as cat:
        update_catalog(cat, model, [folder], workers=0)
    _same_catalog(db, reference, model)
    assert _count(db, "SELECT COUNT(*) FROM files WHERE status = 'failed'") == 1


def test_a_reindex_after_renames_and_deletes_killed_midway_ends_as_a_fresh_index(
    tmp_path, tiny_model_dir, model
):
    folder = tmp_path / "photos"
    paths = make_photos(folder, 80, size=(480, 360))
    env = _env(tiny_model_dir)
    db = tmp_path / "c.db"
    args = ["index", folder, "--db", db, "-b", "2", "--workers", "0", "--precision", "fp32"]
    _cliplens(args, env)
    for p in paths[:30]:  # renamed: the same content under a new name
        p.rename(p.with_name(f"renamed-{p.name}"))
    for p in paths[30:45]:
        p.unlink()
    make_photos(tmp_path / "new", 40, seed=5, size=(480, 360))
    for p in (tmp_path / "new").iterdir():
        p.rename(folder / f"new-{p.name}")
    before = _count(db, EMBEDDED)
    _killed_when(args, env, lambda: _count(db, EMBEDDED) >= before + 10)
    _cliplens(args, env)
    reference = tmp_path / "reference.db"
    with Catalog(reference) as cat:
        update_catalog(cat, model, [folder], workers=0)
    _same_catalog(db, reference, model)
    assert _count(db, "SELECT COUNT(*) FROM files") == 105


def _video_state(db: Path, model: ModelRef) -> dict[tuple[str, int | None], np.ndarray]:
    """(path, moment in ms or None) -> vector of every photo and video moment, after
    checking the catalog is whole: every ok video has its mean row and its moments'
    vectors, no vector or moment without a file."""
    with sqlite3.connect(db) as con:
        assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        orphans = con.execute(
            "SELECT count(*) FROM embeddings WHERE hash NOT IN (SELECT hash FROM files "
            "WHERE hash IS NOT NULL) AND hash NOT IN (SELECT key FROM frames)"
        ).fetchone()[0]
        assert orphans == 0
        unembedded = con.execute(
            "SELECT count(*) FROM files f WHERE status = 'ok' AND (NOT EXISTS (SELECT 1 FROM "
            "embeddings e WHERE e.hash = f.hash) OR (kind = 'video' AND NOT EXISTS (SELECT 1 "
            "FROM frames fr JOIN embeddings e ON e.hash = fr.key WHERE fr.video = f.hash)))"
        ).fetchone()[0]
        assert unembedded == 0
    from cliplens.catalog.frames import file_of, moment_times

    with Catalog(db, readonly=True) as cat:
        rows, _, matrix = cat.vectors(model.info.model_id)
        paths, times = cat.paths(file_of(rows).tolist()), moment_times(cat, rows.tolist())
        return {
            (paths[int(f)], None if r not in times else round(times[r] * 1000)): v
            for r, f, v in zip(rows.tolist(), file_of(rows).tolist(), matrix, strict=True)
        }


def test_a_video_index_killed_mid_video_resumes_and_loses_nothing(tmp_path, tiny_model_dir, model):
    from skimage import data

    from tests_helpers import make_video

    folder = tmp_path / "clips"
    folder.mkdir()
    shots = [data.chelsea(), data.rocket(), data.coffee(), data.astronaut()]
    for i in range(4):
        make_video(folder / f"v{i}.mp4", [(shots[i], 1.0), (shots[(i + 1) % 4], 1.0)])
    make_photos(folder, 3)
    env = _env(tiny_model_dir)
    db = tmp_path / "c.db"
    args = ["index", folder, "--db", db, "-b", "2", "--workers", "0", "--precision", "fp32"]
    args += ["--min-frame-gap", "0.5"]
    # killed inside the third video's transaction, after its moments were written there
    _killed_at("cliplens.catalog.frames:put_moments", "after", 3, args, env)
    assert 0 < _count(db, "SELECT count(*) FROM files WHERE kind = 'video'") < 4
    _cliplens(args, env)
    reference = tmp_path / "reference.db"
    with Catalog(reference) as cat:
        from cliplens.video import VideoSampling

        update_catalog(cat, model, [folder], workers=0, video=VideoSampling(min_gap=0.5))
    got, want = _video_state(db, model), _video_state(reference, model)
    assert sorted(got, key=str) == sorted(want, key=str)
    assert sum(t is not None for _, t in want) == 8  # two moments a video
    for key, v in want.items():
        np.testing.assert_allclose(got[key], v, atol=2e-3, err_msg=str(key))


# ------------------------------------------------------------ build-index


INCOMPLETE = "not a complete build-index folder|build one with 'cliplens build-index'"


def _answers(folder: Path, queries: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    from cliplens.index.built import open_built_index

    index = open_built_index(folder).index
    distances, ids = index.search(queries, 10)
    return ids, distances


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("kill-shards")
    write_synthetic_shards(folder, 6_000, 32, shard=1000)  # 6 chunks of 1000
    return folder


@pytest.fixture(scope="module")
def never_killed(tmp_path_factory, shards, tiny_model_dir) -> Path:
    out = tmp_path_factory.mktemp("kill-index") / "index"
    _cliplens(["build-index", shards, "--out", out, "--queries", "50"], _env(tiny_model_dir))
    return out


@pytest.mark.parametrize(
    ("target", "when", "nth", "resumed"),
    [
        ("cliplens.index.build:_trained", "after", 1, 0),  # trained, nothing added
        ("cliplens.index.build:_save_partial", "after", 3, 2000),  # mid-add: 2 of 6 chunks
        ("cliplens.index.build:write_index_folder", "before", 1, 6000),  # all but index.json
    ],
)
def test_a_build_killed_resumes_and_answers_like_one_never_killed(
    tmp_path, shards, never_killed, tiny_model_dir, target, when, nth, resumed
):
    from cliplens.errors import InvalidInputError
    from cliplens.index.built import open_built_index

    env = _env(tiny_model_dir)
    out = tmp_path / "index"
    args = ["build-index", shards, "--out", out, "--queries", "50", "--checkpoint-minutes", "1e-9"]
    _killed_at(target, when, nth, args, env)
    with pytest.raises(InvalidInputError, match=INCOMPLETE):
        open_built_index(out)  # never served half-built
    again = json.loads(_cliplens([*args, "-f", "json"], env).stdout)
    assert again["resumed_rows"] == resumed
    queries = np.random.default_rng(3).standard_normal((20, 32)).astype(np.float32)
    ids, distances = _answers(out, queries)
    want_ids, want_distances = _answers(never_killed, queries)
    np.testing.assert_array_equal(ids, want_ids)
    np.testing.assert_allclose(distances, want_distances, atol=1e-5)


@pytest.mark.parametrize(
    ("target", "when", "finished"),
    [
        ("cliplens.index.build:write_atomic", "before", False),  # the new index not written
        ("cliplens.index.build:commit_update", "before", False),  # all new files, no record
        ("cliplens.index.built:_swap", "after", True),  # recorded, only index.faiss renamed
    ],
)
def test_an_update_killed_keeps_the_old_build_or_finishes_the_new(
    tmp_path, tiny_model_dir, target, when, finished
):
    """`build-index --update` writes its files beside the old ones and renames them in
    after its commit record: killed before the record, the folder answers as it did
    before the update, and the update run again answers like one never killed; killed
    after, the next open finishes it. Never a mix, never a folder to build again."""
    from cliplens.index.built import NEXT, UPDATE_FILE, open_built_index

    env = _env(tiny_model_dir)
    whole, shards = tmp_path / "whole", tmp_path / "shards"
    whole.mkdir()
    shards.mkdir()
    write_synthetic_shards(whole, 3_000, 16, shard=500)  # 6 shards of 500
    names = sorted(json.loads((whole / "manifest.json").read_text())["shards"])
    job_with(whole, shards, names[:4])
    index, old, twin = tmp_path / "index", tmp_path / "old", tmp_path / "twin"
    _cliplens(["build-index", shards, "--kind", "flat", "--queries", "20", "--out", index], env)
    job_with(whole, shards, names)  # the collection grew
    shutil.copytree(index, old)
    shutil.copytree(index, twin)
    _cliplens(["build-index", shards, "--out", twin, "--update", "--queries", "20"], env)
    update = ["build-index", shards, "--out", index, "--update", "--queries", "20"]
    _killed_at(target, when, 1, update, env)
    queries = np.random.default_rng(4).standard_normal((20, 16)).astype(np.float32)

    def same(a: Path, b: Path) -> None:
        ids, distances = _answers(a, queries)
        want_ids, want_distances = _answers(b, queries)
        np.testing.assert_array_equal(ids, want_ids)
        np.testing.assert_allclose(distances, want_distances, atol=1e-5)
        built, other = open_built_index(a), open_built_index(b)
        assert len(built) == len(other) and built.meta.report.n == other.meta.report.n
        assert [built.path_of(r) for r in (0, len(built) - 1)] == [
            other.path_of(r) for r in (0, len(other) - 1)
        ]

    same(index, twin if finished else old)
    assert not (index / UPDATE_FILE).exists()
    if not finished:
        _cliplens(update, env)
        same(index, twin)
    assert not list(index.glob(f"{NEXT}*")) and not list(index.glob(".*.tmp"))


# ------------------------------------------------------------ training

TINY_CLIP = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8, "head_width": 16},
    "text_cfg": {"context_length": 24, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


def _steps(out: Path) -> list[dict]:
    """The step rows of OUT/log.jsonl: each step once, in order."""
    rows = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss" in r and "step" in r]
    assert [r["step"] for r in steps] == sorted({r["step"] for r in steps}), "a step twice"
    return steps


def _tensors(folder: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    out: dict[str, np.ndarray] = {}
    for f in sorted(folder.rglob("*.safetensors")):
        out |= {f"{f.relative_to(folder)}:{k}": v for k, v in load_file(f).items()}
    assert out, f"no weights under {folder}"
    return out


def _same_run(out: Path, reference: Path, weights: str) -> None:
    """A run killed and resumed: the same steps and losses as one never killed, and the
    same weights at the end."""
    got, want = _steps(out), _steps(reference)
    assert [r["step"] for r in got] == [r["step"] for r in want]
    np.testing.assert_allclose([r["loss"] for r in got], [r["loss"] for r in want], atol=1e-5)
    a, b = _tensors(out / weights), _tensors(reference / weights)
    assert sorted(a) == sorted(b)
    for k, v in b.items():
        np.testing.assert_allclose(a[k], v, atol=1e-5, err_msg=k)


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    from cliplens.datasets.shapes import write_shapes

    folder = tmp_path_factory.mktemp("kill-shapes")
    write_shapes(folder, n=72, size=32, heldout=4)  # 4 steps an epoch at 16
    (folder / "tiny.json").write_text(json.dumps(TINY_CLIP))
    return folder


def test_clip_training_killed_twice_resumes_exactly(tmp_path, shapes, tiny_model_dir):
    env = _env(tiny_model_dir)

    def args(out: Path) -> list:
        data = ["--data", shapes / "train.jsonl", "--model-config", shapes / "tiny.json"]
        run = ["--epochs", "3", "-b", "16", "--warmup", "2", "--lr", "1e-3"]
        return ["train", "clip", *data, *run, "--out", out]

    reference, out = tmp_path / "reference", tmp_path / "run"
    _cliplens(args(reference), env)
    # at the first epoch's checkpoint, then between checkpoints (steps done, then lost)
    _killed_at("cliplens.train.loop:TrainingLoop.save", "after", 1, args(out), env)
    _killed_at("cliplens.train.loop:TrainingLoop._one_step", "before", 3, args(out), env)
    _cliplens(args(out), env)
    _same_run(out, reference, "model")


def test_caption_training_killed_resumes_exactly(tmp_path, shapes, tiny_model_dir):
    env = _env(tiny_model_dir)

    def args(out: Path) -> list:
        data = ["--data", shapes / "train-full.jsonl", "--model", f"local:{tiny_model_dir}"]
        lm = ["--lm", "scratch:gpt2", "--lm-layers", "1", "--lm-width", "32"]
        run = ["--epochs", "2", "--batch-size", "16", "--eval-images", "2"]
        run += ["--train-precision", "fp32", "--db", out.parent / f"{out.name}.db"]
        return ["caption", "train", *data, *lm, *run, "--out", out]

    reference, out = tmp_path / "reference", tmp_path / "run"
    _cliplens(args(reference), env)
    # between checkpoints: two steps of the first epoch done, then lost
    _killed_at("cliplens.train.loop:TrainingLoop._one_step", "before", 3, args(out), env)
    _cliplens(args(out), env)
    _same_run(out, reference, "captioner")
