"""Reaching the Hugging Face hub, for every backend that downloads weights from it
(open_clip names, `transformers:`, `multilingual:`): fail in milliseconds when offline,
with the one error that names the model, the cache and the offline alternatives.
Torch-free."""

from __future__ import annotations

import socket
import urllib.request
from pathlib import Path
from urllib.parse import urlparse

from cliplens.errors import ModelUnavailableError


def check_reachable(name: str, cache: Path, url: str | None = None) -> None:
    """ModelUnavailableError at once when the hub (or `url`'s host) cannot be reached,
    instead of the hub client's minute of retries."""
    from huggingface_hub import constants  # light, but only where weights are fetched

    if constants.HF_HUB_OFFLINE:
        raise ModelUnavailableError(name, cache, "HF_HUB_OFFLINE is set")
    target = urlparse(url or constants.ENDPOINT)
    host = target.hostname or "huggingface.co"
    proxy = _proxy_for(target.scheme or "https", host)
    if proxy is not None:  # the hub is reached through it: only the proxy must resolve
        try:
            socket.getaddrinfo(proxy, 443)
        except OSError as e:
            reason = f"no network: cannot resolve the proxy {proxy} that reaches {host}"
            raise ModelUnavailableError(name, cache, reason) from e
        return
    try:
        socket.getaddrinfo(host, 443)
    except OSError as e:
        raise ModelUnavailableError(name, cache, f"no network: cannot resolve {host}") from e


def _proxy_for(scheme: str, host: str) -> str | None:
    """The host of the proxy the environment sets for `scheme` (HTTPS_PROXY, ALL_PROXY...,
    as the hub client reads them), unless NO_PROXY leaves `host` out; None when none."""
    proxies = urllib.request.getproxies()
    proxy = proxies.get(scheme) or proxies.get("all")
    if not proxy or urllib.request.proxy_bypass(host):
        return None
    parsed = urlparse(proxy if "//" in proxy else f"//{proxy}")
    return parsed.hostname


def short_reason(e: BaseException) -> str:
    """An exception as a few words on one line: its type, then its message cut at 200."""
    text = " ".join(str(e).split())
    text = text if len(text) <= 200 else text[:197] + "..."
    return type(e).__name__ + (f": {text}" if text else "")
