"""`cliplens score` (CLIPScore, RefCLIPScore) and `cliplens rerank` (best-of-N).

Commands import the library inside their functions, so `cliplens --help` imports none
of it (no torch).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from cliplens.cli.common import (
    MAX_COUNT,
    DeviceOpt,
    EngineOpt,
    MegapixelsOpt,
    ModelOpt,
    PrecisionOpt,
    collect_images,
    no_images,
    out_folder,
    read_catalog,
)
from cliplens.cli.output import (
    Format,
    info,
    print_csv,
    print_json,
    print_table,
    show_progress,
    warn,
)
from cliplens.errors import InvalidInputError
from cliplens.textfile import read_lines

# the reference implementation's text before every caption (tasks/score.PREFIX, repeated
# here so that `--help` imports no numpy)
DEFAULT_PREFIX = "A photo depicts "
# a metric decodes every image whole, as its reference code does; a catalog's vectors (a
# reduced-scale decode, stored as float16) are used only when asked for
ReuseDbOpt = Annotated[
    Path | None,
    typer.Option(
        "--db",
        help="Reuse this catalog's embeddings of indexed images: faster, but decoded at "
        "reduced scale and stored as float16, so a score can move by 1e-3 or more.",
    ),
]
PrefixOpt = Annotated[
    str,
    typer.Option(
        "--prefix",
        help="Text put before every caption and reference before it is embedded, as the "
        'CLIPScore paper\'s code does; --prefix "" for the raw text.',
    ),
]

# Commands import the library inside their bodies, so that `cliplens --help` and every
# other command start without torch (tests/unit/test_structure.py checks --help).


def score_command(
    paths: Annotated[list[Path] | None, typer.Argument(help="Images to score.")] = None,
    prompt: Annotated[
        str | None, typer.Option("--prompt", "-p", help="The text each image is scored against.")
    ] = None,
    refs: Annotated[
        Path | None,
        typer.Option("--refs", help="Reference captions, one per line: adds RefCLIPScore."),
    ] = None,
    captions: Annotated[
        Path | None,
        typer.Option(
            "--captions",
            help='JSONL of {"image", "caption", "references"}: score each image against its '
            "own caption (what `caption eval --captions-out` writes).",
        ),
    ] = None,
    fmt: Annotated[Format, typer.Option("--format", "-f")] = Format.table,
    model: ModelOpt = None,
    device: DeviceOpt = None,
    precision: PrecisionOpt = None,
    engine: EngineOpt = None,
    db: ReuseDbOpt = None,
    max_megapixels: MegapixelsOpt = None,
    prefix: PrefixOpt = DEFAULT_PREFIX,
) -> None:
    """CLIPScore = 2.5 * max(cos(image, "A photo depicts " + text), 0) per image, and the
    mean; RefCLIPScore with reference captions (Hessel et al. 2021, as their code computes
    them)."""
    from cliplens.models.ref import ModelRef
    from cliplens.tasks.score import read_captions, score_images

    if (captions is None) == (prompt is None):
        raise InvalidInputError("give --prompt TEXT with image PATHS, or --captions FILE")
    if captions is not None and (paths or refs):
        raise InvalidInputError("--captions names its images and references: drop PATHS/--refs")
    if prompt is not None and not prompt.strip():
        raise InvalidInputError("--prompt is empty")
    shared_refs = None
    if refs is not None:
        expected = "reference captions, one per line"
        shared_refs = read_lines(refs, "--refs", expected, comments=True, required=True)
    rows = read_captions(captions) if captions else None
    given = [r.image for r in rows] if rows else (paths or [])
    files, missing = collect_images(given)
    if not files and not missing:
        raise no_images(given)
    ref = ModelRef(model, device=device, precision=precision)
    report = score_images(
        files,
        ref,
        prompt,
        shared_refs,
        rows,
        catalog=read_catalog(db) if db else None,
        max_megapixels=max_megapixels,
        progress=show_progress(),
        prefix=prefix,
    )
    for e in [*missing, *report.failures]:
        warn(f"{e} (not scored)")
    if not report.scores:
        raise typer.Exit(1)
    if report.references_left_out:
        warn("some images have no references: RefCLIPScore is left out")
    shown = report.to_dict()
    out, mean = shown["images"], shown["mean"]
    keys = [k for k in out[0] if k != "path"]
    table = [[r["path"], *(r[k] for k in keys)] for r in out]
    if fmt is Format.json:
        print_json(shown)
    elif fmt is Format.csv:
        print_csv(["path", *keys], table)
    else:
        title = "  ".join(f"mean {k} {v}" for k, v in mean.items())
        print_table(["path", *keys], table, title)
    if missing or report.failures:
        raise typer.Exit(1)


def rerank_command(
    prompt: Annotated[str, typer.Argument(help="What the images should show.")],
    paths: Annotated[list[Path], typer.Argument(help="Candidate images or folders.")],
    k: Annotated[
        int | None, typer.Option("-k", "--top", help="Keep the best K.", min=1, max=MAX_COUNT)
    ] = None,
    copy_top: Annotated[
        Path | None,
        typer.Option("--copy-top", help="Copy the best K into this folder, as 01-NAME..."),
    ] = None,
    fmt: Annotated[Format, typer.Option("--format", "-f")] = Format.table,
    model: ModelOpt = None,
    device: DeviceOpt = None,
    precision: PrecisionOpt = None,
    engine: EngineOpt = None,
    db: ReuseDbOpt = None,
    max_megapixels: MegapixelsOpt = None,
    prefix: PrefixOpt = DEFAULT_PREFIX,
) -> None:
    """Order candidate images by how well they fit PROMPT (best-of-N, as DALL-E reranked its
    samples with CLIP); the clip_score column is the paper's CLIPScore (see --prefix)."""
    from cliplens.models.ref import ModelRef
    from cliplens.tasks.score import copy_ranked, rerank_images

    if not prompt.strip():
        raise InvalidInputError("the prompt is empty")
    if copy_top is not None:
        out_folder(copy_top, "--copy-top")
    files, missing = collect_images(paths)
    ref = ModelRef(model, device=device, precision=precision)
    catalog, progress = read_catalog(db) if db else None, show_progress()
    done = rerank_images(
        files,
        ref,
        prompt,
        k,
        catalog=catalog,
        max_megapixels=max_megapixels,
        progress=progress,
        prefix=prefix,
    )
    for e in [*missing, *done.failures]:
        warn(f"{e} (not ranked)")
    if not done.ranked:
        raise typer.Exit(1)
    if copy_top is not None:
        copy_ranked(done.ranked, copy_top)
        info(f"copied the best {len(done.ranked)} to {copy_top}")
    if fmt is Format.json:
        print_json([r.to_dict() for r in done.ranked])
        return
    rows = [(r.rank, r.path, r.cosine, r.clip_score) for r in done.ranked]
    if fmt is Format.csv:
        print_csv(["rank", "path", "cosine", "clip_score"], rows)
    else:
        print_table(["rank", "path", "cosine", "clip_score"], rows, title=prompt)
