"""Image-caption pairs with their images embedded once: what a captioner trains and is
scored on. Each distinct image is encoded once (taken from the catalog where a file is
indexed and unchanged), and the embeddings can be cached in a folder, so a resumed run or
a second variant on the same data encodes nothing."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from cliplens.errors import InvalidInputError
from cliplens.store.npz import load_arrays, save_arrays
from cliplens.tasks.embed import embed_files
from cliplens.train.data import Pair

if TYPE_CHECKING:
    from cliplens.catalog.db import Catalog
    from cliplens.models.encoder import Encoder


@dataclass
class EmbeddedPairs:
    """Unique images with their embeddings, and the pairs as (image row, caption): what a
    captioner trains on."""

    vectors: np.ndarray  # (n_images, D)
    images: list[str]
    rows: np.ndarray  # (n_pairs,) row of each pair's image
    captions: list[str]

    def references(self) -> list[list[str]]:
        refs: list[list[str]] = [[] for _ in self.images]
        for r, c in zip(self.rows, self.captions, strict=True):
            refs[r].append(c)
        return refs


def _cache_key(model_id: str, pairs: Sequence[Pair]) -> str:
    h = hashlib.sha256(model_id.encode())
    for p in dict.fromkeys(p.image for p in pairs):
        h.update(str(Path(p).resolve()).encode())
        source = p if p.is_file() else p.parent  # a shard member: the shard's stamp
        if source.is_file():
            st = source.stat()
            h.update(f"|{st.st_size}|{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def embed_pairs(
    encoder: Encoder,
    pairs: Sequence[Pair],
    cache_dir: Path | None = None,
    catalog: Catalog | None = None,
    progress: bool = False,
    warn: Callable[[str], None] = lambda m: None,
) -> EmbeddedPairs:
    """Embed each distinct image of `pairs` once (catalog rows reused): why, a captioner
    trains and is scored on embeddings, never on pixels. Cached under `cache_dir`, keyed by
    the model and every image's path, size and mtime; the cache is written when all are
    done (for a large set, index it first: that resumes, and the catalog serves them).

    >>> import cliplens
    >>> data = cliplens.embed_pairs(cliplens.ModelRef("offline"), cliplens.read_pairs("t.jsonl"))
    >>> data.vectors.shape  # doctest: +SKIP
    """
    by_image: dict[Path, Pair] = {p.image: p for p in pairs}
    cache = None
    if cache_dir is not None:
        cache = cache_dir / f"embeddings-{_cache_key(encoder.info.model_id, pairs)}.npz"
        if cache.is_file():
            arrays, _ = load_arrays(cache, "the embedding cache")
            images = [str(s) for s in arrays["images"]]
            return _pair_rows(pairs, images, arrays["vectors"])
    files = [i for i, p in by_image.items() if p.data is None]
    members = [p for p in by_image.values() if p.data is not None]
    images: list[str] = []
    blocks: list[np.ndarray] = []
    if files:
        done = embed_files(encoder, files, catalog, progress=progress)
        for failure in done.failures:
            warn(f"{failure} (its pairs are skipped)")
        resolved = {str(Path(f).resolve()): str(f) for f in files}
        images += [resolved[p] for p in done.paths]
        blocks.append(done.vectors)
    if members:
        sources = [p.source() for p in members]
        result = encoder.ready().encode_images_lenient(sources, progress=progress)
        for failure in result.failures:
            warn(f"{failure} (its pairs are skipped)")
        images += [str(members[i].image) for i in result.kept]
        blocks.append(result.vectors)
    if not images:
        raise InvalidInputError(f"none of the {len(by_image)} images could be read")
    vectors = np.concatenate(blocks).astype(np.float32)
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        save_arrays(cache, {}, vectors=vectors, images=np.array(images))
    return _pair_rows(pairs, images, vectors)


def _pair_rows(pairs: Sequence[Pair], images: list[str], vectors: np.ndarray) -> EmbeddedPairs:
    index = {s: i for i, s in enumerate(images)}
    kept = [(index[str(p.image)], p.caption) for p in pairs if str(p.image) in index]
    rows = np.array([r for r, _ in kept], dtype=np.int64)
    return EmbeddedPairs(vectors, images, rows, [c for _, c in kept])
