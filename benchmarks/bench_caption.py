"""Captioning on the shapes dataset: how often a captioner names the colour and shape of
every object in images of held-out (shape, colour) combinations, the COCO caption metrics
against the full-detail references, and captions per second.

    cliplens datasets shapes /tmp/shapes
    cliplens train clip ... --out /tmp/shapes-run          (the 10-minute model, RESULTS.md)
    cliplens caption train --data /tmp/shapes/train-full.jsonl --val /tmp/shapes/val.jsonl \\
        --model local:/tmp/shapes-run/model --lm scratch:gpt2 --variant mlp \\
        --max-minutes 15 --out /tmp/cap-mlp
    python benchmarks/bench_caption.py /tmp/shapes /tmp/cap-mlp/captioner [--beam 3]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from cliplens.captioning.embedded import embed_pairs
from cliplens.captioning.metrics import score_captions
from cliplens.captioning.model import load_captioner
from cliplens.datasets.shapes import names_all_objects
from cliplens.models.ref import ModelRef
from cliplens.train.data import read_pairs


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("shapes", type=Path)
    ap.add_argument("captioner", type=Path)
    ap.add_argument("--split", default="heldout")
    ap.add_argument("--beam", type=int, default=1)
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--rerank", type=int, default=1, help="best of N, judged by the encoder")
    ap.add_argument("--precisions", default="fp32,bf16")
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = ap.parse_args()

    source = args.shapes / f"{args.split}.jsonl"
    rows = [json.loads(x) for x in source.read_text().splitlines() if x.strip()]
    pairs = read_pairs(source)
    if args.limit:
        rows, pairs = rows[: args.limit], pairs[: args.limit]
    captioner = load_captioner(args.captioner)
    ref = ModelRef(captioner.cfg.encoder)
    data = embed_pairs(ref, pairs)  # one caption per image here, so rows follow the file
    assert len(data.images) == len(rows)
    results = {}
    for precision in args.precisions.split(","):
        autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16")
        captioner.generate(data.vectors[:32], beams=args.beam)  # warm-up
        start = time.perf_counter()
        with autocast:
            if args.rerank > 1:
                captions = captioner.generate_reranked(
                    data.vectors, ref.encode_texts, candidates=args.rerank, top_p=1.0
                )
            else:
                captions = captioner.generate(data.vectors, beams=args.beam)
        seconds = time.perf_counter() - start
        correct = np.array(
            [names_all_objects(c, r["objects"]) for c, r in zip(captions, rows, strict=True)]
        )
        single = np.array([len(r["objects"]) == 1 for r in rows])
        scores = score_captions(
            captions, data.references(), metrics=("bleu", "rouge", "cider", "meteor")
        )
        results[precision] = {
            "images": len(rows),
            "all_objects_named": round(float(correct.mean()), 4),
            "one_object": round(float(correct[single].mean()), 4),
            "two_objects": round(float(correct[~single].mean()), 4),
            "captions_per_s": round(len(rows) / seconds, 1),
            **{k: round(v, 4) for k, v in scores.scores.items()},
            "examples": [
                {"caption": c, "reference": r["caption"]}
                for c, r in list(zip(captions, rows, strict=True))[:6]
            ],
        }
    out = {
        "captioner": str(args.captioner),
        "split": args.split,
        "beam": args.beam,
        "lm": captioner.cfg.lm,
        "variant": captioner.cfg.variant,
        "threads": torch.get_num_threads(),
        "results": results,
    }
    print(json.dumps(out, indent=2))
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
