"""CLIP-IQA's two modes: what of a 12 MP photo each one sees, what each costs, and how far
each deliberate difference from pyiqa moves a score.

python benchmarks/bench_clip_iqa.py [--runs 3]

- Cues kept: scikit-image's chelsea scaled to 4032x3024 and saved as a JPEG (quality 95),
  then a copy with sensor noise (Gaussian, sigma 8/255 per pixel) and one blurred (Gaussian,
  radius 3 px). Each file goes through each mode's own decoding and resizing (crop: draft
  decode, short side to 224, centre crop; faithful: draft decode, longest side to 1024), and
  the difference from the clean file's pixels is measured there: how much noise (standard
  deviation, 0-255) and blur (mean absolute difference) reach the network.
- Time per 12 MP photo: a random RN50 (speed does not depend on the weights), fp32, this
  machine's CPU threads, decoding included.
- Score effects: a random RN50 (no pretrained weights can be fetched here), pyiqa's `clipiqa`
  ensemble, on chelsea: the positional embedding kept or dropped at 224, the 224 centre crop
  against the whole photo, and the 1024 px cap against the uncapped image (2048 px wide).
  Random weights say how large such a change can be, not which way a trained model moves.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import open_clip
import skimage.data
import torch
from PIL import Image, ImageFilter

from cliplens.device import Precision
from cliplens.images import open_image
from cliplens.models.openclip import OpenClipEncoder
from cliplens.tasks.clip_iqa import embed_whole, encode_whole, fit_side, whole_pixels
from cliplens.tasks.quality import MAX_SIDE, build_screener, screen


def photos(folder: Path) -> dict[str, Path]:
    base = Image.fromarray(skimage.data.chelsea()).resize((4032, 3024), Image.Resampling.BICUBIC)
    rng = np.random.default_rng(0)
    noisy = np.asarray(base, np.float32) + rng.normal(0, 8, (3024, 4032, 3))
    out = {
        "clean": base,
        "noise": Image.fromarray(np.clip(noisy, 0, 255).round().astype(np.uint8)),
        "blur": base.filter(ImageFilter.GaussianBlur(3)),
    }
    paths = {}
    for name, image in out.items():
        paths[name] = folder / f"{name}.jpg"
        image.save(paths[name], quality=95)
    return paths


def cues(model: OpenClipEncoder, paths: dict[str, Path]) -> None:
    prep = model.info.preprocessing
    seen = {
        "crop (224)": lambda p: prep.crop(open_image(p, min_size=prep.resize_size)),
        f"faithful ({MAX_SIDE})": lambda p: np.asarray(
            fit_side(open_image(p, min_size=MAX_SIDE), MAX_SIDE)
        ),
    }
    print("| mode | pixels seen | noise std reaching the network | blur: mean abs change |")
    print("|---|---|---|---|")
    for mode, look in seen.items():
        clean = look(paths["clean"]).astype(np.float32)
        noise = (look(paths["noise"]) - clean).std()
        blur = np.abs(look(paths["blur"]) - clean).mean()
        h, w = clean.shape[:2]
        print(f"| {mode} | {w}x{h} | {noise:.2f} | {blur:.2f} |")


def timing(model: OpenClipEncoder, paths: dict[str, Path], runs: int) -> None:
    files = [paths["clean"]] * runs
    screener = build_screener(model, prompts="clipiqa")
    for mode in ("crop", "faithful"):
        chosen = replace(screener, iqa=mode)
        screen(files[:1], model, screener=chosen)  # warm-up
        t = time.perf_counter()
        screen(files, model, screener=chosen)
        per = (time.perf_counter() - t) / runs
        print(f"{mode}: {per:.2f} s per 12 MP photo ({torch.get_num_threads()} threads)")


def score_effects(model: OpenClipEncoder) -> None:
    screener = build_screener(model, prompts="clipiqa")
    tower = model.model.visual
    photo = Image.fromarray(skimage.data.chelsea()).resize((2048, 1365), Image.Resampling.BICUBIC)
    prep = model.info.preprocessing
    crop = prep.crop(photo)
    with torch.inference_mode():
        pixels = torch.from_numpy(prep.normalize(crop[None]))
        with_pos = tower(pixels)
        without_pos = embed_whole(tower, pixels)

    def score(v: torch.Tensor) -> float:
        v = torch.nn.functional.normalize(v.float(), dim=-1).numpy()
        return float(screener.attribute_scores(v)[0, 0])

    capped = encode_whole(model, [photo], MAX_SIDE).vectors
    with torch.inference_mode():
        whole = embed_whole(tower, torch.from_numpy(whole_pixels(photo, prep.mean, prep.std))[None])
    print(f"224 crop, positional embedding kept: {score(with_pos):.6f}")
    print(f"224 crop, without it:                {score(without_pos):.6f}")
    print(
        f"whole photo capped at {MAX_SIDE} px:       {screener.attribute_scores(capped)[0, 0]:.6f}"
    )
    print(f"whole photo at 2048x1365 (pyiqa):    {score(whole):.6f}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    torch.manual_seed(0)
    rn50 = open_clip.create_model("RN50-quickgelu", pretrained=None).eval()
    with torch.no_grad():  # open_clip zeroes each block's last norm: let every block count
        for name, p in rn50.named_parameters():
            if name.endswith("bn3.weight"):
                p.normal_(1.0, 0.2)
    model = OpenClipEncoder.from_model(
        rn50,
        open_clip.get_tokenizer("RN50-quickgelu"),
        name="rn50-random",
        arch="RN50-quickgelu",
        model_id="rn50-random@bench",
        device=torch.device("cpu"),
        precision=Precision.FP32,
    )
    with tempfile.TemporaryDirectory() as tmp:
        paths = photos(Path(tmp))
        cues(model, paths)
        timing(model, paths, args.runs)
    score_effects(model)


if __name__ == "__main__":
    main()
