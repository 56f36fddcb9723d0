"""`cliplens score` (CLIPScore, RefCLIPScore) and `cliplens rerank` (best-of-N)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Annotated

import numpy as np
import typer

from cliplens.cli.common import (
    MAX_COUNT,
    DbOpt,
    DeviceOpt,
    MegapixelsOpt,
    ModelOpt,
    PrecisionOpt,
    collect_images,
    embed_paths,
    out_folder,
)
from cliplens.cli.output import Format, info, print_csv, print_json, print_table, warn
from cliplens.errors import InvalidInputError
from cliplens.textfile import read_lines


def _read_captions(path: Path) -> list[dict]:
    """{"image", "caption", "references"?} per line: what `caption eval --captions-out`
    writes."""
    rows = []
    expected = 'JSON lines of {"image": ..., "caption": ...}'
    lines = read_lines(path, "--captions", expected, comments=True, required=True)
    for n, line in enumerate(lines, 1):
        try:
            row = json.loads(line)
            image, caption = str(row["image"]), str(row["caption"])
        except (ValueError, KeyError, TypeError, RecursionError) as e:
            raise InvalidInputError(
                f'--captions {path} line {n}: need {{"image": ..., "caption": ...}} ({e})'
            ) from None
        refs = row.get("references") or []
        if not isinstance(refs, list) or not all(isinstance(r, str) for r in refs):
            raise InvalidInputError(
                f"--captions {path} line {n}: references must be a list of texts"
            )
        image_path = Path(image) if Path(image).is_absolute() else path.parent / image
        rows.append({"image": image_path, "caption": caption, "references": refs})
    return rows


def score_command(
    paths: Annotated[list[Path] | None, typer.Argument(help="Images to score.")] = None,
    prompt: Annotated[
        str | None, typer.Option("--prompt", "-p", help="The text each image is scored against.")
    ] = None,
    refs: Annotated[
        Path | None,
        typer.Option("--refs", help="Reference captions, one per line: adds RefCLIPScore."),
    ] = None,
    captions: Annotated[
        Path | None,
        typer.Option(
            "--captions",
            help='JSONL of {"image", "caption", "references"}: score each image against its '
            "own caption (what `caption eval --captions-out` writes).",
        ),
    ] = None,
    fmt: Annotated[Format, typer.Option("--format", "-f")] = Format.table,
    model: ModelOpt = None,
    device: DeviceOpt = None,
    precision: PrecisionOpt = None,
    db: DbOpt = None,
    max_megapixels: MegapixelsOpt = None,
) -> None:
    """CLIPScore = 2.5 * max(cos(image, text), 0) per image, and the mean; RefCLIPScore with
    reference captions (Hessel et al. 2021)."""
    from cliplens.models.ref import ModelRef
    from cliplens.tasks.score import clip_score, cosine, ref_clip_score

    if (captions is None) == (prompt is None):
        raise InvalidInputError("give --prompt TEXT with image PATHS, or --captions FILE")
    if captions is not None and (paths or refs):
        raise InvalidInputError("--captions names its images and references: drop PATHS/--refs")
    if prompt is not None and not prompt.strip():
        raise InvalidInputError("--prompt is empty")
    shared_refs = None
    if refs is not None:
        expected = "reference captions, one per line"
        shared_refs = read_lines(refs, "--refs", expected, comments=True, required=True)
    rows = _read_captions(captions) if captions else None
    files, missing = collect_images([r["image"] for r in rows] if rows else (paths or []))
    if not files and not missing:
        raise InvalidInputError("no images: give image files or folders")
    ref = ModelRef(model, device=device, precision=precision)
    done = embed_paths(ref, files, db, max_megapixels)
    for e in [*missing, *done.failures]:
        warn(f"{e} (not scored)")
    if not done.paths:
        raise typer.Exit(1)
    if rows:
        by_path = {str(Path(r["image"]).resolve()): r for r in rows}
        kept = [by_path[p] for p in done.paths]
        texts = ref.encode_texts([r["caption"] for r in kept])
        ref_sets = [r["references"] for r in kept]
    else:
        kept = None
        texts = ref.encode_texts([prompt])
        ref_sets = [shared_refs] * len(done.paths) if shared_refs else None
    signed = cosine(done.vectors, texts)
    clip = clip_score(done.vectors, texts)
    ref_scores = harmonic = None
    if ref_sets is not None and all(ref_sets):
        unique = sorted({t for s in ref_sets for t in s})
        emb = dict(zip(unique, ref.encode_texts(unique), strict=True))
        ref_scores, harmonic = ref_clip_score(
            done.vectors, texts, [np.stack([emb[t] for t in s]) for s in ref_sets]
        )
    elif ref_sets is not None:
        warn("some images have no references: RefCLIPScore is left out")
    out = []
    for i, path in enumerate(done.paths):
        row = {"path": path, "cosine": round(float(signed[i]), 4),
               "clip_score": round(float(clip[i]), 4)}  # fmt: skip
        if kept is not None:
            row["caption"] = kept[i]["caption"]
        if harmonic is not None and ref_scores is not None:
            row["ref_score"] = round(float(ref_scores[i]), 4)
            row["ref_clip_score"] = round(float(harmonic[i]), 4)
        out.append(row)
    mean = {"clip_score": round(float(np.mean(clip)), 4)}
    if harmonic is not None:
        mean["ref_clip_score"] = round(float(np.mean(harmonic)), 4)
    keys = [k for k in out[0] if k != "path"]
    if fmt is Format.json:
        print_json({"images": out, "mean": mean, "model": ref.info.model_id})
    elif fmt is Format.csv:
        print_csv(["path", *keys], [[r["path"], *(r[k] for k in keys)] for r in out])
    else:
        title = "  ".join(f"mean {k} {v}" for k, v in mean.items())
        print_table(["path", *keys], [[r["path"], *(r[k] for k in keys)] for r in out], title)
    if missing or done.failures:
        raise typer.Exit(1)


def rerank_command(
    prompt: Annotated[str, typer.Argument(help="What the images should show.")],
    paths: Annotated[list[Path], typer.Argument(help="Candidate images or folders.")],
    k: Annotated[
        int | None, typer.Option("-k", "--top", help="Keep the best K.", min=1, max=MAX_COUNT)
    ] = None,
    copy_top: Annotated[
        Path | None,
        typer.Option("--copy-top", help="Copy the best K into this folder, as 01-NAME..."),
    ] = None,
    fmt: Annotated[Format, typer.Option("--format", "-f")] = Format.table,
    model: ModelOpt = None,
    device: DeviceOpt = None,
    precision: PrecisionOpt = None,
    db: DbOpt = None,
    max_megapixels: MegapixelsOpt = None,
) -> None:
    """Order candidate images by how well they fit PROMPT (best-of-N, as DALL-E reranked its
    samples with CLIP)."""
    from cliplens.models.ref import ModelRef
    from cliplens.tasks.score import clip_score, rank

    if not prompt.strip():
        raise InvalidInputError("the prompt is empty")
    if copy_top is not None:
        out_folder(copy_top, "--copy-top")
    files, missing = collect_images(paths)
    ref = ModelRef(model, device=device, precision=precision)
    done = embed_paths(ref, files, db, max_megapixels)
    for e in [*missing, *done.failures]:
        warn(f"{e} (not ranked)")
    if not done.paths:
        raise typer.Exit(1)
    text = ref.encode_texts([prompt])
    order, cos = rank(done.vectors, text)
    scores = clip_score(done.vectors, text)
    top = order[:k] if k else order
    rows = [(r + 1, done.paths[i], round(float(cos[i]), 4), round(float(scores[i]), 4))
            for r, i in enumerate(top)]  # fmt: skip
    if copy_top is not None:
        copy_top.mkdir(parents=True, exist_ok=True)
        width = len(str(len(rows)))
        for r, path, _, _ in rows:
            shutil.copy2(path, copy_top / f"{r:0{width}d}-{Path(path).name}")
        info(f"copied the best {len(rows)} to {copy_top}")
    if fmt is Format.json:
        print_json([{"rank": r, "path": p, "cosine": c, "clip_score": s} for r, p, c, s in rows])
    elif fmt is Format.csv:
        print_csv(["rank", "path", "cosine", "clip_score"], rows)
    else:
        print_table(["rank", "path", "cosine", "clip_score"], rows, title=prompt)
