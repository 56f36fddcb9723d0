"""Checksums of weight files: the model_id of a checkpoint and the integrity of bundled ones.

Hashing a 600 MB checkpoint takes a second or two, so digests are cached by
(path, size, mtime) in CLIPLENS_HOME/hashes.json; a changed file is hashed again.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from pathlib import Path

from cliplens.errors import ModelIntegrityError
from cliplens.settings import get_settings
from cliplens.store.files import write_atomic


def _load_cache(path: Path) -> dict[str, list]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _save_cache(path: Path, cache: dict[str, list]) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, lambda tmp: tmp.write_text(json.dumps(cache)))
    except OSError:
        pass  # a read-only home only costs re-hashing next time


def sha256_file(path: str | os.PathLike) -> str:
    path = Path(path).resolve()
    st = path.stat()
    key, stamp = str(path), [st.st_size, st.st_mtime_ns]
    cache_path = get_settings().hash_cache
    cache = _load_cache(cache_path)
    hit = cache.get(key)
    if hit and hit[:2] == stamp:
        return hit[2]
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    digest = h.hexdigest()
    cache[key] = [*stamp, digest]
    _save_cache(cache_path, cache)
    return digest


def combined_digest(paths: Iterable[str | os.PathLike], length: int = 16) -> str:
    """One short digest for a set of weight files (a checkpoint folder, two towers)."""
    digests = [sha256_file(p) for p in sorted(Path(p) for p in paths)]
    if len(digests) == 1:
        return digests[0][:length]
    return hashlib.sha256("".join(digests).encode()).hexdigest()[:length]


def verify_sha256(path: Path, expected: str, what: str) -> None:
    """Raise unless the file's sha256 starts with `expected` (a full digest or a prefix)."""
    digest = sha256_file(path)
    if not digest.startswith(expected.lower()):
        raise ModelIntegrityError(
            f"{path}: sha256 {digest[:16]}... is not the published {what} ({expected[:16]}...); "
            f"the file is damaged or replaced, reinstall the package that ships it"
        )
