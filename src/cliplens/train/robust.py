"""Corruption-robust image encoders by contrastive distillation (Ravula et al., "Inverse
Problems Leveraging Pre-trained Contrastive Representations", NeurIPS 2021).

A student starts as a copy of the teacher's image tower. It sees corrupted images (blur,
noise, JPEG, pixelation, occlusion at random severities, and some clean ones) and learns to
put each where the frozen teacher puts the clean image. Two losses (`RobustConfig.loss`):

- "simclr" (the default: the paper's, as its sample configuration trains): NT-Xent at a
  fixed temperature 0.1 over the 2N embeddings of a batch, the teacher's clean one and
  the student's corrupted one of each image, interleaved; each one's positive is the other
  view of its image, its negatives the other 2N - 2, teacher's and student's alike.
- "clip-align" (cliplens's): the repository's `clip` variant, a symmetric InfoNCE between
  the student's N and the teacher's N embeddings (in the student-to-teacher direction
  the negatives are the teacher's embeddings of the other images, in the other direction
  the student's), plus an alignment term, `align_weight` x mean(1 - cosine) to the
  teacher's clean embedding. Either loss only ranks: the student may drift as a whole and
  still win it; the alignment term keeps it in the teacher's space, so that zero-shot
  classifiers and linear probes built there work on its output.

The text tower is untouched.

Corruptions are applied to the decoded image (before the model's resize and crop), as
they would happen to a photo. `evaluate_robust` reports teacher and student accuracy per
corruption and severity (`RobustRow`s; `evaluate_robust_run` for a finished run), by
zero-shot classification or by a linear probe fit on the teacher's clean embeddings.
Training is `train.loop`'s: a time limit, checkpoints and an exact resume, as CLIP and
ClipCap training have.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

import numpy as np
import torch

from cliplens.corruptions import CORRUPTIONS, CorruptionKind, corrupt
from cliplens.device import Precision
from cliplens.errors import InvalidInputError
from cliplens.images import ImageSource, open_image
from cliplens.limits import (
    MAX_ALIGN_WEIGHT,
    MAX_TEMPERATURE,
    MAX_TRAIN_STEPS,
    SEVERITIES,
    finite_number,
    whole_number,
)
from cliplens.models.encoder import Encoder
from cliplens.models.registry import load_model
from cliplens.models.torch_encoder import TorchEncoder
from cliplens.progress import progress_bar
from cliplens.store.files import write_atomic, write_atomic_binary
from cliplens.tasks.classify import zero_shot_weights
from cliplens.tasks.probe import LinearProbe, fit_probe
from cliplens.train import loss as contrastive
from cliplens.train.loop import (
    LoopSettings,
    Step,
    TrainingLoop,
    check_schedule,
    training_precision,
    warmup_cosine_schedule,
)

# how `evaluate_robust` classifies: zero-shot among the class names, or with a linear
# probe fit on the teacher's clean embeddings of labelled training images
EvalMode = Literal["zero-shot", "probe"]
EVAL_MODES: tuple[EvalMode, ...] = get_args(EvalMode)
# the distillation loss: the paper's NT-Xent, or cliplens's CLIP-style loss with alignment
RobustLoss = Literal["simclr", "clip-align"]
ROBUST_LOSSES: tuple[RobustLoss, ...] = get_args(RobustLoss)
# of the 1 - cosine term under "clip-align" when `align_weight` is not given. At 1, a shapes
# student lost 19 points of clean accuracy; at 10 it kept it (benchmarks/RESULTS.md)
CLIP_ALIGN_WEIGHT = 10.0


@dataclass
class RobustConfig:
    """How to distil a robust student: the corruptions it sees and the loop's settings,
    checked where they are made (why: a run that cannot work stops before decoding).

    >>> import cliplens
    >>> cfg = cliplens.RobustConfig(corruptions=("blur", "noise"), severities=(3, 5))
    >>> cfg.loss, cfg.temperature, cfg.alignment
    ('simclr', 0.1, 0.0)
    """

    corruptions: tuple[CorruptionKind, ...] = CORRUPTIONS
    severities: tuple[int, ...] = SEVERITIES
    clean_fraction: float = 0.3  # share of training images shown uncorrupted
    epochs: int = 3
    max_minutes: float | None = None
    batch_size: int = 64
    lr: float = 1e-4
    weight_decay: float = 0.01
    warmup_steps: int = 20
    loss: RobustLoss = "simclr"
    temperature: float = 0.1  # of either loss, fixed (the paper's `loss_tau`)
    # of the mean (1 - cosine) to the teacher's clean embedding, added to either loss;
    # None: 0 under "simclr" (the paper has none), CLIP_ALIGN_WEIGHT under "clip-align"
    align_weight: float | None = None
    precision: Precision = Precision.BF16
    seed: int = 0
    grad_clip: float = 1.0
    checkpoint_every: int = 200  # optimiser steps

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        finite_number(self.clean_fraction, "clean fraction", 0, 1, high_open=True)
        if self.batch_size < 2:
            raise InvalidInputError(f"batch size {self.batch_size}: use at least 2")
        finite_number(
            self.temperature, "temperature", 0, MAX_TEMPERATURE, low_open=True, example="0.1"
        )
        if self.loss not in ROBUST_LOSSES:
            raise InvalidInputError(f"`loss` {self.loss}: {' or '.join(ROBUST_LOSSES)}")
        if self.align_weight is not None:
            finite_number(self.align_weight, "align weight", 0, MAX_ALIGN_WEIGHT)
        finite_number(self.weight_decay, "weight decay", 0, 10)
        finite_number(self.grad_clip, "gradient clipping norm (0: none)", 0)
        check_schedule(self.lr, self.epochs, self.warmup_steps, self.max_minutes, self.seed)
        whole_number(self.checkpoint_every, "checkpoint interval (steps)", 1, MAX_TRAIN_STEPS)
        self.precision = training_precision(self.precision)
        unknown = [c for c in self.corruptions if c not in CORRUPTIONS]
        if not self.corruptions or unknown:
            raise InvalidInputError(
                f"corruptions {unknown or 'none'}: choose from {', '.join(CORRUPTIONS)}"
            )
        if not self.severities or any(s not in SEVERITIES for s in self.severities):
            raise InvalidInputError(
                f"severities {self.severities}: choose from {SEVERITIES[0]} to {SEVERITIES[-1]}"
            )

    @property
    def alignment(self) -> float:
        """The weight of the 1 - cosine term this run trains with."""
        if self.align_weight is not None:
            return self.align_weight
        return CLIP_ALIGN_WEIGHT if self.loss == "clip-align" else 0.0


@dataclass
class RobustResult:
    """The student, how its training went, and where it is saved."""

    student: TorchEncoder  # the teacher with the student's image tower
    steps: int
    losses: list[float]
    minutes: float
    model_path: Path | None  # a local: checkpoint (open_clip teachers)
    # the teacher's clean embeddings of the training images, in input order: the targets,
    # and what a probe in the teacher's space is fit on (`teacher_probe`)
    teacher_embeddings: np.ndarray
    tower_path: Path | None = None
    log: list[dict[str, Any]] = field(default_factory=list)

    @property
    def saved_path(self) -> Path | None:
        """The local: checkpoint, or the image tower alone for other teachers."""
        return self.model_path or self.tower_path

    def to_dict(self) -> dict[str, Any]:
        final_loss = self.losses[-1] if self.losses else None
        summary = {"steps": self.steps, "minutes": round(self.minutes, 2)}
        return summary | {"student": str(self.saved_path), "final_loss": final_loss}


def parse_eval_mode(eval_mode: str) -> EvalMode:
    for mode in EVAL_MODES:
        if mode == eval_mode:
            return mode
    raise InvalidInputError(f"`eval_mode` {eval_mode}: {' or '.join(EVAL_MODES)}")


def load_teacher(name: str | None, device: str | None = None) -> TorchEncoder:
    """The model to make robust, in fp32 whatever the device: the student starts from its
    exact weights, and training chooses the student's precision (`RobustConfig.precision`).

    >>> import cliplens
    >>> teacher = cliplens.load_teacher("ViT-B-32:openai")
    >>> cliplens.train_robust(teacher, files, "run", cliplens.RobustConfig())
    """
    return load_model(name, device=device, precision="fp32")


def decode_all(
    teacher: Encoder, images: Sequence[ImageSource], progress: bool = False
) -> list[Any]:
    """The images decoded once (RGB PIL, downscaled no further than the model needs)."""
    size = teacher.info.preprocessing.resize_size
    out = []
    with progress_bar(len(images), "decoding", progress) as advance:
        for item in images:
            out.append(open_image(item, min_size=size))
            advance(1)
    return out


def corrupted_crops(
    teacher: Encoder,
    images: Sequence[Any],
    kinds: Sequence[CorruptionKind | None],
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


def _embed_crops(encoder: TorchEncoder, crops: np.ndarray, batch: int = 128) -> np.ndarray:
    blocks = [encoder.encode_crops(crops[i : i + batch]) for i in range(0, len(crops), batch)]
    return np.concatenate(blocks)


def train_robust(
    teacher: Encoder,
    images: Sequence[ImageSource],
    out_dir: str | os.PathLike,
    cfg: RobustConfig,
    resume: bool = True,
    max_steps: int | None = None,
    progress: bool = False,
) -> RobustResult:
    """Distil a corruption-robust student from `teacher` on `images`: why, an image tower
    that still finds blurred, noisy or damaged photos where the teacher puts the clean
    ones, with the teacher's text tower and space kept. Checkpoints to out_dir/last.pt and
    resumes from it; `max_steps` stops after that many steps in all.

    >>> import cliplens
    >>> cfg = cliplens.RobustConfig(corruptions=("blur", "noise"), epochs=1)
    >>> cliplens.train_robust(cliplens.load_model("offline"), photos, "run", cfg)  # doctest: +SKIP
    """
    cfg.validate()
    if len(images) < cfg.batch_size:
        raise InvalidInputError(f"{len(images)} images: fewer than one batch of {cfg.batch_size}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    network = teacher.load()
    decoded = decode_all(teacher, images, progress)
    prep = teacher.info.preprocessing
    teacher_clean = _embed_crops(network, np.stack([prep.crop(img) for img in decoded]))
    torch.manual_seed(cfg.seed)
    student = copy.deepcopy(network.image_tower()).float().requires_grad_(True)
    # eval mode throughout: BatchNorm keeps the teacher's statistics and dropout stays off,
    # so the student starts exactly at the teacher and moves only by its gradients
    student.eval()
    params = [p for p in student.parameters() if p.requires_grad]
    rng = np.random.default_rng(cfg.seed)  # the order, and which corruption each image gets
    identity = {"train": asdict(cfg), "teacher": teacher.info.model_id}
    loop = _loop(cfg, student, params, len(decoded), out, rng, max_steps, identity)
    if resume:
        loop.resume()
    targets = torch.from_numpy(teacher_clean)
    step = _distil_step(network, student, decoded, targets, cfg, rng)
    outcome = loop.run(step, params, label="distilling", progress=progress)
    student.eval().requires_grad_(False)
    model_path, tower_path = _save_student(network, student, out, cfg)
    weights = hashlib.sha256()  # the student's identity is its weights
    for value in student.state_dict().values():
        weights.update(value.detach().cpu().contiguous().numpy().tobytes())
    model_id = f"robust({teacher.info.model_id})@{weights.hexdigest()[:12]}"
    encoder = network.with_image_tower(student, model_id)
    return RobustResult(
        encoder,
        outcome.steps,
        outcome.losses,
        outcome.minutes,
        model_path,
        teacher_clean,
        tower_path,
        outcome.log,
    )


def _loop(
    cfg: RobustConfig,
    student: torch.nn.Module,
    params: list[torch.nn.Parameter],
    n: int,
    out: Path,
    rng: np.random.Generator,
    max_steps: int | None,
    identity: dict[str, Any],
) -> TrainingLoop:
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)
    per_epoch = n // cfg.batch_size
    scheduler = warmup_cosine_schedule(optimizer, cfg.warmup_steps, per_epoch * cfg.epochs)
    settings = LoopSettings.of(cfg, per_epoch, max_steps)
    modules = {"student": student}

    def order(epoch: int) -> np.ndarray:
        return rng.permutation(n)

    return TrainingLoop(
        out, identity, modules, optimizer, scheduler, settings, order, generator=rng
    )


def _distil_step(
    teacher: TorchEncoder,
    student: torch.nn.Module,
    decoded: list[Any],
    targets: torch.Tensor,
    cfg: RobustConfig,
    rng: np.random.Generator,
) -> Step:
    """A batch of images, each corrupted at random (or clean), pulled by the student to the
    teacher's clean embedding of it (`RobustConfig.loss`)."""
    prep = teacher.info.preprocessing
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.precision == "bf16")
    scale = torch.tensor(1.0 / cfg.temperature)

    def step(order: np.ndarray, k: int) -> float:
        idx = order[k * cfg.batch_size : (k + 1) * cfg.batch_size]
        clean = rng.random(len(idx)) < cfg.clean_fraction
        kinds = [None if c else str(rng.choice(cfg.corruptions)) for c in clean]
        sevs = [int(rng.choice(cfg.severities)) for _ in idx]
        batch = [decoded[i] for i in idx]
        crops = corrupted_crops(teacher, batch, kinds, sevs, [rng] * len(idx))
        pixels = torch.from_numpy(prep.normalize(crops))
        with autocast:
            emb = student(pixels).float()
        emb = torch.nn.functional.normalize(emb, dim=-1)
        target = targets[idx]
        if cfg.loss == "simclr":
            loss = contrastive.nt_xent_loss(target, emb, cfg.temperature)
        else:
            loss = contrastive.clip_loss(emb, target, scale)
        if cfg.alignment:
            loss = loss + cfg.alignment * (1 - (emb * target).sum(-1)).mean()
        loss.backward()
        return loss.item()  # read once backward is queued (a GPU waits once a step)

    return step


def _save_student(
    teacher: TorchEncoder, student: torch.nn.Module, out: Path, cfg: RobustConfig
) -> tuple[Path | None, Path | None]:
    """(model_path, tower_path): an open_clip teacher's whole model with the student's
    tower, as a checkpoint every task loads; for other teachers the tower alone."""
    model_cfg = getattr(teacher, "model_cfg", None)
    if model_cfg:
        # heavy: open_clip loads only for an open_clip teacher's checkpoint
        from cliplens.models.openclip import save_checkpoint

        full = copy.deepcopy(teacher.model).float()  # type: ignore[attr-defined]
        full.visual = student
        arch = f"robust-{teacher.info.arch}"
        pp = dict(student.preprocess_cfg)
        return save_checkpoint(full, out / "model", model_cfg, arch, pp), None
    tower_path = out / "student.pt"
    saved = {"teacher": teacher.info.model_id, "config": asdict(cfg)}
    saved["state_dict"] = student.state_dict()
    write_atomic_binary(tower_path, lambda f: torch.save(saved, f))
    return None, tower_path


def teacher_probe(
    teacher: Encoder,
    result: RobustResult,
    images: Sequence[ImageSource],
    files: Sequence[Path],
    labels: Sequence[str],
) -> LinearProbe:
    """A linear probe in the teacher's space, fit on its clean embeddings of the training
    `images` that `files` (with their `labels`) name: why, to compare teacher and student
    with one classifier built where the teacher puts clean images, encoding nothing again.

    >>> import cliplens
    >>> result = cliplens.train_robust(teacher, files, "run", cliplens.RobustConfig())
    >>> probe = cliplens.teacher_probe(teacher, result, files, files[:100], labels[:100])
    """
    row = {image: i for i, image in enumerate(images) if isinstance(image, Path)}
    clean = result.teacher_embeddings[[row[f] for f in files]]
    return fit_probe(clean, list(labels), teacher.info.model_id)


@dataclass(frozen=True)
class RobustRow:
    """Accuracy of each encoder under one condition (a corruption at a severity, or clean),
    so teacher and student are compared on the same corrupted images."""

    corruption: str  # a CorruptionKind, or "clean"
    severity: int  # 0 when clean
    accuracy: dict[str, float]  # encoder name -> accuracy

    def to_dict(self) -> dict[str, Any]:
        """{"corruption", "severity", <name>: accuracy, ...}"""
        return {"corruption": self.corruption, "severity": self.severity, **self.accuracy}


def evaluate_robust(
    encoders: dict[str, Encoder],
    images: Sequence[ImageSource],
    labels: Sequence[str],
    corruptions: Sequence[CorruptionKind] = CORRUPTIONS,
    severities: Sequence[int] = SEVERITIES,
    templates: Sequence[str] = ("a photo of a {}.",),
    probe: LinearProbe | None = None,
    seed: int = 0,
    progress: bool = False,
) -> list[RobustRow]:
    """Accuracy of each encoder (name -> Encoder sharing one preprocessing and text tower)
    on `images` clean and under every corruption and severity: why, to see what a robust
    student gains over its teacher, and where. One `RobustRow` per condition.

    By default zero-shot among the sorted label names. With `probe`, a linear probe fit on
    the teacher's clean embeddings (`teacher_probe`), that classifier is applied to every
    encoder: the one built in the teacher's space.

    >>> import cliplens
    >>> result = cliplens.train_robust(teacher, photos, "run", cliplens.RobustConfig())
    >>> cliplens.evaluate_robust({"teacher": teacher, "student": result.student}, x, y)
    """
    names = list(encoders)
    networks = {name: encoders[name].load() for name in names}
    first = encoders[names[0]]
    images = decode_all(first, images)  # once: every condition corrupts the same pixels
    classes = sorted(set(labels))
    truth = np.array([classes.index(label) for label in labels])
    predict = _classifier(first, classes, labels, templates, probe)
    conditions = [(None, 0)] + [(c, s) for c in corruptions for s in severities]
    rows = []
    with progress_bar(len(conditions), "evaluating", progress) as advance:
        for kind, sev in conditions:
            # seeded by the condition itself: the same images whatever else is evaluated
            key = CORRUPTIONS.index(kind) + 1 if kind else 0
            rngs = [np.random.default_rng([seed, key, sev, i]) for i in range(len(images))]
            n = len(images)
            crops = corrupted_crops(first, images, [kind] * n, [sev] * n, rngs)
            accuracy = {}
            for name in names:
                pred = predict(_embed_crops(networks[name], crops))
                accuracy[name] = float(np.mean(pred == truth))
            rows.append(RobustRow(kind or "clean", sev, accuracy))
            advance(1)
    return rows


def evaluate_robust_run(
    teacher: Encoder,
    result: RobustResult,
    images: Sequence[ImageSource],
    files: Sequence[Path],
    labels: Sequence[str],
    mode: EvalMode = "zero-shot",
    probe_data: tuple[Sequence[Path], Sequence[str]] = ((), ()),
    corruptions: Sequence[CorruptionKind] = CORRUPTIONS,
    templates: Sequence[str] = ("a photo of a {}.",),
    seed: int = 0,
    out: Path | None = None,
    progress: bool = False,
) -> list[RobustRow]:
    """Teacher against the student of `result` (trained on `images`) on the held-out
    `files`: zero-shot among the label names, or with mode "probe" a `teacher_probe` fit on
    `probe_data` (training files and their labels, among `images`). Writes `out`/eval.json
    ({"mode", "rows"}) when `out` is given.

    Why: one call for what a robust run's evaluation is, for the CLI and for scripts alike.

    >>> import cliplens
    >>> result = cliplens.train_robust(teacher, files, "run", cliplens.RobustConfig())
    >>> cliplens.evaluate_robust_run(teacher, result, files, test, test_labels, out=Path("run"))
    """
    probe = None
    if mode == "probe":  # fit in the teacher's space, on the embeddings already made
        probe = teacher_probe(teacher, result, images, *probe_data)
    rows = evaluate_robust(
        {"teacher": teacher, "student": result.student},
        files,
        labels,
        corruptions=corruptions,
        templates=templates,
        probe=probe,
        seed=seed,
        progress=progress,
    )
    if out is not None:
        text = json.dumps({"mode": mode, "rows": [r.to_dict() for r in rows]}, indent=1)
        write_atomic(Path(out) / "eval.json", lambda tmp: tmp.write_text(text))
    return rows


def _classifier(
    encoder: Encoder,
    classes: list[str],
    labels: Sequence[str],
    templates: Sequence[str],
    probe: LinearProbe | None,
) -> Callable[[np.ndarray], np.ndarray]:
    """Embeddings -> class numbers (in `classes`): the probe's, or zero-shot."""
    if probe is not None:
        unknown = sorted(set(labels) - set(probe.classes))
        if unknown:
            raise InvalidInputError(f"evaluation classes {unknown} are not in the probe data")
        order = [probe.classes.index(c) for c in classes]
        return lambda vectors: probe.probabilities(vectors)[:, order].argmax(axis=1)
    weights = zero_shot_weights(encoder, classes, templates)
    return lambda vectors: (vectors @ weights.T).argmax(axis=1)
