"""`cliplens quality`: corrupt files, CLIP-IQA scores, distortion type; `quality train`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from cliplens.cli.common import (
    MAX_COUNT,
    DbOpt,
    DefaultCommandGroup,
    DeviceOpt,
    MegapixelsOpt,
    ModelOpt,
    PrecisionOpt,
    collect_images,
    embed_labelled,
    embed_paths,
    out_file,
)
from cliplens.cli.output import Format, info, print_csv, print_json, print_table
from cliplens.errors import InvalidInputError

app = typer.Typer(
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
    fmt: Annotated[Format, typer.Option("--format", "-f")] = Format.table,
    model: ModelOpt = None,
    device: DeviceOpt = None,
    precision: PrecisionOpt = None,
    db: DbOpt = None,
    max_megapixels: MegapixelsOpt = None,
) -> None:
    """Report corrupt files (exit code 1 if any), then score the readable ones."""
    from cliplens.tasks.quality import (
        ATTRIBUTES,
        DistortionProbe,
        build_screener,
        check_file,
        problem_of,
    )

    if sort not in ATTRIBUTES:
        raise InvalidInputError(f"--sort {sort}: one of {', '.join(ATTRIBUTES)}")
    files, missing = collect_images(paths)
    problems = [problem_of(e) for e in missing]
    scores = []
    if integrity_only:
        problems += [c for c in (check_file(f, max_megapixels) for f in files) if not c.ok]
    elif files:
        # each file is decoded once, by the encoder: what it cannot read is the finding
        from cliplens.models.ref import ModelRef

        ref = ModelRef(model, device=device, precision=precision)
        screener = build_screener(ref, DistortionProbe.load(probe) if probe else None)
        done = embed_paths(ref, files, db, max_megapixels)
        problems += [problem_of(e) for e in done.failures]
        problems += [c for p in done.paths if not (c := check_file(p, decode=False)).ok]
        features = None
        if probe is not None:
            features = embed_paths(ref, done.paths, db, max_megapixels, features=True).vectors
        scores = screener.score(done.paths, done.vectors, features)
        scores.sort(key=lambda s: s.attributes[sort])
        if worst is not None:
            scores = scores[:worst]
    if fmt is Format.json:
        print_json({"problems": [p.to_dict() for p in problems],
                    "scores": [s.to_dict() for s in scores]})  # fmt: skip
    elif fmt is Format.csv:
        names = list(ATTRIBUTES)
        print_csv(
            ["path", "problem", "reason", *names, "distortion", "distortion_probability"],
            [(p.path, p.problem, p.reason, *[""] * len(names), "", "") for p in problems]
            + [(s.path, "", "", *[f"{s.attributes[n]:.4f}" for n in names], s.distortion,
                f"{s.distortion_probability:.4f}") for s in scores],
        )  # fmt: skip
    else:
        if problems:
            print_table(["problem", "reason", "path"],
                        [(p.problem, p.reason, p.path) for p in problems],
                        title="Problems")  # fmt: skip
        if scores:
            names = list(ATTRIBUTES)
            print_table(
                [*names, "distortion", "path"],
                [(*[f"{s.attributes[n]:.2f}" for n in names],
                  f"{s.distortion} {s.distortion_probability:.2f}", s.path) for s in scores],
                title=f"Scores (0-1, higher is better; sorted by {sort})",
            )  # fmt: skip
        info(f"{len(files) + len(missing)} files, {len(problems)} with problems")
    if problems:
        raise typer.Exit(1)


@app.command("train")
def train_command(
    data: Annotated[Path, typer.Option("--data", help="A folder with one subfolder per type.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Where to write the probe (.npz).")],
    fmt: Annotated[Format, typer.Option("--format", "-f")] = Format.table,
    model: ModelOpt = None,
    device: DeviceOpt = None,
    precision: PrecisionOpt = None,
    db: DbOpt = None,
    max_megapixels: MegapixelsOpt = None,
) -> None:
    """Fit a few-shot distortion probe on embeddings; accuracy is cross-validated."""
    from cliplens.models.ref import ModelRef
    from cliplens.tasks.probe import labelled_folder
    from cliplens.tasks.quality import train_probe

    out_file(out, "--out")
    files, labels = labelled_folder(data)
    ref = ModelRef(model, device=device, precision=precision)
    x, y = embed_labelled(ref, files, labels, db, max_megapixels, features=True)
    probe = train_probe(x, y, ref.load().feature_id)
    probe.save(out)
    m = probe.metrics
    if fmt is Format.json:
        print_json({"probe": str(out), "classes": probe.classes, "metrics": m})
    else:
        acc = f"{m['cv_accuracy']:.3f}" if "cv_accuracy" in m else "n/a (too few per type)"
        print_table(["types", "examples", "cv accuracy"],
                    [(", ".join(probe.classes), int(m["examples"]), acc)])  # fmt: skip
        info(f"probe written to {out}")
