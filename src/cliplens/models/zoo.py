"""What models exist and what each one is, without loading its weights."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

from cliplens.errors import DependencyMissingError
from cliplens.models.registry import OFFLINE, Kind, ModelSpec, parse_model_name
from cliplens.preprocess import Interpolation, ResizeMode
from cliplens.settings import get_settings


@dataclass
class ModelEntry:
    """One row of `known_models`."""

    name: str
    cached: bool
    default: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _offline_installed() -> bool:
    from cliplens.models import offline  # torch: only once models are listed

    try:
        return offline.mobilenet_weights().is_file() and offline.minilm_dir().is_dir()
    except DependencyMissingError:
        return False


def known_models() -> list[ModelEntry]:
    """The offline model and every arch:tag open_clip publishes, marking what is cached.

    Why: the names `load_model` takes, and which of them work without a download.

    >>> import cliplens
    >>> ready = [m.name for m in cliplens.known_models() if m.cached]
    >>> "offline" in ready
    """
    import open_clip  # torch: only when models are listed, not on importing this module

    from cliplens.models.openclip import cached_weights  # torch and open_clip, as above

    default = get_settings().default_model
    entries = [ModelEntry(OFFLINE, cached=_offline_installed(), default=default == OFFLINE)]
    for arch, tag in open_clip.list_pretrained():
        name = f"{arch}:{tag}"
        entries.append(ModelEntry(name, cached_weights(arch, tag) is not None, name == default))
    return entries


# the values of registry.Kind, as a description holds them
ModelKind = Literal["offline", "pretrained", "hf-hub", "local"]


@dataclass
class ModelDescription:
    """What `describe_model` tells about a model; each kind adds its own fields."""

    name: str
    kind: ModelKind

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class OfflineDescription(ModelDescription):
    arch: str
    dim: int
    image_size: int
    preprocessing: str
    logit_scale: float
    weights: list[str]
    size_mb: float
    cached: bool
    cache_path: str


@dataclass
class PreprocessingDescription:
    interpolation: Interpolation
    resize_mode: ResizeMode
    mean: list[float]
    std: list[float]


@dataclass
class PretrainedDescription(ModelDescription):
    arch: str
    pretrained: str
    dim: int | None
    image_size: int | None
    context_length: int | None
    preprocessing: PreprocessingDescription
    params_m: float
    size_mb: float | None
    source: str
    cached: bool
    cache_path: str


@dataclass
class UnloadedDescription(ModelDescription):
    """A hub or local model: its details are known once it is loaded."""

    target: str
    note: str = (
        "load the model to see its details (cliplens models info shows "
        "open_clip architectures and tags)"
    )


def describe_model(name: str) -> ModelDescription:
    """Dim, preprocessing, size and cache path of a model, from configs only.

    Why: to choose a model (or check what is cached) without downloading or loading it.

    >>> import cliplens
    >>> details = cliplens.describe_model("ViT-B-32:openai")
    >>> details.to_dict()["dim"]
    """
    spec = parse_model_name(name)
    if spec.kind is Kind.OFFLINE:
        return _describe_offline()
    if spec.kind is not Kind.PRETRAINED:
        return UnloadedDescription(name=spec.name, kind=spec.kind.value, target=spec.target)
    return _describe_pretrained(spec)


def _describe_offline() -> OfflineDescription:
    from cliplens.models import offline  # torch: see known_models

    weights = [offline.mobilenet_weights(), offline.minilm_dir() / "model.safetensors"]
    return OfflineDescription(
        name=OFFLINE,
        kind=Kind.OFFLINE.value,
        arch="ConSE: MobileNetV2 (ImageNet-1k) + all-MiniLM-L6-v2",
        dim=384,
        image_size=224,
        preprocessing="resize 256 bilinear, centre crop 224, ImageNet mean/std",
        logit_scale=offline.LOGIT_SCALE,
        weights=[str(p) for p in weights],
        size_mb=round(sum(p.stat().st_size for p in weights if p.exists()) / 1e6, 1),
        cached=_offline_installed(),
        cache_path=str(get_settings().home / "offline"),
    )


def _describe_pretrained(spec: ModelSpec) -> PretrainedDescription:
    import open_clip  # torch: see known_models
    import torch

    from cliplens.models.openclip import cached_weights  # torch and open_clip, as above

    cfg = open_clip.get_model_config(spec.arch) or {}
    vision = cfg.get("vision_cfg", {})
    tag_cfg = open_clip.get_pretrained_cfg(spec.arch, spec.target) or {}
    with torch.device("meta"):  # counts parameters without allocating them
        model = open_clip.create_model(spec.arch, device="meta", pretrained_text=False)
        n_params = sum(p.numel() for p in model.parameters())
    weights = cached_weights(spec.arch, spec.target) if tag_cfg else Path(spec.target)
    there = bool(weights and weights.exists())
    preprocessing = PreprocessingDescription(
        interpolation=tag_cfg.get("interpolation", "bicubic"),
        resize_mode=tag_cfg.get("resize_mode", "shortest"),
        mean=list(tag_cfg.get("mean", open_clip.OPENAI_DATASET_MEAN)),
        std=list(tag_cfg.get("std", open_clip.OPENAI_DATASET_STD)),
    )
    return PretrainedDescription(
        name=spec.name,
        kind=spec.kind.value,
        arch=spec.arch,
        pretrained=spec.target,
        dim=cfg.get("embed_dim"),
        image_size=vision.get("image_size"),
        context_length=cfg.get("text_cfg", {}).get("context_length"),
        preprocessing=preprocessing,
        params_m=round(n_params / 1e6, 1),
        size_mb=round(weights.stat().st_size / 1e6, 1) if there else None,
        source=tag_cfg.get("hf_hub") or tag_cfg.get("url") or str(weights),
        cached=there,
        cache_path=str(weights) if there else str(get_settings().model_cache),
    )


def describe_engines(name: str) -> dict[str, str]:
    """What runs `name`'s image tower on this CPU: each engine and precision measured
    here (models.openvino), and which one `engine` auto picks. Torch-free.

    >>> import cliplens
    >>> cliplens.describe_engines("offline")  # doctest: +SKIP
    """
    from cliplens.device import gpu_visible
    from cliplens.models import openvino
    from cliplens.models.ref import recorded_info

    if not openvino.available():
        return {"engine (auto)": f"torch (for OpenVINO: {openvino.INSTALL})"}
    info = recorded_info(parse_model_name(name).name)
    measured = openvino.read_measured(info.model_id) if info else None
    if measured is None:
        return {"engine (auto)": "measured on this CPU the first time images are encoded"}
    out = {"torch": f"{measured.torch_precision}, {measured.torch_images_per_s:.1f} images/s"}
    if measured.reason:
        out["openvino"] = f"not used: {measured.reason}"
    for precision, v in measured.variants.items():
        verdict = "kept" if v.kept else f"refused ({v.reason})"
        out[f"openvino {precision}"] = f"{verdict}: {v.figures()}"
    text = measured.text or {}
    if "none" in text:
        out["openvino text"] = f"not used: {text['none']}"
    elif text:
        from cliplens.models.openvino_text import TextVariant

        figures = TextVariant.from_record(text).figures()
        out["openvino text"] = f"{figures} (used for 64 texts or more)"
    best = measured.best(None)
    if best is not None and best.images_per_s > measured.torch_images_per_s and not gpu_visible():
        out["engine (auto)"] = f"openvino {best.precision}"
    else:
        out["engine (auto)"] = f"torch {measured.torch_precision}"
    return out
