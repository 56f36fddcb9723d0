"""What models exist and what each one is, without loading its weights."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

from cliplens.models.registry import OFFLINE, Kind, parse_model_name
from cliplens.settings import get_settings


@dataclass
class ModelEntry:
    name: str
    cached: bool
    default: bool = False

    def to_dict(self) -> dict:
        return asdict(self)


def _offline_installed() -> bool:
    from cliplens.errors import DependencyMissingError
    from cliplens.models import offline

    try:
        return offline.mobilenet_weights().is_file() and offline.minilm_dir().is_dir()
    except DependencyMissingError:
        return False


def known_models() -> list[ModelEntry]:
    """The offline model and every arch:tag open_clip publishes, marking what is cached."""
    import open_clip

    from cliplens.models.openclip import cached_weights

    default = get_settings().default_model
    entries = [ModelEntry(OFFLINE, cached=_offline_installed(), default=default == OFFLINE)]
    for arch, tag in open_clip.list_pretrained():
        name = f"{arch}:{tag}"
        entries.append(ModelEntry(name, cached_weights(arch, tag) is not None, name == default))
    return entries


def describe(name: str) -> dict:
    """Dim, preprocessing, size and cache path of a model, from configs only."""
    spec = parse_model_name(name)
    cache = get_settings().model_cache
    if spec.kind is Kind.OFFLINE:
        from cliplens.models import offline

        weights = [offline.mobilenet_weights(), offline.minilm_dir() / "model.safetensors"]
        return {
            "name": OFFLINE,
            "kind": spec.kind.value,
            "arch": "ConSE: MobileNetV2 (ImageNet-1k) + all-MiniLM-L6-v2",
            "dim": 384,
            "image_size": 224,
            "preprocessing": "resize 256 bilinear, centre crop 224, ImageNet mean/std",
            "logit_scale": offline.LOGIT_SCALE,
            "weights": [str(p) for p in weights],
            "size_mb": round(sum(p.stat().st_size for p in weights if p.exists()) / 1e6, 1),
            "cached": _offline_installed(),
            "cache_path": str(get_settings().home / "offline"),
        }
    if spec.kind is not Kind.PRETRAINED:
        return {
            "name": spec.name,
            "kind": spec.kind.value,
            "target": spec.target,
            "note": "load the model to see its details (cliplens models info shows "
            "open_clip architectures and tags)",
        }
    import open_clip
    import torch

    from cliplens.models.openclip import cached_weights

    cfg = open_clip.get_model_config(spec.arch) or {}
    vision = cfg.get("vision_cfg", {})
    tag_cfg = open_clip.get_pretrained_cfg(spec.arch, spec.target) or {}
    with torch.device("meta"):  # counts parameters without allocating them
        model = open_clip.create_model(spec.arch, device="meta", pretrained_text=False)
        n_params = sum(p.numel() for p in model.parameters())
    weights = cached_weights(spec.arch, spec.target) if tag_cfg else Path(spec.target)
    return {
        "name": spec.name,
        "kind": spec.kind.value,
        "arch": spec.arch,
        "pretrained": spec.target,
        "dim": cfg.get("embed_dim"),
        "image_size": vision.get("image_size"),
        "context_length": cfg.get("text_cfg", {}).get("context_length"),
        "preprocessing": {
            "interpolation": tag_cfg.get("interpolation", "bicubic"),
            "resize_mode": tag_cfg.get("resize_mode", "shortest"),
            "mean": list(tag_cfg.get("mean", open_clip.OPENAI_DATASET_MEAN)),
            "std": list(tag_cfg.get("std", open_clip.OPENAI_DATASET_STD)),
        },
        "params_m": round(n_params / 1e6, 1),
        "size_mb": round(weights.stat().st_size / 1e6, 1) if weights and weights.exists() else None,
        "source": tag_cfg.get("hf_hub") or tag_cfg.get("url") or str(weights),
        "cached": bool(weights and weights.exists()),
        "cache_path": str(weights) if weights and weights.exists() else str(cache),
    }
