"""`cliplens caption`: caption images with a ClipCap captioner; train one; evaluate one."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Annotated

import typer

from cliplens.cli.common import (
    MAX_COUNT,
    BatchSizeOpt,
    DbOpt,
    DefaultCommandGroup,
    DeviceOpt,
    EngineOpt,
    EpochsOpt,
    FiniteFloat,
    LrOpt,
    MaxMinutesOpt,
    MegapixelsOpt,
    ModelOpt,
    PrecisionOpt,
    SeedOpt,
    collect_images,
    embed_paths,
    library_names,
    new_app,
    out_file,
    out_folder,
    read_catalog,
)
from cliplens.cli.output import Format, info, print_csv, print_json, print_table, show_progress
from cliplens.cli.output import warn as warn_message
from cliplens.limits import (
    MAX_CAPTION_TOKENS,
    MAX_LM_LAYERS,
    MAX_LM_WIDTH,
    MAX_LR,
    MAX_MAPPER_LAYERS,
    MAX_PREFIX_LENGTH,
    MAX_TRAIN_STEPS,
    MIN_LM_WIDTH,
)

# Commands import the library inside their bodies, so that `cliplens --help` and every
# other command start without torch (tests/unit/test_structure.py checks --help).

# the library's names of parameters that these commands' options call otherwise
library_names("caption run", beams="--beam", candidates="--rerank")
library_names("caption eval", beams="--beam", candidates="--rerank")
library_names("caption train", out_dir="--out", train_lm="--freeze-lm")
app = new_app(
    cls=DefaultCommandGroup,
    help="Caption images with a CLIP prefix and a language model (ClipCap): caption, train, eval.",
    no_args_is_help=True,
)
CaptionerOpt = Annotated[
    Path,
    typer.Option(
        "--captioner",
        "-c",
        help="Captioner folder (`caption train` writes it), or a checkpoint file of the ClipCap "
        "authors (coco_weights.pt, conceptual_weights.pt, their transformer model).",
    ),
]
TokenizerOpt = Annotated[
    str,
    typer.Option(
        "--tokenizer", help="With an authors' checkpoint: GPT-2's tokenizer (hub name or folder)."
    ),
]
NormalizeOpt = Annotated[
    bool | None,
    typer.Option(
        "--normalize-prefix/--raw-prefix",
        help="With an authors' checkpoint: divide the CLIP embedding by its norm first "
        "(default: as the checkpoint was trained; their transformer model yes, MLP ones no).",
    ),
]
MAX_BEAMS = 64  # beams or rerank candidates: each is a whole decoding per image
BeamOpt = Annotated[
    int, typer.Option("--beam", help="Beam search with this many beams.", min=1, max=MAX_BEAMS)
]
TopPOpt = Annotated[
    float | None,
    typer.Option(
        "--top-p",
        help="Nucleus sampling with this top-p (seeded).",
        click_type=FiniteFloat(0, 1, min_open=True),
    ),
]
RerankOpt = Annotated[
    int,
    typer.Option(
        "--rerank",
        help="Draw N candidates (greedy + nucleus samples) and keep the one the encoder "
        "finds closest to the image.",
        min=1,
        max=MAX_BEAMS,
    ),
]
MaxTokensOpt = Annotated[
    int | None,
    typer.Option("--max-tokens", help="Longest caption in tokens.", min=1, max=MAX_CAPTION_TOKENS),
]


def _captioner_and_encoder(
    captioner_dir: Path, model, device, precision, tokenizer="gpt2", normalize=None
):
    """The captioner, and the encoder its embeddings come from (refusing any other)."""
    from cliplens.captioning.model import check_encoder, load_captioner, read_config
    from cliplens.captioning.reference import is_checkpoint_file
    from cliplens.models.ref import ModelRef

    if is_checkpoint_file(captioner_dir):
        return _checkpoint_and_encoder(
            captioner_dir, model, device, precision, tokenizer, normalize
        )
    cfg = read_config(captioner_dir)  # fails fast, before any model loads
    ref = ModelRef(model or cfg.encoder, device=device, precision=precision)
    if model:
        check_encoder(cfg, ref.info.model_id, ref.name)
    return load_captioner(captioner_dir).to(_device(device)), ref


def _checkpoint_and_encoder(path: Path, model, device, precision, tokenizer, normalize):
    """An authors' checkpoint, and its CLIP (the one it expects unless --model)."""
    from cliplens.captioning.model import reference_encoder
    from cliplens.captioning.reference import load_clipcap_checkpoint
    from cliplens.models.ref import ModelRef

    cap = load_clipcap_checkpoint(path, tokenizer=tokenizer, normalize_prefix=normalize)
    if model:
        ref = ModelRef(model, device=device, precision=precision or "fp32")
    else:
        ref = reference_encoder(cap, device, precision)
    cap.check_encoder(ref)
    return cap.to(_device(device)), ref


def _device(device: str | None):
    from cliplens.device import choose_device

    return choose_device(device)


@app.command("run")
def caption_command(
    paths: Annotated[list[Path], typer.Argument(help="Image files or folders.")],
    captioner: CaptionerOpt,
    beam: BeamOpt = 1,
    top_p: TopPOpt = None,
    temperature: Annotated[
        float,
        typer.Option(
            "--temperature", help="With --top-p.", click_type=FiniteFloat(0, 100, min_open=True)
        ),
    ] = 1.0,
    max_tokens: MaxTokensOpt = None,
    seed: SeedOpt = 0,
    rerank: RerankOpt = 1,
    fmt: Annotated[Format, typer.Option("--format", "-f")] = Format.table,
    model: ModelOpt = None,
    device: DeviceOpt = None,
    precision: PrecisionOpt = None,
    engine: EngineOpt = None,
    db: DbOpt = None,
    batch_size: BatchSizeOpt = 32,
    max_megapixels: MegapixelsOpt = None,
    tokenizer: TokenizerOpt = "gpt2",
    normalize_prefix: NormalizeOpt = None,
) -> None:
    """Caption images: greedy by default, --beam N, --top-p P sampling, or --rerank N."""
    from cliplens.captioning.model import CaptionOptions, lm_bf16
    from cliplens.captioning.reference import ReferenceCaptioner

    options = CaptionOptions(
        beams=beam,
        top_p=top_p,
        temperature=temperature,
        max_tokens=max_tokens,
        seed=seed,
        rerank=rerank,
        batch_size=batch_size,
    )
    files, missing = collect_images(paths)
    cap, ref = _captioner_and_encoder(
        captioner, model, device, precision, tokenizer, normalize_prefix
    )
    if isinstance(cap, ReferenceCaptioner):  # the raw embeddings: not from the catalog
        vectors, kept, failures = cap.embed_images(ref, files, max_megapixels)
        done_paths = [str(files[i].resolve()) for i in kept]
    else:
        done = embed_paths(ref, files, db, max_megapixels)
        vectors, failures, done_paths = done.vectors, done.failures, done.paths
    for e in [*missing, *failures]:
        warn_message(f"{e} (not captioned)")
    options = replace(options, bf16=lm_bf16(device, precision))
    rows = list(zip(done_paths, cap.captions(vectors, options, ref), strict=True))
    if fmt is Format.json:
        print_json([{"path": p, "caption": c} for p, c in rows])
    elif fmt is Format.csv:
        print_csv(["path", "caption"], rows)
    else:
        print_table(["path", "caption"], rows)
    if missing or failures:
        raise typer.Exit(1)


@app.command("train")
def train_command(
    data: Annotated[
        Path, typer.Option("--data", help="Training pairs: .jsonl, .csv, a folder or shards.")
    ],
    out: Annotated[Path, typer.Option("--out", "-o", help="Run folder (checkpoints, log).")],
    lm: Annotated[
        str,
        typer.Option(
            "--lm",
            help="Language model: a hub name (gpt2), a folder, a .gguf file, smollm2-135m, "
            "or scratch:gpt2.",
        ),
    ] = "gpt2",
    variant: Annotated[
        str, typer.Option("--variant", help="mlp (LM fine-tuned) or transformer (LM frozen).")
    ] = "mlp",
    train_lm: Annotated[
        bool | None,
        typer.Option("--train-lm/--freeze-lm", help="Override the variant's LM training."),
    ] = None,
    val: Annotated[
        Path | None, typer.Option("--val", help="Pairs for validation loss and metrics.")
    ] = None,
    epochs: EpochsOpt = 10,
    batch_size: BatchSizeOpt = 32,
    lr: LrOpt = 1e-3,
    lm_lr: Annotated[
        float | None,
        typer.Option(
            "--lm-lr",
            help="The LM's learning rate (default: --lr, the mapper's, for an LM from "
            "scratch; --lr/20 for a pretrained one).",
            click_type=FiniteFloat(0, MAX_LR, min_open=True),
        ),
    ] = None,
    prefix_length: Annotated[
        int, typer.Option("--prefix-length", min=1, max=MAX_PREFIX_LENGTH)
    ] = 10,
    word_dropout: Annotated[
        float,
        typer.Option(
            "--word-dropout",
            help="Share of input words hidden from the LM.",
            click_type=FiniteFloat(0, 1, max_open=True),
        ),
    ] = 0.0,
    mapper_layers: Annotated[
        int,
        typer.Option(
            "--mapper-layers", help="Transformer mapper depth.", min=1, max=MAX_MAPPER_LAYERS
        ),
    ] = 8,
    lm_layers: Annotated[
        int, typer.Option("--lm-layers", help="scratch:gpt2 depth.", min=1, max=MAX_LM_LAYERS)
    ] = 4,
    lm_width: Annotated[
        int,
        typer.Option("--lm-width", help="scratch:gpt2 width.", min=MIN_LM_WIDTH, max=MAX_LM_WIDTH),
    ] = 256,
    max_minutes: MaxMinutesOpt = None,
    max_steps: Annotated[
        int | None, typer.Option("--max-steps", min=1, max=MAX_TRAIN_STEPS)
    ] = None,
    eval_images: Annotated[
        int,
        typer.Option(
            "--eval-images", help="Validation images captioned each epoch.", min=0, max=MAX_COUNT
        ),
    ] = 200,
    train_precision: Annotated[str, typer.Option("--train-precision", help="bf16 or fp32.")] = (
        "bf16"
    ),
    seed: SeedOpt = 0,
    resume: Annotated[bool, typer.Option("--resume/--restart")] = True,
    model: ModelOpt = None,
    device: DeviceOpt = None,
    precision: PrecisionOpt = None,
    engine: EngineOpt = None,
    db: DbOpt = None,
) -> None:
    """Train a captioner on image-caption pairs; writes OUT/captioner."""
    from cliplens.captioning.embedded import embed_pairs
    from cliplens.captioning.language_model import ScratchLM
    from cliplens.captioning.model import EncoderIdentity
    from cliplens.captioning.train import CaptionTrainConfig, train_captioner
    from cliplens.models.ref import ModelRef
    from cliplens.train.data import read_pairs

    cfg = CaptionTrainConfig(
        lm=lm,
        variant=variant,
        train_lm=train_lm,
        prefix_length=prefix_length,
        word_dropout=word_dropout,
        mapper_layers=mapper_layers,
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        lm_lr=lm_lr,
        precision=train_precision,
        device=str(_device(device)),
        seed=seed,
        max_minutes=max_minutes,
        eval_images=eval_images,
        scratch=ScratchLM(layers=lm_layers, width=lm_width),
    )
    out_folder(out, "--out")
    train_pairs = read_pairs(data)
    val_pairs = read_pairs(val) if val else []
    ref = ModelRef(model, device=device, precision=precision)
    catalog = read_catalog(db)
    cache = out / "embeddings"
    progress = show_progress()
    train_data = embed_pairs(ref, train_pairs, cache, catalog, progress, warn_message)
    val_data = embed_pairs(ref, val_pairs, cache, catalog, progress, warn_message) if val else None
    info(f"{len(train_data.captions)} pairs, {len(train_data.images)} images embedded")
    encoder = EncoderIdentity.of(ref)
    result = train_captioner(
        cfg, encoder, train_data, out, val_data, resume, max_steps, progress=progress
    )
    for m in result.metrics:
        info("  ".join(f"{k} {v}" for k, v in m.items()))
    if result.captioner_path:
        info(f"captioner: {result.captioner_path}")


@app.command("eval")
def eval_command(
    captioner: CaptionerOpt,
    data: Annotated[Path, typer.Option("--data", help="Pairs with reference captions.")],
    beam: BeamOpt = 1,
    top_p: TopPOpt = None,
    seed: SeedOpt = 0,
    rerank: RerankOpt = 1,
    max_tokens: MaxTokensOpt = None,
    limit: Annotated[
        int | None, typer.Option("--limit", help="First N images only.", min=1, max=MAX_COUNT)
    ] = None,
    captions_out: Annotated[
        Path | None, typer.Option("--captions-out", help="Write the captions as JSONL.")
    ] = None,
    fmt: Annotated[Format, typer.Option("--format", "-f")] = Format.table,
    model: ModelOpt = None,
    device: DeviceOpt = None,
    precision: PrecisionOpt = None,
    engine: EngineOpt = None,
    db: DbOpt = None,
    prefix: Annotated[
        str,
        typer.Option(
            "--prefix",
            help='Text put before candidates and references for CLIPScore ("" for none).',
        ),
    ] = "A photo depicts ",
    tokenizer: TokenizerOpt = "gpt2",
    normalize_prefix: NormalizeOpt = None,
) -> None:
    """BLEU-1..4, ROUGE-L, CIDEr-D (and METEOR, SPICE with Java), CLIPScore and RefCLIPScore
    against the references."""
    from cliplens.captioning.model import CaptionOptions, lm_bf16

    options = CaptionOptions(
        beams=beam, top_p=top_p, max_tokens=max_tokens, seed=seed, rerank=rerank
    )
    if captions_out is not None:
        out_file(captions_out, "--captions-out", (".jsonl",))
    from cliplens.captioning.evaluate import evaluate_captioner
    from cliplens.train.data import read_pairs

    cap, ref = _captioner_and_encoder(
        captioner, model, device, precision, tokenizer, normalize_prefix
    )
    catalog = read_catalog(db)
    pairs = read_pairs(data)
    options = replace(options, bf16=lm_bf16(device, precision))
    progress = show_progress()
    evaluation = evaluate_captioner(
        cap, ref, pairs, options, limit, catalog, progress, warn_message, prefix
    )
    if captions_out:
        evaluation.write_captions(captions_out)
    scores = evaluation.scores
    for metric, why in scores.skipped.items():
        warn_message(f"{metric} not computed: {why}")
    rows = [(m, f"{v:.4f}") for m, v in scores.scores.items()]
    if fmt is Format.json:
        print_json(evaluation.to_dict())
    elif fmt is Format.csv:
        print_csv(["metric", "score"], rows)
    else:
        print_table(["metric", "score"], rows, title=f"{len(evaluation.images)} images")
