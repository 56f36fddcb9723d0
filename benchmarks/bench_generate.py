"""CLIP-guided generation with the shapes model, judged by an independent classifier.

For each prompt ("a red circle", ...) and each seed, `cliplens.generation.generate` optimises a
Fourier-parameterised image toward the prompt under the shapes CLIP from `cliplens train
clip`. A separate judge then labels the final image with one of the 48 "colour shape"
classes; a seed counts when the label is the prompted colour and shape.

The judge must not share the generator's features, or adversarial patterns would pass:
- `--judge probe` (default): a linear probe on the offline model's features (ImageNet
  MobileNetV2, a different network altogether), fit on the training split's single-shape
  images and checked on the val split's;
- `--judge local:OTHER_RUN/model`: a shapes CLIP trained with another seed, zero-shot over
  the classes with the dataset's templates.

    python benchmarks/bench_generate.py --model local:RUN/model --data SHAPES_DIR \
        [--seeds 10] [--size 256] [--steps 150] [--out /tmp/gen-bench]

Prints one row per prompt (seeds judged right, mean final similarity) and seconds per step,
and writes everything to OUT/results.json with the images under OUT/.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from cliplens import load_model
from cliplens.generation.generate import GenerateConfig, generate, parse_prompts

PROMPTS = [
    "a red circle",
    "a blue square",
    "a green triangle",
    "a yellow star",
    "a purple hexagon",
    "an orange square",
]


def rows(root: Path, name: str) -> list[dict]:
    return [json.loads(x) for x in (root / name).read_text().splitlines()]


def val_accuracy(judge, root: Path) -> float:
    """The judge's accuracy on the val split's single-shape images."""
    val = [r for r in rows(root, "val.jsonl") if r.get("label")]
    predicted = judge.label([Image.open(root / r["image"]).convert("RGB") for r in val])
    return float(np.mean([p == r["label"] for p, r in zip(predicted, val, strict=True)]))


class ProbeJudge:
    """A linear probe on the offline model's image features."""

    def __init__(self, root: Path, n_train: int) -> None:
        from cliplens.tasks.probe import fit_probe

        self.encoder = load_model("offline")
        train = [r for r in rows(root, "train.jsonl") if r.get("label")][:n_train]
        vectors = self.encoder.encode_images([root / r["image"] for r in train])
        self.probe = fit_probe(vectors, [r["label"] for r in train], self.encoder.info.model_id)
        self.val_accuracy = val_accuracy(self, root)

    def label(self, images: list[Image.Image]) -> list[str]:
        return self.probe.predict(self.encoder.encode_images(images))


class ZeroShotJudge:
    """Another shapes CLIP, zero-shot over the classes with the dataset's templates."""

    def __init__(self, root: Path, model: str) -> None:
        from cliplens.tasks.classify import zero_shot_weights

        self.classes = [c for c in (root / "classes.txt").read_text().split("\n") if c]
        templates = [t for t in (root / "templates.txt").read_text().split("\n") if t]
        self.encoder = load_model(model)
        self.weights = zero_shot_weights(self.encoder, self.classes, templates)
        self.val_accuracy = val_accuracy(self, root)

    def label(self, images: list[Image.Image]) -> list[str]:
        scores = self.encoder.encode_images(images) @ self.weights.T
        return [self.classes[i] for i in scores.argmax(axis=1)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True, help="the shapes CLIP that steers (local:...)")
    ap.add_argument("--data", type=Path, required=True, help="the shapes dataset folder")
    ap.add_argument("--judge", default="probe", help="'probe' or another model (local:...)")
    ap.add_argument("--probe-train", type=int, default=3000)
    ap.add_argument("--prompts", default="|".join(PROMPTS[:4]), help="'|'-separated")
    ap.add_argument("--seeds", type=int, default=10)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--cutouts", type=int, default=16)
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--out", type=Path, default=Path("/tmp/gen-bench"))
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    t0 = time.perf_counter()
    judge = (
        ProbeJudge(args.data, args.probe_train)
        if args.judge == "probe"
        else ZeroShotJudge(args.data, args.judge)
    )
    print(
        f"judge {args.judge}: val accuracy {judge.val_accuracy:.3f} on single shapes "
        f"({time.perf_counter() - t0:.0f} s to set up)"
    )

    encoder = load_model(args.model, device="cpu", precision="fp32")
    results, step_times = [], []
    for prompt in args.prompts.split("|"):
        target = prompt.removeprefix("a ").removeprefix("an ").strip()
        for seed in range(args.seeds):
            cfg = GenerateConfig(
                size=args.size, steps=args.steps, lr=args.lr, cutouts=args.cutouts, seed=seed
            )
            t = time.perf_counter()
            res = generate(encoder, parse_prompts(prompt), cfg)
            step_times.append((time.perf_counter() - t) / args.steps)
            image = Image.fromarray(res.image)
            image.save(args.out / f"{target.replace(' ', '_')}_{seed}.png")
            label = judge.label([image])[0]
            results.append(
                {
                    "prompt": prompt,
                    "target": target,
                    "seed": seed,
                    "judged": label,
                    "correct": label == target,
                    "similarity": res.similarities[-1],
                }
            )
            print(
                f"  {prompt!r} seed {seed}: judged {label!r}, "
                f"similarity {res.similarities[-1]:.3f}, {step_times[-1]:.3f} s/step",
                flush=True,
            )

    print("\n| prompt | judged right | mean similarity |\n|---|---|---|")
    summary = []
    for prompt in dict.fromkeys(r["prompt"] for r in results):
        mine = [r for r in results if r["prompt"] == prompt]
        right = sum(r["correct"] for r in mine)
        sim = float(np.mean([r["similarity"] for r in mine]))
        summary.append({"prompt": prompt, "right": right, "seeds": len(mine), "similarity": sim})
        print(f"| {prompt} | {right}/{len(mine)} | {sim:.3f} |")
    sps = float(np.median(step_times))
    print(
        f"\nseconds per step at {args.size} px, {args.cutouts} cut-outs: {sps:.3f} (median), "
        f"torch threads {torch.get_num_threads()}"
    )
    (args.out / "results.json").write_text(
        json.dumps(
            {
                "args": {k: str(v) for k, v in vars(args).items()},
                "judge_val_accuracy": judge.val_accuracy,
                "seconds_per_step": sps,
                "summary": summary,
                "runs": results,
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
