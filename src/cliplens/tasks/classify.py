"""Zero-shot classification: compare an image with the embedding of each label's prompts.

Prompt ensembling as in the CLIP paper: each label is embedded through several
templates ("a photo of a {}."), the normalised embeddings are averaged and
renormalised. Single-label mode takes a softmax over labels at the model's logit
scale; multi-label mode scores each label on its own against a threshold (a sigmoid
for models trained with one, such as SigLIP, else the cosine similarity).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Literal, get_args

import numpy as np

from cliplens.errors import ImageError, InvalidInputError
from cliplens.images import ImageSource, describe
from cliplens.models.encoder import Encoder
from cliplens.textfile import read_lines

# the bundled prompt template sets; a file of templates or a list may be given instead
TemplateSet = Literal["default", "imagenet", "photo", "none"]
TEMPLATE_SETS: tuple[TemplateSet, ...] = get_args(TemplateSet)


def load_templates(spec: str | Sequence[str] | None = "default") -> list[str]:
    """A named set (default: 7, imagenet: the paper's 80, photo, none), a file, or a list.

    Why: prompt ensembling over templates is worth a few points of zero-shot accuracy.

    >>> import cliplens
    >>> templates = cliplens.load_templates("imagenet")
    >>> cliplens.zero_shot_weights(cliplens.ModelRef("offline"), ["cat", "dog"], templates)
    """
    if spec is None or spec == "default":
        spec = "default"
    if isinstance(spec, str):
        if spec == "photo":
            return ["a photo of a {}."]
        if spec == "none":
            return ["{}"]
        if spec in ("default", "imagenet"):
            bundled = resources.files("cliplens.tasks").joinpath("data", f"templates_{spec}.txt")
            with resources.as_file(bundled) as path:
                templates = read_lines(path, "templates", "one template per line", comments=True)
        else:
            path = Path(spec).expanduser()
            if not path.is_file():  # a name that is neither a set nor a file: say both
                raise InvalidInputError(
                    f"templates '{spec}': not a set ({', '.join(TEMPLATE_SETS)}) nor a file"
                )
            templates = read_lines(path, "templates", "one template per line", comments=True)
    else:
        templates = [str(t) for t in spec]
    bad = [t for t in templates if t.count("{}") != 1]
    if not templates or bad:
        raise InvalidInputError(
            f"templates: each must contain '{{}}' once where the label goes; bad: {bad[:3]}"
            if bad
            else "templates: the list is empty"
        )
    return templates


def parse_labels(text: str) -> list[str]:
    """'cat, dog' as labels: stripped, each once, in order."""
    return clean_labels(text.split(","))


def read_labels_file(path: str | os.PathLike) -> list[str]:
    """A file of one label per line (# starts a comment)."""
    return clean_labels(read_lines(path, "labels file", "one label per line", comments=True))


def labels_from_folder(path: str | os.PathLike) -> list[str]:
    """Subfolder names, the layout of ImageFolder-style datasets (DIR/cat/..., DIR/dog/...)."""
    p = Path(path)
    if not p.is_dir():
        raise InvalidInputError(f"labels folder {p} is not a folder of one subfolder per label")
    return clean_labels(
        sorted(d.name for d in p.iterdir() if d.is_dir() and not d.name.startswith("."))
    )


def clean_labels(labels: Sequence[str]) -> list[str]:
    """Labels stripped, without blanks, comments and repeats; at least one."""
    out: list[str] = []
    for raw in labels:
        label = raw.strip()
        if label and not label.startswith("#") and label not in out:
            out.append(label)
    if len(out) < 1:
        raise InvalidInputError("labels: none given; pass `labels` cat,dog or `labels_file` F")
    return out


def zero_shot_weights(
    model: Encoder, labels: Sequence[str], templates: Sequence[str]
) -> np.ndarray:
    """(C, D) classifier: mean of the normalised template embeddings of each label.

    Why: a zero-shot classifier is just these rows; image embeddings @ weights.T scores.

    >>> import cliplens
    >>> model = cliplens.ModelRef("offline")
    >>> weights = cliplens.zero_shot_weights(model, ["cat", "dog"], ["a photo of a {}."])
    """
    prompts = [t.format(label.replace("_", " ")) for label in labels for t in templates]
    emb = model.encode_texts(prompts).reshape(len(labels), len(templates), -1).mean(axis=1)
    return emb / np.linalg.norm(emb, axis=1, keepdims=True)


@dataclass
class Prediction:
    """The labels of one image, best first."""

    path: str
    labels: list[tuple[str, float]]  # sorted by score, highest first

    @property
    def top(self) -> str | None:
        return self.labels[0][0] if self.labels else None

    def to_dict(self) -> dict:
        return {"path": self.path, "labels": [{"label": lb, "score": s} for lb, s in self.labels]}


@dataclass
class ClassifyResult:
    """Predictions for the images that could be read, and why the others could not.

    >>> import cliplens
    >>> result = cliplens.classify(cliplens.ModelRef("offline"), ["cat.jpg"], ["cat", "dog"])
    >>> result.to_dict()["predictions"], result.failures
    """

    predictions: list[Prediction]
    failures: list[ImageError] = field(default_factory=list)
    multi_label: bool = False
    threshold: float | None = None  # the multi-label cut-off used

    def to_dict(self) -> dict:
        predictions = [p.to_dict() for p in self.predictions]
        return {
            "predictions": predictions,
            "multi_label": self.multi_label,
            "threshold": self.threshold,
        }


def scores(
    model: Encoder, image_emb: np.ndarray, weights: np.ndarray, multi_label: bool
) -> np.ndarray:
    """(N, C): softmax probabilities, or independent per-label scores in multi-label mode."""
    sims = image_emb @ weights.T
    info = model.info
    if multi_label:
        if info.logit_bias is not None:
            return 1.0 / (1.0 + np.exp(-(info.logit_scale * sims + info.logit_bias)))
        return sims
    logits = info.logit_scale * sims
    logits -= logits.max(axis=1, keepdims=True)
    p = np.exp(logits)
    return p / p.sum(axis=1, keepdims=True)


def default_threshold(model: Encoder) -> float:
    """The multi-label cut-off: 0.5 for sigmoid models, else the model's cosine threshold."""
    return 0.5 if model.info.logit_bias is not None else model.info.cosine_threshold


def classify(
    model: Encoder,
    images: Sequence[ImageSource],
    labels: Sequence[str],
    templates: str | Sequence[str] | None = "default",
    top_k: int | None = None,
    multi_label: bool = False,
    threshold: float | None = None,
    batch_size: int | None = None,
    progress: bool = False,
    max_megapixels: float | None = None,
) -> ClassifyResult:
    """Classify images among labels; unreadable images are skipped and reported.

    Why: labels the model was never trained on, from their names alone (zero-shot).

    >>> import cliplens
    >>> result = cliplens.classify(cliplens.ModelRef("offline"), ["cat.jpg"], ["cat", "dog"])
    >>> result.predictions[0].top  # 'cat'
    """
    labels = clean_labels(labels)
    if top_k is not None and top_k < 1:
        raise InvalidInputError(f"top-k {top_k} must be at least 1")
    if threshold is not None and not math.isfinite(threshold):
        raise InvalidInputError(
            f"multi-label threshold {threshold}: give a finite number (a cosine in [-1, 1], "
            "or a probability for sigmoid models)"
        )
    weights = zero_shot_weights(model, labels, load_templates(templates))
    enc = model.encode_images_lenient(images, batch_size, progress, max_megapixels)
    table = scores(model, enc.vectors, weights, multi_label)
    if multi_label and threshold is None:
        threshold = default_threshold(model)
    predictions = []
    for row, index in zip(table, enc.kept, strict=True):
        order = np.argsort(-row, kind="stable")
        ranked = [(labels[j], round(float(row[j]), 6)) for j in order]
        if multi_label:
            ranked = [(lb, s) for lb, s in ranked if s >= threshold]
        predictions.append(Prediction(describe(images[index]), ranked[:top_k]))
    return ClassifyResult(predictions, enc.failures, multi_label, threshold)
