"""A faiss index over embed-dataset shards, sized to the data, built in bounded memory.

Kinds:
- `flat`: exact inner product (every vector in RAM, float32);
- `hnsw`: a graph over the full vectors (HNSW32), fast and accurate, memory of flat and more;
- `ivfpq`: inverted lists of product-quantised codes (D/8 bytes per vector for D-dim
  vectors), trained on a sample, with an optional refine stage that re-scores the best
  candidates with scalar-quantised vectors (`sq8`: D bytes each, or `fp16`: 2D bytes).

Vectors are streamed shard by shard, so the build never holds more than one shard plus
the training sample. Recall@10 against exact search is measured on held-out queries (rows
of the data with a little noise), and reported with the build time, the index size and
the query latency.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cliplens.errors import InvalidInputError

KINDS = ("flat", "hnsw", "ivfpq")
REFINES = ("none", "sq8", "fp16")
INDEX_FILE = "index.faiss"
META_FILE = "index.json"


@dataclass
class IndexPlan:
    kind: str
    n: int
    dim: int
    nlist: int = 0
    pq_m: int = 0
    train_size: int = 0
    refine: str = "none"
    nprobe: int = 0
    k_factor: int = 1
    hnsw_m: int = 32
    ef_search: int = 64


def plan_index(n: int, dim: int, kind: str, refine: str = "sq8") -> IndexPlan:
    """Parameters from the data's size: about 4 sqrt(n) lists (a power of two, at least 39
    training points each), D/8 sub-quantisers of 8 bits, a sample of 64 points per list."""
    if kind not in KINDS:
        raise InvalidInputError(f"--kind {kind}: use one of {', '.join(KINDS)}")
    if refine not in REFINES:
        raise InvalidInputError(f"--refine {refine}: use one of {', '.join(REFINES)}")
    plan = IndexPlan(kind, n, dim)
    if kind == "ivfpq":
        plan.nlist = max(1, min(2 ** round(math.log2(4 * math.sqrt(max(n, 1)))), n // 39))
        plan.pq_m = max(m for m in range(1, max(1, dim // 8) + 1) if dim % m == 0)
        plan.train_size = min(n, max(64 * plan.nlist, 10_000))
        plan.refine = refine
        plan.nprobe = min(plan.nlist, max(32, plan.nlist // 32))
        plan.k_factor = 1 if refine == "none" else 16
    return plan


def _vectors(shards: Path) -> Iterator[np.ndarray]:
    from cliplens.distributed.embed import iter_shards, shard_vectors

    for _, table in iter_shards(shards):
        yield shard_vectors(table)


def _sample(shards: Path, n: int, size: int, seed: int) -> np.ndarray:
    """`size` rows drawn uniformly without replacement, streaming."""
    rng = np.random.default_rng(seed)
    chosen = np.sort(rng.choice(n, size=size, replace=False))
    out, start = [], 0
    for v in _vectors(shards):
        sel = chosen[(chosen >= start) & (chosen < start + len(v))] - start
        out.append(v[sel])
        start += len(v)
    return np.concatenate(out)


def _new_index(plan: IndexPlan):
    import faiss

    ip = faiss.METRIC_INNER_PRODUCT
    if plan.kind == "flat":
        return faiss.IndexFlatIP(plan.dim)
    if plan.kind == "hnsw":
        index = faiss.IndexHNSWFlat(plan.dim, plan.hnsw_m, ip)
        index.hnsw.efSearch = plan.ef_search
        return index
    quantizer = faiss.IndexFlatIP(plan.dim)
    index = faiss.IndexIVFPQ(quantizer, plan.dim, plan.nlist, plan.pq_m, 8, ip)
    index.nprobe = plan.nprobe
    if plan.refine == "none":
        return index
    qtype = faiss.ScalarQuantizer.QT_8bit if plan.refine == "sq8" else faiss.ScalarQuantizer.QT_fp16
    refined = faiss.IndexRefine(index, faiss.IndexScalarQuantizer(plan.dim, qtype, ip))
    refined.k_factor = plan.k_factor
    return refined


@dataclass
class IndexReport:
    kind: str
    n: int
    dim: int
    params: dict[str, Any]
    train_s: float
    add_s: float
    index_bytes: int
    recall_at_10: float
    query_ms: float
    queries: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def build_index(
    shards: str | os.PathLike,
    out: str | os.PathLike,
    kind: str = "ivfpq",
    refine: str = "sq8",
    queries: int = 200,
    seed: int = 0,
) -> IndexReport:
    """Build, save (index.faiss + index.json) and evaluate an index over a job's shards."""
    import faiss

    from cliplens.distributed.embed import read_manifest

    shards, out = Path(shards), Path(out)
    manifest = read_manifest(shards)
    if manifest is None:
        raise InvalidInputError(f"{shards}: no manifest.json; give the --out folder of "
                                "embed-dataset")  # fmt: skip
    n = sum(s["rows"] for s in manifest["shards"].values())
    dim = int(manifest["dim"])
    if n < 1:
        raise InvalidInputError(f"{shards}: no embeddings in its shards")
    plan = plan_index(n, dim, kind, refine)
    index = _new_index(plan)
    t = time.perf_counter()
    if not index.is_trained:
        index.train(_sample(shards, n, plan.train_size, seed))
    train_s = time.perf_counter() - t
    t = time.perf_counter()
    for v in _vectors(shards):
        index.add(np.ascontiguousarray(v))
    add_s = time.perf_counter() - t
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / f".{INDEX_FILE}.tmp"
    faiss.write_index(index, str(tmp))
    tmp.replace(out / INDEX_FILE)
    # held-out queries: data rows with noise, so no query is itself in the index
    rng = np.random.default_rng(seed + 1)
    q = _sample(shards, n, min(queries, n), seed + 2)
    q = q + rng.normal(0, 0.05 / math.sqrt(dim), q.shape).astype(np.float32)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    truth = exact_top_k(shards, q, 10)
    t = time.perf_counter()
    found = np.stack([index.search(q[i : i + 1], 10)[1][0] for i in range(len(q))])
    query_ms = (time.perf_counter() - t) / len(q) * 1000
    k = truth.shape[1]
    hits = [len(set(a[:k]) & set(b)) / k for a, b in zip(found, truth, strict=True)]
    recall = float(np.mean(hits))
    report = IndexReport(kind, n, dim, {k_: v for k_, v in asdict(plan).items()
                                         if k_ not in ("kind", "n", "dim")},
                         train_s, add_s, (out / INDEX_FILE).stat().st_size, recall, query_ms,
                         len(q))  # fmt: skip
    meta = {"shards": str(shards.resolve()), "model_id": manifest["model_id"], **report.to_dict()}
    (out / META_FILE).write_text(json.dumps(meta, indent=1))
    return report


def exact_top_k(shards: Path, queries: np.ndarray, k: int) -> np.ndarray:
    """Row numbers of the exact top k per query, streaming over the shards."""
    best_s = np.full((len(queries), 0), -np.inf, np.float32)
    best_i = np.zeros((len(queries), 0), np.int64)
    start = 0
    for v in _vectors(shards):
        s = queries @ v.T
        ids = np.broadcast_to(np.arange(start, start + len(v)), s.shape)
        best_s = np.concatenate([best_s, s], axis=1)
        best_i = np.concatenate([best_i, ids], axis=1)
        keep = np.argsort(-best_s, axis=1, kind="stable")[:, :k]
        best_s = np.take_along_axis(best_s, keep, axis=1)
        best_i = np.take_along_axis(best_i, keep, axis=1)
        start += len(v)
    return best_i


def load_built_index(folder: str | os.PathLike, mmap: bool = True):
    """The saved index; IVF indexes are memory-mapped (their lists stay on disk)."""
    import faiss

    path = Path(folder) / INDEX_FILE
    if not path.is_file():
        raise InvalidInputError(f"{folder}: no {INDEX_FILE}; build one with 'cliplens build-index'")
    flags = faiss.IO_FLAG_MMAP if mmap else 0
    try:
        return faiss.read_index(str(path), flags)
    except RuntimeError:  # kinds that cannot be mapped load into memory
        return faiss.read_index(str(path))
