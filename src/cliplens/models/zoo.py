"""What models exist and what each one is, without loading its weights."""

from __future__ import annotations

import csv
import functools
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Literal

from cliplens.errors import DependencyMissingError, InvalidInputError
from cliplens.models.registry import OFFLINE, Kind, ModelSpec, parse_model_name
from cliplens.preprocess import Interpolation, ResizeMode
from cliplens.settings import get_settings

# open_clip's published figures, shipped as data (models/data/*.tsv name their source)
RESULTS_FILE = "openclip_results.tsv"
PROFILE_FILE = "openclip_profile.tsv"
# the authors' own figures for tags open_clip's table predates, each row naming its source
AUTHORS_FILE = "published_results.tsv"
FIGURES_SOURCE = (
    "open_clip's docs/openclip_results.csv and docs/model_profile.csv "
    "(github.com/mlfoundations/open_clip at f862f86, MIT licence)"
)
FIGURES_NOTE = (
    "Tags that table predates (MobileCLIP2, PE-Core, SigLIP2) take their authors' own "
    "published figures (models/data/published_results.tsv; --format json names each "
    "row's source). ImageNet %: zero-shot top-1 on ImageNet-1k; avg %: the mean over the "
    "38 zero-shot datasets; params: both towers; '-': no figure published. "
    "open_clip records no licence or download size per tag: see each tag's model card "
    "(cliplens models info NAME shows where its weights come from)."
)

ModelSort = Literal["imagenet", "params", "name"]


@dataclass
class ModelEntry:
    """One row of `known_models`: enough to choose a model by, without loading one."""

    name: str
    cached: bool
    default: bool = False
    resolution: int | None = None
    params_m: float | None = None
    gflops: float | None = None
    imagenet_pct: float | None = None
    average_pct: float | None = None
    source: str | None = None  # where the figures come from, when there are any

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class PublishedFigures:
    """What open_clip, or else the model's authors, publish about one arch:tag (None
    where nobody publishes anything), and where those figures come from."""

    image_size: int | None = None
    params_m: float | None = None
    gflops: float | None = None
    imagenet_pct: float | None = None
    average_pct: float | None = None
    source: str | None = None


@functools.cache
def _read_table(filename: str) -> tuple[dict[str, str], ...]:
    """A shipped table's rows; read through importlib.resources, so that an installed
    wheel (or a zip) finds it as a source checkout does."""
    text = resources.files("cliplens.models").joinpath("data").joinpath(filename)
    lines = [ln for ln in text.read_text("utf-8").splitlines() if ln and ln[0] != "#"]
    return tuple(csv.DictReader(lines, delimiter="\t"))


@functools.cache
def _scores() -> dict[tuple[str, str], tuple[float, float]]:
    return {
        (r["name"], r["pretrained"]): (float(r["imagenet1k"]), float(r["average38"]))
        for r in _read_table(RESULTS_FILE)
    }


@functools.cache
def _authors_scores() -> dict[tuple[str, str], tuple[float, float | None, str]]:
    """The authors' rows: ImageNet and average (None where unpublished) and the source."""
    return {
        (r["name"], r["pretrained"]): (
            float(r["imagenet1k"]),
            float(r["average"]) if r["average"] else None,
            r["source"],
        )
        for r in _read_table(AUTHORS_FILE)
    }


def _describe_source(ref: str) -> str:
    """A row's repo@commit:path as a reader wants it."""
    repo, _, rest = ref.partition("@")
    commit, _, path = rest.partition(":")
    return f"the authors' {path} (github.com/{repo} at {commit[:7]})"


@functools.cache
def _profiles() -> dict[str, tuple[int, float, float]]:
    return {
        r["model"]: (int(r["image_size"]), float(r["mparams"]), float(r["gflops"]))
        for r in _read_table(PROFILE_FILE)
    }


def _twin(arch: str) -> str:
    """The same architecture with the other activation: open_clip publishes some weights
    under both ViT-L-14:dfn2b and ViT-L-14-quickgelu:dfn2b, and measured only one."""
    return arch.removesuffix("-quickgelu") if arch.endswith("-quickgelu") else f"{arch}-quickgelu"


def _weights_source(arch: str, tag: str) -> str | None:
    import open_clip  # torch: see known_models

    cfg = open_clip.get_pretrained_cfg(arch, tag) or {}
    return cfg.get("hf_hub") or cfg.get("url") or None


def published_figures(arch: str, tag: str) -> PublishedFigures:
    """open_clip's published size, compute and zero-shot accuracy of arch:tag, from the
    tables shipped with cliplens; a twin's row counts only when it has the same weights.
    A tag open_clip's table lacks takes its authors' figures (published_results.tsv),
    and `source` names whichever tables the figures come from.

    Why: to compare models by what was measured, without downloading or building any.
    A tag the tables lack gets None, never 0.

    >>> from cliplens.models.zoo import published_figures
    >>> published_figures("ViT-B-32", "openai").imagenet_pct
    """
    twin = _twin(arch)
    scores: tuple[float, float | None] | None = _scores().get((arch, tag))
    if scores is None and (twin, tag) in _scores():
        mine = _weights_source(arch, tag)
        if mine is not None and mine == _weights_source(twin, tag):
            scores = _scores()[(twin, tag)]
    sources = [FIGURES_SOURCE] if scores is not None else []
    authors = _authors_scores().get((arch, tag)) if scores is None else None
    if authors is not None:
        scores = authors[:2]
        sources.append(_describe_source(authors[2]))
    profile = _profiles().get(arch) or _profiles().get(twin)
    if profile is not None and FIGURES_SOURCE not in sources:
        sources.append(FIGURES_SOURCE)
    size, params, gflops = profile or (None, None, None)
    imagenet, average = scores or (None, None)
    return PublishedFigures(
        image_size=size,
        params_m=params,
        gflops=gflops,
        imagenet_pct=None if imagenet is None else round(imagenet * 100, 2),
        average_pct=None if average is None else round(average * 100, 2),
        source="; ".join(sources) or None,
    )


def _side(size: Any) -> int | None:
    """A config's image size as one number: the longer side where it gives two."""
    if isinstance(size, int):
        return size
    if isinstance(size, list | tuple) and size:
        return int(max(size))
    return None


def _offline_installed() -> bool:
    from cliplens.models import offline  # torch: only once models are listed

    try:
        return offline.mobilenet_weights().is_file() and offline.minilm_dir().is_dir()
    except DependencyMissingError:
        return False


def known_models(
    search: str | None = None, *, cached_only: bool = False, sort: ModelSort | None = None
) -> list[ModelEntry]:
    """The offline model and every arch:tag open_clip publishes, marking what is cached,
    with each one's input size, parameters and published zero-shot figures.

    Why: the names `load_model` takes, which of them work without a download, and what
    to choose by. `search` keeps names holding it (any case); `sort` puts the best
    ImageNet figure, the fewest parameters or the names first (unknown figures last);
    without it the order is open_clip's. No model is built.

    >>> import cliplens
    >>> ready = [m.name for m in cliplens.known_models() if m.cached]
    >>> "offline" in ready
    """
    import open_clip  # torch: only when models are listed, not on importing this module

    from cliplens.models.openclip import cached_weights  # torch and open_clip, as above

    if sort is not None and sort not in ("imagenet", "params", "name"):
        raise InvalidInputError(f"`sort` {sort!r} is not one of imagenet, params or name")
    default = get_settings().default_model
    entries = [ModelEntry(OFFLINE, _offline_installed(), default == OFFLINE, resolution=224)]
    for arch, tag in open_clip.list_pretrained():
        name = f"{arch}:{tag}"
        vision = (open_clip.get_model_config(arch) or {}).get("vision_cfg", {})
        figures = published_figures(arch, tag)
        entries.append(
            ModelEntry(
                name,
                cached=cached_weights(arch, tag) is not None,
                default=name == default,
                resolution=_side(vision.get("image_size")) or figures.image_size,
                params_m=figures.params_m,
                gflops=figures.gflops,
                imagenet_pct=figures.imagenet_pct,
                average_pct=figures.average_pct,
                source=figures.source,
            )
        )
    return _select(entries, search, cached_only, sort)


def _select(
    entries: list[ModelEntry], search: str | None, cached_only: bool, sort: ModelSort | None
) -> list[ModelEntry]:
    needle = (search or "").casefold()
    kept = [e for e in entries if needle in e.name.casefold() and (e.cached or not cached_only)]
    if sort == "imagenet":
        kept.sort(key=lambda e: (e.imagenet_pct is None, -(e.imagenet_pct or 0.0)))
    elif sort == "params":
        kept.sort(key=lambda e: (e.params_m is None, e.params_m or 0.0))
    elif sort == "name":
        kept.sort(key=lambda e: e.name.casefold())
    return kept


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
    gflops: float | None
    imagenet_pct: float | None  # published figures, as known_models lists them
    average_pct: float | None
    figures_source: str | None
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
    figures = published_figures(spec.arch, spec.target) if tag_cfg else PublishedFigures()
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
        gflops=figures.gflops,
        imagenet_pct=figures.imagenet_pct,
        average_pct=figures.average_pct,
        figures_source=figures.source,
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
