"""Embed a large image collection on Ray: Parquet shards and a manifest, resumable.

The job lists images under local folders or object-store URIs (fsspec: file://, s3://,
gs://...), sorts them, and cuts the files that no finished shard holds into shards of
`shard_size` files. Ray Data then
streams every pending file through CPU tasks that read, hash and decode it to the model's
crop (the same `decode` code as `cliplens index`), and through a pool of actors that each
hold one cliplens Encoder (a GPU each when there are GPUs, CPUs otherwise). Rows come back
in order; each shard is written to OUT/part-NNNNN.parquet when its last row arrives, then
recorded in OUT/manifest.json, both by atomic rename. A killed job loses at most the shard
in flight: run it again and finished shards are skipped. Files that cannot be read are
listed in part-NNNNN.failures.parquet, never fatal.

Ray is imported only when a job runs.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable, Collection, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cliplens.errors import DependencyMissingError, ImageError, InvalidInputError
from cliplens.paths import from_text, to_text
from cliplens.store.files import write_atomic

MANIFEST = "manifest.json"
VERSION = 1


@dataclass(frozen=True)
class EmbedJob:
    sources: tuple[str, ...]
    out: Path
    model: str = "offline"
    shard_size: int = 10_000
    batch_size: int = 64  # images per encoder call
    actors: int = 1  # encoder actors (one GPU each when GPUs are present)
    dtype: str = "float16"  # of the stored embeddings: float16 or float32
    address: str | None = None  # an existing Ray cluster; None starts a local one
    num_cpus: int | None = None  # for a local Ray instance
    precision: str | None = None
    max_megapixels: float | None = None
    max_shards: int | None = None  # stop after writing this many shards (this run)
    add_new: bool = False  # the sources gained files: embed those into new shards

    def __post_init__(self) -> None:
        from cliplens.limits import finite_number

        if self.shard_size < 1 or self.batch_size < 1 or self.actors < 1:
            raise InvalidInputError("--shard-size, --batch-size and --actors must be at least 1")
        if self.dtype not in ("float16", "float32"):
            raise InvalidInputError(f"--dtype {self.dtype}: use float16 or float32")
        if (self.num_cpus is not None and self.num_cpus < 1) or (
            self.max_shards is not None and self.max_shards < 1
        ):
            raise InvalidInputError(
                f"CPUs {self.num_cpus} and shards {self.max_shards}: use at least 1 (or leave out)"
            )
        if self.max_megapixels is not None:
            finite_number(self.max_megapixels, "max megapixels", 0, low_open=True)
        if not self.sources:
            raise InvalidInputError("no sources: give image folders, files or URIs")


@dataclass
class EmbedReport:
    files: int
    shards: int
    written: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    rows: int = 0
    failures: int = 0
    gone: int = 0  # files in finished shards that the sources no longer list
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ------------------------------------------------------------------ listing


def list_images(sources: tuple[str, ...] | list[str]) -> list[str]:
    """Image files under each source, as local absolute paths or protocol URIs, sorted."""
    import fsspec

    from cliplens.images import IMAGE_EXTENSIONS, iter_image_files

    found: set[str] = set()
    local_roots: list[Path] = []
    for source in sources:
        fs, root = fsspec.core.url_to_fs(source)
        local = "file" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,))
        if local:
            path = Path(root)
            if not path.exists():
                raise InvalidInputError(f"source {source}: no such file or folder")
            local_roots.append(path.resolve())
            continue
        if not fs.exists(root):
            raise InvalidInputError(f"source {source}: nothing there (check the URI)")
        names = [root] if fs.isfile(root) else fs.find(root)
        found.update(fs.unstrip_protocol(n) for n in names
                     if Path(n).suffix.lower() in IMAGE_EXTENSIONS)  # fmt: skip
    # one walk over the local roots, each file once across them, under a name reached
    # without a link where there is one (the server never serves a link); the roots
    # resolved, the files as found; names that are not UTF-8 kept as cliplens.paths text
    found.update(to_text(str(p)) for p in iter_image_files(local_roots))
    if not found:
        raise InvalidInputError(f"no image files under {', '.join(sources)}")
    return sorted(found)


def shard_name(i: int) -> str:
    return f"part-{i:05d}"


def list_hash(files: list[str]) -> str:
    return hashlib.sha256("\n".join(files).encode()).hexdigest()


# ------------------------------------------------------------------ manifest


def require_manifest(out: Path) -> dict[str, Any]:
    """The manifest of a job folder; a clear error when `out` is not one."""
    manifest = read_manifest(out)
    if manifest is None:
        raise InvalidInputError(f"{out}: no {MANIFEST}; give the --out folder of embed-dataset")
    return manifest


def read_manifest(out: Path) -> dict[str, Any] | None:
    try:
        return json.loads((out / MANIFEST).read_text())
    except FileNotFoundError:
        return None
    except ValueError as e:
        raise InvalidInputError(f"{out / MANIFEST}: not a manifest ({e}); use a new --out") from e


def _save_manifest(out: Path, manifest: dict[str, Any]) -> None:
    write_atomic(out / MANIFEST, lambda p: p.write_text(json.dumps(manifest, indent=1)))


# ------------------------------------------------------------------ Ray stages


def _decode_batch(batch: dict[str, np.ndarray], prep: Any, max_megapixels: float | None):
    """CPU task: read, hash and decode each file to the model's uint8 crop."""
    n = len(batch["path"])
    crops = np.zeros((n, prep.image_size, prep.image_size, 3), np.uint8)
    sizes = np.zeros(n, np.int64)
    hashes, errors = [], []
    for i, path in enumerate(batch["path"]):
        size, digest, crop, error = _decode_one(str(path), prep, max_megapixels)
        sizes[i] = size
        hashes.append(digest)
        errors.append(error)
        if crop is not None:
            crops[i] = crop
    return {"path": batch["path"], "shard": batch["shard"], "size": sizes,
            "sha256": np.array(hashes, dtype=object), "crop": crops,
            "error": np.array(errors, dtype=object)}  # fmt: skip


def _decode_one(path: str, prep: Any, max_megapixels: float | None):
    """(size, sha256, crop or None, error or ""): decoded exactly as `cliplens index` does,
    from the file itself when it is local, else from a temporary copy of its bytes."""
    import fsspec

    from cliplens.images import is_remote, open_image, open_image_bytes

    path = path if is_remote(path) else from_text(path)  # the listing's text: the real name
    try:
        with fsspec.open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        return 0, "", None, f"cannot read: {e.strerror or e}"
    digest = hashlib.sha256(data).hexdigest()
    try:
        if is_remote(path):
            image = open_image_bytes(data, path, min_size=prep.resize_size,
                                     max_megapixels=max_megapixels)  # fmt: skip
        else:
            image = open_image(path, min_size=prep.resize_size, max_megapixels=max_megapixels)
        return len(data), digest, prep.crop(image), ""
    except ImageError as e:
        return len(data), digest, None, e.reason


class _EncodeActor:
    """Holds one Encoder; embeds the batch's decoded crops."""

    def __init__(self, model: str, precision: str | None) -> None:
        import torch

        from cliplens.models.registry import load_model

        device = "cuda" if torch.cuda.is_available() else "cpu"
        if device == "cpu":  # Ray caps threads at the actor's 1 CPU; use the node's cores
            torch.set_num_threads(os.cpu_count() or 1)
        self.encoder = load_model(model, device=device, precision=precision)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ok = np.array([e == "" for e in batch["error"]], bool)
        dim = self.encoder.info.dim
        emb = np.zeros((len(ok), dim), np.float32)
        if ok.any():
            emb[ok] = self.encoder.encode_crops(batch["crop"][ok])
        out = {k: v for k, v in batch.items() if k != "crop"}
        out["embedding"] = emb
        return out


# ------------------------------------------------------------------ the job


def run_embed_job(
    job: EmbedJob,
    progress: bool = False,
    on_shard: Callable[[str, int, int], None] | None = None,
) -> EmbedReport:
    """Run (or resume) the job; `on_shard(name, rows, failures)` after each shard. With
    `progress`, a bar over the files of the pending shards."""
    try:
        import pyarrow  # noqa: F401
        import ray
    except ImportError as e:
        raise DependencyMissingError(
            f"embed-dataset needs Ray Data ({e}); pip install 'cliplens[distributed]'"
        ) from e
    from cliplens.models.ref import ModelRef

    t0 = time.perf_counter()
    out = Path(job.out)
    out.mkdir(parents=True, exist_ok=True)
    files = list_images(job.sources)
    info = ModelRef(job.model, precision=job.precision).info
    settings = {"version": VERSION, "model": job.model, "model_id": info.model_id,
                "dim": info.dim, "dtype": job.dtype, "shard_size": job.shard_size,
                "files": len(files), "list_hash": list_hash(files)}  # fmt: skip
    manifest = read_manifest(out)
    if manifest is None:
        manifest = {**settings, "sources": list(job.sources), "shards": {}}
    else:
        changed = [k for k, v in settings.items() if manifest.get(k) != v]
        listing_only = set(changed) <= {"files", "list_hash"}
        if changed and not (listing_only and job.add_new):
            raise InvalidInputError(
                f"{out} holds a job over other files; pass --add-new to embed the files not "
                "yet in its shards into new shards, or use a new --out"
                if listing_only else
                f"{out} holds a job with other {', '.join(changed)} (the model or sharding "
                "changed); resume it with the same settings or use a new --out"
            )  # fmt: skip
        if changed:  # the listing grew (or shrank): the manifest follows it from now on
            manifest.update(files=len(files), list_hash=settings["list_hash"],
                            sources=list(job.sources), grown=True)  # fmt: skip
            _save_manifest(out, manifest)
    # finished shards never change; every file not in one is planned into new shards after
    # them (for a resumed job, the same shards as before: finished shards are a prefix)
    done = {name for name in manifest["shards"] if (out / f"{name}.parquet").exists()}
    for name in set(manifest["shards"]) - done:  # a shard file deleted: its files are redone
        del manifest["shards"][name]
    first = max((int(name.split("-")[1]) + 1 for name in done), default=0)
    if not manifest.get("grown") and done == {shard_name(i) for i in range(first)}:
        known: set[str] = set()  # one listing, its first shards done: the rest is to do
        todo = files[first * job.shard_size :]
    else:  # which files the shards hold must be read
        known = _paths_in(out, done)
        todo = [f for f in files if f not in known]
    pending = [(first + j, todo[i : i + job.shard_size])
               for j, i in enumerate(range(0, len(todo), job.shard_size))]  # fmt: skip
    report = EmbedReport(files=len(files), shards=len(done) + len(pending))
    report.skipped = sorted(done)
    report.gone = len(known.difference(files))
    if job.max_shards is not None:
        pending = pending[: job.max_shards]
    if not pending:
        report.seconds = time.perf_counter() - t0
        return report

    if not ray.is_initialized():
        ray.init(address=job.address, num_cpus=job.num_cpus if job.address is None else None,
                 include_dashboard=False, log_to_driver=False)  # fmt: skip
    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True  # shards complete one after another
    ctx.enable_progress_bars = False
    items = [{"path": p, "shard": i} for i, s in pending for p in s]
    gpus = 1 if ray.cluster_resources().get("GPU", 0) >= 1 else 0
    ds = ray.data.from_items(items)
    # decoding gets its own tasks (half a CPU each, so a node keeps decoding while its CPUs
    # also serve an encoder); equal resources would let Ray fuse it into the actors,
    # which then decode one file at a time between encoder calls
    ds = ds.map_batches(_decode_batch, batch_size=16, batch_format="numpy", num_cpus=0.5,
                        fn_kwargs={"prep": info.preprocessing,
                                   "max_megapixels": job.max_megapixels})  # fmt: skip
    ds = ds.map_batches(_EncodeActor, batch_size=job.batch_size, batch_format="numpy",
                        compute=ray.data.ActorPoolStrategy(size=job.actors), num_gpus=gpus,
                        fn_constructor_kwargs={"model": job.model,
                                               "precision": job.precision})  # fmt: skip
    sizes = {i: len(s) for i, s in pending}
    rows: dict[int, list[dict[str, Any]]] = {i: [] for i, _ in pending}
    from cliplens.progress import progress_bar

    with progress_bar(len(items), "embedding", progress) as advance:
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
            _collect(batch, rows, sizes, out, info.model_id, job.dtype, manifest, report,
                     on_shard)  # fmt: skip
            advance(len(batch["path"]), f"{len(report.written)} shards written")
    report.seconds = time.perf_counter() - t0
    return report


def _paths_in(out: Path, shards: set[str]) -> set[str]:
    """The files that finished shards hold, embedded or failed."""
    import pyarrow.parquet as pq

    known: set[str] = set()
    for name in shards:
        for part in (f"{name}.parquet", f"{name}.failures.parquet"):
            if (out / part).exists():
                known.update(pq.read_table(out / part, columns=["path"])["path"].to_pylist())
    return known


def _collect(batch, rows, sizes, out, model_id, dtype, manifest, report, on_shard) -> None:
    """Add a batch's rows to their shards; write each shard whose last row arrived."""
    for k in range(len(batch["path"])):
        i = int(batch["shard"][k])
        rows[i].append({key: batch[key][k] for key in
                        ("path", "size", "sha256", "error", "embedding")})  # fmt: skip
        if len(rows[i]) == sizes[i]:
            name = shard_name(i)
            n_ok, n_bad = _write_shard(out, name, rows.pop(i), model_id, dtype)
            manifest["shards"][name] = {"rows": n_ok, "failures": n_bad}
            _save_manifest(out, manifest)
            report.written.append(name)
            report.rows += n_ok
            report.failures += n_bad
            if on_shard:
                on_shard(name, n_ok, n_bad)


def _write_shard(out: Path, name: str, rows: list[dict[str, Any]], model_id: str, dtype: str):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows.sort(key=lambda r: str(r["path"]))
    good = [r for r in rows if not r["error"]]
    bad = [r for r in rows if r["error"]]
    dim = len(rows[0]["embedding"])
    flat = np.asarray([r["embedding"] for r in good], np.float32).reshape(-1).astype(dtype)
    table = pa.table({
        "path": pa.array([str(r["path"]) for r in good], pa.string()),
        "size": pa.array([int(r["size"]) for r in good], pa.int64()),
        "sha256": pa.array([str(r["sha256"]) for r in good], pa.string()),
        "model_id": pa.array([model_id] * len(good), pa.string()),
        "embedding": pa.FixedSizeListArray.from_arrays(pa.array(flat), dim),
    })  # fmt: skip
    failures = pa.table({
        "path": pa.array([str(r["path"]) for r in bad], pa.string()),
        "error": pa.array([str(r["error"]) for r in bad], pa.string()),
    })  # fmt: skip
    write_atomic(out / f"{name}.failures.parquet", lambda p: pq.write_table(failures, p))
    write_atomic(out / f"{name}.parquet", lambda p: pq.write_table(table, p))
    return len(good), len(bad)


# ------------------------------------------------------------------ reading shards


def iter_shards(
    folder: str | os.PathLike, names: Collection[str] | None = None,
    columns: list[str] | None = None,
) -> Iterator[tuple[str, Any]]:  # fmt: skip
    """(name, pyarrow table) for each finished shard of a job folder (or those in `names`),
    in order; only `columns` are read when given."""
    import pyarrow.parquet as pq

    out = Path(folder)
    for name in sorted(require_manifest(out)["shards"]):
        if names is None or name in names:
            yield name, pq.read_table(out / f"{name}.parquet", columns=columns)


def shard_vectors(table: Any) -> np.ndarray:
    """The (N, D) float32 embeddings of a shard table."""
    column = table.column("embedding").combine_chunks()
    dim = column.type.list_size
    return column.values.to_numpy(zero_copy_only=False).astype(np.float32).reshape(-1, dim)


def import_shards(folder: str | os.PathLike, catalog: Any) -> tuple[int, int]:
    """Load a job's shards into the catalog: (files, failures) imported. Local files keep
    their mtime, so a later `cliplens index` of the same folder finds them up to date."""
    import pyarrow.parquet as pq

    out = Path(folder)
    manifest = require_manifest(out)
    key = catalog.model_key(manifest["model_id"], int(manifest["dim"]))
    files = failures = 0
    for name, table in iter_shards(out):
        paths = [from_text(p) for p in table.column("path").to_pylist()]
        sizes = table.column("size").to_pylist()
        hashes = table.column("sha256").to_pylist()
        vectors = shard_vectors(table)
        rows = [(p, s, _mtime_ns(p), h, "ok", None)
                for p, s, h in zip(paths, sizes, hashes, strict=True)]  # fmt: skip
        bad = pq.read_table(out / f"{name}.failures.parquet").to_pylist()
        for r in bad:
            path = from_text(r["path"])
            rows.append((path, 0, _mtime_ns(path), None, "failed", r["error"]))
        with catalog.transaction():
            catalog.put_embeddings(key, hashes, vectors)
            catalog.upsert_files(rows)
        files += len(paths)
        failures += len(bad)
    return files, failures


def _mtime_ns(path: str) -> int:
    from cliplens.images import is_remote

    if is_remote(path):
        return 0
    try:
        return Path(path).stat().st_mtime_ns
    except OSError:
        return 0
