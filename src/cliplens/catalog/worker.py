"""The work done per file in decoder processes: hash, open, orient, downscale, crop.

Kept free of torch so that worker processes start fast and stay small.
"""

from __future__ import annotations

import ctypes
import hashlib
import signal
import sys
import time
from dataclasses import dataclass

import numpy as np

from cliplens.errors import ImageError
from cliplens.images import open_image
from cliplens.preprocess import Preprocessing

PR_SET_PDEATHSIG = 1  # from <sys/prctl.h>
_known: frozenset[str] = frozenset()
_prep: Preprocessing | None = None
_max_megapixels: float | None = None


@dataclass
class Decoded:
    path: str
    size: int
    mtime_ns: int
    hash: str | None = None
    crop: np.ndarray | None = None  # uint8 HWC; None when the hash already has an embedding
    error: str | None = None
    seconds: float = 0.0


def init_worker(known: frozenset[str], prep: Preprocessing, max_megapixels: float | None) -> None:
    global _known, _prep, _max_megapixels
    _known, _prep, _max_megapixels = known, prep, max_megapixels
    _die_with_parent()


def _die_with_parent() -> None:
    """On Linux, ask the kernel to kill this worker when the indexer dies: a SIGKILLed
    indexer cannot stop its pool, and the workers would linger on their task queue."""
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):  # no prctl here: the pool's own shutdown must do
        pass


def content_hash(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:  # noqa: PTH123 (hot path: no Path object per file)
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def decode_file(job: tuple[str, int, int]) -> Decoded:
    """Hash a file and, unless its content is already embedded, decode it to a model crop."""
    path, size, mtime_ns = job
    start = time.perf_counter()
    out = Decoded(path, size, mtime_ns)
    try:
        out.hash = content_hash(path)
        if out.hash not in _known:
            assert _prep is not None, "init_worker was not called"
            image = open_image(path, min_size=_prep.resize_size, max_megapixels=_max_megapixels)
            out.crop = _prep.crop(image)
    except ImageError as e:
        out.error = e.reason
    except OSError as e:
        out.error = f"cannot read: {e.strerror or e}"
    out.seconds = time.perf_counter() - start
    return out
