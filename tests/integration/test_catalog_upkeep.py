"""`cliplens catalog info | check | vacuum | merge | export` over real catalogs: counts,
problems found, space given back, unions equal to one indexing, exports that
build-index turns into the same search."""

from __future__ import annotations

import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from cliplens.catalog.db import Catalog
from cliplens.catalog.schema import SCHEMA_VERSION
from cliplens.catalog.update import update_catalog
from cliplens.catalog.upkeep import check_catalog, merge_catalogs
from cliplens.index.built import open_built_index
from cliplens.models.ref import ModelRef
from cliplens.tasks.search import search
from conftest import TINY_CFG, make_photos, make_tiny_clip
from tests_helpers import cli_json
from tests_helpers import run_cli as run

QUERIES = ("a cat", "a rocket", "coffee")


def index(db: Path, ref: ModelRef, *folders: Path) -> Path:
    with Catalog(db) as catalog:
        update_catalog(catalog, ref, list(folders), workers=0)
    return db


def ranked(searched, ref: ModelRef, n: int = 20) -> list[list[tuple[str, float]]]:
    return [[(h.path, h.score) for h in search(searched, ref, q, n=n)] for q in QUERIES]


def assert_same_results(got, want) -> None:
    for a, b in zip(got, want, strict=True):
        assert [p for p, _ in a] == [p for p, _ in b]
        np.testing.assert_allclose([s for _, s in a], [s for _, s in b], atol=1e-5)


@pytest.fixture(scope="module")
def ref(tiny_model_dir: Path) -> ModelRef:
    return ModelRef(f"local:{tiny_model_dir}", device="cpu", precision="fp32")


@pytest.fixture(scope="module")
def halves(tmp_path_factory, photos: Path) -> tuple[Path, Path]:
    """The real photos split over two folders (4 and 3)."""
    root = tmp_path_factory.mktemp("halves")
    names = sorted(p.name for p in photos.iterdir())
    for folder, part in ((root / "a", names[:4]), (root / "b", names[4:])):
        folder.mkdir()
        for name in part:
            shutil.copy2(photos / name, folder / name)
    return root / "a", root / "b"


# ------------------------------------------------------------------ info


def test_info_counts_what_was_indexed(capsys, tmp_path, photos, ref):
    folder = tmp_path / "lib"
    shutil.copytree(photos, folder)
    shutil.copy2(photos / "cat.jpg", folder / "cat-copy.jpg")  # same content: one vector
    (folder / "broken.jpg").write_bytes(b"not a jpeg")
    db = index(tmp_path / "c.db", ref, folder)
    data = cli_json(capsys, "catalog", "info", "--db", db, "--format", "json")
    n = len(list(photos.iterdir()))
    assert data["files"] == {"ok": n + 1, "failed": 1}
    assert data["failed"] == 1 and data["total_files"] == n + 2
    assert data["schema"] == SCHEMA_VERSION and data["path"] == str(db.resolve())
    (model,) = data["models"]
    assert model == {
        "model_id": ref.info.model_id,
        "dim": 32,
        "embeddings": n,
        "files": n + 1,
        "videos": 0,
        "moments": 0,
    }
    assert data["videos"] == {"ok": 0, "failed": 0} and data["moments"] == 0
    size = data["size"]
    assert size["db"] == db.stat().st_size > 0
    assert size["total"] == size["db"] + size["wal"] + size["shm"] + size["vectors"]
    search(Catalog(db, readonly=True), ref, "a cat")  # writes the vector cache beside it
    after = cli_json(capsys, "catalog", "info", "--db", db, "--format", "json")
    assert after["size"]["vectors"] > 0
    code, out, err = run(capsys, "catalog", "info", "--db", db)
    assert code == 0, err
    assert ref.info.model_id in out and f"{n + 2} ({n + 1} ok, 1 failed)" in out


def test_info_and_check_of_a_missing_or_damaged_catalog(capsys, tmp_path):
    for command in ("info", "check", "vacuum", "export"):
        extra = [tmp_path / "out"] if command == "export" else []
        code, _, err = run(capsys, "catalog", command, *extra, "--db", tmp_path / "none.db")
        assert code == 1, (command, err)
        assert err.count("\n") == 1 and "does not exist" in err, err
    assert not (tmp_path / "none.db").exists()  # vacuum made no catalog
    junk = tmp_path / "junk.db"
    junk.write_bytes(b"this is not a database at all" * 100)
    code, _, err = run(capsys, "catalog", "check", "--db", junk)
    assert code == 1 and err.count("\n") == 1 and "not a cliplens catalog" in err, err


def test_check_finds_damaged_pages(capsys, tmp_path, halves, ref):
    db = index(tmp_path / "c.db", ref, halves[0])
    pages = db.stat().st_size // 4096
    assert pages > 3
    with db.open("r+b") as f:  # every page past the schema's: overwritten with noise
        f.seek(2 * 4096)
        f.write(np.random.default_rng(0).bytes((pages - 2) * 4096))
    code, out, err = run(capsys, "catalog", "check", "--db", db)
    assert code == 1
    # SQLite either reports the damage in its check, or refuses to read: one line either way
    assert ("integrity:" in err and "integrity" in out) or (
        err.count("\n") == 1 and "is damaged" in err
    ), (out, err)


# ------------------------------------------------------------------ check


def test_check_healthy_then_a_missing_file_an_orphan_and_an_unembedded_file(
    capsys, tmp_path, photos, ref
):
    folder = tmp_path / "lib"
    shutil.copytree(photos, folder)
    db = index(tmp_path / "c.db", ref, folder)
    report = cli_json(capsys, "catalog", "check", "--db", db, "--format", "json")
    assert report["healthy"] is True and report["problems"] == []
    assert report["files"] == len(list(photos.iterdir()))
    code, out, err = run(capsys, "catalog", "check", "--db", db)
    assert code == 0 and "healthy" in err, err

    gone = folder / "rocket.jpg"
    gone.unlink()
    model_id = ref.info.model_id
    with sqlite3.connect(db) as con:  # an embedding no file refers to, and a file without one
        key = con.execute("SELECT id FROM models").fetchone()[0]
        con.execute("INSERT INTO embeddings VALUES (?, ?, ?)", (key, "f" * 64, bytes(64)))
        (coffee_hash,) = con.execute(
            "SELECT hash FROM files WHERE path = ?", (str(folder / "coffee.jpg"),)
        ).fetchone()
        con.execute("DELETE FROM embeddings WHERE hash = ?", (coffee_hash,))
    code, out, err = run(capsys, "catalog", "check", "--db", db, "--format", "json")
    assert code == 1
    found = json.loads(out)
    assert found["healthy"] is False
    assert found["missing"] == [str(gone)]
    assert found["orphans"] == {model_id: 1}
    assert found["unembedded"] == [str(folder / "coffee.jpg")]
    assert found["integrity"] == [] and found["bad_vectors"] == {}
    assert len(found["problems"]) == 3
    code, out, err = run(capsys, "catalog", "check", "--db", db)
    assert code == 1
    assert f"missing: {gone}" in err and "orphans" in err and "3 kinds of problem" in err

    # vacuum drops the orphan; the missing file stays (only an index run forgets it)
    cli_json(capsys, "catalog", "vacuum", "--db", db, "--format", "json")
    with Catalog(db, readonly=True) as catalog:
        after = check_catalog(catalog)
    assert after.orphans == {} and after.missing == [str(gone)]


# ------------------------------------------------------------------ vacuum


def test_vacuum_shrinks_after_files_are_removed_and_keeps_search(capsys, tmp_path, ref):
    paths = make_photos(tmp_path / "many", 240, size=(16, 16))
    db = index(tmp_path / "c.db", ref, tmp_path / "many")
    for p in paths[40:]:
        p.unlink()
    index(db, ref, tmp_path / "many")  # forgets them: their pages are free, not given back
    with Catalog(db, readonly=True) as catalog:
        before = ranked(catalog, ref)
        assert catalog.db.execute("PRAGMA freelist_count").fetchone()[0] > 0
    db_bytes = db.stat().st_size  # the log was merged into it when the catalog closed
    report = cli_json(capsys, "catalog", "vacuum", "--db", db, "--format", "json")
    assert report["before"] >= db_bytes > report["after"] == db.stat().st_size
    assert report["garbage"] == 0  # the index run had collected it
    with Catalog(db, readonly=True) as catalog:
        assert catalog.db.execute("PRAGMA freelist_count").fetchone()[0] == 0
        assert len(search(catalog, ref, "x", n=1000)) == 40
        assert_same_results(ranked(catalog, ref), before)
    code, _, err = run(capsys, "catalog", "vacuum", "--db", db)
    assert code == 0 and "before" in err and "after" in err, err


def test_vacuum_is_refused_while_the_catalog_is_being_updated(capsys, tmp_path, halves, ref):
    db = index(tmp_path / "c.db", ref, halves[0])
    size = db.stat().st_size
    with Catalog(db) as holder, holder.updating():  # what an index run holds
        code, _, err = run(capsys, "catalog", "vacuum", "--db", db)
    assert code == 1
    assert err.count("\n") == 1 and "is updating catalog" in err, err
    assert db.stat().st_size == size


# ------------------------------------------------------------------ merge


def test_merge_gives_the_union_of_two_folders_and_again_adds_nothing(capsys, tmp_path, halves, ref):
    a, b = halves
    mine = index(tmp_path / "a.db", ref, a)
    theirs = index(tmp_path / "b.db", ref, b)
    both = index(tmp_path / "both.db", ref, a, b)
    first = cli_json(capsys, "catalog", "merge", theirs, "--db", mine, "--format", "json")
    n_b = len(list(b.iterdir()))
    assert first["files_added"] == n_b and first["embeddings_added"] == n_b
    assert first["files_replaced"] == first["files_kept"] == 0 and first["models_added"] == []
    model_id = ref.info.model_id
    with Catalog(mine, readonly=True) as merged, Catalog(both, readonly=True) as whole:
        assert sorted(merged.files_under([a, b])) == sorted(whole.files_under([a, b]))
        for path in whole.files_under([a, b]):
            want = whole.embedding_of(path, model_id)
            np.testing.assert_array_equal(merged.embedding_of(path, model_id), want)
        assert_same_results(ranked(merged, ref), ranked(whole, ref))
        generation = merged.generation
        assert check_catalog(merged).healthy
    again = cli_json(capsys, "catalog", "merge", theirs, "--db", mine, "--format", "json")
    assert again["files_added"] == again["files_replaced"] == again["embeddings_added"] == 0
    assert again["files_kept"] == n_b
    with Catalog(mine, readonly=True) as merged:
        assert merged.generation == generation  # nothing changed, no cache goes stale
    code, _, err = run(capsys, "catalog", "merge", theirs, "--db", mine)
    assert code == 0 and "0 files added" in err, err


def test_merge_of_overlapping_folders_is_one_index_run_over_both(capsys, tmp_path, halves, ref):
    """One catalog of a and b, another of b alone (the overlap): the merge holds what one
    run over a and b gives, each file once, and passes check."""
    a, b = halves
    mine = index(tmp_path / "ab.db", ref, a, b)
    theirs = index(tmp_path / "b.db", ref, b)
    both = index(tmp_path / "both.db", ref, a, b)
    report = cli_json(capsys, "catalog", "merge", theirs, "--db", mine, "--format", "json")
    assert report["files_added"] == report["embeddings_added"] == 0
    assert report["files_kept"] == len(list(b.iterdir()))
    theirs2 = index(tmp_path / "a-only.db", ref, a)
    index(theirs2, ref, b)  # the same folders, indexed in two runs
    report = cli_json(capsys, "catalog", "merge", theirs2, "--db", theirs, "--format", "json")
    assert report["files_added"] == len(list(a.iterdir()))
    model_id = ref.info.model_id
    for merged_db in (mine, theirs):
        with Catalog(merged_db, readonly=True) as merged, Catalog(both, readonly=True) as whole:
            assert sorted(merged.files_under([a, b])) == sorted(whole.files_under([a, b]))
            for path in whole.files_under([a, b]):
                want = whole.embedding_of(path, model_id)
                np.testing.assert_array_equal(merged.embedding_of(path, model_id), want)
            assert_same_results(ranked(merged, ref), ranked(whole, ref))
            assert check_catalog(merged).healthy


def test_merge_keeps_the_newer_record_of_a_path(tmp_path, photos, ref):
    folder = tmp_path / "lib"
    shutil.copytree(photos, folder)
    old = index(tmp_path / "old.db", ref, folder)
    shutil.copy2(old, tmp_path / "old-copy.db")
    photo = folder / "cat.jpg"
    photo.write_bytes((photos / "coffee.jpg").read_bytes() + b"\0")  # new content, later
    os.utime(photo, ns=(photo.stat().st_atime_ns, photo.stat().st_mtime_ns + 10**9))
    new = index(tmp_path / "new.db", ref, folder)
    model_id = ref.info.model_id
    with Catalog(old) as catalog:
        report = merge_catalogs(catalog, new)
        assert report.files_replaced == 1 and report.files_added == 0
        assert report.embeddings_added == 1
        with Catalog(new, readonly=True) as newer:
            want = newer.embedding_of(str(photo), model_id)
        np.testing.assert_array_equal(catalog.embedding_of(str(photo), model_id), want)
        assert check_catalog(catalog).orphans == {}  # the old content's vector is gone
    with Catalog(new) as catalog:  # the other way round, the newer record stays
        before = catalog.generation
        report = merge_catalogs(catalog, tmp_path / "old-copy.db")
        assert report.files_replaced == report.files_added == report.embeddings_added == 0
        assert report.files_kept == len(list(folder.iterdir()))
        assert catalog.generation == before


def test_merge_brings_a_new_model_with_its_dim(capsys, tmp_path, halves, ref):
    from cliplens.models.openclip import save_checkpoint

    other_dir = save_checkpoint(make_tiny_clip(seed=1), tmp_path / "m2", TINY_CFG, arch="t2")
    other = ModelRef(f"local:{other_dir}", device="cpu", precision="fp32")
    assert other.info.model_id != ref.info.model_id
    mine = index(tmp_path / "a.db", ref, halves[0])
    theirs = index(tmp_path / "b.db", other, halves[0])
    report = cli_json(capsys, "catalog", "merge", theirs, "--db", mine, "--format", "json")
    assert report["models_added"] == [other.info.model_id]
    assert report["files_kept"] == report["embeddings_added"] == len(list(halves[0].iterdir()))
    with Catalog(mine, readonly=True) as merged, Catalog(theirs, readonly=True) as source:
        assert {m.model_id: m.dim for m in merged.models()} == {
            ref.info.model_id: 32,
            other.info.model_id: 32,
        }
        assert_same_results(ranked(merged, other), ranked(source, other))


def test_merge_refuses_itself_another_schema_and_another_dim(capsys, tmp_path, halves, ref):
    mine = index(tmp_path / "a.db", ref, halves[0])
    theirs = index(tmp_path / "b.db", ref, halves[1])
    code, _, err = run(capsys, "catalog", "merge", mine, "--db", mine)
    assert code == 2 and "into itself" in err, err
    (tmp_path / "link.db").symlink_to(mine)
    code, _, err = run(capsys, "catalog", "merge", tmp_path / "link.db", "--db", mine)
    assert code == 2 and "into itself" in err, err

    newer = tmp_path / "newer.db"
    shutil.copy2(theirs, newer)
    with sqlite3.connect(newer) as con:
        con.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    with Catalog(mine, readonly=True) as catalog:
        generation = catalog.generation
    code, _, err = run(capsys, "catalog", "merge", newer, "--db", mine)
    assert code == 1 and err.count("\n") == 1, err
    assert f"schema {SCHEMA_VERSION + 1}" in err and f"schema {SCHEMA_VERSION})" in err, err

    wider = tmp_path / "wider.db"
    shutil.copy2(theirs, wider)
    with sqlite3.connect(wider) as con:
        con.execute("UPDATE models SET dim = 64")
    code, _, err = run(capsys, "catalog", "merge", wider, "--db", mine)
    assert code == 1 and "dim 64" in err and "32" in err, err
    with Catalog(mine, readonly=True) as catalog:
        assert catalog.generation == generation and len(catalog.files_under([halves[1]])) == 0


def test_a_merge_that_fails_midway_leaves_the_catalog_as_it_was(tmp_path, halves, ref, monkeypatch):
    mine = index(tmp_path / "a.db", ref, halves[0])
    theirs = index(tmp_path / "b.db", ref, halves[1])

    def fail(*args, **kwargs):
        raise OSError("killed")

    monkeypatch.setattr(Catalog, "put_embeddings", fail)  # after the files were written
    with Catalog(mine) as catalog:
        generation = catalog.generation
        with pytest.raises(OSError, match="killed"):
            merge_catalogs(catalog, theirs)
    monkeypatch.undo()
    with Catalog(mine, readonly=True) as catalog:
        assert catalog.generation == generation
        assert catalog.files_under([halves[1]]) == {}
        assert check_catalog(catalog).healthy


# ------------------------------------------------------------------ export


def test_export_then_build_index_searches_like_the_catalog(capsys, tmp_path, photos, ref):
    folder = tmp_path / "lib"
    shutil.copytree(photos, folder)
    (folder / "broken.jpg").write_bytes(b"not a jpeg")
    db = index(tmp_path / "c.db", ref, folder)
    out = tmp_path / "shards"
    n = len(list(photos.iterdir()))
    report = cli_json(
        capsys, "catalog", "export", out, "--db", db, "--shard-size", "3", "-f", "json"
    )
    assert report["rows"] == n and report["failures"] == 1 and report["shards"] == 3
    assert report["model_id"] == ref.info.model_id and report["not_embedded"] == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["model_id"] == ref.info.model_id and manifest["dim"] == 32
    assert manifest["files"] == n + 1 and sorted(manifest["shards"]) == [
        "part-00000",
        "part-00001",
        "part-00002",
    ]
    idx = tmp_path / "idx"
    args = ("--kind", "flat", "--queries", "3", "--format", "json")
    built = cli_json(capsys, "build-index", out, "--out", idx, *args)
    assert built["n"] == n
    with Catalog(db, readonly=True) as catalog:
        want = ranked(catalog, ref)
    assert_same_results(ranked(open_built_index(idx), ref), want)
    # the same layout `catalog import` reads: a second catalog from the shards
    code, _, err = run(capsys, "catalog", "import", out, "--db", tmp_path / "again.db")
    assert code == 0, err
    with Catalog(tmp_path / "again.db", readonly=True) as again:
        assert_same_results(ranked(again, ref), want)
        assert [p for p, _ in again.failures()] == [str(folder / "broken.jpg")]


def test_export_chooses_a_model_and_refuses_a_full_folder(capsys, tmp_path, halves, ref):
    from cliplens.models.openclip import save_checkpoint

    other_dir = save_checkpoint(make_tiny_clip(seed=2), tmp_path / "m2", TINY_CFG, arch="t3")
    name = f"local:{other_dir}"
    db = index(tmp_path / "c.db", ref, halves[0])
    index(db, ModelRef(name, device="cpu", precision="fp32"), halves[0])
    code, _, err = run(capsys, "catalog", "export", tmp_path / "out", "--db", db)
    assert code == 2 and err.count("\n") == 1 and "--model" in err, err
    assert ref.info.model_id in err and not (tmp_path / "out").exists()
    out = tmp_path / "out"
    report = cli_json(capsys, "catalog", "export", out, "--db", db, "-m", name, "-f", "json")
    assert report["model"] == name and report["rows"] == len(list(halves[0].iterdir()))
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["model"] == name
    args = ["catalog", "export", tmp_path / "out", "--db", db, "--model", ref.info.model_id]
    code, _, err = run(capsys, *args)
    assert code == 2 and "not empty" in err, err
    (tmp_path / "empty").mkdir()  # an empty folder is taken
    args[2] = tmp_path / "empty"
    assert cli_json(capsys, *args, "-f", "json")["model_id"] == ref.info.model_id
    assert (tmp_path / "empty" / "manifest.json").exists()


def test_a_failed_or_killed_export_leaves_no_folder_and_its_leftovers_go(
    capsys, tmp_path, halves, ref, monkeypatch
):
    from cliplens.distributed import export

    db = index(tmp_path / "c.db", ref, halves[0])
    out = tmp_path / "out"
    written = []

    def write_then_fail(folder, name, *args):
        if written:
            raise OSError("disk full")
        written.append(name)
        return real(folder, name, *args)

    real = export._write_shard
    monkeypatch.setattr(export, "_write_shard", write_then_fail)
    with Catalog(db, readonly=True) as catalog, pytest.raises(OSError, match="disk full"):
        export.export_shards(catalog, out, shard_size=2)
    assert written == ["part-00000"]  # a first shard was written before the failure
    assert not out.exists() and [p.name for p in tmp_path.iterdir() if "out" in p.name] == []
    monkeypatch.undo()

    # a real kill (SIGKILL) after the first shard: no OUT, so build-index refuses it
    script = (
        "import os, signal, sys\n"
        "from cliplens.catalog.db import Catalog\n"
        "from cliplens.distributed import export\n"
        "real = export._write_shard\n"
        "def kill_after_first(folder, name, *args):\n"
        "    if name != 'part-00000':\n"
        "        os.kill(os.getpid(), signal.SIGKILL)\n"
        "    return real(folder, name, *args)\n"
        "export._write_shard = kill_after_first\n"
        "export.export_shards(Catalog(sys.argv[1], readonly=True), sys.argv[2], shard_size=2)\n"
    )
    killed = subprocess.run([sys.executable, "-c", script, str(db), str(out)], timeout=120)
    assert killed.returncode == -signal.SIGKILL
    (leftover,) = [p for p in tmp_path.iterdir() if p.name.startswith(".out.export-")]
    assert [p.name for p in leftover.iterdir()] != [] and not out.exists()
    code, _, err = run(capsys, "build-index", out, "--out", tmp_path / "idx")
    assert code != 0 and "manifest.json" in err, err
    with Catalog(db, readonly=True) as catalog:  # the next export removes what it left
        report = export.export_shards(catalog, out)
    assert report.shards == 1 and (out / "manifest.json").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
