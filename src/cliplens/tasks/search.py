"""Search a catalog: text, image and weighted queries; similar photos; duplicates.

Query syntax (as rclip's): terms joined by + and -, each a text or an image path, with an
optional weight: `2:sunset + ./beach.jpg - people`. A term is an image when it names an
existing file or starts with ./, ../, / or ~.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from cliplens.catalog.db import Catalog, resolve_folders
from cliplens.catalog.vectors import load_vectors
from cliplens.errors import InvalidInputError

if TYPE_CHECKING:
    from cliplens.models.encoder import Encoder
    from cliplens.models.ref import ModelRef

MAX_WEIGHT = 100.0  # a term's weight, either sign: beyond it one term drowns the rest anyway
_WEIGHT = re.compile(r"^\s*([-+]?\d+(?:\.\d+)?)\s*:(.+)$")


@dataclass(frozen=True)
class Term:
    weight: float
    text: str | None = None
    image: str | None = None


@dataclass(frozen=True)
class Hit:
    path: str
    score: float
    id: int | None = None  # the file's catalog id

    def to_dict(self) -> dict:
        return {"path": self.path, "score": round(self.score, 6)}


def _is_image_term(term: str) -> bool:
    if term.startswith(("./", "../", "/", "~")):
        return True
    try:
        return Path(term).is_file()
    except (OSError, ValueError):  # too long for a file name, or a NUL in it: it is text
        return False


def parse_query(query: str, images: bool = True) -> list[Term]:
    """`2:sunset + ./beach.jpg - people` -> weighted text and image terms. With
    `images=False` every term is text (no file is looked at: the server's queries)."""
    parts = re.split(r"\s+([+-])\s+", " " + query.strip() + " ")
    terms: list[Term] = []
    sign = 1.0
    for i, part in enumerate(parts):
        if i % 2 == 1:
            sign = 1.0 if part == "+" else -1.0
            continue
        part = part.strip().strip("\"'")
        if not part:
            raise InvalidInputError(f"query '{query}': an empty term around + or -")
        weight = 1.0
        if m := _WEIGHT.match(part):
            weight, part = float(m.group(1)), m.group(2).strip().strip("\"'")
            if not abs(weight) <= MAX_WEIGHT:
                shown = m.group(1) if len(m.group(1)) <= 20 else m.group(1)[:20] + "..."
                raise InvalidInputError(
                    f"query term '{shown}:...': the weight is out of range; "
                    f"use a weight between -{MAX_WEIGHT:g} and {MAX_WEIGHT:g}"
                )
        if images and _is_image_term(part):
            path = Path(part).expanduser()
            if not path.is_file():
                raise InvalidInputError(f"query '{query}': image {part} does not exist")
            terms.append(Term(sign * weight, image=str(path.resolve())))
        else:
            terms.append(Term(sign * weight, text=part))
    return terms


def query_vector(
    encoder: Encoder | ModelRef, terms: list[Term], catalog: Catalog | None = None
) -> np.ndarray:
    """Weighted sum of the terms' embeddings, normalised. Indexed images are not re-encoded."""
    vectors, weights = [], []
    texts = [t for t in terms if t.text is not None]
    if texts:
        for t, v in zip(texts, encoder.encode_texts([t.text for t in texts]), strict=True):
            vectors.append(v)
            weights.append(t.weight)
    for t in terms:
        if t.image is not None:
            v = catalog.embedding_of(t.image, encoder.info.model_id) if catalog else None
            if v is None:
                v = encoder.encode_images([t.image])[0]
            vectors.append(v)
            weights.append(t.weight)
    return weighted_sum(vectors, weights)


def weighted_sum(vectors: list[np.ndarray], weights: list[float]) -> np.ndarray:
    """sum(w * v), normalised: the query vector of weighted terms."""
    total = np.zeros(len(vectors[0]), np.float32)
    for v, w in zip(vectors, weights, strict=True):
        total += w * np.asarray(v, np.float32)
    norm = float(np.linalg.norm(total))
    if not norm > 0:
        raise InvalidInputError("the query's terms cancel out; change the weights")
    return total / norm


def search(
    catalog: Catalog,
    encoder: Encoder | ModelRef,
    query: str | np.ndarray,
    n: int = 10,
    folders: list[str | os.PathLike] | None = None,
    exclude: set[str] | None = None,
    exact: bool = False,
) -> list[Hit]:
    """The n best matches for a query string (or a ready query vector) in the catalog.

    Large catalogs are searched through their ANN index unless `exact`."""
    vec = (
        query
        if isinstance(query, np.ndarray)
        else query_vector(encoder, parse_query(query), catalog)
    )
    index = load_vectors(catalog, encoder.info.model_id, ann="off" if exact else "auto")
    allowed = None
    if folders:
        resolved = resolve_folders(folders)
        if not catalog.holds_only(resolved):  # a filter only when it excludes something
            allowed = catalog.ids_under(resolved)
    extra = len(exclude) if exclude else 0
    hits = index.search(vec, n + extra, allowed, exact=exact)
    paths = catalog.paths(i for i, _ in hits)
    out = [Hit(paths[i], s, i) for i, s in hits if i in paths and paths[i] not in (exclude or ())]
    return out[:n]


def search_many(
    catalog: Catalog, encoder: Encoder | ModelRef, queries: np.ndarray, n: int = 10
) -> list[list[Hit]]:
    """`search` for a batch of query vectors (B, D) over the whole catalog, in one pass."""
    index = load_vectors(catalog, encoder.info.model_id)
    found = index.search_many(np.atleast_2d(queries), n)
    paths = catalog.paths({i for hits in found for i, _ in hits})
    return [[Hit(paths[i], s, i) for i, s in hits if i in paths] for hits in found]


def similar(
    catalog: Catalog,
    encoder: Encoder | ModelRef,
    photo: str | os.PathLike,
    n: int = 10,
    folders: list[str | os.PathLike] | None = None,
) -> list[Hit]:
    """Photos most like `photo` (itself excluded), using its stored embedding when indexed."""
    path = str(Path(photo).expanduser().resolve())
    vec = catalog.embedding_of(path, encoder.info.model_id)
    if vec is None:
        vec = encoder.encode_images([path])[0]
    return search(catalog, encoder, vec / np.linalg.norm(vec), n, folders, exclude={path})


@dataclass
class DuplicateGroup:
    kind: str  # "exact" (same bytes) or "near" (embeddings above the threshold)
    paths: list[str]
    score: float  # lowest similarity inside the group (1.0 for exact copies)

    def to_dict(self) -> dict:
        return {"kind": self.kind, "score": round(self.score, 6), "paths": self.paths}


def duplicates(
    catalog: Catalog,
    model_id: str,
    folders: list[str | os.PathLike],
    threshold: float = 0.95,
    block: int = 4096,
) -> list[DuplicateGroup]:
    """Exact copies (same content hash) and near-duplicates (cosine >= threshold), as groups."""
    resolved = resolve_folders(folders)
    groups = [DuplicateGroup("exact", g, 1.0) for g in catalog.duplicate_hashes(resolved)]
    index = load_vectors(catalog, model_id)
    mask = np.isin(index.ids, catalog.ids_under(resolved))
    ids, m = index.ids[mask], index.matrix[mask]
    paths = catalog.paths(ids)
    exact_of = {p: i for i, g in enumerate(groups) for p in g.paths}
    parent = list(range(len(ids)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    best: dict[tuple[int, int], float] = {}
    for start in range(0, len(ids), block):
        sims = m[start : start + block] @ m.T
        rows, cols = np.nonzero(sims >= threshold)
        for r, c in zip(rows + start, cols, strict=True):
            if c <= r:
                continue
            a, b = paths[int(ids[r])], paths[int(ids[c])]
            if a in exact_of and exact_of.get(b) == exact_of[a]:
                continue  # already an exact group
            parent[find(r)] = find(c)
            best[(r, c)] = float(sims[r - start, c])
    members: dict[int, list[int]] = {}
    for i in {i for pair in best for i in pair}:
        members.setdefault(find(i), []).append(i)
    for rows_ in members.values():
        inside = [s for (a, b), s in best.items() if find(a) == find(rows_[0])]
        groups.append(
            DuplicateGroup("near", sorted(paths[int(ids[i])] for i in rows_), min(inside))
        )
    return groups
