"""What the routes share: the server's settings, the `Service` (model, what search
reads, lock, time limit), and `ApiError`, the one error type routes raise.

Kept apart from `app.py` so that routes import it without importing the app that
includes them.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import anyio
from fastapi import HTTPException, Request
from pydantic import BaseModel

from cliplens.catalog.db import Catalog, default_db_path
from cliplens.device import Precision, parse_precision
from cliplens.errors import InvalidInputError
from cliplens.index.built import BuiltIndex, open_built_index
from cliplens.limits import finite_number, whole_number
from cliplens.models.ref import ModelRef
from cliplens.searchable import Searchable, SearchableKind, StoredModel
from cliplens.server.batching import SearchBatcher
from cliplens.tasks.policy import load_policy
from cliplens.tasks.quality import DistortionProbe

T = TypeVar("T")


@dataclass(frozen=True)
class ServerSettings:
    """What `create_app` serves and its limits; settings that cannot work are refused here,
    before any request.

    >>> import cliplens
    >>> settings = cliplens.ServerSettings(model="offline", token="s3cret", timeout_s=30)
    >>> app = cliplens.create_app(settings)
    """

    model: str | None = None  # default: the settings' default model
    db: Path | None = None  # default: the catalog the CLI uses
    index: Path | None = None  # a build-index folder: search it instead of the catalog
    token: str | None = None  # every route but health needs "Authorization: Bearer TOKEN"
    captioner: Path | None = None  # a captioner folder: enables POST /v1/caption
    max_upload_mb: float = 20.0
    max_megapixels: float = 40.0
    timeout_s: float = 60.0
    cors_origins: tuple[str, ...] = ()  # none: the browser's same-origin rule applies
    device: str | None = None
    precision: Precision | None = None  # a str is parsed ('auto': None)
    policy: str = "default"  # the moderation policy: 'default' or a YAML file
    quality_probe: Path | None = None  # a distortion probe for POST /v1/quality
    max_files: int = 32  # images per request
    head_timeout_s: float = 20.0  # a request head must arrive within this (`serve`, listen.py)
    body_timeout_s: float = 30.0  # the longest wait for the next part of a request body
    keep_alive_s: float = 5.0  # an idle connection between requests is closed after this
    clip_retrieval: bool = False  # also clip-retrieval's API (routes/clip_retrieval.py)
    allow_url_fetch: bool = False  # its image_url may make the server fetch (server/fetch.py)
    clip_retrieval_aesthetic: bool = False  # its aesthetic_score/weight as a prompt term
    url_fetch_timeout_s: float = 10.0  # the whole fetch, redirects included

    def __post_init__(self) -> None:
        if self.token is not None:
            _check_token(self.token)
        for name in _LIMITS:
            finite_number(getattr(self, name), f"`{name}`", 0, low_open=True)
        whole_number(self.max_files, "`max_files`", 1)
        object.__setattr__(self, "precision", parse_precision(self.precision))


# the limits that must be finite and positive
_LIMITS = (
    "max_upload_mb",
    "max_megapixels",
    "timeout_s",
    "head_timeout_s",
    "body_timeout_s",
    "keep_alive_s",
    "url_fetch_timeout_s",
)


def _check_token(token: str) -> None:
    """A token a client can send: not empty (a bare 'Bearer' must never pass), no spaces
    around it (they are not part of a header value) and no control characters."""
    if not token.strip():
        raise InvalidInputError(
            "`token` is empty; give a secret of at least one character, "
            "or leave `token` out to serve without one"
        )
    if token != token.strip(" \t") or any(ord(c) < 32 or ord(c) == 127 for c in token):
        raise InvalidInputError(
            "`token` starts or ends with a space or holds a control character; "
            "give one a client can send in a header"
        )


def _read_parts(settings: ServerSettings) -> None:
    """Read what the routes will need (the policy, the captioner's config, the quality
    probe), so that a bad file stops `create_app`, not a request."""
    load_policy(settings.policy)
    if settings.captioner is not None:  # torch: only with a captioner
        from cliplens.captioning.model import read_config
        from cliplens.captioning.reference import infer_config, is_checkpoint_file, read_state

        if is_checkpoint_file(settings.captioner):  # the ClipCap authors' .pt file
            state = read_state(Path(settings.captioner), mmap=True)  # names and shapes
            infer_config(state, str(settings.captioner))
        else:
            read_config(settings.captioner)
    if settings.quality_probe is not None:
        DistortionProbe.load(settings.quality_probe)


class ErrorOut(BaseModel):
    """Every error response: a machine-readable kind and a one-line message."""

    error: str
    detail: str


ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorOut, "description": what}
    for code, what in [
        (400, "Bad input: the detail names it and the fix"),
        (401, "Missing or wrong token"),
        (404, "Unknown id, no catalog or captioner, or a file that is not served"),
        (408, "The request body stalled"),
        (413, "Body or image too large"),
        (415, "Not an image, or an unsupported format"),
        (422, "The request does not match the schema"),
        (501, "An optional part is not installed: the detail names the pip extra"),
        (503, "Busy past the time limit, the model unavailable, or the catalog unreadable"),
    ]
}


class ApiError(HTTPException):
    """An HTTP error with a machine-readable kind, rendered as {"error", "detail"}."""

    def __init__(self, status: int, kind: str, detail: str) -> None:
        super().__init__(status_code=status, detail=detail)
        self.kind = kind


class BodyTooLargeError(ApiError):
    def __init__(self, limit_mb: float) -> None:
        super().__init__(413, "too_large", f"request body over {limit_mb:g} MB; send less")


class BodyTimeoutError(ApiError):
    def __init__(self, timeout_s: float) -> None:
        detail = f"the request body stalled for over {timeout_s:g} s; send it without pausing"
        super().__init__(408, "body_timeout", detail)


class Service:
    """What the routes share: settings, the model (loaded on first use), what search reads
    (the catalog, or a build-index folder), and the lock that serialises model calls."""

    recheck_s = 1.0  # how often a served build-index folder is looked at for a new build

    def __init__(self, settings: ServerSettings) -> None:
        self.settings = settings
        _read_parts(settings)
        self.db = Path(settings.db) if settings.db else default_db_path()
        self._built: BuiltIndex | None = None
        if settings.index is not None:
            self._built = open_built_index(settings.index)
        elif self.db.exists():
            Catalog(self.db, readonly=True).close()  # a corrupt or newer catalog stops here
        model = settings.model or (self._built.model if self._built else None)
        self.ref = ModelRef(model, device=settings.device, precision=settings.precision)
        self._model_checked = False
        self._checked = time.monotonic()
        self._reload_lock = threading.Lock()
        self._lock = threading.Lock()
        self._local = threading.local()
        self._cached: dict[str, Any] = {}
        self._cache_lock = threading.Lock()
        self.batcher = SearchBatcher(self)

    async def run(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run `fn` in a worker thread holding the model lock, within the time limit."""

        def locked() -> T:
            with self._lock:
                return fn(*args, **kwargs)

        try:
            with anyio.fail_after(self.settings.timeout_s):
                return await anyio.to_thread.run_sync(locked, abandon_on_cancel=True)
        except TimeoutError:
            raise self.timed_out() from None

    def timed_out(self) -> ApiError:
        """The 503 for a request that waited and ran past --timeout."""
        return ApiError(
            503,
            "timeout",
            f"the request took over {self.settings.timeout_s:g} s; the server is busy, retry later",
        )

    def catalog(self) -> Catalog | None:
        """This thread's read-only connection to the catalog (sqlite connections stay in
        their thread); None when there is no catalog yet."""
        cat = getattr(self._local, "catalog", None)
        if cat is None:
            if not self.db.exists():
                return None
            cat = self._local.catalog = Catalog(self.db, readonly=True)
        return cat

    @property
    def searched_name(self) -> str:
        """What search reads, by name: the build-index folder's, or the catalog file's."""
        return Path(self.settings.index).name if self.settings.index else self.db.stem

    @property
    def searches(self) -> SearchableKind:
        """What search reads: the catalog, or a build-index folder."""
        return "catalog" if self._built is None else "index"

    def searchable(self) -> bool:
        """Whether there is something to search."""
        return self._built is not None or self.db.exists()

    def searched(self) -> Searchable:
        """What search reads, for this thread: the catalog (404 while there is none), or
        the build-index folder, first opened again where it holds a newer complete build
        (looked at every `recheck_s` seconds at most)."""
        if self._built is None:
            cat = self.catalog()
            if cat is None:
                raise ApiError(
                    404,
                    "no_catalog",
                    f"no catalog at {self.db}; run 'cliplens index FOLDER' first, or serve "
                    "with --db or --index",
                )
            return cat
        if time.monotonic() - self._checked >= self.recheck_s:
            with self._reload_lock:
                self._checked = time.monotonic()
                self._built = self._built.reopened() or self._built
        return self._built

    def model_id(self) -> str:
        """The model id of queries, checked once against a built index's vectors (loads
        the model's identity)."""
        model_id = self.ref.info.model_id
        if self._built is not None and not self._model_checked:
            self._built.require_model(model_id)
            self._model_checked = True
        return model_id

    def stored_models(self) -> list[StoredModel]:
        """The models whose vectors search reads (none while there is no catalog)."""
        return self.searched().models() if self.searchable() else []

    def cached(self, name: str, build: Callable[[], T]) -> T:
        """Something built once per server (a moderator, a screener, the captioner)."""
        with self._cache_lock:
            if name not in self._cached:
                self._cached[name] = build()
            return self._cached[name]


def service_of(request: Request) -> Service:
    service: Service = request.app.state.service
    return service
