"""`TorchEncoder`: the base of the PyTorch backends (open_clip, offline), which implement
the `Encoder` protocol on top of `BatchedEncoder` (reading, decoding, batching, errors)."""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Callable

import numpy as np
import torch

from cliplens.errors import InvalidInputError
from cliplens.models.batched import BatchedEncoder
from cliplens.models.info import ModelInfo
from cliplens.models.onnx_text import TextGraph


def l2_normalize(x: torch.Tensor) -> np.ndarray:
    x = x.float()
    return torch.nn.functional.normalize(x, dim=-1).cpu().numpy()


class TorchEncoder(BatchedEncoder):
    """Embeds images and texts into one space as float32, L2-normalised rows, in PyTorch.

    Backends implement `_encode_pixels` and `_encode_text_batch`; reading, decoding,
    batching, ordering and error handling live in `BatchedEncoder` once.
    """

    info: ModelInfo

    @abstractmethod
    def _encode_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) float32 CPU tensor -> (B, D) unnormalised embeddings."""

    @abstractmethod
    def _encode_text_batch(self, texts: list[str]) -> torch.Tensor:
        """list of texts -> (B, D) unnormalised embeddings."""

    def load(self) -> TorchEncoder:
        """Itself: an Encoder is already loaded (see ModelRef for one loaded on demand)."""
        return self

    def ready(self) -> TorchEncoder:
        """Itself: the encoder that runs (see ModelRef, which picks an engine)."""
        return self

    def image_graph(self) -> torch.nn.Module:
        """The image tower in fp32 on CPU, from normalised pixels to unnormalised
        embeddings, for converting it to another engine (models.openvino)."""
        return self.image_tower()

    def image_tower(self) -> torch.nn.Module:
        """The image network as a module from normalised pixels to unnormalised embeddings,
        for fine-tuning it (robust training). The module is this encoder's own: copy it."""
        raise InvalidInputError(f"model {self.info.name}: no image tower that can be trained")

    def with_image_tower(self, tower: torch.nn.Module, model_id: str) -> TorchEncoder:
        """This encoder with images embedded by `tower` (a trained copy of `image_tower()`)
        under a new model_id; the text side is shared."""
        raise InvalidInputError(f"model {self.info.name}: its image tower cannot be replaced")

    def token_counts(self, texts: list[str]) -> list[int] | None:
        """How many tokens the text tower sees for each text (start and end tokens
        included, padding not, cut at the context length); None where unknown."""
        return None

    def text_graph(self) -> TextGraph | None:
        """The text tower and tokenizer for an ONNX export (models.onnx_text), if supported.

        Called on an fp32 CPU encoder; backends without an exportable tower return None.
        """
        return None

    # ------------------------------------------------------------------ engine

    def _embed_pixels(self, pixels: np.ndarray) -> np.ndarray:
        return self._torch_rows(self._encode_pixels, pixels)

    def _torch_rows(
        self, network: Callable[[torch.Tensor], torch.Tensor], pixels: np.ndarray
    ) -> np.ndarray:
        with torch.inference_mode():
            return l2_normalize(network(torch.from_numpy(pixels)))

    def _embed_text_batch(self, texts: list[str]) -> np.ndarray:
        with torch.inference_mode():
            return l2_normalize(self._encode_text_batch(texts))
