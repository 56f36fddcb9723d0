"""Distorted copies of real photos, one subfolder per distortion type: the layout that
`cliplens quality train --data DIR` reads, for tests, benchmarks and trying it out."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from cliplens.errors import InvalidInputError
from cliplens.limits import DISTORTION_LEVELS
from cliplens.tasks.quality import distort

KINDS = ("clean", "blur", "noise", "jpeg", "underexposed", "overexposed", "low_resolution")


def crops(image, grid: int = 2) -> list:
    """The image cut into grid x grid tiles: more (and different) photos from each one."""
    w, h = image.size
    return [image.crop((i * w // grid, j * h // grid, (i + 1) * w // grid, (j + 1) * h // grid))
            for j in range(grid) for i in range(grid)]  # fmt: skip


def write_distortions(
    out_dir: str | os.PathLike,
    photos: Sequence[str | os.PathLike],
    kinds: Sequence[str] = KINDS,
    levels: Sequence[int] = (3,),
    grid: int = 2,
) -> dict[str, list[Path]]:
    """Write every tile of every photo under each distortion: OUT/<kind>/<photo>-<tile>-L<n>.png."""
    from cliplens.images import open_image

    if not levels or not all(level in DISTORTION_LEVELS for level in levels):
        low, high = DISTORTION_LEVELS[0], DISTORTION_LEVELS[-1]
        raise InvalidInputError(f"distortion levels {tuple(levels)}: use levels {low} to {high}")
    out = Path(out_dir)
    written: dict[str, list[Path]] = {k: [] for k in kinds}
    for photo in photos:
        for t, tile in enumerate(crops(open_image(photo), grid)):
            for kind in kinds:
                for level in [0] if kind == "clean" else levels:
                    image = tile if kind == "clean" else distort(tile, kind, level)
                    path = out / kind / f"{Path(photo).stem}-{t}-L{level}.png"
                    path.parent.mkdir(parents=True, exist_ok=True)
                    image.save(path)
                    written[kind].append(path)
    return written
