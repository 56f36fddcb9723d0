"""Image screening: corrupt files (exact, no model), CLIP-IQA quality scores, distortion type.

`screen` is the one way in: the CLI (`cliplens quality`) and the server (POST /v1/quality)
both call it.

- Integrity: every file is fully decoded; empty, truncated, undecodable, oversized (a
  decompression bomb) and misnamed files (a PNG called .jpg) are reported with a reason.
- CLIP-IQA (Wang et al., 2023): an attribute is a pair of antonym prompts, "Good photo." /
  "Bad photo."; its score is the softmax over the image's similarity to the pair, so 1.0
  leans fully to the first prompt. The prompts are the paper's.
- Distortion type: zero-shot over prompts naming the camera distortions of
  `cliplens.corruptions`, or a linear probe trained on a few examples per type
  (`train_probe`), which is what works for a model whose text side knows little of
  image quality (such as the offline model).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from PIL import Image

from cliplens.corruptions import DistortionKind
from cliplens.errors import ImageError, InvalidInputError
from cliplens.images import ImageSource, open_image
from cliplens.models.encoder import Encoder
from cliplens.tasks.embed import embed_files, embed_images
from cliplens.tasks.probe import LinearProbe, fit_probe

if TYPE_CHECKING:
    from cliplens.catalog.db import Catalog

Attribute = Literal["quality", "sharpness", "noisiness", "brightness", "colorfulness", "contrast"]
# name -> (positive prompt, negative prompt), from CLIP-IQA
ATTRIBUTES: dict[Attribute, tuple[str, str]] = {
    "quality": ("Good photo.", "Bad photo."),
    "sharpness": ("Sharp photo.", "Blurry photo."),
    "noisiness": ("Clean photo.", "Noisy photo."),
    "brightness": ("Bright photo.", "Dark photo."),
    "colorfulness": ("Colorful photo.", "Dull photo."),
    "contrast": ("High contrast photo.", "Low contrast photo."),
}
CLIP_IQA_SCALE = 100.0  # CLIP's logit scale, as CLIP-IQA uses it

# what zero-shot screening tells apart: the camera distortions of `cliplens.corruptions`
DistortionType = Literal["clean"] | DistortionKind
DISTORTIONS: dict[DistortionType, str] = {
    "clean": "a sharp, clean, well exposed photo",
    "blur": "a blurry photo",
    "noise": "a noisy, grainy photo",
    "overexposed": "an overexposed, washed out photo",
    "underexposed": "an underexposed, dark photo",
    "jpeg": "a photo with heavy JPEG compression artifacts",
    "low_resolution": "a pixelated, low resolution photo",
}
DistortionSource = Literal["zero-shot", "probe"]
Problem = Literal[
    "empty",
    "truncated",
    "not_an_image",
    "unsupported",
    "too_large",
    "missing",
    "unreadable",
    "wrong_extension",
]

# what each Pillow format is usually called
_EXTENSIONS = {
    "JPEG": {".jpg", ".jpeg", ".jpe", ".jfif"},
    "MPO": {".jpg", ".jpeg", ".mpo"},
    "PNG": {".png"},
    "GIF": {".gif"},
    "WEBP": {".webp"},
    "BMP": {".bmp", ".dib"},
    "TIFF": {".tif", ".tiff"},
    "HEIF": {".heic", ".heif", ".hif"},
    "AVIF": {".avif"},
    "PPM": {".ppm", ".pgm", ".pbm", ".pnm"},
    "ICO": {".ico"},
}


# ---------------------------------------------------------------------------- integrity


@dataclass
class Integrity:
    """What, if anything, is wrong with one file."""

    path: str
    ok: bool
    problem: Problem | None = None
    reason: str | None = None
    format: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return dict(vars(self))


_PROBLEMS: dict[str, Problem] = {
    "EmptyImageError": "empty",
    "TruncatedImageError": "truncated",
    "NotAnImageError": "not_an_image",
    "UnsupportedImageError": "unsupported",
    "ImageTooLargeError": "too_large",
    "ImageNotFoundError": "missing",
}


def problem_of(error: ImageError) -> Integrity:
    """An image error (from any reader) as an integrity finding."""
    problem = _PROBLEMS.get(type(error).__name__, "unreadable")
    return Integrity(error.path, False, problem, error.reason)


def check_file(
    path: str | os.PathLike, max_megapixels: float | None = None, decode: bool = True
) -> Integrity:
    """Say what, if anything, is wrong with a file. `decode` reads all of it (JPEGs at
    reduced scale, which still reads every byte); without it only the header is checked,
    for files already decoded elsewhere (by the encoder).

    Why: an empty, truncated, misnamed or oversized file is found without any model.

    >>> import cliplens
    >>> finding = cliplens.check_file("photo.jpg")  # doctest: +SKIP
    >>> finding.ok, finding.problem, finding.reason  # doctest: +SKIP
    """
    label = os.fsdecode(path)
    if decode:
        try:
            open_image(path, min_size=256, max_megapixels=max_megapixels)
        except ImageError as e:
            return problem_of(e)
    with Image.open(path) as img:
        fmt = img.format
    expected = _EXTENSIONS.get(fmt or "")
    suffix = Path(path).suffix.lower()
    if expected and suffix not in expected:
        reason = f"a {fmt} file named {suffix or 'without extension'}"
        return Integrity(label, False, "wrong_extension", reason, fmt)
    return Integrity(label, True, format=fmt)


# ---------------------------------------------------------------------------- scores


@dataclass
class QualityScores:
    """CLIP-IQA attribute scores and the likely distortion of one image."""

    path: str
    attributes: dict[Attribute, float]  # CLIP-IQA scores in [0, 1]
    distortion: str  # a DistortionType, or a class of the probe
    distortion_probability: float
    distortion_source: DistortionSource = "zero-shot"

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": self.path,
            **{k: round(v, 4) for k, v in self.attributes.items()},
            "distortion": self.distortion,
            "distortion_probability": round(self.distortion_probability, 4),
            "distortion_source": self.distortion_source,
        }


def _softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(axis=-1, keepdims=True)
    e = np.exp(x)
    return e / e.sum(axis=-1, keepdims=True)


@dataclass
class Screener:
    """The attribute prompt pairs and distortion prompts embedded once by one model."""

    model_id: str
    pairs: np.ndarray  # (A, 2, D)
    attribute_names: list[Attribute]
    distortion_vectors: np.ndarray  # (K, D)
    distortion_names: list[DistortionType]
    scale: float = CLIP_IQA_SCALE
    probe: DistortionProbe | None = None

    def attribute_scores(self, vectors: np.ndarray) -> np.ndarray:
        """(N, A): the softmax weight of each pair's positive prompt."""
        sims = np.einsum("nd,apd->nap", vectors, self.pairs)
        return _softmax(self.scale * sims)[..., 0]

    def distortion_probabilities(self, vectors: np.ndarray) -> np.ndarray:
        return _softmax(self.scale * vectors @ self.distortion_vectors.T)

    def score(
        self, paths: list[str], vectors: np.ndarray, features: np.ndarray | None = None
    ) -> list[QualityScores]:
        """Scores per image from its embedding (and its probe features, with a probe)."""
        attrs = self.attribute_scores(vectors)
        names: list[str]
        source: DistortionSource
        if self.probe is not None:
            if features is None:
                raise InvalidInputError("a screener with a probe needs the images' features")
            probs, names, source = self.probe.probabilities(features), self.probe.classes, "probe"
        else:
            probs, names = self.distortion_probabilities(vectors), list(self.distortion_names)
            source = "zero-shot"
        out = []
        for i, path in enumerate(paths):
            k = int(probs[i].argmax())
            attributes = dict(zip(self.attribute_names, map(float, attrs[i]), strict=True))
            out.append(QualityScores(path, attributes, names[k], float(probs[i, k]), source))
        return out


def build_screener(
    model: Encoder, probe: DistortionProbe | str | os.PathLike[str] | None = None
) -> Screener:
    """The prompts of screening embedded by `model`, with a distortion probe fit in its
    feature space if one is given (or the path of one `train_probe` saved).

    Why: embedded once, reused for every call of `screen` (the server keeps one).

    >>> import cliplens
    >>> model = cliplens.ModelRef("offline")
    >>> cliplens.screen(files, model, screener=cliplens.build_screener(model))
    """
    if isinstance(probe, (str, os.PathLike)):
        probe = DistortionProbe.load(probe)
    info = model.info
    names = list(ATTRIBUTES)
    texts = [t for n in names for t in ATTRIBUTES[n]]
    pairs = model.encode_texts(texts).reshape(len(names), 2, -1)
    dnames = list(DISTORTIONS)
    feature_id = model.feature_id if probe is not None else info.model_id
    if probe is not None and probe.model_id != feature_id:
        raise InvalidInputError(
            f"probe was trained on {probe.model_id}, not {feature_id}; train one for this "
            "model with 'cliplens quality train'"
        )
    return Screener(
        model_id=info.model_id,
        pairs=pairs,
        attribute_names=names,
        distortion_vectors=model.encode_texts([DISTORTIONS[d] for d in dnames]),
        distortion_names=dnames,
        probe=probe,
    )


# ---------------------------------------------------------------------------- screening


@dataclass
class Screening:
    """What screening found: files with problems, and the scores of the readable ones."""

    problems: list[Integrity] = field(default_factory=list)
    scores: list[QualityScores] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "problems": [p.to_dict() for p in self.problems],
            "scores": [s.to_dict() for s in self.scores],
        }


def screen(
    images: Sequence[ImageSource],
    model: Encoder | None,
    probe: DistortionProbe | str | os.PathLike[str] | None = None,
    *,
    screener: Screener | None = None,
    names: Sequence[str] | None = None,
    catalog: Catalog | None = None,
    sort: Attribute | None = None,
    worst: int | None = None,
    max_megapixels: float | None = None,
    progress: bool = False,
) -> Screening:
    """Integrity problems, CLIP-IQA scores and the likely distortion of each image.

    Why: one pass finds the files that are broken and ranks the rest by quality. Each
    file is decoded once, by the encoder: what it cannot read is the finding. Without a
    `model` only the files' integrity is checked (every file fully decoded). Files take
    unchanged embeddings from `catalog`; `screener` (from `build_screener`) is reused
    instead of building one with `probe`; `sort` orders the scores by an attribute, lowest
    first, and `worst` keeps that many.

    >>> import cliplens
    >>> found = cliplens.screen(["photos/a.jpg", "photos/b.png"], cliplens.ModelRef("offline"))
    >>> [s.to_dict() for s in found.scores]  # doctest: +SKIP
    """
    if sort is not None and sort not in ATTRIBUTES:
        raise InvalidInputError(f"`sort` {sort}: one of {', '.join(ATTRIBUTES)}")
    if worst is not None and worst < 1:
        raise InvalidInputError(f"`worst` {worst}: keep at least 1 image")
    files = all(isinstance(item, (str, os.PathLike)) for item in images)
    if model is None:
        if not files:
            raise InvalidInputError("screening without a `model` checks files; give their paths")
        found = [check_file(f, max_megapixels) for f in images]  # type: ignore[arg-type]
        return Screening(problems=[c for c in found if not c.ok])
    if not images:
        return Screening()
    screener = screener or build_screener(model, probe)
    encode = _encode_files if files else _encode_in_memory
    paths, vectors, features, problems = encode(
        images, model, screener, names, catalog, max_megapixels, progress
    )
    scores = screener.score(paths, vectors, features)
    if sort is not None:
        by: Attribute = sort
        scores.sort(key=lambda s: s.attributes[by])
    return Screening(problems, scores[:worst] if worst is not None else scores)


_Encoded = tuple[list[str], np.ndarray, np.ndarray | None, list[Integrity]]


def _encode_files(
    files: Sequence[Any],
    model: Encoder,
    screener: Screener,
    names: Sequence[str] | None,
    catalog: Catalog | None,
    max_megapixels: float | None,
    progress: bool,
) -> _Encoded:
    """Embeddings (and probe features) of files, named by their resolved paths, and the
    problems of those that could not be read or are misnamed."""
    options = {"max_megapixels": max_megapixels, "progress": progress}
    done = embed_files(model, files, catalog, **options)
    problems = [problem_of(e) for e in done.failures]
    problems += [c for p in done.paths if not (c := check_file(p, decode=False)).ok]
    features = None
    if screener.probe is not None:
        features = embed_files(model, done.paths, catalog, features=True, **options).vectors
    return done.paths, done.vectors, features, problems


def _encode_in_memory(
    images: Sequence[ImageSource],
    model: Encoder,
    screener: Screener,
    names: Sequence[str] | None,
    catalog: Catalog | None,
    max_megapixels: float | None,
    progress: bool,
) -> _Encoded:
    """Embeddings (and probe features) of images already open, named by `names`."""
    done = embed_images(model, images, names, None, progress, max_megapixels)
    features = None
    if screener.probe is not None:
        kept = [images[i] for i in done.positions]
        features = model.encode_features(kept, None, progress, max_megapixels).vectors
    problems = [problem_of(e) for e in done.failures]
    return done.paths, done.vectors, features, problems


# ---------------------------------------------------------------------------- probe

# a multinomial logistic regression on features, one class per distortion type
DistortionProbe = LinearProbe


def train_probe(
    vectors: np.ndarray, labels: Sequence[str], model_id: str, folds: int = 5, seed: int = 0
) -> DistortionProbe:
    """Fit the probe; its accuracy is cross-validated (stratified folds) before the final fit.
    C is fixed at 10: standardised probe features on held-out photos scored 0.30 -> 0.43
    against the default (offline model), and distortion sets are too small to choose it.

    Why: a model whose text side knows little of image quality (such as the offline one)
    still tells distortions apart from a few examples of each (`write_distortions`).

    >>> import cliplens
    >>> model = cliplens.ModelRef("offline")
    >>> probe = cliplens.train_probe(features, folder_names, model.feature_id)  # doctest: +SKIP
    """
    if len(set(labels)) < 2:
        raise InvalidInputError("a probe needs at least two distortion types (subfolders)")
    return fit_probe(vectors, labels, model_id, grid=(10.0,), folds=folds, seed=seed)
