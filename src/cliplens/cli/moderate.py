"""`cliplens moderate`: flag images by similarity to unsafe concepts; calibrate; train heads.

Commands import the library inside their functions, so `cliplens --help` imports none
of it (no torch).
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from cliplens.cli.common import (
    DbOpt,
    DefaultCommandGroup,
    DeviceOpt,
    EngineOpt,
    ExcludeOpt,
    FiniteFloat,
    MegapixelsOpt,
    ModelOpt,
    PrecisionOpt,
    collect_images,
    library_names,
    new_app,
    out_file,
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

if TYPE_CHECKING:
    from cliplens.tasks.moderate import OperatingPoint, Verdict

# Commands import the library inside their bodies, so that `cliplens --help` and every
# other command start without torch (tests/unit/test_structure.py checks --help).

app = new_app(
    cls=DefaultCommandGroup,
    help="Flag images by cosine similarity to unsafe concepts (a YAML policy).",
    no_args_is_help=True,
)
PolicyOpt = Annotated[str, typer.Option("--policy", "-p", help="'default' or a policy YAML file.")]


library_names("moderate", out_dir="--redact")
library_names("moderate check", out_dir="--redact")
library_names("moderate train-head", head="--head")


def _moderator(policy_name: str, model, device, precision):
    """The model and the moderator of a policy; the policy's warnings are printed."""
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
    return ref, moderator


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
    engine: EngineOpt = None,
    db: DbOpt = None,
    max_megapixels: MegapixelsOpt = None,
    exclude: ExcludeOpt = None,
) -> None:
    """Verdict per image: flagged or not, category, closest concept, score, margin."""
    from cliplens.tasks.moderate import moderate
    from cliplens.tasks.moderate import redact as redact_image

    if redact is not None:
        out_folder(redact, "--redact")
    files, missing = collect_images(paths, exclude)
    ref, moderator = _moderator(policy, model, device, precision)
    catalog, progress = read_catalog(db), show_progress()
    done = moderate(
        files,
        ref,
        moderator=moderator,
        catalog=catalog,
        max_megapixels=max_megapixels,
        progress=progress,
    )
    verdicts = done.verdicts
    for e in [*missing, *done.failures]:
        warn(f"{e} (not checked)")
    if redact is not None:
        for v in done.flagged:
            info(f"redacted copy: {redact_image(v.path, redact)}")
    shown = done.flagged if only_flagged else verdicts
    if fmt is Format.json:
        print_json([v.to_dict() for v in shown])
    elif fmt is Format.csv:
        header = ["path", "flagged", "category", "concept", "score", "threshold", "margin"]
        print_csv([*header, "special_care"], [_csv_row(v) for v in shown])
    else:
        rows = [_table_row(v) for v in shown]
        print_table(["verdict", "category", "closest concept", "score", "margin", "path"], rows)
        flagged = len(done.flagged)
        info(f"{flagged} of {len(verdicts)} flagged ({done.reused} embeddings from the catalog)")
    if missing or done.failures:
        raise typer.Exit(1)


def _csv_row(v: Verdict) -> tuple:
    numbers = (f"{v.score:.4f}", f"{v.threshold:.4f}", f"{v.margin:.4f}")
    return (v.path, v.flagged, v.category, v.concept, *numbers, v.special_care or "")


def _table_row(v: Verdict) -> tuple:
    verdict = "FLAGGED" if v.flagged else "ok"
    return (verdict, v.category, v.concept, f"{v.score:.3f}", f"{v.margin:+.3f}", v.path)


def _examples(positive: Path, negative: Path, ref, db, max_megapixels):
    """The labelled examples of the positive and negative folders; unreadable images are
    warned about."""
    from cliplens.tasks.moderate import labelled_examples

    found = labelled_examples(
        positive, negative, ref, read_catalog(db), max_megapixels, show_progress()
    )
    for e in [*found.positives.failures, *found.negatives.failures]:
        warn(f"{e} (skipped)")
    return found


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
    engine: EngineOpt = None,
    db: DbOpt = None,
    max_megapixels: MegapixelsOpt = None,
) -> None:
    """Choose thresholds from labelled examples for a target precision or recall."""
    from cliplens.tasks.moderate import calibrate_policy

    out_file(out, "--out")
    ref, moderator = _moderator(policy, model, device, precision)
    examples = _examples(positive, negative, ref, db, max_megapixels)
    targets = (target_precision, target_recall)
    new, points = calibrate_policy(moderator, examples, ref.info.name, *targets)
    new.save(out)
    if fmt is Format.json:
        print_json({"policy": str(out), "points": {k: p.to_dict() for k, p in points.items()}})
    else:
        print_table(
            ["scope", "offset", "precision", "recall", "ROC AUC", "PR AUC", "pos", "neg"],
            [_point_row(scope, p) for scope, p in points.items()],
        )
        info(f"calibrated policy written to {out}")


def _point_row(scope: str, p: OperatingPoint) -> tuple:
    rates = (f"{p.precision:.3f}", f"{p.recall:.3f}", f"{p.roc_auc:.3f}", f"{p.pr_auc:.3f}")
    return (scope, f"{p.offset:+.4f}", *rates, p.positives, p.negatives)


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
    head_kind: Annotated[
        str,
        typer.Option(
            "--head", help="linear (logistic regression) or mlp (LAION's NSFW detector's layers)."
        ),
    ] = "linear",
    fmt: Annotated[Format, typer.Option("--format", "-f")] = Format.table,
    model: ModelOpt = None,
    device: DeviceOpt = None,
    precision: PrecisionOpt = None,
    engine: EngineOpt = None,
    db: DbOpt = None,
    max_megapixels: MegapixelsOpt = None,
) -> None:
    """Fit a head on embeddings (cross-validated) and add it to a policy: logistic
    regression, or with --head mlp the layers of LAION's CLIP NSFW detector."""
    from cliplens.models.ref import ModelRef
    from cliplens.tasks.heads import HEAD_KINDS
    from cliplens.tasks.moderate import head_file_for, save_with_head, train_head
    from cliplens.tasks.policy import load_policy

    if head_kind not in HEAD_KINDS:  # before any image is embedded
        raise InvalidInputError(f"`head` {head_kind}: {' or '.join(HEAD_KINDS)}")
    out_file(out, "--out")
    out_file(head_file_for(out), "the head file beside --out")
    pol = load_policy(policy)
    ref = ModelRef(model, device=device, precision=precision)
    found = _examples(positive, negative, ref, db, max_megapixels)
    vectors = (found.positives.vectors, found.negatives.vectors)
    head = train_head(*vectors, ref.info.model_id, head=head_kind)  # type: ignore[arg-type]
    head_file = save_with_head(pol, head, ref.info.name, out, threshold, category)
    m = head.metrics
    if fmt is Format.json:
        print_json({"policy": str(out), "head": str(head_file), "metrics": m})
    else:
        aucs = (f"{m['cv_accuracy']:.3f}", f"{m['cv_roc_auc']:.3f}", f"{m['cv_pr_auc']:.3f}")
        counts = (int(m["folds"]), int(m["positives"]), int(m["negatives"]))
        print_table(
            ["cv accuracy", "cv ROC AUC", "cv PR AUC", "folds", "pos", "neg"], [(*aucs, *counts)]
        )
        info(f"head written to {head_file}; policy with the head: {out}")
