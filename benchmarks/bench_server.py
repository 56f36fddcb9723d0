"""A bounded load test of `cliplens serve` on loopback: concurrent clients send text queries
to GET /v1/search over a catalog of synthetic vectors, for a fixed time.

    python benchmarks/bench_server.py [--n 100000] [--clients 20] [--seconds 30]
        [--model offline] [--work /tmp/bench-server] [--built-index]

Builds the catalog with make_synthetic_catalog.py (once), or with --built-index a
`build-index` folder (IVF-PQ with SQ8 refine, as `cliplens build-index` sizes it) over N
synthetic clustered vectors of the model's dimension (once: 1 minute at 1M, 20 at 10M
on 2 cores), and serves that with `serve --index`. It starts the server as its own process,
warms it with one query, then runs the clients (asyncio + httpx, one process).
Prints requests/s, latency p50/p90/p99, errors (any non-200), and the server's RSS before
and after, and its private memory after (RSS without file pages such as a memory-mapped
index); writes them to WORK/results.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np

HERE = Path(__file__).resolve().parent
QUERIES = [
    "a cat on a sofa",
    "sunset over the sea",
    "a red car",
    "people at a party",
    "snowy mountains",
    "a bowl of soup",
    "a dog running on the beach",
    "city lights at night",
    "a birthday cake",
    "an old castle",
    "2:a forest + river - people",
    "a page of text",
    "a bicycle",
    "fireworks",
    "a cup of coffee",
    "children playing football",
    "a rocket launch",
    "a bird on a branch",
]


def rss_mb(pid: int, field: str = "VmRSS") -> float:
    """Resident memory; field "RssAnon" leaves out file pages (a memory-mapped index, which
    the kernel can drop and other processes share)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def load(base: str, clients: int, seconds: float) -> tuple[list[float], dict[str, int]]:
    latencies: list[float] = []
    errors: dict[str, int] = {}
    stop = time.perf_counter() + seconds

    async def client(k: int, http: httpx.AsyncClient) -> None:
        i = k
        while time.perf_counter() < stop:
            q = QUERIES[i % len(QUERIES)]
            i += clients
            t = time.perf_counter()
            try:
                r = await http.get("/v1/search", params={"q": q, "n": 20})
                ok = r.status_code == 200 and len(r.json()["results"]) == 20
                key = None if ok else f"status {r.status_code}"
            except httpx.HTTPError as e:
                key = type(e).__name__
            latencies.append(time.perf_counter() - t)
            if key:
                errors[key] = errors.get(key, 0) + 1

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=base, timeout=60, limits=limits) as http:
        await asyncio.gather(*(client(k, http) for k in range(clients)))
    return latencies, errors


def built_index(work: Path, n: int, model: str) -> Path:
    """A build-index folder over n synthetic vectors, labelled with `model` so that the
    server accepts its text queries (the vectors are not that model's: only speed and
    memory mean anything here)."""
    from bench_index import synthetic
    from cliplens.index.build import build_faiss_index, plan_index, write_index_folder
    from cliplens.index.built import IndexMeta
    from cliplens.models.ref import ModelRef

    folder = work / f"index-{n}"
    if (folder / "index.json").exists():
        return folder
    info = ModelRef(model).info
    source = synthetic(n, info.dim, clusters=max(100, n // 500))
    plan = plan_index(n, info.dim, "ivfpq", "sq8")
    report, _, _ = build_faiss_index(source, folder, plan=plan, queries=100, progress=True)
    print(f"built: {report.to_dict()}", flush=True)
    starts = range(0, n, 100_000)
    paths = ([f"/synthetic/{i:08d}.jpg" for i in range(s, min(n, s + 100_000))] for s in starts)
    meta = IndexMeta(info.model_id, report, model=model, synthetic=True)
    write_index_folder(folder, paths, meta)
    return folder


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--clients", type=int, default=20)
    ap.add_argument("--seconds", type=float, default=30)
    ap.add_argument("--model", default="offline")
    ap.add_argument("--work", type=Path, default=Path("/tmp/bench-server"))
    ap.add_argument(
        "--built-index",
        action="store_true",
        help="Serve a build-index folder (IVF-PQ) instead of a catalog.",
    )
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    if args.built_index:
        what = ["--index", str(built_index(args.work, args.n, args.model))]
    else:
        db = args.work / f"catalog-{args.n}.db"
        if not db.exists():
            make = [sys.executable, str(HERE / "make_synthetic_catalog.py"), str(db)]
            options = ["--model", args.model, "--n", str(args.n)]
            subprocess.run([*make, *options, "--folder", str(args.work / "photos")], check=True)
        what = ["--db", str(db)]
    port = free_port()
    serve = [sys.executable, "-m", "cliplens.cli.main", "serve", *what]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    server = subprocess.Popen([*serve, "--model", args.model, "--port", str(port)], env=env)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(base + "/v1/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline or server.poll() is not None:
                raise SystemExit("the server did not start")
            time.sleep(0.2)
        rss_idle = rss_mb(server.pid)
        t = time.perf_counter()
        first = httpx.get(base + "/v1/search", params={"q": "a cat", "n": 20}, timeout=300)
        first.raise_for_status()
        warm_s = time.perf_counter() - t
        rss_before = rss_mb(server.pid)
        latencies, errors = asyncio.run(load(base, args.clients, args.seconds))
        rss_after = rss_mb(server.pid)
        anon_after = rss_mb(server.pid, "RssAnon")
    finally:
        server.terminate()
        server.wait(30)
    lat = np.array(latencies) * 1000
    result = {
        "vectors": args.n,
        "searches": "index (IVF-PQ + SQ8)" if args.built_index else "catalog",
        "model": args.model,
        "clients": args.clients,
        "seconds": args.seconds,
        "requests": len(lat),
        "requests_per_s": round(len(lat) / args.seconds, 1),
        "p50_ms": round(float(np.percentile(lat, 50)), 1),
        "p90_ms": round(float(np.percentile(lat, 90)), 1),
        "p99_ms": round(float(np.percentile(lat, 99)), 1),
        "max_ms": round(float(lat.max()), 1),
        "errors": sum(errors.values()),
        "error_kinds": errors,
        "first_query_s": round(warm_s, 2),
        "rss_idle_mb": round(rss_idle),
        "rss_before_mb": round(rss_before),
        "rss_after_mb": round(rss_after),
        "private_after_mb": round(anon_after),
    }
    print(json.dumps(result, indent=1))
    (args.work / "results.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
