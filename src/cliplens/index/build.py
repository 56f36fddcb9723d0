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

import hashlib
import itertools
import json
import math
import os
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cliplens.catalog.ivf import nlist_for
from cliplens.errors import InvalidInputError
from cliplens.paths import from_text

KINDS = ("flat", "hnsw", "ivfpq")
REFINES = ("none", "sq8", "fp16")
INDEX_FILE = "index.faiss"
META_FILE = "index.json"
PATHS_FILE = "paths.arrow"  # row number -> path, in the order vectors were added
PARTIAL_FILE = ".build-partial.faiss"  # an unfinished build: trained, some vectors added
STATE_FILE = ".build-state.json"  # what the partial index is a build of


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
    niter: int = 10
    hnsw_m: int = 32
    ef_search: int = 64


def plan_index(n: int, dim: int, kind: str, refine: str = "sq8") -> IndexPlan:
    """Parameters from the data's size: about 2 sqrt(n) inverted lists (as the catalog's
    ANN index), D/8 sub-quantisers of 8 bits, a training sample of 40 points per list
    (faiss warns under 39) and 10 k-means iterations (faiss' default 25 costs 2.5x)."""
    if kind not in KINDS:
        raise InvalidInputError(f"--kind {kind}: use one of {', '.join(KINDS)}")
    if refine not in REFINES:
        raise InvalidInputError(f"--refine {refine}: use one of {', '.join(REFINES)}")
    plan = IndexPlan(kind, n, dim)
    if kind == "ivfpq":
        plan.nlist = nlist_for(n)
        plan.pq_m = max(m for m in range(1, max(1, dim // 8) + 1) if dim % m == 0)
        plan.train_size = min(n, max(40 * plan.nlist, 10_000))
        plan.refine = refine
        plan.nprobe = min(plan.nlist, max(32, plan.nlist // 128))
        plan.k_factor = 1 if refine == "none" else 64
    return plan


@dataclass
class VectorSource:
    """n vectors of dim, as chunks; `chunks()` starts a fresh pass each time, with the
    same chunks in the same order. `fingerprint` names the data, so that an interrupted
    build resumes only over the same data."""

    n: int
    dim: int
    chunks: Callable[[], Iterator[np.ndarray]]
    fingerprint: str = ""


def shard_source(
    shards: str | os.PathLike, only: list[str] | None = None
) -> tuple[VectorSource, dict[str, Any]]:
    """The embeddings of an embed-dataset job folder (or of its shards named in `only`),
    and its manifest."""
    from cliplens.distributed.embed import iter_shards, require_manifest, shard_vectors

    folder = Path(shards)
    manifest = require_manifest(folder)
    chosen = {name: s for name, s in manifest["shards"].items() if only is None or name in only}
    n = sum(s["rows"] for s in chosen.values())
    if n < 1:
        raise InvalidInputError(f"{folder}: no embeddings in its shards")

    def chunks() -> Iterator[np.ndarray]:
        for _, table in iter_shards(folder, chosen, columns=["embedding"]):
            yield shard_vectors(table)

    fingerprint = json.dumps([manifest["model_id"], chosen], sort_keys=True)
    return VectorSource(n, int(manifest["dim"]), chunks, fingerprint), manifest


def _pass(source: VectorSource, what: str, progress: bool) -> Iterator[np.ndarray]:
    """One pass over the source's chunks, with a progress bar."""
    from cliplens.progress import progress_bar

    with progress_bar(source.n, what, progress) as advance:
        for v in source.chunks():
            yield v
            advance(len(v))


def _sample(source: VectorSource, size: int, seed: int, progress: bool = False) -> np.ndarray:
    """`size` rows drawn uniformly without replacement, in one streaming pass."""
    rng = np.random.default_rng(seed)
    chosen = np.sort(rng.choice(source.n, size=size, replace=False))
    out, start = [], 0
    for v in _pass(source, "sampling for training", progress):
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
    index.cp.niter = plan.niter
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
    resumed_rows: int = 0  # vectors an interrupted build had added already

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def build_index(
    shards: str | os.PathLike,
    out: str | os.PathLike,
    kind: str = "ivfpq",
    refine: str = "sq8",
    queries: int = 200,
    seed: int = 0,
    progress: bool = False,
    checkpoint_s: float = 300.0,
) -> IndexReport:
    """Build, save (index.faiss + index.json) and evaluate an index over a job's shards.
    An interrupted build resumes from its last checkpoint (see `build_from`)."""
    from cliplens.distributed.embed import iter_shards

    check_measure(queries, checkpoint_s)
    source, manifest = shard_source(shards)
    # index.json is written last: without it the folder is incomplete, and an earlier
    # build's index.json must not vouch for a half-rewritten folder
    (Path(out) / META_FILE).unlink(missing_ok=True)
    report, _, _ = build_from(source, out, kind, refine, queries, seed, progress=progress,
                              checkpoint_s=checkpoint_s)  # fmt: skip
    paths = (t.column("path") for _, t in iter_shards(shards, columns=["path"]))
    write_index_folder(out, paths, manifest.get("model"), manifest["model_id"], report,
                       shards=str(Path(shards).resolve()), trained_n=source.n,
                       shards_added=manifest["shards"])  # fmt: skip
    return report


def update_index(
    shards: str | os.PathLike,
    out: str | os.PathLike,
    queries: int = 200,
    seed: int = 0,
    progress: bool = False,
) -> tuple[IndexReport, int, dict[str, Any]]:
    """(report, rows added, index.json before): add to a built index the shards written
    since it was built (`embed-dataset --add-new`), without training it again, and measure
    recall over all the data. The index is read into memory to be added to; a kill before
    the end leaves the folder refused as incomplete (build it again)."""
    import faiss

    from cliplens.distributed.embed import iter_shards
    from cliplens.progress import progress_bar
    from cliplens.store.files import write_atomic

    check_measure(queries)
    out = Path(out)
    built = open_built_index(out)
    meta = built.meta
    source, manifest = shard_source(shards)
    if manifest["model_id"] != built.model_id:
        raise InvalidInputError(f"{shards} holds vectors of {manifest['model_id']}, {out} of "
                                f"{built.model_id}; build a new index")  # fmt: skip
    before = sorted(meta.get("shards_added") or {})
    names = sorted(manifest["shards"])
    if not before or names[: len(before)] != before:
        raise InvalidInputError(f"{out} was not built from the first shards of {shards}; "
                                "build it again without --update")  # fmt: skip
    new = names[len(before) :]
    if not new:
        return IndexReport(**{k: meta[k] for k in IndexReport.__dataclass_fields__}), 0, meta
    index = load_built_index(out, mmap=False)  # in memory: it is added to
    added_source, _ = shard_source(shards, only=new)
    t = time.perf_counter()
    with progress_bar(added_source.n, "adding vectors", progress) as advance:
        for v in added_source.chunks():
            index.add(np.ascontiguousarray(v))
            advance(len(v))
    add_s = time.perf_counter() - t
    q = held_out_queries(source, queries, seed)
    recall, query_ms = measure(index, q, exact_top_k(source, q, 10, progress))
    (out / META_FILE).unlink()  # incomplete until the new index.json is written
    write_atomic(out / INDEX_FILE, lambda p: faiss.write_index(index, str(p)))
    report = IndexReport(meta["kind"], index.ntotal, source.dim, meta["params"],
                         meta["train_s"], meta["add_s"] + add_s,
                         (out / INDEX_FILE).stat().st_size, recall, query_ms, len(q))  # fmt: skip
    new_paths = (t.column("path") for _, t in iter_shards(shards, new, columns=["path"]))
    write_index_folder(out, itertools.chain(built.paths.chunks, new_paths), built.model,
                       built.model_id, report, shards=str(Path(shards).resolve()),
                       trained_n=meta.get("trained_n", meta["n"]),
                       shards_added=manifest["shards"])  # fmt: skip
    return report, added_source.n, meta


def write_index_folder(
    out: str | os.PathLike, paths: Iterable[Any], model: str | None, model_id: str,
    report: IndexReport, **extra: Any,
) -> None:  # fmt: skip
    """Complete a folder that holds index.faiss: the row -> path table and index.json,
    which names the model. `paths` yields batches of paths (Arrow arrays or lists) in the
    order the vectors were added; each is written as it comes, uncompressed, in an Arrow
    IPC file of large strings, so that a server memory-maps the paths instead of holding
    them, and no size is too large."""
    import pyarrow as pa

    from cliplens.store.files import write_atomic

    out = Path(out)
    schema = pa.schema([("path", pa.large_string())])

    def write_paths(tmp: Path) -> None:
        with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_file(sink, schema) as writer:
            for batch in paths:
                chunked = batch if isinstance(batch, pa.ChunkedArray) else pa.chunked_array([batch])
                for chunk in chunked.cast(pa.large_string()).chunks:
                    writer.write_batch(pa.record_batch([chunk], schema=schema))

    write_atomic(out / PATHS_FILE, write_paths)
    meta = {**extra, "model": model, "model_id": model_id, **report.to_dict()}
    write_atomic(out / META_FILE, lambda p: p.write_text(json.dumps(meta, indent=1)))


class BuiltIndex:
    """A saved index with its row -> path table and the model its vectors came from.

    Rows are the index's ids (0..n-1, in the order the shards were added). Paths are an
    Arrow array memory-mapped from the folder, not Python strings (about 100 bytes more
    each, and all in the process's own memory)."""

    def __init__(self, index: Any, paths: Any, meta: dict[str, Any], folder: Path) -> None:
        self.index, self.paths, self.meta, self.folder = index, paths, meta, folder
        self.model: str | None = meta.get("model")
        self.model_id: str = meta["model_id"]
        self._starts = np.cumsum([0] + [len(c) for c in paths.chunks])  # row of each chunk
        self._direct_map = False

    def __len__(self) -> int:
        return int(self._starts[-1])

    def path(self, row: int) -> str | None:
        if not 0 <= row < len(self):
            return None
        k = int(np.searchsorted(self._starts, row, side="right")) - 1
        return from_text(self.paths.chunk(k)[row - int(self._starts[k])].as_py())

    def search_rows(self, queries: np.ndarray, k: int) -> list[list[tuple[int, float]]]:
        """(row, score) of the k best per query row, all queries in one faiss call."""
        q = np.ascontiguousarray(np.atleast_2d(queries), np.float32)
        scores, rows = self.index.search(q, min(k, len(self)))
        return [[(int(r), float(s)) for r, s in zip(rr, ss, strict=True) if r >= 0]
                for rr, ss in zip(rows, scores, strict=True)]  # fmt: skip

    def search(self, query: np.ndarray, k: int) -> list[tuple[str, float]]:
        return [(self.path(r), s) for r, s in self.search_rows(query, k)[0]]

    def vector(self, row: int) -> np.ndarray:
        """The stored vector of `row` as the index holds it: exact for flat and HNSW,
        the refine stage's (SQ8: within about 1%) for a refined IVF-PQ, and the PQ
        approximation for IVF-PQ without refine."""
        import faiss

        try:
            return self.index.reconstruct(row)
        except RuntimeError:
            if self._direct_map:
                raise
        faiss.extract_index_ivf(self.index).make_direct_map()  # row -> list, built once
        self._direct_map = True
        return self.index.reconstruct(row)

    def require_model(self, ref: Any) -> None:
        """Refuse a model other than the one the vectors came from."""
        if ref.info.model_id != self.model_id:
            raise InvalidInputError(
                f"--index {self.folder} holds vectors of {self.model_id}, not of {ref.name} "
                f"({ref.info.model_id}); leave --model out or pass the model it was built with"
            )


def open_built_index(folder: str | os.PathLike) -> BuiltIndex:
    """An index written by `build-index`, ready to search (memory-mapped)."""
    import pyarrow as pa

    folder = Path(folder)
    index = load_built_index(folder)
    try:
        meta = json.loads((folder / META_FILE).read_text())
        table = pa.ipc.open_file(pa.memory_map(str(folder / PATHS_FILE))).read_all()
        paths = table.column("path")
        if "model_id" not in meta:
            raise ValueError(f"{META_FILE} names no model_id")
    except (OSError, ValueError, pa.ArrowException) as e:
        raise InvalidInputError(f"{folder}: not a complete build-index folder ({e})") from e
    if len(paths) != index.ntotal:
        raise InvalidInputError(f"{folder}: {PATHS_FILE} has {len(paths)} paths for "
                                f"{index.ntotal} vectors; run build-index again")  # fmt: skip
    return BuiltIndex(index, paths, meta, folder)


def build_from(
    source: VectorSource,
    out: str | os.PathLike,
    kind: str = "ivfpq",
    refine: str = "sq8",
    queries: int = 200,
    seed: int = 0,
    plan: IndexPlan | None = None,
    progress: bool = False,
    checkpoint_s: float = 300.0,
) -> tuple[IndexReport, Any, tuple[np.ndarray, np.ndarray]]:
    """(report, index, (queries, exact top-10 rows)): build over any vector source, save to
    OUT/index.faiss, and measure recall@10 on held-out queries (rows with a little noise).

    Resumable: the trained index, then the growing one every `checkpoint_s` seconds of
    adding (0: never) and the complete one, are saved to OUT/.build-partial.faiss. A build
    of the same plan over the same data that finds it goes on from there instead of
    training and adding again."""
    from cliplens.progress import progress_bar

    check_measure(queries, checkpoint_s)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    plan = plan or plan_index(source.n, source.dim, kind, refine)
    key = hashlib.sha256(json.dumps([asdict(plan), seed, source.n, source.dim,
                                     source.fingerprint]).encode()).hexdigest()  # fmt: skip
    resumed = _load_partial(out, key)
    if resumed is not None:
        index, state = resumed
    else:
        (out / STATE_FILE).unlink(missing_ok=True)
        index = _new_index(plan)
        t = time.perf_counter()
        if not index.is_trained:
            sample = _sample(source, plan.train_size, seed, progress)
            with progress_bar(1, f"training on {len(sample):,} vectors", progress) as advance:
                index.train(sample)
                advance(1)
            del sample
        state = {"key": key, "train_s": time.perf_counter() - t, "add_s": 0.0}
        _save_partial(out, index, state)
    done = index.ntotal
    t = last = time.perf_counter()
    row = 0
    with progress_bar(source.n - done, "adding vectors", progress) as advance:
        for v in source.chunks() if done < source.n else ():
            first, row = row, row + len(v)  # this chunk holds rows first..row-1
            if row <= done:
                continue
            if first < done:
                stale = out / PARTIAL_FILE
                raise InvalidInputError(f"{out}: the data's chunks changed under an "
                                        f"interrupted build; delete {stale}")  # fmt: skip
            index.add(np.ascontiguousarray(v))
            advance(len(v))
            if checkpoint_s and time.perf_counter() - last >= checkpoint_s and row < source.n:
                state["add_s"] += time.perf_counter() - t
                t = last = time.perf_counter()
                _save_partial(out, index, state)
    if index.ntotal != source.n:
        raise InvalidInputError(f"the data held {index.ntotal:,} vectors where {source.n:,} "
                                "were announced; check the shards and their manifest")  # fmt: skip
    if index.ntotal > done:
        state["add_s"] += time.perf_counter() - t
        _save_partial(out, index, state)  # complete: a kill while measuring keeps it
    q = held_out_queries(source, queries, seed)
    truth = exact_top_k(source, q, 10, progress)
    recall, query_ms = measure(index, q, truth)
    (out / PARTIAL_FILE).replace(out / INDEX_FILE)
    (out / STATE_FILE).unlink(missing_ok=True)
    params = {k: v for k, v in asdict(plan).items() if k not in ("kind", "n", "dim")}
    report = IndexReport(plan.kind, source.n, source.dim, params, state["train_s"],
                         state["add_s"], (out / INDEX_FILE).stat().st_size, recall, query_ms,
                         len(q), resumed_rows=done)  # fmt: skip
    return report, index, (q, truth)


def check_measure(queries: int, checkpoint_s: float = 0.0) -> None:
    """Held-out queries to measure recall with, and the checkpoint interval: both bounded."""
    from cliplens.limits import MAX_QUERIES, finite_number, whole_number

    whole_number(queries, "held-out queries", 1, MAX_QUERIES)
    finite_number(checkpoint_s, "checkpoint interval (seconds)", 0)


def _save_partial(out: Path, index: Any, state: dict[str, Any]) -> None:
    import faiss

    from cliplens.store.files import write_atomic

    write_atomic(out / PARTIAL_FILE, lambda p: faiss.write_index(index, str(p)))
    write_atomic(out / STATE_FILE, lambda p: p.write_text(json.dumps(state)))


def _load_partial(out: Path, key: str) -> tuple[Any, dict[str, Any]] | None:
    """The index and state of an interrupted build of the same plan over the same data."""
    import faiss

    try:
        state = json.loads((out / STATE_FILE).read_text())
        if state.get("key") != key:
            return None
        return faiss.read_index(str(out / PARTIAL_FILE)), state
    except (OSError, ValueError, RuntimeError):
        return None


def held_out_queries(source: VectorSource, count: int, seed: int) -> np.ndarray:
    """Rows of the data with noise, so that no query is itself in the index."""
    rng = np.random.default_rng(seed + 1)
    q = _sample(source, min(count, source.n), seed + 2)
    q = q + rng.normal(0, 0.05 / math.sqrt(source.dim), q.shape).astype(np.float32)
    return (q / np.linalg.norm(q, axis=1, keepdims=True)).astype(np.float32)


def measure(index: Any, queries: np.ndarray, truth: np.ndarray) -> tuple[float, float]:
    """(recall@10, ms per query) with one query at a time, as a server asks."""
    t = time.perf_counter()
    found = np.stack([index.search(queries[i : i + 1], 10)[1][0] for i in range(len(queries))])
    query_ms = (time.perf_counter() - t) / len(queries) * 1000
    k = truth.shape[1]
    hits = [len(set(a[:k]) & set(b)) / k for a, b in zip(found, truth, strict=True)]
    return float(np.mean(hits)), query_ms


def exact_top_k(
    source: VectorSource, queries: np.ndarray, k: int, progress: bool = False
) -> np.ndarray:
    """Row numbers of the exact top k per query, in one streaming pass."""
    best_s = np.full((len(queries), 0), -np.inf, np.float32)
    best_i = np.zeros((len(queries), 0), np.int64)
    start = 0
    for v in _pass(source, "exact search for recall", progress):
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
    """The saved index, memory-mapped: every kind's codes (flat vectors, HNSW storage, PQ
    lists, the refine stage's vectors) stay in the file and the page cache, so opening is
    instant and the process holds almost no memory of its own. faiss builds without
    IO_FLAG_MMAP_IFC map only IVF lists (IO_FLAG_MMAP); what neither maps is read in."""
    import faiss

    path = Path(folder) / INDEX_FILE
    if not path.is_file():
        raise InvalidInputError(f"{folder}: no {INDEX_FILE}; build one with 'cliplens build-index'")
    tries = [getattr(faiss, "IO_FLAG_MMAP_IFC", None), faiss.IO_FLAG_MMAP] if mmap else []
    for flags in [f for f in tries if f is not None]:
        try:
            return faiss.read_index(str(path), flags)
        except RuntimeError:
            continue
    try:
        return faiss.read_index(str(path))
    except RuntimeError as e:
        raise InvalidInputError(f"{path}: not a faiss index ({str(e).splitlines()[0][:200]}); "
                                "build it again with 'cliplens build-index'") from None  # fmt: skip
