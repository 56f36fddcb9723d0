"""Search what holds photo vectors: text, image and weighted queries; similar photos;
duplicates.

Every search takes a `Searchable` (searchable.py): the catalog of `cliplens index`, or a
`cliplens build-index` folder, and the `Encoder` of the query's model.

Query syntax (as rclip's): terms joined by + and -, each a text or an image path, with an
optional weight: `2:sunset + ./beach.jpg - people`. A term is an image when it names an
existing file or starts with ./, ../, / or ~.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np

from cliplens.catalog.db import Catalog, resolve_folders
from cliplens.catalog.vectors import load_vectors
from cliplens.errors import InvalidInputError
from cliplens.models.encoder import Encoder
from cliplens.searchable import Hit, Searchable

if TYPE_CHECKING:
    from cliplens.images import ImageSource
    from cliplens.models.ref import ModelRef

__all__ = [
    "DuplicateGroup",
    "Hit",
    "Term",
    "duplicates",
    "parse_query",
    "query_vector",
    "search",
    "search_many",
    "similar",
    "weighted_sum",
]

MAX_WEIGHT = 100.0  # a term's weight, either sign: beyond it one term drowns the rest anyway
_WEIGHT = re.compile(r"^\s*([-+]?\d+(?:\.\d+)?)\s*:(.+)$")


@dataclass(frozen=True)
class Term:
    """One weighted term of a query: a text or an image path."""

    weight: float
    text: str | None = None
    image: str | None = None


def _is_image_term(term: str) -> bool:
    if term.startswith(("./", "../", "/", "~")):
        return True
    try:
        return Path(term).is_file()
    except (OSError, ValueError):  # too long for a file name, or a NUL in it: it is text
        return False


def parse_query(query: str, images: bool = True) -> list[Term]:
    """`2:sunset + ./beach.jpg - people` -> weighted text and image terms. With
    `images=False` every term is text (no file is looked at: the server's queries).

    Why: a bad query fails here, before any model loads.

    >>> import cliplens
    >>> terms = cliplens.parse_query("2:sunset - people")
    >>> [(t.weight, t.text) for t in terms]  # [(2.0, 'sunset'), (-1.0, 'people')]
    """
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
    encoder: Encoder,
    terms: list[Term],
    searched: Searchable | None = None,
    images: Sequence[tuple[ImageSource, float]] = (),
) -> np.ndarray:
    """Weighted sum of the terms' embeddings, normalised. Images whose vectors `searched`
    holds are not encoded again; `images` adds weighted images already open (an upload),
    encoded after the terms.

    Why: one query vector for the CLI's terms and the server's uploads alike.

    >>> import cliplens
    >>> from cliplens.tasks.search import query_vector
    >>> vec = query_vector(cliplens.load_model("offline"), cliplens.parse_query("sunset - people"))
    """
    vectors, weights = [], []
    texts = [t for t in terms if t.text is not None]
    if texts:
        for t, v in zip(texts, encoder.encode_texts([t.text for t in texts]), strict=True):
            vectors.append(v)
            weights.append(t.weight)
    for t in terms:
        if t.image is not None:
            model_id = encoder.info.model_id
            v = searched.stored_vector(t.image, model_id) if searched is not None else None
            if v is None:
                v = encoder.encode_images([t.image])[0]
            vectors.append(v)
            weights.append(t.weight)
    if images:
        vectors.extend(encoder.encode_images([image for image, _ in images]))
        weights.extend(weight for _, weight in images)
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
    searched: Searchable,
    encoder: Encoder,
    query: str | np.ndarray,
    n: int = 10,
    folders: list[str | os.PathLike[str]] | None = None,
    exclude: str | None = None,
    exact: bool = False,
    min_score: float | None = None,
    offset: int = 0,
    each_moment: bool = False,
) -> list[Hit]:
    """The n best matches for a query string (or a ready query vector), best first.

    Why: one call for text, image and weighted queries over the catalog or a built index;
    `folders` keeps photos under them, `exclude` leaves out one path, `exact` skips an
    approximate index. `min_score` and `offset` page through the results: the same hits
    as one long list cut at `min_score`, then sliced from `offset` (`page`). A video is
    one hit at its best moment (`Hit.time`, its next best in `Hit.moments`), or with
    `each_moment` one hit per moment.

    >>> import cliplens
    >>> model = cliplens.load_model("offline")
    >>> cliplens.search(cliplens.open_catalog(readonly=True), model, "2:sunset - people")
    """
    if isinstance(query, np.ndarray):
        vec = query
    else:
        vec = query_vector(encoder, parse_query(query), searched)
    model_id = encoder.info.model_id
    hits = searched.search(
        vec, n + offset, model_id, exclude, folders, exact=exact, each_moment=each_moment
    )
    return page(hits, n, offset, min_score)


def page(hits: list[Hit], n: int, offset: int = 0, min_score: float | None = None) -> list[Hit]:
    """Hits (best first) cut at `min_score`, then `n` of them from `offset`: a fixed page of
    one long list, whatever the cut-off."""
    if offset < 0 or n < 1:
        raise InvalidInputError(f"offset {offset} and n {n}: give offset >= 0 and n >= 1")
    if min_score is not None:
        hits = [h for h in hits if h.score >= min_score]
    return hits[offset : offset + n]


def search_many(
    searched: Searchable,
    encoder: Encoder,
    queries: np.ndarray,
    n: int = 10,
    each_moment: bool = False,
) -> list[list[Hit]]:
    """`search` for a batch of query vectors (B, D) over all photos, in one pass
    (`each_moment` as there).

    Why: concurrent queries (the server's) cost about one.

    >>> import cliplens
    >>> model, photos = cliplens.load_model("offline"), cliplens.open_catalog(readonly=True)
    >>> cliplens.search_many(photos, model, model.encode_texts(["a cat", "a boat"]), n=5)
    """
    model_id = encoder.info.model_id
    return searched.search_many(np.atleast_2d(queries), n, model_id, each_moment=each_moment)


def similar(
    searched: Searchable,
    encoder: Encoder,
    photo: str | os.PathLike[str] | int,
    n: int = 10,
    folders: list[str | os.PathLike[str]] | None = None,
    min_score: float | None = None,
    offset: int = 0,
) -> list[Hit]:
    """Photos most like `photo` (itself excluded), using its stored vector when held.
    `photo` is a path, or the id of a photo `searched` holds (its `Hit.id`: the stored
    vector is then required, UnknownIdError or NotEmbeddedError).

    Why: "more like this" for any photo, indexed or not.

    >>> import cliplens
    >>> model = cliplens.load_model("offline")
    >>> cliplens.similar(cliplens.open_catalog(readonly=True), model, "beach.jpg", n=5)
    """
    paging = {"min_score": min_score, "offset": offset}
    if isinstance(photo, int):
        vec = searched.vector(photo, encoder.info.model_id)
        exclude = searched.path_of(photo)
        return search(searched, encoder, vec, n, folders, exclude=exclude, **paging)
    path = str(Path(photo).expanduser().resolve())
    vec = searched.stored_vector(path, encoder.info.model_id)
    if vec is None:
        vec = encoder.encode_images([path])[0]
    unit = vec / np.linalg.norm(vec)
    return search(searched, encoder, unit, n, folders, exclude=path, **paging)


def fast_text_due(ref: ModelRef) -> bool:
    """Whether to export `ref`'s text tower now: once per model, while it is loaded anyway
    (a command encoded with it), so that later text queries need neither torch nor the
    full model."""
    return ref.loaded and ref.needs_fast_text()


def export_fast_text(ref: ModelRef) -> str | None:
    """Export `ref`'s text tower for torch-free queries (the loaded network is dropped
    first: the export loads an fp32 copy). None when it is ready, else why not: a failed
    export must not fail the command that ran, whose queries then load the full model."""
    ref.unload()
    try:
        ready = ref.prepare_fast_text()
        reason = "its export did not reproduce the model"
    except Exception as e:  # an exporter failure must not fail the command that ran
        ready, reason = False, f"{type(e).__name__}: {e}"
    return None if ready else reason


DuplicateKind = Literal["exact", "near"]


@dataclass
class DuplicateGroup:
    """Photos that are copies: the same bytes ("exact"), or embeddings above a threshold
    ("near"); `score` is the lowest similarity inside the group (1.0 for exact copies).
    A video's moment in a group has its time in `times` (None for a photo or a whole file).

    >>> import cliplens
    >>> groups = cliplens.duplicates(cliplens.open_catalog(readonly=True), "MODEL_ID", ["."])
    >>> [g.to_dict() for g in groups]  # doctest: +SKIP
    """

    kind: DuplicateKind
    paths: list[str]
    score: float
    times: list[float | None] | None = None

    def to_dict(self) -> dict[str, object]:
        out: dict[str, object] = {"kind": self.kind, "score": round(self.score, 6)}
        out["paths"] = self.paths
        if self.times and any(t is not None for t in self.times):
            out["times"] = [None if t is None else round(t, 3) for t in self.times]
        return out

    def members(self) -> list[tuple[str, float | None]]:
        """(path, time) of each member: time None for a photo or a whole file."""
        return list(zip(self.paths, self.times or [None] * len(self.paths), strict=True))


def duplicates(
    catalog: Catalog,
    model_id: str,
    folders: list[str | os.PathLike[str]],
    threshold: float = 0.95,
    block: int = 4096,
) -> list[DuplicateGroup]:
    """Exact copies (same content hash) and near-duplicates (cosine >= threshold), as groups;
    a video's moments take part beside the photos (never grouped with their own video).

    Why: a catalog knows both the bytes (hashes) and the looks (embeddings) of its photos,
    so one pass finds copies of either kind (a build-index folder keeps no hashes).

    >>> import cliplens
    >>> model_id = cliplens.load_model("offline").info.model_id
    >>> cliplens.duplicates(cliplens.open_catalog(readonly=True), model_id, ["."])
    """
    from cliplens.catalog.frames import moment_times

    resolved = resolve_folders(folders)
    groups = [DuplicateGroup("exact", g, 1.0) for g in catalog.duplicate_hashes(resolved)]
    index = load_vectors(catalog, model_id)
    mask = np.isin(index.files, catalog.ids_under(resolved))
    rows, files, m = index.ids[mask], index.files[mask], index.matrix[mask]
    paths = catalog.paths(files)
    exact_of = {p: i for i, g in enumerate(groups) for p in g.paths}
    pairs = _near_pairs(m, files, threshold, block)
    pairs = {
        (r, c): s
        for (r, c), s in pairs.items()
        if not (
            paths[int(files[r])] in exact_of
            and exact_of.get(paths[int(files[c])]) == exact_of[paths[int(files[r])]]
        )  # already an exact group
    }
    times = moment_times(catalog, rows[sorted({i for pair in pairs for i in pair})].tolist())
    for members, score in _components(pairs):
        found = sorted((paths[int(files[i])], times.get(int(rows[i]))) for i in members)
        groups.append(DuplicateGroup("near", [p for p, _ in found], score, [t for _, t in found]))
    return groups


def _near_pairs(
    m: np.ndarray, files: np.ndarray, threshold: float, block: int
) -> dict[tuple[int, int], float]:
    """(row, col) -> cosine of every pair of rows of different files at >= threshold."""
    pairs: dict[tuple[int, int], float] = {}
    for start in range(0, len(m), block):
        sims = m[start : start + block] @ m.T
        rows, cols = np.nonzero(sims >= threshold)
        for r, c in zip(rows + start, cols, strict=True):
            if c > r and files[r] != files[c]:
                pairs[(int(r), int(c))] = float(sims[r - start, c])
    return pairs


def _components(pairs: dict[tuple[int, int], float]) -> list[tuple[list[int], float]]:
    """The connected groups of the pairs, each with its lowest similarity."""
    parent: dict[int, int] = {}

    def find(i: int) -> int:
        parent.setdefault(i, i)
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for a, b in pairs:
        parent[find(a)] = find(b)
    members: dict[int, list[int]] = {}
    for i in {i for pair in pairs for i in pair}:
        members.setdefault(find(i), []).append(i)
    lowest: dict[int, float] = {}
    for (a, _), s in pairs.items():
        root = find(a)
        lowest[root] = min(lowest.get(root, 1.0), s)
    return [(sorted(rows), lowest[root]) for root, rows in members.items()]
