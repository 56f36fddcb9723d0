"""What every task needs from a model: the `Encoder` protocol, torch-free.

A loaded backend (`TorchEncoder`: open_clip, offline) and the lazy `ModelRef` both
satisfy it, so a task is written once against `Encoder` and runs on either. Embeddings
are float32 rows, L2-normalised, in input order.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import numpy as np

from cliplens.errors import ImageError
from cliplens.models.info import ModelInfo

if TYPE_CHECKING:
    from cliplens.images import ImageSource
    from cliplens.models.batched import BatchedEncoder
    from cliplens.models.torch_encoder import TorchEncoder


@dataclass
class ImageEncoding:
    """Result of a lenient encode: rows for the images that could be read, and why others failed."""

    vectors: np.ndarray  # (len(kept), D) float32, L2-normalised
    kept: list[int]  # input positions of the rows of `vectors`
    failures: list[ImageError]


@runtime_checkable
class Encoder(Protocol):
    """Embeds images and texts into one space.

    >>> import cliplens
    >>> model = cliplens.load_model("offline")
    >>> model.encode_texts(["a red boat"]).shape  # doctest: +SKIP
    """

    @property
    def info(self) -> ModelInfo:
        """Identity and preprocessing: model_id, dim, device, precision."""
        ...

    @property
    def feature_id(self) -> str:
        """Names the space of `encode_features`; probes trained there record it."""
        ...

    def load(self) -> TorchEncoder:
        """The PyTorch network (itself for a loaded one): what training and gradients need."""
        ...

    def ready(self) -> BatchedEncoder:
        """The encoder that runs images, on its engine (itself for a loaded encoder)."""
        ...

    def encode_images(
        self,
        items: Sequence[ImageSource],
        batch_size: int | None = None,
        progress: bool = False,
        max_megapixels: float | None = None,
    ) -> np.ndarray:
        """Embed images in input order; the first unreadable image raises its ImageError."""
        ...

    def encode_images_lenient(
        self,
        items: Sequence[ImageSource],
        batch_size: int | None = None,
        progress: bool = False,
        max_megapixels: float | None = None,
    ) -> ImageEncoding:
        """Embed what can be read; unreadable images are skipped and reported."""
        ...

    def encode_features(
        self,
        items: Sequence[ImageSource],
        batch_size: int | None = None,
        progress: bool = False,
        max_megapixels: float | None = None,
    ) -> ImageEncoding:
        """Image features for linear probes (the embeddings unless a backend has better)."""
        ...

    def encode_texts(
        self, texts: Sequence[str], batch_size: int = 256, progress: bool = False
    ) -> np.ndarray:
        """Embed texts in input order."""
        ...
