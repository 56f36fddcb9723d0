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
the query latency. The finished folder, and opening it: built.py.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import os
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from cliplens.catalog.ivf import nlist_for
from cliplens.distributed.embed import iter_shards, shard_vectors
from cliplens.distributed.manifest import ShardManifest, require_manifest
from cliplens.errors import InvalidInputError
from cliplens.index.built import (
    INDEX_FILE,
    KINDS,
    META_FILE,
    NEXT,
    PATHS_FILE,
    REFINES,
    IndexKind,
    IndexMeta,
    IndexReport,
    Refine,
    commit_update,
    discard_update,
    open_built_index,
)
from cliplens.limits import MAX_QUERIES, finite_number, whole_number
from cliplens.progress import progress_bar
from cliplens.store.files import write_atomic

__all__ = [
    "IndexPlan",
    "VectorSource",
    "build_faiss_index",
    "build_index",
    "plan_index",
    "shard_source",
    "update_index",
    "write_index_folder",
]

PARTIAL_FILE = ".build-partial.faiss"  # an unfinished build: trained, some vectors added
STATE_FILE = ".build-state.json"  # what the partial (or finished) index is a build of


@dataclass
class IndexPlan:
    """What to build: the kind and its parameters, sized to n vectors of dim."""

    kind: IndexKind
    n: int
    dim: int
    nlist: int = 0
    pq_m: int = 0
    train_size: int = 0
    refine: Refine = "none"
    nprobe: int = 0
    k_factor: int = 1
    niter: int = 10
    hnsw_m: int = 32
    ef_search: int = 64


def plan_index(n: int, dim: int, kind: IndexKind, refine: Refine = "sq8") -> IndexPlan:
    """Parameters from the data's size: about 2 sqrt(n) inverted lists (as the catalog's
    ANN index), D/8 sub-quantisers of 8 bits, a training sample of 40 points per list
    (faiss warns under 39) and 10 k-means iterations (faiss' default 25 costs 2.5x)."""
    if kind not in KINDS:
        raise InvalidInputError(f"`kind` {kind}: use one of {', '.join(KINDS)}")
    if refine not in REFINES:
        raise InvalidInputError(f"`refine` {refine}: use one of {', '.join(REFINES)}")
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
) -> tuple[VectorSource, ShardManifest]:
    """The embeddings of an embed-dataset job folder (or of its shards named in `only`),
    and its manifest."""
    folder = Path(shards)
    manifest = require_manifest(folder)
    chosen = {name: s for name, s in manifest.shards.items() if only is None or name in only}
    n = sum(s.rows for s in chosen.values())
    if n < 1:
        raise InvalidInputError(f"{folder}: no embeddings in its shards")

    def chunks() -> Iterator[np.ndarray]:
        for _, table in iter_shards(folder, chosen, columns=["embedding"]):
            yield shard_vectors(table)

    counts = {name: asdict(s) for name, s in chosen.items()}
    fingerprint = json.dumps([manifest.model_id, counts], sort_keys=True)
    return VectorSource(n, int(manifest.dim), chunks, fingerprint), manifest


def _pass(source: VectorSource, what: str, progress: bool) -> Iterator[np.ndarray]:
    """One pass over the source's chunks, with a progress bar."""
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


def _new_index(plan: IndexPlan) -> Any:
    import faiss  # heavy: loaded only where an index is built

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


def build_index(
    shards: str | os.PathLike[str],
    out: str | os.PathLike[str],
    kind: IndexKind = "ivfpq",
    refine: Refine = "sq8",
    queries: int = 200,
    seed: int = 0,
    progress: bool = False,
    checkpoint_s: float = 300.0,
) -> IndexReport:
    """Build, save and measure an index over an embed-dataset job's shards: the whole
    `cliplens build-index`, shards folder -> index folder.

    Why: search millions of photos from a memory-mapped file; an interrupted build resumes
    from its last checkpoint (see `build_faiss_index`).

    >>> import cliplens
    >>> report = cliplens.build_index("SHARDS", "INDEX", kind="ivfpq", refine="sq8")
    >>> report.recall_at_10, report.query_ms  # doctest: +SKIP
    """
    check_measure(queries, checkpoint_s)
    source, manifest = shard_source(shards)
    # index.json is written last: without it the folder is incomplete, and an earlier
    # build's index.json must not vouch for a half-rewritten folder
    (Path(out) / META_FILE).unlink(missing_ok=True)
    discard_update(out)  # an earlier update's files would otherwise replace this build's
    report, _, _ = build_faiss_index(
        source, out, kind, refine, queries, seed, progress=progress, checkpoint_s=checkpoint_s
    )
    paths = (t.column("path") for _, t in iter_shards(shards, columns=["path"]))
    meta = IndexMeta(
        manifest.model_id,
        report,
        manifest.model,
        str(Path(shards).resolve()),
        source.n,
        manifest.to_dict()["shards"],
    )
    write_index_folder(out, paths, meta)
    return report


def update_index(
    shards: str | os.PathLike[str],
    out: str | os.PathLike[str],
    queries: int = 200,
    seed: int = 0,
    progress: bool = False,
) -> tuple[IndexReport, int, IndexMeta]:
    """(report, rows added, index.json before): add to a built index the shards written
    since it was built (`embed-dataset --add-new`), without training it again, and measure
    recall over all the data: `cliplens build-index --update`.

    Why: a grown collection is searchable without a new build. The index is read into
    memory to be added to, and the new files are written beside the old ones: killed
    before they are complete, the folder keeps its old build (run the update again);
    after, the next open finishes it (`finish_update`). Never a mix of the two.

    >>> import cliplens
    >>> report, added, before = cliplens.update_index("SHARDS", "INDEX")
    >>> added, before.report.n, report.n  # doctest: +SKIP
    """
    import faiss  # heavy: loaded only where an index is built

    check_measure(queries)
    out = Path(out)
    built = open_built_index(out)  # finishes an update killed after its commit record
    discard_update(out)  # one killed before it
    meta = built.meta
    source, manifest = shard_source(shards)
    new = _new_shards(shards, out, built.model_id, manifest, meta)
    if not new:
        return meta.report, 0, meta
    index = open_built_index(out, mmap=False).index  # in memory: it is added to
    added_source, _ = shard_source(shards, only=new)
    add_s = _add_all(index, added_source, progress)
    q = held_out_queries(source, queries, seed)
    recall, query_ms = measure(index, q, exact_top_k(source, q, 10, progress))
    write_atomic(out / (NEXT + INDEX_FILE), lambda p: faiss.write_index(index, str(p)))
    size = (out / (NEXT + INDEX_FILE)).stat().st_size
    report = replace(
        meta.report,
        n=index.ntotal,
        dim=source.dim,
        add_s=meta.report.add_s + add_s,
        index_bytes=size,
        recall_at_10=recall,
        query_ms=query_ms,
        queries=len(q),
        resumed_rows=0,
    )
    new_paths = (t.column("path") for _, t in iter_shards(shards, new, columns=["path"]))
    after = replace(
        meta,
        report=report,
        shards=str(Path(shards).resolve()),
        trained_n=meta.trained_on,
        shards_added=manifest.to_dict()["shards"],
    )
    chunks = itertools.chain(built.paths.chunks, new_paths)
    write_index_folder(out, chunks, after, prefix=NEXT)
    commit_update(out)
    return report, added_source.n, meta


def _new_shards(
    shards: str | os.PathLike[str],
    out: Path,
    model_id: str,
    manifest: ShardManifest,
    meta: IndexMeta,
) -> list[str]:
    """The job's shards written after those the index was built from (checked to be the
    job's first ones, of the same model)."""
    if manifest.model_id != model_id:
        raise InvalidInputError(
            f"{shards} holds vectors of {manifest.model_id}, {out} of {model_id}; build a new index"
        )
    before = sorted(meta.shards_added)
    names = sorted(manifest.shards)
    if not before or names[: len(before)] != before:
        raise InvalidInputError(
            f"{out} was not built from the first shards of {shards}; "
            "build it again without `update`"
        )
    return names[len(before) :]


def _add_all(index: Any, source: VectorSource, progress: bool) -> float:
    """Add every vector of `source`; returns the seconds it took."""
    t = time.perf_counter()
    with progress_bar(source.n, "adding vectors", progress) as advance:
        for v in source.chunks():
            index.add(np.ascontiguousarray(v))
            advance(len(v))
    return time.perf_counter() - t


def write_index_folder(
    out: str | os.PathLike[str], paths: Iterable[Any], meta: IndexMeta, prefix: str = ""
) -> None:
    """Complete a folder that holds index.faiss: the row -> path table and index.json,
    which names the model. `paths` yields batches of paths (Arrow arrays or lists) in the
    order the vectors were added; each is written as it comes, uncompressed, in an Arrow
    IPC file of large strings, so that a server memory-maps the paths instead of holding
    them, and no size is too large. An update writes them under `prefix` (`NEXT`)."""
    import pyarrow as pa  # heavy: loaded only where paths are written

    out = Path(out)
    schema = pa.schema([("path", pa.large_string())])

    def write_paths(tmp: Path) -> None:
        with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_file(sink, schema) as writer:
            for batch in paths:
                chunked = batch if isinstance(batch, pa.ChunkedArray) else pa.chunked_array([batch])
                for chunk in chunked.cast(pa.large_string()).chunks:
                    writer.write_batch(pa.record_batch([chunk], schema=schema))

    write_atomic(out / (prefix + PATHS_FILE), write_paths)
    write_atomic(out / (prefix + META_FILE), lambda p: p.write_text(meta.to_json()))
    (out / STATE_FILE).unlink(missing_ok=True)  # whole: nothing is left to resume


@dataclass
class _BuildState:
    """What the partial index is a build of (`key`), and the time spent on it so far."""

    key: str
    train_s: float = 0.0
    add_s: float = 0.0
    complete: bool = False  # every vector added: the index is OUT/index.faiss


def build_faiss_index(
    source: VectorSource,
    out: str | os.PathLike[str],
    kind: IndexKind = "ivfpq",
    refine: Refine = "sq8",
    queries: int = 200,
    seed: int = 0,
    plan: IndexPlan | None = None,
    progress: bool = False,
    checkpoint_s: float = 300.0,
) -> tuple[IndexReport, Any, tuple[np.ndarray, np.ndarray]]:
    """(report, index, (queries, exact top-10 rows)): build over any vector source, save to
    OUT/index.faiss, and measure recall@10 on held-out queries (rows with a little noise).
    The folder is not complete: `write_index_folder` adds its paths and index.json.

    Resumable: the trained index, then the growing one every `checkpoint_s` seconds of
    adding (0: never) and the complete one, are saved to OUT/.build-partial.faiss; the
    complete one then becomes OUT/index.faiss, and .build-state.json says so until
    `write_index_folder` makes the folder whole. A build of the same plan over the same
    data that finds them goes on from there instead of training and adding again."""
    check_measure(queries, checkpoint_s)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    plan = plan or plan_index(source.n, source.dim, kind, refine)
    what = [asdict(plan), seed, source.n, source.dim, source.fingerprint]
    key = hashlib.sha256(json.dumps(what).encode()).hexdigest()
    resumed = _load_partial(out, key)
    if resumed is not None:
        index, state = resumed
    else:
        index, state = _trained(out, plan, source, key, seed, progress)
    done = index.ntotal
    _add_resuming(index, source, out, state, checkpoint_s, progress)
    q = held_out_queries(source, queries, seed)
    truth = exact_top_k(source, q, 10, progress)
    recall, query_ms = measure(index, q, truth)
    if not state.complete:
        (out / PARTIAL_FILE).replace(out / INDEX_FILE)
        state.complete = True  # kept until the folder is whole: a kill now adds nothing again
        write_atomic(out / STATE_FILE, lambda p: p.write_text(json.dumps(asdict(state))))
    params = {k: v for k, v in asdict(plan).items() if k not in ("kind", "n", "dim")}
    size = (out / INDEX_FILE).stat().st_size
    report = IndexReport(
        plan.kind,
        source.n,
        source.dim,
        params,
        state.train_s,
        state.add_s,
        size,
        recall,
        query_ms,
        len(q),
        resumed_rows=done,
    )
    return report, index, (q, truth)


def _trained(
    out: Path, plan: IndexPlan, source: VectorSource, key: str, seed: int, progress: bool
) -> tuple[Any, _BuildState]:
    """A new index of the plan, trained on a sample of the source, saved as the partial
    build (a kill from here on does not train again)."""
    (out / STATE_FILE).unlink(missing_ok=True)
    index = _new_index(plan)
    t = time.perf_counter()
    if not index.is_trained:
        sample = _sample(source, plan.train_size, seed, progress)
        with progress_bar(1, f"training on {len(sample):,} vectors", progress) as advance:
            index.train(sample)
            advance(1)
        del sample
    state = _BuildState(key, train_s=time.perf_counter() - t)
    _save_partial(out, index, state)
    return index, state


def _add_resuming(
    index: Any,
    source: VectorSource,
    out: Path,
    state: _BuildState,
    checkpoint_s: float,
    progress: bool,
) -> None:
    """Add the source's vectors past those the index holds, saving the partial build every
    `checkpoint_s` seconds and once complete (a kill while measuring keeps it)."""
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
                raise InvalidInputError(
                    f"{out}: the data's chunks changed under an interrupted build; delete {stale}"
                )
            index.add(np.ascontiguousarray(v))
            advance(len(v))
            if checkpoint_s and time.perf_counter() - last >= checkpoint_s and row < source.n:
                state.add_s += time.perf_counter() - t
                t = last = time.perf_counter()
                _save_partial(out, index, state)
    if index.ntotal != source.n:
        raise InvalidInputError(
            f"the data held {index.ntotal:,} vectors where {source.n:,} "
            "were announced; check the shards and their manifest"
        )
    if index.ntotal > done:
        state.add_s += time.perf_counter() - t
        _save_partial(out, index, state)


def check_measure(queries: int, checkpoint_s: float = 0.0) -> None:
    """Held-out queries to measure recall with, and the checkpoint interval: both bounded."""
    whole_number(queries, "held-out queries", 1, MAX_QUERIES)
    finite_number(checkpoint_s, "checkpoint interval (seconds)", 0)


def _save_partial(out: Path, index: Any, state: _BuildState) -> None:
    import faiss  # heavy: loaded only where an index is built

    write_atomic(out / PARTIAL_FILE, lambda p: faiss.write_index(index, str(p)))
    write_atomic(out / STATE_FILE, lambda p: p.write_text(json.dumps(asdict(state))))


def _load_partial(out: Path, key: str) -> tuple[Any, _BuildState] | None:
    """The index and state of an interrupted build of the same plan over the same data."""
    import faiss  # heavy: loaded only where an index is built

    try:
        state = _BuildState(**json.loads((out / STATE_FILE).read_text()))
        if state.key != key:
            return None
        return faiss.read_index(str(out / (INDEX_FILE if state.complete else PARTIAL_FILE))), state
    except (OSError, ValueError, TypeError, RuntimeError):
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
