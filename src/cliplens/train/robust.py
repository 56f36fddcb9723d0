"""Corruption-robust image encoders by contrastive distillation (Ravula et al., "Inverse
Problems Leveraging Pre-trained Contrastive Representations", NeurIPS 2021).

A student starts as a copy of the teacher's image tower. It sees corrupted images (blur,
noise, JPEG, pixelation, occlusion at random severities, and some clean ones) and learns to
put each where the frozen teacher puts the clean image: an InfoNCE loss whose positive is
the teacher's clean embedding of the same image and whose negatives are the teacher's
embeddings of the other images in the batch. The paper's loss only ranks: the student may
drift as a whole and still win it. An alignment term (1 - cosine to the teacher's clean
embedding, `align_weight`) keeps it in the teacher's space, so that zero-shot classifiers
and linear probes built there work on its output; the text tower is untouched.

Corruptions are applied to the decoded image (before the model's resize and crop), as
they would happen to a photo. `evaluate_robust` reports teacher and student accuracy per
corruption and severity, by zero-shot classification or by a linear probe fit on the
teacher's clean embeddings.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cliplens.corruptions import CORRUPTIONS, corrupt
from cliplens.errors import InvalidInputError
from cliplens.limits import MAX_ALIGN_WEIGHT, MAX_TEMPERATURE, SEVERITIES, finite_number
from cliplens.tasks.probe import LinearProbe


@dataclass
class RobustConfig:
    corruptions: tuple[str, ...] = CORRUPTIONS
    severities: tuple[int, ...] = SEVERITIES
    clean_fraction: float = 0.3  # share of training images shown uncorrupted
    epochs: int = 3
    max_minutes: float | None = None
    batch_size: int = 64
    lr: float = 1e-4
    weight_decay: float = 0.01
    warmup_steps: int = 20
    temperature: float = 0.1  # of the InfoNCE loss
    # of the mean (1 - cosine) to the teacher's clean embedding. At 1, a shapes student lost
    # 19 points of clean accuracy; at 10 it kept it (benchmarks/RESULTS.md)
    align_weight: float = 10.0
    precision: str = "bf16"
    seed: int = 0

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        from cliplens.train.clip import check_schedule

        finite_number(self.clean_fraction, "clean fraction", 0, 1, high_open=True)
        if self.batch_size < 2:
            raise InvalidInputError(f"batch size {self.batch_size}: use at least 2")
        finite_number(
            self.temperature, "temperature", 0, MAX_TEMPERATURE, low_open=True, example="0.1"
        )
        finite_number(self.align_weight, "align weight", 0, MAX_ALIGN_WEIGHT)
        finite_number(self.weight_decay, "weight decay", 0, 10)
        check_schedule(self.lr, self.epochs, self.warmup_steps, self.max_minutes, self.seed)
        if self.precision not in ("fp32", "bf16"):
            raise InvalidInputError(f"precision '{self.precision}': fp32 or bf16")
        unknown = [c for c in self.corruptions if c not in CORRUPTIONS]
        if not self.corruptions or unknown:
            raise InvalidInputError(
                f"corruptions {unknown or 'none'}: choose from {', '.join(CORRUPTIONS)}"
            )
        if not self.severities or any(s not in SEVERITIES for s in self.severities):
            raise InvalidInputError(
                f"severities {self.severities}: choose from {SEVERITIES[0]} to {SEVERITIES[-1]}"
            )


@dataclass
class RobustResult:
    student: Any  # an Encoder: the teacher with the student's image tower
    steps: int
    losses: list[float]
    minutes: float
    model_path: Path | None  # a local: checkpoint (open_clip teachers)
    # the teacher's clean embeddings of the training images, in input order: the targets,
    # and what a probe in the teacher's space is fit on (`evaluate_robust`)
    teacher_embeddings: np.ndarray
    tower_path: Path | None = None
    log: list[dict[str, Any]] = field(default_factory=list)


def decode_all(teacher: Any, images: Sequence[Any], progress: bool = False) -> list[Any]:
    """The images decoded once (RGB PIL, downscaled no further than the model needs)."""
    from cliplens.images import open_image
    from cliplens.progress import progress_bar

    size = teacher.info.preprocessing.resize_size
    out = []
    with progress_bar(len(images), "decoding", progress) as advance:
        for item in images:
            out.append(open_image(item, min_size=size))
            advance(1)
    return out


def corrupted_crops(
    teacher: Any,
    images: Sequence[Any],
    kinds: Sequence[str | None],
    severities: Sequence[int],
    rngs: Sequence[np.random.Generator],
) -> np.ndarray:
    """uint8 crops of each image under its corruption (None: clean), in the teacher's
    preprocessing."""
    prep = teacher.info.preprocessing
    crops = []
    for img, kind, sev, rng in zip(images, kinds, severities, rngs, strict=True):
        crops.append(prep.crop(corrupt(img, kind, sev, rng) if kind else img))
    return np.stack(crops)


def _embed_crops(encoder: Any, crops: np.ndarray, batch: int = 128) -> np.ndarray:
    return np.concatenate([encoder.encode_crops(crops[i : i + batch])
                           for i in range(0, len(crops), batch)])  # fmt: skip


def train_robust(
    teacher: Any,
    images: Sequence[Any],
    out_dir: str | os.PathLike,
    cfg: RobustConfig,
    progress: bool = False,
) -> RobustResult:
    """Distil a corruption-robust student from `teacher` (an Encoder) on `images`."""
    from cliplens.progress import progress_bar
    from cliplens.train.clip import check_loss, warmup_cosine
    from cliplens.train.loss import clip_loss

    cfg.validate()
    if len(images) < cfg.batch_size:
        raise InvalidInputError(f"{len(images)} images: fewer than one batch of {cfg.batch_size}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    decoded = decode_all(teacher, images, progress)
    prep = teacher.info.preprocessing
    teacher_clean = _embed_crops(teacher, np.stack([prep.crop(img) for img in decoded]))
    targets = torch.from_numpy(teacher_clean)
    torch.manual_seed(cfg.seed)
    student = copy.deepcopy(teacher.image_tower()).float().requires_grad_(True)
    # eval mode throughout: BatchNorm keeps the teacher's statistics and dropout stays off,
    # so the student starts exactly at the teacher and moves only by its gradients
    student.eval()
    params = [p for p in student.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)
    per_epoch = len(decoded) // cfg.batch_size
    total = per_epoch * cfg.epochs
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(cfg.warmup_steps, total))
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.precision == "bf16")
    scale = torch.tensor(1.0 / cfg.temperature)
    rng = np.random.default_rng(cfg.seed)
    losses: list[float] = []
    log: list[dict[str, Any]] = []
    start, step, stopped = time.perf_counter(), 0, False
    with progress_bar(total, "distilling", progress) as advance:
        for epoch in range(cfg.epochs):
            order = rng.permutation(len(decoded))
            for k in range(per_epoch):
                idx = order[k * cfg.batch_size : (k + 1) * cfg.batch_size]
                clean = rng.random(len(idx)) < cfg.clean_fraction
                kinds = [None if c else str(rng.choice(cfg.corruptions)) for c in clean]
                sevs = [int(rng.choice(cfg.severities)) for _ in idx]
                crops = corrupted_crops(teacher, [decoded[i] for i in idx], kinds, sevs,
                                        [rng] * len(idx))  # fmt: skip
                pixels = torch.from_numpy(prep.normalize(crops))
                with autocast:
                    emb = student(pixels).float()
                emb = torch.nn.functional.normalize(emb, dim=-1)
                target = targets[idx]
                loss = clip_loss(emb, target, scale)
                if cfg.align_weight:
                    loss = loss + cfg.align_weight * (1 - (emb * target).sum(-1)).mean()
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                value = loss.item()  # read once backward is queued (a GPU waits once a step)
                check_loss(value, step, cfg.lr, out)
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                optimizer.step()
                scheduler.step()
                step += 1
                losses.append(value)
                log.append({"step": step, "epoch": epoch, "loss": round(losses[-1], 6)})
                advance(1)
                if cfg.max_minutes and time.perf_counter() - start > 60 * cfg.max_minutes:
                    stopped = True
                    break
            if stopped:
                break
    minutes = (time.perf_counter() - start) / 60
    student.eval().requires_grad_(False)
    weights = hashlib.sha256()  # the student's identity is its weights
    for value in student.state_dict().values():
        weights.update(value.detach().cpu().contiguous().numpy().tobytes())
    digest = weights.hexdigest()[:12]
    model_path = tower_path = None
    if getattr(teacher, "model_cfg", None):  # open_clip: a checkpoint every task loads
        from cliplens.models.openclip import save_checkpoint

        full = copy.deepcopy(teacher.model).float()
        full.visual = student
        model_path = save_checkpoint(full, out / "model", teacher.model_cfg,
                                     arch=f"robust-{teacher.info.arch}",
                                     preprocess_cfg=dict(student.preprocess_cfg))  # fmt: skip
        del full
    else:
        tower_path = out / "student.pt"
        torch.save({"teacher": teacher.info.model_id, "config": asdict(cfg),
                    "state_dict": student.state_dict()}, tower_path)  # fmt: skip
    encoder = teacher.with_image_tower(student, f"robust({teacher.info.model_id})@{digest}")
    with (out / "log.jsonl").open("w", encoding="utf-8") as f:
        f.writelines(json.dumps(row) + "\n" for row in log)
    return RobustResult(encoder, step, losses, minutes, model_path, teacher_clean, tower_path, log)


def evaluate_robust(
    encoders: dict[str, Any],
    images: Sequence[Any],
    labels: Sequence[str],
    corruptions: Sequence[str] = CORRUPTIONS,
    severities: Sequence[int] = SEVERITIES,
    templates: Sequence[str] = ("a photo of a {}.",),
    probe: LinearProbe | None = None,
    seed: int = 0,
    progress: bool = False,
) -> list[dict[str, Any]]:
    """Accuracy of each encoder (name -> Encoder sharing one preprocessing and text tower)
    on `images` (paths or decoded images) clean and under every corruption and severity:
    one row per condition, {"corruption", "severity", <name>: accuracy, ...}.

    By default zero-shot among the sorted label names. With `probe`, a linear probe fit on
    the teacher's clean embeddings (`RobustResult.teacher_embeddings`), that classifier is
    applied to every encoder: the one built in the teacher's space."""
    from cliplens.progress import progress_bar
    from cliplens.tasks.classify import zero_shot_weights

    names = list(encoders)
    first = encoders[names[0]]
    images = decode_all(first, images)  # once: every condition corrupts the same pixels
    classes = sorted(set(labels))
    truth = np.array([classes.index(label) for label in labels])
    if probe is not None:
        unknown = sorted(set(labels) - set(probe.classes))
        if unknown:
            raise InvalidInputError(f"evaluation classes {unknown} are not in the probe data")
        order = [probe.classes.index(c) for c in classes]

        def predict(vectors: np.ndarray) -> np.ndarray:
            return probe.probabilities(vectors)[:, order].argmax(axis=1)
    else:
        weights = zero_shot_weights(first, classes, templates)

        def predict(vectors: np.ndarray) -> np.ndarray:
            return (vectors @ weights.T).argmax(axis=1)

    conditions = [(None, 0)] + [(c, s) for c in corruptions for s in severities]
    rows = []
    with progress_bar(len(conditions), "evaluating", progress) as advance:
        for kind, sev in conditions:
            # seeded by the condition itself: the same images whatever else is evaluated
            key = CORRUPTIONS.index(kind) + 1 if kind else 0
            rngs = [np.random.default_rng([seed, key, sev, i]) for i in range(len(images))]
            crops = corrupted_crops(first, images, [kind] * len(images), [sev] * len(images),
                                    rngs)  # fmt: skip
            row: dict[str, Any] = {"corruption": kind or "clean", "severity": sev}
            for name in names:
                pred = predict(_embed_crops(encoders[name], crops))
                row[name] = float(np.mean(pred == truth))
            rows.append(row)
            advance(1)
    return rows
