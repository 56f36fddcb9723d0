"""Full JPEG decode vs libjpeg draft (reduced-scale) decode through `open_image`.

A 4032x3024 phone-sized photo is decoded n times each way. Tasks resize to ~224 px anyway,
so passing `min_size` lets libjpeg skip most of the IDCT work. The test photo is synthetic
but photo-like (a real photo from scikit-image, upscaled, plus sensor-like noise) so its
entropy, and thus decode cost, resembles a camera JPEG; a flat image would decode faster.

    PYTHONPATH=src python benchmarks/bench_decode.py --n 10 --size 256 --out decode.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import PIL
from PIL import Image

from cliplens.images import open_image

WIDTH, HEIGHT = 4032, 3024


def make_photo(path: Path, seed: int = 0) -> None:
    """Write a quality-90 4032x3024 JPEG with photographic content (~3 MB)."""
    from skimage import data

    base = Image.fromarray(data.astronaut()).resize((WIDTH, HEIGHT), Image.Resampling.LANCZOS)
    # luminance grain, like a sensor's; chroma stays smooth, as in camera JPEGs
    grain = np.random.default_rng(seed).normal(0.0, 5.0, (HEIGHT, WIDTH, 1))
    pixels = np.clip(np.asarray(base, np.float32) + grain, 0, 255).astype(np.uint8)
    Image.fromarray(pixels).save(path, format="JPEG", quality=90)


def time_ms(path: Path, n: int, min_size: int | None) -> tuple[list[float], tuple[int, int]]:
    """n timings in ms after one warm-up, and the size of the image returned."""
    size = open_image(path, min_size=min_size).size  # warm-up: page cache, plugin import
    times = []
    for _ in range(n):
        start = time.perf_counter()
        open_image(path, min_size=min_size)
        times.append((time.perf_counter() - start) * 1000.0)
    return times, size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=10, help="timed decodes per mode")
    parser.add_argument("--size", type=int, default=256, help="min_size for the draft decode")
    parser.add_argument("--out", type=Path, help="also write the numbers to this JSON file")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "photo.jpg"
        make_photo(path)
        file_bytes = path.stat().st_size
        full, full_size = time_ms(path, args.n, None)
        draft, draft_size = time_ms(path, args.n, args.size)

    full_ms, draft_ms = statistics.median(full), statistics.median(draft)
    print(
        f"{WIDTH}x{HEIGHT} JPEG, quality 90, {file_bytes / 1e6:.2f} MB; n={args.n}; "
        f"Pillow {PIL.__version__}; {platform.machine()} {platform.python_version()}\n"
    )
    print("| decode | returned size | median ms |")
    print("|---|---|---|")
    print(f"| full | {full_size[0]}x{full_size[1]} | {full_ms:.1f} |")
    print(f"| draft (min_size={args.size}) | {draft_size[0]}x{draft_size[1]} | {draft_ms:.1f} |")
    print(f"\nspeed-up: {full_ms / draft_ms:.1f}x")
    if args.out:
        result = {
            "width": WIDTH,
            "height": HEIGHT,
            "file_bytes": file_bytes,
            "n": args.n,
            "min_size": args.size,
            "full_ms": {"median": full_ms, "all": full, "size": list(full_size)},
            "draft_ms": {"median": draft_ms, "all": draft, "size": list(draft_size)},
            "speedup": full_ms / draft_ms,
            "pillow": PIL.__version__,
            "machine": platform.machine(),
            "python": platform.python_version(),
        }
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
