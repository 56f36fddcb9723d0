"""Image-caption pairs for training, from the formats people keep them in.

- JSONL: one {"image": PATH, "caption": TEXT} per line (extra keys are ignored);
- CSV: a header with `image` and `caption` columns (or `filepath` and `title`, as
  open_clip's training scripts write them);
- a folder of images with a sidecar caption file each (photo.jpg + photo.txt);
- WebDataset tar shards ("shards/train-{0000..0099}.tar"): files grouped by key, an image
  (.jpg, .jpeg, .png, .webp) and a caption (.txt, or .json with "caption" or "text").

Image paths are relative to the file that lists them. A malformed row is an error that
names the file and the row, not a silent skip: a training run should not quietly lose data.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
import tarfile
from dataclasses import dataclass
from pathlib import Path

from cliplens.errors import InvalidInputError
from cliplens.textfile import read_text

_IMAGE_KEYS = ("image", "filepath", "path")
_CAPTION_KEYS = ("caption", "title", "text")


_SHARD_IMAGES = ("jpg", "jpeg", "png", "webp")


@dataclass(frozen=True)
class Pair:
    image: Path  # for a shard member: "SHARD.tar/KEY.EXT", which names it in errors
    caption: str
    data: bytes | None = None  # the encoded image, for shard members

    def source(self):
        """What `open_image` takes: the path, or the shard member's decoded image."""
        if self.data is None:
            return self.image
        from PIL import Image  # only for a shard member: reading pairs stays PIL-free

        return Image.open(io.BytesIO(self.data))


class DataError(InvalidInputError):
    """Training data that cannot be used: names the file and the row."""


def read_pairs(source: str | os.PathLike, check_files: bool = True) -> list[Pair]:
    """All (image, caption) pairs listed by a .jsonl or .csv file, found in a folder, or
    held in WebDataset shards (a .tar path, or a pattern like "train-{000..009}.tar"):
    why, the training data of every trainer here, read one way, a bad row an error.

    >>> import cliplens
    >>> pairs = cliplens.read_pairs("shapes/train.jsonl")
    >>> pairs[0].caption  # doctest: +SKIP
    """
    if _is_shards(source):
        return _read_shards(str(source))
    path = Path(source)
    if path.is_dir():
        return _read_folder(path)
    if not path.is_file():
        raise DataError(f"training data {source}: no such file or folder")
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json"):
        rows = [row[:3] for row in _read_jsonl(path)]
    elif suffix in (".csv", ".tsv"):
        rows = _read_csv(path, "\t" if suffix == ".tsv" else ",")
    else:
        raise DataError(f"training data {source}: expected .jsonl, .csv, .tsv or a folder")
    return _listed_pairs(path, rows, check_files)


def read_labelled_pairs(
    source: str | os.PathLike, check_files: bool = True
) -> list[tuple[Pair, str]]:
    """Each pair of a .jsonl file with its row's "label" (stripped; "" where the row has no
    text label), from one reading of the file: the rows `read_pairs` would give."""
    path = Path(source)
    if not path.is_file():
        raise DataError(f"training data {source}: no such file or folder")
    rows = _read_jsonl(path)
    pairs = _listed_pairs(path, [row[:3] for row in rows], check_files)
    labels = [label.strip() if isinstance(label, str) else "" for *_, label in rows]
    return list(zip(pairs, labels, strict=True))


def _listed_pairs(path: Path, rows: list[tuple[int, str, str]], check_files: bool) -> list[Pair]:
    """The pairs of a listing's rows, images relative to the listing."""
    pairs = []
    for line, image, caption in rows:
        pair = Pair((path.parent / image).resolve(), caption)
        if check_files and not pair.image.is_file():
            raise DataError(f"{path} row {line}: image {image} does not exist")
        pairs.append(pair)
    if not pairs:
        raise DataError(f"training data {path}: no rows")
    return pairs


def _field(row: dict, keys: tuple[str, ...], where: str, what: str) -> str:
    for key in keys:
        value = row.get(key)
        if value is not None:
            if not isinstance(value, str) or not value.strip():
                raise DataError(f"{where}: '{key}' must be a non-empty text")
            return value.strip()
    raise DataError(f"{where}: no {what} (expected one of {', '.join(keys)})")


def _read_jsonl(path: Path) -> list[tuple[int, str, str, object]]:
    """(line, image, caption, label) per row; the label as the row has it (None if none)."""
    rows = []
    text = read_text(
        path, "training data", 'JSON lines of {"image": ..., "caption": ...}', DataError
    )
    for n, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        where = f"{path} row {n}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{where}: not valid JSON ({e.msg})") from None
        except RecursionError:
            raise DataError(f"{where}: JSON nested too deep") from None
        if not isinstance(row, dict):
            raise DataError(f"{where}: expected an object with image and caption")
        image = _field(row, _IMAGE_KEYS, where, "image")
        caption = _field(row, _CAPTION_KEYS, where, "caption")
        rows.append((n, image, caption, row.get("label")))
    return rows


def _read_csv(path: Path, delimiter: str) -> list[tuple[int, str, str]]:
    text = read_text(path, "training data", "a CSV file with image and caption columns", DataError)
    reader = csv.DictReader(io.StringIO(text, newline=""), delimiter=delimiter)
    try:
        return _csv_rows(path, reader)
    except csv.Error as e:  # a NUL byte, an unclosed quote, a field over the size limit
        raise DataError(f"{path} row {reader.line_num}: not a readable CSV row ({e})") from None


def _csv_rows(path: Path, reader: csv.DictReader) -> list[tuple[int, str, str]]:
    header = reader.fieldnames or []
    if not any(k in header for k in _IMAGE_KEYS) or not any(k in header for k in _CAPTION_KEYS):
        images, captions = ", ".join(_IMAGE_KEYS), ", ".join(_CAPTION_KEYS)
        raise DataError(
            f"{path} row 1: the header needs an image column ({images}) "
            f"and a caption column ({captions})"
        )
    rows = []
    for row in reader:
        where = f"{path} row {reader.line_num}"
        if None in row:
            raise DataError(f"{where}: more fields than the header has")
        image = _field(row, _IMAGE_KEYS, where, "image")
        caption = _field(row, _CAPTION_KEYS, where, "caption")
        rows.append((reader.line_num, image, caption))
    return rows


def _read_folder(folder: Path) -> list[Pair]:
    # numpy and PIL load only for a folder of images: a JSONL or CSV list needs neither
    from cliplens.images import iter_image_files

    pairs = []
    for image in iter_image_files([folder]):
        text = image.with_suffix(".txt")
        if not text.is_file():
            raise DataError(f"{image}: no caption file {text.name} beside it")
        expected = f"the caption of {image.name} as text"
        caption = read_text(text, "training data", expected, DataError).strip()
        if not caption:
            raise DataError(f"{text}: empty caption")
        pairs.append(Pair(image.resolve(), caption))
    if not pairs:
        raise DataError(f"training data {folder}: no images")
    return pairs


def _is_shards(source: str | os.PathLike) -> bool:
    text = str(source)
    return text.endswith(".tar") or (".tar" in text and "{" in text)


def expand_shards(spec: str) -> list[str]:
    """Brace patterns as WebDataset writes them: "a-{000..002}.tar" -> a-000, a-001, a-002;
    "{x,y}.tar" -> x.tar, y.tar; several braces multiply."""
    m = re.search(r"\{([^{}]*)\}", spec)
    if not m:
        return [spec]
    body, head, tail = m.group(1), spec[: m.start()], spec[m.end() :]
    rng = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if rng:
        lo, hi = rng.groups()
        items = [str(i).zfill(len(lo)) for i in range(int(lo), int(hi) + 1)]
    else:
        items = body.split(",")
    return [out for item in items for out in expand_shards(head + item + tail)]


def _read_shards(spec: str) -> list[Pair]:
    shards = expand_shards(spec)
    missing = [s for s in shards if not Path(s).is_file()]
    if missing:
        raise DataError(f"training data {spec}: shard {missing[0]} does not exist")
    pairs = []
    for shard in shards:
        samples: dict[str, dict[str, bytes]] = {}
        try:
            with tarfile.open(shard) as tar:
                for member in tar:
                    if not member.isfile():
                        continue
                    folder, _, base = member.name.rpartition("/")
                    # WebDataset: the key ends at the first dot
                    stem, dot, ext = base.partition(".")
                    if not dot or stem.startswith("."):
                        continue
                    key = f"{folder}/{stem}" if folder else stem
                    f = tar.extractfile(member)
                    samples.setdefault(key, {})[ext.lower()] = f.read() if f else b""
        except (tarfile.TarError, OSError) as e:
            raise DataError(f"training data {shard}: not a readable tar shard ({e})") from None
        for key, files in samples.items():
            where = f"{shard} sample {key}"
            image_ext = next((e for e in _SHARD_IMAGES if e in files), None)
            if image_ext is None:
                raise DataError(f"{where}: no image ({', '.join(_SHARD_IMAGES)})")
            member = Path(shard) / f"{key}.{image_ext}"
            pairs.append(Pair(member, _shard_caption(files, where), files[image_ext]))
    if not pairs:
        raise DataError(f"training data {spec}: the shards hold no samples")
    return pairs


def _shard_caption(files: dict[str, bytes], where: str) -> str:
    if "txt" in files:
        caption = files["txt"].decode("utf-8", errors="replace").strip()
        if not caption:
            raise DataError(f"{where}: empty caption")
        return caption
    if "json" in files:
        try:
            row = json.loads(files["json"])
        except ValueError as e:
            raise DataError(f"{where}: .json is not valid JSON ({e})") from None
        if not isinstance(row, dict):
            raise DataError(f"{where}: .json must be an object with a caption")
        return _field(row, _CAPTION_KEYS, where, "caption")
    raise DataError(f"{where}: no caption (.txt, or .json with caption or text)")
