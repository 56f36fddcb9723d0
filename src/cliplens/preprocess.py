"""Pixels to model input: resize, centre crop, normalise. No torch here, so worker
processes that decode images stay light."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import numpy as np

if TYPE_CHECKING:  # Pillow loads when pixels do: a text query never needs it
    from PIL import Image

# how a resize samples pixels (Pillow's filters; open_clip's names)
Interpolation = Literal["bicubic", "bilinear", "lanczos", "nearest"]
# shortest: resize the short side, then centre crop; squash: resize both sides to the crop
# (open_clip's "longest" pads instead, and is read here as shortest)
ResizeMode = Literal["shortest", "longest", "squash"]


@dataclass(frozen=True)
class Preprocessing:
    """How pixels become the model's input: resize, centre crop, normalise."""

    image_size: int
    resize_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: Interpolation = "bicubic"
    resize_mode: ResizeMode = "shortest"

    def crop(self, image: Image.Image) -> np.ndarray:
        """RGB PIL image -> uint8 HWC array, resized and cropped as torchvision's Resize +
        CenterCrop would. Small enough to pass between processes cheaply."""
        image = self.resize(image)
        if self.resize_mode != "squash":
            w, h = image.size
            s = self.image_size
            left, top = round((w - s) / 2.0), round((h - s) / 2.0)
            image = image.crop((left, top, left + s, top + s))
        return np.asarray(image, dtype=np.uint8)

    def resize(self, image: Image.Image) -> Image.Image:
        """The resize step alone (short side to `resize_size`, or squashed to the input
        square); `crop` of the result resizes nothing again."""
        from PIL import Image  # ~30 ms: only to crop; model info and listings import this module

        resample = {
            "bilinear": Image.Resampling.BILINEAR,
            "lanczos": Image.Resampling.LANCZOS,
            "nearest": Image.Resampling.NEAREST,
        }.get(self.interpolation, Image.Resampling.BICUBIC)
        w, h = image.size
        if self.resize_mode == "squash":
            size = (self.image_size, self.image_size)
        else:
            short, long = (w, h) if w <= h else (h, w)
            new_short, new_long = self.resize_size, int(self.resize_size * long / short)
            size = (new_short, new_long) if w <= h else (new_long, new_short)
        return image if size == (w, h) else image.resize(size, resample)

    def normalize(self, crops: np.ndarray) -> np.ndarray:
        """uint8 NHWC crops -> float32 NCHW model input."""
        x = crops.astype(np.float32) * np.float32(1 / 255.0)
        x = (x - np.asarray(self.mean, np.float32)) / np.asarray(self.std, np.float32)
        return np.ascontiguousarray(x.transpose(0, 3, 1, 2))

    def __call__(self, image: Image.Image) -> np.ndarray:
        """RGB PIL image -> float32 CHW model input."""
        return self.normalize(self.crop(image)[None])[0]
