"""int8 on the OpenVINO engine against PyTorch fp32: what the accuracy gate keeps.

For each model, the int8 network as the library builds it (`ModelRef(name, device="cpu",
precision="int8", engine="openvino")`: NNCF post-training quantisation on fixed views of
scikit-image's photos, checked by the library's gate) is compared with PyTorch fp32
(`precision="fp32", engine="torch"`) on:

- `photos-7`: the 7 photos `cliplens.write_photos` writes (files, read as a user's would be);
- `photos-21`: all 21 of `openvino_convert.fixed_photos()`, one full view each (the gate
  itself runs on 63 other views of the same photos, and calibrates on 84);
- `fmnist`: the first N images of Fashion-MNIST's test split (Debian's
  dataset-fashion-mnist), zero-shot over its 10 classes with the default templates;
- `shapes-heldout` (shapes CLIPs only): the held-out split's single-shape images, zero-shot
  over the 48 "colour shape" classes with the dataset's templates.txt.

Figures: mean and min cosine between int8 and fp32 image embeddings; top-1 zero-shot
agreement between them (the photos: over the gate's ImageNet prompts,
`openvino_convert.zero_shot_prompts()`); zero-shot accuracy of each on the
labelled sets. Both sides classify with the same fp32 text rows, so only the image tower
differs. The gate's own figures come from `openvino.read_measured`. Throughput: images/s of
each image tower on one batch of 32 fixed-photo views (best of 3, after a warm-up). Where the
gate refuses int8, the refused network is run from its IR, so its figures are still there.
CLIPLENS_HOME is set to WORK/home (or --home) for everything, training included.

The shapes CLIPs are trained first (`cliplens datasets shapes`, then `cliplens train clip`
with the `tiny-shapes` and `tiny-shapes-vit` presets), unless their run folders already hold
a model: rerunning reuses them, and the converted networks under CLIPLENS_HOME.

    python benchmarks/bench_int8.py [--work /tmp/int8] [--models offline,tiny-shapes,...]
        [--fmnist 2000] [--train-minutes 6] [--no-timing] [--json results.json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

PRESETS = ("tiny-shapes", "tiny-shapes-vit")
TIMED_BATCH = 32


# ------------------------------------------------------------------ data


def shapes_data(work: Path) -> Path:
    """The shapes dataset under WORK/shapes (written once)."""
    folder = work / "shapes"
    if not (folder / "heldout.jsonl").is_file():
        run([cli(), "datasets", "shapes", str(folder), "--n", "20000"])
    return folder


def train_shapes_clip(work: Path, preset: str, minutes: float) -> str:
    """Train a shapes CLIP with `preset` into WORK/run-PRESET unless it holds a model."""
    out = work / f"run-{preset}"
    if not (out / "model").exists():
        s = shapes_data(work)
        run(
            [
                cli(),
                "train",
                "clip",
                "--data",
                str(s / "train.jsonl"),
                "--val",
                str(s / "val.jsonl"),
                "--zero-shot",
                str(s / "heldout.jsonl"),
                "--classes",
                str(s / "classes.txt"),
                "--templates",
                str(s / "templates.txt"),
                "--model-config",
                preset,
                "--epochs",
                "8",
                "--max-minutes",
                str(minutes),
                "--precision",
                "bf16",
                "--out",
                str(out),
            ]
        )
    return f"local:{out / 'model'}"


def cli() -> str:
    return str(Path(sys.executable).with_name("cliplens"))


def run(cmd: list[str]) -> None:
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def fmnist_images(n: int) -> tuple[list[np.ndarray], np.ndarray]:
    from cliplens.datasets.fashion_mnist import load

    images, labels = load("test")
    return list(images[:n]), labels[:n]


def heldout_shapes(folder: Path) -> tuple[list[Path], np.ndarray, list[str], list[str]]:
    """The held-out single-shape images (rows with a label), their class indices, the
    class names and the templates."""
    from cliplens.tasks.classify import load_templates

    classes = (folder / "classes.txt").read_text().split("\n")
    classes = [c.strip() for c in classes if c.strip()]
    rows = [json.loads(line) for line in (folder / "heldout.jsonl").read_text().splitlines()]
    rows = [r for r in rows if r.get("label")]
    paths = [folder / r["image"] for r in rows]
    truth = np.array([classes.index(r["label"]) for r in rows])
    return paths, truth, classes, load_templates(str(folder / "templates.txt"))


# ------------------------------------------------------------------ figures


def compare(fp32: np.ndarray, int8: np.ndarray, weights: np.ndarray, truth=None) -> dict:
    """int8 against fp32 rows: cosines, top-1 agreement under `weights` (C, D), and each
    one's accuracy where the true classes are known."""
    cos = (fp32 * int8).sum(1)
    top_fp32 = (fp32 @ weights.T).argmax(1)
    top_int8 = (int8 @ weights.T).argmax(1)
    out: dict[str, Any] = {
        "n": len(fp32),
        "mean_cosine": round(float(cos.mean()), 5),
        "min_cosine": round(float(cos.min()), 5),
        "agreement": round(float((top_fp32 == top_int8).mean()), 4),
    }
    if truth is not None:
        out["accuracy_fp32"] = round(float((top_fp32 == truth).mean()), 4)
        out["accuracy_int8"] = round(float((top_int8 == truth).mean()), 4)
    return out


def images_per_s(encode, crops: np.ndarray, repeats: int = 3) -> float:
    encode(crops)  # warm up
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        encode(crops)
        best = min(best, time.perf_counter() - t)
    return round(len(crops) / best, 1)


def timings(name: str, int8_encoder, crops: np.ndarray) -> dict[str, Any]:
    """Image-tower throughput at batch 32 for each engine and precision that runs."""
    from cliplens import ModelRef
    from cliplens.errors import ClipLensError

    engines = {
        "torch fp32": ("fp32", "torch"),
        "torch bf16": ("bf16", "torch"),
        "openvino fp32": ("fp32", "openvino"),
        "openvino bf16": ("bf16", "openvino"),
    }
    out: dict[str, Any] = {}
    for label, (precision, engine) in engines.items():
        try:
            encoder = ModelRef(name, device="cpu", precision=precision, engine=engine).ready()
            got = encoder.info.precision.value
            out[label] = images_per_s(encoder.encode_crops, crops)
            if got != precision:
                out[label + " (ran as)"] = got
        except ClipLensError as e:
            out[label] = f"not run: {e}"
    out["openvino int8"] = images_per_s(int8_encoder.encode_crops, crops)
    return out


def measure_model(name: str, sets: dict[str, dict], timing: bool) -> dict[str, Any]:
    from cliplens import ModelRef
    from cliplens.device import Precision
    from cliplens.errors import ModelError
    from cliplens.models import openvino
    from cliplens.models.openvino_convert import CALIBRATION_VIEWS, views
    from cliplens.tasks.classify import zero_shot_weights

    result: dict[str, Any] = {"model": name}
    fp32 = ModelRef(name, device="cpu", precision="fp32", engine="torch")
    int8 = ModelRef(name, device="cpu", precision="int8", engine="openvino")
    t = time.perf_counter()
    try:
        int8_encoder = int8.ready()  # converts, quantises and checks once per model
        result["gate_error"] = ""
    except ModelError as e:
        int8_encoder = None
        result["gate_error"] = str(e)
    result["build_s"] = round(time.perf_counter() - t, 1)
    base = fp32.info
    result["model_id"] = base.model_id
    measured = openvino.read_measured(base.model_id)
    if measured is None:
        result["gate"] = None
        return result
    gate = measured.variants.get(Precision.INT8)
    result["gate"] = {
        "photos": measured.photos,
        "kept": gate.kept if gate else False,
        "mean_cosine": gate.mean_cosine if gate else None,
        "min_cosine": gate.min_cosine if gate else None,
        "agreement": gate.agreement if gate else None,
        "reason": gate.reason if gate else measured.reason,
        "images_per_s": gate.images_per_s if gate else None,
    }
    result["library_speeds"] = {
        "torch": {measured.torch_precision.value: measured.torch_images_per_s},
        **{f"openvino {p.value}": v.images_per_s for p, v in measured.variants.items()},
    }
    if int8_encoder is None and gate is not None:
        # refused by the gate: its network is still measured, run directly from its IR
        from cliplens.models.openvino_runtime import OpenVinoEncoder

        info = openvino.int8_info(base)
        int8_encoder = OpenVinoEncoder(info, gate, measured.feature_id, fp32.load)
    result["int8_via"] = "ModelRef" if not result["gate_error"] else "the refused IR"

    figures: dict[str, Any] = {}
    t = time.perf_counter()
    for set_name, data in sets.items():
        if data.get("only") and name not in data["only"]:
            continue
        weights = data["weights"].get(name)
        if weights is None and data["templates"] is None:  # the prompts as they are
            weights = fp32.encode_texts(data["labels"])
            # prompts a text tower cannot tell apart embed alike: how many rows differ
            distinct = len(np.unique(np.round(weights, 5), axis=0))
            result["distinct_prompt_rows"] = f"{distinct} of {len(weights)}"
        elif weights is None:
            weights = zero_shot_weights(fp32, data["labels"], data["templates"])
            data["weights"][name] = weights
        a = fp32.encode_images(data["items"])
        b = int8_encoder.encode_images(data["items"])
        figures[set_name] = compare(a, b, weights, data.get("truth"))
    result["sets"] = figures
    result["compare_s"] = round(time.perf_counter() - t, 1)
    # int8's own text path (the ModelRef's encode_texts) against fp32's, Fashion-MNIST prompts
    fm = sets.get("fmnist")
    if fm is not None and not result["gate_error"]:
        own = zero_shot_weights(int8, fm["labels"], fm["templates"])
        own_cos = (own / np.linalg.norm(own, axis=1, keepdims=True)) * (
            fm["weights"][name] / np.linalg.norm(fm["weights"][name], axis=1, keepdims=True)
        )
        result["int8_text_min_cosine"] = round(float(own_cos.sum(1).min()), 5)
    if timing:
        from cliplens.models.openvino_convert import fixed_photos

        prep = base.preprocessing
        crops = views(fixed_photos(), prep, CALIBRATION_VIEWS)[:TIMED_BATCH]
        t = time.perf_counter()
        result["images_per_s"] = timings(name, int8_encoder, crops)
        result["timing_s"] = round(time.perf_counter() - t, 1)
    return result


# ------------------------------------------------------------------ output


def fmt(x: Any, pct: bool = False) -> str:
    if x is None:
        return "-"
    if pct:
        return f"{100 * x:.1f}%"
    return f"{x:.4f}" if isinstance(x, float) else str(x)


def print_tables(results: list[dict]) -> None:
    print("\n| model | data | n | mean cos | min cos | top-1 agreement | acc fp32 | acc int8 |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        for set_name, f in r.get("sets", {}).items():
            print(
                f"| {r['model']} | {set_name} | {f['n']} | {fmt(f['mean_cosine'])} | "
                f"{fmt(f['min_cosine'])} | {fmt(f['agreement'], True)} | "
                f"{fmt(f.get('accuracy_fp32'), True)} | {fmt(f.get('accuracy_int8'), True)} |"
            )
    print(
        "\n| model | gate kept int8 | photos | mean cos | min cos | top-1 agreement | "
        "distinct prompt rows | reason |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        g = r.get("gate") or {}
        print(
            f"| {r['model']} | {'yes' if g.get('kept') else 'no'} | {g.get('photos', '-')} | "
            f"{fmt(g.get('mean_cosine'))} | {fmt(g.get('min_cosine'))} | "
            f"{fmt(g.get('agreement'), True)} | {r.get('distinct_prompt_rows', '-')} | "
            f"{g.get('reason') or '-'} |"
        )
    timed = [r for r in results if "images_per_s" in r]
    if timed:
        columns = [k for k in timed[0]["images_per_s"] if "(ran as)" not in k]
        print("\nimages/s at batch 32 (best of 3):")
        print("| model | " + " | ".join(columns) + " |")
        print("|---" * (len(columns) + 1) + "|")
        for r in timed:
            s = r["images_per_s"]
            cells = []
            for c in columns:
                v = s.get(c)
                cell = f"{v:.1f}" if isinstance(v, float) else "not run"
                if s.get(c + " (ran as)"):
                    cell += f" (ran as {s[c + ' (ran as)']})"
                cells.append(cell)
            print(f"| {r['model']} | " + " | ".join(cells) + " |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--work", type=Path, default=Path("/tmp/int8"), help="data and runs")
    ap.add_argument("--home", type=Path, help="CLIPLENS_HOME (default: WORK/home)")
    ap.add_argument("--models", default="offline," + ",".join(PRESETS))
    ap.add_argument("--fmnist", type=int, default=2000, help="Fashion-MNIST test images")
    ap.add_argument("--train-minutes", type=float, default=6.0)
    ap.add_argument("--no-timing", action="store_true")
    ap.add_argument("--json", type=Path, help="write every figure here")
    args = ap.parse_args()
    os.environ["CLIPLENS_HOME"] = str(args.home or args.work / "home")
    args.work.mkdir(parents=True, exist_ok=True)

    from cliplens import write_photos
    from cliplens.datasets.fashion_mnist import LABELS
    from cliplens.models.openvino_convert import fixed_photos, zero_shot_prompts
    from cliplens.tasks.classify import load_templates

    started = time.perf_counter()
    names: dict[str, str] = {}
    for model in args.models.split(","):
        if model in PRESETS:
            t = time.perf_counter()
            names[model] = train_shapes_clip(args.work, model, args.train_minutes)
            print(f"{model}: {names[model]} ({time.perf_counter() - t:.0f} s)", flush=True)
        else:
            names[model] = model

    photos_dir = args.work / "photos"
    prompts = zero_shot_prompts()
    imagenet = {"labels": prompts, "templates": None, "weights": {}}
    images, truth = fmnist_images(args.fmnist)
    sets: dict[str, dict] = {
        "photos-7": {"items": write_photos(photos_dir), **imagenet},
        "photos-21": {"items": fixed_photos(), **imagenet},  # shares the cached text rows
        "fmnist": {
            "items": images,
            "truth": truth,
            "labels": list(LABELS),
            "templates": load_templates("default"),
            "weights": {},
        },
    }
    shapes = [m for m in names if m in PRESETS]
    if shapes:
        paths, held_truth, classes, templates = heldout_shapes(args.work / "shapes")
        sets["shapes-heldout"] = {
            "items": paths,
            "truth": held_truth,
            "labels": classes,
            "templates": templates,
            "weights": {},
            "only": [names[m] for m in shapes],
        }

    results = []
    for model, name in names.items():
        t = time.perf_counter()
        r = measure_model(name, sets, timing=not args.no_timing)
        r["model"] = model
        r["name"] = name
        r["total_s"] = round(time.perf_counter() - t, 1)
        print(json.dumps(r), flush=True)
        results.append(r)
    print_tables(results)
    print(f"\n{time.perf_counter() - started:.0f} s in all")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
