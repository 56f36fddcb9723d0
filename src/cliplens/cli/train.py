"""`cliplens train`: contrastive training of a CLIP on image-caption pairs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from cliplens.cli.output import Format, info, print_json, print_table, show_progress
from cliplens.errors import InvalidInputError

app = typer.Typer(help="Train CLIP models.", no_args_is_help=True)


def _model_config(spec: str) -> dict:
    from cliplens.train.clip import PRESETS

    if spec in PRESETS:
        return PRESETS[spec]
    path = Path(spec)
    if not path.is_file():
        raise InvalidInputError(
            f"--model-config {spec}: a preset ({', '.join(PRESETS)}) or a JSON file of "
            "open_clip.CLIP arguments"
        )
    try:
        return json.loads(path.read_text())
    except ValueError as e:
        raise InvalidInputError(f"--model-config {spec}: not valid JSON ({e})") from None


def _labelled(path: Path):
    """(pair, label) for each row of a JSONL file that carries a "label"."""
    from cliplens.train.data import read_pairs

    rows = [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines() if x.strip()]
    pairs = read_pairs(path)
    return [(p, r["label"]) for p, r in zip(pairs, rows, strict=True) if r.get("label")]


@app.command("clip")
def clip_command(
    data: Annotated[Path, typer.Option("--data", help="Training pairs: .jsonl, .csv or a folder.")],
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
        str, typer.Option("--model-config", help="Preset or JSON file.")
    ] = "tiny-shapes",
    epochs: Annotated[int, typer.Option("--epochs")] = 10,
    batch_size: Annotated[int, typer.Option("--batch-size", "-b")] = 128,
    accumulate: Annotated[int, typer.Option("--accumulate", help="Micro-batches per step.")] = 1,
    lr: Annotated[float, typer.Option("--lr")] = 1e-3,
    warmup: Annotated[int, typer.Option("--warmup", help="Warmup steps.")] = 50,
    precision: Annotated[str, typer.Option("--precision", help="fp32 or bf16.")] = "fp32",
    loss: Annotated[str, typer.Option("--loss", help="clip or siglip.")] = "clip",
    lock: Annotated[str, typer.Option("--lock", help="none, image (LiT) or text.")] = "none",
    max_minutes: Annotated[float | None, typer.Option("--max-minutes")] = None,
    seed: Annotated[int, typer.Option("--seed")] = 0,
    fmt: Annotated[Format, typer.Option("--format", "-f")] = Format.table,
) -> None:
    """Train a CLIP from scratch; resumes from OUT/last.pt when it exists."""
    from cliplens.train.clip import TrainConfig, train
    from cliplens.train.data import read_pairs

    evals = _labelled(zero_shot) if zero_shot else []
    if classes is not None:
        lines = classes.read_text(encoding="utf-8").splitlines()
        names = [x.strip() for x in lines if x.strip()]
    else:
        names = sorted({label for _, label in evals})
    prompts = ["a {}"]
    if templates is not None:
        prompts = [x.strip() for x in templates.read_text(encoding="utf-8").splitlines()
                   if x.strip()]  # fmt: skip
        if not prompts or not all("{}" in t for t in prompts):
            raise InvalidInputError(
                f"--templates {templates}: one template per line, each with {{}}"
            )
    arch = Path(model_config).stem if model_config.endswith(".json") else model_config
    cfg = TrainConfig(
        model_cfg=_model_config(model_config), arch=arch, epochs=epochs, batch_size=batch_size,
        accumulate=accumulate, lr=lr, warmup_steps=warmup, precision=precision, loss=loss,
        lock=lock, max_minutes=max_minutes, seed=seed, classes=names, templates=prompts,
    )  # fmt: skip
    result = train(cfg, read_pairs(data), out, read_pairs(val) if val else (), evals,
                   progress=show_progress())  # fmt: skip
    if fmt is Format.json:
        print_json({"steps": result.steps, "epochs": result.epochs_done,
                    "model": str(result.model_path) if result.model_path else None,
                    "metrics": result.metrics})  # fmt: skip
        return
    if result.metrics:
        keys = list(result.metrics[-1])
        print_table(keys, [[m.get(k, "") for k in keys] for m in result.metrics])
    if result.model_path:
        info(f"model: {result.model_path} (use it as --model local:{result.model_path})")
