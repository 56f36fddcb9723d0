"""A finished `cliplens build-index` folder: what is in it, and `open_built_index`.

The folder holds `index.faiss` (the vectors, memory-mapped when opened), `paths.arrow`
(row number -> path, in the order the vectors were added) and `index.json` (`IndexMeta`:
the model, how the index was built and measured), written last: a folder without it is
incomplete. `BuiltIndex` is searchable like the catalog (the `Searchable` protocol).

An update (`build-index --update`) writes its three files beside the old ones
(`next-index.faiss`...), then its commit record (`update.json`), then renames them into
place, index.json last: killed before the record, the folder holds the old build and the
new files are discarded by the next update; killed after it, the first open or update
finishes the renames (`finish_update`). The folder holds one build or the other.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal, get_args

import numpy as np

from cliplens.errors import ClipLensError, InvalidInputError
from cliplens.paths import from_text
from cliplens.searchable import Hit, SearchableKind, StoredModel, UnknownIdError
from cliplens.store.files import write_atomic

#: flat: exact inner product; hnsw: a graph over the full vectors; ivfpq: inverted lists
#: of product-quantised codes
IndexKind = Literal["flat", "hnsw", "ivfpq"]
#: how an ivfpq index re-scores its best candidates: not at all, or with scalar-quantised
#: vectors of D bytes (sq8) or 2D bytes (fp16) each
Refine = Literal["none", "sq8", "fp16"]
KINDS: tuple[IndexKind, ...] = get_args(IndexKind)
REFINES: tuple[Refine, ...] = get_args(Refine)

INDEX_FILE = "index.faiss"
META_FILE = "index.json"
PATHS_FILE = "paths.arrow"  # row number -> path, in the order vectors were added
REBUILD_GROWTH = 4  # an ivfpq index grown past this times its training vectors: rebuild
UPDATE_FILE = "update.json"  # an update's commit record: its next- files are complete
NEXT = "next-"  # an update's new files, named beside the ones they replace
_SWAPPED = (INDEX_FILE, PATHS_FILE, META_FILE)  # in this order: index.json last


@dataclass
class IndexReport:
    """How an index was built and how well it answers: build times, size, recall@10
    against exact search and the latency of one query.

    >>> import cliplens
    >>> report: cliplens.IndexReport = cliplens.build_index("SHARDS", "INDEX", kind="flat")
    >>> report.to_dict()  # what `cliplens build-index --format json` prints
    """

    kind: IndexKind
    n: int
    dim: int
    params: dict[str, Any]  # the plan's parameters (nlist, pq_m, nprobe...), as built
    train_s: float
    add_s: float
    index_bytes: int
    recall_at_10: float
    query_ms: float
    queries: int
    resumed_rows: int = 0  # vectors an interrupted build had added already

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class IndexMeta:
    """index.json: the model the vectors came from, what was built from, the report."""

    model_id: str
    report: IndexReport
    model: str | None = None  # the model's name as given to embed-dataset
    shards: str | None = None  # the embed-dataset folder it was built from
    trained_n: int | None = None  # vectors when it was trained (an update adds later ones)
    shards_added: dict[str, dict[str, int]] = field(default_factory=dict)  # manifest's
    synthetic: bool = False  # a benchmark's vectors, not a model's

    @property
    def trained_on(self) -> int:
        return self.report.n if self.trained_n is None else self.trained_n

    def needs_rebuild(self, report: IndexReport | None = None) -> bool:
        """Whether the index, as `report` says it is now (default: as built), holds over
        REBUILD_GROWTH times the vectors it was trained on: updates added so many that
        its trained partition fits them badly, and a new build gives the best recall.
        Flat and HNSW indexes train nothing, so they never need it."""
        report = report or self.report
        return report.kind == "ivfpq" and report.n > REBUILD_GROWTH * self.trained_on

    def to_json(self) -> str:
        """The file's layout: the report's fields at the top level, beside the others."""
        data: dict[str, Any] = {
            "shards": self.shards,
            "trained_n": self.trained_n,
            "shards_added": self.shards_added,
        }
        if self.synthetic:
            data["synthetic"] = True
        data |= {"model": self.model, "model_id": self.model_id, **self.report.to_dict()}
        return json.dumps(data, indent=1)

    @classmethod
    def from_json(cls, text: str) -> IndexMeta:
        data = json.loads(text)
        if not isinstance(data, dict) or "model_id" not in data:
            raise ValueError(f"{META_FILE} names no model_id")
        names = [f.name for f in fields(IndexReport)]
        missing = [n for n in names[:-1] if n not in data]
        if missing:
            raise ValueError(f"{META_FILE} lacks {', '.join(missing)}")
        report = IndexReport(**{n: data[n] for n in names if n in data})
        return cls(
            data["model_id"],
            report,
            data.get("model"),
            data.get("shards"),
            data.get("trained_n"),
            data.get("shards_added") or {},
            bool(data.get("synthetic")),
        )


class BuiltIndex:
    """A saved index with its row -> path table and the model its vectors came from.

    Why: a build-index folder is searched like the catalog (`cliplens.search`), by the
    server too, with its rows as photo ids.

    >>> import cliplens
    >>> built = cliplens.open_built_index("INDEX")
    >>> cliplens.search(built, cliplens.ModelRef(built.model), "a cat")  # its vectors' model

    Rows are the index's ids (0..n-1, in the order the shards were added). Paths are an
    Arrow array memory-mapped from the folder, not Python strings (about 100 bytes more
    each, and all in the process's own memory)."""

    kind: SearchableKind = "index"

    def __init__(self, index: Any, paths: Any, meta: IndexMeta, folder: Path) -> None:
        self.index, self.paths, self.meta, self.folder = index, paths, meta, folder
        self.model: str | None = meta.model
        self.model_id: str = meta.model_id
        self._starts = np.cumsum([0] + [len(c) for c in paths.chunks])  # row of each chunk
        self._direct_map = False
        self.stamp = meta_stamp(folder)

    def __len__(self) -> int:
        return int(self._starts[-1])

    def path_of(self, photo_id: int) -> str | None:
        if not 0 <= photo_id < len(self):
            return None
        k = int(np.searchsorted(self._starts, photo_id, side="right")) - 1
        return from_text(self.paths.chunk(k)[photo_id - int(self._starts[k])].as_py())

    def servable(self, photo_id: int) -> str:
        """The row's path: a build-index folder keeps no failed rows (the file itself is
        still checked when it is opened)."""
        path = self.path_of(photo_id)
        if path is None:
            raise UnknownIdError(
                f"no photo with id {photo_id} in the index (ids run from 0 to {len(self) - 1})"
            )
        return path

    def search_rows(self, queries: np.ndarray, k: int) -> list[list[tuple[int, float]]]:
        """(row, score) of the k best per query row, all queries in one faiss call."""
        q = np.ascontiguousarray(np.atleast_2d(queries), np.float32)
        scores, rows = self.index.search(q, min(k, len(self)))
        return [
            [(int(r), float(s)) for r, s in zip(found, got, strict=True) if r >= 0]
            for found, got in zip(rows, scores, strict=True)
        ]

    def _hits(self, found: list[tuple[int, float]]) -> list[Hit]:
        return [Hit(self.path_of(r) or "", s, r) for r, s in found]

    def search(
        self,
        query: np.ndarray,
        n: int,
        model_id: str,
        exclude: str | None = None,
        within: Sequence[str | os.PathLike[str]] | None = None,
        exact: bool = False,
        each_moment: bool = False,  # a built index holds no videos' moments: one row a hit
    ) -> list[Hit]:
        self.require_model(model_id)
        if within:
            raise InvalidInputError(
                "a build-index folder is searched whole; leave `folders` out, or search the catalog"
            )
        if exact and self.meta.report.kind != "flat":
            raise InvalidInputError(
                f"{self.folder} is an {self.meta.report.kind} index, "
                "searched as it was built; leave `exact` out"
            )
        found = self.search_rows(query, n + (exclude is not None))[0]
        return [h for h in self._hits(found) if h.path != exclude][:n]

    def search_many(
        self, queries: np.ndarray, n: int, model_id: str, each_moment: bool = False
    ) -> list[list[Hit]]:
        self.require_model(model_id)
        return [self._hits(found) for found in self.search_rows(queries, n)]

    def vector(self, photo_id: int, model_id: str) -> np.ndarray:
        """The row's vector as the index holds it, unit length: exact for flat and HNSW,
        the refine stage's (SQ8: within about 1%) for a refined IVF-PQ, and the PQ
        approximation for IVF-PQ without refine."""
        import faiss  # heavy: loaded only where an index is opened

        self.servable(photo_id)  # a known row
        self.require_model(model_id)
        try:
            vec = self.index.reconstruct(photo_id)
        except RuntimeError:
            if self._direct_map:
                raise
            faiss.extract_index_ivf(self.index).make_direct_map()  # row -> list, built once
            self._direct_map = True
            vec = self.index.reconstruct(photo_id)
        return vec / np.linalg.norm(vec)

    def stored_vector(self, path: str, model_id: str) -> np.ndarray | None:
        """None: the index looks rows up by number, not by path."""
        return None

    def models(self) -> list[StoredModel]:
        return [StoredModel(self.model_id, int(self.index.d), len(self))]

    def count(self, model_id: str) -> int:
        return len(self) if model_id == self.model_id else 0

    def require_model(self, model_id: str) -> None:
        """Refuse a query of a model other than the one the vectors came from."""
        if model_id != self.model_id:
            raise InvalidInputError(
                f"`index` {self.folder} holds vectors of {self.model_id}, not of {model_id}; "
                "leave `model` out or pass the model it was built with"
            )

    def reopened(self) -> BuiltIndex | None:
        """The folder opened again if it now holds another complete build of the same
        model's vectors (`build-index` again, or `--update`); None while it holds this
        one, an incomplete one (caught mid-write), or another model's."""
        stamp = meta_stamp(self.folder)
        if stamp is None or stamp == self.stamp:
            return None
        try:
            fresh = open_built_index(self.folder)
        except ClipLensError:
            return None
        return fresh if fresh.model_id == self.model_id else None


def meta_stamp(folder: Path) -> tuple[int, int] | None:
    """What tells one index.json from the next: (mtime, inode); None when there is none."""
    try:
        st = (folder / META_FILE).stat()
    except OSError:
        return None
    return st.st_mtime_ns, st.st_ino


def commit_update(folder: str | os.PathLike[str]) -> None:
    """Put an update's complete `next-` files in place: its commit record first (from
    here on the update is done, killed or not), then the renames (`finish_update`)."""
    folder = Path(folder)
    record = json.dumps({"files": [NEXT + name for name in _SWAPPED]})
    write_atomic(folder / UPDATE_FILE, lambda p: p.write_text(record))
    finish_update(folder)


def finish_update(folder: str | os.PathLike[str]) -> bool:
    """Finish the renames of an update whose commit record was written (a kill can land
    between them); True if there was one. Safe to run by several processes at once, and
    again after a kill: a file already renamed is skipped."""
    folder = Path(folder)
    if not (folder / UPDATE_FILE).exists():
        return False
    try:
        for name in _SWAPPED:
            _swap(folder / (NEXT + name), folder / name)
        (folder / UPDATE_FILE).unlink(missing_ok=True)
    except PermissionError as e:
        raise InvalidInputError(
            f"{folder}: an update was cut off after it was complete and cannot be finished "
            f"here ({e.strerror}); open it once with write access, or run "
            "'cliplens build-index --update' again"
        ) from None
    return True


def _swap(new: Path, old: Path) -> None:
    """One rename of an update (gone already if another process or an earlier try did it)."""
    with contextlib.suppress(FileNotFoundError):
        new.replace(old)


def discard_update(folder: str | os.PathLike[str]) -> None:
    """Remove what an update left that was never committed (its `next-` files), or that a
    new build makes stale (a commit record, then its files)."""
    folder = Path(folder)
    (folder / UPDATE_FILE).unlink(missing_ok=True)
    for name in _SWAPPED:
        (folder / (NEXT + name)).unlink(missing_ok=True)


def open_built_index(folder: str | os.PathLike[str], mmap: bool = True) -> BuiltIndex:
    """An index written by `cliplens build-index`, ready to search.

    Why: the one way to open a build-index folder; memory-mapped (`mmap`), so opening is
    instant and the process holds almost no memory of its own.

    >>> import cliplens
    >>> built = cliplens.open_built_index("INDEX")
    >>> cliplens.search(built, cliplens.ModelRef(built.model), "a cat")  # its vectors' model
    """
    import pyarrow as pa  # heavy: loaded only where an index is opened

    folder = Path(folder)
    finish_update(folder)  # an update killed after its commit record
    index = _read_faiss(folder, mmap)
    try:
        meta = IndexMeta.from_json((folder / META_FILE).read_text())
        table = pa.ipc.open_file(pa.memory_map(str(folder / PATHS_FILE))).read_all()
        paths = table.column("path")
    except (OSError, ValueError, TypeError, pa.ArrowException) as e:
        raise InvalidInputError(f"{folder}: not a complete build-index folder ({e})") from e
    if len(paths) != index.ntotal:
        raise InvalidInputError(
            f"{folder}: {PATHS_FILE} has {len(paths)} paths for "
            f"{index.ntotal} vectors; run build-index again"
        )
    return BuiltIndex(index, paths, meta, folder)


def _read_faiss(folder: str | os.PathLike[str], mmap: bool = True) -> Any:
    """The folder's faiss index, memory-mapped: every kind's codes (flat vectors, HNSW
    storage, PQ lists, the refine stage's vectors) stay in the file and the page cache.
    faiss builds without IO_FLAG_MMAP_IFC map only IVF lists (IO_FLAG_MMAP); what neither
    maps is read in. Without `mmap`, read into memory (to be added to)."""
    import faiss  # heavy: loaded only where an index is opened

    path = Path(folder) / INDEX_FILE
    if not path.is_file():
        raise InvalidInputError(f"{folder}: no {INDEX_FILE}; build one with 'cliplens build-index'")
    tries = [getattr(faiss, "IO_FLAG_MMAP_IFC", None), faiss.IO_FLAG_MMAP] if mmap else []
    for flags in [f for f in tries if f is not None]:
        try:
            return faiss.read_index(str(path), flags)
        except RuntimeError:
            continue
    try:
        return faiss.read_index(str(path))
    except RuntimeError as e:
        why = str(e).splitlines()[0][:200]
        raise InvalidInputError(
            f"{path}: not a faiss index ({why}); build it again with 'cliplens build-index'"
        ) from None
