"""The cost of the engine: `cliplens embed-dataset` on a local Ray instance against the
single-process pipeline (`cliplens index`) on the same photos, same model and precision.

    python benchmarks/bench_ray.py PHOTOS_DIR [--model offline] [--shard-size 250]
        [--work /tmp/bench-ray]

Prints images/s for both (the Ray figure with and without starting Ray), and the largest
difference between the two sets of embeddings; writes WORK/results.json.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("photos", type=Path)
    ap.add_argument("--model", default="offline")
    ap.add_argument("--precision", default=None)
    ap.add_argument("--shard-size", type=int, default=250)
    ap.add_argument("--work", type=Path, default=Path("/tmp/bench-ray"))
    args = ap.parse_args()
    shutil.rmtree(args.work, ignore_errors=True)
    args.work.mkdir(parents=True)

    import ray

    from cliplens.catalog.db import Catalog
    from cliplens.catalog.update import update_catalog
    from cliplens.distributed.embed import EmbedJob, embed_dataset, iter_shards, shard_vectors
    from cliplens.models.ref import ModelRef

    ref = ModelRef(args.model, precision=args.precision)
    ref.load()  # both runs start with the weights on disk cached and torch imported
    t = time.perf_counter()
    with Catalog(args.work / "single.db") as cat:
        stats = update_catalog(cat, ref, [args.photos])
        single_s = time.perf_counter() - t
        ids, _, matrix = cat.vectors(ref.info.model_id)
        single = dict(zip(cat.paths(ids.tolist()).values(), matrix.astype(np.float32), strict=True))
    print(
        f"single process: {stats.encoded} images in {single_s:.1f} s "
        f"({stats.encoded / single_s:.1f} img/s)",
        flush=True,
    )

    t = time.perf_counter()
    ray.init(include_dashboard=False, log_to_driver=False)
    start_s = time.perf_counter() - t
    t = time.perf_counter()
    job = EmbedJob(
        sources=(str(args.photos),),
        out=args.work / "shards",
        model=args.model,
        shard_size=args.shard_size,
        precision=args.precision,
    )
    report = embed_dataset(job)
    ray_s = time.perf_counter() - t
    cpus = ray.cluster_resources().get("CPU")
    ray.shutdown()
    print(
        f"Ray: {report.rows} images in {ray_s:.1f} s ({report.rows / ray_s:.1f} img/s), "
        f"plus {start_s:.1f} s to start Ray",
        flush=True,
    )

    diffs = []
    for _, table in iter_shards(args.work / "shards"):
        for path, v in zip(table.column("path").to_pylist(), shard_vectors(table), strict=True):
            diffs.append(float(np.abs(v - single[path]).max()))
    result = {
        "photos": str(args.photos),
        "model": ref.info.model_id,
        "images": report.rows,
        "failures": report.failures,
        "single_s": round(single_s, 2),
        "single_img_s": round(stats.encoded / single_s, 2),
        "ray_s": round(ray_s, 2),
        "ray_img_s": round(report.rows / ray_s, 2),
        "ray_start_s": round(start_s, 2),
        "compared": len(diffs),
        "max_abs_diff": max(diffs) if diffs else None,
        "ray_cpus": cpus,
    }
    print(json.dumps(result, indent=1))
    (args.work / "results.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
