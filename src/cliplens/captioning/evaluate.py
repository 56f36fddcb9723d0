"""Scoring a captioner: its captions of images with reference captions, by the COCO
caption metrics (`score_captions`), and the validation numbers training logs each epoch."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from cliplens.captioning.embedded import EmbeddedPairs, embed_pairs
from cliplens.captioning.metrics import CaptionScores, score_captions
from cliplens.captioning.model import Captioner, CaptionOptions
from cliplens.captioning.reference import ReferenceCaptioner
from cliplens.store.files import write_atomic
from cliplens.tasks.score import PREFIX, clip_score, prefixed, ref_clip_score
from cliplens.train.data import Pair

if TYPE_CHECKING:
    from cliplens.catalog.db import Catalog
    from cliplens.models.encoder import Encoder


@dataclass
class CaptionEvaluation:
    """A captioner's captions of images, their references, and the scores."""

    images: list[str]
    captions: list[str]
    references: list[list[str]]
    scores: CaptionScores

    def to_dict(self) -> dict[str, Any]:
        s = self.scores
        counted = {"images": len(self.images), "scores": s.scores}
        return counted | {"skipped": s.skipped, "tokenizer": s.tokenizer}

    def write_captions(self, path: str | os.PathLike) -> None:
        """One JSON line per image: {"image", "caption", "references"} (atomically)."""
        rows = zip(self.images, self.captions, self.references, strict=True)
        text = "".join(
            json.dumps({"image": image, "caption": c, "references": r}) + "\n"
            for image, c, r in rows
        )
        write_atomic(Path(path), lambda tmp: tmp.write_text(text, encoding="utf-8"))


def evaluate_captioner(
    captioner: Captioner | ReferenceCaptioner,
    model: Encoder,
    pairs: Sequence[Pair],
    options: CaptionOptions | None = None,
    limit: int | None = None,
    catalog: Catalog | None = None,
    progress: bool = False,
    warn: Callable[[str], None] = lambda m: None,
    prefix: str = PREFIX,
) -> CaptionEvaluation:
    """BLEU-1..4, ROUGE-L, CIDEr-D (and METEOR, SPICE with Java) of the captioner's captions
    of the images of `pairs` against all of each image's captions, and CLIPScore and
    RefCLIPScore (texts embedded as `prefix` + caption, the paper's "A photo depicts "; ""
    for none): why, to compare captioners and searches on held-out data. `model` is the
    captioner's encoder; `limit` keeps the first that many images (only those are embedded).

    >>> import cliplens
    >>> captioner = cliplens.load_captioner("run/captioner")
    >>> cliplens.evaluate_captioner(captioner, model, pairs).scores  # doctest: +SKIP
    """
    rows = list(pairs)
    if limit:  # the first `limit` images, with all their captions
        first = set(list(dict.fromkeys(p.image for p in rows))[:limit])
        rows = [p for p in rows if p.image in first]
    data = embed_pairs(model, rows, None, catalog, progress, warn)
    references = data.references()
    if isinstance(captioner, ReferenceCaptioner):  # it takes the raw CLIP embeddings
        raw, _, failures = captioner.embed_images(model, data.images)
        if failures:
            raise failures[0]
        captions = captioner.captions(raw, options)
    else:
        captions = captioner.captions(data.vectors, options, model)
    scores = score_captions(captions, references)
    clip, ref = clip_scores(model, data.vectors, captions, references, prefix)
    scores.scores.update({"CLIPScore": float(np.mean(clip)), "RefCLIPScore": float(np.mean(ref))})
    scores.per_caption.update({"CLIPScore": clip.tolist(), "RefCLIPScore": ref.tolist()})
    return CaptionEvaluation(data.images, captions, references, scores)


def clip_scores(
    model: Encoder,
    images: np.ndarray,
    captions: Sequence[str],
    references: Sequence[Sequence[str]],
    prefix: str = PREFIX,
) -> tuple[np.ndarray, np.ndarray]:
    """(CLIPScore, RefCLIPScore) of each caption as Hessel et al. (2021) compute them:
    candidates and references embedded as `prefix` + text by `model`, the encoder of the
    image embeddings `images`."""
    texts = model.encode_texts(prefixed(list(captions), prefix))
    flat = [r for refs in references for r in refs]
    vectors = model.encode_texts(prefixed(flat, prefix)) if flat else np.zeros((0, 1))
    bounds = np.cumsum([0, *(len(refs) for refs in references)])
    split = [vectors[lo:hi] for lo, hi in pairwise(bounds)]
    clip = clip_score(images, texts)
    if not flat or any(len(refs) == 0 for refs in references):
        return clip, np.full(len(clip), np.nan)
    return clip, ref_clip_score(images, texts, split)[1]


def validation_metrics(
    model: Captioner, data: EmbeddedPairs, images: int = 200, bf16: bool = False
) -> dict[str, float]:
    """Validation loss (teacher forced, all pairs) and metrics of greedy captions of the
    first `images` images against all their references."""
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
        watched = ("BLEU-4", "CIDEr-D")
        out |= {f"val_{m}": round(v, 4) for m, v in scores.scores.items() if m in watched}
    return out
