"""cliplens: everything people do with CLIP-family models, on one Encoder interface.

Names are imported lazily so that `import cliplens.errors` (and the CLI's --help)
does not pay for importing torch.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "ClipLensError": "cliplens.errors",
    "ImageError": "cliplens.errors",
    "InvalidInputError": "cliplens.errors",
    "ModelUnavailableError": "cliplens.errors",
    "iter_image_files": "cliplens.images",
    "open_image": "cliplens.images",
    "Encoder": "cliplens.models",
    "ModelInfo": "cliplens.models",
    "load_model": "cliplens.models",
    "ModelRef": "cliplens.models",
    "save_checkpoint": "cliplens.models",
    "ClassifyResult": "cliplens.tasks.classify",
    "Prediction": "cliplens.tasks.classify",
    "classify": "cliplens.tasks.classify",
    "zero_shot_weights": "cliplens.tasks.classify",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'cliplens' has no attribute '{name}'")


def __dir__() -> list[str]:
    return __all__
