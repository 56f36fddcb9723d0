"""`cliplens moderate`: flag images by similarity to unsafe concepts; calibrate; train heads."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Annotated

import typer

from cliplens.cli.common import (
    DbOpt,
    DefaultCommandGroup,
    DeviceOpt,
    FiniteFloat,
    MegapixelsOpt,
    ModelOpt,
    PrecisionOpt,
    collect_images,
    embed_paths,
    out_file,
    out_folder,
)
from cliplens.cli.output import Format, info, print_csv, print_json, print_table, warn
from cliplens.errors import InvalidInputError

app = typer.Typer(
    cls=DefaultCommandGroup,
    help="Flag images by cosine similarity to unsafe concepts (a YAML policy).",
    no_args_is_help=True,
)
PolicyOpt = Annotated[str, typer.Option("--policy", "-p", help="'default' or a policy YAML file.")]


def _moderator(policy_name: str, model, device, precision):
    from cliplens.models.ref import ModelRef
    from cliplens.tasks.moderate import build_moderator
    from cliplens.tasks.policy import load_policy

    policy = load_policy(policy_name)
    ref = ModelRef(model, device=device, precision=precision)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        moderator = build_moderator(policy, ref)
    for w in caught:
        warn(str(w.message))
    return policy, ref, moderator


@app.command("check")
def check_command(
    paths: Annotated[list[Path], typer.Argument(help="Image files or folders.")],
    policy: PolicyOpt = "default",
    fmt: Annotated[Format, typer.Option("--format", "-f")] = Format.table,
    only_flagged: Annotated[
        bool, typer.Option("--only-flagged", help="List flagged images only.")
    ] = False,
    redact: Annotated[
        Path | None,
        typer.Option("--redact", help="Write blurred copies of flagged images into this folder."),
    ] = None,
    model: ModelOpt = None,
    device: DeviceOpt = None,
    precision: PrecisionOpt = None,
    db: DbOpt = None,
    max_megapixels: MegapixelsOpt = None,
) -> None:
    """Verdict per image: flagged or not, category, closest concept, score, margin."""
    from cliplens.tasks.moderate import redact as redact_image

    if redact is not None:
        out_folder(redact, "--redact")
    files, missing = collect_images(paths)
    _, ref, moderator = _moderator(policy, model, device, precision)
    done = embed_paths(ref, files, db, max_megapixels)
    verdicts = moderator.judge(done.paths, done.vectors)
    for e in [*missing, *done.failures]:
        warn(f"{e} (not checked)")
    if redact is not None:
        for v in verdicts:
            if v.flagged:
                v_out = redact_image(v.path, redact)
                info(f"redacted copy: {v_out}")
    shown = [v for v in verdicts if v.flagged or not only_flagged]
    if fmt is Format.json:
        print_json([v.to_dict() for v in shown])
    elif fmt is Format.csv:
        print_csv(
            ["path", "flagged", "category", "concept", "score", "threshold", "margin",
             "special_care"],
            [(v.path, v.flagged, v.category, v.concept, f"{v.score:.4f}", f"{v.threshold:.4f}",
              f"{v.margin:.4f}", v.special_care or "") for v in shown],
        )  # fmt: skip
    else:
        rows = [("FLAGGED" if v.flagged else "ok", v.category, v.concept, f"{v.score:.3f}",
                 f"{v.margin:+.3f}", v.path) for v in shown]  # fmt: skip
        print_table(["verdict", "category", "closest concept", "score", "margin", "path"], rows)
        flagged = sum(v.flagged for v in verdicts)
        info(f"{flagged} of {len(verdicts)} flagged ({done.reused} embeddings from the catalog)")
    if missing or done.failures:
        raise typer.Exit(1)


def _labelled(positive: Path, negative: Path, ref, db, max_megapixels):
    """Embeddings of the positive and negative folders, and each positive's category
    (its subfolder under `positive`, when all positives sit in subfolders)."""
    for folder, what in ((positive, "--positive"), (negative, "--negative")):
        if not folder.is_dir():
            raise InvalidInputError(f"{what} {folder} is not a folder of images")
    pos_files, _ = collect_images([positive])
    neg_files, _ = collect_images([negative])
    pos = embed_paths(ref, pos_files, db, max_megapixels)
    neg = embed_paths(ref, neg_files, db, max_megapixels)
    for e in [*pos.failures, *neg.failures]:
        warn(f"{e} (skipped)")
    root = positive.resolve()
    parts = [Path(p).relative_to(root).parts for p in pos.paths]
    categories = [p[0] for p in parts] if parts and all(len(p) > 1 for p in parts) else None
    return pos, neg, categories


@app.command("calibrate")
def calibrate_command(
    positive: Annotated[
        Path,
        typer.Option(
            "--positive",
            help="Images that must be flagged (subfolders named after categories: per category).",
        ),
    ],
    negative: Annotated[Path, typer.Option("--negative", help="Images that must pass.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Where to write the calibrated policy.")],
    policy: PolicyOpt = "default",
    target_precision: Annotated[
        float | None,
        typer.Option("--target-precision", click_type=FiniteFloat(0, 1, min_open=True)),
    ] = None,
    target_recall: Annotated[
        float | None, typer.Option("--target-recall", click_type=FiniteFloat(0, 1, min_open=True))
    ] = None,
    fmt: Annotated[Format, typer.Option("--format", "-f")] = Format.table,
    model: ModelOpt = None,
    device: DeviceOpt = None,
    precision: PrecisionOpt = None,
    db: DbOpt = None,
    max_megapixels: MegapixelsOpt = None,
) -> None:
    """Choose thresholds from labelled examples for a target precision or recall."""
    from dataclasses import replace

    from cliplens.tasks.moderate import calibrate

    out_file(out, "--out")
    pol, ref, moderator = _moderator(policy, model, device, precision)
    pos, neg, categories = _labelled(positive, negative, ref, db, max_megapixels)
    if categories is not None:
        unknown = sorted(set(categories) - set(moderator.categories))
        if unknown:
            raise InvalidInputError(
                f"--positive subfolders {', '.join(unknown)} are not categories of the policy "
                f"({', '.join(dict.fromkeys(moderator.categories))})"
            )
    new, points = calibrate(moderator, pos.vectors, neg.vectors, target_precision,
                            target_recall, categories)  # fmt: skip
    target = (f"precision >= {target_precision}" if target_precision is not None
              else f"recall >= {target_recall}")  # fmt: skip
    note = (f"Calibrated for {ref.info.name} on {len(pos.paths)} positive and "
            f"{len(neg.paths)} negative images for {target}. Started from: {pol.note}")  # fmt: skip
    new = replace(new, model=ref.info.name, note=note, name=f"{pol.name}-calibrated")
    new.save(out)
    if fmt is Format.json:
        print_json({"policy": str(out), "points": {k: p.to_dict() for k, p in points.items()}})
    else:
        print_table(
            ["scope", "offset", "precision", "recall", "ROC AUC", "PR AUC", "pos", "neg"],
            [(k, f"{p.offset:+.4f}", f"{p.precision:.3f}", f"{p.recall:.3f}", f"{p.roc_auc:.3f}",
              f"{p.pr_auc:.3f}", p.positives, p.negatives) for k, p in points.items()],
        )  # fmt: skip
        info(f"calibrated policy written to {out}")


@app.command("train-head")
def train_head_command(
    positive: Annotated[Path, typer.Option("--positive", help="Images to flag.")],
    negative: Annotated[Path, typer.Option("--negative", help="Images that must pass.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="The policy to write, with its head.")],
    policy: PolicyOpt = "default",
    threshold: Annotated[
        float,
        typer.Option(
            "--threshold",
            help="Head probability that flags.",
            click_type=FiniteFloat(0, 1, min_open=True, max_open=True),
        ),
    ] = 0.5,
    category: Annotated[
        str, typer.Option("--category", help="Name reported when the head flags.")
    ] = "trained head",
    fmt: Annotated[Format, typer.Option("--format", "-f")] = Format.table,
    model: ModelOpt = None,
    device: DeviceOpt = None,
    precision: PrecisionOpt = None,
    db: DbOpt = None,
    max_megapixels: MegapixelsOpt = None,
) -> None:
    """Fit a logistic-regression head on embeddings (cross-validated) and add it to a policy."""
    from dataclasses import replace

    from cliplens.tasks.moderate import train_head
    from cliplens.tasks.policy import Head, load_policy

    out_file(out, "--out")
    head_path = out.with_suffix(".head.npz")
    out_file(head_path, "the head file beside --out")
    from cliplens.models.ref import ModelRef

    pol = load_policy(policy)
    ref = ModelRef(model, device=device, precision=precision)
    pos, neg, _ = _labelled(positive, negative, ref, db, max_megapixels)
    head = train_head(pos.vectors, neg.vectors, ref.info.model_id)
    head_file = head.save(head_path)
    new = replace(pol, head=Head(head_file.resolve(), threshold, category), model=ref.info.name)
    new.save(out)
    m = head.metrics
    if fmt is Format.json:
        print_json({"policy": str(out), "head": str(head_file), "metrics": m})
    else:
        print_table(["cv accuracy", "cv ROC AUC", "cv PR AUC", "folds", "pos", "neg"],
                    [(f"{m['cv_accuracy']:.3f}", f"{m['cv_roc_auc']:.3f}", f"{m['cv_pr_auc']:.3f}",
                      int(m["folds"]), int(m["positives"]), int(m["negatives"]))])  # fmt: skip
        info(f"head written to {head_file}; policy with the head: {out}")
