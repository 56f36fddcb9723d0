"""Paths and defaults, read from the environment once.

CLIPLENS_HOME        root of everything cliplens writes (default: the user cache dir)
CLIPLENS_MODEL       default model name
CLIPLENS_MAX_MEGAPIXELS  decompression-bomb cap for every image read
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import cache
from pathlib import Path

DEFAULT_MODEL = "ViT-B-32-256:datacomp_s34b_b86k"
DEFAULT_MAX_MEGAPIXELS = 100.0


@dataclass(frozen=True)
class Settings:
    """What the environment sets for this process (see the module docstring)."""

    home: Path
    default_model: str
    max_megapixels: float

    @property
    def model_cache(self) -> Path:
        """Downloaded weights (a Hugging Face hub cache layout)."""
        return self.home / "models"

    @property
    def hash_cache(self) -> Path:
        """sha256 of large weight files, keyed by path, size and mtime."""
        return self.home / "hashes.json"


def _default_home() -> Path:
    from platformdirs import user_cache_dir  # ~40 ms: only when CLIPLENS_HOME is not set

    return Path(user_cache_dir("cliplens", appauthor=False))


@cache
def get_settings() -> Settings:
    home = os.environ.get("CLIPLENS_HOME")
    mp = os.environ.get("CLIPLENS_MAX_MEGAPIXELS")
    return Settings(
        home=Path(home).expanduser() if home else _default_home(),
        default_model=os.environ.get("CLIPLENS_MODEL", DEFAULT_MODEL),
        max_megapixels=float(mp) if mp else DEFAULT_MAX_MEGAPIXELS,
    )
