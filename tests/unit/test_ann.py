"""The faiss IVF index: agreement with exact search, in-place updates, files on disk."""

from __future__ import annotations

import numpy as np
import pytest

from cliplens.catalog import ivf as ann
from cliplens.catalog.db import Catalog
from cliplens.catalog.update import update_catalog
from cliplens.catalog.vectors import CatalogVectors, cache_dir, load_vectors
from conftest import make_photos


def clustered(n: int, dim: int = 64, clusters: int = 40, seed: int = 0) -> np.ndarray:
    """Unit vectors around random centres, as image embeddings cluster by subject."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, dim)).astype(np.float32)
    x = centres[rng.integers(0, clusters, n)] + 0.35 * rng.standard_normal((n, dim))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def recall_at_10(index: CatalogVectors, queries: np.ndarray) -> float:
    found = 0
    for q in queries:
        truth = {i for i, _ in index.search(q, 10, exact=True)}
        found += len(truth & {i for i, _ in index.search(q, 10)})
    return found / (10 * len(queries))


def test_ann_agrees_with_exact_search():
    m = clustered(20_000)
    ids = np.arange(10, 20_010, dtype=np.int64)
    index = CatalogVectors(ids, m, ann=ann.build(ids, ids * 7, m))
    assert index.ann.index.nlist == ann.nlist_for(20_000) > 1
    queries = clustered(50, seed=1)
    assert recall_at_10(index, queries) >= 0.95
    # and it is the IVF index that answers, not exact search: probing one list misses some
    probes = index.ann.nprobe
    index.ann.nprobe = 1
    assert recall_at_10(index, queries) < 0.9
    index.ann.nprobe = probes
    # the scores it reports are the true cosines of the rows it returns
    for i, score in index.search(queries[0], 5):
        assert score == pytest.approx(float(m[i - 10] @ queries[0]), abs=1e-5)


def test_update_removes_replaces_and_adds_rows():
    m = clustered(4000)
    ids, keys = np.arange(4000, dtype=np.int64), np.arange(4000, dtype=np.int64)
    index = ann.build(ids, keys, m)
    # 100 files gone, 50 changed (same id, new content), 200 new
    keep = np.ones(4000, bool)
    keep[:100] = False
    new_ids = np.concatenate([ids[keep], np.arange(5000, 5200)])
    new_keys = np.concatenate([keys[keep], np.arange(5000, 5200)])
    new_m = np.concatenate([m[keep], clustered(200, seed=5)])
    changed = slice(0, 50)  # positions of ids 100..149 in the new arrays
    new_keys[changed] += 10**6
    new_m[changed] = clustered(50, seed=6)
    assert ann.update(index, new_ids, new_keys, new_m) == 100 + 50 + 50 + 200
    assert index.index.ntotal == len(new_ids)
    index.nprobe = index.index.nlist  # probe every list: results must equal exact search
    for row in (0, 10, 3950, len(new_ids) - 1):  # changed, changed, kept, added
        assert index.search(new_m[row], 1)[0][0] == new_ids[row]
    gone = {i for q in m[:100] for i, _ in index.search(q, 5)}
    assert gone.isdisjoint(range(100))
    assert ann.update(index, new_ids, new_keys, new_m) == 0  # nothing changed: no work


def test_saved_index_reloads_and_a_torn_pair_is_refused(tmp_path):
    m = clustered(2000)
    ids = np.arange(2000, dtype=np.int64)
    index = ann.build(ids, ids, m)
    ann.save(index, tmp_path, "k")
    again = ann.load(tmp_path, "k")
    assert again is not None and again.n_trained == 2000
    assert again.search(m[7], 3) == index.search(m[7], 3)
    # a crash between the two renames: the index holds other rows than its meta says
    smaller = ann.build(ids[:1000], ids[:1000], m[:1000])
    import faiss

    faiss.write_index(smaller.index, str(tmp_path / "k.ivf"))
    assert ann.load(tmp_path, "k") is None


def test_small_catalogs_stay_exact(tmp_path, tiny):
    make_photos(tmp_path / "p", 6)
    cat = Catalog(tmp_path / "c.db")
    update_catalog(cat, tiny, [tmp_path / "p"], workers=0)
    assert load_vectors(cat, tiny.info.model_id).ann is None
    assert not list(cache_dir(cat).glob("*.ivf"))


def test_indexing_keeps_the_ann_index_current(tmp_path, tiny, monkeypatch):
    monkeypatch.setenv("CLIPLENS_ANN_MIN", "40")
    monkeypatch.setenv("CLIPLENS_ANN_NPROBE", "1000")  # every list: comparable to exact
    folder = tmp_path / "p"
    paths = make_photos(folder, 90)
    cat = Catalog(tmp_path / "c.db")
    update_catalog(cat, tiny, [folder], workers=0)
    assert list(cache_dir(cat).glob("*.ivf"))
    index = load_vectors(cat, tiny.info.model_id)
    assert index.ann is not None and len(index.ann) == 90
    for p in paths[:30]:
        p.unlink()
    make_photos(folder / "more", 5, seed=4)
    update_catalog(cat, tiny, [folder], workers=0)
    index = load_vectors(cat, tiny.info.model_id)
    assert index.ann is not None
    np.testing.assert_array_equal(index.ann.ids, index.ids)
    q = index.matrix[3]
    got, want = index.search(q, 10), index.search(q, 10, exact=True)
    assert [i for i, _ in got] == [i for i, _ in want]
    np.testing.assert_allclose([s for _, s in got], [s for _, s in want], atol=1e-5)
