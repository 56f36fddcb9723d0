"""What an optimised image may cost: its side, and the memory its optimisation takes.

Shared by the generators of CLIP-guided synthesis (`generation.generate.FourierImage`,
`generation.vqgan.VQGANImage`), which check both before allocating anything: past the memory
left the kernel kills the process instead of raising. Torch-free.
"""

from __future__ import annotations

import math
from pathlib import Path

from cliplens.errors import InvalidInputError
from cliplens.limits import MAX_SIZE, MIN_SIZE

# what the optimisation holds per pixel of a FourierImage: the spectrum, its gradient and
# Adam's two moments, and the forward's intermediates kept for backward (measured: 127 at
# 2048 px, 154 at 1024 px, with a tiny CLIP); other generators add their own activations
IMAGE_BYTES_PER_PIXEL = 160


def check_size(size: int) -> None:
    """Refuse an image side outside MIN_SIZE..MAX_SIZE pixels."""
    if not MIN_SIZE <= size <= MAX_SIZE:
        raise InvalidInputError(f"`size` {size}: use a side of {MIN_SIZE} to {MAX_SIZE} pixels")


def available_memory() -> int | None:
    """Bytes this process can still allocate: the smaller of the kernel's MemAvailable and
    what its cgroup's limit leaves; None where neither can be read."""
    found: list[int] = []
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                found.append(int(line.split()[1]) * 1024)
    except (OSError, ValueError, IndexError):
        pass
    try:
        cgroup = Path("/sys/fs/cgroup")
        limit = (cgroup / "memory.max").read_text().strip()
        if limit != "max":
            found.append(int(limit) - int((cgroup / "memory.current").read_text()))
    except (OSError, ValueError):
        pass
    return min(found) if found else None


def check_memory(
    size: int, bytes_per_pixel: float, free: int | None, frames: int = 0, what: str = ""
) -> None:
    """Refuse an image side whose optimisation (and `frames` kept copies) cannot fit in
    `free` bytes (`available_memory()`; None: unknown, allowed)."""
    per_pixel = bytes_per_pixel + 3 * frames
    need = size * size * per_pixel
    if free is None or need <= 0.8 * free:
        return
    largest = int(math.sqrt(0.8 * free / per_pixel))
    kept = f" and {frames} kept frames" if frames else ""
    raise InvalidInputError(
        f"image size {size}: {what or 'the image'}{kept} would take about {need / 1e9:.1f} GB, and "
        f"{free / 1e9:.1f} GB of memory is free; use a side of at most {largest} pixels"
        + (" or keep fewer frames" if frames else "")
    )
