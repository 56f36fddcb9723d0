"""The HTTP service: a FastAPI app factory, its middleware, and errors as JSON (what the
routes share is in service.py).

`create_app(ServerSettings(...))` builds an app with no module-level state, so tests and
embedding applications can run several. The routes only parse the request, call the
library, and shape the response; every cliplens error becomes
`{"error": kind, "detail": one line}` with a 4xx/5xx status, except under /openai/,
where OpenAI's API is served (routes/openai_api.py) and errors take its shape instead:
`{"error": {"message", "type", "param", "code"}}` (`_openai_error`; `_reply` chooses).

Safety: the model is called by one request at a time (a lock, taken in a worker thread);
a request that waits or runs longer than `timeout_s` gets 503 (it keeps its place: the
work still finishes, so the lock is never left held); request bodies above
`max_upload_mb` are refused with 413 while they stream, before they are buffered, and a
body that stalls for `body_timeout_s` gets 408 (slow request heads: listen.py); files
are only ever read by id (the catalog's, or a built index's rows), never by a path from
the client, and only when they pass the checks of files.py. Every response, errors and
unknown paths included, says `X-Content-Type-Options: nosniff`; every error, whatever
raised it, has the JSON shape of its path.

Settings that cannot work (an empty token, a nan limit, a corrupt or newer catalog) stop
`create_app` with a typed error, so a server never starts only to fail every request.
"""

from __future__ import annotations

import hmac
import time
from collections.abc import Callable
from dataclasses import fields
from pathlib import Path
from typing import Any

import anyio
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse
from fastapi.staticfiles import StaticFiles
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from cliplens import __version__
from cliplens.catalog.errors import CatalogError
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
    name_params,
)
from cliplens.paths import readable
from cliplens.searchable import NotEmbeddedError, NotServedError, UnknownIdError
from cliplens.server.routes import (
    caption,
    classify,
    clip_retrieval,
    embed,
    meta,
    moderate,
    openai_api,
    quality,
    score,
)
from cliplens.server.routes import search as search_routes
from cliplens.server.service import (
    ERRORS,
    ApiError,
    BodyTimeoutError,
    BodyTooLargeError,
    ServerSettings,
    Service,
)

STATIC = Path(__file__).parent / "static"


def _status(e: ClipLensError) -> tuple[int, str]:
    """The HTTP status and error kind for a cliplens error."""
    table: list[tuple[type[ClipLensError], int, str]] = [
        (CatalogError, 503, "catalog_unavailable"),  # it broke after the start's check
        (UnknownIdError, 404, "unknown_id"),
        (NotServedError, 404, "not_served"),
        (NotEmbeddedError, 404, "not_embedded"),
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


_SETTINGS = {f.name for f in fields(ServerSettings)}
_SERVE_FLAGS = {"timeout_s": "--timeout", "cors_origins": "--cors-origin"}


def _named(param: str) -> str:
    """A parameter of a library message as the reader of a response knows it: a request
    field by its name; a server setting as `cliplens serve` takes it (the operator's)."""
    if param in _SETTINGS:
        return _SERVE_FLAGS.get(param, "--" + param.replace("_", "-"))
    return param


def _line(detail: str, kind: str, fields: list[str] | None = None) -> str:
    """`detail` as one readable line, each `param` of a library message named by
    `_named`; the request fields it names are added to `fields`."""

    def named(param: str) -> str:
        if fields is not None and param not in _SETTINGS:
            fields.append(param)
        return _named(param)

    return readable(" ".join(name_params(str(detail), named).split())) or kind


def _error(
    status: int, kind: str, detail: str, headers: dict[str, str] | None = None
) -> JSONResponse:
    """The one error shape: {"error": kind, "detail": one readable line}."""
    line = _line(detail, kind)
    return JSONResponse({"error": kind, "detail": line}, status_code=status, headers=headers)


_OPENAI_CODES = {"unauthorized": "invalid_api_key"}  # OpenAI's code, where it has one


def _openai_error(
    status: int,
    kind: str,
    detail: str,
    headers: dict[str, str] | None = None,
    param: str | None = None,
) -> JSONResponse:
    """OpenAI's error shape, which its clients turn into their typed exceptions:
    `param` is the request field at fault (default: the first the message names),
    `code` the error kind."""
    fields: list[str] = []
    error = {
        "message": _line(detail, kind, fields),
        "type": "invalid_request_error" if status < 500 else "server_error",
        "param": param or next(iter(fields), None),
        "code": _OPENAI_CODES.get(kind, kind),
    }
    return JSONResponse({"error": error}, status_code=status, headers=headers)


def _is_openai(scope: dict) -> bool:
    """Whether the request is one for OpenAI's API (its path, below any root path)."""
    path, root = scope.get("path", ""), scope.get("root_path", "")
    if root and path.startswith(root):
        path = path[len(root) :]
    return path.startswith("/openai/")


def _reply(
    scope: dict,
    status: int,
    kind: str,
    detail: str,
    headers: dict[str, str] | None = None,
    param: str | None = None,
) -> JSONResponse:
    """An error in the shape of the request's path: OpenAI's under /openai/, else ours."""
    if _is_openai(scope):
        return _openai_error(status, kind, detail, headers, param)
    return _error(status, kind, detail, headers)


_PARSE_FAILED = "There was an error parsing the body"  # FastAPI's words, with the cause chained
_KINDS = {400: "invalid_body", 401: "unauthorized", 404: "not_found", 405: "method_not_allowed"}


_SHAPE = "send the documented shape (see /docs)"
_OPENAI_SHAPE = "send the body OpenAI's API documents"


def _shape(scope: dict) -> str:
    return _OPENAI_SHAPE if _is_openai(scope) else _SHAPE


def _unparsable(cause: BaseException | None, shape: str) -> str:
    """Why a request body could not be parsed, for the client."""
    if isinstance(cause, UnicodeDecodeError):
        return "the JSON body is not UTF-8 text; send UTF-8 JSON"
    if isinstance(cause, RecursionError):
        return f"the JSON body is nested too deeply; {shape}"
    if isinstance(cause, ValueError) and "digits" in str(cause):
        return "the JSON body holds a number with too many digits; send numbers in range"
    what = f" ({type(cause).__name__})" if cause else ""
    return f"the request body cannot be parsed{what}; {shape}"


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ClipLensError)
    async def cliplens_error(request: Request, e: ClipLensError) -> JSONResponse:
        status, kind = _status(e)
        return _reply(request.scope, status, kind, str(e))

    # starlette's class: also what the router, the static files and body parsing raise
    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
        kind = getattr(e, "kind", None) or _KINDS.get(e.status_code, "http")
        detail = str(e.detail)
        if detail == _PARSE_FAILED:
            detail = _unparsable(e.__cause__, _shape(request.scope))
        elif kind in ("not_found", "method_not_allowed") and not isinstance(e, ApiError):
            where = request.url.path[:200]
            if kind == "not_found" and _is_openai(request.scope):
                detail = f"nothing at {where}; OpenAI's API here is {openai_api.ROUTES}"
            elif kind == "not_found":
                detail = f"nothing at {where}; the API is under /v1 (see /docs)"
            else:
                detail = f"{request.method} is not allowed on {where}"
        headers = dict(e.headers or {})
        if e.status_code == 401:
            headers["WWW-Authenticate"] = "Bearer"
        if e.status_code == 408:  # the rest of the body is not awaited: end the connection
            headers["Connection"] = "close"
        param = getattr(e, "param", None)  # openai_api.OpenAIError names its field
        return _reply(request.scope, e.status_code, kind, detail, headers, param)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, e: RequestValidationError) -> JSONResponse:
        return _invalid(request.scope, e.errors())

    @app.exception_handler(ValidationError)  # a model built from client input in a route
    async def model_error(request: Request, e: ValidationError) -> JSONResponse:
        return _invalid(request.scope, e.errors())

    @app.exception_handler(Exception)  # a bug: still the one shape, never a traceback
    async def internal_error(request: Request, e: Exception) -> JSONResponse:
        why = f"the server failed on this request ({type(e).__name__}); see the server log"
        # sent by Starlette's outermost middleware, outside _Guard: the header is set here
        return _reply(request.scope, 500, "internal", why, {"X-Content-Type-Options": "nosniff"})


def _invalid(scope: dict, errors: Any) -> JSONResponse:
    """A body or query that does not fit the schema: 422, or 400 under /openai/ (OpenAI's
    status for it), naming the field at fault."""
    first = errors[0] if errors else {}
    loc, kind = tuple(first.get("loc", ())), first.get("type")
    msg = first.get("msg", "invalid request")
    shape = _shape(scope)
    fields = [p for p in loc if p not in ("body", "query", "path")]
    param = fields[0] if fields and isinstance(fields[0], str) else None
    if kind == "json_invalid":  # cut short or malformed: FastAPI's loc is ("body", offset)
        why = first.get("ctx", {}).get("error", msg)
        msg = f"the JSON body is not valid JSON ({why} at character {loc[-1]}); {shape}"
    elif loc == ("body",) and kind == "missing":
        msg = f"the request has no body; {shape}"
    elif where := ".".join(str(p) for p in loc if p != "body"):
        msg = f"{where}: {msg}"
    status = 400 if _is_openai(scope) else 422
    return _reply(scope, status, "invalid_request", msg, param=param)


class _Guard:
    """ASGI middleware for every HTTP request: `X-Content-Type-Options: nosniff` on every
    response; bodies over `limit` bytes refused, by Content-Length or as they stream; a
    body whose next part takes over `body_timeout_s` to arrive ends the request (408)."""

    def __init__(self, app: Any, limit_mb: float, body_timeout_s: float) -> None:
        self.app, self.limit_mb, self.body_timeout_s = app, limit_mb, body_timeout_s
        self.limit = int(limit_mb * 1024 * 1024)

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def nosniff(message: dict) -> None:
            if message["type"] == "http.response.start":
                headers = [*message.get("headers", ()), (b"x-content-type-options", b"nosniff")]
                message = {**message, "headers": headers}
            await send(message)

        for name, value in scope.get("headers", ()):
            if name == b"content-length" and value.isdigit() and int(value) > self.limit:
                detail = BodyTooLargeError(self.limit_mb).detail
                resp = _reply(scope, 413, "too_large", detail)
                return await resp(scope, receive, nosniff)
        seen, more = 0, True

        async def guarded() -> dict:
            nonlocal seen, more
            if not more:  # the body is whole: later calls wait for a disconnect, unbounded
                return await receive()
            with anyio.move_on_after(self.body_timeout_s) as waited:
                message = await receive()
            if waited.cancelled_caught:
                raise BodyTimeoutError(self.body_timeout_s)
            more = message["type"] == "http.request" and message.get("more_body", False)
            seen += len(message.get("body", b""))
            if seen > self.limit:
                raise BodyTooLargeError(self.limit_mb)
            return message

        await self.app(scope, guarded, nosniff)


def _auth(token: str | None) -> Callable:
    # compared as bytes: a header arrives as latin-1 text of its bytes, the token is UTF-8
    # (or the bytes of a command line that is not, kept as surrogates)
    expected = token.encode("utf-8", "surrogateescape") if token is not None else b""

    async def check(request: Request) -> None:
        if token is None:
            return
        given = request.headers.get("authorization", "")
        scheme, _, value = given.partition(" ")
        sent = value.strip(" \t").encode("latin-1")
        if scheme.lower() != "bearer" or not hmac.compare_digest(sent, expected):
            why = "missing or wrong token; send the header 'Authorization: Bearer TOKEN'"
            raise ApiError(401, "unauthorized", why)

    return check


def create_app(settings: ServerSettings | None = None) -> FastAPI:
    """The HTTP API under /v1 and the search page at /, over the catalog or a
    build-index folder (`settings.index`).

    Why: embed the service in another ASGI application, or run several in one process
    (no module-level state); `cliplens serve` runs one with uvicorn.

    >>> import cliplens
    >>> app = cliplens.create_app(cliplens.ServerSettings(model="offline"))
    >>> app.title  # 'cliplens'; serve it with any ASGI server
    """
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
    app.state.started = int(time.time())  # "created" of the model in OpenAI's API
    _install_error_handlers(app)
    protected = [Depends(_auth(settings.token))]
    app.include_router(meta.public)
    if settings.clip_retrieval:  # its clients cannot send a token: see the module
        app.include_router(clip_retrieval.router, responses=ERRORS)
    app.include_router(meta.router, dependencies=protected, responses=ERRORS)
    for module in (embed, classify, search_routes, moderate, quality, score, caption):
        app.include_router(module.router, dependencies=protected, responses=ERRORS)
    # OpenAI's API, its errors in OpenAI's shape (in the schema with its own error model)
    app.include_router(openai_api.router, dependencies=protected)
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(settings.cors_origins),
            allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "Content-Type"],
        )
    limits = {"limit_mb": settings.max_upload_mb, "body_timeout_s": settings.body_timeout_s}
    app.add_middleware(_Guard, **limits)
    app.mount("/", StaticFiles(directory=STATIC, html=True), name="page")
    return app
