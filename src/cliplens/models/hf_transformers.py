"""PyTorch backend through transformers: CLIP, SigLIP and SigLIP 2 checkpoints as the
hub and `save_pretrained` lay them out (`transformers:ORG/NAME`, `transformers:FOLDER`).

Why a second backend: many CLIP-family models are published only in transformers'
format (config.json + model.safetensors + a processor), not open_clip's. Any model whose
`get_image_features` and `get_text_features` give the two towers' embeddings loads here.

What cliplens takes from the checkpoint, so that its vectors are transformers' own:

- pixels: the image processor's size, crop, resampling filter, mean and std become a
  `Preprocessing` (a centre crop after resizing the short side where the processor's
  size is a shortest_edge, as CLIPImageProcessor does; a squash to height x width where
  it is a height and width, as CLIPImageProcessor and SiglipImageProcessor do).
  cliplens resizes with Pillow, transformers' default processors with torchvision, so
  photos that must be resized differ by resampling rounding (vectors within about
  1e-4); photos already at the model's size give the processor's input.
- texts: the processor's tokenizer, padded the way the model was trained. SigLIP's text
  tower pools the last position, so it is padded to its full context (64 tokens,
  `padding="max_length"`, which Siglip2Processor does by default and SigLIP's model card
  asks for); CLIP's pools its end-of-text token, so padding to the longest text in a
  batch gives the same vectors for less work.
- scores: `logit_scale` and, for SigLIP, `logit_bias`, read from the checkpoint's own
  tensors (not the model cast to bf16 or fp16), so `classify` with `multi_label` gives
  sigmoid probabilities (tasks/classify.py).

Identity: the model_id is a digest of the weights and of the files that shape the
vectors beside them (`SHAPING_FILES`: the model's config, the processor's and the
tokenizer's), by content, so a moved folder keeps its id and an edited one gets another.

SigLIP 2's NaFlex models (Siglip2Model) take patches, not images: pixel_values
(B, N, 3*P*P), pixel_attention_mask and spatial_shapes. Siglip2ImageProcessor resizes
each photo keeping its aspect ratio to the largest grid of P-pixel patches that fits
`max_num_patches`. cliplens feeds every backend fixed square crops (one preprocessing
for catalogs, decoding processes and OpenVINO), so here a photo is squashed to the
largest square grid that fits (256 patches of 16 pixels: 256x256) and cut into patches
exactly as the processor lays them out. A square photo gives the processor's input (the
same pixels at 256x256, resampling rounding at other sizes); a photo of another shape is
squashed where the processor would keep its shape, a deliberate difference.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import threading
from collections.abc import Iterable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from cliplens.device import Precision
from cliplens.errors import InvalidInputError, ModelError, ModelUnavailableError, one_line
from cliplens.models.hub import check_reachable
from cliplens.models.info import ModelInfo
from cliplens.models.onnx_text import TextGraph, padded_tokenizer
from cliplens.models.torch_encoder import TorchEncoder
from cliplens.models.weights import combined_digest
from cliplens.preprocess import Interpolation, Preprocessing
from cliplens.settings import get_settings

WEIGHT_SUFFIXES = (".safetensors", ".bin")
# what a hub snapshot needs: configs, tokenizer files, weights (not TF or Flax copies)
HUB_FILES = ["*.json", "*.txt", "*.model", "*.safetensors"]
# text towers that pool the last position: padded to the full context, as trained
LAST_TOKEN_POOLING = ("siglip", "siglip2")
# PIL's resampling filters by number (what image processors save) -> cliplens's names;
# box and hamming, which cliplens does not offer, read as bilinear
_RESAMPLE: dict[int, Interpolation] = {
    0: "nearest",
    1: "lanczos",
    2: "bilinear",
    3: "bicubic",
    4: "bilinear",
    5: "bilinear",
}
_TEXT_INPUTS = ("input_ids", "attention_mask", "position_ids")
# beside the weights, the files that decide what a vector is (the architecture's settings,
# the pixels, the tokens); sentencepiece models (*.model) count too (`shaping_files`)
SHAPING_FILES = (
    "config.json",
    "preprocessor_config.json",
    "processor_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
)
# the scores' parameters, read in fp32 from the checkpoint (`_checkpoint_scalars`)
_SCORE_PARAMS = ("logit_scale", "logit_bias")


def _features(out: Any) -> torch.Tensor:
    """The embeddings from `get_*_features`: a tensor in transformers 4, an output whose
    pooler_output holds them in transformers 5."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


class _ImageTower(torch.nn.Module):
    """Normalised (B, 3, H, W) pixels -> unnormalised embeddings: `get_image_features`
    as one module, with only the vision weights in it (for OpenVINO and fine-tuning)."""

    def __init__(self, model: Any) -> None:
        super().__init__()
        self.vision_model = model.vision_model
        # CLIP projects the pooled state; SigLIP's head is inside its vision model
        projection = getattr(model, "visual_projection", None)
        self.projection = torch.nn.Identity() if projection is None else projection

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.projection(self.vision_model(pixel_values=pixels).pooler_output)


class _PatchTower(torch.nn.Module):
    """SigLIP 2 NaFlex from a square crop: the crop cut into patches as
    Siglip2ImageProcessor lays them out (row by row; each patch's rows, then columns,
    then channels), padded to `max_patches` with a mask, as the processor pads."""

    def __init__(self, model: Any, patch: int, max_patches: int) -> None:
        super().__init__()
        self.vision_model = model.vision_model
        self.patch, self.max_patches = patch, max_patches

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        b, c, h, w = pixels.shape
        p = self.patch
        rows, cols = h // p, w // p
        x = pixels.reshape(b, c, rows, p, cols, p).permute(0, 2, 4, 3, 5, 1)
        x = x.reshape(b, rows * cols, p * p * c)
        mask = torch.ones(b, self.max_patches, dtype=torch.int32, device=pixels.device)
        pad = self.max_patches - rows * cols
        if pad > 0:
            x = torch.nn.functional.pad(x, (0, 0, 0, pad))
            mask[:, rows * cols :] = 0
        shapes = torch.tensor([[rows, cols]], device=pixels.device).expand(b, 2)
        out = self.vision_model(pixel_values=x, pixel_attention_mask=mask, spatial_shapes=shapes)
        return out.pooler_output


class _TextTower(torch.nn.Module):
    """(ids, mask) -> unnormalised embeddings: `get_text_features` for the ONNX export."""

    def __init__(self, model: Any) -> None:
        super().__init__()
        self.model = model

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return _features(self.model.get_text_features(input_ids=ids, attention_mask=mask))


class TransformersEncoder(TorchEncoder):
    """A transformers CLIP-family model as an Encoder (see the module docstring)."""

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        info: ModelInfo,
        tower: torch.nn.Module | None,
        text_kwargs: dict[str, Any],
    ) -> None:
        self.model, self.tokenizer, self.info = model, tokenizer, info
        self._tower = tower  # None: get_image_features on the pixels as they are
        self._text_kwargs = text_kwargs
        # a fast tokenizer keeps its padding and truncation settings in shared state, set
        # anew by a call with other settings: one call at a time (copies share the lock)
        self._tokenizer_lock = threading.Lock()
        self._device = torch.device(info.device)
        self._dtype = info.precision.dtype

    def _encode_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        pixels = pixels.to(self._device, self._dtype)
        if self._tower is not None:
            return self._tower(pixels)
        return _features(self.model.get_image_features(pixel_values=pixels))

    def _tokens(self, texts: list[str]) -> dict[str, torch.Tensor]:
        with self._tokenizer_lock:
            batch = self.tokenizer(list(texts), return_tensors="pt", **self._text_kwargs)
        return {k: batch[k].to(self._device) for k in _TEXT_INPUTS if k in batch}

    def _ids(self, texts: list[str]) -> list[list[int]]:
        """The token ids the tower sees, unpadded and cut at the context."""
        length = self._text_kwargs["max_length"]
        with self._tokenizer_lock:
            return self.tokenizer(list(texts), truncation=True, max_length=length)["input_ids"]

    def _encode_text_batch(self, texts: list[str]) -> torch.Tensor:
        return _features(self.model.get_text_features(**self._tokens(texts)))

    def token_counts(self, texts: list[str]) -> list[int] | None:
        return [len(row) for row in self._ids(texts)]

    def image_tower(self) -> torch.nn.Module:
        if self._tower is None:
            raise InvalidInputError(f"model {self.info.name}: no image tower that can be trained")
        return self._tower

    def with_image_tower(self, tower: torch.nn.Module, model_id: str) -> TransformersEncoder:
        if self._tower is None:
            raise InvalidInputError(f"model {self.info.name}: its image tower cannot be replaced")
        out = copy.copy(self)
        out._tower = tower.to(self._device, self._dtype).eval()
        out.info = replace(self.info, model_id=model_id)
        return out

    def text_graph(self) -> TextGraph | None:
        """CLIP with a fast tokenizer: its `tokenizers` pipeline (which lowercases and
        normalises itself) and the tower over any number of tokens. SigLIP's towers and
        sentencepiece tokenizers keep the PyTorch path."""
        backend = getattr(self.tokenizer, "backend_tokenizer", None)
        model_type = getattr(self.model.config, "model_type", "")
        if model_type != "clip" or backend is None or self._dtype != torch.float32:
            return None
        if self._text_kwargs.get("padding") == "max_length":
            return None
        return TextGraph(
            module=_TextTower(self.model).eval(),
            tokenizer=padded_tokenizer(self.tokenizer, self._text_kwargs["max_length"]),
            cleaner="none",
            with_mask=True,
            any_length=True,
            token_ids=self._ids,
        )


# ---------------------------------------------------------------- the checkpoint's files


def _weights(folder: Path) -> tuple[Path, ...]:
    return tuple(p for p in sorted(folder.iterdir()) if p.suffix in WEIGHT_SUFFIXES)


def _complete(folder: Path) -> bool:
    return (folder / "config.json").is_file() and bool(_weights(folder))


def shaping_files(
    folder: Path, names: Iterable[str] = SHAPING_FILES, patterns: Iterable[str] = ("*.model",)
) -> tuple[Path, ...]:
    """The files in `folder` named in `names` or matching `patterns` (by default its
    sentencepiece models), those that exist, each once."""
    found = [folder / n for n in names if (folder / n).is_file()]
    found += [p for pattern in patterns for p in sorted(folder.glob(pattern)) if p.is_file()]
    return tuple(dict.fromkeys(found))


def _checkpoint_scalars(weights: Iterable[Path], names: Iterable[str]) -> dict[str, float]:
    """The one-number parameters `names` as the weight files hold them, in fp32 (a model
    loaded in bf16 holds them rounded: a logit_scale of 117.33 as 115.5)."""
    from safetensors import safe_open

    wanted = tuple(names)
    out: dict[str, float] = {}
    for path in weights:
        try:
            if path.suffix == ".safetensors":
                with safe_open(str(path), framework="pt") as f:
                    keys = set(f.keys())
                    out |= {n: float(f.get_tensor(n).float().item()) for n in wanted if n in keys}
            else:
                state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
                out |= {n: float(state[n].float().item()) for n in wanted if n in state}
        except Exception:  # unreadable here: the loaded model's values stand in
            continue
    return out


def _snapshot(name: str, repo: str) -> Path:
    """The hub repo's files in the model cache: what is there already, else downloaded
    (safetensors only where the repo has them; the bin files otherwise)."""
    from huggingface_hub import snapshot_download

    cache = get_settings().model_cache
    try:
        folder = Path(snapshot_download(repo, cache_dir=str(cache), local_files_only=True))
        if _complete(folder):
            return folder
    except Exception:  # not cached (or cached by another tool without these files)
        pass
    check_reachable(name, cache)
    cache.mkdir(parents=True, exist_ok=True)
    try:
        folder = Path(snapshot_download(repo, cache_dir=str(cache), allow_patterns=HUB_FILES))
        if not _weights(folder):
            patterns = [*HUB_FILES, "*.bin"]
            folder = Path(snapshot_download(repo, cache_dir=str(cache), allow_patterns=patterns))
    except Exception as e:  # network, hub, auth, no such repo: all mean "could not fetch"
        raise ModelUnavailableError(name, cache, _short_reason(e)) from e
    return folder


def _short_reason(e: BaseException) -> str:
    text = one_line(e)
    return text if len(text) <= 200 else text[:197] + "..."


def _folder(name: str, target: str) -> Path:
    """A folder that exists, else a hub repo (ORG/NAME) fetched into the cache."""
    path = Path(target).expanduser()
    if path.exists():
        if not path.is_dir():
            raise InvalidInputError(
                f"model '{name}': {path} is a file; give the folder save_pretrained wrote"
            )
        return path
    if target.count("/") != 1 or target.startswith((".", "/", "~")):
        raise InvalidInputError(
            f"model '{name}': {target} is neither a folder nor a hub repo; write "
            f"transformers:ORG/NAME or transformers:FOLDER"
        )
    return _snapshot(name, target)


def _config(name: str, folder: Path) -> dict[str, Any]:
    path = folder / "config.json"
    if not path.is_file():
        hint = (
            "; it is in open_clip's layout: load it as local:PATH"
            if (folder / "open_clip_config.json").is_file()
            else ""
        )
        raise InvalidInputError(
            f"model '{name}': {folder} is not a transformers save (no config.json); save the "
            f"model and its processor there with save_pretrained{hint}"
        )
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise InvalidInputError(f"model '{name}': {path} is not readable JSON ({e})") from e
    if not isinstance(config, dict) or not config.get("model_type"):
        raise InvalidInputError(
            f"model '{name}': {path} names no model_type; save the model with save_pretrained"
        )
    if not _weights(folder):
        raise InvalidInputError(
            f"model '{name}': {folder} holds no weights (*.safetensors or *.bin); save the "
            f"model there with save_pretrained"
        )
    return config


# ---------------------------------------------------------------- building


@contextlib.contextmanager
def no_progress_bars() -> Iterator[None]:
    """transformers draws a bar per weight file it loads; cliplens reports its own
    progress, and a one-shot command's output should not carry them."""
    from transformers.utils import logging

    was = logging.is_progress_bar_enabled()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            logging.enable_progress_bar()


def _build(name: str, folder: Path, precision: Precision) -> tuple[Any, Any, Any]:
    """The model, its processor (or None) and its image processor and tokenizer."""
    import transformers

    try:
        with no_progress_bars():
            model, loading = transformers.AutoModel.from_pretrained(
                str(folder), dtype=precision.dtype, output_loading_info=True
            )
    except Exception as e:  # unknown model type, weights that do not fit...
        raise ModelError(
            f"model '{name}': transformers could not build it ({_short_reason(e)})"
        ) from e
    # transformers leaves out of this what a model may lack (its buffers, tied weights)
    missing = sorted(loading.get("missing_keys") or ())
    if missing:
        shown = ", ".join(missing[:3]) + (", ..." if len(missing) > 3 else "")
        raise InvalidInputError(
            f"model '{name}': {folder} lacks {len(missing)} of the model's weights ({shown}), "
            f"which would be random; save the whole model there with save_pretrained"
        )
    if not all(
        callable(getattr(model, f, None)) for f in ("get_image_features", "get_text_features")
    ):
        raise InvalidInputError(
            f"model '{name}': {type(model).__name__} has no get_image_features and "
            f"get_text_features; give a CLIP, SigLIP or SigLIP 2 model"
        )
    try:
        processor = transformers.AutoProcessor.from_pretrained(str(folder))
    except Exception:  # no processor saved: the image processor and tokenizer on their own
        processor = None
    try:
        image = getattr(processor, "image_processor", None)
        image = image or transformers.AutoImageProcessor.from_pretrained(str(folder))
        tokenizer = getattr(processor, "tokenizer", None)
        tokenizer = tokenizer or transformers.AutoTokenizer.from_pretrained(str(folder))
    except Exception as e:
        raise InvalidInputError(
            f"model '{name}': {folder} has no usable image processor and tokenizer "
            f"({_short_reason(e)}); save the processor there with save_pretrained"
        ) from e
    return model, processor, (image, tokenizer)


def _image_config(image: Any, processor: Any) -> dict[str, Any]:
    """The image processor's settings as the processor calls it (a processor's own
    defaults, such as Siglip2Processor's max_num_patches, win)."""
    return {**image.to_dict(), **_processor_defaults(processor, "images_kwargs")}


def _processor_defaults(processor: Any, modality: str) -> dict[str, Any]:
    """What a processor passes its image processor or tokenizer unless told otherwise:
    class attributes (Siglip2Processor.text_kwargs) or its kwargs class's `_defaults`."""
    out: dict[str, Any] = {}
    class_defaults = getattr(getattr(processor, "valid_processor_kwargs", None), "_defaults", None)
    if isinstance(class_defaults, dict) and isinstance(class_defaults.get(modality), dict):
        out.update(class_defaults[modality])
    own = getattr(processor, modality, None)
    if isinstance(own, dict):
        out.update(own)
    return out


def _triple(value: Any, default: float) -> tuple[float, float, float]:
    if value is None:
        return (default,) * 3
    if isinstance(value, (int, float)):
        return (float(value),) * 3
    r, g, b = (float(v) for v in value)
    return (r, g, b)


def _side(name: str, size: Any, what: str) -> int:
    """One side of a square from an image processor's size dict (or int)."""
    if isinstance(size, int):
        return size
    size = dict(size or {})
    if "shortest_edge" in size:
        return int(size["shortest_edge"])
    h, w = size.get("height"), size.get("width")
    if h is None or h != w:
        raise InvalidInputError(
            f"model '{name}': its image processor's {what} {size} is not a square; "
            f"cliplens feeds square crops"
        )
    return int(h)


def preprocessing_of(name: str, cfg: dict[str, Any]) -> tuple[Preprocessing, int | None]:
    """The `Preprocessing` an image processor's settings mean, and the patch size where
    the model takes patches (SigLIP 2 NaFlex), else None."""
    rescale = float(cfg.get("rescale_factor", 1 / 255))
    if (
        not cfg.get("do_rescale", True)
        or not cfg.get("do_normalize", True)
        or abs(rescale * 255 - 1) > 1e-6
    ):
        raise InvalidInputError(
            f"model '{name}': its image processor does not scale pixels by 1/255 and "
            f"normalise them; cliplens reads images only that way"
        )
    resample = cfg.get("resample", 3)
    interpolation = _RESAMPLE.get(int(getattr(resample, "value", resample)), "bicubic")
    mean = _triple(cfg.get("image_mean"), 0.5)
    std = _triple(cfg.get("image_std"), 0.5)
    if cfg.get("max_num_patches"):
        patch = int(cfg["patch_size"])
        side = math.isqrt(int(cfg["max_num_patches"])) * patch
        return Preprocessing(side, side, mean, std, interpolation, "squash"), patch
    size = cfg.get("size")
    resize = _side(name, size, "size")
    squashed = isinstance(size, dict) and "shortest_edge" not in size  # height x width
    if cfg.get("do_center_crop"):
        crop = _side(name, cfg.get("crop_size") or resize, "crop_size")
        if not squashed:
            return Preprocessing(crop, resize, mean, std, interpolation, "shortest"), None
        if crop != resize:  # a squash, then a crop of part of it
            raise InvalidInputError(
                f"model '{name}': its image processor squashes images to {resize}x{resize} "
                f"and then crops {crop}x{crop}; cliplens squashes only to the crop itself, "
                f"so save the processor with crop_size equal to size"
            )
        return Preprocessing(resize, resize, mean, std, interpolation, "squash"), None
    if not squashed:  # a short side without a crop: read as a centre crop
        return Preprocessing(resize, resize, mean, std, interpolation, "shortest"), None
    return Preprocessing(resize, resize, mean, std, interpolation, "squash"), None


def _text_kwargs(model: Any, processor: Any) -> dict[str, Any]:
    """How texts are tokenized: the processor's defaults, padded as the model was trained
    (module docstring), cut at the tower's context."""
    text_cfg = getattr(model.config, "text_config", model.config)
    context = int(getattr(text_cfg, "max_position_embeddings", 77))
    kwargs = _processor_defaults(processor, "text_kwargs")
    if model.config.model_type in LAST_TOKEN_POOLING:
        kwargs["padding"] = "max_length"
    if kwargs.get("padding") in (None, False, "do_not_pad"):  # a batch must be one tensor
        kwargs["padding"] = "longest"
    kwargs["truncation"] = True
    kwargs["max_length"] = min(int(kwargs.get("max_length") or context), context)
    return kwargs


def _tower(model: Any, patch: int | None, cfg: dict[str, Any]) -> torch.nn.Module | None:
    if patch is not None:
        return _PatchTower(model, patch, int(cfg["max_num_patches"])).eval()
    if hasattr(model, "vision_model") and type(model).__name__ in ("CLIPModel", "SiglipModel"):
        return _ImageTower(model).eval()
    return None  # another family: get_image_features itself


def load_transformers(
    name: str, target: str, device: torch.device, precision: Precision
) -> TransformersEncoder:
    """`transformers:ORG/NAME` (fetched into the model cache) or `transformers:FOLDER`
    (written by save_pretrained: model and processor) as an Encoder."""
    folder = _folder(name, target)
    config = _config(name, folder)
    weights = _weights(folder)
    model, processor, (image, tokenizer) = _build(name, folder, precision)
    model = model.to(device=device, dtype=precision.dtype).eval()
    model.requires_grad_(False)
    cfg = _image_config(image, processor)
    preprocessing, patch = preprocessing_of(name, cfg)
    tower = _tower(model, patch, cfg)
    model_type = str(config["model_type"])
    present = [n for n in _SCORE_PARAMS if getattr(model, n, None) is not None]
    scores = {n: float(getattr(model, n).float().item()) for n in present}
    scores |= _checkpoint_scalars(weights, present)
    kwargs = _text_kwargs(model, processor)
    # what the identity is a digest of, and what ModelRef's records check
    files = (*weights, *shaping_files(folder))
    info = ModelInfo(
        name=name,
        model_id=f"transformers:{model_type}@{combined_digest(files)}",
        arch=f"transformers:{model_type}",
        dim=0,
        preprocessing=preprocessing,
        logit_scale=math.exp(scores["logit_scale"]) if "logit_scale" in scores else 100.0,
        logit_bias=scores.get("logit_bias"),
        context_length=kwargs["max_length"],
        weights=files,
        n_params=sum(p.numel() for p in model.parameters()),
        device=str(device),
        precision=precision,
    )
    encoder = TransformersEncoder(model, tokenizer, info, tower, kwargs)
    with torch.inference_mode():
        dim = int(encoder._encode_text_batch(["a photo"]).shape[-1])
    encoder.info = replace(info, dim=dim)
    return encoder
