"""The OpenVINO engine: image towers converted once, checked, and run without torch.

On CPU, OpenVINO runs a CLIP image tower faster than PyTorch (on this project's 2-core
Zen 4, ViT-B-32-256 at batch 32: bf16 33.9 against PyTorch's 24.8 images/s, int8 61.9;
benchmarks/RESULTS.md).
A model's image tower is converted from its fp32 PyTorch module once, into
CLIPLENS_HOME/openvino/<model_id>/ (models.openvino_convert), and each precision is kept
only where it reproduces PyTorch's fp32 forward on fixed photos:

- fp32 and bf16: cosine >= 0.9999 on every photo;
- int8 (NNCF's post-training quantisation, a fixed calibration set): mean cosine >= 0.99
  and the same top-1 zero-shot label on >= 98% of the photos. An int8 network is another
  network: its vectors are stored under `<model_id>+int8`, apart from the others.

Each kept precision's speed against PyTorch's is measured on this CPU at the same time;
`engine="auto"` runs OpenVINO only where it is faster. `meta.json` records all of it, so
a later process decides and runs the network without importing torch
(models.openvino_runtime). Texts go through the ONNX text tower (models.onnx_text) or,
without one, through PyTorch.

This module is light (no openvino, no torch, no Pillow): it is on the query path.
"""

from __future__ import annotations

import functools
import json
import os
import re
from dataclasses import dataclass, replace
from enum import StrEnum
from pathlib import Path
from typing import Any

from cliplens.device import Precision, cpu_name
from cliplens.errors import DependencyMissingError, InvalidInputError, ModelError
from cliplens.models.info import INT8_SUFFIX, ModelInfo
from cliplens.settings import get_settings
from cliplens.store.files import read_record, write_atomic

FORMAT = 3
# what the int8 check is; a verdict made under another one is measured again
INT8_GATE = "63 views, 100 ImageNet prompts, mean cosine 0.99, top-1 agreement 0.98"
# runs an int8 network the check refused: for timing on random weights, never for real use
UNCHECKED_ENV = "CLIPLENS_INT8_UNCHECKED"
MIN_COSINE = 0.9999  # fp32 and bf16 against PyTorch's fp32 forward, every photo
INT8_MIN_MEAN_COSINE = 0.99
INT8_MIN_AGREEMENT = 0.98  # share of photos with the same top-1 zero-shot label
INSTALL = "pip install 'cliplens[openvino]'"


class Engine(StrEnum):
    """What runs a model's network."""

    AUTO = "auto"  # OpenVINO on CPU where installed, kept and measured faster; else torch
    TORCH = "torch"
    OPENVINO = "openvino"


def parse_engine(requested: str | Engine | None) -> Engine:
    """`requested` as an Engine (None or "" reads CLIPLENS_ENGINE, then auto)."""
    value = requested or os.environ.get("CLIPLENS_ENGINE") or "auto"
    try:
        return Engine(str(value).strip().lower())
    except ValueError as e:
        raise InvalidInputError(f"engine '{value}' is unknown; use auto, torch or openvino") from e


@functools.cache
def available() -> bool:
    """Whether the openvino package can be imported (imported once to tell, ~0.3 s: only
    where images are about to be encoded)."""
    try:
        import openvino  # noqa: F401 (optional: is it there and importable?)
    except ImportError:
        return False
    return True


def require(what: str) -> None:
    """Raise the one-line install hint unless openvino (and, for int8, nncf) is there."""
    if not available():
        raise DependencyMissingError(f"{what} needs the openvino package: {INSTALL}")


def folder_for(model_id: str) -> Path:
    return get_settings().home / "openvino" / re.sub(r"[^A-Za-z0-9._-]+", "_", model_id)


def int8_info(info: ModelInfo) -> ModelInfo:
    """The identity of `info`'s int8 network: its own model_id, the same text tower."""
    return replace(
        info,
        model_id=info.model_id + INT8_SUFFIX,
        quantized_from=info.model_id,
        precision=Precision.INT8,
        engine=Engine.OPENVINO.value,
        device="cpu",
    )


# ------------------------------------------------------------------ what was measured


@dataclass(frozen=True)
class Variant:
    """One precision of a converted tower on this CPU: kept or not, and its figures."""

    precision: Precision
    kept: bool
    file: str  # the IR's .xml, in the model's folder
    images_per_s: float
    min_cosine: float
    mean_cosine: float
    agreement: float | None = None  # int8: share of photos with the same top-1 label
    reason: str = ""  # why it was not kept

    def figures(self) -> str:
        text = f"min cosine {self.min_cosine:.5f}, mean {self.mean_cosine:.5f}"
        if self.agreement is not None:
            text += f", top-1 agreement {100 * self.agreement:.1f}%"
        return f"{text}, {self.images_per_s:.1f} images/s"


@dataclass(frozen=True)
class Measured:
    """What converting `model_id` found on this CPU (meta.json's entry for it)."""

    model_id: str
    cpu: str
    torch_precision: Precision
    torch_images_per_s: float
    variants: dict[Precision, Variant]
    feature_id: str  # the torch encoder's: features other than the embeddings need torch
    photos: int  # how many fixed photos the checks ran on
    reason: str = ""  # why there are no variants (the converter cannot take the tower)
    text: dict[str, Any] | None = None  # the text tower's figures (models.openvino_text)

    def best(self, precision: Precision | None) -> Variant | None:
        """The kept variant at `precision`, or the fastest kept fp32/bf16 one for None."""
        if precision is not None:
            v = self.variants.get(precision)
            return v if v is not None and v.kept else None
        kept = [v for p, v in self.variants.items() if v.kept and p is not Precision.INT8]
        return max(kept, key=lambda v: v.images_per_s, default=None)


def read_measured(model_id: str) -> Measured | None:
    """The measurements of `model_id` on this CPU, or None if not made here yet."""
    meta = _read_meta(model_id)
    entry = meta.get("cpus", {}).get(cpu_name()) if meta else None
    if not entry:
        return None
    variants = {
        Precision(p): Variant(precision=Precision(p), **v)
        for p, v in entry["variants"].items()
        if p != Precision.INT8 or entry.get("int8_gate") == INT8_GATE
    }
    return Measured(
        model_id=model_id,
        cpu=cpu_name(),
        torch_precision=Precision(entry["torch_precision"]),
        torch_images_per_s=entry["torch_images_per_s"],
        variants=variants,
        feature_id=meta.get("feature_id", model_id),
        photos=entry.get("photos", 0),
        reason=entry.get("reason", ""),
        text=entry.get("text"),
    )


def write_measured(measured: Measured) -> None:
    """Add or update this CPU's entry in the model's meta.json (atomically)."""
    meta = _read_meta(measured.model_id) or {
        "format": FORMAT,
        "model_id": measured.model_id,
        "cpus": {},
    }
    meta["feature_id"] = measured.feature_id
    variants = {}
    for p, v in measured.variants.items():
        d = {k: getattr(v, k) for k in Variant.__dataclass_fields__ if k != "precision"}
        variants[p.value] = d
    meta["cpus"][measured.cpu] = {
        "torch_precision": measured.torch_precision.value,
        "torch_images_per_s": measured.torch_images_per_s,
        "variants": variants,
        "photos": measured.photos,
        "reason": measured.reason,
        "text": measured.text,
        "int8_gate": INT8_GATE,
    }
    path = folder_for(measured.model_id) / "meta.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, lambda tmp: tmp.write_text(json.dumps(meta, indent=1)))


def write_unsupported(model_id: str, reason: str) -> None:
    """Remember that OpenVINO cannot take this model's tower, so it is not retried."""
    write_measured(Measured(model_id, cpu_name(), Precision.FP32, 0.0, {}, model_id, 0, reason))


def _read_meta(model_id: str) -> dict[str, Any] | None:
    return read_record(folder_for(model_id) / "meta.json", FORMAT, model_id)


def refusal(
    info: ModelInfo, variant: Variant | None, precision: Precision, reason: str = ""
) -> ModelError:
    """The one-line error for a precision OpenVINO may not run this model at."""
    if variant is None:
        why = reason or f"no {precision} network was measured"
        return ModelError(f"model {info.name}: not on the OpenVINO engine: {why}")
    if precision is Precision.INT8:
        return ModelError(
            f"model {info.name}: int8 is refused on this CPU: {variant.reason} "
            f"({variant.figures()}); use `precision` bf16 or fp32"
        )
    return ModelError(
        f"model {info.name}: OpenVINO's {precision} network is not kept: {variant.reason}; "
        f"use `engine` torch"
    )
