"""What clip-retrieval's aesthetic term does to a query here (serve --clip-retrieval).

ClipClient sends aesthetic_score=9 and aesthetic_weight=0.5 with every query unless told
otherwise; the server adds the direction of its aesthetic prompts to the query at that
weight (server/routes/clip_retrieval.py). Over scikit-image's photos and their distorted
copies (blur, noise, JPEG, under-exposure, low resolution; levels 2 and 4), with the
offline model, each photo's label as the query ("a photo of a cat"), this measures:

- relevance: whether the first result shows the query's subject, and the mean rank of
  the subject's first photo;
- quality among the subject's photos: of the (original, distorted copy) pairs, the share
  in which the original ranks above its copy (0.5: chance);
- the share of originals among the first 5 results.

    python benchmarks/bench_aesthetic.py [--out results.json]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from cliplens import load_model
from cliplens.corruptions import distort
from cliplens.datasets.photos import expected_labels, write_photos
from cliplens.server.routes.clip_retrieval import AESTHETIC_PROMPTS
from cliplens.tasks.search import weighted_sum

DISTORTIONS = ["blur", "noise", "jpeg", "underexposed", "low_resolution"]
LEVELS = [2, 4]
SETTINGS = [(None, 0.0), (9, 0.25), (9, 0.5), (9, 1.0), (0, 0.5)]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    model = load_model("offline", device="cpu")
    labels = expected_labels()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        originals = write_photos(folder)
        rows: list[tuple[str, str, bool]] = []  # (path, subject, original)
        for path in originals:
            subject = labels[path.name]
            rows.append((str(path), subject, True))
            image = Image.open(path).convert("RGB")
            for kind in DISTORTIONS:
                for level in LEVELS:
                    out = folder / f"{path.stem}-{kind}{level}.png"
                    distort(image, kind, level).save(out)
                    rows.append((str(out), subject, False))
        vectors = model.encode_images([r[0] for r in rows])
    best = model.encode_texts(AESTHETIC_PROMPTS["best"]).mean(0)
    worst = model.encode_texts(AESTHETIC_PROMPTS["worst"]).mean(0)
    best, worst = best / np.linalg.norm(best), worst / np.linalg.norm(worst)
    subjects = sorted({r[1] for r in rows})
    results = []
    for score, weight in SETTINGS:
        top1, first_rank, above, pairs, originals_top5 = 0, [], 0, 0, []
        for subject in subjects:
            q = model.encode_texts([f"a photo of a {subject}"])[0]
            if score is not None:
                direction = weighted_sum([best, worst], [score / 9, 1 - score / 9])
                q = weighted_sum([q, direction], [1.0, weight])
            order = np.argsort(-(vectors @ q))
            ranked = [rows[i] for i in order]
            top1 += ranked[0][1] == subject
            first_rank.append(next(k for k, r in enumerate(ranked) if r[1] == subject) + 1)
            position = {r[0]: k for k, r in enumerate(ranked)}
            original = next(r for r in rows if r[1] == subject and r[2])
            for r in rows:
                if r[1] == subject and not r[2]:
                    pairs += 1
                    above += position[original[0]] < position[r[0]]
            originals_top5.append(sum(r[2] for r in ranked[:5]) / 5)
        results.append(
            {
                "aesthetic_score": score,
                "aesthetic_weight": weight,
                "top1_subject": f"{top1}/{len(subjects)}",
                "mean_rank_of_subject": round(float(np.mean(first_rank)), 2),
                "original_above_copy": round(above / pairs, 3),
                "originals_in_top5": round(float(np.mean(originals_top5)), 3),
            }
        )
    print(f"{len(rows)} photos ({len(originals)} originals), {len(subjects)} queries")
    head = ["aesthetic (score, weight)", "top-1 subject", "mean rank", "original above copy"]
    print("| " + " | ".join([*head, "originals in top 5"]) + " |")
    print("|---|---|---|---|---|")
    for r in results:
        setting = (
            "none"
            if r["aesthetic_score"] is None
            else f"{r['aesthetic_score']}, {r['aesthetic_weight']:g}"
        )
        print(
            f"| {setting} | {r['top1_subject']} | {r['mean_rank_of_subject']} | "
            f"{r['original_above_copy']} | {r['originals_in_top5']} |"
        )
    if args.out:
        args.out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
