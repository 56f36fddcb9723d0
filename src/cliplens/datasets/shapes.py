"""A procedural captioned dataset: coloured shapes on varied backgrounds, with captions.

Each image holds one or two shapes (circle, square, triangle, star, hexagon, diamond) in a
named colour and size; the caption says what is there and where ("a small red circle above
a large blue square"). Training captions mix that full detail with shorter ones ("a small
red circle and a large blue square", "a red circle and a blue square"; see TRAIN_DETAIL).
Everything is drawn from a seed, so the same seed gives the same bytes. Some (shape, colour)
combinations are held out: they never appear in the training split, and the `heldout`
split is made of them, to measure compositional generalisation
(a model that learnt "red" and "star" separately should still find "a red star").

On disk (`write_shapes`): images/NNNNNN.png, and train.jsonl, val.jsonl and heldout.jsonl
with one {"image", "caption", "objects"} per line (image paths relative to the file), the
format `cliplens train` reads (train-full.jsonl is the training split with full captions,
for captioners); single-shape rows also carry "label" ("red circle"), one of
the class names in classes.txt, for zero-shot evaluation with the prompts in templates.txt.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal, get_args

import numpy as np
from PIL import Image, ImageDraw

from cliplens.errors import InvalidInputError
from cliplens.limits import MAX_SHAPE_SIZE, MIN_SHAPE_SIZE
from cliplens.progress import progress_bar
from cliplens.store.files import write_atomic

SHAPES = ("circle", "square", "triangle", "star", "hexagon", "diamond")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (35, 70, 220),
    "yellow": (240, 210, 20),
    "purple": (140, 40, 180),
    "orange": (245, 130, 20),
    "white": (245, 245, 245),
    "black": (15, 15, 15),
}
SIZES = {"small": 0.18, "medium": 0.28, "large": 0.4}  # fraction of the image side
# held out of training: one colour per shape, a different one each time (a Latin square)
HELDOUT: frozenset[tuple[str, str]] = frozenset(
    (shape, list(COLOURS)[(3 * i + 1) % len(COLOURS)]) for i, shape in enumerate(SHAPES)
)
Split = Literal["train", "val", "heldout"]
SPLITS: tuple[Split, ...] = get_args(Split)
Detail = Literal["full", "sizes", "bare"]  # of a caption: sizes and places, sizes, neither


@dataclass(frozen=True)
class Shape:
    kind: str
    colour: str
    size: str
    x: float  # centre, as a fraction of the width
    y: float

    @property
    def phrase(self) -> str:
        return f"a {self.size} {self.colour} {self.kind}"


@dataclass
class Sample:
    image: np.ndarray  # (H, W, 3) uint8
    caption: str  # full detail
    objects: list[Shape]
    train_caption: str = ""  # the caption the training split uses (see TRAIN_DETAIL)


def _relation(a: Shape, b: Shape) -> str:
    dx, dy = b.x - a.x, b.y - a.y
    if abs(dx) >= abs(dy):
        return "to the left of" if dx > 0 else "to the right of"
    return "above" if dy > 0 else "below"


def _position(s: Shape) -> str:
    horizontal = "left" if s.x < 0.4 else "right" if s.x > 0.6 else ""
    vertical = "top" if s.y < 0.4 else "bottom" if s.y > 0.6 else ""
    if horizontal and vertical:
        return f"in the {vertical} {horizontal}"
    if horizontal:
        return f"on the {horizontal}"
    return f"at the {vertical}" if vertical else "in the centre"


def caption_of(objects: list[Shape], detail: Detail = "full") -> str:
    """The caption at a level of detail: "full" (sizes and places), "sizes" (no places) or
    "bare" (colours and shapes only: "a red circle and a blue square")."""
    if detail == "bare":
        return " and ".join(f"a {o.colour} {o.kind}" for o in objects)
    if detail == "sizes":
        return " and ".join(o.phrase for o in objects)
    if len(objects) == 1:
        return f"{objects[0].phrase} {_position(objects[0])}"
    a, b = objects
    return f"{a.phrase} {_relation(a, b)} {b.phrase}"


# the mix of caption details in the training split (val and heldout keep the full ones).
# Short captions are what teaches shape: "a red circle" must be told apart from every other
# red image in the batch, wherever it sits, and only its shape can do that. With full
# captions alone, place and size separate most pairs and shape is learnt late.
TRAIN_DETAIL: dict[Detail, float] = {"full": 0.5, "sizes": 0.25, "bare": 0.25}


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """Muted colours that no shape uses: a flat tone, a gradient, or soft noise."""
    base = rng.integers(90, 170, 3).astype(np.float32)
    kind = rng.integers(0, 3)
    img = np.broadcast_to(base, (size, size, 3)).copy()
    if kind == 1:
        ramp = np.linspace(-25, 25, size, dtype=np.float32)
        img += ramp[:, None, None] if rng.random() < 0.5 else ramp[None, :, None]
    elif kind == 2:
        img += rng.normal(0, 12, (size, size, 1)).astype(np.float32)
    return np.clip(img, 0, 255).astype(np.uint8)


def _polygon(kind: str, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    if kind == "square":
        n, start = 4, math.pi / 4
    elif kind == "diamond":
        n, start = 4, 0.0
    elif kind == "triangle":
        n, start = 3, -math.pi / 2
    elif kind == "hexagon":
        n, start = 6, 0.0
    else:  # star: 5 points, alternating radii
        pts = []
        for i in range(10):
            rad = r if i % 2 == 0 else r * 0.45
            a = -math.pi / 2 + i * math.pi / 5 + angle
            pts.append((cx + rad * math.cos(a), cy + rad * math.sin(a)))
        return pts
    turns = [start + angle + 2 * math.pi * i / n for i in range(n)]
    return [(cx + r * math.cos(t), cy + r * math.sin(t)) for t in turns]


def render(objects: list[Shape], size: int, rng: np.random.Generator) -> np.ndarray:
    img = Image.fromarray(_background(rng, size))
    draw = ImageDraw.Draw(img)
    for s in objects:
        cx, cy, r = s.x * size, s.y * size, SIZES[s.size] * size / 2
        fill = COLOURS[s.colour]
        if s.kind == "circle":
            draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
        else:
            angle = float(rng.uniform(-0.15, 0.15))  # a slight tilt; a diamond stays a diamond
            draw.polygon(_polygon(s.kind, cx, cy, r, angle), fill=fill)
    return np.asarray(img)


def _objects(rng: np.random.Generator, split: Split) -> list[Shape]:
    """One or two shapes; train/val avoid the held-out combinations, heldout uses one."""
    n = 1 if rng.random() < 0.5 else 2
    allowed = [
        (k, c) for k in SHAPES for c in COLOURS if ((k, c) in HELDOUT) == (split == "heldout")
    ]
    others = [(k, c) for k in SHAPES for c in COLOURS if (k, c) not in HELDOUT]
    combos = [allowed[rng.integers(len(allowed))]]
    if n == 2:
        pool = others if split == "heldout" else allowed  # one held-out object is enough
        combos.append(pool[rng.integers(len(pool))])
    out: list[Shape] = []
    for kind, colour in combos:
        for _ in range(200):  # a size and place clear of the first shape
            size = list(SIZES)[rng.integers(len(SIZES))]
            margin = SIZES[size] / 2 + 0.04
            x, y = rng.uniform(margin, 1 - margin, 2)
            if (
                not out
                or math.hypot(x - out[0].x, y - out[0].y)
                > (SIZES[size] + SIZES[out[0].size]) / 2 + 0.06
            ):
                break
        else:  # cannot happen for a small second shape, which always fits
            raise RuntimeError("no room for a second shape")
        out.append(Shape(kind, colour, size, float(round(x, 3)), float(round(y, 3))))
    return out


def sample(seed: int, index: int, split: Split = "train", size: int = 64) -> Sample:
    """The index-th sample of a split: the same (seed, split, index) gives the same image.

    Why: samples are drawn on demand, so tests and benchmarks need no files.

    >>> from cliplens.datasets.shapes import sample
    >>> s = sample(seed=0, index=3, split="heldout", size=64)
    >>> s.image.shape, s.caption  # (64, 64, 3), 'a large red star at the top'
    """
    if split not in SPLITS:
        raise InvalidInputError(f"split '{split}': one of {', '.join(SPLITS)}")
    rng = np.random.default_rng([seed, SPLITS.index(split), index])
    objects = _objects(rng, split)
    image = render(objects, size, rng)
    # the detail has its own stream, so the images do not depend on it
    pick = np.random.default_rng([seed, SPLITS.index(split), index, 1]).random()
    detail: Detail = "full"
    for name, share in TRAIN_DETAIL.items():
        if pick < share:
            detail = name
            break
        pick -= share
    return Sample(image, caption_of(objects), objects, caption_of(objects, detail))


def class_names() -> list[str]:
    """'colour shape' for every combination: the labels for zero-shot evaluation."""
    return [f"{c} {k}" for k in SHAPES for c in COLOURS]


def write_shapes(
    out_dir: str | os.PathLike,
    n: int = 20000,
    seed: int = 0,
    size: int = 64,
    val_fraction: float = 0.05,
    heldout: int | None = None,
    progress: bool = False,
) -> dict[Split, int]:
    """Write n training-split samples (a val_fraction of them as val) plus a heldout split
    (default: as many as val). Returns the number written per split.

    Why: a captioned dataset small CLIPs learn in minutes, with unseen (shape, colour)
    pairs held out to test composition.

    >>> import cliplens
    >>> cliplens.write_shapes("shapes/", n=2000, size=64)  # {'train': 1900, 'val': 100, ...}
    """
    if n < 1 or not MIN_SHAPE_SIZE <= size <= MAX_SHAPE_SIZE:
        raise InvalidInputError(
            f"`n` {n} must be >= 1 and `size` {size} in {MIN_SHAPE_SIZE}..{MAX_SHAPE_SIZE}"
        )
    if not 0 <= val_fraction < 1 or (heldout is not None and heldout < 0):
        raise InvalidInputError(f"val fraction {val_fraction} must be in [0, 1), heldout >= 0")
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    n_val = round(n * val_fraction)
    held = n_val if heldout is None else heldout
    counts: dict[Split, int] = {"train": n - n_val, "val": n_val, "heldout": held}
    # val continues the training stream after its last sample; heldout has its own stream
    streams: dict[Split, tuple[Split, int]] = {
        "train": ("train", 0),
        "val": ("train", counts["train"]),
        "heldout": ("heldout", 0),
    }
    first = 0
    with progress_bar(sum(counts.values()), "drawing shapes", progress) as advance:
        for split, count in counts.items():
            source, offset = streams[split]
            rows, full = [], []
            for i in range(count):
                s = sample(seed, offset + i, source, size)
                name = f"images/{first + i:06d}.png"
                _save_png(s.image, out / name)
                caption = s.train_caption if split == "train" else s.caption
                objects = [asdict(o) for o in s.objects]
                row = {"image": name, "caption": caption, "objects": objects}
                if len(s.objects) == 1:  # a class label for zero-shot evaluation
                    row["label"] = f"{s.objects[0].colour} {s.objects[0].kind}"
                rows.append(row)
                full.append({**row, "caption": s.caption})
                advance(1)
            _write_jsonl(out / f"{split}.jsonl", rows)
            if split == "train":  # for captioners, which learn to say what the references say
                _write_jsonl(out / "train-full.jsonl", full)
            first += count
    _write_lines(out / "classes.txt", class_names())
    _write_lines(out / "templates.txt", templates())
    return counts


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    _write_lines(path, [json.dumps(r) for r in rows])


def _write_lines(path: Path, lines: list[str]) -> None:
    text = "".join(line + "\n" for line in lines)
    write_atomic(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def named_objects(caption: str) -> list[tuple[str, str]]:
    """The (colour, shape) pairs a caption names, in order: "a small red circle above a blue
    star" -> [("red", "circle"), ("blue", "star")]. A colour counts only right before a shape
    (a size word may sit between)."""
    words = caption.lower().replace(",", " ").split()
    found = []
    for i, w in enumerate(words):
        if w in SHAPES and i >= 1:
            j = i - 1
            if words[j] in SIZES and j >= 1:
                j -= 1
            if words[j] in COLOURS:
                found.append((words[j], w))
    return found


def names_all_objects(caption: str, objects: list[Shape] | list[dict]) -> bool:
    """True when the caption names the colour and shape of every object and nothing else."""
    pairs = [
        (o["colour"], o["kind"]) if isinstance(o, dict) else (o.colour, o.kind) for o in objects
    ]
    truth = sorted(pairs)
    return sorted(named_objects(caption)) == truth


def templates() -> list[str]:
    """Zero-shot prompts shaped like the captions (a size, the class, a place), to average:
    a model trained on these captions has never read "a red circle" on its own."""
    places = ("on the left", "on the right", "at the top", "at the bottom", "in the centre")
    return [f"a {size} {{}} {place}" for size in SIZES for place in places]


def _save_png(pixels: np.ndarray, path: Path) -> None:
    image = Image.fromarray(pixels)
    write_atomic(path, lambda tmp: image.save(tmp, format="PNG"))
