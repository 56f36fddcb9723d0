"""Image corruptions at severities 1-5 for robustness training and evaluation.

Severities scale with the image side, in the spirit of ImageNet-C (Hendrycks & Dietterich,
2019), so a 28 px product photo and a 64 px shapes image are damaged alike; severity 5 is
heavy (it is what the robust student is measured at). `tasks.quality.distort` differs on
purpose: it imitates what goes wrong with camera photos, in absolute pixels.

Every corruption takes a random generator, so training draws fresh noise and occluders
each time while evaluation, seeded per image, is repeatable.
"""

from __future__ import annotations

import io
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageFilter

from cliplens.errors import InvalidInputError
from cliplens.limits import SEVERITIES

CORRUPTIONS = ("blur", "noise", "jpeg", "pixelate", "occlusion")
# one entry per severity (SEVERITIES: 1..5)
_BLUR = (0.02, 0.035, 0.05, 0.07, 0.1)  # Gaussian radius, fraction of the image side
_NOISE = (0.08, 0.15, 0.25, 0.35, 0.5)  # std, fraction of the 0-255 range
_JPEG = (25, 15, 10, 6, 3)  # quality
_PIXELATE = (0.6, 0.5, 0.4, 0.3, 0.2)  # side kept before scaling back up
_OCCLUDE = (0.1, 0.2, 0.3, 0.4, 0.5)  # fraction of the area under a flat grey box


def parse_corruptions(spec: str | Sequence[str]) -> tuple[str, ...]:
    names = [s.strip() for s in spec.split(",")] if isinstance(spec, str) else list(spec)
    names = [n for n in names if n]
    bad = [n for n in names if n not in CORRUPTIONS]
    if bad or not names:
        raise InvalidInputError(
            f"corruptions '{','.join(names)}': choose from {','.join(CORRUPTIONS)}"
        )
    return tuple(dict.fromkeys(names))


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


def corrupt(image: Image.Image, kind: str, severity: int, rng: np.random.Generator) -> Image.Image:
    """`image` (RGB) under corruption `kind` at `severity` 1..5."""
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
        buf = io.BytesIO()
        image.save(buf, format="JPEG", quality=_JPEG[s])
        return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")
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
