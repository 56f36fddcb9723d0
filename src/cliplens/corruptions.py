"""Damaged copies of images, in two families with five levels each.

- Distortions (`distort`, `DistortionKind`): what goes wrong with camera photos (blur,
  sensor noise, JPEG artefacts, under- and over-exposure, low resolution) in absolute
  pixels, levels 1-5. Screening's distortion types (`tasks.quality`) name these, and its
  few-shot training data (`datasets.distorted`) is made with them.
- Corruptions (`corrupt`, `CorruptionKind`): ImageNet-C-like damage at severities 1-5
  (Hendrycks & Dietterich, 2019) that scales with the image side, so a 28 px product photo
  and a 64 px shapes image are damaged alike; severity 5 is heavy (it is what the robust
  student of `train.robust` is measured at). Every corruption takes a random generator,
  so training draws fresh noise and occluders each time while evaluation, seeded per
  image, is repeatable.

Why two: a photo's faults are absolute (a 3 px blur looks the same on any camera photo),
while a robustness benchmark must hurt small and large images equally; the families
differ on purpose, and so do their tables.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import Literal, get_args

import numpy as np
from PIL import Image, ImageEnhance, ImageFilter

from cliplens.errors import InvalidInputError
from cliplens.limits import DISTORTION_LEVELS, SEVERITIES

# ------------------------------------------------------------------ distortions (camera)

DistortionKind = Literal["blur", "noise", "jpeg", "underexposed", "overexposed", "low_resolution"]
DISTORTION_KINDS: tuple[DistortionKind, ...] = get_args(DistortionKind)
# one entry per level (DISTORTION_LEVELS: 1..5)
_CAMERA_BLUR = (1, 2, 3.5, 5, 8)  # Gaussian radius, pixels
_CAMERA_NOISE = (8, 16, 28, 42, 60)  # std, 0-255 scale
_CAMERA_JPEG = (40, 20, 10, 5, 2)  # quality
_DARKER = (0.7, 0.5, 0.35, 0.22, 0.12)  # brightness factor
_BRIGHTER = (1.4, 1.8, 2.3, 2.9, 3.6)
_DOWNSCALE = (2, 4, 6, 8, 12)  # side divided by this, then scaled back up


def distort(image: Image.Image, kind: DistortionKind, level: int) -> Image.Image:
    """`image` (RGB) with a camera-like distortion at level 1..5.

    Why: screening learns distortion types from examples of these (`datasets.distorted`).

    >>> import cliplens
    >>> photo = cliplens.open_image("photo.jpg")  # doctest: +SKIP
    >>> cliplens.distort(photo, "blur", 3).save("blurry.png")  # doctest: +SKIP
    """
    if level not in DISTORTION_LEVELS:
        low, high = DISTORTION_LEVELS[0], DISTORTION_LEVELS[-1]
        raise InvalidInputError(f"distortion level {level} must be {low}..{high}")
    i = level - 1
    if kind == "blur":
        return image.filter(ImageFilter.GaussianBlur(radius=_CAMERA_BLUR[i]))
    if kind == "noise":
        rng = np.random.default_rng(level)
        x = np.asarray(image, np.float32)
        x = x + rng.normal(0, _CAMERA_NOISE[i], x.shape)
        return Image.fromarray(np.clip(x, 0, 255).astype(np.uint8))
    if kind == "jpeg":
        return _jpeg(image, _CAMERA_JPEG[i])
    if kind == "underexposed":
        return ImageEnhance.Brightness(image).enhance(_DARKER[i])
    if kind == "overexposed":
        return ImageEnhance.Brightness(image).enhance(_BRIGHTER[i])
    if kind == "low_resolution":
        w, h = image.size
        f = _DOWNSCALE[i]
        small = image.resize((max(1, w // f), max(1, h // f)), Image.Resampling.BILINEAR)
        return small.resize((w, h), Image.Resampling.NEAREST)
    raise InvalidInputError(f"unknown distortion '{kind}' ({', '.join(DISTORTION_KINDS)})")


def _jpeg(image: Image.Image, quality: int) -> Image.Image:
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=quality)
    return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")


# ------------------------------------------------------------------ corruptions (ImageNet-C)

CorruptionKind = Literal["blur", "noise", "jpeg", "pixelate", "occlusion"]
CORRUPTIONS: tuple[CorruptionKind, ...] = get_args(CorruptionKind)
# one entry per severity (SEVERITIES: 1..5)
_BLUR = (0.02, 0.035, 0.05, 0.07, 0.1)  # Gaussian radius, fraction of the image side
_NOISE = (0.08, 0.15, 0.25, 0.35, 0.5)  # std, fraction of the 0-255 range
_JPEG = (25, 15, 10, 6, 3)  # quality
_PIXELATE = (0.6, 0.5, 0.4, 0.3, 0.2)  # side kept before scaling back up
_OCCLUDE = (0.1, 0.2, 0.3, 0.4, 0.5)  # fraction of the area under a flat grey box


def parse_corruptions(spec: str | Sequence[str]) -> tuple[CorruptionKind, ...]:
    """'blur,noise' (or a list) as corruption kinds, each once, in the order given."""
    names = [s.strip() for s in spec.split(",")] if isinstance(spec, str) else list(spec)
    names = [n for n in names if n]
    bad = [n for n in names if n not in CORRUPTIONS]
    if bad or not names:
        raise InvalidInputError(
            f"corruptions '{','.join(names)}': choose from {','.join(CORRUPTIONS)}"
        )
    known: list[CorruptionKind] = [k for n in names for k in CORRUPTIONS if k == n]
    return tuple(dict.fromkeys(known))


def parse_severities(spec: str) -> tuple[int, ...]:
    """'1-5', '5' or '1,3,5' as severities in 1..5."""
    low, high = SEVERITIES[0], SEVERITIES[-1]
    try:
        if "-" in spec:
            lo, hi = (int(x) for x in spec.split("-"))
            # bounded before the range is made: '1-99999999999' must not fill memory
            levels = tuple(range(lo, hi + 1)) if low <= lo <= hi <= high else ()
        else:
            levels = tuple(int(x) for x in spec.split(",") if x.strip())
    except ValueError:
        levels = ()
    if not levels or not all(s in SEVERITIES for s in levels):
        raise InvalidInputError(
            f"severity '{spec}': levels {low}-{high}, as '{low}-{high}', '{high}' or '1,3,{high}'"
        )
    return levels


def corrupt(
    image: Image.Image, kind: CorruptionKind, severity: int, rng: np.random.Generator
) -> Image.Image:
    """`image` (RGB) under corruption `kind` at `severity` 1..5.

    Why: robust training and its evaluation damage images alike whatever their size.

    >>> import cliplens, numpy
    >>> photo = cliplens.open_image("photo.jpg")
    >>> cliplens.corrupt(photo, "occlusion", 5, numpy.random.default_rng(0))
    """
    if severity not in SEVERITIES:
        raise InvalidInputError(f"severity {severity} must be {SEVERITIES[0]}..{SEVERITIES[-1]}")
    s = severity - 1
    side = min(image.size)
    if kind == "blur":
        return image.filter(ImageFilter.GaussianBlur(radius=_BLUR[s] * side))
    if kind == "noise":
        x = np.asarray(image, np.float32)
        x = x + rng.normal(0, _NOISE[s] * 255, x.shape)
        return Image.fromarray(np.clip(x, 0, 255).astype(np.uint8))
    if kind == "jpeg":
        return _jpeg(image, _JPEG[s])
    if kind == "pixelate":
        w, h = image.size
        small = (max(1, round(w * _PIXELATE[s])), max(1, round(h * _PIXELATE[s])))
        return image.resize(small, Image.Resampling.BOX).resize((w, h), Image.Resampling.NEAREST)
    if kind == "occlusion":
        w, h = image.size
        bw = bh = max(1, round(side * _OCCLUDE[s] ** 0.5))
        x0, y0 = int(rng.integers(0, w - bw + 1)), int(rng.integers(0, h - bh + 1))
        out = image.copy()
        out.paste((128, 128, 128), (x0, y0, x0 + bw, y0 + bh))
        return out
    raise InvalidInputError(f"corruption '{kind}': one of {', '.join(CORRUPTIONS)}")
