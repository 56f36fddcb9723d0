"""`cliplens embed-dataset` on a local Ray instance (2 CPUs, started by the test): the same
embeddings as `cliplens index`, failures in their table, resume without redoing shards."""

from __future__ import annotations

import shutil
from dataclasses import replace

import numpy as np
import pytest

from cliplens.distributed.embed import (
    EmbedJob,
    embed_dataset,
    list_images,
    read_manifest,
    shard_vectors,
)
from cliplens.errors import InvalidInputError

ray = pytest.importorskip("ray", reason="Ray is in the dev extra")


@pytest.fixture(scope="module", autouse=True)
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def folder(tmp_path_factory, photos):
    """The real photos plus a text file named like a JPEG and an empty PNG."""
    f = tmp_path_factory.mktemp("collection")
    for p in photos.iterdir():
        shutil.copy(p, f / p.name)
    (f / "notes.jpg").write_text("not an image")
    (f / "empty.png").write_bytes(b"")
    return f


def _job(tmp_path, folder, tiny_model_dir, **kw) -> EmbedJob:
    return EmbedJob(
        sources=(str(folder),),
        out=tmp_path / "out",
        model=f"local:{tiny_model_dir}",
        shard_size=3,
        batch_size=4,
        precision="fp32",
        **kw,
    )


def test_ray_job_matches_the_single_process_index(tmp_path, folder, tiny_model_dir):
    import pyarrow.parquet as pq

    from cliplens.catalog.db import Catalog
    from cliplens.catalog.update import update_catalog
    from cliplens.models.ref import ModelRef

    report = embed_dataset(_job(tmp_path, folder, tiny_model_dir))
    assert report.files == 9 and report.shards == 3
    assert report.written == ["part-00000", "part-00001", "part-00002"]
    assert report.rows == 7 and report.failures == 2
    out = tmp_path / "out"
    tables = [pq.read_table(out / f"{n}.parquet") for n in report.written]
    paths = [p for t in tables for p in t.column("path").to_pylist()]
    vectors = np.concatenate([shard_vectors(t) for t in tables])
    assert tables[0].schema.field("embedding").type.value_type == "halffloat"
    # the single-process pipeline on the same files, same model and precision
    with Catalog(tmp_path / "c.db") as cat:
        update_catalog(
            cat, ModelRef(f"local:{tiny_model_dir}", precision="fp32"), [folder], workers=0
        )
        ids, _, matrix = cat.vectors(ModelRef(f"local:{tiny_model_dir}").info.model_id)
        by_path = dict(zip(cat.paths(ids.tolist()).values(), matrix, strict=True))
        hashes = {p: r.hash for p, r in cat.files_under([str(folder)]).items()}
    assert sorted(paths) == sorted(by_path)
    for path, v in zip(paths, vectors, strict=True):
        np.testing.assert_allclose(v, by_path[path].astype(np.float32), atol=2e-3)
    shas = [h for t in tables for h in t.column("sha256").to_pylist()]
    assert shas == [hashes[p] for p in paths]  # the catalog's content hashes
    # the unreadable files are listed with their reasons, not embedded
    failures = {
        r["path"].rsplit("/", 1)[1]: r["error"]
        for n in report.written
        for r in pq.read_table(out / f"{n}.failures.parquet").to_pylist()
    }
    assert set(failures) == {"notes.jpg", "empty.png"}
    assert "text file" in failures["notes.jpg"] and "empty" in failures["empty.png"]
    manifest = read_manifest(out)
    assert manifest.files == 9 and manifest.dim == vectors.shape[1]


def test_resume_skips_finished_shards(tmp_path, folder, tiny_model_dir):
    out = tmp_path / "out"
    first = embed_dataset(_job(tmp_path, folder, tiny_model_dir, max_shards=1))
    assert first.written == ["part-00000"]
    stamp = (out / "part-00000.parquet").stat().st_mtime_ns
    # what a killed job leaves behind: a half-written temporary file of the next shard
    (out / ".part-00001.parquet.abc.tmp").write_bytes(b"partial")
    second = embed_dataset(_job(tmp_path, folder, tiny_model_dir))
    assert second.skipped == ["part-00000"]
    assert second.written == ["part-00001", "part-00002"]
    assert (out / "part-00000.parquet").stat().st_mtime_ns == stamp  # not redone
    assert embed_dataset(_job(tmp_path, folder, tiny_model_dir)).written == []
    assert sorted(read_manifest(out).shards) == ["part-00000", "part-00001", "part-00002"]
    with pytest.raises(InvalidInputError, match="shard_size"):
        embed_dataset(
            EmbedJob(sources=(str(folder),), out=out, model=f"local:{tiny_model_dir}", shard_size=4)
        )


def test_add_new_files_into_new_shards(tmp_path, folder, tiny_model_dir):
    """A grown collection: new files go into new shards, finished shards stay as they are,
    and a removed file is counted, not dropped."""
    import pyarrow.parquet as pq

    grown = tmp_path / "grown"
    shutil.copytree(folder, grown)
    out = tmp_path / "out"
    job = EmbedJob(
        sources=(str(grown),),
        out=out,
        model=f"local:{tiny_model_dir}",
        shard_size=4,
        batch_size=4,
        precision="fp32",
    )
    first = embed_dataset(job)
    assert first.written == ["part-00000", "part-00001", "part-00002"]  # 9 files
    stamps = {n: (out / f"{n}.parquet").stat().st_mtime_ns for n in first.written}
    for name in ("zz-new-cat.jpg", "aa-new-coffee.jpg"):
        shutil.copy(folder / name.split("-new-")[1], grown / name)
    (grown / "rocket.jpg").unlink()
    with pytest.raises(InvalidInputError, match="`add_new`"):
        embed_dataset(job)
    from dataclasses import replace

    added = embed_dataset(replace(job, add_new=True))
    assert added.written == ["part-00003"] and added.rows == 2 and added.gone == 1
    assert added.skipped == first.written and added.files == 10
    assert sorted(pq.read_table(out / "part-00003.parquet")["path"].to_pylist()) == [
        str(grown / "aa-new-coffee.jpg"),
        str(grown / "zz-new-cat.jpg"),
    ]
    assert {n: (out / f"{n}.parquet").stat().st_mtime_ns for n in first.written} == stamps
    # the manifest follows the new listing: a plain rerun has nothing to do
    again = embed_dataset(job)
    assert again.written == [] and len(again.skipped) == 4
    # a deleted shard file: its files are embedded again, into a new shard
    lost = set(pq.read_table(out / "part-00001.parquet")["path"].to_pylist())
    (out / "part-00001.parquet").unlink()
    redone = embed_dataset(job)
    assert redone.written == ["part-00004"]
    still_there = lost & set(list_images([str(grown)]))  # rocket.jpg is gone for good
    assert set(pq.read_table(out / "part-00004.parquet")["path"].to_pylist()) == still_there
    assert "part-00001" not in read_manifest(out).shards


def test_listing_local_and_uri_sources(folder, tmp_path):
    local = list_images([str(folder)])
    assert len(local) == 9 and local == sorted(local)
    assert list_images([f"file://{folder}"]) == local
    with pytest.raises(InvalidInputError, match="no such file"):
        list_images([str(tmp_path / "missing")])


def test_cli_embed_dataset_and_catalog_import(tmp_path, folder, tiny_model_dir, capsys):
    """The commands end to end; imported embeddings make `cliplens index` a no-op."""
    import json

    from cliplens.catalog.db import Catalog
    from cliplens.catalog.update import update_catalog
    from cliplens.cli.main import main
    from cliplens.models.ref import ModelRef
    from cliplens.tasks.search import search
    from tests_helpers import run_json

    out, db = tmp_path / "shards", tmp_path / "catalog.db"
    model = f"local:{tiny_model_dir}"
    args = [
        "embed-dataset",
        str(folder),
        "--out",
        str(out),
        "--model",
        model,
        "--shard-size",
        "4",
        "--precision",
        "fp32",
    ]
    report = run_json(capsys, [*args, "--format", "json"])
    assert report["rows"] == 7 and report["failures"] == 2
    assert main(["catalog", "import", str(out), "--db", str(db)]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert sorted(manifest["shards"]) == ["part-00000", "part-00001", "part-00002"]
    with Catalog(db) as cat:
        assert cat.count_embedded(ModelRef(model).info.model_id) == 7
        assert len(cat.failures()) == 2
        stats = update_catalog(cat, ModelRef(model, precision="fp32"), [folder], workers=0)
        assert stats.encoded == 0 and stats.unchanged == 7  # nothing to redo
        hits = search(cat, ModelRef(model), "a cat", 3)
        assert len(hits) == 3
    assert main(["catalog", "import", str(tmp_path), "--db", str(db)]) == 2  # not a job folder
    idx = str(tmp_path / "idx")
    built = run_json(
        capsys,
        [
            "build-index",
            str(out),
            "--kind",
            "flat",
            "--out",
            idx,
            "--queries",
            "5",
            "--format",
            "json",
        ],
    )
    assert built["n"] == 7 and built["recall_at_10"] == 1.0 and built["resumed_rows"] == 0
    assert main(["build-index", str(out), "--out", idx, "--checkpoint-minutes", "-1"]) == 2
    update = ["build-index", str(out), "--out", idx, "--update", "--queries", "5"]
    assert run_json(capsys, [*update, "--format", "json"])["n"] == 7  # nothing new to add
    # the index answers queries like the catalog does
    top3 = ["-n", "3", "--format", "json"]
    via_index = run_json(capsys, ["search", "a cat", "--index", idx, *top3])
    via_catalog = run_json(
        capsys,
        [
            "search",
            "a cat",
            "--db",
            str(db),
            "--in",
            str(folder),
            "--no-index",
            "--model",
            model,
            *top3,
        ],
    )
    assert [h["path"] for h in via_index] == [h["path"] for h in via_catalog]
    np.testing.assert_allclose(
        [h["score"] for h in via_index], [h["score"] for h in via_catalog], atol=1e-3
    )
    assert main(["search", "a cat", "--index", idx, "--model", "offline"]) == 2  # other model


def test_a_killed_job_resumes_with_the_same_shards_and_rows(tmp_path, tiny_model_dir):
    """`cliplens embed-dataset` as a subprocess on this Ray instance, killed with SIGKILL
    once three shards are written, then run again: the same shards holding the same rows
    as a job never killed, no path twice and none missing."""
    import os
    import signal
    import subprocess
    import sys
    import time

    import pyarrow.parquet as pq

    from conftest import make_photos

    src = tmp_path / "src"
    make_photos(src, 24, size=(320, 240))
    model = f"local:{tiny_model_dir}"
    job = EmbedJob(sources=(str(src),), out=tmp_path / "ref", model=model, shard_size=2)
    reference = embed_dataset(replace(job, batch_size=2, precision="fp32"))
    out = tmp_path / "out"
    address = ray.get_runtime_context().gcs_address
    cmd = [sys.executable, "-m", "cliplens.cli.main", "embed-dataset", str(src), "--out", str(out)]
    cmd += ["--model", model, "--shard-size", "2", "-b", "2", "--precision", "fp32"]
    cmd += ["--address", address]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def finished_shards():  # a shard's data file is written after its failures file
        return [p for p in out.glob("part-*.parquet") if not p.name.endswith(".failures.parquet")]

    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:
        if len(finished_shards()) >= 3:
            break
        time.sleep(0.01)
    assert proc.poll() is None, "the job ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)
    proc.stderr.close()
    assert 3 <= len(finished_shards()) < 12, "killed between shards 3 and 12"
    resumed = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]

    def shards(folder):
        names = sorted(read_manifest(folder).shards)
        tables = {n: pq.read_table(folder / f"{n}.parquet") for n in names}
        return {n: (t.column("path").to_pylist(), shard_vectors(t)) for n, t in tables.items()}

    got, want = shards(out), shards(tmp_path / "ref")
    assert sorted(got) == sorted(want) == reference.written
    for name, (paths, vectors) in want.items():
        assert got[name][0] == paths, name
        np.testing.assert_allclose(got[name][1], vectors, atol=2e-3, err_msg=name)
    every = [p for paths, _ in got.values() for p in paths]
    assert len(every) == len(set(every)) == 24
