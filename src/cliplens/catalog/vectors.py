"""Vector search over a catalog's embeddings: exact, and approximate for large catalogs.

The matrix of one model is cached beside the catalog as float32 .npy files named by the
catalog's generation, memory-mapped when fresh and rebuilt (atomically) when the
catalog changed; a process loads it once and then answers each query with one
matrix product. Above CLIPLENS_ANN_MIN vectors a faiss IVF index (catalog/ivf.py) answers
instead, kept in step with the catalog.

`CatalogSearch` is the catalog's side of the `Searchable` protocol (searchable.py):
`Catalog` inherits it, so a catalog is searched like a build-index folder.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Literal, cast

import numpy as np

from cliplens.catalog import frames
from cliplens.catalog import ivf as ann_mod
from cliplens.searchable import (
    Hit,
    NotEmbeddedError,
    NotServedError,
    SearchableKind,
    StoredModel,
    UnknownIdError,
)
from cliplens.store.files import write_atomic_binary

if TYPE_CHECKING:
    from cliplens.catalog.db import Catalog

#: "auto" uses (and updates) an existing ANN index; "train" also builds one when missing
#: or outgrown (what `cliplens index` does); "off" searches exactly
AnnMode = Literal["auto", "train", "off"]


class CatalogVectors:
    """ids (N,) int64 row ids, sorted: a photo's file id, or a video moment's
    (catalog/frames.py); matrix (N, D) rows L2-normalised (float16 or float32)."""

    def __init__(
        self,
        ids: np.ndarray,
        matrix: np.ndarray,
        keys: np.ndarray | None = None,
        ann: ann_mod.IvfVectors | None = None,
    ) -> None:
        self.ids = ids
        self.keys = keys if keys is not None else np.zeros(len(ids), np.int64)
        self.ann = ann
        self._source = matrix
        self._matrix: np.ndarray | None = matrix if matrix.dtype == np.float32 else None
        self.moments = frames.has_moments(ids)  # whether some rows are video moments
        self.files = frames.file_of(ids) if self.moments else ids  # each row's file id

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def matrix(self) -> np.ndarray:
        """float32 rows, converted once on first use (ANN-only processes never pay for it)."""
        if self._matrix is None:
            self._matrix = np.asarray(self._source, dtype=np.float32)
        return self._matrix

    def search(
        self,
        query: np.ndarray,
        k: int,
        allowed: np.ndarray | None = None,
        exact: bool = False,
    ) -> list[tuple[int, float]]:
        """The k rows most similar to `query` (cosine), as (row id, score), optionally among
        the rows of allowed file ids.

        Uses the ANN index when there is one, unless `exact`; a folder filter that keeps
        under half the rows is searched exactly over those rows.
        """
        if len(self.ids) == 0 or k <= 0:
            return []
        if self.ann is not None and not exact:
            if allowed is None:
                return self.ann.search(query, k)
            if len(allowed) >= len(self.ids) // 2:
                ok = set(np.asarray(allowed).tolist())
                found = self.ann.search(query, 4 * k)
                files = frames.file_of(np.asarray([h[0] for h in found], np.int64))
                hits = [h for h, f in zip(found, files.tolist(), strict=True) if f in ok]
                if len(hits) >= k:
                    return hits[:k]
        return self._exact(query, k, allowed)

    def search_many(self, queries: np.ndarray, k: int) -> list[list[tuple[int, float]]]:
        """`search` for each row of queries (B, D), over all rows. Exact search reads the
        matrix once for the whole batch (one matrix product), which is what makes batches
        of concurrent queries cheaper than one at a time."""
        if len(self.ids) == 0 or k <= 0:
            return [[] for _ in queries]
        if self.ann is not None:
            return [self.ann.search(q, k) for q in queries]
        scores = self.matrix @ np.asarray(queries, np.float32).T  # (N, B)
        k = min(k, len(scores))
        top = np.argpartition(-scores, k - 1, axis=0)[:k]  # (k, B)
        out = []
        for b in range(scores.shape[1]):
            rows = top[:, b]
            rows = rows[np.argsort(-scores[rows, b], kind="stable")]
            out.append([(int(self.ids[i]), float(scores[i, b])) for i in rows])
        return out

    def _exact(
        self, query: np.ndarray, k: int, allowed: np.ndarray | None
    ) -> list[tuple[int, float]]:
        ids, matrix = self.ids, self.matrix
        if allowed is not None:
            keep = np.isin(self.files, allowed)
            ids, matrix = ids[keep], matrix[keep]
        if len(ids) == 0:
            return []
        scores = matrix @ query.astype(np.float32)
        k = min(k, len(scores))
        top = np.argpartition(-scores, k - 1)[:k]
        top = top[np.argsort(-scores[top], kind="stable")]
        return [(int(ids[i]), float(scores[i])) for i in top]


_loaded: dict[tuple[str, str, int], CatalogVectors] = {}


def cache_dir(catalog: Catalog) -> Path:
    return catalog.path.with_name(catalog.path.name + ".vectors")


def _key(model_id: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", model_id)


def load_vectors(catalog: Catalog, model_id: str, ann: AnnMode = "auto") -> CatalogVectors:
    """The model's vectors, from this process's memory, the .npy cache, or the catalog.

    `ann`: see `AnnMode`.
    """
    gen = catalog.generation
    mem_key = (str(catalog.path), model_id, gen)
    index = _loaded.get(mem_key)
    if index is None:
        index = _load_exact(catalog, model_id, gen)
        _loaded.clear()  # keep one matrix per process: they can be large
        _loaded[mem_key] = index
    if ann != "off" and index.ann is None and len(index) >= ann_mod.ann_min():
        train = ann == "train"
        folder, key = cache_dir(catalog), _key(model_id)
        index.ann = ann_mod.refresh(folder, key, index.ids, index.keys, index._source, train)
    return index


def _load_exact(catalog: Catalog, model_id: str, gen: int) -> CatalogVectors:
    folder = cache_dir(catalog)
    stem = folder / f"{_key(model_id)}-g{gen}"
    files = {part: stem.with_suffix(f".{part}.npy") for part in ("ids", "keys", "f32")}
    if all(p.exists() for p in files.values()):
        ids, keys = np.load(files["ids"]), np.load(files["keys"])
        matrix = np.load(files["f32"], mmap_mode="r")
    else:
        ids, keys, matrix16 = catalog.vectors(model_id)
        # float32 on disk: twice float16's size, but numpy converts float16 at only about
        # 65 M values/s (0.8 s for 100k x 512), more than the whole query may take
        matrix = matrix16.astype(np.float32)
        _write_cache(folder, _key(model_id), files, {"ids": ids, "keys": keys, "f32": matrix})
    return CatalogVectors(ids, matrix, keys)


def _write_cache(
    folder: Path, key: str, files: dict[str, Path], data: dict[str, np.ndarray]
) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        for part in ("f32", "keys", "ids"):  # ids last: their presence marks a whole set
            write_atomic_binary(files[part], lambda f, part=part: np.save(f, data[part]))
        for old in folder.glob(f"{key}-g*.npy"):
            if old not in files.values():
                old.unlink(missing_ok=True)
    except OSError:
        pass  # a read-only or full disk only costs rebuilding from the catalog next time


def refresh_ann(catalog: Catalog, model_id: str, changed: bool) -> bool:
    """After indexing: build or update the ANN index when the catalog is large enough.
    Returns True when an ANN index is current. Cheap when nothing changed."""
    index_path, _ = ann_mod.paths(cache_dir(catalog), _key(model_id))
    if not changed and index_path.exists():
        return True
    if catalog.count_embedded(model_id) < ann_mod.ann_min():
        return False
    return load_vectors(catalog, model_id, ann="train").ann is not None


MOMENTS = 3  # a video hit's best moments, listed with it


def _files_in(rows: list[tuple[int, float]]) -> int:
    return len(set(frames.file_of(np.asarray([r for r, _ in rows], np.int64)).tolist()))


def _enough(
    search: Callable[[int], list[tuple[int, float]]], want: int, vectors: CatalogVectors
) -> list[tuple[int, float]]:
    """The rows `search(k)` finds, with k grown until they hold `want` files (or all rows):
    without videos, k = want at once."""
    k = want * 4 if vectors.moments else want  # and rows for a video's other moments
    while True:
        found = search(k)
        if not vectors.moments or len(found) < k or _files_in(found) >= want:
            return found
        k *= 4


class CatalogSearch:
    """The catalog's side of the `Searchable` protocol; `Catalog` inherits it.

    Ids are the catalog's file ids. Only files the indexer read as images have vectors,
    and only those are served."""

    kind: SearchableKind = "catalog"

    def _catalog(self) -> Catalog:
        return cast("Catalog", self)

    def models(self) -> list[StoredModel]:
        """(model_id, dim, number of embeddings) for every model in the catalog."""
        rows = self._catalog().db.execute(
            "SELECT m.model_id, m.dim, COUNT(e.hash) FROM models m "
            "LEFT JOIN embeddings e ON e.model = m.id GROUP BY m.id ORDER BY m.model_id"
        )
        return [StoredModel(*row) for row in rows]

    def count(self, model_id: str) -> int:
        return self._catalog().count_embedded(model_id)

    def search(
        self,
        query: np.ndarray,
        n: int,
        model_id: str,
        exclude: str | None = None,
        within: Sequence[str | os.PathLike[str]] | None = None,
        exact: bool = False,
        each_moment: bool = False,
    ) -> list[Hit]:
        """Large catalogs are searched through their ANN index unless `exact`; `within`
        filters only when it excludes something. A video is one hit, at its best moment,
        with its best moments among those found (`Hit.moments`); with `each_moment`, each
        of its moments is a hit of its own."""
        catalog = self._catalog()
        vectors = load_vectors(catalog, model_id, ann="off" if exact else "auto")
        allowed = catalog.ids_within(within) if within else None

        def search(k: int) -> list[tuple[int, float]]:
            return vectors.search(query, k, allowed, exact=exact)

        if each_moment:
            hits = self._each_row(search, n, exclude)
        else:
            found = _enough(search, n + (exclude is not None), vectors)
            hits = [h for h in self._grouped([found])[0] if h.path != exclude]
        return hits[:n]

    def _each_row(
        self, search: Callable[[int], list[tuple[int, float]]], n: int, exclude: str | None
    ) -> list[Hit]:
        """The best `n` rows as hits, a video's moments each their own, less the rows of
        `exclude` (all of a video's: rows are fetched until n others are found)."""
        k = n + (exclude is not None)
        while True:
            found = search(k)
            hits = [h for h in self._grouped([found], each_moment=True)[0] if h.path != exclude]
            if len(hits) >= n or len(found) < k:
                return hits
            k *= 4

    def search_many(
        self, queries: np.ndarray, n: int, model_id: str, each_moment: bool = False
    ) -> list[list[Hit]]:
        vectors = load_vectors(self._catalog(), model_id)
        queries = np.atleast_2d(queries)
        found = vectors.search_many(queries, n)
        if each_moment:
            return self._grouped(found, each_moment=True)
        for b, rows in enumerate(found):  # a query whose moments fill its rows: more rows
            if vectors.moments and len(rows) == n and _files_in(rows) < n:
                found[b] = _enough(lambda k, q=queries[b]: vectors.search(q, k), n, vectors)
        return [hits[:n] for hits in self._grouped(found)]

    def _grouped(
        self, found: list[list[tuple[int, float]]], each_moment: bool = False
    ) -> list[list[Hit]]:
        """Each list of (row id, score), best first, as hits: one per file, a video at its
        best moment with its best `MOMENTS` found; or with `each_moment`, one per row (a
        moment's hit lists itself as its one moment)."""
        catalog = self._catalog()
        every = [row for rows in found for row, _ in rows]
        paths = catalog.paths(set(frames.file_of(np.asarray(every, np.int64)).tolist()))
        times = frames.moment_times(catalog, every)
        out = []
        for rows in found:
            files = frames.file_of(np.asarray([r for r, _ in rows], np.int64)).tolist()
            hits: dict[int, Hit] = {}
            for (row, score), file_id in zip(rows, files, strict=True):
                if file_id not in paths:
                    continue
                t = times.get(row)
                key = row if each_moment else file_id  # a hit per row, or per file
                hit = hits.get(key)
                if hit is None:
                    moment = ((t, score),) if t is not None else ()
                    hits[key] = Hit(paths[file_id], score, file_id, t, moment)
                elif t is not None and len(hit.moments) < MOMENTS:
                    hits[file_id] = replace(hit, moments=(*hit.moments, (t, score)))
            out.append(list(hits.values()))
        return out

    def path_of(self, photo_id: int) -> str | None:
        row = self._catalog().file(photo_id)
        return row.path if row else None

    def _known(self, photo_id: int) -> str:
        path = self.path_of(photo_id)
        if path is None:
            raise UnknownIdError(f"no file with id {photo_id} in the catalog")
        return path

    def servable(self, photo_id: int) -> str:
        """A file the indexer read as an image (a failed one, such as a link to a text
        file, is never opened again)."""
        row = self._catalog().file(photo_id)
        if row is None:
            raise UnknownIdError(f"no file with id {photo_id} in the catalog")
        if row.status != "ok":
            why = f"photo {photo_id} could not be indexed as an image, so it is not served"
            raise NotServedError(f"{why}; 'cliplens index' reports what failed")
        return row.path

    def vector(self, photo_id: int, model_id: str) -> np.ndarray:
        vec = self.stored_vector(self._known(photo_id), model_id)
        if vec is None:
            raise NotEmbeddedError(
                f"file {photo_id} has no embedding by {model_id}; "
                "run 'cliplens index' with this model"
            )
        return vec / np.linalg.norm(vec)

    def stored_vector(self, path: str, model_id: str) -> np.ndarray | None:
        return self._catalog().embedding_of(path, model_id)
