"""Fetching an image by URL (server/fetch.py) without reaching the server's own network.

The servers here listen on loopback only. To play a public host, a test lets exactly
127.0.0.1 through the address rule; 127.0.0.2 (also loopback, on Linux) keeps playing a
private one, so every test also checks that the private server was never reached."""

from __future__ import annotations

import http.server
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import ClassVar

import pytest

from cliplens.server import fetch as fetch_module
from cliplens.server.fetch import FetchError, address_allowed, fetch

PUBLIC, PRIVATE = "127.0.0.1", "127.0.0.2"
BODY = b"\xff\xd8" + b"x" * 5000


def as_if_public(address: str) -> bool:
    return address == PUBLIC or address_allowed(address)


class Handler(http.server.BaseHTTPRequestHandler):
    routes: ClassVar[dict[str, tuple[int, dict[str, str], bytes]]] = {}
    hits: ClassVar[list[tuple[str, str, str]]] = []  # (server address, path, Host header)

    def do_GET(self) -> None:
        self.hits.append((self.server.server_address[0], self.path, self.headers["Host"]))
        status, headers, body = self.routes.get(self.path, (404, {}, b""))
        if self.path == "/trickle":
            self.send_response(200)
            self.end_headers()
            for _ in range(50):  # a byte every 0.1 s: each read is quick, the whole is not
                self.wfile.write(b"x")
                self.wfile.flush()
                time.sleep(0.1)
            return
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        if "Content-Length" not in headers and self.path != "/chunked":
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@contextmanager
def server(address: str) -> Iterator[int]:
    httpd = http.server.ThreadingHTTPServer((address, 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield httpd.server_address[1]
    finally:
        httpd.shutdown()
        httpd.server_close()


@pytest.fixture
def hosts() -> Iterator[tuple[int, int]]:
    Handler.hits = []
    with server(PUBLIC) as public, server(PRIVATE) as private:
        Handler.routes = {
            "/cat.jpg": (200, {"Content-Type": "image/jpeg"}, BODY),
            "/to-private": (302, {"Location": f"http://{PRIVATE}:{private}/cat.jpg"}, b""),
            "/to-cat": (301, {"Location": "/cat.jpg"}, b""),
            "/loop": (302, {"Location": "/loop"}, b""),
            "/big": (200, {}, b"x" * 20_000),
            "/lies": (200, {"Content-Length": "999999999"}, b"x"),
            "/chunked": (200, {"Connection": "close"}, b"x" * 20_000),
        }
        yield public, private


@pytest.mark.parametrize(
    "address",
    [
        "127.0.0.1",
        "10.1.2.3",
        "172.16.0.9",
        "192.168.1.1",
        "169.254.169.254",  # cloud metadata
        "100.64.0.1",  # shared address space
        "0.0.0.0",
        "224.0.0.1",
        "255.255.255.255",
        "::1",
        "fe80::1%eth0",
        "fc00::1",
        "::ffff:127.0.0.1",  # IPv4 inside IPv6
        "::ffff:10.0.0.1",
        "ff02::1",
    ],
)
def test_addresses_that_are_not_public_are_refused(address):
    assert not address_allowed(address)


@pytest.mark.parametrize("address", ["8.8.8.8", "1.1.1.1", "2606:4700:4700::1111"])
def test_public_addresses_are_allowed(address):
    assert address_allowed(address)


def test_loopback_by_name_or_number_is_never_fetched(hosts):
    public, _ = hosts
    for url in (f"http://localhost:{public}/cat.jpg", f"http://127.0.0.1:{public}/cat.jpg"):
        with pytest.raises(FetchError, match="not a public address"):
            fetch(url, max_bytes=10**6, timeout_s=5)
    assert Handler.hits == []


def test_a_public_host_is_fetched_at_the_address_that_was_checked(hosts, monkeypatch):
    public, _ = hosts
    assert (
        fetch(
            f"http://{PUBLIC}:{public}/cat.jpg", max_bytes=10**6, timeout_s=5, allowed=as_if_public
        )
        == BODY
    )
    # a name is resolved once and connected to as resolved, the name kept as the Host
    monkeypatch.setattr(fetch_module, "resolve", lambda host, port: [PUBLIC])
    got = fetch(
        f"http://photos.test:{public}/to-cat", max_bytes=10**6, timeout_s=5, allowed=as_if_public
    )
    assert got == BODY
    assert Handler.hits[-2:] == [
        (PUBLIC, "/to-cat", f"photos.test:{public}"),
        (PUBLIC, "/cat.jpg", f"photos.test:{public}"),
    ]


def test_a_name_that_resolves_to_a_private_address_is_refused(hosts, monkeypatch):
    _, private = hosts
    monkeypatch.setattr(fetch_module, "resolve", lambda host, port: [PUBLIC, PRIVATE])
    with pytest.raises(FetchError, match=r"not a public address \(127\.0\.0\.2\)"):
        fetch(
            f"http://photos.test:{private}/cat.jpg",
            max_bytes=10**6,
            timeout_s=5,
            allowed=as_if_public,
        )
    assert Handler.hits == []


def test_a_redirect_to_a_private_address_is_refused(hosts):
    public, _ = hosts
    with pytest.raises(FetchError, match="not a public address"):
        fetch(
            f"http://{PUBLIC}:{public}/to-private",
            max_bytes=10**6,
            timeout_s=5,
            allowed=as_if_public,
        )
    assert [h[0] for h in Handler.hits] == [PUBLIC]  # the private server was never reached


def test_redirects_are_bounded(hosts):
    public, _ = hosts
    with pytest.raises(FetchError, match="more than 3 redirects"):
        fetch(f"http://{PUBLIC}:{public}/loop", max_bytes=10**6, timeout_s=5, allowed=as_if_public)
    assert len(Handler.hits) == 4


@pytest.mark.parametrize("path", ["/big", "/lies", "/chunked"])
def test_a_body_over_the_limit_is_refused(hosts, path):
    public, _ = hosts
    with pytest.raises(FetchError, match=r"over 0\.01 MB"):
        fetch(
            f"http://{PUBLIC}:{public}{path}", max_bytes=10_000, timeout_s=5, allowed=as_if_public
        )


def test_a_slow_body_is_cut_at_the_time_limit(hosts):
    public, _ = hosts
    start = time.monotonic()
    with pytest.raises(FetchError, match="took too long"):
        fetch(
            f"http://{PUBLIC}:{public}/trickle", max_bytes=10**6, timeout_s=1, allowed=as_if_public
        )
    assert time.monotonic() - start < 4  # the trickle alone takes 5 s


@pytest.mark.parametrize(
    ("url", "why"),
    [
        ("file:///etc/passwd", "only http and https"),
        ("ftp://8.8.8.8/x.jpg", "only http and https"),
        ("gopher://8.8.8.8/", "only http and https"),
        ("http://user:secret@8.8.8.8/x.jpg", "user name or password"),
        ("http:///x.jpg", "no host"),
        ("http://8.8.8.8:99999/x.jpg", "bad port"),
    ],
)
def test_urls_that_are_not_plain_web_addresses_are_refused(url, why):
    with pytest.raises(FetchError, match=why):
        fetch(url, max_bytes=10**6, timeout_s=1)


def test_an_error_status_is_reported(hosts):
    public, _ = hosts
    with pytest.raises(FetchError, match="answered 404"):
        fetch(
            f"http://{PUBLIC}:{public}/missing", max_bytes=10**6, timeout_s=5, allowed=as_if_public
        )
