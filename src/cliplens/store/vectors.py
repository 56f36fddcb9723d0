"""Exact vector search over a catalog's embeddings.

The matrix of one model is cached beside the catalog as .npy files named by the
catalog's generation, memory-mapped when fresh and rebuilt (atomically) when the
catalog changed; a process loads it once and then answers each query with one
matrix product.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cliplens.store.catalog import Catalog


@dataclass
class VectorIndex:
    ids: np.ndarray  # (N,) int64 file ids
    matrix: np.ndarray  # (N, D) float32, rows L2-normalised

    def __len__(self) -> int:
        return len(self.ids)

    def search(
        self, query: np.ndarray, k: int, allowed: np.ndarray | None = None
    ) -> list[tuple[int, float]]:
        """The k rows most similar to `query` (cosine), optionally among allowed file ids."""
        if len(self.ids) == 0 or k <= 0:
            return []
        scores = self.matrix @ query.astype(np.float32)
        if allowed is not None:
            scores = np.where(np.isin(self.ids, allowed), scores, -np.inf)
        k = min(k, len(scores))
        top = np.argpartition(-scores, k - 1)[:k]
        top = top[np.argsort(-scores[top], kind="stable")]
        return [(int(self.ids[i]), float(scores[i])) for i in top if np.isfinite(scores[i])]


_loaded: dict[tuple[str, str, int], VectorIndex] = {}


def _cache_dir(catalog: Catalog) -> Path:
    return catalog.path.with_name(catalog.path.name + ".vectors")


def _key(model_id: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", model_id)


def load_index(catalog: Catalog, model_id: str) -> VectorIndex:
    """The model's vectors, from this process's memory, the .npy cache, or the catalog."""
    gen = catalog.generation
    mem_key = (str(catalog.path), model_id, gen)
    if mem_key in _loaded:
        return _loaded[mem_key]
    folder = _cache_dir(catalog)
    stem = folder / f"{_key(model_id)}-g{gen}"
    ids_path, mat_path = stem.with_suffix(".ids.npy"), stem.with_suffix(".f16.npy")
    if ids_path.exists() and mat_path.exists():
        ids = np.load(ids_path)
        matrix16 = np.load(mat_path, mmap_mode="r")
    else:
        ids, matrix16 = catalog.vectors(model_id)
        _write_cache(folder, _key(model_id), ids_path, mat_path, ids, matrix16)
    index = VectorIndex(ids, np.asarray(matrix16, dtype=np.float32))
    _loaded.clear()  # keep one matrix per process: they can be large
    _loaded[mem_key] = index
    return index


def _write_cache(folder: Path, key: str, ids_path: Path, mat_path: Path, ids, matrix) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        for target, data in ((mat_path, matrix), (ids_path, ids)):
            tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
            with tmp.open("wb") as f:
                np.save(f, data)
            tmp.replace(target)
        for old in folder.glob(f"{key}-g*.npy"):
            if old not in (ids_path, mat_path):
                old.unlink(missing_ok=True)
    except OSError:
        pass  # a read-only folder only costs rebuilding from the catalog next time
