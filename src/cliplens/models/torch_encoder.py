"""`TorchEncoder`: the base of the PyTorch backends (open_clip, offline), which implement
the `Encoder` protocol; reading, decoding, batching and error handling live here once."""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from cliplens.decode_ahead import decode_ahead, thread_pool
from cliplens.errors import ImageError, InvalidInputError
from cliplens.images import ImageSource, open_image
from cliplens.models.encoder import ImageEncoding
from cliplens.models.info import ModelInfo
from cliplens.models.onnx_text import TextGraph
from cliplens.progress import progress_bar


def l2_normalize(x: torch.Tensor) -> np.ndarray:
    x = x.float()
    return torch.nn.functional.normalize(x, dim=-1).cpu().numpy()


class TorchEncoder(ABC):
    """Embeds images and texts into one space as float32, L2-normalised rows.

    Backends implement `_encode_pixels` and `_encode_text_batch`; reading, decoding,
    batching, ordering and error handling live here once.
    """

    info: ModelInfo
    default_batch_size: int = 32
    # threads decoding the next batch while this one encodes; a GPU needs many to stay busy
    decode_workers: int = min(8, os.cpu_count() or 1)

    @abstractmethod
    def _encode_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) float32 CPU tensor -> (B, D) unnormalised embeddings."""

    @abstractmethod
    def _encode_text_batch(self, texts: list[str]) -> torch.Tensor:
        """list of texts -> (B, D) unnormalised embeddings."""

    def load(self) -> TorchEncoder:
        """Itself: an Encoder is already loaded (see ModelRef for one loaded on demand)."""
        return self

    def image_tower(self) -> torch.nn.Module:
        """The image network as a module from normalised pixels to unnormalised embeddings,
        for fine-tuning it (robust training). The module is this encoder's own: copy it."""
        raise InvalidInputError(f"model {self.info.name}: no image tower that can be trained")

    def with_image_tower(self, tower: torch.nn.Module, model_id: str) -> TorchEncoder:
        """This encoder with images embedded by `tower` (a trained copy of `image_tower()`)
        under a new model_id; the text side is shared."""
        raise InvalidInputError(f"model {self.info.name}: its image tower cannot be replaced")

    def text_graph(self) -> TextGraph | None:
        """The text tower and tokenizer for an ONNX export (models.onnx_text), if supported.

        Called on an fp32 CPU encoder; backends without an exportable tower return None.
        """
        return None

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
        pixels = torch.from_numpy(self.info.preprocessing.normalize(crops))
        with torch.inference_mode():
            return l2_normalize(self._encode_pixels(pixels))

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
        network: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> ImageEncoding:
        network = network or self._encode_pixels
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
                    with torch.inference_mode():
                        rows.append(l2_normalize(network(torch.from_numpy(np.stack(ok)))))
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
                with torch.inference_mode():
                    rows.append(l2_normalize(self._encode_text_batch(chunk)))
                advance(len(chunk))
        return np.concatenate(rows) if rows else np.zeros((0, self.info.dim), np.float32)

    def __repr__(self) -> str:
        i = self.info
        return f"<{type(self).__name__} {i.model_id} dim={i.dim} {i.device}/{i.precision}>"
