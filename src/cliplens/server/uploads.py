"""Uploaded images: decoded with the same checks as files on disk, named by their upload."""

from __future__ import annotations

from functools import partial
from pathlib import PurePath
from typing import Any

import anyio
from fastapi import UploadFile

from cliplens.errors import InvalidInputError
from cliplens.images import open_image


def upload_name(upload: UploadFile, index: int) -> str:
    """The client's file name without any folder part (for messages and results only:
    it is never opened)."""
    name = PurePath((upload.filename or "").replace("\\", "/")).name.strip()
    return name[:200] or f"upload-{index + 1}"


async def read_images(
    svc: Any, uploads: list[UploadFile], max_files: int | None = None, whole: bool = False
) -> tuple[list[str], list[Any]]:
    """(names, images) of the uploaded files, in order; any bad file fails the request.

    Decoded as the indexer decodes files (JPEG at reduced scale, down to the model's resize
    size), so an upload embeds as the same photo there; with `whole`, decoded at full size
    and then resized, as a metric's reference code reads images (score)."""
    max_files = max_files or svc.settings.max_files
    if not uploads:
        raise InvalidInputError("no image uploaded; send one or more files as 'images'")
    if len(uploads) > max_files:
        raise InvalidInputError(f"{len(uploads)} images in one request; send at most {max_files}")
    max_megapixels = svc.settings.max_megapixels
    prep = await anyio.to_thread.run_sync(lambda: svc.ref.info.preprocessing)
    names, images = [], []
    for i, upload in enumerate(uploads):
        names.append(upload_name(upload, i))
        # decoded from the spooled upload (no copy in memory)
        decode = partial(
            open_image,
            upload.file,
            min_size=None if whole else prep.resize_size,
            max_megapixels=max_megapixels,
            label=f"upload {names[-1]}",
        )
        image = await anyio.to_thread.run_sync(decode)
        if whole:  # only the resized copy is kept
            image = await anyio.to_thread.run_sync(prep.resize, image)
        images.append(image)
    return names, images
