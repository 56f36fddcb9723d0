"""Contrastive training of an open_clip CLIP: from scratch, fine-tuning, or with a tower
locked (LiT), in one process or several under torchrun; checkpoints resume exactly.

The loop: AdamW (no decay on gains, biases and the temperature), linear warmup then cosine
decay, gradient accumulation, bf16 autocast where the CPU or GPU has it, gradient clipping,
the temperature clamped at 100. Each checkpoint holds the model, optimiser, schedule, every
random generator and the position in the data, so a resumed run takes the same steps as
one that never stopped. The final model is written with `save_checkpoint`, so every task
loads it as `local:PATH`.

Under torchrun every process takes its rows of each global batch, the loss is computed
over the whole batch (`sharded_loss`) and gradients are summed across processes, so N
processes take the same steps as one process with the same global batch.
"""

from __future__ import annotations

import json
import math
import os
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cliplens.errors import ClipLensError, InvalidInputError
from cliplens.limits import (
    MAX_EPOCHS,
    MAX_LR,
    MAX_MINUTES,
    MAX_SEED,
    MAX_TRAIN_STEPS,
    finite_number,
    whole_number,
)
from cliplens.train.data import Pair
from cliplens.train.loss import MAX_LOGIT_SCALE, sharded_loss

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
LOCKS = ("none", "image", "text")
LOSSES = ("clip", "siglip")


@dataclass
class TrainConfig:
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
    precision: str = "fp32"  # or bf16 (autocast)
    loss: str = "clip"
    lock: str = "none"  # LiT: "image" trains the text tower only
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
        if self.precision not in ("fp32", "bf16"):
            raise InvalidInputError(f"precision '{self.precision}': fp32 or bf16")
        if self.batch_size < 2 or self.accumulate < 1:
            raise InvalidInputError("batch size >= 2 and accumulate >= 1")
        check_schedule(self.lr, self.epochs, self.warmup_steps, self.max_minutes, self.seed)
        finite_number(self.weight_decay, "weight decay", 0, 10)
        finite_number(self.grad_clip, "gradient clipping norm (0: none)", 0)
        whole_number(self.checkpoint_every, "checkpoint interval (steps)", 1, MAX_TRAIN_STEPS)


def check_schedule(
    lr: float, epochs: int, warmup: int, max_minutes: float | None, seed: int
) -> None:
    """The numbers every training run here shares: a learning rate that can work (finite,
    > 0, at most MAX_LR), whole epochs and warmup steps, a time limit, a seed."""
    finite_number(lr, "learning rate", 0, MAX_LR, low_open=True, example="1e-3")
    whole_number(epochs, "epochs", 1, MAX_EPOCHS)
    whole_number(warmup, "warmup steps", 0, MAX_TRAIN_STEPS)
    if max_minutes is not None:
        finite_number(max_minutes, "time limit (minutes)", 0, MAX_MINUTES, low_open=True)
    whole_number(seed, "seed", 0, MAX_SEED)


class DivergedError(ClipLensError):
    """The loss became nan or inf: the run stops before that step is applied or saved."""


def check_loss(loss: float, step: int, lr: float, out: Path) -> None:
    """Stop a run whose loss is no longer a number, before the optimiser applies the step:
    its checkpoint keeps the last good state and no model is written."""
    if not math.isfinite(loss):
        raise DivergedError(
            f"training diverged at step {step + 1} (loss {loss}): stopped before applying that "
            f"step, and no model was written. Lower the learning rate (it was {lr:g}) or train "
            f"in fp32, in a new run folder (not {out})"
        )


class Pairs:
    """Images decoded and cropped once (uint8, in memory) and captions tokenised once."""

    def __init__(self, pairs: Sequence[Pair], model: Any, tokenizer: Callable) -> None:
        from cliplens.images import open_image
        from cliplens.preprocess import Preprocessing

        pp = model.visual.preprocess_cfg
        size = model.visual.image_size
        size = size if isinstance(size, int) else int(size[0])
        self.prep = Preprocessing(size, size, tuple(pp["mean"]), tuple(pp["std"]),
                                  pp.get("interpolation", "bicubic"))  # fmt: skip
        self.images = np.stack([self.prep.crop(open_image(p.source())) for p in pairs])
        self.tokens = tokenizer([p.caption for p in pairs])
        self.captions = [p.caption for p in pairs]

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
    from cliplens.models import load_model

    if name == "offline":
        from cliplens.models.offline import TOWERS_ARCH, build_towers_clip, towers_config

        cfg = towers_config()
        model, tokenizer = build_towers_clip(cfg, pretrained=True)
        return model.float().requires_grad_(True), tokenizer, cfg, TOWERS_ARCH
    encoder = load_model(name, device="cpu", precision="fp32")
    cfg = getattr(encoder, "model_cfg", None)
    if not cfg:
        raise InvalidInputError(
            f"--init {name}: fine-tuning needs an open_clip model whose config is known "
            "(a pretrained tag such as ViT-B-32:openai, a local: checkpoint, or offline)"
        )
    return encoder.model.float().requires_grad_(True), encoder.tokenizer, cfg, encoder.info.arch


def build_model(cfg: TrainConfig) -> tuple[Any, Callable]:
    """A fresh CLIP from the config (the same builder `local:` checkpoints load with)."""
    from cliplens.models.openclip import _build_from_cfg

    torch.manual_seed(cfg.seed)
    model, tokenizer = _build_from_cfg(cfg.arch, cfg.model_cfg, None)
    if cfg.loss == "siglip":
        model.logit_bias = torch.nn.Parameter(torch.tensor(-10.0))
        with torch.no_grad():
            model.logit_scale.fill_(math.log(10.0))
    return model, tokenizer


def _parameters(model: Any, cfg: TrainConfig) -> list[dict[str, Any]]:
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
    return [{"params": decay, "weight_decay": cfg.weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]  # fmt: skip


def warmup_cosine(warmup: int, total_steps: int) -> Callable[[int], float]:
    """LambdaLR factor: linear warmup over `warmup` steps, then cosine to 0 at total_steps."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total_steps - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return factor


@dataclass
class TrainResult:
    steps: int
    epochs_done: int
    losses: list[float]  # per optimiser step, this run
    metrics: list[dict[str, Any]]  # per evaluation
    model_path: Path | None
    stopped_early: bool = False


def rng_state() -> dict[str, Any]:
    """Every generator a training run draws from, for an exact resume."""
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(),
            "python": random.getstate()}  # fmt: skip


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])


def train(
    cfg: TrainConfig,
    train_pairs: Sequence[Pair],
    out_dir: str | os.PathLike,
    val_pairs: Sequence[Pair] = (),
    eval_pairs: Sequence[tuple[Pair, str]] = (),
    resume: bool = True,
    max_steps: int | None = None,
    progress: bool = False,
) -> TrainResult:
    """Train, checkpointing to out_dir/last.pt; resume from it when present.

    `eval_pairs` are (image, class name) for zero-shot accuracy over `cfg.classes`;
    `val_pairs` give image-text retrieval R@1/5/10. `max_steps` stops after that many
    optimiser steps in total (a checkpoint is written first).
    """
    from cliplens.progress import progress_bar

    cfg.validate()
    if cfg.init:  # fine-tuning: the saved model records the initial model's config
        model, tokenizer, model_cfg, arch = initial_model(cfg.init)
        cfg = replace(cfg, model_cfg=model_cfg, arch=arch)
        torch.manual_seed(cfg.seed)
        if cfg.loss == "siglip" and getattr(model, "logit_bias", None) is None:
            model.logit_bias = torch.nn.Parameter(torch.tensor(-10.0))
    else:
        model, tokenizer = build_model(cfg)
    rank, world = _init_distributed()
    if cfg.batch_size % world:
        raise InvalidInputError(f"batch size {cfg.batch_size} must divide among {world} processes")
    local = cfg.batch_size // world  # this process's rows of each global batch
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    data = Pairs(train_pairs, model, tokenizer)
    if len(data) < cfg.batch_size:
        raise InvalidInputError(
            f"{len(data)} training pairs: fewer than one batch of {cfg.batch_size}"
        )
    model.visual.to(memory_format=torch.channels_last)
    params = _parameters(model, cfg)
    # the fused kernel: 9 ms a step instead of 51 for the tiny presets' 12M parameters
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, betas=(0.9, 0.98), eps=1e-6, fused=True)
    per_epoch = len(data) // (cfg.batch_size * cfg.accumulate)
    total = per_epoch * cfg.epochs
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(cfg.warmup_steps, total))
    step, epoch = 0, 0
    ckpt = out / "last.pt"
    if resume and ckpt.is_file():
        state = torch.load(ckpt, map_location="cpu", weights_only=False)
        if state["config"] != asdict(cfg):
            raise InvalidInputError(f"{ckpt} was written with other settings; use another --out")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        step, epoch = state["step"], state["epoch"]
        set_rng_state(state["rng"])
    else:
        _set_seed(cfg.seed)
    # evaluation data is decoded once, by the process that evaluates
    val_data = Pairs(val_pairs, model, tokenizer) if rank == 0 and len(val_pairs) >= 2 else None
    labels = [c for _, c in eval_pairs]
    eval_data = None
    if rank == 0 and eval_pairs and cfg.classes:
        eval_data = Pairs([p for p, _ in eval_pairs], model, tokenizer)
    log = (out / "log.jsonl").open("a", encoding="utf-8", buffering=1) if rank == 0 else None
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.precision == "bf16")
    losses: list[float] = []
    metrics: list[dict[str, Any]] = []
    start = time.perf_counter()
    stopped = False

    def save() -> None:
        if rank != 0:
            return
        tmp = ckpt.with_name(".last.pt.tmp")
        torch.save({"config": asdict(cfg), "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                    "step": step, "epoch": epoch, "rng": rng_state()}, tmp)  # fmt: skip
        tmp.replace(ckpt)

    with progress_bar(total - step, "training", progress) as advance:
        while epoch < cfg.epochs and not stopped:
            order = np.random.default_rng([cfg.seed, epoch]).permutation(len(data))
            first = step - epoch * per_epoch  # resume inside an epoch
            for k in range(first, per_epoch):
                model.train()
                optimizer.zero_grad(set_to_none=True)
                total_loss = 0.0
                for a in range(cfg.accumulate):
                    lo = (k * cfg.accumulate + a) * cfg.batch_size + rank * local
                    pixels, tokens = data.batch(order[lo : lo + local])
                    with autocast:
                        img = model.encode_image(pixels, normalize=True).float()
                        txt = model.encode_text(tokens, normalize=True).float()
                        bias = getattr(model, "logit_bias", None)
                        loss = sharded_loss(cfg.loss, img, txt, model.logit_scale.exp(), bias)
                    (loss / cfg.accumulate).backward()
                    total_loss += loss.item() / cfg.accumulate
                if world > 1:  # the shares' gradients add up to the whole batch's
                    total_loss = _sum_grads(model, total_loss)
                check_loss(total_loss, step, cfg.lr, out)  # every process sees the same sum
                if cfg.grad_clip:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
                optimizer.step()
                scheduler.step()
                with torch.no_grad():
                    model.logit_scale.clamp_(0, math.log(MAX_LOGIT_SCALE))
                step += 1
                losses.append(total_loss)
                advance(1)
                if log:
                    row = {"step": step, "epoch": epoch, "loss": round(total_loss, 6),
                           "lr": scheduler.get_last_lr()[0],
                           "seconds": round(time.perf_counter() - start, 3)}  # fmt: skip
                    log.write(json.dumps(row) + "\n")
                out_of_time = bool(cfg.max_minutes) and (
                    time.perf_counter() - start > 60 * (cfg.max_minutes or 0)
                )
                if world > 1:  # every process stops at the same step
                    out_of_time = _any(out_of_time)
                if (max_steps and step >= max_steps) or out_of_time:
                    stopped = True
                    break
                if step % cfg.checkpoint_every == 0:
                    save()
            if not stopped:
                epoch += 1
                if rank == 0:
                    m = evaluate(model, tokenizer, val_data, eval_data, labels, cfg)
                    minutes = round((time.perf_counter() - start) / 60, 2)
                    m.update(epoch=epoch, step=step, minutes=minutes)
                    metrics.append(m)
                    if log:
                        log.write(json.dumps(m) + "\n")
            save()
            _barrier(world)
    if log:
        log.close()
    model_path = None
    if (epoch >= cfg.epochs or stopped) and rank == 0:
        from cliplens.models.openclip import save_checkpoint

        pp = dict(model.visual.preprocess_cfg) if cfg.init else None  # e.g. OpenAI's mean/std
        model_path = save_checkpoint(model.eval(), out / "model", cfg.model_cfg, arch=cfg.arch,
                                     preprocess_cfg=pp)  # fmt: skip
    return TrainResult(step, epoch, losses, metrics, model_path, stopped)


def _init_distributed() -> tuple[int, int]:
    """(rank, world size); joins torchrun's process group (gloo on CPU, nccl on GPU)."""
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _sum_grads(model: Any, loss: float) -> float:
    """All-reduce (sum) every gradient across processes; returns the whole batch's loss."""
    import torch.distributed as dist

    for p in model.parameters():
        if p.grad is not None:
            dist.all_reduce(p.grad)
    total = torch.tensor(loss, dtype=torch.float64)
    dist.all_reduce(total)
    return float(total)


def _any(flag: bool) -> bool:
    import torch.distributed as dist

    t = torch.tensor(int(flag))
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t)


def _barrier(world: int) -> None:
    if world > 1:
        import torch.distributed as dist

        dist.barrier()


def _set_seed(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


@torch.inference_mode()
def evaluate(
    model: Any,
    tokenizer: Callable,
    val: Pairs | None,
    zero_shot: Pairs | None,
    labels: Sequence[str],
    cfg: TrainConfig,
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


def _embed(model: Any, data: Pairs, texts: bool = True, batch: int = 256):
    imgs, txts = [], []
    for lo in range(0, len(data), batch):
        pixels, tokens = data.batch(np.arange(lo, min(lo + batch, len(data))))
        imgs.append(model.encode_image(pixels, normalize=True).float())
        if texts:
            txts.append(model.encode_text(tokens, normalize=True).float())
    return torch.cat(imgs), (torch.cat(txts) if texts else None)
