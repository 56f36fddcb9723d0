"""A catalog of N synthetic embeddings for one model, to time queries over large catalogs.

python benchmarks/make_synthetic_catalog.py DB --model NAME --n 100000 --folder DIR

Rows are random unit vectors stored as the model's embeddings, under file paths in
DIR (which must exist; the files themselves do not, so query with --no-index).
"""

from __future__ import annotations

import argparse
import hashlib
import time
from pathlib import Path

import numpy as np

from cliplens.catalog.db import Catalog
from cliplens.models.ref import ModelRef


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("db", type=Path)
    ap.add_argument("--model", required=True)
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--folder", type=Path, required=True)
    args = ap.parse_args()
    t0 = time.perf_counter()
    info = ModelRef(args.model).info
    folder = args.folder.resolve()
    folder.mkdir(parents=True, exist_ok=True)
    catalog = Catalog(args.db)
    key = catalog.model_key(info.model_id, info.dim)
    rng = np.random.default_rng(0)
    for start in range(0, args.n, 50_000):
        m = min(50_000, args.n - start)
        v = rng.standard_normal((m, info.dim), dtype=np.float32)
        v /= np.linalg.norm(v, axis=1, keepdims=True)
        hashes = [hashlib.sha256(f"synthetic {start + i}".encode()).hexdigest() for i in range(m)]
        names = [str(folder / f"IMG_{start + i:07d}.jpg") for i in range(m)]
        rows = [(name, 1000, 0, h, "ok", None) for name, h in zip(names, hashes, strict=True)]
        with catalog.transaction():
            catalog.put_embeddings(key, hashes, v)
            catalog.upsert_files(rows)
    count = catalog.count_embedded(info.model_id)
    took = time.perf_counter() - t0
    print(f"{args.db}: {count:,} vectors for {info.model_id} under {folder} ({took:.1f} s)")


if __name__ == "__main__":
    main()
