"""Embed a large image collection on Ray: Parquet shards and a manifest, resumable.

The job lists images under local folders or object-store URIs (fsspec: file://, s3://,
gs://...), sorts them, and cuts the files that no finished shard holds into shards of
`shard_size` files. Ray Data then streams every pending file through CPU tasks that read,
hash and decode it to the model's crop (the same `catalog.worker.CropDecoder` as
`cliplens index`), and through a pool of actors that each hold one cliplens encoder (a
GPU each when there are GPUs, CPUs otherwise). Rows come back in order; each shard is
written to OUT/part-NNNNN.parquet when its last row arrives, then recorded in
OUT/manifest.json (`ShardManifest`), both by atomic rename. A killed job loses at most
the shard in flight: run it again and finished shards are skipped. Files that cannot be
read are listed in part-NNNNN.failures.parquet, never fatal.

Ray is imported only when a job runs.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Callable, Collection, Iterator
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from cliplens.catalog.worker import CropDecoder, Decoded
from cliplens.decode_ahead import decode_batch
from cliplens.device import Precision, parse_precision
from cliplens.distributed.manifest import (
    RESUME_SETTINGS,
    ShardCounts,
    ShardManifest,
    StoredDtype,
    read_manifest,
    require_manifest,
    save_manifest,
)
from cliplens.errors import DependencyMissingError, InvalidInputError
from cliplens.exclusions import exclusions
from cliplens.images import IMAGE_EXTENSIONS, is_remote, iter_image_files
from cliplens.limits import finite_number
from cliplens.models.openvino import Engine, parse_engine
from cliplens.models.ref import ModelRef
from cliplens.paths import from_text, to_text
from cliplens.preprocess import Preprocessing
from cliplens.progress import progress_bar
from cliplens.settings import get_settings
from cliplens.store.files import write_atomic

if TYPE_CHECKING:
    from cliplens.catalog.db import Catalog
    from cliplens.models.info import ModelInfo


@dataclass(frozen=True)
class EmbedJob:
    """What `embed_dataset` embeds, with which model, into which folder, and how.

    Why: one checked value holds the whole job, so a resumed run can be compared with
    the manifest of the first one.

    >>> import cliplens
    >>> job = cliplens.EmbedJob(sources=["s3://bucket/photos"], out="shards")
    >>> cliplens.embed_dataset(job, progress=True)
    """

    sources: tuple[str, ...]  # a list is kept as a tuple
    out: Path  # a str is kept as a Path
    model: str | None = None  # None: the default model (CLIPLENS_MODEL, else offline)
    shard_size: int = 10_000
    batch_size: int = 64  # images per encoder call
    actors: int = 1  # encoder actors (one GPU each when GPUs are present)
    dtype: StoredDtype = "float16"
    address: str | None = None  # an existing Ray cluster; None starts a local one
    num_cpus: int | None = None  # for a local Ray instance
    precision: Precision | str | None = None  # a str is parsed into a Precision
    engine: Engine | str | None = None  # a str is parsed into an Engine (CPU actors)
    max_megapixels: float | None = None
    max_shards: int | None = None  # stop after writing this many shards (this run)
    add_new: bool = False  # the sources gained files: embed those into new shards
    exclude: tuple[str, ...] = ()  # gitignore patterns left out of the listing (exclusions)

    def __post_init__(self) -> None:
        if self.shard_size < 1 or self.batch_size < 1 or self.actors < 1:
            raise InvalidInputError("`shard_size`, `batch_size` and `actors` must be at least 1")
        if self.dtype not in ("float16", "float32"):
            raise InvalidInputError(f"`dtype` {self.dtype}: use float16 or float32")
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
        object.__setattr__(self, "precision", parse_precision(self.precision))
        object.__setattr__(self, "engine", parse_engine(self.engine))
        object.__setattr__(self, "sources", tuple(self.sources))
        object.__setattr__(self, "exclude", tuple(self.exclude))
        object.__setattr__(self, "out", Path(self.out))
        object.__setattr__(self, "model", self.model or get_settings().default_model)


@dataclass
class EmbedReport:
    """What a run of `embed_dataset` did: the shards written now and those skipped.

    >>> import cliplens
    >>> report = cliplens.embed_dataset(cliplens.EmbedJob(("photos/",), Path("shards")))
    >>> report.rows, report.failures, report.to_dict()
    """

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


def list_images(
    sources: tuple[str, ...] | list[str], exclude: tuple[str, ...] | list[str] = ()
) -> list[str]:
    """Image files under each source, as local absolute paths or protocol URIs, sorted;
    less what `exclude` (gitignore patterns) leaves out, and in local folders what their
    `.cliplensignore` files leave out."""
    import fsspec  # installed with Ray: only embed-dataset lists sources through it

    rules = exclusions(exclude)
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
        images = [n for n in names if Path(n).suffix.lower() in IMAGE_EXTENSIONS]
        base = root.rstrip("/") + "/"
        images = [n for n in images if not rules.excludes_relative(n.removeprefix(base))]
        found.update(fs.unstrip_protocol(n) for n in images)
    # one walk over the local roots, each file once across them, under a name reached
    # without a link where there is one (the server never serves a link); the roots
    # resolved, the files as found; names that are not UTF-8 kept as cliplens.paths text
    found.update(to_text(str(p)) for p in iter_image_files(local_roots, exclude=rules))
    if not found:
        raise InvalidInputError(f"no image files under {', '.join(sources)}")
    return sorted(found)


def shard_name(i: int) -> str:
    return f"part-{i:05d}"


def list_hash(files: list[str]) -> str:
    return hashlib.sha256("\n".join(files).encode()).hexdigest()


# ------------------------------------------------------------------ Ray stages


def _decode_batch(
    batch: dict[str, np.ndarray], prep: Preprocessing, max_megapixels: float | None
) -> dict[str, np.ndarray]:
    """CPU task: read, hash and decode each file to the model's uint8 crop."""
    decoder = CropDecoder(prep, max_megapixels)
    decoded = decode_batch([str(p) for p in batch["path"]], partial(_decode_path, decoder))
    crops = np.zeros((len(decoded), prep.image_size, prep.image_size, 3), np.uint8)
    for i, d in enumerate(decoded):
        if d.crop is not None:
            crops[i] = d.crop
    return {
        "path": batch["path"],
        "shard": batch["shard"],
        "size": np.array([d.size for d in decoded], np.int64),
        "sha256": np.array([d.hash or "" for d in decoded], dtype=object),
        "crop": crops,
        "error": np.array([d.error or "" for d in decoded], dtype=object),
    }


def _decode_path(decoder: CropDecoder, path: str) -> Decoded:
    """One listed file, decoded exactly as `cliplens index` does: from the file itself
    when it is local (the listing's text turned back into the real name), else from its
    bytes."""
    return decoder.read(path if is_remote(path) else from_text(path))


def _decode_one(
    path: str, prep: Preprocessing, max_megapixels: float | None
) -> tuple[int, str, np.ndarray | None, str]:
    """(size, sha256, crop or None, error or "") of one listed file."""
    d = _decode_path(CropDecoder(prep, max_megapixels), path)
    return d.size, d.hash or "", d.crop, d.error or ""


class _EncodeActor:
    """Holds one Encoder; embeds the batch's decoded crops."""

    def __init__(self, model: str, precision: Precision | None, engine: Engine) -> None:
        import torch  # in the actor process only

        device = "cuda" if torch.cuda.is_available() else "cpu"
        if device == "cpu":  # Ray caps threads at the actor's 1 CPU; use the node's cores
            torch.set_num_threads(os.cpu_count() or 1)
        # on CPU, the engine ModelRef picks (OpenVINO where kept and faster)
        self.encoder = ModelRef(model, device=device, precision=precision, engine=engine).ready()

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


def embed_dataset(
    job: EmbedJob,
    progress: bool = False,
    on_shard: Callable[[str, int, int], None] | None = None,
) -> EmbedReport:
    """Embed a large image collection on Ray into Parquet shards, or resume that job.

    Why: a collection too large for one `cliplens index` run is embedded by many
    decoders and encoder actors at once; a killed job loses at most the shard in
    flight, and with `add_new` the files that appeared since go into new shards.
    `on_shard(name, rows, failures)` runs after each shard; with `progress`, a bar over
    the files of the pending shards.

    >>> import cliplens
    >>> job = cliplens.EmbedJob(sources=("photos/",), out=Path("shards"), model="offline")
    >>> cliplens.embed_dataset(job).shards
    """
    try:  # the distributed extra: imported only when a job runs
        import pyarrow  # noqa: F401
        import ray
    except ImportError as e:
        raise DependencyMissingError(
            f"embed-dataset needs Ray Data ({e}); pip install 'cliplens[distributed]'"
        ) from e
    t0 = time.perf_counter()
    out = Path(job.out)
    out.mkdir(parents=True, exist_ok=True)
    files = list_images(job.sources, job.exclude)
    info = ModelRef(job.model, precision=job.precision, engine=job.engine).info
    manifest = _open_manifest(job, out, files, info)
    pending, report = _plan_shards(job, out, files, manifest)
    if not pending:
        report.seconds = time.perf_counter() - t0
        return report
    if not ray.is_initialized():
        num_cpus = job.num_cpus if job.address is None else None
        ray.init(
            address=job.address, num_cpus=num_cpus, include_dashboard=False, log_to_driver=False
        )
    items = [{"path": p, "shard": i} for i, s in pending for p in s]
    sizes = {i: len(s) for i, s in pending}
    rows: dict[int, list[dict[str, Any]]] = {i: [] for i, _ in pending}
    shards = _ShardWriter(out, info.model_id, job.dtype, manifest, report, on_shard)
    with progress_bar(len(items), "embedding", progress) as advance:
        for batch in _embedded_batches(job, items, info.preprocessing):
            shards.collect(batch, rows, sizes)
            advance(len(batch["path"]), f"{len(report.written)} shards written")
    report.seconds = time.perf_counter() - t0
    return report


def _open_manifest(job: EmbedJob, out: Path, files: list[str], info: ModelInfo) -> ShardManifest:
    """The job's manifest: a new one, or the one in `out` if it holds this job (with
    `add_new`, one whose listing changed: it follows the new listing from now on)."""
    wanted = ShardManifest(
        model_id=info.model_id,
        dim=info.dim,
        model=job.model,
        dtype=job.dtype,
        shard_size=job.shard_size,
        files=len(files),
        list_hash=list_hash(files),
        sources=list(job.sources),
    )
    manifest = read_manifest(out)
    if manifest is None:
        return wanted
    changed = [k for k in RESUME_SETTINGS if getattr(manifest, k) != getattr(wanted, k)]
    listing_only = set(changed) <= {"files", "list_hash"}
    if changed and not (listing_only and job.add_new):
        if listing_only:
            message = (
                f"{out} holds a job over other files; pass `add_new` to embed the files not "
                "yet in its shards into new shards, or use a new `out`"
            )
        else:
            message = (
                f"{out} holds a job with other {', '.join(changed)} (the model or sharding "
                "changed); resume it with the same settings or use a new `out`"
            )
        raise InvalidInputError(message)
    if changed:  # the listing grew (or shrank): the manifest follows it from now on
        manifest.files, manifest.list_hash = wanted.files, wanted.list_hash
        manifest.sources, manifest.grown = wanted.sources, True
        save_manifest(out, manifest)
    return manifest


def _plan_shards(
    job: EmbedJob, out: Path, files: list[str], manifest: ShardManifest
) -> tuple[list[tuple[int, list[str]]], EmbedReport]:
    """The shards to write this run, as (number, files), and the report so far.

    Finished shards never change; every file not in one is planned into new shards after
    them (for a resumed job, the same shards as before: finished shards are a prefix)."""
    done = {name for name in manifest.shards if (out / f"{name}.parquet").exists()}
    for name in set(manifest.shards) - done:  # a shard file deleted: its files are redone
        del manifest.shards[name]
    first = max((int(name.split("-")[1]) + 1 for name in done), default=0)
    if not manifest.grown and done == {shard_name(i) for i in range(first)}:
        known: set[str] = set()  # one listing, its first shards done: the rest is to do
        todo = files[first * job.shard_size :]
    else:  # which files the shards hold must be read
        known = _paths_in(out, done)
        todo = [f for f in files if f not in known]
    starts = range(0, len(todo), job.shard_size)
    pending = [(first + j, todo[i : i + job.shard_size]) for j, i in enumerate(starts)]
    report = EmbedReport(files=len(files), shards=len(done) + len(pending))
    report.skipped = sorted(done)
    report.gone = len(known.difference(files))
    if job.max_shards is not None:
        pending = pending[: job.max_shards]
    return pending, report


def _embedded_batches(
    job: EmbedJob, items: list[dict[str, Any]], prep: Preprocessing
) -> Iterator[dict[str, np.ndarray]]:
    """The Ray Data pipeline: decode tasks, then encoder actors; batches in item order."""
    import ray  # embed_dataset checked that it is installed

    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True  # shards complete one after another
    ctx.enable_progress_bars = False
    gpus = 1 if ray.cluster_resources().get("GPU", 0) >= 1 else 0
    ds = ray.data.from_items(items)
    # decoding gets its own tasks (half a CPU each, so a node keeps decoding while its CPUs
    # also serve an encoder); equal resources would let Ray fuse it into the actors,
    # which then decode one file at a time between encoder calls
    decode_args = {"prep": prep, "max_megapixels": job.max_megapixels}
    ds = ds.map_batches(
        _decode_batch, batch_size=16, batch_format="numpy", num_cpus=0.5, fn_kwargs=decode_args
    )
    ds = ds.map_batches(
        _EncodeActor,
        batch_size=job.batch_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=job.actors),
        num_gpus=gpus,
        fn_constructor_kwargs={
            "model": job.model,
            "precision": job.precision,
            "engine": job.engine,
        },
    )
    yield from ds.iter_batches(batch_size=None, batch_format="numpy")


def _paths_in(out: Path, shards: set[str]) -> set[str]:
    """The files that finished shards hold, embedded or failed."""
    import pyarrow.parquet as pq  # the distributed extra: only to read or write shards

    known: set[str] = set()
    for name in shards:
        for part in (f"{name}.parquet", f"{name}.failures.parquet"):
            if (out / part).exists():
                known.update(pq.read_table(out / part, columns=["path"])["path"].to_pylist())
    return known


_ROW_KEYS = ("path", "size", "sha256", "error", "embedding")


@dataclass
class _ShardWriter:
    """Adds embedded rows to their shards; writes each shard whose last row arrived,
    then records it in the manifest."""

    out: Path
    model_id: str
    dtype: StoredDtype
    manifest: ShardManifest
    report: EmbedReport
    on_shard: Callable[[str, int, int], None] | None

    def collect(
        self,
        batch: dict[str, np.ndarray],
        rows: dict[int, list[dict[str, Any]]],
        sizes: dict[int, int],
    ) -> None:
        for k in range(len(batch["path"])):
            i = int(batch["shard"][k])
            rows[i].append({key: batch[key][k] for key in _ROW_KEYS})
            if len(rows[i]) == sizes[i]:
                self._finish(shard_name(i), rows.pop(i))

    def _finish(self, name: str, rows: list[dict[str, Any]]) -> None:
        n_ok, n_bad = _write_shard(self.out, name, rows, self.model_id, self.dtype)
        self.manifest.shards[name] = ShardCounts(rows=n_ok, failures=n_bad)
        save_manifest(self.out, self.manifest)
        report = self.report
        report.written.append(name)
        report.rows += n_ok
        report.failures += n_bad
        if self.on_shard:
            self.on_shard(name, n_ok, n_bad)


def _write_shard(
    out: Path, name: str, rows: list[dict[str, Any]], model_id: str, dtype: str
) -> tuple[int, int]:
    """OUT/NAME.failures.parquet, then OUT/NAME.parquet (its presence marks the shard
    done), rows sorted by path: (embedded, failed)."""
    import pyarrow as pa  # installed with Ray; only a job or a reader of shards needs it
    import pyarrow.parquet as pq  # the distributed extra: only to read or write shards

    rows.sort(key=lambda r: str(r["path"]))
    good = [r for r in rows if not r["error"]]
    bad = [r for r in rows if r["error"]]
    dim = len(rows[0]["embedding"])
    flat = np.asarray([r["embedding"] for r in good], np.float32).reshape(-1).astype(dtype)
    columns = {
        "path": pa.array([str(r["path"]) for r in good], pa.string()),
        "size": pa.array([int(r["size"]) for r in good], pa.int64()),
        "sha256": pa.array([str(r["sha256"]) for r in good], pa.string()),
        "model_id": pa.array([model_id] * len(good), pa.string()),
        "embedding": pa.FixedSizeListArray.from_arrays(pa.array(flat), dim),
    }
    table = pa.table(columns)
    failed_columns = {
        "path": pa.array([str(r["path"]) for r in bad], pa.string()),
        "error": pa.array([str(r["error"]) for r in bad], pa.string()),
    }
    failures = pa.table(failed_columns)
    write_atomic(out / f"{name}.failures.parquet", lambda p: pq.write_table(failures, p))
    write_atomic(out / f"{name}.parquet", lambda p: pq.write_table(table, p))
    return len(good), len(bad)


# ------------------------------------------------------------------ reading shards


def iter_shards(
    folder: str | os.PathLike,
    names: Collection[str] | None = None,
    columns: list[str] | None = None,
) -> Iterator[tuple[str, Any]]:
    """(name, pyarrow table) for each finished shard of a job folder (or those in `names`),
    in order; only `columns` are read when given."""
    import pyarrow.parquet as pq  # the distributed extra: only to read or write shards

    out = Path(folder)
    for name in sorted(require_manifest(out).shards):
        if names is None or name in names:
            yield name, pq.read_table(out / f"{name}.parquet", columns=columns)


def shard_vectors(table: Any) -> np.ndarray:
    """The (N, D) float32 embeddings of a shard table."""
    column = table.column("embedding").combine_chunks()
    dim = column.type.list_size
    return column.values.to_numpy(zero_copy_only=False).astype(np.float32).reshape(-1, dim)


def import_shards(folder: str | os.PathLike, catalog: Catalog) -> tuple[int, int]:
    """Load a job's shards into the catalog: (files, failures) imported.

    Why: search and the server read the catalog; this makes an `embed_dataset` job
    searchable without embedding again. Local files keep their mtime, so a later
    `cliplens index` of the same folder finds them up to date.

    >>> import cliplens
    >>> catalog = cliplens.open_catalog("photos.db")
    >>> files, failures = cliplens.import_shards("shards/", catalog)
    """
    import pyarrow.parquet as pq  # the distributed extra: only to read or write shards

    out = Path(folder)
    manifest = require_manifest(out)
    key = catalog.model_key(manifest.model_id, int(manifest.dim))
    files = failures = 0
    for name, table in iter_shards(out):
        paths = [from_text(p) for p in table.column("path").to_pylist()]
        sizes = table.column("size").to_pylist()
        hashes = table.column("sha256").to_pylist()
        vectors = shard_vectors(table)
        found = zip(paths, sizes, hashes, strict=True)
        rows = [(p, s, _mtime_ns(p), h, "ok", None) for p, s, h in found]
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
    if is_remote(path):
        return 0
    try:
        return Path(path).stat().st_mtime_ns
    except OSError:
        return 0
