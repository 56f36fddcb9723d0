"""The catalog and incremental indexing, with a tiny random model."""

from __future__ import annotations

import shutil
import sqlite3

import numpy as np
import pytest
from PIL import Image

from cliplens.catalog.db import SCHEMA_VERSION, Catalog, CatalogError
from cliplens.catalog.update import update_catalog
from cliplens.catalog.vectors import load_vectors
from conftest import make_photos


def count(catalog, status="ok"):
    return catalog.db.execute("SELECT COUNT(*) FROM files WHERE status=?", (status,)).fetchone()[0]


def test_add_modify_rename_copy_delete_cycle(tmp_path, tiny):
    photos = make_photos(tmp_path / "p", 6)
    cat = Catalog(tmp_path / "c.db")
    s = update_catalog(cat, tiny, [tmp_path / "p"], batch_size=4, workers=0)
    assert (s.new, s.encoded, s.unchanged) == (6, 6, 0)
    gen = cat.generation
    # nothing changed: nothing opened, nothing written
    s = update_catalog(cat, tiny, [tmp_path / "p"], workers=0)
    assert (s.unchanged, s.new, s.encoded) == (6, 0, 0) and cat.generation == gen
    before = load_vectors(cat, tiny.info.model_id)
    # modify one, rename one, copy one, delete one
    Image.new("RGB", (64, 48), (255, 0, 0)).save(photos[0], quality=90)
    photos[1].rename(tmp_path / "p" / "renamed.jpg")
    shutil.copy(photos[2], tmp_path / "p" / "copy.jpg")
    photos[3].unlink()
    s = update_catalog(cat, tiny, [tmp_path / "p"], workers=0)
    assert (s.changed, s.moved, s.removed, s.unchanged, s.encoded) == (1, 2, 2, 3, 1)
    after = load_vectors(cat, tiny.info.model_id)
    assert len(before) == 6 and len(after) == 6  # 6 - 1 deleted - 1 renamed away + renamed + copy
    # the renamed file kept its embedding; the old path is gone
    paths = set(cat.paths(after.ids).values())
    assert str((tmp_path / "p" / "renamed.jpg").resolve()) in paths
    assert str(photos[1].resolve()) not in paths and str(photos[3].resolve()) not in paths
    # embeddings nothing refers to any more were collected (the old red-less photos[0], photos[3])
    n_emb = cat.db.execute("SELECT COUNT(*) FROM embeddings").fetchone()[0]
    assert n_emb == 5  # distinct contents: new photos[0], renamed, photos[2] (+copy), 4, 5
    assert cat.integrity_check() == "ok"


def test_unreadable_files_recorded_and_not_retried(tmp_path, tiny):
    make_photos(tmp_path / "p", 2)
    bad = tmp_path / "p" / "bad.jpg"
    bad.write_bytes(b"not a jpeg")
    cat = Catalog(tmp_path / "c.db")
    s = update_catalog(cat, tiny, [tmp_path / "p"], workers=0)
    assert s.failed == 1 and s.errors[0][0].endswith("bad.jpg")
    assert cat.failures()[0][0].endswith("bad.jpg")
    s = update_catalog(cat, tiny, [tmp_path / "p"], workers=0)
    assert (s.failed, s.failed_before) == (0, 1)
    Image.new("RGB", (30, 30)).save(bad, format="JPEG")  # fixed: changed, so retried
    s = update_catalog(cat, tiny, [tmp_path / "p"], workers=0)
    assert (s.changed, s.failed) == (1, 0) and cat.failures() == []


def test_worker_processes_give_the_same_embeddings(tmp_path, tiny):
    make_photos(tmp_path / "p", 9)
    a, b = Catalog(tmp_path / "a.db"), Catalog(tmp_path / "b.db")
    update_catalog(a, tiny, [tmp_path / "p"], workers=0, batch_size=4)
    update_catalog(b, tiny, [tmp_path / "p"], workers=2, batch_size=4)
    ia, ib = load_vectors(a, tiny.info.model_id), load_vectors(b, tiny.info.model_id)
    pa, pb = a.paths(ia.ids), b.paths(ib.ids)
    va = {pa[i]: v for i, v in zip(ia.ids, ia.matrix, strict=True)}
    vb = {pb[i]: v for i, v in zip(ib.ids, ib.matrix, strict=True)}
    assert va.keys() == vb.keys()
    for k in va:
        np.testing.assert_allclose(va[k], vb[k], atol=1e-3)
    # and they equal encode_images of the same files (float16 storage)
    direct = tiny.encode_images(sorted(va))
    np.testing.assert_allclose(np.stack([va[k] for k in sorted(va)]), direct, atol=2e-3)


def test_two_models_coexist(tmp_path, tiny, tiny_model_dir):
    from cliplens import load_model
    from cliplens.models.openclip import save_checkpoint
    from conftest import TINY_CFG, make_tiny_clip

    other = load_model(
        f"local:{save_checkpoint(make_tiny_clip(5), tmp_path / 'm2', TINY_CFG, arch='t2')}"
    )
    make_photos(tmp_path / "p", 3)
    cat = Catalog(tmp_path / "c.db")
    update_catalog(cat, tiny, [tmp_path / "p"], workers=0)
    s = update_catalog(cat, other, [tmp_path / "p"], workers=0)
    assert s.encoded == 3  # readable already, but not embedded by this model
    assert sorted(n for _, _, n in cat.models()) == [3, 3]


def test_newer_catalog_is_refused(tmp_path):
    path = tmp_path / "c.db"
    Catalog(path).close()
    con = sqlite3.connect(path)
    con.execute(f"PRAGMA user_version={SCHEMA_VERSION + 1}")
    con.close()
    with pytest.raises(CatalogError, match="newer cliplens"):
        Catalog(path)


def test_vector_cache_follows_generation(tmp_path, tiny):
    make_photos(tmp_path / "p", 3)
    cat = Catalog(tmp_path / "c.db")
    update_catalog(cat, tiny, [tmp_path / "p"], workers=0)
    first = load_vectors(cat, tiny.info.model_id)
    assert len(first) == 3
    files = list((tmp_path / "c.db.vectors").glob("*.npy"))
    assert len(files) == 3  # file ids, content keys, float16 matrix
    make_photos(tmp_path / "p2", 2, seed=3)
    update_catalog(cat, tiny, [tmp_path / "p2"], workers=0)
    assert len(load_vectors(cat, tiny.info.model_id)) == 5
    assert len(list((tmp_path / "c.db.vectors").glob("*.npy"))) == 3  # old generation removed


def test_search_many_equals_one_search_per_query():
    from cliplens.catalog.vectors import CatalogVectors

    rng = np.random.default_rng(0)
    matrix = rng.standard_normal((500, 16)).astype(np.float32)
    matrix /= np.linalg.norm(matrix, axis=1, keepdims=True)
    index = CatalogVectors(np.arange(100, 600, dtype=np.int64), matrix)
    queries = matrix[[3, 77, 410]] + 0.1 * rng.standard_normal((3, 16)).astype(np.float32)
    batched = index.search_many(queries, 7)
    for q, hits in zip(queries, batched, strict=True):
        single = index.search(q, 7)
        assert [i for i, _ in hits] == [i for i, _ in single]
        np.testing.assert_allclose([s for _, s in hits], [s for _, s in single], rtol=1e-5)
    assert [h[0][0] for h in batched] == [103, 177, 510]  # each finds its source row first
    assert index.search_many(queries, 0) == [[], [], []]
