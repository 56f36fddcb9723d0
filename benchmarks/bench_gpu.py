"""CUDA path check and throughput, for a machine with an NVIDIA GPU.

Checks that load_model picks cuda and a half precision by itself, that the GPU's
embeddings agree with CPU fp32 ones (cosine, real photos), and measures ViT-B-32-256
throughput of the network alone (pixels already on the GPU) and of encode_images
end to end (PIL images in memory: preprocessing on the CPU included).

    python benchmarks/bench_gpu.py [--out gpu.json]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import open_clip
import torch

from bench_encode import ARCH, photos
from cliplens import load_model
from cliplens.device import Precision
from cliplens.models.openclip import save_checkpoint


def net_rate(encoder, batch: int, seconds: float = 5.0) -> float:
    x = torch.randn(batch, 3, 256, 256, device="cuda")
    for _ in range(3):
        encoder._encode_pixels(x)
    torch.cuda.synchronize()
    done, start = 0, time.perf_counter()
    with torch.inference_mode():
        while time.perf_counter() - start < seconds:
            encoder._encode_pixels(x)
            done += batch
        torch.cuda.synchronize()
    return done / (time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out")
    args = ap.parse_args()
    res: dict = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__}
    torch.manual_seed(0)
    model = open_clip.create_model(ARCH, pretrained=None)
    with tempfile.TemporaryDirectory() as tmp:
        state = Path(tmp) / "vit.pt"
        torch.save(model.state_dict(), state)
        auto = load_model(f"{ARCH}:{state}")
        res["auto_device"], res["auto_precision"] = auto.info.device, auto.info.precision
        cpu = load_model(f"{ARCH}:{state}", device="cpu", precision="fp32")
        imgs = photos()
        ref = cpu.encode_images(imgs)
        res["cosine_to_cpu_fp32"] = {}
        res["network_images_per_s"] = {}
        for p in (Precision.FP32, Precision.BF16, Precision.FP16):
            enc = load_model(f"{ARCH}:{state}", device="cuda", precision=p.value)
            cos = (enc.encode_images(imgs) * ref).sum(1)
            res["cosine_to_cpu_fp32"][p.value] = round(float(cos.min()), 5)
            res["network_images_per_s"][p.value] = round(net_rate(enc, 256), 1)
            print(
                p.value,
                res["cosine_to_cpu_fp32"][p.value],
                res["network_images_per_s"][p.value],
                flush=True,
            )
        rng = np.random.default_rng(0)
        pil = [rng.integers(0, 255, (256, 256, 3), dtype=np.uint8) for _ in range(512)]
        auto.encode_images(pil[:64], batch_size=64)
        start = time.perf_counter()
        auto.encode_images(pil, batch_size=128)
        res["encode_images_end_to_end_per_s"] = round(len(pil) / (time.perf_counter() - start), 1)
        tiny_dir = save_checkpoint(
            model, Path(tmp) / "ckpt", open_clip.get_model_config(ARCH), ARCH
        )
        res["local_checkpoint_on_cuda"] = load_model(f"local:{tiny_dir}").info.device
    print(json.dumps(res, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
