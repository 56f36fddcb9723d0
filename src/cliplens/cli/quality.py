"""`cliplens quality`: corrupt files, CLIP-IQA scores, distortion type; `quality train`.

Commands import the library inside their functions, so `cliplens --help` imports none
of it (no torch).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from cliplens.cli.common import (
    MAX_COUNT,
    DbOpt,
    DefaultCommandGroup,
    DeviceOpt,
    EngineOpt,
    ExcludeOpt,
    MegapixelsOpt,
    ModelOpt,
    PrecisionOpt,
    collect_images,
    new_app,
    out_file,
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

if TYPE_CHECKING:
    from cliplens.tasks.quality import Attribute, QualityScores

# Commands import the library inside their bodies, so that `cliplens --help` and every
# other command start without torch (tests/unit/test_structure.py checks --help).

app = new_app(
    cls=DefaultCommandGroup,
    help="Screen images: corrupt files, quality scores (CLIP-IQA), distortion type.",
    no_args_is_help=True,
)


@app.command("check")
def check_command(
    paths: Annotated[list[Path], typer.Argument(help="Image files or folders.")],
    integrity_only: Annotated[
        bool, typer.Option("--integrity-only", help="Only find corrupt files (no model).")
    ] = False,
    probe: Annotated[
        Path | None, typer.Option("--probe", help="A distortion probe from 'quality train'.")
    ] = None,
    worst: Annotated[
        int | None,
        typer.Option("--worst", help="Show the N lowest-scoring images.", min=1, max=MAX_COUNT),
    ] = None,
    sort: Annotated[
        str, typer.Option("--sort", help="Attribute to sort by (quality, sharpness, ...).")
    ] = "quality",
    iqa: Annotated[
        str | None,
        typer.Option(
            "--iqa",
            help="How CLIP-IQA sees an image: faithful (the paper's: the whole image, "
            "longest side at most 1024 px; OpenAI-layout ResNets such as RN50, their "
            "default) or crop (the model's centre crop; every other model's default).",
        ),
    ] = None,
    prompts: Annotated[
        str,
        typer.Option(
            "--prompts",
            help="Attribute prompts: attributes (the paper's six pairs) or clipiqa "
            "(pyiqa's five-pair quality score).",
        ),
    ] = "attributes",
    fmt: Annotated[Format, typer.Option("--format", "-f")] = Format.table,
    model: ModelOpt = None,
    device: DeviceOpt = None,
    precision: PrecisionOpt = None,
    engine: EngineOpt = None,
    db: DbOpt = None,
    max_megapixels: MegapixelsOpt = None,
    exclude: ExcludeOpt = None,
) -> None:
    """Report corrupt files (exit code 1 if any), then score the readable ones."""
    from cliplens.models.ref import ModelRef
    from cliplens.tasks.quality import PROMPT_SETS, problem_of, screen

    files, missing = collect_images(paths, exclude)
    ref = None if integrity_only else ModelRef(model, device=device, precision=precision)
    found = screen(
        files,
        ref,
        probe,  # loaded when there is something to screen
        catalog=read_catalog(db) if ref and files else None,
        sort=sort,  # type: ignore[arg-type]  # checked by screen
        worst=worst,
        max_megapixels=max_megapixels,
        progress=show_progress(),
        iqa=iqa,  # type: ignore[arg-type]  # checked by screen
        prompts=prompts,  # type: ignore[arg-type]
    )
    found.problems[:0] = map(problem_of, missing)
    problems, scores = found.problems, found.scores
    names: list[Attribute] = list(PROMPT_SETS[prompts])  # type: ignore[index]
    if fmt is Format.json:
        print_json(found.to_dict())
    elif fmt is Format.csv:
        blanks = [""] * len(names)
        print_csv(
            ["path", "problem", "reason", *names, "distortion", "distortion_probability"],
            [(p.path, p.problem, p.reason, *blanks, "", "") for p in problems]
            + [_csv_row(s, names) for s in scores],
        )
    else:
        if problems:
            rows = [(p.problem, p.reason, p.path) for p in problems]
            print_table(["problem", "reason", "path"], rows, title="Problems")
        if scores:
            print_table(
                [*names, "distortion", "path"],
                [_table_row(s, names) for s in scores],
                title=f"Scores (0-1, higher is better; CLIP-IQA {found.iqa}; sorted by {sort})",
            )
        info(f"{len(files) + len(missing)} files, {len(problems)} with problems")
    if problems:
        raise typer.Exit(1)


def _csv_row(s: QualityScores, names: list[Attribute]) -> tuple:
    attributes = [f"{s.attributes[n]:.4f}" for n in names]
    return (s.path, "", "", *attributes, s.distortion, f"{s.distortion_probability:.4f}")


def _table_row(s: QualityScores, names: list[Attribute]) -> tuple:
    attributes = [f"{s.attributes[n]:.2f}" for n in names]
    return (*attributes, f"{s.distortion} {s.distortion_probability:.2f}", s.path)


@app.command("train")
def train_command(
    data: Annotated[Path, typer.Option("--data", help="A folder with one subfolder per type.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Where to write the probe (.npz).")],
    fmt: Annotated[Format, typer.Option("--format", "-f")] = Format.table,
    model: ModelOpt = None,
    device: DeviceOpt = None,
    precision: PrecisionOpt = None,
    engine: EngineOpt = None,
    db: DbOpt = None,
    max_megapixels: MegapixelsOpt = None,
) -> None:
    """Fit a few-shot distortion probe on embeddings; accuracy is cross-validated."""
    from cliplens.models.ref import ModelRef
    from cliplens.tasks.probe import embed_labelled_folder
    from cliplens.tasks.quality import train_probe

    out_file(out, "--out")
    ref = ModelRef(model, device=device, precision=precision)
    catalog, progress = read_catalog(db), show_progress()
    found = embed_labelled_folder(data, ref, True, catalog, max_megapixels, progress)
    for failure in found.failures:
        warn(f"{failure} (skipped)")
    probe = train_probe(found.vectors, found.labels, ref.feature_id)
    probe.save(out)
    m = probe.metrics
    if fmt is Format.json:
        print_json({"probe": str(out), "classes": probe.classes, "metrics": m})
    else:
        acc = f"{m['cv_accuracy']:.3f}" if "cv_accuracy" in m else "n/a (too few per type)"
        row = (", ".join(probe.classes), int(m["examples"]), acc)
        print_table(["types", "examples", "cv accuracy"], [row])
        info(f"probe written to {out}")
