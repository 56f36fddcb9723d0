"""Faults injected at random: how much survives.

    python benchmarks/bench_faults.py [--kills 5] [--photos 200] [--seed 0] [--out DIR]

1. Kills: each long job (`index`, `build-index`, `train clip`) is run once to the end for
   reference, then `--kills` times killed with SIGKILL at a seeded random moment of its
   run (uniform over the reference run's duration) and run again. A kill survived means the
   resumed run ends as the reference: for `index` the same files with the same vectors
   (rows lost or doubled are counted), for `build-index` the same neighbours, for `train
   clip` the same final weights.
2. Load while indexing: a real server answers searches from 4 client threads while `index`
   adds photos to its catalog; every answer that is not a 200 is an error.
3. Bad inputs: the robustness set of ../shared/bench/rclip/make_corpus.py --bad-dir and odd
   files (a name that is not UTF-8, a link to /etc/passwd, a FIFO and a folder named like
   photos) given to the commands that read images, one file at a time, and uploaded to the
   server's routes. Handled cleanly: exit 1 or 2 with one line and no traceback; a 4xx with
   a JSON error from the server; never a crash, a hang or a 5xx.

It prints a table, or JSON with --json. The figures are in benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "src")]

from conftest import TINY_CFG, make_photos, make_tiny_clip  # noqa: E402
from tests_helpers import live_server, write_synthetic_shards  # noqa: E402

MAKE_CORPUS = ROOT.parent / "shared" / "bench" / "rclip" / "make_corpus.py"


def cliplens(
    args: list, env: dict, check: bool = True, timeout: float = 900
) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "cliplens.cli.main", *map(str, args)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    if check and done.returncode != 0:
        raise SystemExit(f"{args[0]} failed: {done.stderr[-1000:]}")
    return done


def killed_after(args: list, env: dict, seconds: float) -> bool:
    """`cliplens ARGS` killed with SIGKILL after `seconds`; False if it ended first."""
    cmd = [sys.executable, "-m", "cliplens.cli.main", *map(str, args)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        proc.wait(seconds)
        return False
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        return True


def timed(args: list, env: dict) -> float:
    t = time.perf_counter()
    cliplens(args, env)
    return time.perf_counter() - t


# ------------------------------------------------------------ kills


def catalog_rows(db: Path) -> tuple[dict[str, bytes], int]:
    """(path -> vector bytes of every embedded file, the number of joined rows)."""
    with sqlite3.connect(db) as con:
        rows = con.execute(
            "SELECT f.path, e.vector FROM files f JOIN embeddings e ON e.hash = f.hash"
        ).fetchall()
    return dict(rows), len(rows)


def kill_index(work: Path, env: dict, photos: Path, kills: int, rng) -> dict:
    args = ["index", photos, "-b", "4", "--workers", "0", "--precision", "fp32"]
    reference = work / "index-ref.db"
    duration = timed([*args, "--db", reference], env)
    want, _ = catalog_rows(reference)
    out = {"job": "index", "tried": 0, "survived": 0, "rows_lost": 0, "rows_doubled": 0}
    for k in range(kills):
        db = work / f"index-{k}.db"
        if not killed_after([*args, "--db", db], env, rng.uniform(0.1, 1.0) * duration):
            continue  # ended before its moment: not a kill
        out["tried"] += 1
        cliplens([*args, "--db", db], env)
        got, n = catalog_rows(db)
        lost = len(set(want) - set(got))
        out["rows_lost"] += lost
        out["rows_doubled"] += n - len(got)
        out["survived"] += int(lost == 0 and n == len(got) and got == want)
    return out


def kill_build(work: Path, env: dict, kills: int, rng) -> dict:
    from cliplens.index.built import open_built_index

    shards = work / "shards"
    shards.mkdir()
    write_synthetic_shards(shards, 20_000, 64, shard=2000)
    base = ["build-index", shards, "--queries", "50", "--checkpoint-minutes", "0.002"]
    duration = timed([*base, "--out", work / "build-ref"], env)
    queries = np.random.default_rng(1).standard_normal((50, 64)).astype(np.float32)
    want = open_built_index(work / "build-ref").index.search(queries, 10)[1]
    out = {"job": "build-index", "tried": 0, "survived": 0}
    for k in range(kills):
        folder = work / f"build-{k}"
        if not killed_after([*base, "--out", folder], env, rng.uniform(0.1, 1.0) * duration):
            continue
        out["tried"] += 1
        cliplens([*base, "--out", folder], env)
        got = open_built_index(folder).index.search(queries, 10)[1]
        out["survived"] += int(np.array_equal(got, want))
    return out


def weights(folder: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    out: dict[str, np.ndarray] = {}
    for f in sorted(folder.rglob("*.safetensors")):
        out |= load_file(f)
    return out


def kill_training(work: Path, env: dict, kills: int, rng) -> dict:
    from cliplens.datasets.shapes import write_shapes

    write_shapes(work / "shapes", n=160, size=32, heldout=4)
    cfg = {**TINY_CFG, "text_cfg": {**TINY_CFG["text_cfg"], "context_length": 24}}
    (work / "tiny.json").write_text(json.dumps(cfg))
    base = ["train", "clip", "--data", work / "shapes" / "train.jsonl"]
    base += ["--model-config", work / "tiny.json", "--epochs", "4", "-b", "16", "--warmup", "2"]
    duration = timed([*base, "--out", work / "train-ref"], env)
    want = weights(work / "train-ref" / "model")
    out = {"job": "train clip", "tried": 0, "survived": 0}
    for k in range(kills):
        run = work / f"train-{k}"
        if not killed_after([*base, "--out", run], env, rng.uniform(0.1, 1.0) * duration):
            continue
        out["tried"] += 1
        cliplens([*base, "--out", run], env)
        got = weights(run / "model")
        same = sorted(got) == sorted(want) and all(
            np.allclose(got[n], want[n], atol=1e-6) for n in want
        )
        out["survived"] += int(same)
    return out


# ------------------------------------------------------------ load while indexing


def load_while_indexing(work: Path, env: dict, model: str, photos: Path) -> dict:
    import httpx

    from cliplens.catalog.db import Catalog
    from cliplens.catalog.update import update_catalog
    from cliplens.models.ref import ModelRef
    from cliplens.server import ServerSettings, create_app

    db = work / "served.db"
    first = sorted(photos.iterdir())[:8]
    with Catalog(db) as cat:
        update_catalog(cat, ModelRef(model), first, workers=0)
    settings = ServerSettings(model=model, db=db, precision="fp32")
    counts = {"requests": 0, "errors": 0}
    lock = threading.Lock()
    with live_server(create_app(settings), settings) as port:
        indexer = subprocess.Popen(
            [sys.executable, "-m", "cliplens.cli.main", "index", photos, "--db", db, "-b", "2"],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

        def client(seed: int) -> None:
            words = ["a photo", "noise", "a red square", "grey"]
            with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as c:
                i = seed
                while indexer.poll() is None:
                    r = c.get("/v1/search", params={"q": words[i % 4], "n": 5})
                    i += 1
                    with lock:
                        counts["requests"] += 1
                        counts["errors"] += int(r.status_code != 200)

        threads = [threading.Thread(target=client, args=(s,)) for s in range(4)]
        for t in threads:
            t.start()
        indexer.wait(900)
        for t in threads:
            t.join(60)
    counts["indexer_exit"] = indexer.returncode
    return counts


# ------------------------------------------------------------ bad inputs


def bad_corpus(work: Path) -> list[Path]:
    bad = work / "bad"
    corpus = [sys.executable, MAKE_CORPUS, work / "corpus", "-n", "1", "--bad-dir", bad]
    subprocess.run(corpus, check=True, capture_output=True)
    odd = bad / os.fsdecode(b"caf\xe9-latin1.jpg")
    shutil.copy(bad / "good_reference.jpg", odd)
    (bad / "passwd.jpg").symlink_to("/etc/passwd")
    os.mkfifo(bad / "fifo.jpg")
    (bad / "folder.jpg").mkdir()
    return sorted(p for p in bad.iterdir() if p.name != "good_reference.jpg")


def bad_inputs(work: Path, env: dict, model: str) -> dict:
    from fastapi.testclient import TestClient

    from cliplens.server import ServerSettings, create_app

    files = bad_corpus(work)
    commands = [
        ["index", "{f}", "--db", work / "bad.db"],
        ["classify", "{f}", "--labels", "cat,dog"],
        ["quality", "{f}", "--db", work / "bad-q.db"],
        ["moderate", "{f}"],
        ["score", "{f}", "--prompt", "a cat"],
        ["similar", "{f}", "--in", work / "bad", "--db", work / "bad-s.db"],
    ]
    out = {"cli_tried": 0, "cli_clean": 0, "http_tried": 0, "http_clean": 0, "unclean": []}
    for f in files:
        for template in commands:
            args = [f if a == "{f}" else a for a in template]
            try:
                done = cliplens(args, env, check=False, timeout=120)
            except subprocess.TimeoutExpired:
                out["unclean"].append(f"{template[0]} {f.name}: hung")
                continue
            out["cli_tried"] += 1
            # clean: exit 0, 1 or 2, no traceback, and a failure says which file and why
            named = [x for x in done.stderr.splitlines() if os.fsdecode(f.name) in x]
            clean = done.returncode in (0, 1, 2) and "Traceback" not in done.stderr
            clean = clean and (done.returncode == 0 or len(named) >= 1)
            out["cli_clean"] += int(clean)
            if not clean:
                out["unclean"].append(f"{template[0]} {f.name}: exit {done.returncode}")
    settings = ServerSettings(model=model, db=work / "bad.db", precision="fp32")
    routes = ["/v1/embed", "/v1/moderate", "/v1/quality", "/v1/search/image"]
    with TestClient(create_app(settings)) as c:
        for f in files:
            if not f.is_file() or f.is_symlink():
                continue  # not uploadable: a client sends bytes
            body = f.read_bytes()
            for route in routes:
                out["http_tried"] += 1
                field = "image" if route == "/v1/search/image" else "images"
                name = os.fsencode(f.name).decode("latin-1")  # a client sends bytes
                r = c.post(route, files=[(field, (name, body, "image/jpeg"))])
                clean = r.status_code < 500 and (
                    r.status_code == 200 or set(r.json()) == {"error", "detail"}
                )
                out["http_clean"] += int(clean)
                if not clean:
                    out["unclean"].append(f"{route} {f.name}: {r.status_code}")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--kills", type=int, default=5)
    ap.add_argument("--photos", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None, help="work folder (default: a temp one)")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--parts", default="kills,load,bad", help="which of kills, load, bad to run")
    a = ap.parse_args()
    work = a.out or Path(tempfile.mkdtemp(prefix="bench-faults-"))
    work.mkdir(parents=True, exist_ok=True)
    from cliplens.models.openclip import save_checkpoint

    model_dir = save_checkpoint(make_tiny_clip(), work / "tiny", TINY_CFG, arch="tiny-test")
    model = f"local:{model_dir}"
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(sys.path),
        "CLIPLENS_MODEL": model,
        "CLIPLENS_HOME": str(work / "home"),
    }
    os.environ["CLIPLENS_HOME"] = env["CLIPLENS_HOME"]
    photos = work / "photos"
    make_photos(photos, a.photos, size=(640, 480))
    rng = np.random.default_rng(a.seed)
    t = time.perf_counter()
    parts = set(a.parts.split(","))
    results: dict = {}
    if "kills" in parts:
        results["kills"] = [
            kill_index(work, env, photos, a.kills, rng),
            kill_build(work, env, a.kills, rng),
            kill_training(work, env, a.kills, rng),
        ]
    if "load" in parts:
        results["load"] = load_while_indexing(work, env, model, photos)
    if "bad" in parts:
        results["bad_inputs"] = bad_inputs(work, env, model)
    results["seconds"] = round(time.perf_counter() - t, 1)
    if a.json:
        print(json.dumps(results, indent=2))
        return
    for k in results.get("kills", []):
        extra = {x: k[x] for x in k if x not in ("job", "tried", "survived")}
        print(f"{k['job']:12s} kills survived {k['survived']}/{k['tried']} {extra or ''}")
    if load := results.get("load"):
        print(f"load while indexing: {load['errors']} errors in {load['requests']} searches")
    if bad := results.get("bad_inputs"):
        cli = f"CLI {bad['cli_clean']}/{bad['cli_tried']} clean"
        print(f"bad inputs: {cli}, HTTP {bad['http_clean']}/{bad['http_tried']} clean")
        for line in bad["unclean"]:
            print(f"  not clean: {line}")
    print(f"{results['seconds']} s")


if __name__ == "__main__":
    main()
