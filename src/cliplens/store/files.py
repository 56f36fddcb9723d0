"""Writing files so that a crash or a full disk never leaves a half-written one."""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path


def _umask() -> int:
    mask = os.umask(0o022)  # reading the umask means setting it: put it straight back
    os.umask(mask)
    return mask


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
        temporary.chmod(0o666 & ~_umask())
        temporary.replace(path)
    finally:
        temporary.unlink(missing_ok=True)


def remove_stale_temporaries(folder: Path, pattern: str, older_than_s: float = 3600) -> None:
    """Remove temporary files a killed writer left (a live writer's are younger)."""
    cutoff = time.time() - older_than_s
    for tmp in folder.glob(pattern):
        try:
            if tmp.stat().st_mtime < cutoff:
                tmp.unlink()
        except OSError:
            pass
