"""`cliplens index | search | similar | duplicates`: the photo catalog from the terminal."""

from __future__ import annotations

import enum
import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from cliplens.cli.common import (
    BatchOpt,
    DbOpt,
    DeviceOpt,
    EngineOpt,
    ExcludeOpt,
    FiniteFloat,
    MegapixelsOpt,
    ModelOpt,
    PrecisionOpt,
    library_names,
)
from cliplens.cli.output import (
    Format,
    hit_label,
    info,
    print_json,
    print_paths,
    print_table,
    show_progress,
    warn,
)

if TYPE_CHECKING:
    from cliplens.catalog.db import Catalog
    from cliplens.catalog.update import UpdateStats
    from cliplens.models.ref import ModelRef
    from cliplens.searchable import Hit
    from cliplens.tasks.search import Term
    from cliplens.video import VideoSampling

# Commands import the library inside their bodies, so that `cliplens --help` and every
# other command start without torch (tests/unit/test_structure.py checks --help).

library_names("index", min_gap="--min-frame-gap", max_gap="--max-frame-gap")

MAX_WORKERS = 256  # decoder processes
WorkersOpt = Annotated[
    int | None,
    typer.Option(
        "--workers",
        min=0,
        max=MAX_WORKERS,
        help="Decoder processes (default: one per CPU; 0: none).",
    ),
]
VerboseOpt = Annotated[bool, typer.Option("--verbose", "-v", help="Show stage timings.")]
InOpt = Annotated[
    list[Path] | None,
    typer.Option("--in", help="Folder to search (repeatable; default: the current folder)."),
]
MAX_TOP = 100_000  # results of one query: beyond it, a listing is the better tool
TopOpt = Annotated[int, typer.Option("-n", "--top", min=1, max=MAX_TOP, help="Number of results.")]
MinScoreOpt = Annotated[
    float | None,
    typer.Option(
        "--min-score",
        help="Only results scoring at least this (cosine; what a score means depends on the "
        "model and the query).",
        click_type=FiniteFloat(-1, 1),
    ),
]
OffsetOpt = Annotated[
    int, typer.Option("--offset", min=0, max=MAX_TOP, help="Skip this many results (paging).")
]
PreviewOpt = Annotated[
    bool,
    typer.Option(
        "--preview",
        help="Thumbnails beside the results (table format) where the terminal draws "
        "images: kitty, Ghostty, iTerm2, WezTerm, sixel; CLIPLENS_PREVIEW="
        "kitty|iterm2|sixel|none overrides.",
    ),
]
NoIndexOpt = Annotated[
    bool, typer.Option("--no-index", help="Search the catalog as it is, without updating it.")
]


class HitFormat(str, enum.Enum):
    table = "table"
    json = "json"
    paths = "paths"


def _changed_sampling(catalog: Catalog, gaps: dict[str, float | None]) -> VideoSampling | None:
    """The catalog's kept video sampling with the gaps given changed (None: none given).
    One gap given moves the other where they would cross: `--max-frame-gap 0.5` alone
    also brings the minimum gap down to 0.5 s."""
    from dataclasses import replace

    from cliplens.catalog.update import kept_sampling

    low, high = gaps.get("min_gap"), gaps.get("max_gap")
    if low is None and high is None:
        return None
    kept = kept_sampling(catalog)
    if low is None:
        low = min(kept.min_gap, float(high))
    if high is None:
        high = max(kept.max_gap, low)
    return replace(kept, min_gap=low, max_gap=high)


def _index(
    db: Path | None,
    ref: ModelRef,
    folders: list[Path],
    batch_size: int | None = None,
    workers: int | None = None,
    max_megapixels: float | None = None,
    verbose: bool = False,
    quiet: bool = False,
    exclude: list[str] | None = None,
    gaps: dict[str, float | None] | None = None,
) -> tuple[Catalog, UpdateStats]:
    from cliplens.catalog.db import open_catalog
    from cliplens.catalog.update import update_catalog

    catalog = open_catalog(db)
    video = _changed_sampling(catalog, gaps or {})
    progress = show_progress()
    ref.announce = info
    stats = update_catalog(
        catalog,
        ref,
        folders,
        batch_size=batch_size,
        workers=workers,
        progress=progress,
        max_megapixels=max_megapixels,
        exclude=exclude or (),
        video=video,
    )
    _print_stats(stats, verbose, quiet)
    return catalog, stats


def _print_stats(stats: UpdateStats, verbose: bool = False, quiet: bool = False) -> None:
    for path, error in stats.errors:
        warn(f"{path}: {error} (not indexed)")
    for note in stats.notes:
        warn(note)
    if not quiet or stats.new or stats.changed or stats.removed or stats.failed:
        info(f"index: {stats.summary()}")
    if verbose:
        t = stats.timings
        line = ", ".join(f"{k} {v:.2f}s" for k, v in t.items())
        if t.get("encode"):
            line += f"; encoding {stats.encoded / t['encode']:.1f} img/s"
        if stats.engine:
            line += f" on {stats.engine}"
        info(f"timings: {line}")


def _prepare_fast_text(ref: ModelRef) -> None:
    """Once per model, while it is loaded anyway: export the text tower so that later
    text queries need neither torch nor the full model."""
    from cliplens.tasks.search import export_fast_text, fast_text_due

    if fast_text_due(ref):
        info(f"preparing fast text queries for {ref.name} (once per model)")
        reason = export_fast_text(ref)
        if reason is not None:
            warn(f"{ref.name}: no fast text path ({reason}); queries will load the full model")


def index_command(
    folders: Annotated[list[Path], typer.Argument(help="Folders (or files) to index.")],
    fmt: Annotated[Format, typer.Option("--format", "-f")] = Format.table,
    model: ModelOpt = None,
    device: DeviceOpt = None,
    precision: PrecisionOpt = None,
    engine: EngineOpt = None,
    batch_size: BatchOpt = None,
    workers: WorkersOpt = None,
    max_megapixels: MegapixelsOpt = None,
    exclude: ExcludeOpt = None,
    min_frame_gap: Annotated[
        float | None,
        typer.Option(
            "--min-frame-gap",
            help="Videos: seconds at least between two moments (default 1; kept for the "
            "catalog's later runs).",
            click_type=FiniteFloat(0, 3600, min_open=True),
        ),
    ] = None,
    max_frame_gap: Annotated[
        float | None,
        typer.Option(
            "--max-frame-gap",
            help="Videos: a moment at least this often, in seconds, even in one long shot "
            "(default 10).",
            click_type=FiniteFloat(0, 86400, min_open=True),
        ),
    ] = None,
    db: DbOpt = None,
    verbose: VerboseOpt = False,
) -> None:
    """Bring the catalog up to date: new and changed photos and videos are encoded, moved
    ones reuse their embeddings, deleted ones leave; a killed run resumes where it
    stopped. A video is searched by its moments: a frame at each new scene."""
    from cliplens.models.ref import ModelRef

    ref = ModelRef(model, device=device, precision=precision)
    quiet = fmt is Format.json
    gaps = {"min_gap": min_frame_gap, "max_gap": max_frame_gap}
    _, stats = _index(
        db, ref, folders, batch_size, workers, max_megapixels, verbose, quiet, exclude, gaps
    )
    if fmt is Format.json:
        counts = {k: v for k, v in vars(stats).items() if k != "errors"}
        errors = [{"path": p, "error": e} for p, e in stats.errors]
        print_json(counts | {"errors": errors})
    _prepare_fast_text(ref)


def _open(
    db: Path | None,
    model: str | None,
    device: str | None,
    precision: str | None,
    folders: list[Path],
    no_index: bool,
    texts: bool = False,
    exclude: list[str] | None = None,
) -> tuple[Catalog, ModelRef]:
    """The catalog and model for a query, the folders brought up to date unless no_index.
    With `texts`, the text encoder loads in the background meanwhile."""
    from cliplens.catalog.update import catalog_for_query
    from cliplens.models.ref import ModelRef

    ref = ModelRef(model, device=device, precision=precision)
    if texts:
        ref.preload_text()
    found = catalog_for_query(
        db, ref, folders, update=not no_index, progress=show_progress(), exclude=exclude or ()
    )
    if found.stats is not None:
        _print_stats(found.stats, quiet=True)
    if found.not_updated == "busy":
        warn(f"{found.detail}; searching the photos it has committed so far")
    elif found.not_updated == "read_only":
        warn(f"{found.detail}; searching it as it is, without updating it (--no-index)")
    return found.catalog, ref


def _print_hits(hits: list[Hit], fmt: HitFormat, offset: int = 0, preview: bool = False) -> None:
    if fmt is HitFormat.json:
        print_json([h.to_dict() for h in hits])
    elif fmt is HitFormat.paths:
        print_paths([h.path for h in hits])
    else:
        if preview:
            from cliplens.cli.preview import print_previews  # Pillow, only when drawing

            if print_previews(hits, offset):
                return
        rows = [
            (offset + i + 1, f"{h.score:.3f}", hit_label(h.path, h.time, h.moments))
            for i, h in enumerate(hits)
        ]
        print_table(["#", "score", "path"], rows)


def _folders(in_dirs: list[Path] | None) -> list[Path]:
    return in_dirs or [Path.cwd()]


def search_command(
    query: Annotated[
        list[str], typer.Argument(help='Text, image path, or "2:sunset + ./beach.jpg - people".')
    ],
    in_dirs: InOpt = None,
    n: TopOpt = 10,
    min_score: MinScoreOpt = None,
    offset: OffsetOpt = 0,
    fmt: Annotated[HitFormat, typer.Option("--format", "-f")] = HitFormat.table,
    preview: PreviewOpt = False,
    each_moment: Annotated[
        bool,
        typer.Option(
            "--each-moment",
            help="List each moment of a video found as a result of its own (default: one "
            "result per video, at its best moment, with its next best).",
        ),
    ] = False,
    no_index: NoIndexOpt = False,
    exclude: ExcludeOpt = None,
    exact: Annotated[
        bool, typer.Option("--exact", help="Exact search even where an ANN index exists.")
    ] = False,
    index: Annotated[
        Path | None,
        typer.Option("--index", help="Search a 'cliplens build-index' folder, not the catalog."),
    ] = None,
    model: ModelOpt = None,
    device: DeviceOpt = None,
    precision: PrecisionOpt = None,
    engine: EngineOpt = None,
    db: DbOpt = None,
) -> None:
    """Find photos by a sentence, an example photo, or a weighted mix of both."""
    from cliplens.tasks.search import parse_query, query_vector, search

    text = " ".join(query)
    terms = parse_query(text)  # bad queries fail before any model loads
    paging = {"min_score": min_score, "offset": offset}
    if index is not None:
        _search_built_index(index, terms, n, fmt, model, device, precision, paging, preview)
        return
    folders = _folders(in_dirs)
    texts = any(t.text is not None for t in terms)
    catalog, ref = _open(db, model, device, precision, folders, no_index, texts, exclude)
    vec = query_vector(ref, terms, catalog)
    hits = search(catalog, ref, vec, n, folders, exact=exact, each_moment=each_moment, **paging)
    _print_hits(hits, fmt, offset, preview)
    _prepare_fast_text(ref)


def _search_built_index(
    folder: Path,
    terms: list[Term],
    n: int,
    fmt: HitFormat,
    model: str | None,
    device: str | None,
    precision: str | None,
    paging: dict[str, Any],
    preview: bool = False,
) -> None:
    """A query against a build-index folder: the model is the one its vectors came from."""
    from cliplens.index.built import open_built_index
    from cliplens.models.ref import ModelRef
    from cliplens.tasks.search import query_vector, search

    built = open_built_index(folder)
    ref = ModelRef(model or built.model, device=device, precision=precision)
    built.require_model(ref.info.model_id)  # before the text tower loads
    hits = search(built, ref, query_vector(ref, terms, built), n, **paging)
    _print_hits(hits, fmt, paging["offset"], preview)


def similar_command(
    photo: Annotated[Path, typer.Argument(help="A photo; need not be indexed.")],
    in_dirs: InOpt = None,
    n: TopOpt = 10,
    min_score: MinScoreOpt = None,
    offset: OffsetOpt = 0,
    fmt: Annotated[HitFormat, typer.Option("--format", "-f")] = HitFormat.table,
    preview: PreviewOpt = False,
    no_index: NoIndexOpt = False,
    exclude: ExcludeOpt = None,
    model: ModelOpt = None,
    device: DeviceOpt = None,
    precision: PrecisionOpt = None,
    engine: EngineOpt = None,
    db: DbOpt = None,
) -> None:
    """Photos that look like PHOTO."""
    from cliplens.errors import ImageNotFoundError
    from cliplens.tasks.search import similar

    if not photo.is_file():
        raise ImageNotFoundError(str(photo), "no such file")
    folders = _folders(in_dirs)
    catalog, ref = _open(db, model, device, precision, folders, no_index, exclude=exclude)
    hits = similar(catalog, ref, photo, n, folders, min_score=min_score, offset=offset)
    _print_hits(hits, fmt, offset, preview)


def duplicates_command(
    folders: Annotated[list[Path], typer.Argument(help="Folders to look in.")],
    threshold: Annotated[
        float,
        typer.Option(
            "--threshold",
            help="Cosine for near-duplicates.",
            click_type=FiniteFloat(0, 1, min_open=True),
        ),
    ] = 0.95,
    fmt: Annotated[Format, typer.Option("--format", "-f")] = Format.table,
    no_index: NoIndexOpt = False,
    exclude: ExcludeOpt = None,
    model: ModelOpt = None,
    device: DeviceOpt = None,
    precision: PrecisionOpt = None,
    engine: EngineOpt = None,
    db: DbOpt = None,
) -> None:
    """Groups of exact copies (same bytes) and near-duplicates (embeddings above --threshold)."""
    from cliplens.tasks.search import duplicates

    catalog, ref = _open(db, model, device, precision, folders, no_index, exclude=exclude)
    groups = duplicates(catalog, ref.info.model_id, list(folders), threshold)
    if fmt is Format.json:
        print_json([g.to_dict() for g in groups])
    elif fmt is Format.csv:
        print("group,kind,score,path,time")
        for i, g in enumerate(groups):
            for p, t in g.members():
                at = "" if t is None else f"{t:.3f}"
                print(f"{i + 1},{g.kind},{g.score:.4f},{json.dumps(p)},{at}")
    else:
        rows = [
            (i + 1, g.kind, f"{g.score:.3f}", "\n".join(hit_label(p, t) for p, t in g.members()))
            for i, g in enumerate(groups)
        ]
        print_table(["group", "kind", "score", "paths"], rows)
        info(f"{len(groups)} groups")
