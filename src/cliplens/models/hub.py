"""Reaching the Hugging Face hub, for every backend that downloads weights from it
(open_clip names, `transformers:`, `multilingual:`): fail in milliseconds when offline,
with the one error that names the model, the cache and the offline alternatives.
Torch-free."""

from __future__ import annotations

import socket
from pathlib import Path
from urllib.parse import urlparse

from cliplens.errors import ModelUnavailableError


def check_reachable(name: str, cache: Path, url: str | None = None) -> None:
    """ModelUnavailableError at once when the hub (or `url`'s host) cannot be reached,
    instead of the hub client's minute of retries."""
    from huggingface_hub import constants  # light, but only where weights are fetched

    if constants.HF_HUB_OFFLINE:
        raise ModelUnavailableError(name, cache, "HF_HUB_OFFLINE is set")
    host = urlparse(url or constants.ENDPOINT).hostname or "huggingface.co"
    try:
        socket.getaddrinfo(host, 443)
    except OSError as e:
        raise ModelUnavailableError(name, cache, f"no network: cannot resolve {host}") from e


def short_reason(e: BaseException) -> str:
    """An exception as a few words on one line: its type, then its message cut at 200."""
    text = " ".join(str(e).split())
    text = text if len(text) <= 200 else text[:197] + "..."
    return type(e).__name__ + (f": {text}" if text else "")
