"""`cliplens embed-dataset` (Ray) and `cliplens catalog import` (registered in the catalog
group, cli/catalog.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from cliplens.cli.common import (
    MAX_COUNT,
    BatchSizeOpt,
    DbOpt,
    EngineOpt,
    ExcludeOpt,
    FiniteFloat,
    MegapixelsOpt,
    ModelOpt,
    PrecisionOpt,
    out_folder,
)
from cliplens.cli.output import Format, info, print_json, print_table, show_progress, warn
from cliplens.limits import MAX_MINUTES, MAX_QUERIES

# Commands import the library inside their bodies, so that `cliplens --help` and every
# other command start without torch (tests/unit/test_structure.py checks --help).

MAX_SHARD_SIZE = 10_000_000  # files per shard: a shard is held in memory while it fills
MAX_ACTORS = 4096  # encoder actors, or CPUs of a local Ray instance


def embed_dataset_command(
    sources: Annotated[
        list[str], typer.Argument(help="Folders, files or URIs (file://, s3://, gs://...).")
    ],
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for shards and manifest.")],
    address: Annotated[
        str | None,
        typer.Option("--address", help="A Ray cluster to run on (default: start a local one)."),
    ] = None,
    shard_size: Annotated[
        int, typer.Option("--shard-size", help="Files per shard.", min=1, max=MAX_SHARD_SIZE)
    ] = 10_000,
    batch_size: BatchSizeOpt = 64,
    actors: Annotated[
        int,
        typer.Option(
            "--actors",
            help="Encoder actors (one GPU each when there are GPUs).",
            min=1,
            max=MAX_ACTORS,
        ),
    ] = 1,
    dtype: Annotated[str, typer.Option("--dtype", help="float16 or float32.")] = "float16",
    num_cpus: Annotated[
        int | None,
        typer.Option("--num-cpus", help="CPUs for a local Ray instance.", min=1, max=MAX_ACTORS),
    ] = None,
    max_shards: Annotated[
        int | None,
        typer.Option("--max-shards", help="Stop after this many shards.", min=1, max=MAX_COUNT),
    ] = None,
    add_new: Annotated[
        bool,
        typer.Option("--add-new", help="The sources gained files: embed them into new shards."),
    ] = False,
    fmt: Annotated[Format, typer.Option("--format", "-f")] = Format.table,
    model: ModelOpt = None,
    precision: PrecisionOpt = None,
    engine: EngineOpt = None,
    max_megapixels: MegapixelsOpt = None,
    exclude: ExcludeOpt = None,
) -> None:
    """Embed a large image collection on Ray into Parquet shards; run again to resume, or
    with --add-new to add the files that appeared since."""
    from cliplens.distributed.embed import EmbedJob, embed_dataset

    out_folder(out, "--out")
    job = EmbedJob(
        sources=tuple(sources),
        out=out,
        model=model,
        shard_size=shard_size,
        batch_size=batch_size,
        actors=actors,
        dtype=dtype,
        address=address,
        num_cpus=num_cpus,
        precision=precision,
        max_megapixels=max_megapixels,
        max_shards=max_shards,
        add_new=add_new,
        exclude=tuple(exclude or ()),
    )
    report = embed_dataset(job, progress=show_progress())
    if report.gone:
        where = "they stay in the shards (start a new --out to drop them)"
        warn(f"{report.gone} files in finished shards are no longer in the sources; {where}")
    if fmt is Format.json:
        print_json(report.to_dict())
        return
    header = ["files", "shards", "written", "skipped", "rows", "failures", "seconds"]
    row = (
        report.files,
        report.shards,
        len(report.written),
        len(report.skipped),
        report.rows,
        report.failures,
        f"{report.seconds:.1f}",
    )
    print_table(header, [row])
    info(f"shards and manifest in {out}")


def import_command(
    shards: Annotated[Path, typer.Argument(help="The --out folder of embed-dataset.")],
    db: DbOpt = None,
) -> None:
    """Load embed-dataset shards into the catalog that search and the server use."""
    from cliplens.catalog.db import Catalog
    from cliplens.distributed.embed import import_shards

    with Catalog(db) as catalog:
        files, failures = import_shards(shards, catalog)
    info(f"imported {files} files ({failures} unreadable) into {catalog.path}")


def build_index_command(
    shards: Annotated[Path, typer.Argument(help="The --out folder of embed-dataset.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for the index.")],
    kind: Annotated[str, typer.Option("--kind", help="ivfpq, hnsw or flat.")] = "ivfpq",
    refine: Annotated[
        str, typer.Option("--refine", help="ivfpq re-scoring: sq8, fp16 or none.")
    ] = "sq8",
    queries: Annotated[
        int,
        typer.Option("--queries", help="Held-out queries for recall@10.", min=1, max=MAX_QUERIES),
    ] = 200,
    checkpoint_minutes: Annotated[
        float,
        typer.Option(
            "--checkpoint-minutes",
            help="Save the index being built this often, to resume after a kill "
            "(0: only after training and at the end).",
            click_type=FiniteFloat(0, MAX_MINUTES),
        ),
    ] = 5.0,
    update: Annotated[
        bool,
        typer.Option(
            "--update",
            help="Add the shards written since INDEX was built (after "
            "embed-dataset --add-new), without training again.",
        ),
    ] = False,
    fmt: Annotated[Format, typer.Option("--format", "-f")] = Format.table,
) -> None:
    """Build a faiss index sized to the shards; report recall@10, latency and size. An
    interrupted build resumes: run the same command again."""
    from cliplens.index.build import build_index, update_index

    out_folder(out, "--out")
    if update:
        report, added, before = update_index(shards, out, queries, progress=show_progress())
        trained = before.trained_on
        info(f"added {added:,} vectors to the {before.report.n:,} already in {out}")
        if before.needs_rebuild(report):
            grown = f"{out} now holds {report.n / trained:.1f}x the {trained:,} vectors"
            warn(
                f"{grown} it was trained on; build it again (without --update) for the best recall"
            )
    else:
        checkpoint_s = checkpoint_minutes * 60
        report = build_index(
            shards, out, kind, refine, queries, progress=show_progress(), checkpoint_s=checkpoint_s
        )
    if report.resumed_rows:
        done = f"{report.resumed_rows:,} of {report.n:,} vectors were already in it"
        info(f"resumed an interrupted build: {done}")
    if fmt is Format.json:
        print_json(report.to_dict())
        return
    header = ["kind", "vectors", "dim", "train s", "add s", "MB", "recall@10", "ms/query"]
    row = (
        report.kind,
        report.n,
        report.dim,
        f"{report.train_s:.1f}",
        f"{report.add_s:.1f}",
        f"{report.index_bytes / 1e6:.1f}",
        f"{report.recall_at_10:.3f}",
        f"{report.query_ms:.2f}",
    )
    print_table(header, [row])
    info(f"index in {out}")
