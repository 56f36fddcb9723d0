"""What search reads: the `Searchable` protocol, its `Hit`, and the errors of its ids.

Two things hold searchable vectors: the catalog of `cliplens index` (`Catalog`, exact or
through its IVF index) and a `cliplens build-index` folder (`BuiltIndex`). Both give
photos integer ids (catalog file ids, or the index's row numbers) and answer the same
calls, so the search tasks, the server and the web page are written once for either.

Vectors belong to a model: every call that reads them names the model id of the query,
and a holder without that model's vectors says so (a built index holds one model's,
a catalog may hold several). Torch-free, and numpy only for the types.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, NamedTuple, Protocol, runtime_checkable

from cliplens.errors import ClipLensError, InvalidInputError

if TYPE_CHECKING:
    import numpy as np

#: what holds the vectors: the catalog of `cliplens index`, or a `build-index` folder
SearchableKind = Literal["catalog", "index"]


@dataclass(frozen=True)
class Hit:
    """One search result: a photo's path, its cosine similarity to the query, its id; for
    a video, the moment found (`time`, seconds from its start) and its best moments among
    those found, as (seconds, score), best first.

    >>> import cliplens
    >>> hits = cliplens.search(cliplens.open_catalog(), cliplens.load_model("offline"), "a cat")
    >>> hits[0].path, hits[0].score, hits[0].time  # doctest: +SKIP
    """

    path: str
    score: float
    id: int | None = None  # the photo's id where it was found: catalog file id or index row
    time: float | None = None  # a video's moment, in seconds; None for a photo
    moments: tuple[tuple[float, float], ...] = ()

    def to_dict(self) -> dict[str, object]:
        out: dict[str, object] = {"path": self.path, "score": round(self.score, 6)}
        if self.time is not None:
            out["time"] = round(self.time, 3)
            out["moments"] = [{"time": round(t, 3), "score": round(s, 6)} for t, s in self.moments]
        return out


class StoredModel(NamedTuple):
    """A model whose vectors are held, with their dimension and how many there are.

    >>> import cliplens
    >>> models: list[cliplens.StoredModel] = cliplens.open_catalog(readonly=True).models()
    >>> [(m.model_id, m.count) for m in models]  # doctest: +SKIP
    """

    model_id: str
    dim: int
    count: int


class UnknownIdError(InvalidInputError):
    """No photo has this id."""


class NotServedError(ClipLensError):
    """The photo is known but is not to be opened (it could not be read as an image)."""


class NotEmbeddedError(ClipLensError):
    """The photo has no vector by the asked model."""


@runtime_checkable
class Searchable(Protocol):
    """Vectors of photos, searchable by a query vector, and the photos by id.

    Why: one search (`cliplens.search`, `similar`, the server) for the catalog and for a
    build-index folder alike.

    >>> import cliplens
    >>> photos: cliplens.Searchable = cliplens.open_catalog(readonly=True)  # or an index
    >>> cliplens.search(photos, cliplens.load_model("offline"), "a cat")
    """

    @property
    def kind(self) -> SearchableKind:
        """What holds the vectors (and so what brings them up to date)."""
        ...

    def models(self) -> list[StoredModel]:
        """The models whose vectors are held."""
        ...

    def count(self, model_id: str) -> int:
        """How many photos have a vector by the model (what a search runs over)."""
        ...

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
        """The n photos most like `query` (a unit vector of the model), best first;
        `exclude` leaves out a path, `within` keeps photos under these folders, `exact`
        compares with every vector even where an approximate index exists. A video is
        one hit at its best moment, or with `each_moment` one hit per moment found."""
        ...

    def search_many(
        self, queries: np.ndarray, n: int, model_id: str, each_moment: bool = False
    ) -> list[list[Hit]]:
        """`search` for each row of `queries` (B, D), over all photos, in one pass."""
        ...

    def vector(self, photo_id: int, model_id: str) -> np.ndarray:
        """The photo's stored vector by the model, unit length (UnknownIdError,
        NotEmbeddedError)."""
        ...

    def stored_vector(self, path: str, model_id: str) -> np.ndarray | None:
        """The stored vector of a photo named by its path, if held (a query's image term
        then needs no encoding)."""
        ...

    def path_of(self, photo_id: int) -> str | None:
        """The photo's path (a local path or an object-store URI), or None: no such id."""
        ...

    def servable(self, photo_id: int) -> str:
        """The path of a photo that may be opened for serving (UnknownIdError,
        NotServedError); the file itself is still checked when it is opened."""
        ...
