"""Distorted copies of real photos, one subfolder per distortion type: the layout that
`cliplens quality train --data DIR` reads, for tests, benchmarks and trying it out."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

from PIL import Image

from cliplens.corruptions import DISTORTION_KINDS, DistortionKind, distort
from cliplens.errors import InvalidInputError
from cliplens.images import open_image
from cliplens.limits import DISTORTION_LEVELS
from cliplens.store.files import write_atomic

# a folder per distortion, and one of the undamaged tiles
FolderKind = Literal["clean"] | DistortionKind
KINDS: tuple[FolderKind, ...] = ("clean", *DISTORTION_KINDS)


def crops(image: Image.Image, grid: int = 2) -> list[Image.Image]:
    """The image cut into grid x grid tiles: more (and different) photos from each one."""
    w, h = image.size
    boxes = [
        (i * w // grid, j * h // grid, (i + 1) * w // grid, (j + 1) * h // grid)
        for j in range(grid)
        for i in range(grid)
    ]
    return [image.crop(box) for box in boxes]


def write_distortions(
    out_dir: str | os.PathLike,
    photos: Sequence[str | os.PathLike],
    kinds: Sequence[FolderKind] = KINDS,
    levels: Sequence[int] = (3,),
    grid: int = 2,
) -> dict[FolderKind, list[Path]]:
    """Write every tile of every photo under each distortion: OUT/<kind>/<photo>-<tile>-L<n>.png.

    Why: a distortion probe (`cliplens.train_probe`) learns from a few examples per type.

    >>> import cliplens
    >>> photos = cliplens.write_photos("photos")  # doctest: +SKIP
    >>> cliplens.write_distortions("distorted", photos, levels=(2, 4))  # doctest: +SKIP
    """
    if not levels or not all(level in DISTORTION_LEVELS for level in levels):
        low, high = DISTORTION_LEVELS[0], DISTORTION_LEVELS[-1]
        raise InvalidInputError(f"distortion levels {tuple(levels)}: use levels {low} to {high}")
    out = Path(out_dir)
    written: dict[FolderKind, list[Path]] = {k: [] for k in kinds}
    for photo in photos:
        for t, tile in enumerate(crops(open_image(photo), grid)):
            for kind in kinds:
                for level in [0] if kind == "clean" else levels:
                    image = tile if kind == "clean" else distort(tile, kind, level)
                    path = out / kind / f"{Path(photo).stem}-{t}-L{level}.png"
                    path.parent.mkdir(parents=True, exist_ok=True)
                    write_atomic(path, lambda tmp, image=image: image.save(tmp, format="PNG"))
                    written[kind].append(path)
    return written
