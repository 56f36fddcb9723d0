"""Robust student against its teacher on corrupted held-out images (`cliplens train robust`).

Two setups:

- `fmnist`: the offline model's image tower (MobileNetV2 + ConSE) as teacher, Fashion-MNIST
  from Debian's dataset-fashion-mnist. The offline model's zero-shot accuracy on it is 22%,
  so accuracy is a linear probe's: fit on the teacher's clean embeddings of the training
  images, applied to teacher and student alike.
- `shapes`: a shapes CLIP trained with `cliplens train clip` (give it with --teacher) as
  teacher, zero-shot over the 48 "colour shape" classes on the val split's single-shape
  images, with templates.txt.

    python benchmarks/bench_robust.py fmnist [--train-per-class 100] [--test-per-class 20]
    python benchmarks/bench_robust.py shapes --teacher local:RUN/model --data SHAPES_DIR

Prints one row per condition and a summary (mean over corruptions at each severity), and
writes everything to --out (JSON).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
from PIL import Image

from cliplens import load_model
from cliplens.corruptions import CORRUPTIONS, parse_severities
from cliplens.tasks.probe import fit_probe
from cliplens.train.robust import RobustConfig, evaluate_robust, train_robust


def fmnist_data(train_per_class: int, test_per_class: int):
    from cliplens.datasets.fashion_mnist import LABELS, load

    out = []
    for split, per in (("train", train_per_class), ("test", test_per_class)):
        images, labels = load(split)
        idx = np.concatenate([np.flatnonzero(labels == c)[:per] for c in range(len(LABELS))])
        pictures = [Image.fromarray(images[i]).convert("RGB") for i in idx]
        out.append((pictures, [LABELS[labels[i]] for i in idx]))
    return out


def shapes_data(root: Path, n_train: int, n_eval: int):
    def rows(name):
        return [json.loads(x) for x in (root / name).read_text().splitlines()]

    train = [Image.open(root / r["image"]).convert("RGB") for r in rows("train.jsonl")[:n_train]]
    labelled = [r for r in rows("val.jsonl") if r.get("label")][:n_eval]
    test = [Image.open(root / r["image"]).convert("RGB") for r in labelled]
    return (train, None), (test, [r["label"] for r in labelled])


def summarise(rows: list[dict]) -> list[dict]:
    out = []
    for sev in sorted({r["severity"] for r in rows}):
        sel = [r for r in rows if r["severity"] == sev]
        t, s = np.mean([r["teacher"] for r in sel]), np.mean([r["student"] for r in sel])
        out.append(
            {
                "severity": sev,
                "teacher": round(float(t), 4),
                "student": round(float(s), 4),
                "gain": round(float(s - t), 4),
            }
        )
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("setup", choices=["fmnist", "shapes"])
    ap.add_argument("--teacher", default="offline")
    ap.add_argument("--data", type=Path, help="shapes: the dataset folder")
    ap.add_argument("--train-per-class", type=int, default=100)
    ap.add_argument("--test-per-class", type=int, default=20)
    ap.add_argument("--n-train", type=int, default=4000, help="shapes: training images")
    ap.add_argument("--n-eval", type=int, default=300, help="shapes: evaluation images")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--clean-fraction", type=float, default=0.2)
    ap.add_argument("--temperature", type=float, default=0.05)
    ap.add_argument("--align-weight", type=float, default=1.0)
    # the recorded figures are of cliplens's loss; simclr is the paper's (bench_robust_loss.py)
    ap.add_argument("--loss", choices=["clip-align", "simclr"], default="clip-align")
    ap.add_argument("--severities", default="1,3,5", help="evaluated")
    ap.add_argument("--train-severities", default="1-5", help="trained on")
    ap.add_argument("--run", type=Path, default=Path("robust-run"))
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()

    teacher = load_model(args.teacher, device="cpu", precision="fp32")
    if args.setup == "fmnist":
        (train, train_labels), (test, test_labels) = fmnist_data(
            args.train_per_class, args.test_per_class
        )
        templates = ("a photo of a {}.",)
    else:
        (train, train_labels), (test, test_labels) = shapes_data(
            args.data, args.n_train, args.n_eval
        )
        templates = tuple((args.data / "templates.txt").read_text().split("\n")[:-1])
    cfg = RobustConfig(
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        clean_fraction=args.clean_fraction,
        temperature=args.temperature,
        align_weight=args.align_weight,
        loss=args.loss,
        severities=parse_severities(args.train_severities),
    )
    t0 = time.perf_counter()
    result = train_robust(teacher, train, args.run, cfg, progress=True)
    train_s = time.perf_counter() - t0
    severities = tuple(int(s) for s in args.severities.split(","))
    t0 = time.perf_counter()
    probe = None  # shapes: zero-shot; Fashion-MNIST: a probe built in the teacher's space
    if train_labels is not None:
        probe = fit_probe(result.teacher_embeddings, train_labels, teacher.info.model_id)
    encoders = {"teacher": teacher, "student": result.student}
    conditions = (CORRUPTIONS, severities, templates, probe)
    evaluation = evaluate_robust(encoders, test, test_labels, *conditions, progress=True)
    rows = [r.to_dict() for r in evaluation]  # flat: corruption, severity, teacher, student
    eval_s = time.perf_counter() - t0
    print(f"{'corruption':<10} {'sev':>3} {'teacher':>8} {'student':>8} {'gain':>7}")
    for r in rows:
        print(
            f"{r['corruption']:<10} {r['severity']:>3} {r['teacher']:>8.3f} "
            f"{r['student']:>8.3f} {r['student'] - r['teacher']:>+7.3f}"
        )
    summary = summarise(rows)
    print("mean over corruptions:", json.dumps(summary))
    print(
        f"train {len(train)} images x {args.epochs} epochs: {train_s / 60:.1f} min "
        f"({result.steps} steps); evaluation {eval_s / 60:.1f} min"
    )
    if args.out:
        paths = {"run": str(args.run), "data": str(args.data), "out": str(args.out)}
        report = {
            "setup": args.setup,
            "teacher": args.teacher,
            "config": vars(args) | paths,
            "train_images": len(train),
            "test_images": len(test),
            "train_minutes": train_s / 60,
            "eval_minutes": eval_s / 60,
            "rows": rows,
            "summary": summary,
        }
        args.out.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
