"""Contrastive training of an open_clip CLIP: from scratch, fine-tuning, or with a tower
locked (LiT), in one process or several under torchrun; checkpoints resume exactly.

The loop: AdamW (no decay on gains, biases and the temperature), linear warmup then cosine
decay, gradient accumulation, bf16 autocast where the CPU or GPU has it, gradient clipping,
the temperature clamped at 100. With `loss="siglip"` the scale and bias start at SigLIP's
initialisation, t' = log 10 and b = -10 (Zhai et al. 2023; big_vision's and open_clip's
`init_logit_scale`, `init_logit_bias`), from scratch and when fine-tuning a model that has
no bias (a CLIP: its scale of about 100 with the bias -10 would call most pairs of a batch
matching); a SigLIP checkpoint keeps its learnt scale and bias. Each checkpoint holds the
model, optimiser, schedule, every random generator and the position in the data, so a
resumed run takes the same steps as one that never stopped (the loop is `train.loop`'s,
shared with the other trainers). The final model is written with `save_checkpoint`, so
every task loads it as `local:PATH`.

Under torchrun every process takes its rows of each global batch, the loss is computed
over the whole batch (`sharded_loss`) and gradients are summed across processes, so N
processes take the same steps as one process with the same global batch.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal, get_args

import numpy as np
import torch
import torch.distributed as dist

from cliplens.device import Precision
from cliplens.errors import InvalidInputError
from cliplens.images import open_image
from cliplens.limits import MAX_TRAIN_STEPS, finite_number, whole_number
from cliplens.models.offline import TOWERS_ARCH, build_towers_clip, towers_config
from cliplens.models.registry import load_model
from cliplens.preprocess import Preprocessing
from cliplens.textfile import read_text
from cliplens.train.data import Pair
from cliplens.train.loop import (
    Evaluate,
    LoopSettings,
    Processes,
    Step,
    TrainingLoop,
    check_schedule,
    set_seed,
    training_precision,
    warmup_cosine_schedule,
)
from cliplens.train.loss import MAX_LOGIT_SCALE, Loss, sharded_loss

# small CLIPs to train from scratch (open_clip.CLIP keyword arguments)
_SHAPES_TEXT = {"context_length": 24, "vocab_size": 49408, "width": 128, "heads": 4, "layers": 3}
PRESETS: dict[str, dict[str, Any]] = {
    # a small ResNet image tower: on shapes it learns shape as well as colour, where a ViT
    # with 8 px patches at 64 px learns colour only (benchmarks/RESULTS.md)
    "tiny-shapes": {
        "embed_dim": 128,
        "vision_cfg": {"image_size": 64, "layers": [1, 1, 1, 1], "width": 32, "head_width": 32},
        "text_cfg": _SHAPES_TEXT,
    },
    "tiny-shapes-vit": {
        "embed_dim": 128,
        "vision_cfg": {
            "image_size": 64,
            "layers": 4,
            "width": 128,
            "patch_size": 8,
            "head_width": 32,
        },
        "text_cfg": _SHAPES_TEXT,
    },
}
# what a run keeps from changing: "image" is LiT (a locked image tower, the text tower
# learns to meet it), "text" the other way round
Lock = Literal["none", "image", "text"]
LOCKS: tuple[Lock, ...] = get_args(Lock)
LOSSES: tuple[Loss, ...] = get_args(Loss)
# SigLIP's initial log-scale and bias (Zhai et al. 2023, "Sigmoid Loss for Language Image
# Pre-Training"; big_vision, open_clip's SigLIP configs)
SIGLIP_INIT_LOGIT_SCALE = math.log(10.0)
SIGLIP_INIT_BIAS = -10.0


@dataclass
class ClipTrainConfig:
    """How to train a CLIP: the model to start from and the loop's settings, checked
    where they are made (why: a run that cannot work stops before any data is read).

    >>> import cliplens
    >>> cfg = cliplens.ClipTrainConfig(*cliplens.clip_model_config("tiny-shapes"), epochs=5)
    >>> cfg.lock, cfg.loss
    ('none', 'clip')
    """

    model_cfg: dict[str, Any]  # open_clip.CLIP keyword arguments
    arch: str = "custom"
    init: str | None = None  # a model to fine-tune (any open_clip name load_model takes)
    epochs: int = 10
    max_minutes: float | None = None  # stop (and checkpoint) after this much training
    batch_size: int = 128
    accumulate: int = 1  # micro-batches per optimiser step
    lr: float = 1e-3
    weight_decay: float = 0.1
    warmup_steps: int = 50
    grad_clip: float = 1.0
    precision: Precision = Precision.FP32  # or bf16 (autocast)
    loss: Loss = "clip"
    lock: Lock = "none"
    seed: int = 0
    checkpoint_every: int = 200  # optimiser steps
    classes: list[str] = field(default_factory=list)  # for zero-shot evaluation
    templates: list[str] = field(default_factory=lambda: ["a {}"])  # averaged per class

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        if self.loss not in LOSSES:
            raise InvalidInputError(f"loss '{self.loss}': one of {', '.join(LOSSES)}")
        if self.lock not in LOCKS:
            raise InvalidInputError(f"lock '{self.lock}': one of {', '.join(LOCKS)}")
        self.precision = training_precision(self.precision)
        if self.batch_size < 2 or self.accumulate < 1:
            raise InvalidInputError("batch size >= 2 and accumulate >= 1")
        check_schedule(self.lr, self.epochs, self.warmup_steps, self.max_minutes, self.seed)
        finite_number(self.weight_decay, "weight decay", 0, 10)
        finite_number(self.grad_clip, "gradient clipping norm (0: none)", 0)
        whole_number(self.checkpoint_every, "checkpoint interval (steps)", 1, MAX_TRAIN_STEPS)
        if not self.templates or not all("{}" in t for t in self.templates):
            raise InvalidInputError("`templates`: give at least one, each with {} for the class")


def clip_model_config(spec: str | None, init: str | None = None) -> tuple[dict[str, Any], str]:
    """(open_clip.CLIP arguments, arch name) of the model a run starts from: a preset or a
    JSON file of arguments from scratch (tiny-shapes when neither is given), or nothing
    when fine-tuning `init` (the initial model has its own). Why: one place that says
    what a run's model is, for the CLI and for Python callers alike.

    >>> import cliplens
    >>> model_cfg, arch = cliplens.clip_model_config("tiny-shapes")
    >>> arch
    'tiny-shapes'
    """
    if init and spec:
        raise InvalidInputError(
            "give `init` (fine-tune) or `model_config` (from scratch), not both"
        )
    if init:
        return {}, "custom"
    spec = spec or "tiny-shapes"
    if spec in PRESETS:
        return PRESETS[spec], spec
    path = Path(spec)
    expected = f"a preset ({', '.join(PRESETS)}) or a JSON file of open_clip.CLIP arguments"
    if not path.is_file():
        raise InvalidInputError(f"`model_config` {spec}: {expected}")
    try:
        cfg = json.loads(read_text(path, "`model_config`", expected))
    except (ValueError, RecursionError) as e:
        raise InvalidInputError(f"`model_config` {spec}: not valid JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise InvalidInputError(f"`model_config` {spec}: {expected} (an object)")
    return cfg, path.stem if spec.endswith(".json") else spec


class Pairs:
    """Images decoded and cropped once (uint8, in memory) and captions tokenised once."""

    def __init__(self, pairs: Sequence[Pair], model: Any, tokenizer: Callable) -> None:
        pp = model.visual.preprocess_cfg
        size = model.visual.image_size
        size = size if isinstance(size, int) else int(size[0])
        mean, std = tuple(pp["mean"]), tuple(pp["std"])
        self.prep = Preprocessing(size, size, mean, std, pp.get("interpolation", "bicubic"))
        self.images = np.stack([self.prep.crop(open_image(p.source())) for p in pairs])
        self.tokens = tokenizer([p.caption for p in pairs])

    def __len__(self) -> int:
        return len(self.images)

    def batch(self, index: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        pixels = torch.from_numpy(self.prep.normalize(self.images[index]))
        # channels-last: oneDNN's convolutions run about 1.35x faster on it (bf16, CPU)
        pixels = pixels.contiguous(memory_format=torch.channels_last)
        return pixels, self.tokens[torch.from_numpy(index)]


def initial_model(name: str) -> tuple[Any, Callable, dict[str, Any], str]:
    """(model in fp32, tokenizer, model config, arch) of a model to fine-tune. `offline`
    gives a CLIP made of the offline model's pretrained towers with new projections."""
    if name == "offline":
        cfg = towers_config()
        model, tokenizer = build_towers_clip(cfg, pretrained=True)
        return model.float().requires_grad_(True), tokenizer, cfg, TOWERS_ARCH
    encoder = load_model(name, device="cpu", precision="fp32")
    cfg = getattr(encoder, "model_cfg", None)
    if not cfg:
        raise InvalidInputError(
            f"`init` {name}: fine-tuning needs an open_clip model whose config is known "
            "(a pretrained tag such as ViT-B-32:openai, a local: checkpoint, or offline)"
        )
    return encoder.model.float().requires_grad_(True), encoder.tokenizer, cfg, encoder.info.arch


def build_model(cfg: ClipTrainConfig) -> tuple[Any, Callable]:
    """A fresh CLIP from the config (the same builder `local:` checkpoints load with)."""
    # heavy: open_clip, transformers and torchvision load only when an open_clip model is built
    from cliplens.models.openclip import build_from_cfg

    torch.manual_seed(cfg.seed)
    model, tokenizer = build_from_cfg(cfg.arch, cfg.model_cfg, None)
    if cfg.loss == "siglip":
        _siglip_init(model)
    return model, tokenizer


def _siglip_init(model: Any) -> None:
    """SigLIP's initial scale and bias: t' = log 10, b = -10."""
    model.logit_bias = torch.nn.Parameter(torch.tensor(SIGLIP_INIT_BIAS))
    with torch.no_grad():
        model.logit_scale.fill_(SIGLIP_INIT_LOGIT_SCALE)


def _starting_model(cfg: ClipTrainConfig) -> tuple[Any, Callable, ClipTrainConfig]:
    """(model, tokenizer, config): fine-tuning records the initial model's config."""
    if not cfg.init:
        model, tokenizer = build_model(cfg)
        return model, tokenizer, cfg
    model, tokenizer, model_cfg, arch = initial_model(cfg.init)
    cfg = replace(cfg, model_cfg=model_cfg, arch=arch)
    torch.manual_seed(cfg.seed)
    if cfg.loss == "siglip" and getattr(model, "logit_bias", None) is None:
        _siglip_init(model)  # a CLIP: its temperature was learnt without a bias
    return model, tokenizer, cfg


def _saved_config(model: Any, cfg: ClipTrainConfig) -> dict[str, Any]:
    """The model's config as saved: a model with a bias (SigLIP) records that it has one,
    so that open_clip builds it with the parameter its weights fill."""
    if getattr(model, "logit_bias", None) is None or "init_logit_bias" in cfg.model_cfg:
        return cfg.model_cfg
    return cfg.model_cfg | {"init_logit_bias": SIGLIP_INIT_BIAS}


def _parameters(model: Any, cfg: ClipTrainConfig) -> list[dict[str, Any]]:
    if cfg.lock == "image":
        model.visual.requires_grad_(False)
    elif cfg.lock == "text":
        for name, p in model.named_parameters():
            if not name.startswith("visual.") and name not in ("logit_scale", "logit_bias"):
                p.requires_grad_(False)
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim < 2 or "logit_" in name else decay).append(p)
    with_decay = {"params": decay, "weight_decay": cfg.weight_decay}
    return [with_decay, {"params": no_decay, "weight_decay": 0.0}]


@dataclass
class ClipTrainResult:
    """What a CLIP training run did, and where its model is."""

    steps: int
    epochs_done: int
    losses: list[float]  # per optimiser step, this run
    metrics: list[dict[str, Any]]  # per evaluation
    model_path: Path | None
    stopped_early: bool = False

    def to_dict(self) -> dict[str, Any]:
        model = str(self.model_path) if self.model_path else None
        done = {"steps": self.steps, "epochs": self.epochs_done}
        return done | {"model": model, "metrics": self.metrics}


def train_clip(
    cfg: ClipTrainConfig,
    train_pairs: Sequence[Pair],
    out_dir: str | os.PathLike,
    val_pairs: Sequence[Pair] = (),
    eval_pairs: Sequence[tuple[Pair, str]] = (),
    resume: bool = True,
    max_steps: int | None = None,
    progress: bool = False,
) -> ClipTrainResult:
    """Train a CLIP contrastively (from scratch, fine-tuning `cfg.init`, or LiT with a
    tower locked), checkpointing to out_dir/last.pt and resuming from it when present:
    why, a model of one's own data's space that every task loads as `local:PATH`.

    `eval_pairs` are (image, class name) for zero-shot accuracy over `cfg.classes`;
    `val_pairs` give image-text retrieval R@1/5/10. `max_steps` stops after that many
    optimiser steps in total (a checkpoint is written first).

    >>> import cliplens
    >>> cfg = cliplens.ClipTrainConfig(*cliplens.clip_model_config("tiny-shapes"))
    >>> cliplens.train_clip(cfg, cliplens.read_pairs("train.jsonl"), "run")  # doctest: +SKIP
    """
    cfg.validate()
    model, tokenizer, cfg = _starting_model(cfg)
    processes = Processes.join()
    if cfg.batch_size % processes.size:
        raise InvalidInputError(
            f"batch size {cfg.batch_size} must divide among {processes.size} processes"
        )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    data = Pairs(train_pairs, model, tokenizer)
    if len(data) < cfg.batch_size:
        raise InvalidInputError(
            f"{len(data)} training pairs: fewer than one batch of {cfg.batch_size}"
        )
    model.visual.to(memory_format=torch.channels_last)
    loop = _loop(cfg, model, len(data), out, max_steps, processes)
    if not (resume and loop.resume()):
        set_seed(cfg.seed)
    evaluate = _evaluator(model, tokenizer, cfg, val_pairs, eval_pairs, processes)

    def clamp() -> None:
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(MAX_LOGIT_SCALE))

    step = _clip_step(model, data, cfg, processes)
    outcome = loop.run(step, model.parameters(), evaluate, clamp, "training", progress)
    model_path = None
    if outcome.finished and processes.main:
        # heavy: open_clip loads only when a checkpoint is written
        from cliplens.models.openclip import save_checkpoint

        pp = dict(model.visual.preprocess_cfg) if cfg.init else None  # e.g. OpenAI's mean/std
        folder = out / "model"
        model_path = save_checkpoint(model.eval(), folder, _saved_config(model, cfg), cfg.arch, pp)
    return ClipTrainResult(
        outcome.steps,
        outcome.epochs_done,
        outcome.losses,
        outcome.metrics,
        model_path,
        outcome.stopped_early,
    )


def _loop(
    cfg: ClipTrainConfig,
    model: Any,
    n: int,
    out: Path,
    max_steps: int | None,
    processes: Processes,
) -> TrainingLoop:
    """AdamW (no decay on gains, biases and the temperature), warmup then cosine."""
    params = _parameters(model, cfg)
    # the fused kernel: 9 ms a step instead of 51 for the tiny presets' 12M parameters
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, betas=(0.9, 0.98), eps=1e-6, fused=True)
    per_epoch = n // (cfg.batch_size * cfg.accumulate)
    scheduler = warmup_cosine_schedule(optimizer, cfg.warmup_steps, per_epoch * cfg.epochs)
    settings = LoopSettings.of(cfg, per_epoch, max_steps)

    def order(epoch: int) -> np.ndarray:
        return np.random.default_rng([cfg.seed, epoch]).permutation(n)

    modules = {"model": model}
    return TrainingLoop(
        out, asdict(cfg), modules, optimizer, scheduler, settings, order, processes=processes
    )


def _clip_step(model: Any, data: Pairs, cfg: ClipTrainConfig, processes: Processes) -> Step:
    """One optimiser step's gradients: `accumulate` micro-batches of this process's rows of
    each global batch, summed across processes."""
    local = cfg.batch_size // processes.size  # this process's rows of each global batch
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.precision == "bf16")

    def step(order: np.ndarray, k: int) -> float:
        model.train()
        total_loss = 0.0
        for a in range(cfg.accumulate):
            lo = (k * cfg.accumulate + a) * cfg.batch_size + processes.rank * local
            pixels, tokens = data.batch(order[lo : lo + local])
            with autocast:
                img = model.encode_image(pixels, normalize=True).float()
                txt = model.encode_text(tokens, normalize=True).float()
                bias = getattr(model, "logit_bias", None)
                loss = sharded_loss(cfg.loss, img, txt, model.logit_scale.exp(), bias)
            (loss / cfg.accumulate).backward()
            total_loss += loss.item() / cfg.accumulate
        if processes.size > 1:  # the shares' gradients add up to the whole batch's
            total_loss = _sum_grads(model, total_loss)
        return total_loss

    return step


def _sum_grads(model: Any, loss: float) -> float:
    """All-reduce (sum) every gradient across processes; returns the whole batch's loss."""
    for p in model.parameters():
        if p.grad is not None:
            dist.all_reduce(p.grad)
    total = torch.tensor(loss, dtype=torch.float64)
    dist.all_reduce(total)
    return float(total)


def _evaluator(
    model: Any,
    tokenizer: Callable,
    cfg: ClipTrainConfig,
    val_pairs: Sequence[Pair],
    eval_pairs: Sequence[tuple[Pair, str]],
    processes: Processes,
) -> Evaluate:
    """Each epoch's evaluation; its data is decoded once, by the process that evaluates."""
    main = processes.main
    val = Pairs(val_pairs, model, tokenizer) if main and len(val_pairs) >= 2 else None
    labels = [c for _, c in eval_pairs]
    zero_shot = None
    if main and eval_pairs and cfg.classes:
        zero_shot = Pairs([p for p, _ in eval_pairs], model, tokenizer)

    def evaluate(epoch: int, step: int, minutes: float) -> dict[str, Any]:
        metrics = _evaluate(model, tokenizer, val, zero_shot, labels, cfg)
        return metrics | {"epoch": epoch, "step": step, "minutes": minutes}

    return evaluate


@torch.inference_mode()
def _evaluate(
    model: Any,
    tokenizer: Callable,
    val: Pairs | None,
    zero_shot: Pairs | None,
    labels: Sequence[str],
    cfg: ClipTrainConfig,
) -> dict[str, Any]:
    """Retrieval R@1/5/10 (image to text and back) on `val`; zero-shot accuracy over
    cfg.classes on the `zero_shot` images, whose classes are `labels`."""
    model.eval()
    out: dict[str, Any] = {}
    if val is not None:
        img, txt = _embed(model, val)
        sims = img @ txt.T
        ranks_i2t = (sims > sims.diagonal()[:, None]).sum(1)
        ranks_t2i = (sims.diagonal()[:, None] < sims.T).sum(1)
        for k in (1, 5, 10):
            out[f"i2t_R@{k}"] = round(float((ranks_i2t < k).float().mean()), 4)
            out[f"t2i_R@{k}"] = round(float((ranks_t2i < k).float().mean()), 4)
    if zero_shot is not None:
        img, _ = _embed(model, zero_shot, texts=False)
        rows = []
        for c in cfg.classes:  # prompt ensembling: the mean of the normalised templates
            t = model.encode_text(tokenizer([tpl.format(c) for tpl in cfg.templates]))
            rows.append(torch.nn.functional.normalize(t.float(), dim=-1).mean(0))
        cls = torch.nn.functional.normalize(torch.stack(rows), dim=-1)
        pred = (img @ cls.T).argmax(1)
        truth = torch.tensor([cfg.classes.index(c) for c in labels])
        out["zero_shot_accuracy"] = round(float((pred == truth).float().mean()), 4)
        out["zero_shot_n"] = len(labels)
    return out


def _embed(
    model: Any, data: Pairs, texts: bool = True, batch: int = 256
) -> tuple[torch.Tensor, torch.Tensor | None]:
    imgs, txts = [], []
    for lo in range(0, len(data), batch):
        pixels, tokens = data.batch(np.arange(lo, min(lo + batch, len(data))))
        imgs.append(model.encode_image(pixels, normalize=True).float())
        if texts:
            txts.append(model.encode_text(tokens, normalize=True).float())
    return torch.cat(imgs), (torch.cat(txts) if texts else None)
