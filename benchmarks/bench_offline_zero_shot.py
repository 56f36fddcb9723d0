"""Zero-shot accuracy of the offline model on the Fashion-MNIST test set.

Needs Debian's dataset-fashion-mnist (apt-get install dataset-fashion-mnist). The
MobileNetV2 class probabilities are computed once; every variant below (class
wordings, top-k, softmax scale) reuses them, so the comparison is exact.

    python benchmarks/bench_offline_zero_shot.py [--n 10000] [--out results.json]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from cliplens import load_model
from cliplens.datasets.fashion_mnist import DEBIAN_DIR, LABELS, read_idx
from cliplens.tasks.classify import load_templates, zero_shot_weights

DATA = DEBIAN_DIR
LABELS = list(LABELS)


def conse(probs: torch.Tensor, class_emb: torch.Tensor, k: int) -> np.ndarray:
    top, idx = probs.topk(k, dim=-1)
    emb = torch.einsum("bk,bkd->bd", top / top.sum(-1, keepdim=True), class_emb[idx])
    return torch.nn.functional.normalize(emb, dim=-1).numpy()


def class_probabilities(model, images: np.ndarray) -> torch.Tensor:
    """MobileNetV2's ImageNet class probabilities of every image, computed once."""
    chunks = []
    for start in range(0, len(images), 256):
        batch = [model.load_pixels(im) for im in images[start : start + 256]]
        pixels = torch.from_numpy(np.stack(batch))
        with torch.inference_mode():
            chunks.append(model.class_probabilities(pixels).float())
    return torch.cat(chunks)


def kind_retrieval_map(model, rows: list[dict], wordings: dict[str, list[str]]) -> dict:
    """Does a basic-level word ("a photo of a dog") land on the classes under it (every dog
    breed)? Mean average precision over the 30 commonest kinds, the class sentences
    standing in for perfectly classified photos. Favours wordings that contain the kind by
    design; it measures exactly what ConSE needs from them."""
    by_count = sorted({r["kind"] for r in rows}, key=lambda k: -sum(r["kind"] == k for r in rows))
    kinds = by_count[:30]
    queries = model.encode_texts([f"a photo of a {k}." for k in kinds])
    scores = {}
    for name, texts in wordings.items():
        sims_q = queries @ model.encode_texts(texts).T
        aps = []
        for qi, kind in enumerate(kinds):
            relevant = np.array([r["kind"] == kind for r in rows])[np.argsort(-sims_q[qi])]
            hits = np.cumsum(relevant)
            aps.append(float((hits / np.arange(1, len(rows) + 1))[relevant].mean()))
        scores[name] = round(float(np.mean(aps)), 3)
    return scores


def nll_by_logit_scale(sims: np.ndarray, truth: np.ndarray) -> dict[int, float]:
    nll = {}
    for scale in (10, 20, 30, 40, 50, 70, 100):
        z = scale * sims
        z = z - z.max(1, keepdims=True)
        logp = z - np.log(np.exp(z).sum(1, keepdims=True))
        nll[scale] = float(-logp[np.arange(len(truth)), truth].mean())
    return nll


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--n", type=int, default=10000)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    if not DATA.is_dir():
        raise SystemExit(f"{DATA} is missing: apt-get install dataset-fashion-mnist")
    images = read_idx(DATA / "t10k-images-idx3-ubyte.gz")[: args.n]
    truth = read_idx(DATA / "t10k-labels-idx1-ubyte.gz")[: args.n].astype(int)

    model = load_model("offline", device="cpu")
    t0 = time.perf_counter()
    probs = class_probabilities(model, images)
    seconds = time.perf_counter() - t0

    rows = model.classes
    wordings = {
        "class names only": [r["name"] for r in rows],
        "names + WordNet kind (shipped)": [r["text"] for r in rows],
        "names + parent + kind": [
            r["text"]
            if r["parent"] in (r["kind"], r["name"]) or r["parent"] in r["name"]
            else f"{r['text'].split(',')[0]}, a {r['parent']}, a kind of {r['kind']}"
            for r in rows
        ],
    }
    results: dict = {
        "n": len(images),
        "encode_seconds": round(seconds, 1),
        "images_per_s": round(len(images) / seconds, 1),
        "chance": 0.1,
        "wordings": {},
        "top_k": {},
        "templates": {},
    }
    results["kind_retrieval_map"] = kind_retrieval_map(model, rows, wordings)

    templates = load_templates("default")
    weights = zero_shot_weights(model, LABELS, templates)

    def accuracy(emb: np.ndarray, w: np.ndarray = weights) -> float:
        return float(((emb @ w.T).argmax(1) == truth).mean())

    for name, texts in wordings.items():
        class_emb = torch.from_numpy(model.encode_texts(texts))
        results["wordings"][name] = accuracy(conse(probs, class_emb, 10))
    for k in (1, 3, 5, 10, 20, 50):
        results["top_k"][k] = accuracy(conse(probs, model.class_embeddings.float(), k))
    shipped = conse(probs, model.class_embeddings.float(), model.top_k)
    for tset in ("default", "photo", "none", "imagenet"):
        results["templates"][tset] = accuracy(
            shipped, zero_shot_weights(model, LABELS, load_templates(tset))
        )
    sims = shipped @ weights.T
    results["nll_by_logit_scale"] = nll_by_logit_scale(sims, truth)
    per_class = {
        LABELS[c]: float(((sims.argmax(1) == truth) & (truth == c)).sum() / (truth == c).sum())
        for c in range(10)
    }
    results["per_class"] = per_class
    print(json.dumps(results, indent=2))
    if args.out:
        args.out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
