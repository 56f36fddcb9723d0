"""Approximate nearest neighbours for large catalogs: a faiss IVF index kept up to date.

Exact search is one matrix product and stays the default below CLIPLENS_ANN_MIN
vectors (200,000: 100k vectors take about 13 ms exact here). Above it, `cliplens index`
trains an inverted-file index (faiss IndexIVFFlat, inner product) beside the catalog
and later runs update it in place: rows whose file id and content are unchanged stay,
the rest are removed or added, so a re-index costs only what changed. The index is
retrained when the catalog has grown 4x past what it was trained on. Queries never
train: a catalog without a current ANN index is searched exactly.

Files: <catalog>.vectors/<model>.ivf (faiss) and <model>.ivf.npz (ids, content keys,
training size), written to temporary names and renamed, so a crash leaves the old pair.
"""

from __future__ import annotations

import contextlib
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cliplens.store.files import write_atomic, write_atomic_binary

DEFAULT_MIN = 200_000
DEFAULT_NPROBE = 64
RETRAIN_GROWTH = 4
TRAIN_PER_LIST = 64  # training sample: this many vectors per inverted list


def ann_min() -> int:
    return int(os.environ.get("CLIPLENS_ANN_MIN", DEFAULT_MIN))


def default_nprobe() -> int:
    return int(os.environ.get("CLIPLENS_ANN_NPROBE", DEFAULT_NPROBE))


def nlist_for(n: int) -> int:
    """Inverted lists for n vectors: about 2 sqrt(n) as a power of two (1M -> 2048), with
    at least 39 training points per list (faiss' minimum for a stable k-means)."""
    return max(1, min(2 ** round(math.log2(2 * math.sqrt(max(n, 1)))), n // 39))


@dataclass
class IvfVectors:
    index: object  # faiss.IndexIVFFlat
    ids: np.ndarray  # (N,) int64 file ids, sorted
    keys: np.ndarray  # (N,) int64 content keys (hash prefixes) of those rows
    n_trained: int
    nprobe: int = DEFAULT_NPROBE

    def __len__(self) -> int:
        return len(self.ids)

    def search(self, query: np.ndarray, k: int) -> list[tuple[int, float]]:
        import faiss  # heavy: loaded only where an IVF index is used

        k = min(k, len(self.ids))
        if k <= 0:
            return []
        params = faiss.SearchParametersIVF(nprobe=self.nprobe)
        scores, ids = self.index.search(
            np.ascontiguousarray(query, np.float32).reshape(1, -1), k, params=params
        )
        return [(int(i), float(s)) for i, s in zip(ids[0], scores[0], strict=True) if i >= 0]


def build(ids: np.ndarray, keys: np.ndarray, matrix: np.ndarray, seed: int = 0) -> IvfVectors:
    """Train an IVF index on a sample of `matrix` and add every row."""
    import faiss  # heavy: loaded only where an IVF index is used

    n, dim = matrix.shape
    nlist = nlist_for(n)
    quantizer = faiss.IndexFlatIP(dim)
    index = faiss.IndexIVFFlat(quantizer, dim, nlist, faiss.METRIC_INNER_PRODUCT)
    rng = np.random.default_rng(seed)
    sample = rng.choice(n, size=min(n, TRAIN_PER_LIST * nlist), replace=False)
    index.train(np.ascontiguousarray(matrix[np.sort(sample)], np.float32))
    _add(index, ids, matrix)
    return IvfVectors(index, ids.copy(), keys.copy(), n_trained=n, nprobe=default_nprobe())


def _add(index: object, ids: np.ndarray, matrix: np.ndarray, block: int = 65536) -> None:
    for start in range(0, len(ids), block):
        rows = np.ascontiguousarray(matrix[start : start + block], np.float32)
        index.add_with_ids(rows, np.ascontiguousarray(ids[start : start + block], np.int64))


def update(ann: IvfVectors, ids: np.ndarray, keys: np.ndarray, matrix: np.ndarray) -> int:
    """Bring `ann` to exactly (ids, keys, matrix); returns how many rows changed."""
    import faiss  # heavy: loaded only where an IVF index is used

    old_ids, old_keys = ann.ids, ann.keys
    if len(old_ids):
        pos = np.minimum(np.searchsorted(old_ids, ids), len(old_ids) - 1)
        same = (old_ids[pos] == ids) & (old_keys[pos] == keys)
        keep = np.zeros(len(old_ids), bool)
        keep[pos[same]] = True
    else:
        same = np.zeros(len(ids), bool)
        keep = np.zeros(0, bool)
    gone = old_ids[~keep]
    if len(gone):
        ann.index.remove_ids(faiss.IDSelectorBatch(np.ascontiguousarray(gone, np.int64)))
    _add(ann.index, ids[~same], matrix[~same])
    ann.ids, ann.keys = ids.copy(), keys.copy()
    return int(len(gone) + (~same).sum())


def paths(folder: Path, key: str) -> tuple[Path, Path]:
    return folder / f"{key}.ivf", folder / f"{key}.ivf.npz"


def save(ann: IvfVectors, folder: Path, key: str) -> None:
    import faiss  # heavy: loaded only where an IVF index is used

    index_path, meta_path = paths(folder, key)
    folder.mkdir(parents=True, exist_ok=True)
    # the meta file names what the index holds: replace the index first, then the meta;
    # a crash between the two leaves a pair that disagrees, which `load` detects
    write_atomic(index_path, lambda tmp: faiss.write_index(ann.index, str(tmp)))
    meta = {"ids": ann.ids, "keys": ann.keys, "n_trained": np.int64(ann.n_trained)}
    write_atomic_binary(meta_path, lambda f: np.savez(f, **meta))


def load(folder: Path, key: str) -> IvfVectors | None:
    import faiss  # heavy: loaded only where an IVF index is used

    index_path, meta_path = paths(folder, key)
    if not (index_path.exists() and meta_path.exists()):
        return None
    try:
        index = faiss.read_index(str(index_path))
        with np.load(meta_path) as meta:
            ann = IvfVectors(index, meta["ids"], meta["keys"], int(meta["n_trained"]))
    except (OSError, RuntimeError, ValueError, KeyError):
        return None
    if index.ntotal != len(ann.ids):
        return None  # interrupted between the two renames: rebuild
    ann.nprobe = default_nprobe()
    return ann


def refresh(
    folder: Path, key: str, ids: np.ndarray, keys: np.ndarray, matrix: np.ndarray, train: bool
) -> IvfVectors | None:
    """The ANN index for these vectors: loaded and updated, or (with `train`) built.

    Without `train`, returns None when no index exists or it would need retraining.
    """
    if len(ids) < ann_min():
        return None
    ann = load(folder, key)
    stale = ann is None or len(ids) > RETRAIN_GROWTH * ann.n_trained
    if stale:
        if not train:
            return None
        ann = build(ids, keys, matrix)
        _try_save(ann, folder, key)
        return ann
    assert ann is not None
    if update(ann, ids, keys, matrix):
        _try_save(ann, folder, key)
    return ann


def _try_save(ann: IvfVectors, folder: Path, key: str) -> None:
    with contextlib.suppress(OSError, RuntimeError):
        save(ann, folder, key)  # read-only: the next run updates from the older file again
