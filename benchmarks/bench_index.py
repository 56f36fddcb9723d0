"""faiss indexes at scale on this machine: N synthetic clustered 512-d unit vectors, built with
`cliplens.index.build` exactly as `cliplens build-index` builds over shards, but
generated on the fly (10M float16 vectors would take 10 GB of disk as shards).

    python benchmarks/bench_index.py [--n 10000000] [--dim 512] [--clusters 20000]
        [--refine sq8] [--out /tmp/bench-index]

Reports train and add time, the index file size, the process's peak RSS, and recall@10 and
ms per query (one query at a time, 200 held-out queries against exact search) for several
nprobe values; writes OUT/results.json. At 10M the index in OUT is about 6 GB and the run
needs about 9 GB of RAM and 25 minutes on 2 cores: delete OUT afterwards.
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from pathlib import Path

import numpy as np

from cliplens.index.build import VectorSource, build_faiss_index, measure, plan_index

CHUNK = 200_000


def synthetic(n: int, dim: int, clusters: int, seed: int = 0) -> VectorSource:
    """Clustered unit vectors (cluster centre + noise), the same on every pass."""
    centres = np.random.default_rng(seed).standard_normal((clusters, dim)).astype(np.float32)

    def chunks():
        for c, start in enumerate(range(0, n, CHUNK)):
            rng = np.random.default_rng((seed, c))
            m = min(CHUNK, n - start)
            v = centres[rng.integers(0, clusters, m)]
            v = v + 0.6 * rng.standard_normal((m, dim), dtype=np.float32)
            yield v / np.linalg.norm(v, axis=1, keepdims=True)

    return VectorSource(n, dim, chunks)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=10_000_000)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--clusters", type=int, default=20_000)
    ap.add_argument("--refine", default="sq8")
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--out", type=Path, default=Path("/tmp/bench-index"))
    args = ap.parse_args()
    source = synthetic(args.n, args.dim, args.clusters)
    plan = plan_index(args.n, args.dim, "ivfpq", args.refine)
    print(f"plan: {plan}", flush=True)
    t = time.perf_counter()
    built = build_faiss_index(
        source, args.out, "ivfpq", args.refine, args.queries, plan=plan, progress=True
    )
    report, index, (q, truth) = built
    times = f"train {report.train_s:.0f} s, add {report.add_s:.0f} s"
    quality = f"recall@10 {report.recall_at_10:.3f} at {report.query_ms:.2f} ms"
    size = f"{report.index_bytes / 1e9:.2f} GB"
    elapsed = time.perf_counter() - t
    print(
        f"built in {elapsed:.0f} s: {times}, {size}; {quality} (nprobe {plan.nprobe})", flush=True
    )
    import faiss

    ivf = faiss.extract_index_ivf(index)
    sweep = []
    for nprobe in (16, 32, 64, 128, 256):
        ivf.nprobe = nprobe
        recall, ms = measure(index, q, truth)
        sweep.append({"nprobe": nprobe, "recall_at_10": round(recall, 3), "ms": round(ms, 2)})
        print(f"  nprobe {nprobe}: recall@10 {recall:.3f}, {ms:.2f} ms/query", flush=True)
    if args.refine != "none":  # the same codes without the refine stage
        base = faiss.downcast_index(index.base_index)
        for nprobe in (64, 256):
            base.nprobe = nprobe
            recall, ms = measure(base, q, truth)
            point = {"nprobe": nprobe, "refine": "none", "recall_at_10": round(recall, 3)}
            sweep.append({**point, "ms": round(ms, 2)})
            print(f"  PQ only, nprobe {nprobe}: recall@10 {recall:.3f}, {ms:.2f} ms", flush=True)
    peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
    measured = {"peak_rss_gb": round(peak_gb, 2), "sweep": sweep, "clusters": args.clusters}
    result = {**report.to_dict(), **measured}
    print(json.dumps(result, indent=1))
    (args.out / "results.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
