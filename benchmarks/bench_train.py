"""Training throughput (pairs/s) of the shapes presets, fp32 against bf16 autocast.

Times optimiser steps 6..N from the step log (`seconds` since training began), so data
loading, warm-up steps and evaluation are left out. Needs a shapes dataset:

    cliplens datasets shapes /tmp/shapes --n 20000
    python benchmarks/bench_train.py /tmp/shapes [--pairs 3000] [--steps 30]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from cliplens.train.clip import PRESETS, ClipTrainConfig, train_clip
from cliplens.train.data import read_pairs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("data", type=Path)
    ap.add_argument("--pairs", type=int, default=3000)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--batch-size", type=int, default=128)
    args = ap.parse_args()
    pairs = read_pairs(args.data / "train.jsonl")[: args.pairs]
    print(f"{'preset':<18} {'precision':<9} {'pairs/s':>8}")
    for preset in PRESETS:
        for precision in ("fp32", "bf16"):
            cfg = ClipTrainConfig(
                model_cfg=PRESETS[preset],
                arch=preset,
                epochs=100,
                batch_size=args.batch_size,
                precision=precision,
                checkpoint_every=10**9,
            )
            with tempfile.TemporaryDirectory() as run:
                train_clip(cfg, pairs, run, max_steps=args.steps)
                log = [json.loads(x) for x in (Path(run) / "log.jsonl").read_text().splitlines()]
            t = {r["step"]: r["seconds"] for r in log if "seconds" in r}
            rate = (args.steps - 5) * args.batch_size / (t[args.steps] - t[5])
            print(f"{preset:<18} {precision:<9} {rate:>8.1f}")


if __name__ == "__main__":
    main()
