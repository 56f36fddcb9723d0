"""Serving the app over HTTP with uvicorn, with a bound on slow request heads.

uvicorn (0.54 here) times out only idle keep-alive connections, and only until the first
byte of the next request: a client that sends its request head slowly, or one byte and
then nothing, holds its connection (and a file descriptor) for ever; 100 such clients
stayed connected for 60 s. `guarded_protocol` closes a connection whose request head has
not arrived `head_timeout_s` after the connection opened or the previous response ended.
A body that stalls is the app's to bound (the 408 of app.py), so it holds under any
server. The listening socket is bound here, before uvicorn starts, so that a port in use
is one typed error instead of uvicorn's log line and exit.
"""

from __future__ import annotations

import asyncio
import socket
from typing import Any

import uvicorn
from uvicorn.protocols.http.auto import AutoHTTPProtocol

from cliplens.errors import ClipLensError, InvalidInputError
from cliplens.server.service import ServerSettings


class ListenError(ClipLensError):
    """The server cannot listen on the address it was given."""


def guarded_protocol(head_timeout_s: float) -> type[asyncio.Protocol]:
    """uvicorn's HTTP protocol (httptools where installed, else h11), plus the head timeout.

    Both of uvicorn's protocols make a new `self.cycle` when a request head is complete
    and call `on_response_complete` when a response ends; a timer armed at the connection's
    start and at each response's end closes the connection if no new cycle began."""

    class HeadTimeoutProtocol(AutoHTTPProtocol):  # type: ignore[misc, valid-type]
        _head_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            self._arm_head_timer()

        def on_response_complete(self) -> None:
            # armed first: a pipelined request that super() parses starts a new cycle
            self._arm_head_timer()
            super().on_response_complete()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm_head_timer()
            super().connection_lost(exc)

        def _arm_head_timer(self) -> None:
            self._disarm_head_timer()
            waiting = self.cycle
            self._head_timer = self.loop.call_later(head_timeout_s, self._head_late, waiting)

        def _disarm_head_timer(self) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None

        def _head_late(self, waiting: Any) -> None:
            self._head_timer = None
            transport = self.transport
            if transport.get_protocol() is not self:  # upgraded to a WebSocket: not ours
                return
            if self.cycle is waiting and not transport.is_closing():
                transport.close()

    return HeadTimeoutProtocol


def bind(host: str, port: int) -> socket.socket:
    """A TCP socket bound to host:port as uvicorn would bind it (it listens on it)."""
    shown = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except (socket.gaierror, UnicodeError) as e:
        sock.close()
        why = f"--host {host} is not an address of this machine ({e})"
        raise InvalidInputError(f"{why}; give an IP address or a local host name") from None
    except OSError as e:
        sock.close()
        why = f"cannot listen on {shown} ({(e.strerror or str(e)).lower()})"
        fix = "choose another --port (or --host), or stop what uses it"
        raise ListenError(f"{why}; {fix}") from None
    return sock


def uvicorn_config(app: Any, settings: ServerSettings) -> uvicorn.Config:
    """The uvicorn Config that `serve` runs: the guarded protocol and the settings' timeouts."""
    return uvicorn.Config(
        app,
        http=guarded_protocol(settings.head_timeout_s),
        timeout_keep_alive=settings.keep_alive_s,
        log_level="warning",
    )


def serve(app: Any, settings: ServerSettings, sock: socket.socket) -> None:
    """Serve `app` on the bound socket until interrupted."""
    uvicorn.Server(uvicorn_config(app, settings)).run(sockets=[sock])
