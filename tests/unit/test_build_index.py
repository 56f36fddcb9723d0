"""faiss indexes over embed-dataset shards: sizing, recall on clustered vectors, mmap load."""

from __future__ import annotations

import numpy as np
import pytest

from cliplens.distributed.embed import _save_manifest, _write_shard, shard_name
from cliplens.distributed.index import (
    build_index,
    exact_top_k,
    load_built_index,
    plan_index,
    shard_source,
)
from cliplens.errors import InvalidInputError


def write_synthetic_shards(folder, n, dim, clusters=50, shard=2000, seed=0):
    """Clustered unit vectors in the embed-dataset layout."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, dim)).astype(np.float32)
    manifest = {"version": 1, "model_id": "synthetic", "dim": dim, "shards": {}}
    all_v = []
    for i, start in enumerate(range(0, n, shard)):
        m = min(shard, n - start)
        v = centres[rng.integers(0, clusters, m)] + 0.5 * rng.standard_normal((m, dim))
        v = (v / np.linalg.norm(v, axis=1, keepdims=True)).astype(np.float32)
        rows = [{"path": f"/photos/{start + j:07d}.jpg", "size": 1, "sha256": "x", "error": "",
                 "embedding": v[j]} for j in range(m)]  # fmt: skip
        ok, bad = _write_shard(folder, shard_name(i), rows, "synthetic", "float32")
        manifest["shards"][shard_name(i)] = {"rows": ok, "failures": bad}
        all_v.append(v)
    _save_manifest(folder, manifest)
    return np.concatenate(all_v)


def test_plan_sizes_to_the_data():
    p = plan_index(10_000_000, 512, "ivfpq")
    assert p.nlist == 8192 and p.pq_m == 64 and p.train_size == 40 * 8192
    small = plan_index(5_000, 64, "ivfpq")
    assert small.nlist <= 5_000 // 39 and 64 % small.pq_m == 0
    with pytest.raises(InvalidInputError, match="--kind"):
        plan_index(10, 8, "lsh")
    with pytest.raises(InvalidInputError, match="--refine"):
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
    index = load_built_index(tmp_path / "pq")  # memory-mapped
    _, ids = index.search(data[:1], 3)
    assert ids.shape == (1, 3) and ids[0, 0] >= 0
    with pytest.raises(InvalidInputError, match=r"no index\.faiss"):
        load_built_index(tmp_path)
