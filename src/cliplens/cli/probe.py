"""`cliplens probe`: linear probes on embeddings (fit, predict, k-shot curves)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from cliplens.cli.common import (
    MAX_TOP_K,
    DbOpt,
    DeviceOpt,
    MegapixelsOpt,
    ModelOpt,
    PrecisionOpt,
    SeedOpt,
    TemplatesOpt,
    collect_images,
    embed_labelled,
    embed_paths,
    out_file,
)
from cliplens.cli.output import Format, info, print_csv, print_json, print_table, warn
from cliplens.errors import InvalidInputError

app = typer.Typer(help="Linear probes: fit a classifier on embeddings, predict, k-shot curves.",
                  no_args_is_help=True)  # fmt: skip

MAX_SHOTS = 100_000  # labelled images per class
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
    db: DbOpt = None,
    max_megapixels: MegapixelsOpt = None,
) -> None:
    """Fit a logistic-regression probe; C is chosen by cross-validation."""
    from cliplens.models.ref import ModelRef
    from cliplens.tasks.probe import fit_probe, labelled_folder

    out_file(out, "--out")
    files, labels = labelled_folder(data)
    ref = ModelRef(model, device=device, precision=precision)
    x, y = embed_labelled(ref, files, labels, db, max_megapixels, features)
    space = ref.load().feature_id if features else ref.info.model_id
    probe = fit_probe(x, y, space)
    probe.save(out)
    m = probe.metrics
    if fmt is Format.json:
        print_json({"probe": str(out), "classes": probe.classes, "metrics": m})
        return
    acc = f"{m['cv_accuracy']:.3f}" if "cv_accuracy" in m else "n/a (1 image in a class)"
    print_table(["classes", "examples", "C", "cv accuracy"],
                [(len(probe.classes), int(m["examples"]), f"{m['C']:g}", acc)])  # fmt: skip
    info(f"probe written to {out}")


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
    db: DbOpt = None,
    max_megapixels: MegapixelsOpt = None,
) -> None:
    """Classify images with a probe (the model must be the one it was fit with)."""
    from cliplens.models.ref import ModelRef
    from cliplens.tasks.probe import LinearProbe

    probe = LinearProbe.load(head)
    ref = ModelRef(model, device=device, precision=precision)
    if probe.model_id == ref.info.model_id:
        features = False
    elif probe.model_id == ref.load().feature_id:
        features = True
    else:
        raise InvalidInputError(
            f"--head {head} was fit on {probe.model_id}, not {ref.info.model_id}; pass the "
            "--model it was fit with"
        )
    files, failures = collect_images(paths)
    done = embed_paths(ref, files, db, max_megapixels, features=features)
    for failure in [*failures, *done.failures]:
        warn(f"{failure} (skipped)")
    probs = probe.probabilities(done.vectors)
    k = min(top_k, len(probe.classes))
    order = (-probs).argsort(axis=1)[:, :k]
    rows = [[(probe.classes[j], float(probs[i, j])) for j in order[i]]
            for i in range(len(done.paths))]  # fmt: skip
    if fmt is Format.json:
        print_json([{"path": p, "labels": [{"label": c, "probability": round(s, 6)}
                                           for c, s in r]}
                    for p, r in zip(done.paths, rows, strict=True)])  # fmt: skip
    elif fmt is Format.csv:
        print_csv(["path", "rank", "label", "probability"],
                  [(p, i + 1, c, f"{s:.4f}") for p, r in zip(done.paths, rows, strict=True)
                   for i, (c, s) in enumerate(r)])  # fmt: skip
    else:
        print_table(["image", *(f"#{i + 1}" for i in range(k))],
                    [(p, *(f"{c} {s:.2f}" for c, s in r))
                     for p, r in zip(done.paths, rows, strict=True)])  # fmt: skip
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
    db: DbOpt = None,
    max_megapixels: MegapixelsOpt = None,
) -> None:
    """Accuracy of probes fit on k images per class, against zero-shot with the class names."""
    from cliplens.models.ref import ModelRef
    from cliplens.tasks.classify import load_templates
    from cliplens.tasks.probe import kshot, labelled_folder, split_per_class, zero_shot_accuracy

    try:
        ks = sorted({int(s) for s in shots.split(",") if s.strip()})
    except ValueError:
        raise InvalidInputError(f"--shots {shots}: comma-separated integers, e.g. 1,2,4") from None
    if not ks or ks[0] < 1 or ks[-1] > MAX_SHOTS:
        raise InvalidInputError(f"--shots {shots}: shots from 1 to {MAX_SHOTS}")
    prompts = load_templates(templates)
    files, labels = labelled_folder(data)
    ref = ModelRef(model, device=device, precision=precision)
    x, y = embed_labelled(ref, files, labels, db, max_megapixels, features)
    if test is not None:
        tfiles, tlabels = labelled_folder(test)
        tx, ty = embed_labelled(ref, tfiles, tlabels, db, max_megapixels, features)
        unknown = sorted(set(ty) - set(y))
        if unknown:
            raise InvalidInputError(f"--test {test} has classes not in --data: {unknown}")
    else:
        pool, held = split_per_class(y, seed=seed)
        tx, ty = x[held], [y[i] for i in held]
        x, y = x[pool], [y[i] for i in pool]
    curve = kshot(x, y, tx, ty, ks, repeats, seed)
    skipped = [k for k in ks if k not in {int(r["shots"]) for r in curve}]
    if skipped:
        warn(f"shots {skipped} skipped: the smallest class has fewer training images")
    zero = None
    if not features:  # zero-shot needs the embedding space
        zero = zero_shot_accuracy(ref, tx, ty, prompts)
    if fmt is Format.json:
        print_json({"model": ref.info.model_id, "classes": len(set(y)), "test_images": len(ty),
                    "zero_shot_accuracy": zero, "kshot": curve})  # fmt: skip
        return
    rows = [(int(r["shots"]), f"{r['accuracy']:.3f} ± {r['std']:.3f}") for r in curve]
    if zero is not None:
        rows.append(("zero-shot", f"{zero:.3f}"))
    print_table(["shots per class", f"accuracy ({len(ty)} test images)"], rows)
