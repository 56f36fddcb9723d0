"""Moderation and screening: throughput on 12 MP photos, CLIP-IQA against graded
distortions, and the few-shot distortion probe on held-out photos.

python benchmarks/bench_screening.py [--corpus DIR] [--n 200] [--model NAME] [--iqa-model offline]

- Throughput: `moderate` (default policy) and `quality` (integrity + CLIP-IQA + zero-shot
  distortion) over the first N photos of DIR (rclip's corpus: 4032x3024 JPEGs), whole
  call, images decoded once each.
- Graded distortions: the seven scikit-image photos, cut in 2x2 tiles, under blur, noise,
  JPEG and darkening at levels 0 (clean) to 5; Spearman correlation between each attribute
  score and the level (negative: the score falls as the distortion grows).
- Probe: five distortion types (clean, blur, noise, jpeg, underexposed); trained on five
  photos' tiles at levels 2 and 4, tested on the other two photos' tiles at level 3, for
  three such splits; on the encoder's probe features and on its embeddings.
"""

from __future__ import annotations

import argparse
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
from scipy.stats import spearmanr

from cliplens.datasets.distorted import write_distortions
from cliplens.datasets.photos import write_photos
from cliplens.images import iter_image_files
from cliplens.models.ref import ModelRef
from cliplens.tasks.moderate import build_moderator
from cliplens.tasks.policy import load_policy
from cliplens.tasks.quality import ATTRIBUTES, build_screener, check_file, train_probe


def throughput(name: str, files: list[Path]) -> None:
    ref = ModelRef(name)
    encoder = ref.load()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        moderator = build_moderator(load_policy("default"), encoder)
    screener = build_screener(encoder)
    encoder.encode_images_lenient(files[:8])  # warm-up
    t = time.perf_counter()
    done = encoder.encode_images_lenient(files)
    moderator.judge([str(files[i]) for i in done.kept], done.vectors)
    mod_s = time.perf_counter() - t
    t = time.perf_counter()
    done = encoder.encode_images_lenient(files)
    kept = [files[i] for i in done.kept]
    [check_file(p, decode=False) for p in kept]
    screener.score([str(p) for p in kept], done.vectors)
    qual_s = time.perf_counter() - t
    t = time.perf_counter()
    [check_file(p) for p in files]
    integ_s = time.perf_counter() - t
    n = len(files)
    print(
        f"{name}: moderate {n / mod_s:.1f} img/s, quality {n / qual_s:.1f} img/s, "
        f"quality --integrity-only {n / integ_s:.1f} img/s ({n} photos, "
        f"{encoder.info.precision})",
        flush=True,
    )


def graded(name: str, photos: list[Path], work: Path) -> None:
    encoder = ModelRef(name).load()
    screener = build_screener(encoder)
    print(f"{name}: Spearman correlation of CLIP-IQA scores with distortion level (0-5)")
    attrs = list(ATTRIBUTES)
    print("  distortion    " + " ".join(f"{a:>12s}" for a in attrs))
    for kind in ("blur", "noise", "jpeg", "underexposed"):
        folder = work / f"graded-{kind}"
        written = write_distortions(folder, photos, ("clean", kind), levels=(1, 2, 3, 4, 5))
        paths = written["clean"] + written[kind]
        levels = [0] * len(written["clean"]) + [
            int(p.stem.rsplit("L", 1)[1]) for p in written[kind]
        ]
        scores = screener.attribute_scores(encoder.encode_images(paths))
        rho = [spearmanr(levels, scores[:, i]).statistic for i in range(len(attrs))]
        print(f"  {kind:12s}  " + " ".join(f"{r:12.3f}" for r in rho), flush=True)


def probe(name: str, photos: list[Path], work: Path) -> None:
    encoder = ModelRef(name).load()
    kinds = ("clean", "blur", "noise", "jpeg", "underexposed")
    splits = [("cat", "motorcycle"), ("coffee", "cameraman"), ("hubble", "page")]
    for space in ("features", "embeddings"):
        accs = []
        for held in splits:
            test_photos = [p for p in photos if p.stem in held]
            train_photos = [p for p in photos if p.stem not in held]
            tag = "-".join(held)
            train = write_distortions(work / f"train-{tag}", train_photos, kinds, levels=(2, 4))
            test = write_distortions(work / f"test-{tag}", test_photos, kinds, levels=(3,))

            def embed(d, space=space):
                paths = [p for k in kinds for p in d[k]]
                fn = (
                    encoder.encode_features
                    if space == "features"
                    else encoder.encode_images_lenient
                )
                return fn(paths).vectors, [k for k in kinds for _ in d[k]]

            x, y = embed(train)
            xt, yt = embed(test)
            p = train_probe(x, y, encoder.feature_id)
            accs.append(float(np.mean([a == b for a, b in zip(p.predict(xt), yt, strict=True)])))
        each = ", ".join(f"{a:.3f}" for a in accs)
        print(
            f"{name}: probe on {space}: held-out accuracy {each} "
            f"(mean {np.mean(accs):.3f}; chance {1 / len(kinds):.2f})",
            flush=True,
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--corpus", type=Path, default=Path("/tmp/rclip_bench/corpus"))
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--model", default=None, help="model for throughput (default: default)")
    ap.add_argument("--iqa-model", default="offline")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        photos = write_photos(work / "photos")
        graded(args.iqa_model, photos, work)
        probe(args.iqa_model, photos, work)
        if args.corpus.is_dir():
            files = list(iter_image_files([args.corpus]))[: args.n]
            for name in dict.fromkeys([args.model or "default", "offline"]):
                throughput(name, files)
        else:
            print(f"no corpus at {args.corpus}: throughput skipped")


if __name__ == "__main__":
    main()
