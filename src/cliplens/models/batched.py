"""`BatchedEncoder`: reading, decoding ahead, batching and error handling for every
engine (torch, OpenVINO), written once and torch-free.

An engine implements `_embed_pixels` (normalised NCHW float32 pixels -> L2-normalised
rows) and `_embed_text_batch`; everything else an `Encoder` does is here.
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from cliplens.decode_ahead import decode_ahead, thread_pool
from cliplens.errors import ImageError, InvalidInputError
from cliplens.images import ImageSource, open_image
from cliplens.models.encoder import ImageEncoding
from cliplens.models.info import ModelInfo
from cliplens.progress import progress_bar


def unit_rows(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length, as float32 (a zero row stays zero)."""
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


class BatchedEncoder(ABC):
    """Embeds images and texts into one space as float32, L2-normalised rows."""

    info: ModelInfo
    default_batch_size: int = 32
    # threads decoding the next batch while this one encodes; a GPU needs many to stay busy
    decode_workers: int = min(8, os.cpu_count() or 1)

    @abstractmethod
    def _embed_pixels(self, pixels: np.ndarray) -> np.ndarray:
        """(B, 3, H, W) normalised float32 pixels -> (B, D) L2-normalised float32 rows."""

    @abstractmethod
    def _embed_text_batch(self, texts: list[str]) -> np.ndarray:
        """list of texts -> (B, D) L2-normalised float32 rows."""

    # ------------------------------------------------------------------ images

    def load_pixels(self, item: ImageSource, max_megapixels: float | None = None) -> np.ndarray:
        """Open, orient, downscale and normalise one image into the model's input array."""
        prep = self.info.preprocessing
        image = open_image(item, min_size=prep.resize_size, max_megapixels=max_megapixels)
        return prep(image)

    def encode_images(
        self,
        items: Sequence[ImageSource],
        batch_size: int | None = None,
        progress: bool = False,
        max_megapixels: float | None = None,
    ) -> np.ndarray:
        """Embed images in input order; the first unreadable image raises its ImageError."""
        result = self._encode(items, batch_size, progress, max_megapixels, strict=True)
        return result.vectors

    def encode_crops(self, crops: np.ndarray) -> np.ndarray:
        """Embed uint8 NHWC crops made by `info.preprocessing.crop` (in worker processes)."""
        return self._embed_pixels(self.info.preprocessing.normalize(crops))

    def encode_images_lenient(
        self,
        items: Sequence[ImageSource],
        batch_size: int | None = None,
        progress: bool = False,
        max_megapixels: float | None = None,
    ) -> ImageEncoding:
        """Embed what can be read; unreadable images are skipped and reported, never fatal."""
        return self._encode(items, batch_size, progress, max_megapixels, strict=False)

    def _encode(
        self,
        items: Sequence[ImageSource],
        batch_size: int | None,
        progress: bool,
        max_megapixels: float | None,
        strict: bool,
        embed: Callable[[np.ndarray], np.ndarray] | None = None,
    ) -> ImageEncoding:
        embed = embed or self._embed_pixels
        if isinstance(items, (str, Path, Image.Image, np.ndarray)):
            raise InvalidInputError(
                "encode_images takes a list of images; wrap a single image in a list"
            )
        bs = batch_size or self.default_batch_size
        if bs < 1:
            raise InvalidInputError(f"batch size {bs} must be at least 1")
        rows: list[np.ndarray] = []
        kept: list[int] = []
        failures: list[ImageError] = []
        with progress_bar(len(items), "encoding images", progress) as advance:
            for start, decoded in self._decoded_batches(items, bs, max_megapixels):
                ok: list[np.ndarray] = []
                for offset, value in enumerate(decoded):
                    if isinstance(value, ImageError):
                        if strict:
                            raise value
                        failures.append(value)
                    else:
                        ok.append(value)
                        kept.append(start + offset)
                if ok:
                    rows.append(embed(np.stack(ok)))
                advance(len(decoded))
        vectors = np.concatenate(rows) if rows else np.zeros((0, self.info.dim), np.float32)
        return ImageEncoding(vectors=vectors, kept=kept, failures=failures)

    @property
    def feature_id(self) -> str:
        """Names the space of `encode_features`; probes trained there record it."""
        return self.info.model_id

    def encode_features(
        self,
        items: Sequence[ImageSource],
        batch_size: int | None = None,
        progress: bool = False,
        max_megapixels: float | None = None,
    ) -> ImageEncoding:
        """Image features for linear probes (distortion type, custom labels), lenient.

        The embeddings themselves, unless a backend has features that keep more of what a
        probe needs (the offline model: its CNN's pooled features, see there).
        """
        return self.encode_images_lenient(items, batch_size, progress, max_megapixels)

    def _decoded_batches(
        self, items: Sequence[ImageSource], bs: int, max_megapixels: float | None
    ) -> Iterator[tuple[int, list[np.ndarray | ImageError]]]:
        """Decode batch i+1 in worker threads while batch i is encoded (Pillow drops the GIL)."""

        def load(item: ImageSource) -> np.ndarray | ImageError:
            try:
                return self.load_pixels(item, max_megapixels)
            except ImageError as e:
                return e

        with thread_pool(self.decode_workers) as pool:
            yield from decode_ahead(items, load, bs, pool)

    # ------------------------------------------------------------------ texts

    def encode_texts(
        self, texts: Sequence[str], batch_size: int = 256, progress: bool = False
    ) -> np.ndarray:
        """Embed texts in input order."""
        if isinstance(texts, str):
            raise InvalidInputError(
                "encode_texts takes a list of texts; wrap a single text in a list"
            )
        rows: list[np.ndarray] = []
        with progress_bar(len(texts), "encoding texts", progress) as advance:
            for start in range(0, len(texts), batch_size):
                chunk = [str(t) for t in texts[start : start + batch_size]]
                rows.append(self._embed_text_batch(chunk))
                advance(len(chunk))
        return np.concatenate(rows) if rows else np.zeros((0, self.info.dim), np.float32)

    def __repr__(self) -> str:
        i = self.info
        engine = f" {i.engine}" if i.engine != "torch" else ""
        return f"<{type(self).__name__} {i.model_id} dim={i.dim} {i.device}/{i.precision}{engine}>"
