"""Training a ClipCap captioner on image-caption pairs (the formats `read_pairs` reads).

Image embeddings are computed once per image (taken from the catalog where a file is
indexed and unchanged) and cached in OUT/embeddings/, so a resumed run or a second variant
on the same data encodes nothing. The mapper always trains; the LM is fine-tuned with the
mlp variant and frozen with the transformer variant, as in the paper, unless told
otherwise. Checkpoints (OUT/last.pt) resume exactly; every epoch logs the validation loss
and metrics of greedy captions of the validation images to OUT/log.jsonl. The captioner is
written to OUT/captioner.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cliplens.caption import language_model as lms
from cliplens.caption.model import Captioner, CaptionerConfig, check_lm_setup
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
from cliplens.train.clip import (
    check_loss,
    check_schedule,
    rng_state,
    set_rng_state,
    warmup_cosine,
)
from cliplens.train.data import Pair


@dataclass(frozen=True)
class CaptionTrainConfig:
    lm: str = "gpt2"
    variant: str = "mlp"
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
    precision: str = "bf16"
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

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        if self.batch_size < 1:
            raise InvalidInputError(f"batch size {self.batch_size}: use at least 1")
        check_lm_setup(self.variant, self.lm, self.lm_trained)
        finite_number(self.word_dropout, "word dropout", 0, 1, high_open=True)
        if self.precision not in ("bf16", "fp32"):
            raise InvalidInputError(f"--precision {self.precision}: use bf16 or fp32")
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
    steps: int
    epochs_done: int
    losses: list[float]
    metrics: list[dict[str, Any]]
    captioner_path: Path | None
    stopped_early: bool = False


@dataclass
class EmbeddedPairs:
    """Unique images with their embeddings, and the pairs as (image row, caption)."""

    vectors: np.ndarray  # (n_images, D)
    images: list[str]
    rows: np.ndarray  # (n_pairs,) row of each pair's image
    captions: list[str]

    def references(self) -> list[list[str]]:
        refs: list[list[str]] = [[] for _ in self.images]
        for r, c in zip(self.rows, self.captions, strict=True):
            refs[r].append(c)
        return refs


def _cache_key(model_id: str, pairs: Sequence[Pair]) -> str:
    h = hashlib.sha256(model_id.encode())
    for p in dict.fromkeys(p.image for p in pairs):
        h.update(str(Path(p).resolve()).encode())
        source = p if p.is_file() else p.parent  # a shard member: the shard's stamp
        if source.is_file():
            st = source.stat()
            h.update(f"|{st.st_size}|{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def embed_pairs(
    ref: Any,
    pairs: Sequence[Pair],
    cache_dir: Path | None = None,
    catalog: Any = None,
    progress: bool = False,
    warn: Callable[[str], None] = lambda m: None,
) -> EmbeddedPairs:
    """Embed each distinct image once (catalog rows reused); cached under cache_dir, keyed by
    the model and every image's path, size and mtime. The cache is written when all are
    done: for a large set, `cliplens index` it first, which resumes when interrupted, and
    the embeddings come from the catalog."""
    from cliplens.store.npz import load_arrays, save_arrays
    from cliplens.tasks.embed import embed_files

    by_image: dict[Path, Pair] = {p.image: p for p in pairs}
    cache = None
    if cache_dir is not None:
        cache = cache_dir / f"embeddings-{_cache_key(ref.info.model_id, pairs)}.npz"
        if cache.is_file():
            arrays, _ = load_arrays(cache, "the embedding cache")
            images = [str(s) for s in arrays["images"]]
            return _pair_rows(pairs, images, arrays["vectors"])
    files = [i for i, p in by_image.items() if p.data is None]
    members = [p for p in by_image.values() if p.data is not None]
    images: list[str] = []
    blocks: list[np.ndarray] = []
    if files:
        done = embed_files(ref, files, catalog, progress=progress)
        for failure in done.failures:
            warn(f"{failure} (its pairs are skipped)")
        resolved = {str(Path(f).resolve()): str(f) for f in files}
        images += [resolved[p] for p in done.paths]
        blocks.append(done.vectors)
    if members:
        result = ref.load().encode_images_lenient([p.source() for p in members], progress=progress)
        for failure in result.failures:
            warn(f"{failure} (its pairs are skipped)")
        images += [str(members[i].image) for i in result.kept]
        blocks.append(result.vectors)
    if not images:
        raise InvalidInputError(f"none of the {len(by_image)} images could be read")
    vectors = np.concatenate(blocks).astype(np.float32)
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        save_arrays(cache, {}, vectors=vectors, images=np.array(images))
    return _pair_rows(pairs, images, vectors)


def _pair_rows(pairs: Sequence[Pair], images: list[str], vectors: np.ndarray) -> EmbeddedPairs:
    index = {s: i for i, s in enumerate(images)}
    kept = [(index[str(p.image)], p.caption) for p in pairs if str(p.image) in index]
    rows = np.array([r for r, _ in kept], dtype=np.int64)
    return EmbeddedPairs(vectors, images, rows, [c for _, c in kept])


def _build(cfg: CaptionTrainConfig, encoder: dict[str, Any], captions: list[str], out: Path):
    """The captioner to train. A scratch LM's tokenizer and config are kept in OUT/scratch-lm
    so a resumed run rebuilds the same one."""
    if lms.is_scratch(cfg.lm):
        folder = out / "scratch-lm"
        if (folder / "config.json").is_file():
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
        encoder=encoder["name"], encoder_id=encoder["model_id"], embed_dim=encoder["dim"],
        lm=cfg.lm, lm_width=lms.embedding_width(lm), variant=cfg.variant,
        lm_trained=cfg.lm_trained, prefix_length=cfg.prefix_length,
        mapper_layers=cfg.mapper_layers, max_tokens=cfg.max_tokens,
    )  # fmt: skip
    torch.manual_seed(cfg.seed)
    return Captioner(ccfg, lm, tokenizer)


def train_captioner(
    cfg: CaptionTrainConfig,
    encoder: dict[str, Any],
    train_data: EmbeddedPairs,
    out_dir: str | os.PathLike,
    val_data: EmbeddedPairs | None = None,
    resume: bool = True,
    max_steps: int | None = None,
    progress: bool = False,
) -> CaptionTrainResult:
    """Train; `encoder` is {"name", "model_id", "dim"} of the model that made the embeddings.

    Checkpoints to out_dir/last.pt and resumes from it; `max_steps` stops after that many
    steps in total (checkpointed, and the captioner saved, as `max_minutes` does)."""
    from cliplens.progress import progress_bar

    cfg.validate()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    n = len(train_data.captions)
    if n < cfg.batch_size:
        raise InvalidInputError(f"{n} training pairs: fewer than one batch of {cfg.batch_size}")
    device = torch.device(cfg.device)
    model = _build(cfg, encoder, train_data.captions, out).to(device)
    groups = [{"params": list(model.mapper.parameters()), "lr": cfg.lr}]
    if cfg.lm_trained:
        lm_lr = cfg.lm_lr or (cfg.lr if lms.is_scratch(cfg.lm) else cfg.lr / 20)
        groups.append({"params": [p for p in model.lm.parameters() if p.requires_grad],
                       "lr": lm_lr})  # fmt: skip
    optimizer = torch.optim.AdamW(groups, weight_decay=cfg.weight_decay)
    per_epoch = n // cfg.batch_size
    total = per_epoch * cfg.epochs
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(cfg.warmup, total))
    step, epoch = 0, 0
    ckpt = out / "last.pt"
    saved_cfg = {"train": asdict(cfg), "encoder": encoder}
    if resume and ckpt.is_file():
        state = torch.load(ckpt, map_location=device, weights_only=False)
        if state["config"] != json.loads(json.dumps(saved_cfg)):
            raise InvalidInputError(f"{ckpt} was written with other settings; use another --out")
        model.mapper.load_state_dict(state["mapper"])
        if cfg.lm_trained:
            model.lm.load_state_dict(state["lm"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        step, epoch = state["step"], state["epoch"]
        set_rng_state(state["rng"])
    trainable = [p for g in groups for p in g["params"]]
    bf16 = cfg.precision == "bf16"
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)
    log = (out / "log.jsonl").open("a", encoding="utf-8", buffering=1)
    losses: list[float] = []
    metrics: list[dict[str, Any]] = []
    start = time.perf_counter()
    stopped = False

    def save() -> None:
        tmp = ckpt.with_name(".last.pt.tmp")
        state = {"config": json.loads(json.dumps(saved_cfg)), "mapper": model.mapper.state_dict(),
                 "lm": model.lm.state_dict() if cfg.lm_trained else None,
                 "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                 "step": step, "epoch": epoch, "rng": rng_state()}  # fmt: skip
        torch.save(state, tmp)
        tmp.replace(ckpt)

    vectors = torch.from_numpy(train_data.vectors)
    with progress_bar(total - step, "training captioner", progress) as advance:
        while epoch < cfg.epochs and not stopped:
            order = np.random.default_rng([cfg.seed, epoch]).permutation(n)
            for k in range(step - epoch * per_epoch, per_epoch):
                model.train()
                if not cfg.lm_trained:
                    model.lm.eval()  # no dropout in a frozen LM
                batch = order[k * cfg.batch_size : (k + 1) * cfg.batch_size]
                emb = vectors[train_data.rows[batch]]
                with autocast:
                    captions = [train_data.captions[i] for i in batch]
                    loss = model.loss(emb, captions, cfg.word_dropout)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                value = loss.item()  # read once backward is queued (a GPU waits once a step)
                check_loss(value, step, cfg.lr, out)
                if cfg.grad_clip:
                    torch.nn.utils.clip_grad_norm_(trainable, cfg.grad_clip)
                optimizer.step()
                scheduler.step()
                step += 1
                losses.append(value)
                advance(1)
                row = {"step": step, "epoch": epoch, "loss": round(losses[-1], 5),
                       "seconds": round(time.perf_counter() - start, 2)}  # fmt: skip
                log.write(json.dumps(row) + "\n")
                out_of_time = bool(cfg.max_minutes) and (
                    time.perf_counter() - start > 60 * (cfg.max_minutes or 0)
                )
                if (max_steps and step >= max_steps) or out_of_time:
                    stopped = True
                    break
                if step % cfg.checkpoint_every == 0:
                    save()
            if not stopped:
                epoch += 1
                m = {"epoch": epoch, "step": step,
                     "minutes": round((time.perf_counter() - start) / 60, 2)}  # fmt: skip
                if val_data is not None:
                    m.update(evaluate_captioner(model, val_data, cfg.eval_images, bf16))
                metrics.append(m)
                log.write(json.dumps(m) + "\n")
            save()
    log.close()
    path = model.save(out / "captioner") if (epoch >= cfg.epochs or stopped) else None
    return CaptionTrainResult(step, epoch, losses, metrics, path, stopped)


def evaluate_captioner(
    model: Captioner, data: EmbeddedPairs, images: int = 200, bf16: bool = False
) -> dict[str, float]:
    """Validation loss (teacher forced, all pairs) and metrics of greedy captions of the
    first `images` images against all their references."""
    from cliplens.caption.metrics import score_captions

    model.eval()
    vectors = torch.from_numpy(data.vectors)
    total, count = 0.0, 0
    autocast = torch.autocast(model.device.type, dtype=torch.bfloat16, enabled=bf16)
    with torch.inference_mode(), autocast:
        for lo in range(0, len(data.captions), 64):
            rows = data.rows[lo : lo + 64]
            caps = data.captions[lo : lo + 64]
            total += float(model.loss(vectors[rows], caps)) * len(caps)
            count += len(caps)
    out = {"val_loss": round(total / max(count, 1), 5)}
    if images > 0:
        k = min(images, len(data.images))
        generated = model.generate(data.vectors[:k], bf16=bf16)
        # for watching training, Python tokenisation: no Java process each epoch
        scores = score_captions(
            generated, data.references()[:k], metrics=("bleu", "cider"), java=False
        )
        out.update({f"val_{m}": round(v, 4) for m, v in scores.scores.items()
                    if m in ("BLEU-4", "CIDEr-D")})  # fmt: skip
    return out


def resolve_encoder(ref: Any) -> dict[str, Any]:
    """What a captioner records about its encoder: a loadable name (local paths absolute)."""
    name = ref.name
    if name.startswith("local:"):
        name = "local:" + str(Path(name[len("local:") :]).expanduser().resolve())
    return {"name": name, "model_id": ref.info.model_id, "dim": int(ref.info.dim)}
