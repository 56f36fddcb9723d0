"""`cliplens catalog info | check | vacuum | merge | export | import`: catalog upkeep."""

from __future__ import annotations

import enum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from cliplens.cli import distributed
from cliplens.cli.common import DbOpt, new_app, out_folder
from cliplens.cli.distributed import MAX_SHARD_SIZE
from cliplens.cli.output import info, print_json, print_table, show_progress, warn

if TYPE_CHECKING:
    from cliplens.catalog.upkeep import CatalogInfo, CheckReport

# Commands import the library inside their bodies, so that `cliplens --help` and every
# other command start without torch (tests/unit/test_structure.py checks --help).

SHOWN_PATHS = 10  # paths listed per problem in a table; --format json lists them all

app = new_app(
    help="The catalog: what it holds, checking, compacting, merging, exporting and "
    "importing embeddings.",
    no_args_is_help=True,
)


class ReportFormat(str, enum.Enum):
    table = "table"
    json = "json"


FormatOpt = Annotated[ReportFormat, typer.Option("--format", "-f")]


def _size(n: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


@app.command("info")
def info_command(db: DbOpt = None, fmt: FormatOpt = ReportFormat.table) -> None:
    """What the catalog holds: files by status, models and their embeddings, size on disk."""
    from cliplens.catalog.db import Catalog
    from cliplens.catalog.upkeep import catalog_info

    with Catalog(db, readonly=True) as catalog:
        found = catalog_info(catalog)
    if fmt is ReportFormat.json:
        print_json(found.to_dict())
        return
    _print_info(found)


def _print_info(found: CatalogInfo) -> None:
    size = found.size
    statuses = ", ".join(f"{n} {status}" for status, n in found.files.items())
    parts = {"db": size.db, "wal": size.wal, "shm": size.shm, "vectors": size.vectors}
    rows = [
        ("path", found.path),
        ("schema", found.schema),
        ("files", f"{sum(found.files.values())} ({statuses})"),
        ("failed", found.failed),
        (
            "videos",
            f"{sum(found.videos.values())} ({found.videos.get('ok', 0)} ok), "
            f"{found.moments} moments",
        ),
        ("size", f"{_size(size.total)} ({', '.join(f'{k} {_size(v)}' for k, v in parts.items())})"),
    ]
    if found.garbage_pending:
        rows.append(("garbage", "unused embeddings may remain: 'cliplens catalog vacuum'"))
    print_table(["field", "value"], rows, title="catalog")
    models = [(m.model_id, m.dim, m.embeddings, m.files, m.videos, m.moments) for m in found.models]
    header = ["model", "dim", "embeddings", "files", "videos", "moments"]
    print_table(header, models, title="models")


@app.command("check")
def check_command(db: DbOpt = None, fmt: FormatOpt = ReportFormat.table) -> None:
    """Check the catalog without changing it: SQLite's integrity check, orphan embeddings,
    files without embeddings, files gone from disk. Exits 1 when it finds a problem."""
    from cliplens.catalog.db import Catalog
    from cliplens.catalog.upkeep import check_catalog

    with Catalog(db, readonly=True) as catalog:
        report = check_catalog(catalog, progress=show_progress())
    if fmt is ReportFormat.json:
        print_json(report.to_dict())
    else:
        _print_check(report)
    if not report.healthy:
        raise typer.Exit(1)


def _print_check(report: CheckReport) -> None:
    integrity = "; ".join(report.integrity[:3]) or "ok"
    incomplete = sorted({p for paths in report.incomplete_videos.values() for p in paths})
    rows = [
        ("integrity", integrity),
        ("embeddings of unlisted models", report.foreign_keys),
        ("orphan embeddings", sum(report.orphans.values())),
        ("moments of videos no file holds", report.orphan_frames),
        ("orphan moment embeddings", sum(report.orphan_moments.values())),
        ("videos embedded without all moments", len(incomplete)),
        ("embeddings of the wrong size", sum(report.bad_vectors.values())),
        ("readable files without embeddings", len(report.unembedded)),
        ("files missing on disk", f"{len(report.missing)} of {report.files}"),
    ]
    if report.not_checked:
        rows.append(("files named by URI (not looked for)", report.not_checked))
    print_table(["check", "found"], rows, title=report.path)
    for problem in report.problems():
        warn(problem)
    listed = (
        ("no embedding", report.unembedded),
        ("moments missing", incomplete),
        ("missing", report.missing),
    )
    for what, paths in listed:
        for path in paths[:SHOWN_PATHS]:
            warn(f"{what}: {path}")
        if len(paths) > SHOWN_PATHS:
            warn(f"{what}: and {len(paths) - SHOWN_PATHS} more (--format json lists them all)")
    n = len(report.problems())
    info(f"{n} kinds of problem found" if n else "the catalog is healthy")


@app.command("vacuum")
def vacuum_command(db: DbOpt = None, fmt: FormatOpt = ReportFormat.table) -> None:
    """Drop unused embeddings and give the space of deleted rows back to the disk
    (SQLite's VACUUM: atomic). Refused while another process updates the catalog."""
    from cliplens.catalog.upkeep import catalog_size, open_existing, vacuum_catalog

    with open_existing(db) as catalog:
        if show_progress():  # no bar can follow VACUUM: say what takes the time
            size = _size(catalog_size(catalog).database)
            info(f"vacuuming {catalog.path} ({size}): SQLite rewrites the whole file")
        report = vacuum_catalog(catalog)
    if fmt is ReportFormat.json:
        print_json(report.to_dict())
        return
    dropped = [
        f"{n} {what}"
        for n, what in (
            (report.garbage, "unused embeddings dropped"),
            (report.frames, "video moments dropped"),
            (report.videos_unmarked, "videos missing moments unmarked (index them again)"),
        )
        if n
    ]
    gone = "".join(f"; {d}" for d in dropped)
    info(f"{report.path}: {_size(report.before)} before, {_size(report.after)} after{gone}")


@app.command("merge")
def merge_command(
    other: Annotated[Path, typer.Argument(help="The catalog to copy files and embeddings from.")],
    db: DbOpt = None,
    fmt: FormatOpt = ReportFormat.table,
) -> None:
    """Copy another catalog's files and embeddings into this one, in one transaction; of a
    path both hold, the record with the later mtime is kept."""
    from cliplens.catalog.upkeep import merge_catalogs, open_existing

    with open_existing(db) as catalog:
        report = merge_catalogs(catalog, other, progress=show_progress())
    if fmt is ReportFormat.json:
        print_json(report.to_dict())
        return
    models = f"; new models: {', '.join(report.models_added)}" if report.models_added else ""
    info(
        f"merged {report.other}: {report.files_added} files added, {report.files_replaced} "
        f"replaced by newer records, {report.files_kept} kept, "
        f"{report.embeddings_added} embeddings added, {report.frames_added} video moments "
        f"added{models}"
    )
    if report.video_conflicts:
        warn(
            f"{len(report.video_conflicts)} videos have other moments in {report.other}: "
            "their moments and embeddings were kept from this catalog ('cliplens index' "
            "embeds them by the models it lacks)"
        )
        for path in report.video_conflicts[:SHOWN_PATHS]:
            warn(f"other moments: {path}")


@app.command("export")
def export_command(
    out: Annotated[Path, typer.Argument(help="A new (or empty) folder for shards and manifest.")],
    db: DbOpt = None,
    model: Annotated[
        str | None,
        typer.Option(
            "--model",
            "-m",
            help="The model whose embeddings to export: its id or name "
            "(default: the catalog's only one).",
        ),
    ] = None,
    shard_size: Annotated[
        int, typer.Option("--shard-size", help="Files per shard.", min=1, max=MAX_SHARD_SIZE)
    ] = 10_000,
    fmt: FormatOpt = ReportFormat.table,
) -> None:
    """Write one model's embeddings as embed-dataset shards, for 'cliplens build-index OUT'
    (whole or not at all)."""
    from cliplens.catalog.db import Catalog
    from cliplens.distributed.export import export_shards

    out_folder(out, "OUT")
    with Catalog(db, readonly=True) as catalog:
        report = export_shards(catalog, out, model, shard_size, progress=show_progress())
    if fmt is ReportFormat.json:
        print_json(report.to_dict())
        return
    header = ["model", "dim", "shards", "rows", "failures", "not embedded"]
    row = (report.model_id, report.dim, report.shards, report.rows, report.failures)
    print_table(header, [(*row, report.not_embedded)])
    for note in report.notes:
        warn(note)
    info(f"shards and manifest in {out}; index them with 'cliplens build-index {out} --out DIR'")


app.command("import")(distributed.import_command)
