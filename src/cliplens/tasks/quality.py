"""Image screening: corrupt files (exact, no model), CLIP-IQA quality scores, distortion type.

`screen` is the one way in: the CLI (`cliplens quality`) and the server (POST /v1/quality)
both call it.

- Integrity: every file is fully decoded; empty, truncated, undecodable, oversized (a
  decompression bomb) and misnamed files (a PNG called .jpg) are reported with a reason.
- CLIP-IQA (Wang et al., 2023): an attribute is a pair of antonym prompts, "Good photo." /
  "Bad photo."; its score is the softmax over the image's similarity to the pair, so 1.0
  leans fully to the first prompt. `attributes` are the paper's prompts; `clipiqa` is
  pyiqa's ensemble (the mean over five pairs). Two ways to see the image (`IqaMode`):
  `faithful`, the paper's, for OpenAI-layout ResNets (the whole image, longest side at
  most `MAX_SIDE`, the attention pool without its positional embedding, the model's own
  logit scale: `tasks.clip_iqa`); `crop`, for every other model (a ViT's position
  embeddings fix its input grid): the embedding of the model's centre crop, as the catalog
  holds it, at CLIP's trained scale of 100.
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
from cliplens.images import ImageSource, describe, open_image
from cliplens.models.encoder import Encoder
from cliplens.tasks.embed import Embedded, embed_files, embed_images
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
# what a prompt set scores: attribute -> antonym pairs, whose scores are averaged
PromptSet = Literal["attributes", "clipiqa"]
PROMPT_SETS: dict[PromptSet, dict[Attribute, tuple[tuple[str, str], ...]]] = {
    "attributes": {name: (pair,) for name, pair in ATTRIBUTES.items()},
    # pyiqa's `clipiqa` (clipiqa_arch.py): the mean of five pairs, as one quality score
    "clipiqa": {
        "quality": (
            ("Good image", "bad image"),
            ("Sharp image", "blurry image"),
            ("sharp edges", "blurry edges"),
            ("High resolution image", "low resolution image"),
            ("Noise-free image", "noisy image"),
        )
    },
}
# faithful: the whole image through a ResNet without the attention pool's positional
# embedding (CLIP-IQA as published); crop: the model's own centre-crop embedding
IqaMode = Literal["faithful", "crop"]
IQA_MODES: tuple[IqaMode, ...] = ("faithful", "crop")
# faithful mode's bound on the longest side: KonIQ-10k's 1024x768 photos (the paper's
# benchmark) pass untouched; a 12 MP photo is brought down 4x, not 13x as to a 224 crop
MAX_SIDE = 1024
CLIP_IQA_SCALE = 100.0  # CLIP's trained logit scale: crop mode and zero-shot distortions

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
    """The attribute prompt pairs and distortion prompts embedded once by one model, and
    how it sees an image for CLIP-IQA (`iqa`)."""

    model_id: str
    pairs: np.ndarray  # (P, 2, D): every antonym pair of the prompt set
    attribute_names: list[Attribute]
    distortion_vectors: np.ndarray  # (K, D)
    distortion_names: list[DistortionType]
    scale: float = CLIP_IQA_SCALE  # the attributes' logit scale
    probe: DistortionProbe | None = None
    pair_attributes: np.ndarray | None = None  # (P,): the attribute each pair scores
    iqa: IqaMode = "crop"
    prompts: PromptSet = "attributes"
    max_side: int = MAX_SIDE  # faithful mode: the longest side an image is scored at

    def attribute_scores(self, vectors: np.ndarray) -> np.ndarray:
        """(N, A): the softmax weight of each pair's positive prompt, averaged over the
        attribute's pairs."""
        sims = np.einsum("nd,pkd->npk", vectors, self.pairs)
        positive = _softmax(self.scale * sims)[..., 0]
        owner = self.pair_attributes
        if owner is None:
            return positive
        return np.stack(
            [positive[:, owner == a].mean(axis=1) for a in range(len(self.attribute_names))],
            axis=1,
        )

    def distortion_probabilities(self, vectors: np.ndarray) -> np.ndarray:
        return _softmax(CLIP_IQA_SCALE * vectors @ self.distortion_vectors.T)

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


def iqa_mode(model: Encoder, iqa: str | None = None) -> IqaMode:
    """How `model` sees an image for CLIP-IQA: `iqa` if it can, else the default
    (faithful for an OpenAI-layout ResNet, crop for any other model).

    Why: the published method needs a network that takes any image size; a model's name
    rules most out without loading it.

    >>> import cliplens
    >>> cliplens.iqa_mode(cliplens.ModelRef("offline"))
    'crop'
    """
    if iqa is not None and iqa not in IQA_MODES:
        raise InvalidInputError(f"`iqa` {iqa}: one of {', '.join(IQA_MODES)}")
    if iqa == "crop":
        return "crop"
    unloaded = not getattr(model, "loaded", True)  # a ModelRef not built yet
    if iqa is None and unloaded and "RN" not in str(getattr(model.info, "arch", "")):
        return "crop"  # ViTs, SigLIP, ConvNeXt, the offline model: told without a load
    from cliplens.tasks.clip_iqa import whole_image_tower  # torch: only for a ResNet

    if whole_image_tower(model) is not None:
        return "faithful"
    if iqa == "faithful":
        raise InvalidInputError(
            "`iqa` faithful needs an OpenAI-layout ResNet (RN50, RN101, RN50x4...), which "
            f"takes images of any size; {model.info.name} is not one: use `iqa` crop"
        )
    return "crop"


def build_screener(
    model: Encoder,
    probe: DistortionProbe | str | os.PathLike[str] | None = None,
    *,
    iqa: IqaMode | None = None,
    prompts: PromptSet = "attributes",
) -> Screener:
    """The prompts of screening embedded by `model`, with a distortion probe fit in its
    feature space if one is given (or the path of one `train_probe` saved). `iqa` is how
    images are seen (`iqa_mode`: faithful or crop; default by model), `prompts` the
    attribute prompts (`PROMPT_SETS`: the paper's `attributes`, or pyiqa's `clipiqa`).

    Why: embedded once, reused for every call of `screen` (the server keeps one).

    >>> import cliplens
    >>> model = cliplens.ModelRef("offline")
    >>> cliplens.screen(files, model, screener=cliplens.build_screener(model))
    """
    if prompts not in PROMPT_SETS:
        raise InvalidInputError(f"`prompts` {prompts}: one of {', '.join(PROMPT_SETS)}")
    if isinstance(probe, (str, os.PathLike)):
        probe = DistortionProbe.load(probe)
    mode = iqa_mode(model, iqa)
    info = model.info
    chosen = PROMPT_SETS[prompts]
    names = list(chosen)
    owners = [i for i, n in enumerate(names) for _ in chosen[n]]
    texts = [t for n in names for pair in chosen[n] for t in pair]
    pairs = model.encode_texts(texts).reshape(len(owners), 2, -1)
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
        scale=float(info.logit_scale) if mode == "faithful" else CLIP_IQA_SCALE,
        probe=probe,
        pair_attributes=np.asarray(owners),
        iqa=mode,
        prompts=prompts,
    )


# ---------------------------------------------------------------------------- screening


@dataclass
class Screening:
    """What screening found: files with problems, and the scores of the readable ones
    (seen as `iqa` says, scored with the `prompts` set)."""

    problems: list[Integrity] = field(default_factory=list)
    scores: list[QualityScores] = field(default_factory=list)
    iqa: IqaMode | None = None
    prompts: PromptSet | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "problems": [p.to_dict() for p in self.problems],
            "scores": [s.to_dict() for s in self.scores],
            "iqa": self.iqa,
            "prompts": self.prompts,
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
    iqa: IqaMode | None = None,
    prompts: PromptSet = "attributes",
) -> Screening:
    """Integrity problems, CLIP-IQA scores and the likely distortion of each image.

    Why: one pass finds the files that are broken and ranks the rest by quality. Each
    file is decoded once, by the encoder: what it cannot read is the finding. Without a
    `model` only the files' integrity is checked (every file fully decoded). Files take
    unchanged embeddings from `catalog` (crop mode: the catalog holds crops); `screener`
    (from `build_screener`) is reused instead of building one with `probe`, `iqa` and
    `prompts` (see there); `sort` orders the scores by an attribute, lowest first, and
    `worst` keeps that many.

    >>> import cliplens
    >>> found = cliplens.screen(["photos/a.jpg", "photos/b.png"], cliplens.ModelRef("offline"))
    >>> [s.to_dict() for s in found.scores]  # doctest: +SKIP
    """
    if screener is None and prompts not in PROMPT_SETS:
        raise InvalidInputError(f"`prompts` {prompts}: one of {', '.join(PROMPT_SETS)}")
    known = screener.attribute_names if screener is not None else list(PROMPT_SETS[prompts])
    if sort is not None and sort not in known:
        raise InvalidInputError(f"`sort` {sort}: one of {', '.join(known)}")
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
    screener = screener or build_screener(model, probe, iqa=iqa, prompts=prompts)
    done = _embed(images, model, screener, names, catalog, max_megapixels, progress)
    problems = [problem_of(e) for e in done.failures]
    if files:  # misnamed files decode; their headers say what they are
        problems += [c for p in done.paths if not (c := check_file(p, decode=False)).ok]
    features = None
    if screener.probe is not None:
        features = _features(images, done, model, catalog, files, max_megapixels, progress)
    scores = screener.score(done.paths, done.vectors, features)
    if sort is not None:
        by: Attribute = sort
        scores.sort(key=lambda s: s.attributes[by])
    kept = scores[:worst] if worst is not None else scores
    return Screening(problems, kept, screener.iqa, screener.prompts)


def _embed(
    images: Sequence[ImageSource],
    model: Encoder,
    screener: Screener,
    names: Sequence[str] | None,
    catalog: Catalog | None,
    max_megapixels: float | None,
    progress: bool,
) -> Embedded:
    """The images' vectors as the screener sees them; files are named by their resolved
    paths, images already open by `names`."""
    if screener.iqa == "crop":
        return embed_images(model, images, names, catalog, progress, max_megapixels)
    from cliplens.tasks.clip_iqa import encode_whole  # torch: only to encode

    if all(isinstance(item, (str, os.PathLike)) for item in images):
        labels = [str(Path(os.fsdecode(item)).resolve()) for item in images]  # type: ignore[arg-type]
        images = labels
    elif names is not None:
        if len(names) != len(images):
            raise InvalidInputError(f"{len(images)} images but {len(names)} `names`")
        labels = list(names)
    else:
        labels = [describe(item) for item in images]
    enc = encode_whole(model, images, screener.max_side, progress, max_megapixels)
    kept = [labels[i] for i in enc.kept]
    return Embedded(kept, enc.vectors, enc.failures, positions=list(enc.kept))


def _features(
    images: Sequence[ImageSource],
    done: Embedded,
    model: Encoder,
    catalog: Catalog | None,
    files: bool,
    max_megapixels: float | None,
    progress: bool,
) -> np.ndarray:
    """The probe features of the images that were embedded."""
    options = {"max_megapixels": max_megapixels, "progress": progress}
    if files:
        return embed_files(model, done.paths, catalog, features=True, **options).vectors
    kept = [images[i] for i in done.positions]
    return model.encode_features(kept, None, progress, max_megapixels).vectors


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
