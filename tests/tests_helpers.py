"""Helpers shared by test modules."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from cliplens.cli.main import main


def run_json(capsys, argv: list[str]):
    """Run the CLI in-process; it must succeed; returns its JSON output."""
    code = main(argv)
    captured = capsys.readouterr()
    assert code == 0, captured.err
    return json.loads(captured.out)


def run_cli(capsys, *args) -> tuple[int, str, str]:
    """`cliplens ARGS` in this process: (exit code, stdout, stderr)."""
    code = main([str(a) for a in args])
    out = capsys.readouterr()
    return code, out.out, out.err


def cli_json(capsys, *args):
    """`run_json` with the arguments as they come (paths included)."""
    return run_json(capsys, [str(a) for a in args])


def texts_from_threads(encoder, texts: list[str], threads: int = 6, rounds: int = 15) -> None:
    """Batches and token counts (which tokenize with other padding) from several threads
    at once: each must get what it gets alone."""
    import threading

    import numpy as np

    want, counts = encoder.encode_texts(texts), encoder.token_counts(texts)
    failures: list[str] = []

    def work(k: int) -> None:
        for _ in range(rounds):
            try:
                if k % 2:
                    assert encoder.token_counts(texts) == counts
                else:
                    np.testing.assert_allclose(encoder.encode_texts(texts), want, atol=1e-5)
            except Exception as e:  # any failure, reported below
                failures.append(f"{type(e).__name__}: {e}")

    started = [threading.Thread(target=work, args=(k,)) for k in range(threads)]
    for t in started:
        t.start()
    for t in started:
        t.join()
    assert not failures, failures[:3]


def built_index_from_catalog(folder: Path, catalog_db: Path, model: str, path_of=str) -> Path:
    """A flat build-index folder over the catalog's own vectors, with each photo's path
    rewritten by `path_of` (a local path, or an object-store URI)."""
    from cliplens.catalog.db import Catalog
    from cliplens.distributed.embed import _write_shard, shard_name
    from cliplens.distributed.manifest import ShardCounts, ShardManifest, save_manifest
    from cliplens.index.build import build_index
    from cliplens.models.ref import ModelRef

    model_id = ModelRef(model).info.model_id
    with Catalog(catalog_db) as cat:
        ids, _, matrix = cat.vectors(model_id)
        paths = cat.paths(ids.tolist())
    rows = [
        {"path": path_of(paths[i]), "size": 1, "sha256": "x", "error": "", "embedding": v}
        for i, v in zip(ids.tolist(), matrix, strict=True)
    ]
    shards = folder / "shards"
    shards.mkdir(parents=True)
    ok, bad = _write_shard(shards, shard_name(0), rows, model_id, "float32")
    done = {shard_name(0): ShardCounts(rows=ok, failures=bad)}
    manifest = ShardManifest(model_id, matrix.shape[1], model=model, shards=done)
    save_manifest(shards, manifest)
    build_index(shards, folder / "index", "flat", queries=3)
    return folder / "index"


def write_synthetic_shards(folder, n, dim, clusters=50, shard=2000, seed=0):
    """Clustered unit vectors in the embed-dataset layout."""
    import numpy as np

    from cliplens.distributed.embed import _write_shard, shard_name
    from cliplens.distributed.manifest import ShardManifest, save_manifest

    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, dim)).astype(np.float32)
    manifest = {"version": 1, "model_id": "synthetic", "dim": dim, "shards": {}}
    all_v = []
    for i, start in enumerate(range(0, n, shard)):
        m = min(shard, n - start)
        v = centres[rng.integers(0, clusters, m)] + 0.5 * rng.standard_normal((m, dim))
        v = (v / np.linalg.norm(v, axis=1, keepdims=True)).astype(np.float32)
        paths = [f"/photos/{start + j:07d}.jpg" for j in range(m)]
        rows = [
            {"path": p, "size": 1, "sha256": "x", "error": "", "embedding": e}
            for p, e in zip(paths, v, strict=True)
        ]
        ok, bad = _write_shard(folder, shard_name(i), rows, "synthetic", "float32")
        manifest["shards"][shard_name(i)] = {"rows": ok, "failures": bad}
        all_v.append(v)
    save_manifest(folder, ShardManifest.from_dict(manifest))
    return np.concatenate(all_v)


@contextmanager
def live_server(app, settings) -> Iterator[int]:
    """`app` on a real uvicorn server on 127.0.0.1, as `serve` runs it; yields its port."""
    import threading
    import time

    import uvicorn

    from cliplens.server.listen import bind, uvicorn_config

    server = uvicorn.Server(uvicorn_config(app, settings))
    sock = bind("127.0.0.1", 0)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    for _ in range(200):
        if server.started:
            break
        time.sleep(0.05)
    assert server.started
    try:
        yield sock.getsockname()[1]
    finally:
        server.should_exit = True
        thread.join(10)


def job_with(whole: Path, shards: Path, first: list[str]) -> None:
    """The embed-dataset folder `shards` as it stood when the job `whole` had written only
    the shards `first`."""
    manifest = json.loads((whole / "manifest.json").read_text())
    for name in first:
        for part in (f"{name}.parquet", f"{name}.failures.parquet"):
            shutil.copy(whole / part, shards / part)
    done = {n: manifest["shards"][n] for n in first}
    (shards / "manifest.json").write_text(json.dumps({**manifest, "shards": done}))


CHROMIUM = os.environ.get("CLIPLENS_CHROMIUM", "/usr/bin/chromium")


def launch_chromium(playwright):
    """Headless Chromium (Debian's, or CLIPLENS_CHROMIUM) through Playwright."""
    path = shutil.which("chromium") or CHROMIUM
    return playwright.chromium.launch(executable_path=path, args=["--no-sandbox"])


def watched_page(browser, height: int = 900):
    """A new 1280-wide page of `browser`, and the list its script errors go to."""
    page = browser.new_page(viewport={"width": 1280, "height": height})
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    return page, errors


def browser_or_skip() -> None:
    """Skip (a failure under CLIPLENS_NO_SKIPS=1) where Chromium or Playwright is missing."""
    missing = []
    if not Path(CHROMIUM).exists() and not shutil.which("chromium"):
        missing.append(f"no Chromium at {CHROMIUM} (apt-get install chromium)")
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        missing.append("no playwright package (pip install playwright)")
    if missing:
        pytest.skip("; ".join(missing))


def calm_policy(folder: Path) -> Path:
    """A moderation policy that flags none of the demo photos under any model. The default
    one was set for ViT-B/32 and flags 5 of the 7 under the offline model, which clients
    that ask for moderation by default (clip-retrieval's) would then never see."""
    path = folder / "calm-policy.yaml"
    concepts = "\n".join(
        f"  {name}:\n    - text: {text}\n      threshold: 0.99"
        for name, text in [("sexual", "a sexually explicit photo"), ("violence", "a fight")]
    )
    path.write_text(f"name: calm\ncategories:\n{concepts}\n")
    return path


def make_video(
    path: Path,
    segments: list[tuple[object, float]],
    fps: int = 10,
    size: tuple[int, int] = (320, 240),
    codec: str | None = None,
    rotation: int | None = None,
    noise: int = 4,
) -> Path:
    """A real video of still shots: each segment is (an RGB image as an array or PIL
    image, seconds), with a little sensor noise per frame. H.264 in .mp4/.mov/.mkv (the
    index at the front, as phones write it), VP9 in .webm, MPEG-4 part 2 in .avi."""
    import av
    import numpy as np
    from PIL import Image

    suffix = path.suffix.lower()
    codec = codec or {".webm": "libvpx-vp9", ".avi": "mpeg4"}.get(suffix, "libx264")
    options = {"movflags": "+faststart"} if suffix in (".mp4", ".mov", ".m4v") else {}
    rng = np.random.default_rng(0)
    with av.open(str(path), "w", options=options) as out:
        stream = out.add_stream(codec, rate=fps)
        stream.width, stream.height = size
        stream.pix_fmt = "yuv420p"
        if rotation is not None:
            stream.set_display_rotation(rotation)
        for image, seconds in segments:
            picture = image if isinstance(image, Image.Image) else Image.fromarray(image)
            base = np.asarray(picture.convert("RGB").resize(size), np.int16)
            for _ in range(round(seconds * fps)):
                shaken = base + rng.integers(-noise, noise + 1, base.shape)
                frame = av.VideoFrame.from_ndarray(np.clip(shaken, 0, 255).astype(np.uint8))
                out.mux(stream.encode(frame))
        out.mux(stream.encode())
    return path
