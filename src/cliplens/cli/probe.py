"""`cliplens probe`: linear probes on embeddings (fit, predict, k-shot curves).

Commands import the library inside their functions, so `cliplens --help` imports none
of it (no torch).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from cliplens.cli.common import (
    MAX_TOP_K,
    DbOpt,
    DeviceOpt,
    EngineOpt,
    MegapixelsOpt,
    ModelOpt,
    PrecisionOpt,
    SeedOpt,
    TemplatesOpt,
    collect_images,
    library_names,
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
    from cliplens.models.ref import ModelRef
    from cliplens.tasks.probe import LabelledVectors

app = new_app(
    help="Linear probes: fit a classifier on embeddings, predict, k-shot curves.",
    no_args_is_help=True,
)
library_names("probe predict", probe="--head")
FeaturesOpt = Annotated[
    bool,
    typer.Option(
        "--features",
        help="Fit on the encoder's probe features (offline: MobileNetV2 pooled) instead of "
        "the embeddings.",
    ),
]


@app.command("fit")
def fit_command(
    data: Annotated[
        Path, typer.Option("--data", help="A folder with one subfolder of images per class.")
    ],
    out: Annotated[Path, typer.Option("--out", "-o", help="Where to write the probe file.")],
    features: FeaturesOpt = False,
    fmt: Annotated[Format, typer.Option("--format", "-f")] = Format.table,
    model: ModelOpt = None,
    device: DeviceOpt = None,
    precision: PrecisionOpt = None,
    engine: EngineOpt = None,
    db: DbOpt = None,
    max_megapixels: MegapixelsOpt = None,
) -> None:
    """Fit a logistic-regression probe; C is chosen by cross-validation."""
    from cliplens.models.ref import ModelRef
    from cliplens.tasks.probe import fit_folder_probe

    out_file(out, "--out")
    ref = ModelRef(model, device=device, precision=precision)
    probe = fit_folder_probe(_labelled(data, ref, features, db, max_megapixels), ref)
    probe.save(out)
    m = probe.metrics
    if fmt is Format.json:
        print_json({"probe": str(out), "classes": probe.classes, "metrics": m})
        return
    acc = f"{m['cv_accuracy']:.3f}" if "cv_accuracy" in m else "n/a (1 image in a class)"
    row = (len(probe.classes), int(m["examples"]), f"{m['C']:g}", acc)
    print_table(["classes", "examples", "C", "cv accuracy"], [row])
    info(f"probe written to {out}")


def _labelled(
    folder: Path, ref: ModelRef, features: bool, db: Path | None, max_megapixels: float | None
) -> LabelledVectors:
    """A labelled folder's vectors; the images that could not be read are warned about."""
    from cliplens.tasks.probe import embed_labelled_folder

    catalog, progress = read_catalog(db), show_progress()
    found = embed_labelled_folder(folder, ref, features, catalog, max_megapixels, progress)
    for failure in found.failures:
        warn(f"{failure} (skipped)")
    return found


@app.command("predict")
def predict_command(
    paths: Annotated[list[Path], typer.Argument(help="Image files or folders.")],
    head: Annotated[Path, typer.Option("--head", help="A probe from 'cliplens probe fit'.")],
    top_k: Annotated[
        int, typer.Option("--top-k", "-k", help="Classes to show per image.", min=1, max=MAX_TOP_K)
    ] = 1,
    fmt: Annotated[Format, typer.Option("--format", "-f")] = Format.table,
    model: ModelOpt = None,
    device: DeviceOpt = None,
    precision: PrecisionOpt = None,
    engine: EngineOpt = None,
    db: DbOpt = None,
    max_megapixels: MegapixelsOpt = None,
) -> None:
    """Classify images with a probe (the model must be the one it was fit with)."""
    from cliplens.models.ref import ModelRef
    from cliplens.tasks.probe import LinearProbe

    probe = LinearProbe.load(head)
    ref = ModelRef(model, device=device, precision=precision)
    probe.uses_features(ref)  # a probe of another model fails before the files are read
    files, failures = collect_images(paths)
    catalog, progress = read_catalog(db), show_progress()
    done = probe.predict_files(files, ref, top_k, catalog, max_megapixels, progress)
    for failure in [*failures, *done.failures]:
        warn(f"{failure} (skipped)")
    preds = done.predictions
    if fmt is Format.json:
        print_json([p.to_dict() for p in preds])
    elif fmt is Format.csv:
        rows = [(p.path, i + 1, c, f"{s:.4f}") for p in preds for i, (c, s) in enumerate(p.labels)]
        print_csv(["path", "rank", "label", "probability"], rows)
    else:
        k = min(top_k, len(probe.classes))
        rows = [(p.path, *(f"{c} {s:.2f}" for c, s in p.labels)) for p in preds]
        print_table(["image", *(f"#{i + 1}" for i in range(k))], rows)
    if failures or done.failures:
        raise typer.Exit(1)


@app.command("kshot")
def kshot_command(
    data: Annotated[
        Path, typer.Option("--data", help="A folder with one subfolder of images per class.")
    ],
    test: Annotated[
        Path | None,
        typer.Option("--test", help="Test images, laid out like --data (default: 20% of it)."),
    ] = None,
    shots: Annotated[
        str, typer.Option("--shots", help="Images per class, comma-separated.")
    ] = "1,2,4,8,16",
    repeats: Annotated[
        int, typer.Option("--repeats", help="Draws per k (mean, std).", min=1, max=1000)
    ] = 5,
    templates: TemplatesOpt = "default",
    features: FeaturesOpt = False,
    seed: SeedOpt = 0,
    fmt: Annotated[Format, typer.Option("--format", "-f")] = Format.table,
    model: ModelOpt = None,
    device: DeviceOpt = None,
    precision: PrecisionOpt = None,
    engine: EngineOpt = None,
    db: DbOpt = None,
    max_megapixels: MegapixelsOpt = None,
) -> None:
    """Accuracy of probes fit on k images per class, against zero-shot with the class names."""
    from cliplens.models.ref import ModelRef
    from cliplens.tasks.classify import load_templates
    from cliplens.tasks.probe import kshot_report, parse_shots

    ks = parse_shots(shots)
    prompts = load_templates(templates)
    ref = ModelRef(model, device=device, precision=precision)
    train = _labelled(data, ref, features, db, max_megapixels)
    held = _labelled(test, ref, features, db, max_megapixels) if test is not None else None
    report = kshot_report(train, held, ref, ks, repeats, prompts, seed)
    if report.skipped:
        warn(f"shots {report.skipped} skipped: the smallest class has fewer training images")
    if fmt is Format.json:
        print_json(report.to_dict())
        return
    rows = [(p.shots, f"{p.accuracy:.3f} ± {p.std:.3f}") for p in report.curve]
    if report.zero_shot_accuracy is not None:
        rows.append(("zero-shot", f"{report.zero_shot_accuracy:.3f}"))
    print_table(["shots per class", f"accuracy ({report.test_images} test images)"], rows)
