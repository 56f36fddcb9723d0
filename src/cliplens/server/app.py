"""The HTTP service: a FastAPI app factory, what the routes share, errors as JSON.

`create_app(ServerSettings(...))` builds an app with no module-level state, so tests and
embedding applications can run several. The routes only parse the request, call the
library, and shape the response; every cliplens error becomes
`{"error": kind, "detail": one line}` with a 4xx/5xx status.

Safety: the model is called by one request at a time (a lock, taken in a worker thread);
a request that waits or runs longer than `timeout_s` gets 503 (it keeps its place: the
work still finishes, so the lock is never left held); request bodies above
`max_upload_mb` are refused with 413 while they stream, before they are buffered; files
are only ever read by id (the catalog's, or a built index's rows), never by a path from
the client.
"""

from __future__ import annotations

import hmac
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import anyio
from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel

from cliplens import __version__
from cliplens.errors import (
    ClipLensError,
    DependencyMissingError,
    EmptyImageError,
    ImageError,
    ImageNotFoundError,
    ImageTooLargeError,
    InvalidInputError,
    ModelUnavailableError,
    NotAnImageError,
    TruncatedImageError,
    UnsupportedImageError,
)

T = TypeVar("T")
STATIC = Path(__file__).parent / "static"


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


class ErrorOut(BaseModel):
    """Every error response: a machine-readable kind and a one-line message."""

    error: str
    detail: str


ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorOut, "description": what}
    for code, what in [
        (400, "Bad input: the detail names it and the fix"),
        (401, "Missing or wrong token"),
        (404, "Unknown id, or no catalog or captioner"),
        (413, "Body or image too large"),
        (415, "Not an image, or an unsupported format"),
        (422, "The request does not match the schema"),
        (503, "Busy past the time limit, or the model is unavailable"),
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


class Service:
    """What the routes share: settings, the model (loaded on first use), the catalog path,
    and the lock that serialises model calls."""

    def __init__(self, settings: ServerSettings) -> None:
        from cliplens.models.ref import ModelRef
        from cliplens.server.batching import SearchBatcher
        from cliplens.server.photos import CatalogPhotos, IndexPhotos
        from cliplens.store.catalog import default_db_path

        self.settings = settings
        self.db = Path(settings.db) if settings.db else default_db_path()
        built = None
        if settings.index is not None:
            from cliplens.distributed.index import open_built_index

            built = open_built_index(settings.index)
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
        from cliplens.store.catalog import Catalog

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


def _status(e: ClipLensError) -> tuple[int, str]:
    """The HTTP status and error kind for a cliplens error."""
    table: list[tuple[type, int, str]] = [
        (ImageTooLargeError, 413, "image_too_large"),
        (UnsupportedImageError, 415, "unsupported_image"),
        (NotAnImageError, 415, "not_an_image"),
        (EmptyImageError, 400, "empty_image"),
        (TruncatedImageError, 400, "truncated_image"),
        (ImageNotFoundError, 404, "image_not_found"),
        (ImageError, 400, "bad_image"),
        (InvalidInputError, 400, "invalid_input"),
        (ModelUnavailableError, 503, "model_unavailable"),
        (DependencyMissingError, 501, "not_installed"),
    ]
    for cls, status, kind in table:
        if isinstance(e, cls):
            return status, kind
    return 500, "internal"


def _error(status: int, kind: str, detail: str) -> JSONResponse:
    return JSONResponse({"error": kind, "detail": detail}, status_code=status)


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ClipLensError)
    async def cliplens_error(_: Request, e: ClipLensError) -> JSONResponse:
        status, kind = _status(e)
        return _error(status, kind, " ".join(str(e).split()))

    @app.exception_handler(HTTPException)
    async def http_error(_: Request, e: HTTPException) -> JSONResponse:
        kinds = {401: "unauthorized", 404: "not_found", 405: "method_not_allowed"}
        kind = getattr(e, "kind", None) or kinds.get(e.status_code, "http")
        resp = _error(e.status_code, kind, str(e.detail))
        if e.status_code == 401:
            resp.headers["WWW-Authenticate"] = "Bearer"
        return resp

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, e: RequestValidationError) -> JSONResponse:
        first = e.errors()[0] if e.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        msg = first.get("msg", "invalid request")
        return _error(422, "invalid_request", f"{where}: {msg}" if where else msg)


class _BodyLimit:
    """ASGI middleware: refuse bodies over `limit` bytes, by Content-Length or as they stream."""

    def __init__(self, app: Any, limit: int, limit_mb: float) -> None:
        self.app, self.limit, self.limit_mb = app, limit, limit_mb

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        for name, value in scope.get("headers", ()):
            if name == b"content-length" and value.isdigit() and int(value) > self.limit:
                resp = _error(413, "too_large", BodyTooLargeError(self.limit_mb).detail)
                return await resp(scope, receive, send)
        seen = 0

        async def counted() -> dict:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise BodyTooLargeError(self.limit_mb)
            return message

        await self.app(scope, counted, send)


def _auth(token: str | None) -> Callable:
    async def check(request: Request) -> None:
        if token is None:
            return
        given = request.headers.get("authorization", "")
        scheme, _, value = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(value.strip(), token):
            raise ApiError(401, "unauthorized", "missing or wrong token; send the header "
                           "'Authorization: Bearer TOKEN'")  # fmt: skip

    return check


def create_app(settings: ServerSettings | None = None) -> FastAPI:
    from cliplens.server.routes import caption, classify, embed, meta, moderate, quality, score
    from cliplens.server.routes import search as search_routes

    settings = settings or ServerSettings()
    service = Service(settings)
    app = FastAPI(
        title="cliplens",
        version=__version__,
        description="CLIP-family models over HTTP: embeddings, zero-shot classification, "
        "photo search, moderation, quality, captions and scores.",
        docs_url="/docs",
        redoc_url=None,
    )
    app.state.service = service
    _install_error_handlers(app)
    protected = [Depends(_auth(settings.token))]
    app.include_router(meta.public)
    app.include_router(meta.router, dependencies=protected, responses=ERRORS)
    for module in (embed, classify, search_routes, moderate, quality, score, caption):
        app.include_router(module.router, dependencies=protected, responses=ERRORS)
    if settings.cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=list(settings.cors_origins),
                           allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"])  # fmt: skip
    limit = int(settings.max_upload_mb * 1024 * 1024)
    app.add_middleware(_BodyLimit, limit=limit, limit_mb=settings.max_upload_mb)
    app.mount("/", StaticFiles(directory=STATIC, html=True), name="page")
    return app


def service_of(request: Request) -> Service:
    return request.app.state.service
