"""The robust trainer's two losses side by side (`cliplens train robust --loss`).

"simclr" is the paper's NT-Xent (Ravula et al. 2021, tau 0.1, no alignment term);
"clip-align" is cliplens's CLIP-style loss plus 10 x (1 - cosine) to the teacher's clean
embedding. Both students start from the offline model's image tower (MobileNetV2 + ConSE,
224 px) and train with the same images, corruptions, order and steps. Measured on held-out
shapes images (`cliplens.datasets.shapes`, labelled by the first shape's kind), clean and
at one severity of each corruption:

- accuracy of a linear probe fit on the teacher's clean embeddings of the training images
  (a classifier built in the teacher's space, applied to every encoder);
- mean cosine between an encoder's embedding of the corrupted image and the teacher's
  embedding of the clean one (how far the student stays in the teacher's space).

    python benchmarks/bench_robust_loss.py [--n-train 128] [--n-test 60] [--epochs 3] [--lr 5e-5]

A few minutes on two CPU cores. Prints a table and writes --out (JSON).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from cliplens import load_model
from cliplens.corruptions import CORRUPTIONS
from cliplens.datasets.shapes import sample
from cliplens.tasks.probe import fit_probe
from cliplens.train.robust import RobustConfig, corrupted_crops, decode_all, train_robust


def shapes(n: int, seed: int) -> tuple[list[Image.Image], list[str]]:
    picked = [sample(seed, i, size=64) for i in range(n)]
    return [Image.fromarray(s.image) for s in picked], [s.objects[0].kind for s in picked]


def measure(encoders: dict, probe, images, labels, severity: int) -> dict[str, dict]:
    """Per condition (clean, each corruption at `severity`) and encoder: the probe's
    accuracy, and the mean cosine of the embedding of the corrupted image to the teacher's
    embedding of the clean one. Corruptions are seeded per image and condition."""
    teacher = encoders["teacher"]
    n = len(images)
    decoded = decode_all(teacher, images)
    truth = np.array(labels)
    clean = None
    out: dict[str, dict] = {}
    for key, kind in enumerate((None, *CORRUPTIONS)):
        rngs = [np.random.default_rng([7, key, i]) for i in range(n)]
        crops = corrupted_crops(teacher, decoded, [kind] * n, [severity if kind else 0] * n, rngs)
        row: dict[str, dict[str, float]] = {}
        for name, encoder in encoders.items():
            vectors = encoder.encode_crops(crops)
            if clean is None:
                clean = vectors  # the teacher's clean embeddings: the first computed
            pred = np.array(probe.classes)[probe.probabilities(vectors).argmax(axis=1)]
            cosine = float(np.mean(np.sum(vectors * clean, axis=1)))
            row[name] = {"accuracy": float(np.mean(pred == truth)), "cosine": cosine}
        out[kind or "clean"] = row
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n-train", type=int, default=128)
    ap.add_argument("--n-test", type=int, default=60)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=5e-5)
    ap.add_argument("--severity", type=int, default=5, help="evaluated")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()

    teacher = load_model("offline", device="cpu", precision="fp32")
    train, train_labels = shapes(args.n_train, seed=0)
    test, test_labels = shapes(args.n_test, seed=1)
    encoders = {"teacher": teacher}
    timings = {}
    result = None
    for loss in ("simclr", "clip-align"):
        cfg = RobustConfig(
            loss=loss,
            severities=(4, 5),
            epochs=args.epochs,
            batch_size=args.batch_size,
            lr=args.lr,
            warmup_steps=5,
        )
        t0 = time.perf_counter()
        with tempfile.TemporaryDirectory() as run:
            result = train_robust(teacher, train, run, cfg)
        timings[loss] = round(time.perf_counter() - t0, 1)
        encoders[loss] = result.student
        print(
            f"{loss}: {result.steps} steps in {timings[loss]} s, final loss {result.losses[-1]:.3f}"
        )
    assert result is not None
    probe = fit_probe(result.teacher_embeddings, train_labels, teacher.info.model_id)
    t0 = time.perf_counter()
    table = measure(encoders, probe, test, test_labels, args.severity)
    timings["evaluation"] = round(time.perf_counter() - t0, 1)
    names = list(encoders)
    print(f"{'condition':<10} " + " ".join(f"{n + ' acc':>15} {n + ' cos':>15}" for n in names))
    for cond, row in table.items():
        cells = [f"{row[n]['accuracy']:>15.3f} {row[n]['cosine']:>15.3f}" for n in names]
        print(f"{cond:<10} " + " ".join(cells))
    corrupted = [c for c in table if c != "clean"]
    mean = {
        n: {
            k: round(float(np.mean([table[c][n][k] for c in corrupted])), 4)
            for k in table["clean"][n]
        }
        for n in names
    }
    print(f"mean over corruptions at severity {args.severity}:", json.dumps(mean))
    print("seconds:", json.dumps(timings))
    if args.out:
        report = {
            "config": vars(args) | {"out": str(args.out)},
            "seconds": timings,
            "conditions": table,
            "mean": mean,
        }
        args.out.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
