"""Training a ClipCap captioner on image-caption pairs (the formats `read_pairs` reads).

Image embeddings come from `embed_pairs` (computed once per image, cached in
OUT/embeddings/). The mapper always trains; the LM is fine-tuned with the mlp variant and
frozen with the transformer variant, as in the paper, unless told otherwise. The loop is
`train.loop`'s: checkpoints (OUT/last.pt) resume exactly, a time limit stops a run with a
checkpoint, and every epoch logs the validation loss and metrics of greedy captions of the
validation images to OUT/log.jsonl. The captioner is written to OUT/captioner.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cliplens.captioning import language_model as lms
from cliplens.captioning.embedded import EmbeddedPairs
from cliplens.captioning.evaluate import validation_metrics
from cliplens.captioning.model import (
    Captioner,
    CaptionerConfig,
    EncoderIdentity,
    Variant,
    check_lm_setup,
)
from cliplens.device import Precision
from cliplens.errors import InvalidInputError
from cliplens.limits import (
    MAX_CAPTION_TOKENS,
    MAX_LM_LAYERS,
    MAX_LM_WIDTH,
    MAX_LR,
    MAX_MAPPER_LAYERS,
    MAX_PREFIX_LENGTH,
    MAX_TRAIN_STEPS,
    MIN_LM_WIDTH,
    finite_number,
    whole_number,
)
from cliplens.train.loop import (
    LoopSettings,
    Step,
    TrainingLoop,
    check_schedule,
    training_precision,
    warmup_cosine_schedule,
)


@dataclass(frozen=True)
class CaptionTrainConfig:
    """How to train a captioner: the LM, the mapper and the loop's settings, checked where
    they are made (why: a run that cannot work stops before any image is embedded).

    >>> import cliplens
    >>> cfg = cliplens.CaptionTrainConfig(lm="scratch:gpt2", variant="mlp", epochs=5)
    >>> cfg.lm_trained
    True
    """

    lm: str = "gpt2"
    variant: Variant = "mlp"
    train_lm: bool | None = None  # None: fine-tune with mlp, freeze with transformer
    prefix_length: int = 10
    mapper_layers: int = 8
    epochs: int = 10
    batch_size: int = 32
    lr: float = 1e-3  # the mapper's
    lm_lr: float | None = None  # None: lr for an LM from scratch, lr / 20 for a pretrained one
    warmup: int = 100  # steps
    weight_decay: float = 0.01
    word_dropout: float = 0.0  # share of input words hidden from the LM (see Captioner.inputs)
    grad_clip: float = 1.0
    precision: Precision = Precision.BF16
    device: str = "cpu"
    seed: int = 0
    max_tokens: int = 40
    checkpoint_every: int = 200
    max_minutes: float | None = None  # stop (checkpoint and save) after this long
    eval_images: int = 200  # validation images captioned for metrics each epoch
    scratch: lms.ScratchLM = field(default_factory=lms.ScratchLM)

    @property
    def lm_trained(self) -> bool:
        return self.variant == "mlp" if self.train_lm is None else self.train_lm

    @property
    def lm_learning_rate(self) -> float:
        """The LM's: `lm_lr`, else the mapper's for an LM from scratch, a 20th of it for a
        pretrained one."""
        return self.lm_lr or (self.lr if lms.is_scratch(self.lm) else self.lr / 20)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        if self.batch_size < 1:
            raise InvalidInputError(f"batch size {self.batch_size}: use at least 1")
        check_lm_setup(self.variant, self.lm, self.lm_trained, "train_lm")
        finite_number(self.word_dropout, "word dropout", 0, 1, high_open=True)
        object.__setattr__(self, "precision", training_precision(self.precision))
        check_schedule(self.lr, self.epochs, self.warmup, self.max_minutes, self.seed)
        if self.lm_lr is not None:
            finite_number(self.lm_lr, "LM learning rate", 0, MAX_LR, low_open=True, example="5e-5")
        finite_number(self.weight_decay, "weight decay", 0, 10)
        finite_number(self.grad_clip, "gradient clipping norm (0: none)", 0)
        whole_number(self.prefix_length, "prefix length (tokens)", 1, MAX_PREFIX_LENGTH)
        whole_number(self.mapper_layers, "mapper layers", 1, MAX_MAPPER_LAYERS)
        whole_number(self.max_tokens, "caption length (tokens)", 2, MAX_CAPTION_TOKENS)
        whole_number(self.checkpoint_every, "checkpoint interval (steps)", 1, MAX_TRAIN_STEPS)
        whole_number(self.eval_images, "validation images captioned", 0, MAX_TRAIN_STEPS)
        lm = self.scratch
        whole_number(lm.layers, "scratch LM layers", 1, MAX_LM_LAYERS)
        whole_number(lm.width, "scratch LM width", MIN_LM_WIDTH, MAX_LM_WIDTH)
        if lm.heads < 1 or lm.width % lm.heads:
            raise InvalidInputError(
                f"scratch LM width {lm.width}: use a multiple of its {lm.heads} attention "
                "heads (a multiple of 64 always works)"
            )


@dataclass
class CaptionTrainResult:
    """What a captioner's training run did, and where the captioner is."""

    steps: int
    epochs_done: int
    losses: list[float]
    metrics: list[dict[str, Any]]
    captioner_path: Path | None
    stopped_early: bool = False

    def to_dict(self) -> dict[str, Any]:
        path = str(self.captioner_path) if self.captioner_path else None
        done = {"steps": self.steps, "epochs": self.epochs_done, "captioner": path}
        return done | {"metrics": self.metrics}


def _build(cfg: CaptionTrainConfig, encoder: EncoderIdentity, captions: list[str], out: Path):
    """The captioner to train. A scratch LM's tokenizer and config are kept in OUT/scratch-lm
    so a resumed run rebuilds the same one."""
    if lms.is_scratch(cfg.lm):
        folder = out / "scratch-lm"
        if (folder / "config.json").is_file():
            # heavy: transformers loads only when a scratch LM is resumed
            from transformers import AutoModelForCausalLM, AutoTokenizer

            lm = AutoModelForCausalLM.from_pretrained(folder)  # the same random start
            tokenizer = AutoTokenizer.from_pretrained(folder)
        else:
            torch.manual_seed(cfg.seed)
            lm, tokenizer = lms.scratch_lm(cfg.lm, captions, cfg.scratch)
            lm.save_pretrained(folder)
            tokenizer.save_pretrained(folder)
    else:
        lm, tokenizer = lms.load_lm(cfg.lm)
    ccfg = CaptionerConfig(
        encoder=encoder.name,
        encoder_id=encoder.model_id,
        embed_dim=encoder.dim,
        lm=cfg.lm,
        lm_width=lms.embedding_width(lm),
        variant=cfg.variant,
        lm_trained=cfg.lm_trained,
        prefix_length=cfg.prefix_length,
        mapper_layers=cfg.mapper_layers,
        max_tokens=cfg.max_tokens,
    )
    torch.manual_seed(cfg.seed)
    return Captioner(ccfg, lm, tokenizer)


def train_captioner(
    cfg: CaptionTrainConfig,
    encoder: EncoderIdentity,
    train_data: EmbeddedPairs,
    out_dir: str | os.PathLike,
    val_data: EmbeddedPairs | None = None,
    resume: bool = True,
    max_steps: int | None = None,
    progress: bool = False,
) -> CaptionTrainResult:
    """Train a ClipCap captioner on embedded pairs (`embed_pairs`): why, captions for
    photos from their CLIP embeddings. `encoder` is the model that made the embeddings.

    Checkpoints to out_dir/last.pt and resumes from it; `max_steps` stops after that many
    steps in total (checkpointed, and the captioner saved, as `max_minutes` does).

    >>> import cliplens
    >>> data = cliplens.embed_pairs(model, cliplens.read_pairs("train.jsonl"))
    >>> cliplens.train_captioner(cfg, cliplens.EncoderIdentity.of(model), data, "out")
    """
    cfg.validate()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    n = len(train_data.captions)
    if n < cfg.batch_size:
        raise InvalidInputError(f"{n} training pairs: fewer than one batch of {cfg.batch_size}")
    device = torch.device(cfg.device)
    model = _build(cfg, encoder, train_data.captions, out).to(device)
    loop, trainable = _loop(cfg, model, n, out, max_steps, encoder)
    if resume:
        loop.resume(device)
    bf16 = cfg.precision == "bf16"

    def evaluate(epoch: int, step: int, minutes: float) -> dict[str, Any]:
        row: dict[str, Any] = {"epoch": epoch, "step": step, "minutes": minutes}
        if val_data is not None:
            row |= validation_metrics(model, val_data, cfg.eval_images, bf16)
        return row

    step = _caption_step(model, train_data, cfg, device)
    label = "training captioner"
    outcome = loop.run(step, trainable, evaluate, label=label, progress=progress)
    path = model.save(out / "captioner") if outcome.finished else None
    return CaptionTrainResult(
        outcome.steps,
        outcome.epochs_done,
        outcome.losses,
        outcome.metrics,
        path,
        outcome.stopped_early,
    )


def _loop(
    cfg: CaptionTrainConfig,
    model: Captioner,
    n: int,
    out: Path,
    max_steps: int | None,
    encoder: EncoderIdentity,
) -> tuple[TrainingLoop, list[torch.nn.Parameter]]:
    """AdamW over the mapper (and the LM when it trains, at its own rate), warmup then
    cosine; the loop and the parameters it trains."""
    groups = [{"params": list(model.mapper.parameters()), "lr": cfg.lr}]
    modules: dict[str, torch.nn.Module] = {"mapper": model.mapper}
    if cfg.lm_trained:
        lm_params = [p for p in model.lm.parameters() if p.requires_grad]
        groups.append({"params": lm_params, "lr": cfg.lm_learning_rate})
        modules["lm"] = model.lm
    optimizer = torch.optim.AdamW(groups, weight_decay=cfg.weight_decay)
    per_epoch = n // cfg.batch_size
    scheduler = warmup_cosine_schedule(optimizer, cfg.warmup, per_epoch * cfg.epochs)
    settings = LoopSettings.of(cfg, per_epoch, max_steps)

    def order(epoch: int) -> np.ndarray:
        return np.random.default_rng([cfg.seed, epoch]).permutation(n)

    identity = {"train": asdict(cfg), "encoder": asdict(encoder)}
    loop = TrainingLoop(out, identity, modules, optimizer, scheduler, settings, order)
    return loop, [p for g in groups for p in g["params"]]


def _caption_step(
    model: Captioner, data: EmbeddedPairs, cfg: CaptionTrainConfig, device: torch.device
) -> Step:
    """A batch of pairs: the captions' loss given their images' prefixes."""
    vectors = torch.from_numpy(data.vectors)
    bf16 = cfg.precision == "bf16"
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)

    def step(order: np.ndarray, k: int) -> float:
        model.train()
        if not cfg.lm_trained:
            model.lm.eval()  # no dropout in a frozen LM
        batch = order[k * cfg.batch_size : (k + 1) * cfg.batch_size]
        emb = vectors[data.rows[batch]]
        with autocast:
            captions = [data.captions[i] for i in batch]
            loss = model.loss(emb, captions, cfg.word_dropout)
        loss.backward()
        return loss.item()  # read once backward is queued (a GPU waits once a step)

    return step
