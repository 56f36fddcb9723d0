"""Writing files so that a crash or a full disk never leaves a half-written one."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO


def _read_umask() -> int:
    mask = os.umask(0o022)  # reading the umask means setting it: put it straight back
    os.umask(mask)
    return mask


# read once, at import: changing it for a moment on every write would race other threads
_MODE = 0o666 & ~_read_umask()


def read_record(path: Path, format: int, model_id: str) -> dict[str, Any] | None:
    """A JSON record of `model_id` in `format`, or None (missing, damaged, or another's)."""
    import json

    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    ok = isinstance(meta, dict) and meta.get("format") == format
    return meta if ok and meta.get("model_id") == model_id else None


def write_atomic(path: Path, write: Callable[[Path], None]) -> None:
    """Write `path` through a temporary file in its folder, renamed into place when
    complete: readers see the old file or the new one, never a part. A failed write
    (disk full, an exception) removes the temporary file. The file gets the mode a
    plain `open` would give it (0666 less the umask), not mkstemp's 0600."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    temporary = Path(tmp)
    try:
        write(temporary)
        temporary.chmod(_MODE)
        temporary.replace(path)
    finally:
        temporary.unlink(missing_ok=True)


def write_atomic_binary(path: Path, write: Callable[[BinaryIO], None]) -> None:
    """`write_atomic` for writers that take an open file, such as np.save and np.savez
    (given a file name, they would append .npy or .npz to it)."""

    def to_file(temporary: Path) -> None:
        with temporary.open("wb") as f:
            write(f)

    write_atomic(path, to_file)
