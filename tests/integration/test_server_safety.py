"""Each of the server's safety claims, by a test that fails without it: the token on every
route of the schema and through CLIPLENS_TOKEN, the warning on a bind beyond loopback
without one, CORS on and off, a chunked upload over the limit refused before it is read,
traversal probes sent as raw bytes on the socket in catalog and --index mode, `templates`
taken as literal text, and a rebuilt index of another model leaving the served one alone."""

from __future__ import annotations

import shutil
import socket
from dataclasses import replace
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from cliplens.catalog.db import Catalog
from cliplens.catalog.update import update_catalog
from cliplens.cli.main import main
from cliplens.models.ref import ModelRef
from cliplens.server import ServerSettings, create_app
from conftest import TINY_CFG
from tests_helpers import built_index_from_catalog, live_server

SECRET = b"cliplens-test-secret: not for any client\n"
TOKEN = "s3cret"


@pytest.fixture(scope="module")
def served(tmp_path_factory, tiny_model_dir, photos) -> dict[str, Path]:
    """Two photos indexed into a catalog, a build-index folder over it, and a secret file
    beside the photo folder."""
    root = tmp_path_factory.mktemp("safety").resolve()
    folder = root / "photos"
    folder.mkdir()
    for name in ("cat.jpg", "coffee.jpg"):
        shutil.copy(photos / name, folder / name)
    (root / "secret.txt").write_bytes(SECRET)
    db = root / "catalog.db"
    model = f"local:{tiny_model_dir}"
    with Catalog(db) as cat:
        update_catalog(cat, ModelRef(model), [folder], workers=0)
    index = built_index_from_catalog(root / "index", db, model)
    return {"root": root, "db": db, "index": index}


@pytest.fixture(scope="module")
def settings(tiny_model_dir, served) -> ServerSettings:
    return ServerSettings(model=f"local:{tiny_model_dir}", db=served["db"], precision="fp32")


def _live(settings: ServerSettings):
    """A real uvicorn server on 127.0.0.1 as `serve` runs it; yields its port."""
    return live_server(create_app(settings), settings)


def _raw(port: int, target: bytes, method: bytes = b"GET") -> tuple[int, bytes]:
    """(status, whole response) for a request line sent byte for byte: no client library
    normalises `..` or decodes escapes first."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(method + b" " + target + b" HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        s.sendall(b"Connection: close\r\n\r\n")
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    return int(data.split(b" ", 2)[1]), data


# ------------------------------------------------------------ the token


def _routes(app) -> list[tuple[str, str]]:
    """(method, url) of every operation in the schema, path parameters filled in."""
    return [
        (method.upper(), path.replace("{file_id}", "1").replace("{model}", "m"))
        for path, ops in app.openapi()["paths"].items()
        for method in ops
    ]


WRONG = [
    {},
    {"Authorization": ""},
    {"Authorization": "Bearer"},
    {"Authorization": "Bearer wrong"},
    {"Authorization": f"Bearer {TOKEN}x"},
    {"Authorization": f"Basic {TOKEN}"},
    {"Authorization": f"Token {TOKEN}"},
    {"Authorization": TOKEN},
    {"X-Token": TOKEN},
]


def test_every_route_but_health_refuses_a_missing_or_wrong_token(settings):
    app = create_app(replace(settings, token=TOKEN))
    routes = _routes(app)
    assert len(routes) >= 14 and ("GET", "/v1/health") in routes
    with TestClient(app) as c:
        for method, url in routes:
            for headers in WRONG:
                r = c.request(method, url, headers=headers)
                if url == "/v1/health":
                    assert r.status_code == 200, (method, url, headers)
                    continue
                assert r.status_code == 401, (method, url, headers, r.text)
                error = r.json()["error"]  # OpenAI's shape under /openai/
                assert error == "unauthorized" or error["code"] == "invalid_api_key", error
                assert r.headers["www-authenticate"] == "Bearer"
            right = c.request(method, url, headers={"Authorization": f"Bearer {TOKEN}"})
            assert right.status_code != 401, (method, url)
        # without a token the same routes answer: the 401s above are the token's
        with TestClient(create_app(settings)) as open_app:
            assert all(
                open_app.request(m, u).status_code != 401 for m, u in routes if u != "/v1/health"
            )


@pytest.fixture
def captured(monkeypatch) -> dict:
    """`cliplens serve` up to the point of serving: the settings it would serve with, the
    host it would bind (bound on loopback here), and nothing served."""
    import cliplens.server.listen as listen

    seen: dict = {}
    real_bind = listen.bind

    def bind(host: str, port: int):
        seen["host"] = host
        return real_bind("127.0.0.1", 0)

    def serve(app, settings, sock):
        seen["settings"] = settings
        sock.close()

    monkeypatch.setattr(listen, "bind", bind)
    monkeypatch.setattr(listen, "serve", serve)
    return seen


def test_cliplens_token_protects_a_served_app(capsys, captured, monkeypatch, served, settings):
    argv = ["serve", "--model", settings.model, "--db", str(served["db"])]
    monkeypatch.setenv("CLIPLENS_TOKEN", TOKEN)
    assert main(argv) == 0
    assert captured["settings"].token == TOKEN
    with TestClient(create_app(captured["settings"])) as c:
        assert c.get("/v1/search", params={"q": "a cat"}).status_code == 401
        ok = c.get(
            "/v1/search", params={"q": "a cat"}, headers={"Authorization": f"Bearer {TOKEN}"}
        )
        assert ok.status_code == 200
    monkeypatch.delenv("CLIPLENS_TOKEN")
    assert main(argv) == 0
    assert captured["settings"].token is None


@pytest.mark.parametrize(
    ("host", "token", "warned"),
    [
        ("0.0.0.0", None, True),
        ("192.168.1.20", None, True),
        ("::", None, True),
        ("0.0.0.0", TOKEN, False),
        ("127.0.0.1", None, False),
        ("localhost", None, False),
        ("::1", None, False),
    ],
)
def test_a_bind_beyond_loopback_without_a_token_warns(
    capsys, captured, served, settings, host, token, warned
):
    argv = ["serve", "--model", settings.model, "--db", str(served["db"]), "--host", host]
    assert main([*argv, *(["--token", token] if token else [])]) == 0
    assert captured["host"] == host
    err = capsys.readouterr().err
    assert ("without --token" in err) is warned, err


def test_cors_is_off_unless_an_origin_is_given(settings):
    origin, other = "http://front.example:3000", "http://evil.example"
    preflight = {"Origin": origin, "Access-Control-Request-Method": "POST"}
    with TestClient(create_app(settings)) as c:
        r = c.get("/v1/health", headers={"Origin": origin})
        assert "access-control-allow-origin" not in r.headers
        assert (
            "access-control-allow-origin" not in c.options("/v1/embed", headers=preflight).headers
        )
    with TestClient(create_app(replace(settings, cors_origins=(origin,)))) as c:
        r = c.get("/v1/health", headers={"Origin": origin})
        assert r.headers["access-control-allow-origin"] == origin
        r = c.options(
            "/v1/embed", headers={**preflight, "Access-Control-Request-Headers": "authorization"}
        )
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == origin
        assert "authorization" in r.headers["access-control-allow-headers"].lower()
        r = c.get("/v1/health", headers={"Origin": other})
        assert "access-control-allow-origin" not in r.headers
        assert c.options("/v1/embed", headers={**preflight, "Origin": other}).status_code == 400


# ------------------------------------------------------------ bodies


def test_a_chunked_upload_over_the_limit_is_refused_before_it_is_read(settings):
    """No Content-Length: the body is counted as it streams. The client sends 4x the limit
    and never ends the body; the 413 arrives all the same."""
    limit = 64 * 1024
    with _live(replace(settings, max_upload_mb=limit / 2**20, body_timeout_s=5.0)) as port:
        s = socket.create_connection(("127.0.0.1", port), timeout=5)
        s.sendall(
            b"POST /v1/embed HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\n"
            b"Content-Type: multipart/form-data; boundary=b\r\n\r\n"
        )
        # a well-formed start of a file field, so the form parser reads on and only the
        # byte count can stop it
        head = (
            b'--b\r\nContent-Disposition: form-data; name="images"; filename="big.png"\r\n'
            b"Content-Type: image/png\r\n\r\n"
        )
        s.sendall(b"%x\r\n%s\r\n" % (len(head), head))
        chunk = b"x" * 16 * 1024
        sent = 0
        try:
            while sent < 4 * limit:
                s.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                sent += len(chunk)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server refused and closed while the client was still sending
        data = b""
        try:
            while (more := s.recv(65536)) and b"too_large" not in data + more:
                data += more
            data += more
        except ConnectionResetError:
            pass
        s.close()
    assert data.startswith(b"HTTP/1.1 413"), data[:200]
    assert b"too_large" in data


# ------------------------------------------------------------ traversal, byte for byte

PROBES = [
    b"/v1/images/../../secret.txt",
    b"/v1/images/..%2f..%2fsecret.txt",
    b"/v1/images/%2e%2e/%2e%2e/secret.txt",
    b"/v1/images/%2e%2e%2f%2e%2e%2fsecret.txt",
    b"/v1/images/%252e%252e%252fsecret.txt",
    b"/v1/images/..%5c..%5csecret.txt",
    b"/v1/images/1%00",
    b"/v1/images/1%00.jpg",
    b"/v1/images/99999999999999999999999999999999",
    b"/v1/images/-1",
    b"/v1/images/0x1",
    b"/v1/images/1/../../../../../../etc/passwd",
    b"/v1/thumbs/../../secret.txt",
    b"/v1/thumbs/%2e%2e%2fsecret.txt",
    b"/v1/thumbs/99999999999999999999999999999999",
    b"/v1/similar/%2e%2e%2fsecret.txt",
    b"/v1/similar/99999999999999999999999999999999",
    b"/../../../../../../../../etc/passwd",
    b"/..%2f..%2f..%2f..%2f..%2f..%2fetc%2fpasswd",
    b"/%2e%2e/%2e%2e/%2e%2e/%2e%2e/%2e%2e/%2e%2e/etc/passwd",
    b"/%252e%252e/%252e%252e/%252e%252e/etc/passwd",
    b"/....//....//....//etc/passwd",
    b"/index.html/../../../../../../etc/passwd",
    b"/static/../../../../../../etc/passwd",
    b"//etc/passwd",
    b"/%00/etc/passwd",
]


@pytest.mark.parametrize("mode", ["catalog", "index"])
def test_no_traversal_probe_reads_outside_what_is_served(settings, served, mode):
    changed = {"index": served["index"]} if mode == "index" else {}
    with _live(replace(settings, **changed)) as port:
        status, body = _raw(port, b"/v1/images/1")  # the probes go where a photo is served
        assert status == 200 and body.split(b"\r\n\r\n", 1)[1][:2] == b"\xff\xd8"
        for probe in PROBES:
            status, data = _raw(port, probe)
            assert SECRET not in data and b"root:" not in data, (mode, probe)
            if probe.startswith(b"/v1/"):
                assert 400 <= status < 500, (mode, probe, status)
                assert b"application/json" in data.split(b"\r\n\r\n", 1)[0].lower(), probe
            else:  # the page's own files, or a refusal
                assert status in (200, 400, 404), (mode, probe, status)
                assert status != 200 or b"<html" in data.lower(), (mode, probe)


def test_templates_are_literal_text_and_never_a_file(
    settings, served, photos, tiny, tmp_path, monkeypatch
):
    from cliplens.tasks.classify import classify

    # a path that is also a valid template: read as a file it would give other prompts.
    # Relative and short, so that the label falls inside the tiny model's context (deep in
    # a long temporary path it was cut off: three equal prompts, tied scores)
    monkeypatch.chdir(tmp_path)
    folder = Path("t{}")
    folder.mkdir()
    templates = folder / "templates.txt"
    templates.write_text("a drawing of a {}.\n")
    upload = ("images", ("cat.jpg", (photos / "cat.jpg").read_bytes(), "image/jpeg"))
    labels = "cat,rocket,coffee"
    with TestClient(create_app(settings)) as c:
        r = c.post(
            "/v1/classify", data={"labels": labels, "templates": str(templates)}, files=[upload]
        )
        assert r.status_code == 200, r.text
        literal = classify(tiny, [photos / "cat.jpg"], labels.split(","), [str(templates)])
        from_file = classify(tiny, [photos / "cat.jpg"], labels.split(","), str(templates))
        got = [(x["label"], x["score"]) for x in r.json()["predictions"][0]["labels"]]
        want = literal.predictions[0].labels
        assert len({round(w[1], 3) for w in want}) == 3, want  # no ties to break
        assert [g[0] for g in got] == [w[0] for w in want]
        assert [g[1] for g in got] == pytest.approx([w[1] for w in want], abs=1e-4)
        assert [w[1] for w in want] != pytest.approx(
            [w[1] for w in from_file.predictions[0].labels], abs=1e-4
        )
        r = c.post(
            "/v1/classify", data={"labels": labels, "templates": "/etc/passwd"}, files=[upload]
        )
        assert r.status_code == 400 and b"root:" not in r.content
        assert "'{}'" in r.json()["detail"]  # taken as a template without a place for the label


def test_a_rebuilt_index_of_another_model_leaves_the_served_one(
    tmp_path, settings, served, photos, monkeypatch
):
    """build-index of another model into the served folder: the served index keeps
    answering, with its own model's vectors, and says nothing to the client."""
    import open_clip
    import torch

    from cliplens.models.openclip import save_checkpoint
    from cliplens.server.service import Service

    monkeypatch.setattr(Service, "recheck_s", 0.0)
    torch.manual_seed(7)
    other_dir = save_checkpoint(
        open_clip.CLIP(**TINY_CFG).eval(), tmp_path / "other", TINY_CFG, arch="tiny-other"
    )
    other = f"local:{other_dir}"
    assert ModelRef(other).info.model_id != ModelRef(settings.model).info.model_id
    other_db = tmp_path / "other.db"
    with Catalog(other_db) as cat:
        update_catalog(cat, ModelRef(other), [served["root"] / "photos"], workers=0)
    folder = tmp_path / "served"
    shutil.copytree(served["index"], folder)
    rebuilt = built_index_from_catalog(tmp_path / "rebuilt", other_db, other, lambda p: f"{p}.v2")

    def results(c) -> list[tuple[str, float]]:
        r = c.get("/v1/search", params={"q": "a cat", "n": 2})
        assert r.status_code == 200, r.text
        return [(h["path"], h["score"]) for h in r.json()["results"]]

    with TestClient(create_app(replace(settings, index=folder))) as c:
        before = results(c)
        for name in ("index.faiss", "paths.arrow", "index.json"):  # index.json last
            shutil.copy(rebuilt / name, folder / f".{name}.tmp")
            (folder / f".{name}.tmp").replace(folder / name)
        assert results(c) == before
        assert not any(path.endswith(".v2") for path, _ in results(c))
