"""CLIP as a judge: CLIPScore, RefCLIPScore (Hessel et al. 2021) and best-of-N reranking.

CLIPScore(c, v) = w * max(cos(c, v), 0) with w = 2.5, for a caption or prompt c and an
image v. RefCLIPScore(c, R, v) is the harmonic mean of CLIPScore(c, v) and
max(max over references r of cos(c, r), 0): it rewards a caption that fits the image and
agrees with what people wrote. As in the reference implementation (jmhessel/clipscore),
every candidate and every reference is embedded as "A photo depicts " + text (`prefix`; ""
embeds the raw text). Reranking orders candidate images by cos(prompt, image) on the prompt
as given, as DALL-E did with its 512 samples. Everything works on L2-normalised
embeddings, so any Encoder and any catalog serve.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from cliplens.errors import ImageError, InvalidInputError
from cliplens.images import ImageSource, describe, open_image
from cliplens.models.encoder import Encoder
from cliplens.progress import progress_bar
from cliplens.store.files import write_atomic
from cliplens.tasks.embed import embed_images
from cliplens.textfile import read_lines

if TYPE_CHECKING:
    from cliplens.catalog.db import Catalog

W = 2.5  # the paper's rescaling, which spreads scores over roughly [0, 1] for ViT-B/32
# what the reference implementation (jmhessel/clipscore) puts before every candidate and
# every reference caption before embedding it; "" embeds the raw text
PREFIX = "A photo depicts "


def prefixed(texts: Sequence[str], prefix: str = PREFIX) -> list[str]:
    """The texts as CLIPScore embeds them: `prefix` + text (the reference's "A photo
    depicts " by default; "" or blanks leave them as they are). As in the reference, a
    prefix that does not end in a space gets one.

    Why: `clip_score` on embeddings one has already computed gives the paper's number only
    when the texts were embedded as the paper's code embeds them.

    >>> import cliplens
    >>> cliplens.prefixed(["a cat"])
    ['A photo depicts a cat']
    """
    if not prefix.strip():
        return list(texts)
    if not prefix.endswith(" "):
        prefix += " "
    return [prefix + t for t in texts]


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
    """w * max(cos, 0) row by row; one text (D,) is compared with every image.

    Why: how well images show a text, on the scale of Hessel et al. (2021).

    >>> import cliplens
    >>> model = cliplens.ModelRef("offline")
    >>> cliplens.clip_score(model.encode_images(["a.jpg"]), model.encode_texts(["a cat"]))
    """
    return w * np.maximum(cosine(images, texts), 0.0)


def ref_clip_score(
    images: np.ndarray, texts: np.ndarray, references: Sequence[np.ndarray], w: float = W
) -> tuple[np.ndarray, np.ndarray]:
    """(reference scores, RefCLIPScores): for candidate i, max(max_r cos(c_i, r), 0) over
    its references (R_i, D), and the harmonic mean of that with CLIPScore(c_i, v_i).

    Why: a caption should fit the image and agree with what people wrote of it.

    >>> import cliplens
    >>> refs = [model.encode_texts(["a cat on a mat", "a sleeping cat"])]
    >>> cliplens.ref_clip_score(image_vectors, model.encode_texts(["a cat"]), refs)
    """
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


def rerank(images: np.ndarray, prompt: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(order, cosines): indices of the images, best fit to the prompt first. Ties keep
    input order.

    Why: best-of-N, as DALL-E kept the samples CLIP judged closest to the prompt.

    >>> import cliplens
    >>> order, cosines = cliplens.rerank(model.encode_images(files), model.encode_texts(["a cat"]))
    >>> [files[i] for i in order[:3]]
    """
    cos = _unit(_rows(images, "images")) @ _unit(_rows(prompt, "prompt"))[0]
    order = np.argsort(-cos, kind="stable")
    return order, cos


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


# ---------------------------------------------------------------------------- images


@dataclass(frozen=True)
class Caption:
    """An image and the caption it is scored against, with optional references."""

    image: Path
    caption: str
    references: tuple[str, ...] = ()


def read_captions(path: str | os.PathLike) -> list[Caption]:
    """{"image", "caption", "references"?} per line (what `caption eval` writes); relative
    image paths are under the file's folder."""
    path = Path(path)
    expected = 'JSON lines of {"image": ..., "caption": ...}'
    lines = read_lines(path, "`captions`", expected, comments=True, required=True)
    rows = []
    for n, line in enumerate(lines, 1):
        try:
            row = json.loads(line)
            image, caption = str(row["image"]), str(row["caption"])
        except (ValueError, KeyError, TypeError, RecursionError) as e:
            raise InvalidInputError(
                f'`captions` {path} line {n}: need {{"image": ..., "caption": ...}} ({e})'
            ) from None
        refs = row.get("references") or []
        if not isinstance(refs, list) or not all(isinstance(r, str) for r in refs):
            raise InvalidInputError(
                f"`captions` {path} line {n}: references must be a list of texts"
            )
        image_path = Path(image) if Path(image).is_absolute() else path.parent / image
        rows.append(Caption(image_path, caption, tuple(refs)))
    return rows


@dataclass(frozen=True)
class ImageScore:
    """How well one image fits its text: cosine, CLIPScore, RefCLIPScore with references."""

    path: str
    cosine: float
    clip_score: float
    ref_score: float | None = None  # max(max_r cos(c, r), 0), with references
    ref_clip_score: float | None = None
    caption: str | None = None  # the image's own caption, when each has one

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"path": self.path, "cosine": round(self.cosine, 4)}
        out["clip_score"] = round(self.clip_score, 4)
        if self.caption is not None:
            out["caption"] = self.caption
        if self.ref_score is not None and self.ref_clip_score is not None:
            out["ref_score"] = round(self.ref_score, 4)
            out["ref_clip_score"] = round(self.ref_clip_score, 4)
        return out


@dataclass
class ScoreReport:
    """The scores of the images that could be read, their means, and what was left out."""

    scores: list[ImageScore]
    model_id: str
    failures: list[ImageError] = field(default_factory=list)
    references_left_out: bool = False  # some images had none: no RefCLIPScore

    @property
    def mean(self) -> dict[str, float]:
        out = {"clip_score": float(np.mean([s.clip_score for s in self.scores]))}
        refs = [s.ref_clip_score for s in self.scores if s.ref_clip_score is not None]
        if refs:
            out["ref_clip_score"] = float(np.mean(refs))
        return out

    @property
    def best(self) -> str:
        """The image that fits its text best (the highest cosine; the first of ties)."""
        return max(self.scores, key=lambda s: s.cosine).path

    def to_dict(self) -> dict[str, Any]:
        mean = {k: round(v, 4) for k, v in self.mean.items()}
        images = [s.to_dict() for s in self.scores]
        return {"images": images, "mean": mean, "model": self.model_id}


def score_images(
    images: Sequence[ImageSource],
    model: Encoder,
    prompt: str | None = None,
    references: Sequence[str] | None = None,
    captions: Sequence[Caption] | None = None,
    *,
    names: Sequence[str] | None = None,
    catalog: Catalog | None = None,
    max_megapixels: float | None = None,
    progress: bool = False,
    prefix: str = PREFIX,
) -> ScoreReport:
    """CLIPScore of each image for `prompt` (RefCLIPScore too with shared `references`), or
    for its own caption in `captions` (with that caption's references). Every text is
    embedded as `prefix` + text, as the paper's code does ("" for the raw text).

    Why: CLIP as a judge of generated images and captions, without human ratings.

    >>> import cliplens
    >>> report = cliplens.score_images(["a.png", "b.png"], cliplens.ModelRef("offline"), "a cat")
    >>> report.to_dict()["mean"]
    """
    if (prompt is None) == (captions is None):
        raise InvalidInputError("give a `prompt` or `captions`, not both")
    if prompt is not None and not prompt.strip():
        raise InvalidInputError("`prompt` is empty")
    paths, vectors, failures = _embed(images, model, names, catalog, max_megapixels, progress)
    if not paths:
        return ScoreReport([], model.info.model_id, failures)
    if captions is not None:
        by_path = {str(Path(c.image).resolve()): c for c in captions}
        kept = [by_path[p] for p in paths]
        texts = model.encode_texts(prefixed([c.caption for c in kept], prefix))
        ref_sets: list[Sequence[str]] | None = [c.references for c in kept]
    else:
        kept = None
        texts = model.encode_texts(prefixed([prompt or ""], prefix))
        ref_sets = [references] * len(paths) if references else None
    signed = cosine(vectors, texts)
    clip = W * np.maximum(signed, 0.0)  # clip_score, from the cosines already at hand
    ref_scores = harmonic = None
    if ref_sets is not None and all(ref_sets):
        unique = sorted({t for s in ref_sets for t in s})
        emb = dict(zip(unique, model.encode_texts(prefixed(unique, prefix)), strict=True))
        per_image = [np.stack([emb[t] for t in s]) for s in ref_sets]
        ref_scores, harmonic = ref_clip_score(vectors, texts, per_image)
    scores = [
        ImageScore(
            path,
            float(signed[i]),
            float(clip[i]),
            None if ref_scores is None else float(ref_scores[i]),
            None if harmonic is None else float(harmonic[i]),
            None if kept is None else kept[i].caption,
        )
        for i, path in enumerate(paths)
    ]
    left_out = ref_sets is not None and harmonic is None
    return ScoreReport(scores, model.info.model_id, failures, left_out)


def _embed(
    images: Sequence[ImageSource],
    model: Encoder,
    names: Sequence[str] | None,
    catalog: Catalog | None,
    max_megapixels: float | None,
    progress: bool,
) -> tuple[list[str], np.ndarray, list[ImageError]]:
    """(names, embeddings, failures): files by their resolved paths, embeddings of unchanged
    ones from `catalog`; images already open by `names`.

    Without a catalog every image is decoded whole, as the reference code reads it: the
    reduced-scale JPEG decode the other tasks use moves a cosine by up to 6e-4 (measured on
    random ViT-B-32 weights), more than the 1e-4 a metric should keep."""
    if catalog is not None:
        done = embed_images(model, images, names, catalog, progress, max_megapixels)
        return done.paths, done.vectors, done.failures
    prep = model.info.preprocessing
    labels: list[str] = []
    resized: list[Image.Image] = []
    failures: list[ImageError] = []
    with progress_bar(len(images), "decoding", progress) as advance:
        for i, item in enumerate(images):
            is_file = isinstance(item, (str, os.PathLike))
            label = names[i] if names is not None and not is_file else None
            try:
                image = open_image(item, max_megapixels=max_megapixels, label=label)
            except ImageError as e:
                failures.append(e)
            else:
                resized.append(prep.resize(image))
                labels.append(str(Path(item).resolve()) if is_file else label or describe(item))
            advance(1)
    done = embed_images(model, resized, labels, None, progress, max_megapixels)
    return done.paths, done.vectors, failures + done.failures


@dataclass(frozen=True)
class RankedImage:
    rank: int  # 1 is the best fit
    path: str
    cosine: float
    clip_score: float

    def to_dict(self) -> dict[str, Any]:
        return {
            "rank": self.rank,
            "path": self.path,
            "cosine": self.cosine,
            "clip_score": self.clip_score,
        }


@dataclass
class Reranking:
    """Images that could be read, best fit to the prompt first."""

    ranked: list[RankedImage]
    failures: list[ImageError] = field(default_factory=list)


def rerank_images(
    images: Sequence[ImageSource],
    model: Encoder,
    prompt: str,
    top: int | None = None,
    *,
    names: Sequence[str] | None = None,
    catalog: Catalog | None = None,
    max_megapixels: float | None = None,
    progress: bool = False,
    prefix: str = PREFIX,
) -> Reranking:
    """The `top` images (all by default) that fit `prompt` best, with cosine and CLIPScore.
    The order and the cosine are for the prompt as given (as DALL-E reranked); the
    CLIPScore is the paper's, for `prefix` + prompt ("" for the same text).

    Why: best-of-N over files or images already open, as `cliplens rerank` does.

    >>> import cliplens
    >>> best = cliplens.rerank_images(["a.png", "b.png"], cliplens.ModelRef("offline"), "a cat", 1)
    >>> best.ranked[0].path
    """
    if not prompt.strip():
        raise InvalidInputError("the prompt is empty")
    paths, vectors, failures = _embed(images, model, names, catalog, max_megapixels, progress)
    if not paths:
        return Reranking([], failures)
    both = [prompt, *prefixed([prompt], prefix)] if prefix.strip() else [prompt]
    texts = model.encode_texts(both)
    order, cos = rerank(vectors, texts[:1])
    scores = W * np.maximum(cosine(vectors, texts[-1]) if len(both) > 1 else cos, 0.0)
    ranked = [
        RankedImage(r + 1, paths[i], round(float(cos[i]), 4), round(float(scores[i]), 4))
        for r, i in enumerate(order[:top] if top else order)
    ]
    return Reranking(ranked, failures)


def copy_ranked(ranked: Sequence[RankedImage], folder: str | os.PathLike) -> list[Path]:
    """Copy ranked images into `folder` as 01-NAME, 02-NAME... (each copy whole or not at
    all); returns the copies."""
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    width = len(str(len(ranked)))
    copies = []
    for r in ranked:
        copies.append(out / f"{r.rank:0{width}d}-{Path(r.path).name}")
        write_atomic(copies[-1], lambda tmp, src=r.path: shutil.copy2(src, tmp))
    return copies
