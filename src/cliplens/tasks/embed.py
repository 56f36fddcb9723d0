"""Embeddings for a list of image files: from the catalog when a file is indexed and
unchanged, encoded otherwise. Moderation, screening and classification share it, so a
folder already indexed is not encoded again."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from cliplens.errors import ImageError, InvalidInputError
from cliplens.images import ImageSource, describe
from cliplens.models.encoder import Encoder

if TYPE_CHECKING:
    from cliplens.catalog.db import Catalog


@dataclass
class Embedded:
    """Rows for the files that could be read, and why the others could not."""

    paths: list[str]  # the files that could be read, in input order
    vectors: np.ndarray  # (len(paths), D) float32, L2-normalised
    failures: list[ImageError] = field(default_factory=list)
    reused: int = 0  # rows taken from the catalog
    positions: list[int] = field(default_factory=list)  # input position of each row


def embed_files(
    model: Encoder,
    files: Sequence[str | os.PathLike],
    catalog: Catalog | None = None,
    progress: bool = False,
    max_megapixels: float | None = None,
    features: bool = False,
) -> Embedded:
    """Embed image files with `model`, reusing a catalog's rows.

    Why: a folder already indexed is not encoded again. With `features`, the encoder's
    probe features instead (`Encoder.encode_features`); the catalog serves them only where
    they are the embeddings.

    >>> import cliplens
    >>> done = cliplens.embed_files(cliplens.ModelRef("offline"), ["a.jpg", "b.png"])
    >>> done.paths, done.vectors.shape, done.failures
    """
    paths = [str(Path(f).resolve()) for f in files]
    if features and model.feature_id != model.info.model_id:
        catalog = None  # the catalog holds embeddings, not these features
    stored = catalog.fresh_embeddings(paths, model.info.model_id) if catalog is not None else {}
    todo = [p for p in paths if p not in stored]
    encoded: dict[str, np.ndarray] = {}
    failures: list[ImageError] = []
    if todo:
        encoder = model.ready()  # the network: what is not in the catalog is encoded
        encode = encoder.encode_features if features else encoder.encode_images_lenient
        result = encode(todo, progress=progress, max_megapixels=max_megapixels)
        encoded = {todo[i]: v for i, v in zip(result.kept, result.vectors, strict=True)}
        failures = result.failures
    positions = [i for i, p in enumerate(paths) if p in stored or p in encoded]
    kept = [paths[i] for i in positions]
    rows = [stored.get(p, encoded.get(p)) for p in kept]
    dim = 0 if features else model.info.dim
    vectors = np.stack(rows).astype(np.float32) if rows else np.zeros((0, dim), np.float32)
    if stored:  # float16 storage: renormalise the reused rows
        vectors /= np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
    return Embedded(kept, vectors, failures, reused=len(stored), positions=positions)


def embed_images(
    model: Encoder,
    images: Sequence[ImageSource],
    names: Sequence[str] | None = None,
    catalog: Catalog | None = None,
    progress: bool = False,
    max_megapixels: float | None = None,
) -> Embedded:
    """`embed_files` for files (named by their resolved paths); images already open
    (uploads, PIL images, arrays) are encoded and named by `names`, else described.

    Why: the tasks that take either (score, moderate, screen) read them one way.

    >>> import cliplens
    >>> done = cliplens.embed_images(cliplens.ModelRef("offline"), [pil_image], ["upload.png"])
    >>> done.paths, done.vectors.shape  # doctest: +SKIP
    """
    if all(isinstance(item, (str, os.PathLike)) for item in images):
        files = [os.fspath(item) for item in images]  # type: ignore[arg-type]
        return embed_files(model, files, catalog, progress, max_megapixels)
    labels = list(names) if names is not None else [describe(item) for item in images]
    if len(labels) != len(images):
        raise InvalidInputError(f"{len(images)} images but {len(labels)} `names`")
    enc = model.encode_images_lenient(images, None, progress, max_megapixels)
    kept = [labels[i] for i in enc.kept]
    return Embedded(kept, enc.vectors, enc.failures, positions=list(enc.kept))
