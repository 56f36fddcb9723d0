"""Options shared by commands, and turning PATHS arguments into image files."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from cliplens.errors import ImageError, ImageNotFoundError
from cliplens.settings import DEFAULT_MODEL

ModelOpt = Annotated[
    str | None,
    typer.Option(
        "--model",
        "-m",
        help="Model name: offline, ARCH:TAG, hf-hub:ORG/NAME, local:PATH.",
        envvar="CLIPLENS_MODEL",
        show_default=DEFAULT_MODEL,
    ),
]
DeviceOpt = Annotated[
    str | None, typer.Option("--device", help="cpu, cuda, cuda:N or mps (default: best available).")
]
PrecisionOpt = Annotated[
    str | None, typer.Option("--precision", help="fp32, bf16 or fp16 (default: fastest safe one).")
]
BatchOpt = Annotated[int | None, typer.Option("--batch-size", "-b", help="Images per batch.")]
MegapixelsOpt = Annotated[
    float | None,
    typer.Option(
        "--max-megapixels", help="Skip images larger than this (decompression-bomb guard)."
    ),
]


def collect_images(paths: list[Path]) -> tuple[list[Path], list[ImageError]]:
    """Files as given and image files under folders; a missing path is a failure, not fatal."""
    from cliplens.images import iter_image_files

    files: list[Path] = []
    missing: list[ImageError] = []
    for path in paths:
        if not path.exists() and not path.is_symlink():
            missing.append(ImageNotFoundError(str(path), "no such file or folder"))
            continue
        files.extend(f for f in iter_image_files([path]) if f not in files)
    return files, missing
