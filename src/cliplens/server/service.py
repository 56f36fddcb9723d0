"""What the routes share: the server's settings, the `Service` (model, catalog, lock,
time limit), and `ApiError`, the one error type routes raise.

Kept apart from `app.py` so that routes import it without importing the app that
includes them.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import anyio
from fastapi import HTTPException, Request
from pydantic import BaseModel

from cliplens.errors import InvalidInputError
from cliplens.limits import finite_number, whole_number

T = TypeVar("T")


@dataclass(frozen=True)
class ServerSettings:
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
    precision: str | None = None
    policy: str = "default"  # the moderation policy: 'default' or a YAML file
    quality_probe: Path | None = None  # a distortion probe for POST /v1/quality
    max_files: int = 32  # images per request
    head_timeout_s: float = 20.0  # a request head must arrive within this (`serve`, listen.py)
    body_timeout_s: float = 30.0  # the longest wait for the next part of a request body
    keep_alive_s: float = 5.0  # an idle connection between requests is closed after this

    def __post_init__(self) -> None:
        if self.token is not None:
            _check_token(self.token)
        for name, flag in _LIMITS.items():
            finite_number(getattr(self, name), flag, 0, low_open=True)
        whole_number(self.max_files, "max_files", 1)


# the positive limits, with the name a user knows each by
_LIMITS = {
    "max_upload_mb": "--max-upload-mb",
    "max_megapixels": "--max-megapixels",
    "timeout_s": "--timeout",
    "head_timeout_s": "head_timeout_s",
    "body_timeout_s": "body_timeout_s",
    "keep_alive_s": "keep_alive_s",
}


def _check_token(token: str) -> None:
    """A token a client can send: not empty (a bare 'Bearer' must never pass), no spaces
    around it (they are not part of a header value) and no control characters."""
    if not token.strip():
        raise InvalidInputError(
            "--token is empty; give a secret of at least one character, "
            "or leave --token out to serve without one"
        )
    if token != token.strip(" \t") or any(ord(c) < 32 or ord(c) == 127 for c in token):
        raise InvalidInputError(
            "--token starts or ends with a space or holds a control character; "
            "give one a client can send in a header"
        )


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
    """What the routes share: settings, the model (loaded on first use), the catalog path,
    and the lock that serialises model calls."""

    def __init__(self, settings: ServerSettings) -> None:
        from cliplens.catalog.db import default_db_path
        from cliplens.models.ref import ModelRef
        from cliplens.server.batching import SearchBatcher
        from cliplens.server.photos import CatalogPhotos, IndexPhotos

        self.settings = settings
        self.db = Path(settings.db) if settings.db else default_db_path()
        built = None
        if settings.index is not None:
            from cliplens.index.build import open_built_index

            built = open_built_index(settings.index)
        elif self.db.exists():
            from cliplens.catalog.db import Catalog

            Catalog(self.db, readonly=True).close()  # a corrupt or newer catalog stops here
        model = settings.model or (built.model if built else None)
        self.ref = ModelRef(model, device=settings.device, precision=settings.precision)
        self.photos = IndexPhotos(self, built) if built else CatalogPhotos(self)
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
        return ApiError(503, "timeout", f"the request took over {self.settings.timeout_s:g} s; "
                        "the server is busy, retry later")  # fmt: skip

    def catalog(self):
        """This thread's read-only connection to the catalog (sqlite connections stay in
        their thread); None when there is no catalog yet."""
        from cliplens.catalog.db import Catalog

        cat = getattr(self._local, "catalog", None)
        if cat is None:
            if not self.db.exists():
                return None
            cat = self._local.catalog = Catalog(self.db, readonly=True)
        return cat

    def cached(self, name: str, build: Callable[[], T]) -> T:
        """Something built once per server (a moderator, a screener, the captioner)."""
        with self._cache_lock:
            if name not in self._cached:
                self._cached[name] = build()
            return self._cached[name]


def service_of(request: Request) -> Service:
    return request.app.state.service
