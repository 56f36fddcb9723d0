"""load_model(name) -> Encoder, for every backend; ModelRef for one loaded on demand.

Names are imported lazily: `cliplens.models.ref` and `cliplens.models.onnx_text` must
stay importable without torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "Encoder": "cliplens.models.encoder",
    "TorchEncoder": "cliplens.models.torch_encoder",
    "ImageEncoding": "cliplens.models.encoder",
    "ModelInfo": "cliplens.models.info",
    "ModelRef": "cliplens.models.ref",
    "Preprocessing": "cliplens.preprocess",
    "load_model": "cliplens.models.registry",
    "parse_model_name": "cliplens.models.registry",
    "save_checkpoint": "cliplens.models.openclip",
    "known_models": "cliplens.models.zoo",
    "describe_model": "cliplens.models.zoo",
    "ModelDescription": "cliplens.models.zoo",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'cliplens.models' has no attribute '{name}'")


def __dir__() -> list[str]:
    return __all__
