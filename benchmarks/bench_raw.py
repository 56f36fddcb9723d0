"""What a camera RAW costs to decode through `open_image`, per path, against a JPEG.

A 4032x3024 (12 MP) DNG is made from a photo-like image (scikit-image's astronaut,
upscaled, with sensor-like grain), as tests/dng_files.py makes them: an RGGB mosaic,
12-bit, uncompressed, in 16-bit samples or packed in 12 bits (camera DNGs are mostly
lossless-JPEG compressed, which pidng cannot write on Python >= 3.10), with an embedded
JPEG preview of 1616x1080 (Sony-sized) or 4032x3024 (Canon and Nikon embed full-size
ones), or none. Each decode runs n times after a warm-up, with `min_size` 256 (what the
default model asks), or None (the whole image). Files are read from the page cache, as
the indexer reads them right after hashing them.

    PYTHONPATH=src python benchmarks/bench_raw.py --n 5 --out raw.json
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from cliplens.images import open_image
from cliplens.raw import RAW_INFO_KEY

WIDTH, HEIGHT = 4032, 3024
TESTS = Path(__file__).resolve().parents[1] / "tests"


def make_photo(seed: int = 0) -> Image.Image:
    from skimage import data

    base = Image.fromarray(data.astronaut()).resize((WIDTH, HEIGHT), Image.Resampling.LANCZOS)
    grain = np.random.default_rng(seed).normal(0.0, 5.0, (HEIGHT, WIDTH, 1))
    return Image.fromarray(np.clip(np.asarray(base, np.float32) + grain, 0, 255).astype(np.uint8))


def make_files(folder: Path) -> dict[str, Path]:
    """The files each case decodes: JPEG references and DNGs."""
    sys.path.insert(0, str(TESTS))
    dng = importlib.import_module("dng_files")  # the test suite's DNG writer
    photo = make_photo()
    files = {"jpeg": folder / "photo.jpg"}
    photo.save(files["jpeg"], "JPEG", quality=90)
    rgb = np.asarray(photo)
    for bits in (16, 12):
        suffix = f"{bits}bit"
        data = dng.dng_bytes(rgb, 1, bits)
        files[f"dng-{suffix}"] = folder / f"raw-{suffix}.dng"
        files[f"dng-{suffix}"].write_bytes(data)
        for name, size in (("small", (1616, 1080)), ("full", (WIDTH, HEIGHT))):
            jpeg = dng.jpeg_bytes(photo.resize(size, Image.Resampling.LANCZOS))
            path = folder / f"raw-{suffix}-preview-{name}.dng"
            path.write_bytes(dng.with_preview(data, jpeg))
            files[f"dng-{suffix}-preview-{name}"] = path
    return files


def time_ms(path: Path, n: int, min_size: int | None) -> dict:
    image = open_image(path, min_size=min_size)  # warm-up: page cache, rawpy's import
    times = []
    for _ in range(n):
        start = time.perf_counter()
        open_image(path, min_size=min_size)
        times.append((time.perf_counter() - start) * 1000.0)
    return {
        "path": image.info.get(RAW_INFO_KEY, "jpeg"),
        "size": list(image.size),
        "median_ms": round(statistics.median(times), 1),
        "min_ms": round(min(times), 1),
        "runs": n,
    }


CASES = [  # (label, file, min_size)
    ("JPEG 12 MP, draft decode", "jpeg", 256),
    ("JPEG 12 MP, whole", "jpeg", None),
    ("DNG, 1616x1080 preview", "dng-12bit-preview-small", 256),
    ("DNG, 4032x3024 preview", "dng-12bit-preview-full", 256),
    ("DNG 12-bit packed, half-size demosaic", "dng-12bit", 256),
    ("DNG 16-bit, half-size demosaic", "dng-16bit", 256),
    ("DNG 12-bit packed, full demosaic", "dng-12bit", None),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=5, help="timed decodes per case")
    parser.add_argument("--out", type=Path, help="also write the numbers to this JSON file")
    args = parser.parse_args()
    import rawpy

    results = {
        "machine": {
            "cpus": os.cpu_count(),
            "processor": platform.processor() or platform.machine(),
            "python": platform.python_version(),
            "rawpy": rawpy.__version__,
            "libraw": ".".join(map(str, rawpy.libraw_version)),
            "omp_num_threads": os.environ.get("OMP_NUM_THREADS", "(default)"),
        },
        "cases": [],
    }
    with tempfile.TemporaryDirectory() as tmp:
        files = make_files(Path(tmp))
        sizes = {k: p.stat().st_size for k, p in files.items()}
        for label, key, min_size in CASES:
            row = {"case": label, "min_size": min_size, "file_mb": round(sizes[key] / 1e6, 1)}
            row |= time_ms(files[key], args.n, min_size)
            results["cases"].append(row)
            print(
                f"{label:42s} {row['median_ms']:8.1f} ms median ({row['min_ms']:.1f} min)"
                f"  -> {row['path']} {row['size'][0]}x{row['size'][1]}, {row['file_mb']} MB",
                flush=True,
            )
    print(json.dumps(results["machine"]))
    if args.out:
        args.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
