"""load_model(name) -> Encoder, for every backend."""

from cliplens.models.base import Encoder, ImageEncoding, ModelInfo, Preprocessing
from cliplens.models.openclip import save_checkpoint
from cliplens.models.registry import load_model, parse_model_name

__all__ = [
    "Encoder",
    "ImageEncoding",
    "ModelInfo",
    "Preprocessing",
    "load_model",
    "parse_model_name",
    "save_checkpoint",
]
