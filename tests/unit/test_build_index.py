"""faiss indexes over embed-dataset shards: sizing, recall on clustered vectors, mmap load."""

from __future__ import annotations

import numpy as np
import pytest

from cliplens.errors import InvalidInputError
from cliplens.index.build import (
    VectorSource,
    build_faiss_index,
    build_index,
    exact_top_k,
    plan_index,
    shard_source,
)
from cliplens.index.built import IndexMeta, open_built_index
from tests_helpers import job_with as shared_job_with
from tests_helpers import write_synthetic_shards


def test_plan_sizes_to_the_data():
    p = plan_index(10_000_000, 512, "ivfpq")
    assert p.nlist == 8192 and p.pq_m == 64 and p.train_size == 40 * 8192
    small = plan_index(5_000, 64, "ivfpq")
    assert small.nlist <= 5_000 // 39 and 64 % small.pq_m == 0
    with pytest.raises(InvalidInputError, match="`kind`"):
        plan_index(10, 8, "lsh")
    with pytest.raises(InvalidInputError, match="`refine`"):
        plan_index(10, 8, "ivfpq", refine="pq4")


def test_ivfpq_recall_on_clustered_vectors(tmp_path):
    shards = tmp_path / "shards"
    shards.mkdir()
    data = write_synthetic_shards(shards, 12_000, 64)
    # the streaming exact search is the plain one
    q = data[:5]
    source, _ = shard_source(shards)
    assert source.n == 12_000 and source.dim == 64
    np.testing.assert_array_equal(exact_top_k(source, q, 10)[:, 0], np.arange(5))
    plain = build_index(shards, tmp_path / "pq", "ivfpq", refine="none", queries=100)
    refined = build_index(shards, tmp_path / "pq8", "ivfpq", refine="sq8", queries=100)
    assert refined.recall_at_10 >= 0.9 > plain.recall_at_10  # what the refine stage is for
    assert refined.n == 12_000 and refined.index_bytes > plain.index_bytes
    flat = build_index(shards, tmp_path / "flat", "flat", queries=50)
    assert flat.recall_at_10 == 1.0
    index = open_built_index(tmp_path / "pq").index  # memory-mapped
    _, ids = index.search(data[:1], 3)
    assert ids.shape == (1, 3) and ids[0, 0] >= 0
    with pytest.raises(InvalidInputError, match=r"no index\.faiss"):
        open_built_index(tmp_path)
    (tmp_path / "index.faiss").write_bytes(b"not an index")
    with pytest.raises(InvalidInputError, match="not a faiss index"):
        open_built_index(tmp_path)
    _check_stored_vectors(tmp_path, data)


def _cos(a, b) -> float:
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


def _check_stored_vectors(tmp_path, data):
    """What the server's similar-photo lookups read back: exact from flat, within SQ8
    error from the refine stage, the PQ approximation (through a direct map) without it."""
    from cliplens.index.build import write_index_folder

    rows = [0, 4321, 11_999]
    flat, pq8, plain = (open_built_index(tmp_path / k) for k in ("flat", "pq8", "pq"))
    for r in rows:
        np.testing.assert_allclose(flat.vector(r, "synthetic"), data[r], atol=1e-6)
        assert _cos(pq8.vector(r, "synthetic"), data[r]) > 0.99
        assert 0.5 < _cos(plain.vector(r, "synthetic"), data[r]) < 0.99
    ends = (0, 1999, 2000, 4321, 11_999)  # paths come in shard-sized chunks of 2000
    assert [flat.path_of(r) for r in ends] == [f"/photos/{r:07d}.jpg" for r in ends]
    assert flat.path_of(12_000) is None and flat.path_of(-1) is None and len(flat) == 12_000
    # a batch of queries answers as the queries one at a time
    batch = pq8.search_rows(data[rows], 5)
    assert batch == [pq8.search_rows(data[r], 5)[0] for r in rows]
    assert [b[0][0] for b in batch] == rows
    assert pq8.search(data[0], 1, "synthetic")[0].path == "/photos/0000000.jpg"
    # a path table that does not match the index is refused
    report = build_index(tmp_path / "shards", tmp_path / "flat", "flat", queries=5)
    write_index_folder(tmp_path / "flat", [["/photos/x.jpg"]], IndexMeta("synthetic", report))
    with pytest.raises(InvalidInputError, match="1 paths for 12000 vectors"):
        open_built_index(tmp_path / "flat")
    (tmp_path / "flat" / "index.json").unlink()  # what a build killed before its end leaves
    with pytest.raises(InvalidInputError, match="not a complete build-index folder"):
        open_built_index(tmp_path / "flat")


class KilledError(Exception):
    pass


def test_an_interrupted_build_resumes(tmp_path):
    """KilledError while adding, a build goes on from its last checkpoint: no training and no
    re-adding; another plan over the same folder starts afresh."""
    import json

    shards = tmp_path / "shards"
    shards.mkdir()
    write_synthetic_shards(shards, 12_000, 64)  # 6 chunks of 2000
    source, _ = shard_source(shards)
    out = tmp_path / "index"

    def source_killed_at(pass_no: int, chunk: int) -> tuple[VectorSource, list]:
        passes: list[int] = []

        def chunks():
            passes.append(1)
            for i, v in enumerate(source.chunks()):
                if len(passes) == pass_no and i == chunk:
                    raise KilledError
                yield v

        return VectorSource(source.n, source.dim, chunks, source.fingerprint), passes

    dying, _ = source_killed_at(2, 4)  # pass 1 samples for training, pass 2 adds
    with pytest.raises(KilledError):
        build_faiss_index(dying, out, "ivfpq", checkpoint_s=1e-9)  # a checkpoint after each chunk
    assert not (out / "index.faiss").exists()
    trained_in = json.loads((out / ".build-state.json").read_text())["train_s"]

    counted, passes = source_killed_at(0, 0)  # never killed; counts its passes
    report, index, _ = build_faiss_index(counted, out, "ivfpq", checkpoint_s=1e-9)
    assert report.resumed_rows == 8000 and index.ntotal == 12_000
    assert len(passes) == 3  # adding, held-out queries, exact search: no training sample
    assert report.train_s == trained_in and report.recall_at_10 >= 0.9
    assert (out / "index.faiss").is_file() and not (out / ".build-partial.faiss").exists()
    # kept, marked complete, until write_index_folder makes the folder whole
    assert json.loads((out / ".build-state.json").read_text())["complete"] is True

    dying, _ = source_killed_at(2, 3)
    with pytest.raises(KilledError):
        build_faiss_index(dying, out, "ivfpq", checkpoint_s=1e-9)
    other = build_faiss_index(source, out, "ivfpq", refine="none")[0]
    assert other.resumed_rows == 0 and other.params["refine"] == "none"


def test_update_adds_new_shards_without_training(tmp_path):
    """After embed-dataset --add-new: the new shards' vectors and paths are appended to the
    built index; the quantiser is not trained again."""
    import json

    import faiss

    from cliplens.index.build import update_index

    whole = tmp_path / "whole"
    whole.mkdir()
    data = write_synthetic_shards(whole, 16_000, 64)  # 8 shards of 2000
    manifest = json.loads((whole / "manifest.json").read_text())
    names = sorted(manifest["shards"])
    shards, out = tmp_path / "shards", tmp_path / "index"
    shards.mkdir()

    def job_with(first: list[str]) -> None:  # the job folder as it stood with these shards
        shared_job_with(whole, shards, first)

    def centroids():
        index = open_built_index(out, mmap=False).index  # held: the parts below point into it
        ivf = faiss.extract_index_ivf(index)
        return faiss.downcast_index(ivf.quantizer).reconstruct_n(0, ivf.nlist).copy()

    job_with(names[:6])
    build_index(shards, out, "ivfpq", queries=50)
    trained = centroids()
    report, added, _ = update_index(shards, out, queries=50)
    assert added == 0 and report.n == 12_000  # nothing new yet
    job_with(names)
    report, added, before = update_index(shards, out, queries=50)
    assert added == 4000 and before.report.n == 12_000 and report.n == 16_000
    assert report.recall_at_10 >= 0.9
    built = open_built_index(out)
    assert len(built) == 16_000 and built.index.ntotal == 16_000
    assert [built.path_of(r) for r in (0, 11_999, 12_000, 15_999)] == [
        f"/photos/{r:07d}.jpg" for r in (0, 11_999, 12_000, 15_999)
    ]
    assert built.search_rows(data[14_321], 1)[0][0][0] == 14_321
    np.testing.assert_array_equal(centroids(), trained)
    # an index built from other shards than this job's first ones is refused
    (shards / "part-00000.parquet").unlink()
    job_with(names[1:])
    with pytest.raises(InvalidInputError, match="without `update`"):
        update_index(shards, out)


def test_needs_rebuild_once_an_ivfpq_index_outgrows_its_training():
    """Over 4x the vectors it was trained on, an ivfpq index should be built again; flat
    and HNSW indexes train nothing."""
    from dataclasses import replace

    from cliplens.index.built import IndexReport

    report = IndexReport("ivfpq", 1000, 8, {}, 0.0, 0.0, 1, 1.0, 0.1, 10)
    meta = IndexMeta("m", report)
    assert not meta.needs_rebuild()
    assert not meta.needs_rebuild(replace(report, n=4000))
    assert meta.needs_rebuild(replace(report, n=4001))
    assert not meta.needs_rebuild(replace(report, kind="flat", n=10_000))
    grown = replace(meta, report=replace(report, n=5000), trained_n=1000)
    assert grown.needs_rebuild()


def test_an_update_recorded_but_not_renamed_is_finished_by_the_first_open(tmp_path, monkeypatch):
    """After the commit record, an open renames the update's files into place (index.json
    last); where it may not rename them, it says so in one line and keeps the folder."""
    import json
    from pathlib import Path

    from cliplens.index.built import NEXT, UPDATE_FILE, commit_update, finish_update

    (tmp_path / "shards").mkdir()
    write_synthetic_shards(tmp_path / "shards", 400, 8, shard=200)
    out = tmp_path / "index"
    assert build_index(tmp_path / "shards", out, "flat", queries=5).n == 400
    for name in ("index.faiss", "paths.arrow"):  # an update's files, as it writes them
        (out / (NEXT + name)).write_bytes((out / name).read_bytes())
    meta = json.loads((out / "index.json").read_text())
    meta["queries"] = 4  # tells the new index.json from the old
    (out / (NEXT + "index.json")).write_text(json.dumps(meta))
    real = Path.replace

    def refused(self, target):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(Path, "replace", refused)
    (out / UPDATE_FILE).write_text("{}")  # the commit record
    with pytest.raises(InvalidInputError, match="cut off after it was complete") as e:
        open_built_index(out)
    assert "\n" not in str(e.value) and (out / UPDATE_FILE).exists()
    monkeypatch.setattr(Path, "replace", real)
    assert open_built_index(out).meta.report.queries == 4  # finished: the new index.json
    assert not (out / UPDATE_FILE).exists() and not list(out.glob(f"{NEXT}*"))
    assert finish_update(out) is False  # nothing left to finish
    commit_update(out)  # a record whose files another process renamed already
    assert open_built_index(out).meta.report.queries == 4 and not (out / UPDATE_FILE).exists()
