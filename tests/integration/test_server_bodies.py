"""The server against a hostile user (issue 17), continued: bodies that break parsers,
unknown paths, and clients that send their request slowly or never finish it."""

from __future__ import annotations

import socket
import time

import pytest
from fastapi.testclient import TestClient

from cliplens.catalog.db import Catalog
from cliplens.catalog.update import update_catalog
from cliplens.models.ref import ModelRef
from cliplens.server import ServerSettings, create_app
from tests_helpers import live_server


def _shape(r, *case: str) -> dict:
    """A 4xx in the one error shape: JSON {"error", "detail"}, one line, with nosniff."""
    assert 400 <= r.status_code < 500, (*case, r.status_code, r.text[:200])
    assert r.headers["content-type"].startswith("application/json"), case
    assert r.headers["x-content-type-options"] == "nosniff"
    body = r.json()
    assert set(body) == {"error", "detail"}, body
    assert isinstance(body["detail"], str) and body["detail"] and "\n" not in body["detail"]
    return body


@pytest.fixture(scope="module")
def client(tmp_path_factory, tiny_model_dir, photos):
    model = f"local:{tiny_model_dir}"
    db = tmp_path_factory.mktemp("bodies") / "catalog.db"
    with Catalog(db) as cat:
        update_catalog(cat, ModelRef(model), [photos], workers=0)
    with TestClient(create_app(ServerSettings(model=model, db=db, precision="fp32"))) as c:
        yield c


# ------------------------------------------------------------ bad bodies and unknown paths

J = {"content-type": "application/json"}
M = {"content-type": "multipart/form-data; boundary=xyz"}
UNPARSABLE = (400, "invalid_body")  # the body cannot be read as JSON or as a form at all
OFF_SCHEMA = (422, "invalid_request")  # it can, but it does not fit the route's schema
# each body, with the answer it gets
JSON_BODIES = {
    "not UTF-8": (b'{"terms": [{"text": "\xff\xfe"}]}', UNPARSABLE),
    "100,000 deep": (b"[" * 100_000 + b"]" * 100_000, UNPARSABLE),
    "100,000 deep in a field": (
        b'{"terms": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
        UNPARSABLE,
    ),
    # past Python's 4,300-digit limit on int(str): unparsable; below it, only out of range
    "5,000-digit integer": (b'{"terms": [{"text": "a"}], "n": ' + b"9" * 5000 + b"}", UNPARSABLE),
    "4,000-digit integer": (b'{"terms": [{"text": "a"}], "n": ' + b"9" * 4000 + b"}", OFF_SCHEMA),
    "cut short": (b'{"terms": [', OFF_SCHEMA),  # FastAPI's own JSON error: a 422
    "no body": (b"", OFF_SCHEMA),
    "not an object": (b"[1, 2]", OFF_SCHEMA),
    "weight 1e400": (b'{"terms": [{"text": "a", "weight": 1e400}]}', OFF_SCHEMA),
    "weight NaN": (b'{"terms": [{"text": "a", "weight": NaN}]}', OFF_SCHEMA),
    "weight -Infinity": (b'{"terms": [{"text": "a", "weight": -Infinity}]}', OFF_SCHEMA),
    "weight of 400 digits": (
        b'{"terms": [{"text": "a", "weight": ' + b"1" * 400 + b"}]}",
        OFF_SCHEMA,
    ),
    "id of 400 digits": (b'{"terms": [{"id": ' + b"1" * 400 + b"}]}", OFF_SCHEMA),
}
# None: whatever the route answers when its fields are missing (the schema's 422 where one
# is required, else the route's own 400)
FORM_BODIES = {
    "no boundary": ({"content-type": "multipart/form-data"}, b"--xyz\r\n\r\n", UNPARSABLE),
    "bad part header": (M, b"--xyz\r\nbogus\r\n\r\nabc\r\n--xyz--\r\n", UNPARSABLE),
    "cut short": (M, b'--xyz\r\nContent-Disposition: form-data; name="texts"\r\n\r\nab', None),
    "5,000 fields": (
        M,
        b"".join(
            b'--xyz\r\nContent-Disposition: form-data; name="f%d"\r\n\r\nx\r\n' % i
            for i in range(5000)
        )
        + b"--xyz--\r\n",
        UNPARSABLE,
    ),
    "JSON instead": (J, b'{"texts": ["a"]}', None),
}


def _routes(app, content_type: str) -> list[str]:
    """cliplens's own routes with such a body (OpenAI's, under /openai/, answer in its
    shape: tests/integration/test_openai_api.py)."""
    paths = app.openapi()["paths"]
    return [
        p
        for p, ops in paths.items()
        if content_type in ops.get("post", {}).get("requestBody", {}).get("content", {})
        and not p.startswith("/openai/")
    ]


def _requires_a_field(app, route: str) -> bool:
    """Whether the route's form has a required field (the schema then refuses an empty
    form with a 422; /v1/embed, all optional, refuses it itself)."""
    spec = app.openapi()
    body = spec["paths"][route]["post"]["requestBody"]["content"]["multipart/form-data"]
    ref = body["schema"]["$ref"].rsplit("/", 1)[1]
    return bool(spec["components"]["schemas"][ref].get("required"))


def test_bad_json_bodies_get_their_status_and_kind(client):
    routes = _routes(client.app, "application/json")
    assert "/v1/search" in routes
    for route in routes:
        for what, (body, (status, kind)) in JSON_BODIES.items():
            r = client.post(route, content=body, headers=J)
            got = _shape(r, route, what)
            assert (r.status_code, got["error"]) == (status, kind), (route, what, got)


def test_bad_form_bodies_get_their_status_and_kind(client):
    routes = _routes(client.app, "multipart/form-data")
    assert len(routes) >= 6 and "/v1/embed" in routes
    for route in routes:
        missing = OFF_SCHEMA if _requires_a_field(client.app, route) else (400, "invalid_input")
        for what, (headers, body, expected) in FORM_BODIES.items():
            r = client.post(route, content=body, headers=headers)
            got = _shape(r, route, what)
            assert (r.status_code, got["error"]) == (expected or missing), (route, what, got)


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/v1/nope"),
        ("GET", "/v1/"),
        ("GET", "/v1"),
        ("GET", "/nope"),
        ("GET", "/v1/images/1/extra"),
        ("GET", "/..%2F..%2Fetc%2Fpasswd"),
        ("POST", "/v1/nope"),
        ("POST", "/"),
        ("DELETE", "/v1/search"),
        ("GET", "/v1/search?q=1" + "1" * 400 + ":cat"),
        ("GET", "/v1/search?q=200:cat"),
        ("GET", "/v1/search?q=cat&n=" + "9" * 5000),
        ("GET", "/v1/search?q=cat&n=nan"),
        ("GET", "/v1/thumbs/1?size=inf"),
        ("GET", "/v1/similar/" + "9" * 400),
    ],
)
def test_unknown_paths_and_bad_queries_get_the_error_shape(client, method, path):
    _shape(client.request(method, path))


# ------------------------------------------------------------ slow clients, real sockets

HEAD = b"GET /v1/health HTTP/1.1\r\nHost: t\r\n\r\n"


class _SlowHandler:
    """The app, plus /__slow: a handler that works longer than the head timeout."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"] == "/__slow":
            import anyio

            await anyio.sleep(2.5)  # busy past the head timeout: it must still answer
            headers = [(b"content-length", b"4")]
            await send({"type": "http.response.start", "status": 200, "headers": headers})
            return await send({"type": "http.response.body", "body": b"done"})
        return await self.app(scope, receive, send)


@pytest.fixture(scope="module")
def live(tmp_path_factory, tiny_model_dir):
    """A real uvicorn server on 127.0.0.1, as `serve` runs it, with 1 s bounds."""
    settings = ServerSettings(
        model=f"local:{tiny_model_dir}",
        head_timeout_s=1.0,
        body_timeout_s=1.0,
        db=tmp_path_factory.mktemp("live") / "n.db",
    )
    with live_server(_SlowHandler(create_app(settings)), settings) as port:
        yield port


def _connect(port: int) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=5)
    s.settimeout(0.2)
    return s


def _response(s: socket.socket) -> bytes:
    """One whole response (head and Content-Length body) read from `s` (its timeout bounds
    each read)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = s.recv(65536)
        assert chunk, f"closed after {data!r}"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = next(
        int(line.split(b":")[1])
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-length:")
    )
    while len(body) < length:
        chunk = s.recv(65536)
        assert chunk, f"closed after {data!r}"
        body += chunk
    return head + b"\r\n\r\n" + body


def _closed_within(sockets: dict[str, socket.socket], seconds: float, drip: set[str] = frozenset()):
    """Names of the connections the server closed within `seconds` -> what each received;
    those in `drip` send one more byte of their head at every turn (slowloris)."""
    closed: dict[str, bytes] = {}
    got = {name: b"" for name in sockets}
    deadline = time.monotonic() + seconds
    while len(closed) < len(sockets) and time.monotonic() < deadline:
        for name, s in sockets.items():
            if name in closed:
                continue
            try:
                if name in drip:
                    s.send(b"X")
                chunk = s.recv(65536)
            except TimeoutError:
                continue
            except (ConnectionResetError, BrokenPipeError):
                chunk = b""
            got[name] += chunk
            if not chunk:
                closed[name] = got[name]
    for s in sockets.values():
        s.close()
    return closed


def test_slow_and_unfinished_requests_are_closed(live):
    conns = {
        name: _connect(live)
        for name in ("silent", "half head", "drip", "stalled body", "kept alive, then half a head")
    }
    conns["half head"].sendall(HEAD[:20])
    conns["drip"].sendall(b"GET /v1/health HTTP/1.1\r\nX-Slow: ")
    conns["stalled body"].sendall(
        b"POST /v1/search HTTP/1.1\r\nHost: t\r\nContent-Type: "
        b'application/json\r\nContent-Length: 100\r\n\r\n{"terms"'
    )
    kept = conns["kept alive, then half a head"]
    kept.settimeout(5)
    kept.sendall(HEAD)
    assert _response(kept).startswith(b"HTTP/1.1 200")
    kept.settimeout(0.2)
    kept.sendall(b"GET /v1/he")
    closed = _closed_within(conns, 15, drip={"drip"})
    assert set(closed) == set(conns), f"still open after 15 s: {set(conns) - set(closed)}"
    answer = closed["stalled body"]
    assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
    assert b'"error":"body_timeout"' in answer and b"nosniff" in answer


def test_a_request_that_runs_long_is_not_cut_and_the_server_still_answers(live):
    s = _connect(live)
    s.settimeout(10)
    s.sendall(b"GET /__slow HTTP/1.1\r\nHost: t\r\n\r\n")
    assert _response(s).startswith(b"HTTP/1.1 200")
    s.sendall(HEAD)  # the same connection, kept alive
    assert _response(s).startswith(b"HTTP/1.1 200")
    s.close()
