"""Fashion-MNIST (Zalando, 28x28 grey product photos, 10 classes) from Debian's
dataset-fashion-mnist package (`apt-get install dataset-fashion-mnist`), or any folder
with the four original idx .gz files, written as one subfolder of PNGs per class: the
layout `cliplens probe` and `cliplens train robust` read."""

from __future__ import annotations

import gzip
import os
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image

from cliplens.errors import InvalidInputError
from cliplens.progress import progress_bar
from cliplens.store.files import write_atomic

DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
# worded for zero-shot prompts ("a photo of a pullover sweater"); folder names use "_"
LABELS = (
    "t-shirt",
    "trousers",
    "pullover sweater",
    "dress",
    "coat",
    "sandal",
    "shirt",
    "sneaker",
    "bag",
    "ankle boot",
)
Split = Literal["train", "test"]
# the split's (images, labels) files, as Zalando published them
FILES: dict[Split, tuple[str, str]] = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}


def read_idx(path: Path) -> np.ndarray:
    """An idx file (gzip-compressed) as a uint8 array."""
    raw = gzip.decompress(path.read_bytes())
    ndim = raw[3]
    shape = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim).reshape(shape)


def load(
    split: Split = "test", source: str | os.PathLike | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """(images (N, 28, 28) uint8, labels (N,) int) of the train or test split."""
    if split not in FILES:
        raise InvalidInputError(f"split '{split}': train or test")
    root = Path(source) if source else DEBIAN_DIR
    paths = [root / name for name in FILES[split]]
    missing = [p for p in paths if not p.is_file()]
    if missing:
        raise InvalidInputError(
            f"Fashion-MNIST: {missing[0]} not found; install Debian's dataset-fashion-mnist "
            "or pass the folder holding the idx .gz files"
        )
    return read_idx(paths[0]), read_idx(paths[1]).astype(np.int64)


def write_fashion_mnist(
    out_dir: str | os.PathLike,
    split: Split = "test",
    per_class: int | None = None,
    offset: int = 0,
    source: str | os.PathLike | None = None,
    progress: bool = False,
) -> dict[str, int]:
    """Write `per_class` images of each class (all by default), skipping the first `offset`
    of each class, to OUT/<label>/<index>.png. Returns the count per class folder.

    Why: a real ten-class dataset for probes and robust training, installed, not fetched.

    >>> import cliplens
    >>> cliplens.write_fashion_mnist("fashion/", split="test", per_class=100)
    >>> # {'t-shirt': 100, 'trousers': 100, ...}
    """
    if offset < 0 or (per_class is not None and per_class < 1):
        raise InvalidInputError(f"per class {per_class}, offset {offset}: use 1 or more, 0 or more")
    images, labels = load(split, source)
    picked = []
    for c in range(len(LABELS)):
        idx = np.flatnonzero(labels == c)[offset:]
        picked += idx[:per_class].tolist() if per_class is not None else idx.tolist()
    out = Path(out_dir)
    counts: dict[str, int] = {}
    with progress_bar(len(picked), "writing Fashion-MNIST", progress) as advance:
        for i in picked:
            folder = LABELS[labels[i]].replace(" ", "_")
            (out / folder).mkdir(parents=True, exist_ok=True)
            image = Image.fromarray(images[i])
            path = out / folder / f"{split}-{i:05d}.png"
            write_atomic(path, lambda tmp, image=image: image.save(tmp, format="PNG"))
            counts[folder] = counts.get(folder, 0) + 1
            advance(1)
    return counts
