"""Real photos that scikit-image ships, written out as a folder for the demo and tests."""

from __future__ import annotations

import os
from pathlib import Path

from PIL import Image

from cliplens.errors import DependencyMissingError
from cliplens.store.files import write_atomic

# file name -> (scikit-image function, what it shows: the label a classifier should give).
# Photos of everyday subjects only: scikit-image's other images (textures, microscopy,
# the moon, coins) and its portrait hold nothing the offline model's ImageNet classes
# name, so they would only show what it cannot do.
PHOTOS: dict[str, tuple[str, str]] = {
    "cat.jpg": ("chelsea", "cat"),
    "coffee.jpg": ("coffee", "coffee"),
    "rocket.jpg": ("rocket", "rocket"),
    "motorcycle.jpg": ("stereo_motorcycle", "motorcycle"),
    "cameraman.png": ("camera", "camera"),
    "hubble.jpg": ("hubble_deep_field", "galaxy"),
    "page.png": ("page", "text"),
}


def write_photos(out_dir: str | os.PathLike) -> list[Path]:
    """Write the photos (JPEG for colour photos, PNG for the rest); returns the paths.

    Why: real photos for demos and tests, without a download.

    >>> import cliplens
    >>> paths = cliplens.write_photos("photos/")
    >>> [p.name for p in paths]  # ['cat.jpg', 'coffee.jpg', ...]
    """
    try:
        from skimage import data  # optional: only these photos need it
    except ImportError as e:
        raise DependencyMissingError(
            "the demo photos come from scikit-image: pip install scikit-image"
        ) from e
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, (func, _) in PHOTOS.items():
        pixels = getattr(data, func)()
        if func == "stereo_motorcycle":
            pixels = pixels[0]  # (left, right, disparity)
        path = out / name
        image = Image.fromarray(pixels)
        options = {"format": "JPEG", "quality": 92} if path.suffix == ".jpg" else {"format": "PNG"}
        write_atomic(path, lambda tmp, image=image, options=options: image.save(tmp, **options))
        written.append(path)
    return written


def expected_labels() -> dict[str, str]:
    return {name: label for name, (_, label) in PHOTOS.items()}
