"""Warm in-process query latency over N stored vectors: exact, and ANN (faiss IVF) with its
recall@10 against exact search.

python benchmarks/bench_search.py [--sizes 100000,1000000] [--queries 50] [--nprobe 8,16,32,64]

Vectors are synthetic, 512-d, unit length: `--data clustered` (default) draws them around
2,000 random centres, as image embeddings cluster by subject (`--spread`: the noise's
norm against the centre's; at 1.0 a vector's cosine to its centre is about 0.7), with
queries drawn the same way; `--data uniform` is the worst case for an inverted-file
index (no structure at all).
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

from cliplens.catalog import ivf as ann
from cliplens.catalog.vectors import CatalogVectors


def synthetic(n, dim, kind, rng, centres, spread):
    out = np.empty((n, dim), np.float32)
    for start in range(0, n, 100_000):
        m = min(100_000, n - start)
        x = rng.standard_normal((m, dim), dtype=np.float32)
        if kind == "clustered":
            x = centres[rng.integers(0, len(centres), m)] + spread * x / np.sqrt(dim)
        out[start : start + m] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out


def timed(fn, queries) -> tuple[float, list]:
    fn(queries[0])
    times, results = [], []
    for q in queries:
        t = time.perf_counter()
        results.append(fn(q))
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times), results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--sizes", default="100000,1000000")
    ap.add_argument("--queries", type=int, default=50)
    ap.add_argument("--nprobe", default="8,16,32,64")
    ap.add_argument("--data", choices=["clustered", "uniform"], default="clustered")
    ap.add_argument("--spread", type=float, default=1.0, help="noise norm / centre norm")
    args = ap.parse_args()
    dim = 512
    for n in (int(s) for s in args.sizes.split(",")):
        rng = np.random.default_rng(0)
        centres = rng.standard_normal((2000, dim)).astype(np.float32) / np.sqrt(dim)
        m = synthetic(n, dim, args.data, rng, centres, args.spread)
        q = synthetic(args.queries, dim, args.data, rng, centres, args.spread)
        ids = np.arange(n, dtype=np.int64)
        index = CatalogVectors(ids, m)
        exact_ms, truth = timed(lambda v, index=index: index.search(v, 10), q)
        label = f"{args.data}, spread {args.spread}" if args.data == "clustered" else args.data
        print(f"{n:>9,} vectors ({label}): exact top-10 median {exact_ms:6.1f} ms", flush=True)
        t = time.perf_counter()
        index.ann = ann.build(ids, ids, m)
        build_s = time.perf_counter() - t
        nlist = index.ann.index.nlist
        print(f"          IVF build (nlist {nlist}, train {min(n, 64 * nlist):,}): {build_s:.1f} s")
        for nprobe in (int(p) for p in args.nprobe.split(",")):
            index.ann.nprobe = nprobe
            ms, found = timed(lambda v, index=index: index.search(v, 10), q)
            pairs = zip(found, truth, strict=True)
            recall = np.mean([len({i for i, _ in a} & {i for i, _ in b}) / 10 for a, b in pairs])
            line = f"ANN nprobe {nprobe:>3}: median {ms:6.2f} ms, recall@10 {recall:.3f}"
            print(f"          {line}", flush=True)
        del index, m


if __name__ == "__main__":
    main()
