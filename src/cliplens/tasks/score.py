"""CLIP as a judge: CLIPScore, RefCLIPScore (Hessel et al. 2021) and best-of-N reranking.

CLIPScore(c, v) = w * max(cos(c, v), 0) with w = 2.5, for a caption or prompt c and an
image v. RefCLIPScore(c, R, v) is the harmonic mean of CLIPScore(c, v) and
max(max over references r of cos(c, r), 0): it rewards a caption that fits the image and
agrees with what people wrote. Reranking orders candidate images by cos(prompt, image), as
DALL-E did with its 512 samples. Everything works on L2-normalised embeddings, so any
Encoder and any catalog serve.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from cliplens.errors import InvalidInputError

W = 2.5  # the paper's rescaling, which spreads scores over roughly [0, 1] for ViT-B/32


@dataclass(frozen=True)
class ImageScore:
    path: str
    cosine: float
    clip_score: float
    ref_score: float | None = None  # max(max_r cos(c, r), 0), with references
    ref_clip_score: float | None = None


def _rows(x: np.ndarray, what: str) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    if x.ndim == 1:
        x = x[None]
    if x.ndim != 2:
        raise InvalidInputError(f"{what}: expected (N, D) embeddings, got shape {x.shape}")
    return x


def _paired(images: np.ndarray, texts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(images, texts) as rows of equal count: one text (D,) stands for every image."""
    img, txt = _rows(images, "images"), _rows(texts, "texts")
    if txt.shape[0] == 1:
        txt = np.broadcast_to(txt, img.shape)
    if img.shape != txt.shape:
        raise InvalidInputError(f"{img.shape[0]} images but {txt.shape[0]} texts to pair them")
    return img, txt


def cosine(images: np.ndarray, texts: np.ndarray) -> np.ndarray:
    """cos(image_i, text_i) row by row (one text: against every image)."""
    img, txt = _paired(images, texts)
    return np.sum(_unit(img) * _unit(txt), axis=1)


def clip_score(images: np.ndarray, texts: np.ndarray, w: float = W) -> np.ndarray:
    """w * max(cos, 0) row by row; one text (D,) is compared with every image."""
    return w * np.maximum(cosine(images, texts), 0.0)


def ref_clip_score(
    images: np.ndarray, texts: np.ndarray, references: Sequence[np.ndarray], w: float = W
) -> tuple[np.ndarray, np.ndarray]:
    """(reference scores, RefCLIPScores): for candidate i, max(max_r cos(c_i, r), 0) over
    its references (R_i, D), and the harmonic mean of that with CLIPScore(c_i, v_i)."""
    img, txt = _paired(images, texts)
    if len(references) != img.shape[0]:
        raise InvalidInputError(f"{img.shape[0]} images but {len(references)} reference sets")
    clip = clip_score(img, txt, w)
    ref = np.zeros(len(clip), dtype=np.float64)
    for i, r in enumerate(references):
        r = _rows(r, "references")
        if r.shape[0] == 0:
            raise InvalidInputError(f"image {i} has no reference captions")
        ref[i] = max(float(np.max(_unit(r) @ _unit(txt[i : i + 1])[0])), 0.0)
    both = clip + ref
    harmonic = np.divide(2 * clip * ref, both, out=np.zeros_like(both), where=both > 0)
    return ref, harmonic


def rank(images: np.ndarray, prompt: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(order, cosines): indices of the images, best fit to the prompt first. Ties keep
    input order."""
    cos = _unit(_rows(images, "images")) @ _unit(_rows(prompt, "prompt"))[0]
    order = np.argsort(-cos, kind="stable")
    return order, cos


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
