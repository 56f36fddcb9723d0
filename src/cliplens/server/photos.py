"""What the server searches: the catalog of `cliplens index`, or a `build-index` folder.

Both give photos integer ids (catalog file ids, or the index's row numbers), and every
route reads files only through those ids. Methods run in the worker thread that holds
the model lock.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import numpy as np

from cliplens.catalog.db import FileRow
from cliplens.server.service import ApiError
from cliplens.tasks.search import Hit


class CatalogPhotos:
    """The photo catalog (SQLite and its vector cache), read-only."""

    kind = "catalog"

    def __init__(self, service: Any) -> None:
        self.service = service

    def available(self) -> bool:
        return self.service.db.exists()

    def catalog(self):
        cat = self.service.catalog()
        if cat is None:
            db = self.service.db
            raise ApiError(404, "no_catalog", f"no catalog at {db}; run 'cliplens index "
                           "FOLDER' first, or serve with --db or --index")  # fmt: skip
        return cat

    def _row(self, file_id: int) -> FileRow:
        row = self.catalog().file(file_id)
        if row is None:
            raise ApiError(404, "unknown_id", f"no file with id {file_id} in the catalog")
        return row

    def path_of(self, file_id: int) -> str:
        return self._row(file_id).path

    def servable(self, file_id: int) -> str:
        """The path of a file the image routes may open: one the indexer read as an image
        (a failed one, such as a link to a text file, is never opened again)."""
        row = self._row(file_id)
        if row.status != "ok":
            why = f"photo {file_id} could not be indexed as an image, so it is not served"
            raise ApiError(404, "not_served", f"{why}; 'cliplens index' reports what failed")
        return row.path

    def embedding(self, file_id: int) -> np.ndarray:
        ref = self.service.ref
        vec = self.catalog().embedding_of(self.path_of(file_id), ref.info.model_id)
        if vec is None:
            raise ApiError(404, "not_embedded", f"file {file_id} has no embedding by "
                           f"{ref.name}; run 'cliplens index' with this model")  # fmt: skip
        return vec / np.linalg.norm(vec)

    def search_many(self, queries: np.ndarray, n: int) -> list[list[Hit]]:
        from cliplens.tasks.search import search_many

        return search_many(self.catalog(), self.service.ref, queries, n)

    def search(self, query: np.ndarray, n: int, exclude: int | None = None) -> list[Hit]:
        from cliplens.tasks.search import search

        skip = {self.path_of(exclude)} if exclude is not None else None
        return search(self.catalog(), self.service.ref, query, n, exclude=skip)

    def models(self) -> list[tuple[str, int, int]]:
        cat = self.service.catalog()
        return cat.models() if cat else []


class IndexPhotos:
    """A faiss index written by `cliplens build-index` (memory-mapped), with its row -> path
    table. Paths may be object-store URIs, read through fsspec.

    A new build of the folder (`build-index` again, or `--update`) is picked up without a
    restart: at most every `recheck_s` seconds, a changed index.json makes the next request
    open the folder again. Until the new build is complete, and if it holds another model's
    vectors, the index already open keeps serving."""

    kind = "index"
    recheck_s = 1.0

    def __init__(self, service: Any, built: Any) -> None:
        self.service, self._built = service, built
        self._model_checked = False
        self._stamp = self._meta_stamp()
        self._checked = time.monotonic()
        self._reload_lock = threading.Lock()

    def _meta_stamp(self) -> tuple[int, int] | None:
        from cliplens.index.build import META_FILE

        try:
            st = (self._built.folder / META_FILE).stat()
        except OSError:
            return None
        return st.st_mtime_ns, st.st_ino

    @property
    def built(self) -> Any:
        """The open index, first opened again if the folder holds a newer complete build."""
        if time.monotonic() - self._checked < self.recheck_s:
            return self._built
        with self._reload_lock:
            self._checked = time.monotonic()
            stamp = self._meta_stamp()
            if stamp is not None and stamp != self._stamp:
                from cliplens.errors import ClipLensError
                from cliplens.index.build import open_built_index

                try:
                    fresh = open_built_index(self._built.folder)
                except ClipLensError:
                    return self._built  # caught mid-write: try again later
                if fresh.model_id == self._built.model_id:
                    self._built, self._stamp = fresh, stamp
        return self._built

    def available(self) -> bool:
        return True

    def check_model(self) -> None:
        """Refuse to search with a model other than the index's (loads the model's info)."""
        if not self._model_checked:
            self.built.require_model(self.service.ref)
            self._model_checked = True

    def path_of(self, row: int) -> str:
        built = self.built
        path = built.path(row)
        if path is None:
            raise ApiError(404, "unknown_id", f"no photo with id {row} in the index "
                           f"(ids run from 0 to {len(built) - 1})")  # fmt: skip
        return path

    def servable(self, row: int) -> str:
        """The row's path: a build-index folder keeps no failed rows (the image routes
        still check the file itself)."""
        return self.path_of(row)

    def embedding(self, row: int) -> np.ndarray:
        self.path_of(row)
        self.check_model()
        vec = self.built.vector(row)
        return vec / np.linalg.norm(vec)

    def search_many(self, queries: np.ndarray, n: int) -> list[list[Hit]]:
        self.check_model()
        built = self.built
        return [[Hit(built.path(r), s, r) for r, s in found]
                for found in built.search_rows(queries, n)]  # fmt: skip

    def search(self, query: np.ndarray, n: int, exclude: int | None = None) -> list[Hit]:
        self.check_model()
        built = self.built
        found = built.search_rows(query, n + (exclude is not None))[0]
        return [Hit(built.path(r), s, r) for r, s in found if r != exclude][:n]

    def models(self) -> list[tuple[str, int, int]]:
        built = self.built
        return [(built.model_id, built.index.d, len(built))]
