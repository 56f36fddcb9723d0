"""Moderation policies: YAML files of categories, concepts and thresholds.

A policy names the model its thresholds were set for, its categories of concepts (texts
or example images, each with a cosine threshold), optional "special care" concepts whose
hit lowers every threshold by an adjustment (the Stable Diffusion safety checker's
scheme), and an optional trained head. Parsing is strict: every error names the file,
the line and the key.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from cliplens.errors import InvalidInputError
from cliplens.store.files import write_atomic
from cliplens.textfile import read_text

DEFAULT_POLICY = "default"
DEFAULT_ADJUSTMENT = 0.01  # of a special_care section that gives none
HEAD_CATEGORY = "trained head"  # reported when a head flags, unless the policy names one
_TOP_KEYS = {"name", "model", "note", "special_care", "categories", "head"}
_CONCEPT_KEYS = {"text", "image", "threshold"}
_SPECIAL_KEYS = {"adjustment", "concepts"}
_HEAD_KEYS = {"file", "threshold", "category"}


class PolicyError(InvalidInputError):
    """A policy file that cannot be used; the message names the file, line and key."""


@dataclass(frozen=True)
class Concept:
    threshold: float
    text: str | None = None
    image: str | None = None  # absolute path

    @property
    def label(self) -> str:
        return self.text if self.text is not None else f"image:{Path(self.image or '').name}"


@dataclass(frozen=True)
class Category:
    name: str
    concepts: tuple[Concept, ...]


@dataclass(frozen=True)
class Head:
    file: Path
    threshold: float = 0.5
    category: str = HEAD_CATEGORY


@dataclass(frozen=True)
class Policy:
    name: str
    categories: tuple[Category, ...]
    model: str | None = None  # the model the thresholds were set for
    note: str = ""
    special_care: tuple[Concept, ...] = ()
    adjustment: float = 0.0  # subtracted from every threshold when a special concept hits
    head: Head | None = None
    source: Path | None = None

    @property
    def concepts(self) -> list[tuple[str, Concept]]:
        return [(c.name, k) for c in self.categories for k in c.concepts]

    def shifted(self, offsets: dict[str, float]) -> Policy:
        """A copy with each category's thresholds raised by offsets[category]."""

        def shift(name: str, k: Concept) -> Concept:
            return replace(k, threshold=_round(k.threshold + offsets.get(name, 0.0)))

        cats = tuple(
            Category(c.name, tuple(shift(c.name, k) for k in c.concepts)) for c in self.categories
        )
        return replace(self, categories=cats)

    def with_head(
        self, file: Path, model: str, threshold: float = 0.5, category: str = HEAD_CATEGORY
    ) -> Policy:
        """A copy that also flags by a head trained on `model`'s embeddings (its file)."""
        return replace(self, head=Head(file.resolve(), threshold, category), model=model)

    def to_yaml(self, folder: Path | None = None) -> str:
        """The policy as YAML; image paths relative to `folder` where they lie under it."""

        def concept(k: Concept) -> dict[str, Any]:
            if k.text is not None:
                return {"text": k.text, "threshold": k.threshold}
            image = Path(k.image or "")
            if folder is not None and image.is_relative_to(folder):
                image = image.relative_to(folder)
            return {"image": str(image), "threshold": k.threshold}

        doc: dict[str, Any] = {"name": self.name}
        if self.model:
            doc["model"] = self.model
        if self.note:
            doc["note"] = self.note
        if self.special_care:
            doc["special_care"] = {
                "adjustment": self.adjustment,
                "concepts": [concept(k) for k in self.special_care],
            }
        doc["categories"] = {c.name: [concept(k) for k in c.concepts] for c in self.categories}
        if self.head is not None:
            head = self.head.file
            if folder is not None and head.is_relative_to(folder):
                head = head.relative_to(folder)
            threshold, category = self.head.threshold, self.head.category
            doc["head"] = {"file": str(head), "threshold": threshold, "category": category}
        return yaml.safe_dump(doc, sort_keys=False, allow_unicode=True, width=100)

    def save(self, path: str | Path) -> Path:
        """Write the policy as YAML (whole or not at all), its paths relative to its folder."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        text = self.to_yaml(path.parent.resolve())
        write_atomic(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))
        return path


def _round(x: float) -> float:
    return round(float(x), 4)


def load_policy(source: str | Path | None = None) -> Policy:
    """`default` (the shipped policy), or a YAML file; errors name the line and key.

    Why: what to flag, and how close counts, is data the user can read and change.

    >>> import cliplens
    >>> policy = cliplens.load_policy("my-policy.yaml")
    >>> [c.name for c in policy.categories]
    """
    if source is None or str(source) == DEFAULT_POLICY:
        text = resources.files("cliplens.tasks").joinpath("data", "policy-default.yaml")
        return parse_policy(text.read_text("utf-8"), label="default policy", folder=None)
    path = Path(source).expanduser()
    if not path.is_file():
        raise PolicyError(f"policy {source}: no such file (use 'default' or a YAML file)")
    text = read_text(path, "policy", "a YAML policy ('default' is the shipped one)", PolicyError)
    return replace(parse_policy(text, label=str(path), folder=path.parent.resolve()), source=path)


class _Lines:
    """YAML mappings and lists that remember the line of each key and item."""

    class Map(dict):
        line = 0
        lines: dict[Any, int]

    class Seq(list):
        line = 0
        lines: list[int]


def _yaml_load(text: str, label: str) -> Any:
    class Loader(yaml.SafeLoader):
        pass

    def mapping(loader: Any, node: Any) -> _Lines.Map:
        loader.flatten_mapping(node)
        out = _Lines.Map()
        out.line, out.lines = node.start_mark.line + 1, {}
        for key_node, value_node in node.value:
            key = loader.construct_object(key_node, deep=True)
            if key in out:
                raise PolicyError(
                    f"{label} line {key_node.start_mark.line + 1}: duplicate key '{key}'"
                )
            out[key] = loader.construct_object(value_node, deep=True)
            out.lines[key] = key_node.start_mark.line + 1
        return out

    def sequence(loader: Any, node: Any) -> _Lines.Seq:
        out = _Lines.Seq(loader.construct_object(n, deep=True) for n in node.value)
        out.line, out.lines = node.start_mark.line + 1, [n.start_mark.line + 1 for n in node.value]
        return out

    Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, mapping)
    Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_SEQUENCE_TAG, sequence)
    try:
        return yaml.load(text, Loader=Loader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise PolicyError(f"{label}{where}: not valid YAML ({problem})") from None


def parse_policy(text: str, label: str = "policy", folder: Path | None = None) -> Policy:
    """A policy from its YAML text; `label` names it in errors, `folder` resolves its
    relative paths (example images, the head)."""
    doc = _yaml_load(text, label)
    if not isinstance(doc, dict):
        raise PolicyError(f"{label}: expected a mapping with 'name' and 'categories'")
    read = _Reader(label, folder)
    read.check_keys(doc, _TOP_KEYS, "the policy")
    for key in ("name", "categories"):
        if key not in doc:
            raise PolicyError(f"{label}: missing '{key}'")
    categories = read.categories(doc)
    special, adjustment = read.special_care(doc)
    head = read.head(doc)
    model = doc.get("model")
    if model is not None and not isinstance(model, str):
        raise PolicyError(f"{read.at(doc, 'model')}: 'model' must be a model name")
    return Policy(
        name=str(doc["name"]),
        categories=categories,
        model=model,
        note=str(doc.get("note") or "").strip(),
        special_care=special,
        adjustment=adjustment,
        head=head,
    )


class _Reader:
    """Reads the parts of one policy document; every error names its file, line and key."""

    def __init__(self, label: str, folder: Path | None) -> None:
        self.label, self.folder = label, folder

    def at(self, mapping: Any, key: Any) -> str:
        line = getattr(mapping, "lines", {}).get(key) if isinstance(mapping, dict) else None
        return f"{self.label} line {line}" if line else self.label

    def check_keys(self, mapping: dict, allowed: set[str], where: str) -> None:
        for key in mapping:
            if key not in allowed:
                raise PolicyError(
                    f"{self.at(mapping, key)}: unknown key '{key}' in {where} "
                    f"(expected {', '.join(sorted(allowed))})"
                )

    def number(self, mapping: dict, key: str, lo: float, hi: float, where: str) -> float:
        value = mapping.get(key)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
            raise PolicyError(
                f"{self.at(mapping, key)}: {where} '{key}' must be a number, got {value!r}"
            )
        if not lo <= value <= hi:
            raise PolicyError(
                f"{self.at(mapping, key)}: {where} '{key}' is {value}, outside [{lo:g}, {hi:g}]"
            )
        return float(value)

    def concept(self, item: Any, where: str, parent: Any, index: int) -> Concept:
        line = parent.lines[index] if hasattr(parent, "lines") else None
        here = f"{self.label} line {line}" if line else self.label
        if not isinstance(item, dict):
            raise PolicyError(
                f"{here}: each concept in {where} is a mapping with text or image and threshold"
            )
        self.check_keys(item, _CONCEPT_KEYS, where)
        if ("text" in item) == ("image" in item):
            raise PolicyError(f"{here}: a concept in {where} needs exactly one of text or image")
        if "threshold" not in item:
            raise PolicyError(f"{here}: a concept in {where} has no threshold")
        threshold = self.number(item, "threshold", -1.0, 1.0, f"{where} concept")
        if "text" in item:
            if not isinstance(item["text"], str) or not item["text"].strip():
                raise PolicyError(
                    f"{self.at(item, 'text')}: concept text in {where} must be a text"
                )
            return Concept(threshold, text=item["text"].strip())
        image = Path(str(item["image"])).expanduser()
        if not image.is_absolute():
            if self.folder is None:
                raise PolicyError(f"{self.at(item, 'image')}: relative image path in {where}")
            image = self.folder / image
        if not image.is_file():
            raise PolicyError(f"{self.at(item, 'image')}: example image {image} does not exist")
        return Concept(threshold, image=str(image.resolve()))

    def concepts(self, items: Any, where: str, owner: Any, key: Any) -> tuple[Concept, ...]:
        if not isinstance(items, list) or not items:
            raise PolicyError(f"{self.at(owner, key)}: {where} needs a non-empty list of concepts")
        return tuple(self.concept(it, where, items, i) for i, it in enumerate(items))

    def categories(self, doc: dict) -> tuple[Category, ...]:
        cats_doc = doc["categories"]
        if not isinstance(cats_doc, dict) or not cats_doc:
            raise PolicyError(
                f"{self.at(doc, 'categories')}: 'categories' must map names to concept lists"
            )
        return tuple(
            Category(str(name), self.concepts(items, f"category '{name}'", cats_doc, name))
            for name, items in cats_doc.items()
        )

    def special_care(self, doc: dict) -> tuple[tuple[Concept, ...], float]:
        """(special concepts, adjustment): none and 0 without a special_care section."""
        if "special_care" not in doc:
            return (), 0.0
        sc = doc["special_care"]
        if not isinstance(sc, dict):
            raise PolicyError(f"{self.at(doc, 'special_care')}: 'special_care' must be a mapping")
        self.check_keys(sc, _SPECIAL_KEYS, "special_care")
        special = self.concepts(sc.get("concepts"), "special_care", sc, "concepts")
        if "adjustment" not in sc:
            return special, DEFAULT_ADJUSTMENT
        return special, self.number(sc, "adjustment", 0.0, 0.5, "special_care")

    def head(self, doc: dict) -> Head | None:
        if doc.get("head") is None:
            return None
        h = doc["head"]
        if not isinstance(h, dict) or "file" not in h:
            raise PolicyError(f"{self.at(doc, 'head')}: 'head' needs a file (and a threshold)")
        self.check_keys(h, _HEAD_KEYS, "head")
        file = Path(str(h["file"])).expanduser()
        if not file.is_absolute() and self.folder is not None:
            file = self.folder / file
        if not file.is_file():
            raise PolicyError(f"{self.at(h, 'file')}: head file {file} does not exist")
        threshold = self.number(h, "threshold", 0.0, 1.0, "head") if "threshold" in h else 0.5
        return Head(file, threshold, str(h.get("category", HEAD_CATEGORY)))
