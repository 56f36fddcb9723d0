"""Fetching an image a client names by URL (clip-retrieval's `image_url`), without letting
the server be turned against its own network.

A URL given to a server is a request the server makes on the client's behalf, from
inside whatever network the server sits in (server-side request forgery): a cloud
instance's metadata service at 169.254.169.254, a database on localhost, a router's page
on 192.168.0.1. So, and only when the operator allows fetching at all (`serve
--allow-url-fetch`):

- only http and https, on any port, with no user name or password in the URL;
- the host name is resolved once, and every address it resolves to must be public
  (`ipaddress`'s `is_global`, with IPv4 written inside IPv6 judged as IPv4): loopback,
  private, link-local, shared, multicast, reserved and unspecified addresses are refused;
- the connection goes to the address that was checked (never resolved again, so a DNS
  answer that changes in between cannot point it elsewhere); https still verifies the
  certificate for the host name;
- a redirect is a new URL that passes the same checks, at most `MAX_REDIRECTS` of them;
- the response must arrive within `timeout_s` in all, and be at most `max_bytes` long
  (by Content-Length, and as it is read).

The bytes then go through the same image checks as an upload.
"""

from __future__ import annotations

import http.client
import ipaddress
import socket
import ssl
import time
from collections.abc import Callable
from urllib.parse import urljoin, urlsplit

from cliplens.errors import InvalidInputError

MAX_REDIRECTS = 3
_CHUNK = 64 * 1024
_AGENT = "cliplens (image fetch)"


class FetchError(InvalidInputError):
    """A URL the server will not fetch, or a fetch that failed; the message says which."""


def address_allowed(address: str) -> bool:
    """Whether the server may connect to this resolved address: public ones only."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])  # an IPv6 zone is not part of it
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_global and not ip.is_multicast


def resolve(host: str, port: int) -> list[str]:
    """The addresses `host` resolves to (a literal address resolves to itself)."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


class _PinnedHTTP(http.client.HTTPConnection):
    """A connection to an address already checked, for a URL's host name."""

    def __init__(self, host: str, address: str, port: int, timeout: float) -> None:
        super().__init__(host, port, timeout=timeout)
        self.address = address

    def connect(self) -> None:
        self.sock = socket.create_connection((self.address, self.port), self.timeout)


class _PinnedHTTPS(http.client.HTTPSConnection):
    def __init__(self, host: str, address: str, port: int, timeout: float) -> None:
        super().__init__(host, port, timeout=timeout, context=ssl.create_default_context())
        self.address = address

    def connect(self) -> None:
        sock = socket.create_connection((self.address, self.port), self.timeout)
        self.sock = self._context.wrap_socket(sock, server_hostname=self.host)


def fetch(
    url: str,
    *,
    max_bytes: int,
    timeout_s: float,
    allowed: Callable[[str], bool] = address_allowed,
) -> bytes:
    """The body of `url` under the rules above (FetchError otherwise)."""
    deadline = time.monotonic() + timeout_s
    for _ in range(MAX_REDIRECTS + 1):
        status, location, body = _get(url, max_bytes, deadline, allowed)
        if status in (301, 302, 303, 307, 308):
            if not location:
                raise FetchError(f"image_url: {status} redirect without a Location from {url}")
            url = urljoin(url, location)
            continue
        if status != 200:
            raise FetchError(f"image_url: the server at {_origin(url)} answered {status}")
        return body
    raise FetchError(f"image_url: more than {MAX_REDIRECTS} redirects; give the image's own URL")


def _origin(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}"


def _get(
    url: str, max_bytes: int, deadline: float, allowed: Callable[[str], bool]
) -> tuple[int, str | None, bytes]:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https"):
        raise FetchError(f"image_url: only http and https URLs are fetched, not {url[:100]!r}")
    if parts.username is not None or parts.password is not None:
        raise FetchError("image_url: a URL with a user name or password is not fetched")
    host = parts.hostname
    if not host:
        raise FetchError(f"image_url: no host in {url[:100]!r}")
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError as e:
        raise FetchError(f"image_url: bad port in {url[:100]!r}") from e
    try:
        addresses = resolve(host, port)
    except (OSError, UnicodeError) as e:
        raise FetchError(f"image_url: cannot resolve {host} ({type(e).__name__})") from e
    refused = [a for a in addresses if not allowed(a)]
    if refused or not addresses:
        raise FetchError(
            f"image_url: {host} is not a public address ({refused[0] if refused else 'none'}); "
            "the server fetches images from public hosts only"
        )
    left = deadline - time.monotonic()
    if left <= 0:
        raise FetchError("image_url: the fetch took too long; give a faster host")
    kind = _PinnedHTTPS if parts.scheme == "https" else _PinnedHTTP
    conn = kind(host, addresses[0], port, timeout=left)
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    try:
        conn.request("GET", path, headers={"User-Agent": _AGENT, "Accept": "image/*"})
        response = conn.getresponse()
        if response.status != 200:
            return response.status, response.getheader("Location"), b""
        length = response.getheader("Content-Length")
        if length and length.isdigit() and int(length) > max_bytes:
            raise FetchError(f"image_url: the image is over {max_bytes / 1e6:g} MB; send less")
        chunks, seen = [], 0
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError
            if conn.sock is not None:  # each read waits only as long as the fetch has left
                conn.sock.settimeout(left)
            chunk = response.read1(_CHUNK)
            if not chunk:
                return 200, None, b"".join(chunks)
            seen += len(chunk)
            if seen > max_bytes:
                raise FetchError(f"image_url: the image is over {max_bytes / 1e6:g} MB; send less")
            chunks.append(chunk)
    except (OSError, http.client.HTTPException) as e:
        if isinstance(e, TimeoutError):
            raise FetchError("image_url: the fetch took too long; give a faster host") from e
        why = f"image_url: fetching from {_origin(url)} failed ({type(e).__name__})"
        raise FetchError(why) from e
    finally:
        conn.close()
