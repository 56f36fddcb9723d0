"""`cliplens train`: contrastive training of a CLIP on image-caption pairs."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from cliplens.cli.common import (
    MAX_BATCH,
    DeviceOpt,
    EpochsOpt,
    FiniteFloat,
    LrOpt,
    MaxMinutesOpt,
    SeedOpt,
    TemplatesOpt,
    library_names,
    new_app,
    out_folder,
)
from cliplens.cli.output import Format, info, print_json, print_table, show_progress
from cliplens.errors import InvalidInputError
from cliplens.limits import MAX_ALIGN_WEIGHT, MAX_TEMPERATURE, MAX_TRAIN_STEPS, SEVERITIES
from cliplens.textfile import read_lines

if TYPE_CHECKING:
    from cliplens.train.robust import RobustRow

# Commands import the library inside their bodies, so that `cliplens --help` and every
# other command start without torch (tests/unit/test_structure.py checks --help).

app = new_app(help="Train CLIP models.", no_args_is_help=True)
# the library's names of parameters that these commands' options call otherwise
library_names("train clip", out_dir="--out")
library_names("train robust", out_dir="--out")


def _labelled(path: Path):
    """(pair, label) for each row of a JSONL file that carries a "label"."""
    from cliplens.train.data import read_labelled_pairs

    if path.suffix.lower() != ".jsonl":
        raise InvalidInputError(f'{path}: give a .jsonl whose rows carry a "label"')
    return [(pair, label) for pair, label in read_labelled_pairs(path) if label]


@app.command("clip")
def clip_command(
    data: Annotated[
        Path,
        typer.Option(
            "--data",
            help="Training pairs: .jsonl, .csv, a folder, or WebDataset "
            "shards ('train-{000..009}.tar').",
        ),
    ],
    out: Annotated[Path, typer.Option("--out", "-o", help="Run folder (checkpoints, log, model).")],
    val: Annotated[Path | None, typer.Option("--val", help="Pairs for retrieval R@k.")] = None,
    zero_shot: Annotated[
        Path | None,
        typer.Option(
            "--zero-shot", help='A .jsonl whose rows carry a "label": zero-shot accuracy.'
        ),
    ] = None,
    classes: Annotated[
        Path | None, typer.Option("--classes", help="Class names, one per line (default: labels).")
    ] = None,
    templates: Annotated[
        Path | None,
        typer.Option("--templates", help="Zero-shot prompt templates, one per line, with {}."),
    ] = None,
    model_config: Annotated[
        str | None,
        typer.Option("--model-config", help="From scratch: a preset or JSON file [tiny-shapes]."),
    ] = None,
    init: Annotated[
        str | None,
        typer.Option("--init", help="Fine-tune this model (e.g. ViT-B-32:openai, local:PATH)."),
    ] = None,
    epochs: EpochsOpt = 10,
    batch_size: Annotated[int, typer.Option("--batch-size", "-b", min=2, max=MAX_BATCH)] = 128,
    accumulate: Annotated[
        int, typer.Option("--accumulate", help="Micro-batches per step.", min=1, max=1024)
    ] = 1,
    lr: LrOpt = 1e-3,
    warmup: Annotated[
        int, typer.Option("--warmup", help="Warmup steps.", min=0, max=MAX_TRAIN_STEPS)
    ] = 50,
    precision: Annotated[str, typer.Option("--precision", help="fp32 or bf16.")] = "fp32",
    loss: Annotated[str, typer.Option("--loss", help="clip or siglip.")] = "clip",
    lock: Annotated[str, typer.Option("--lock", help="none, image (LiT) or text.")] = "none",
    max_minutes: MaxMinutesOpt = None,
    seed: SeedOpt = 0,
    fmt: Annotated[Format, typer.Option("--format", "-f")] = Format.table,
) -> None:
    """Train a CLIP from scratch, or fine-tune one with --init; resumes from OUT/last.pt
    when it exists."""
    from cliplens.train.clip import ClipTrainConfig, clip_model_config, train_clip
    from cliplens.train.data import read_pairs

    out_folder(out, "--out")
    evals = _labelled(zero_shot) if zero_shot else []
    if classes is not None:
        names = read_lines(classes, "--classes", "class names, one per line")
    else:
        names = sorted({label for _, label in evals})
    prompts = ["a {}"]
    if templates is not None:
        prompts = read_lines(templates, "--templates", "prompt templates, one per line, with {}")
        if not prompts or not all("{}" in t for t in prompts):
            raise InvalidInputError(
                f"--templates {templates}: one template per line, each with {{}}"
            )
    model_cfg, arch = clip_model_config(model_config, init)
    cfg = ClipTrainConfig(
        model_cfg=model_cfg,
        arch=arch,
        init=init,
        epochs=epochs,
        batch_size=batch_size,
        accumulate=accumulate,
        lr=lr,
        warmup_steps=warmup,
        precision=precision,
        loss=loss,
        lock=lock,
        max_minutes=max_minutes,
        seed=seed,
        classes=names,
        templates=prompts,
    )
    val_pairs = read_pairs(val) if val else ()
    progress = show_progress()
    result = train_clip(cfg, read_pairs(data), out, val_pairs, evals, progress=progress)
    if fmt is Format.json:
        print_json(result.to_dict())
        return
    if result.metrics:
        keys = list(result.metrics[-1])
        print_table(keys, [[m.get(k, "") for k in keys] for m in result.metrics])
    if result.model_path:
        info(f"model: {result.model_path} (use it as --model local:{result.model_path})")


def _labelled_images(path: Path, what: str) -> tuple[list[Path], list[str]]:
    """(images, labels) from a folder of class subfolders or a .jsonl whose rows carry a
    "label" (rows without one are left out)."""
    from cliplens.tasks.probe import labelled_folder

    if path.is_dir():
        return labelled_folder(path)
    if path.suffix == ".jsonl" and path.is_file():
        rows = _labelled(path)
        if rows:
            return [Path(p.image) for p, _ in rows], [label for _, label in rows]
    raise InvalidInputError(
        f"{what} {path}: give a folder with one subfolder per class, or a .jsonl whose rows "
        'carry a "label"'
    )


def _images_of(path: Path) -> list:
    """Every image under a folder, or the images of pairs (.jsonl, .csv, .tsv, shards)."""
    from cliplens.images import iter_image_files
    from cliplens.train.data import read_pairs

    if path.is_dir():
        return list(iter_image_files([path]))
    return [p.source() for p in read_pairs(path)]


@app.command("robust")
def robust_command(
    teacher: Annotated[str, typer.Option("--teacher", help="The model to make robust.")],
    data: Annotated[
        Path, typer.Option("--data", help="Training images: a folder, or a .jsonl/.csv of pairs.")
    ],
    out: Annotated[Path, typer.Option("--out", "-o", help="Run folder (student, log, eval).")],
    corruptions: Annotated[
        str,
        typer.Option("--corruptions", help="Comma-separated: blur,noise,jpeg,pixelate,occlusion."),
    ] = "blur,noise,jpeg,pixelate,occlusion",
    severity: Annotated[
        str,
        typer.Option(
            "--severity", help=f"Levels to train on: {SEVERITIES[0]}-{SEVERITIES[-1]}, 3,5..."
        ),
    ] = f"{SEVERITIES[0]}-{SEVERITIES[-1]}",
    eval_data: Annotated[
        Path | None,
        typer.Option(
            "--eval", help="Held-out labelled images: class subfolders or .jsonl with labels."
        ),
    ] = None,
    eval_mode: Annotated[
        str,
        typer.Option(
            "--eval-mode", help="zero-shot (class names) or probe (fit on --data's labels)."
        ),
    ] = "zero-shot",
    templates: TemplatesOpt = "default",
    epochs: EpochsOpt = 3,
    batch_size: Annotated[int, typer.Option("--batch-size", "-b", min=2, max=MAX_BATCH)] = 64,
    lr: LrOpt = 1e-4,
    clean_fraction: Annotated[
        float,
        typer.Option(
            "--clean-fraction",
            help="Share of images shown clean.",
            click_type=FiniteFloat(0, 1, max_open=True),
        ),
    ] = 0.3,
    loss: Annotated[
        str,
        typer.Option(
            "--loss",
            help="simclr (the paper's NT-Xent) or clip-align (CLIP loss + alignment term).",
        ),
    ] = "simclr",
    temperature: Annotated[
        float,
        typer.Option(
            "--temperature",
            help="Of the contrastive loss (fixed).",
            click_type=FiniteFloat(0, MAX_TEMPERATURE, min_open=True),
        ),
    ] = 0.1,
    align_weight: Annotated[
        float | None,
        typer.Option(
            "--align-weight",
            help="Of the 1 - cosine term to the clean target [simclr: 0, clip-align: 10].",
            click_type=FiniteFloat(0, MAX_ALIGN_WEIGHT),
        ),
    ] = None,
    precision: Annotated[str, typer.Option("--precision", help="Student: fp32 or bf16.")] = "bf16",
    max_minutes: MaxMinutesOpt = None,
    seed: SeedOpt = 0,
    device: DeviceOpt = None,
    fmt: Annotated[Format, typer.Option("--format", "-f")] = Format.table,
) -> None:
    """Distil a corruption-robust image tower from a teacher (contrastive distillation),
    then compare teacher and student on corrupted held-out images."""
    from cliplens.corruptions import parse_corruptions, parse_severities
    from cliplens.tasks.classify import load_templates
    from cliplens.train.robust import (
        RobustConfig,
        evaluate_robust_run,
        load_teacher,
        parse_eval_mode,
        train_robust,
    )

    kinds = parse_corruptions(corruptions)
    levels = parse_severities(severity)
    mode = parse_eval_mode(eval_mode)
    cfg = RobustConfig(
        corruptions=kinds,
        severities=levels,
        clean_fraction=clean_fraction,
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        loss=loss,  # type: ignore[arg-type]  # checked by RobustConfig
        temperature=temperature,
        align_weight=align_weight,
        precision=precision,
        seed=seed,
        max_minutes=max_minutes,
    )
    out_folder(out, "--out")
    prompts = load_templates(templates)
    probe_files: list[Path] = []
    probe_labels: list[str] = []
    if eval_data is not None:
        eval_files, eval_labels = _labelled_images(eval_data, "--eval")
        if mode == "probe":
            probe_files, probe_labels = _labelled_images(data, "--data (for --eval-mode probe)")
    images = _images_of(data)
    model = load_teacher(teacher, device)
    result = train_robust(model, images, out, cfg, progress=show_progress())
    rows = []
    if eval_data is not None:
        rows = evaluate_robust_run(
            model,
            result,
            images,
            eval_files,
            eval_labels,
            mode,
            (probe_files, probe_labels),
            corruptions=kinds,
            templates=prompts,
            seed=seed,
            out=out,
            progress=show_progress(),
        )
    if fmt is Format.json:
        evaluation = [r.to_dict() for r in rows]
        print_json({**result.to_dict(), "eval_mode": mode if rows else None, "eval": evaluation})
        return
    if rows:
        header = ["corruption", "severity", "teacher", "student", "gain"]
        print_table(header, [_gain_row(r) for r in rows])
    saved = result.saved_path
    if result.model_path:
        info(f"student: {saved} (use it as --model local:{saved})")
    else:
        info(f"student image tower: {saved}")


def _gain_row(r: RobustRow) -> tuple:
    """A `RobustRow` as a table row: teacher, student and what the student gains."""
    teacher, student = r.accuracy["teacher"], r.accuracy["student"]
    gain = f"{student - teacher:+.3f}"
    return (r.corruption, r.severity or "", f"{teacher:.3f}", f"{student:.3f}", gain)
