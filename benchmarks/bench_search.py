"""Warm in-process query latency of exact search over N stored vectors (synthetic, 512-d).

python benchmarks/bench_search.py [--sizes 100000,1000000] [--queries 20]
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

from cliplens.store.vectors import VectorIndex


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--sizes", default="100000,1000000")
    ap.add_argument("--queries", type=int, default=20)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    for n in (int(s) for s in args.sizes.split(",")):
        m = rng.standard_normal((n, 512), dtype=np.float32)
        m /= np.linalg.norm(m, axis=1, keepdims=True)
        index = VectorIndex(np.arange(n, dtype=np.int64), m)
        q = rng.standard_normal((args.queries, 512), dtype=np.float32)
        q /= np.linalg.norm(q, axis=1, keepdims=True)
        index.search(q[0], 10)
        times = []
        for v in q:
            t = time.perf_counter()
            index.search(v, 10)
            times.append((time.perf_counter() - t) * 1e3)
        print(f"{n:>9,} vectors: exact top-10 median {statistics.median(times):6.1f} ms "
              f"(min {min(times):.1f}, max {max(times):.1f})", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
