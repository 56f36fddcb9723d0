"""encode_images throughput of ViT-B-32-256 (rclip's network) at fp32 and bf16.

Random weights: speed does not depend on weight values. Images are 256x256 PIL images
in memory, so the figure is preprocessing + the network, without JPEG decoding
(bench_decode.py measures that). Also reports how far bf16 embeddings are from fp32
ones on scikit-image's real photos (cosine).

    python benchmarks/bench_encode.py [--seconds 20] [--batch-sizes 8,32,64] [--out f.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
import open_clip
import torch
from PIL import Image

from cliplens.device import Precision, cpu_has_fast_bf16
from cliplens.models.openclip import OpenClipEncoder

ARCH = "ViT-B-32-256"


def build(precision: Precision) -> OpenClipEncoder:
    torch.manual_seed(0)
    model = open_clip.create_model(ARCH, pretrained=None)
    return OpenClipEncoder.from_model(
        model,
        open_clip.get_tokenizer(ARCH),
        name=f"{ARCH}:random",
        arch=ARCH,
        model_id=f"{ARCH}:random",
        device=torch.device("cpu"),
        precision=precision,
    )


def throughput(encoder: OpenClipEncoder, batch: int, seconds: float) -> float:
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (256, 256, 3), dtype=np.uint8))] * batch
    encoder.encode_images(images, batch_size=batch)  # warm-up
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        encoder.encode_images(images, batch_size=batch)
        done += batch
    return done / (time.perf_counter() - start)


def photos() -> list[Image.Image]:
    from skimage import data

    names = ("chelsea", "coffee", "rocket", "astronaut", "camera", "coins", "moon", "brick")
    return [Image.fromarray(getattr(data, n)()) for n in names]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--seconds", type=float, default=20)
    ap.add_argument("--batch-sizes", default="8,32,64")
    ap.add_argument("--out")
    args = ap.parse_args()
    results: dict = {
        "cpu": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "fast_bf16": cpu_has_fast_bf16(),
        "torch": torch.__version__,
        "images_per_s": {},
    }
    encoders = {p: build(p) for p in (Precision.FP32, Precision.BF16)}
    for p, enc in encoders.items():
        for bs in (int(b) for b in args.batch_sizes.split(",")):
            rate = throughput(enc, bs, args.seconds)
            results["images_per_s"][f"{p.value} batch {bs}"] = round(rate, 1)
            print(f"{p.value:5s} batch {bs:3d}: {rate:6.1f} images/s", flush=True)
    imgs = photos()
    a = encoders[Precision.FP32].encode_images(imgs)
    b = encoders[Precision.BF16].encode_images(imgs)
    cos = (a * b).sum(1)
    results["bf16_vs_fp32_cosine"] = {"min": float(cos.min()), "mean": float(cos.mean())}
    print(f"bf16 vs fp32 cosine on {len(imgs)} photos: min {cos.min():.5f}, mean {cos.mean():.5f}")
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
