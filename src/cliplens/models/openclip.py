"""PyTorch backend through open_clip: OpenAI CLIP, OpenCLIP, SigLIP, MobileCLIP and friends."""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import open_clip
import torch
from huggingface_hub import try_to_load_from_cache
from open_clip.tokenizer import SimpleTokenizer
from open_clip.transform import PreprocessCfg
from safetensors.torch import load_file, save_file
from tokenizers import Regex, Tokenizer, models, pre_tokenizers, processors

from cliplens.device import Precision
from cliplens.errors import InvalidInputError, ModelError, ModelUnavailableError
from cliplens.models.hub import check_reachable as _check_hub_reachable
from cliplens.models.hub import short_reason as _short_reason
from cliplens.models.info import ModelInfo
from cliplens.models.offline import build_towers_clip, is_towers_config
from cliplens.models.onnx_text import TextGraph
from cliplens.models.torch_encoder import TorchEncoder
from cliplens.models.weights import combined_digest
from cliplens.preprocess import Preprocessing
from cliplens.settings import get_settings

CHECKPOINT_SUFFIXES = (".safetensors", ".bin", ".pth", ".pt")
# open_clip's file names for weights on the hub, safetensors first
HUB_WEIGHT_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")


class OpenClipEncoder(TorchEncoder):
    def __init__(self, model: Any, tokenizer: Callable, info: ModelInfo) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.info = info
        self._device = torch.device(info.device)
        self._dtype = info.precision.dtype
        # open_clip.CLIP keyword arguments, where known: what save_checkpoint needs to
        # write a fine-tuned copy (None for hub models)
        self.model_cfg: dict | None = None

    def image_tower(self) -> torch.nn.Module:
        return self.model.visual

    def with_image_tower(self, tower: torch.nn.Module, model_id: str) -> OpenClipEncoder:
        model = copy.copy(self.model)
        model._modules = dict(self.model._modules)  # a shallow copy shares the dict
        model.visual = tower.to(self._device, self._dtype).eval()
        out = OpenClipEncoder(model, self.tokenizer, replace(self.info, model_id=model_id))
        out.model_cfg = self.model_cfg
        return out

    def _encode_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(pixels.to(self._device, self._dtype))

    def _encode_text_batch(self, texts: list[str]) -> torch.Tensor:
        tokens = self.tokenizer(texts).to(self._device)
        return self.model.encode_text(tokens)

    def token_counts(self, texts: list[str]) -> list[int] | None:
        tok = self.tokenizer
        if isinstance(tok, SimpleTokenizer):  # + start and end, as its __call__ counts
            return [min(len(tok.encode(t)) + 2, tok.context_length) for t in texts]
        inner = getattr(tok, "tokenizer", None)  # open_clip's HFTokenizer wraps transformers'
        if inner is None or not callable(inner):
            return None
        length = getattr(tok, "context_length", None)
        ids = inner(list(texts), truncation=length is not None, max_length=length)["input_ids"]
        return [len(row) for row in ids]

    def text_graph(self) -> TextGraph | None:

        tok = self.tokenizer
        if not isinstance(tok, SimpleTokenizer) or self._dtype != torch.float32:
            return None  # HF tokenizers (SigLIP and others) keep the PyTorch path
        trim = _trimmable(self.model)
        return TextGraph(
            module=_TextTower(self.model, trim).eval(),
            tokenizer=_clip_tokenizer(tok, tok.context_length, pad_to_context=not trim),
            cleaner="clip",
            with_mask=False,
            any_length=trim,
            token_ids=lambda texts: [
                [*[tok.sot_token_id, *tok.encode(t)][: tok.context_length - 1], tok.eot_token_id]
                for t in texts
            ],
        )

    @classmethod
    def from_model(
        cls,
        model: Any,
        tokenizer: Callable,
        *,
        name: str,
        arch: str,
        model_id: str,
        device: torch.device,
        precision: Precision,
        weights: tuple[Path, ...] = (),
    ) -> OpenClipEncoder:
        """Wrap an open_clip model (already built) as an Encoder on a device and precision."""
        # the scores' parameters before the cast: bf16 would round a scale of 117.33 to 115.5
        logit_scale = float(model.logit_scale.float().exp().item())
        bias = getattr(model, "logit_bias", None)
        logit_bias = float(bias.float().item()) if bias is not None else None
        model = model.to(device=device, dtype=precision.dtype).eval()
        model.requires_grad_(False)
        pp = dict(model.visual.preprocess_cfg)
        size = pp.get("size", 224)
        size = size if isinstance(size, int) else int(size[0])
        info = ModelInfo(
            name=name,
            model_id=model_id,
            arch=arch,
            dim=_embed_dim(model),
            preprocessing=Preprocessing(
                image_size=size,
                resize_size=size,
                mean=tuple(pp.get("mean", (0.48145466, 0.4578275, 0.40821073))),
                std=tuple(pp.get("std", (0.26862954, 0.26130258, 0.27577711))),
                interpolation=pp.get("interpolation", "bicubic"),
                resize_mode=pp.get("resize_mode", "shortest"),
            ),
            logit_scale=logit_scale,
            logit_bias=logit_bias,
            context_length=getattr(model, "context_length", None),
            weights=weights,
            n_params=sum(p.numel() for p in model.parameters()),
            device=str(device),
            precision=precision,
        )
        return cls(model, tokenizer, info)


class _TextTower(torch.nn.Module):
    """open_clip's encode_text; with `trim`, over only as many positions as the ids have.

    A CLIP text tower with a causal mask and pooling at the end-of-text token gives the
    same embedding whatever padding follows that token, so a 7-token query need not run
    77 positions (10x less work). open_clip always runs the full context.
    """

    def __init__(self, model: Any, trim: bool) -> None:
        super().__init__()
        self.model, self.trim = model, trim

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        m = self.model
        if not self.trim:
            return m.encode_text(ids)
        n = ids.shape[1]
        x = m.token_embedding(ids) + m.positional_embedding[:n]
        x = m.ln_final(m.transformer(x, attn_mask=m.attn_mask[:n, :n]))
        x = x[torch.arange(x.shape[0]), ids.argmax(dim=-1)]
        proj = m.text_projection
        return proj(x) if isinstance(proj, torch.nn.Linear) else x @ proj


def _trimmable(model: Any) -> bool:

    return (
        type(model) is open_clip.CLIP
        and getattr(model, "attn_mask", None) is not None
        and getattr(model, "text_pool_type", "") == "argmax"
    )


def _clip_tokenizer(tok: Any, context_length: int, pad_to_context: bool = True) -> Any:
    """open_clip's SimpleTokenizer (CLIP's byte-level BPE) as a `tokenizers` Tokenizer."""

    merges = [pair for pair, _ in sorted(tok.bpe_ranks.items(), key=lambda kv: kv[1])]
    out = Tokenizer(models.BPE(vocab=dict(tok.encoder), merges=merges, end_of_word_suffix="</w>"))
    out.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(tok.pat.pattern), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    sot, eot = tok.decoder[tok.sot_token_id], tok.decoder[tok.eot_token_id]
    out.post_processor = processors.TemplateProcessing(
        single=f"{sot} $A {eot}",
        special_tokens=[(sot, tok.sot_token_id), (eot, tok.eot_token_id)],
    )
    out.enable_truncation(max_length=context_length)
    out.enable_padding(length=context_length if pad_to_context else None, pad_id=0)
    return out


def _embed_dim(model: Any) -> int:
    with torch.inference_mode():
        proj = getattr(model, "text_projection", None)
        if isinstance(proj, torch.Tensor):
            return int(proj.shape[-1])
        tokens = torch.zeros(1, getattr(model, "context_length", 77) or 77, dtype=torch.long)
        return int(model.encode_text(tokens.to(next(model.parameters()).device)).shape[-1])


# ---------------------------------------------------------------- weights on the hub


def cached_weights(arch: str, tag: str) -> Path | None:
    """The weights file for arch:tag if it is already in the cache (no network)."""

    cfg = open_clip.get_pretrained_cfg(arch, tag)
    cache = str(get_settings().model_cache)
    if cfg.get("hf_hub"):
        # 'org/repo/' means the default file names; 'org/repo/file.bin' names one
        repo, filename = os.path.split(cfg["hf_hub"])
        for fn in (filename,) if filename else HUB_WEIGHT_FILES:
            hit = try_to_load_from_cache(repo, fn, cache_dir=cache)
            if isinstance(hit, str):
                return Path(hit)
    elif cfg.get("url"):
        path = Path(cache) / Path(cfg["url"]).name
        if path.is_file():
            return path
    return None


def fetch_weights(name: str, arch: str, tag: str) -> Path:

    hit = cached_weights(arch, tag)
    if hit is not None:
        return hit
    cache = get_settings().model_cache
    cfg = open_clip.get_pretrained_cfg(arch, tag)
    _check_hub_reachable(name, cache, None if cfg.get("hf_hub") else cfg.get("url"))
    cache.mkdir(parents=True, exist_ok=True)
    try:
        path = open_clip.download_pretrained(cfg, cache_dir=str(cache))
    except Exception as e:  # network, hub, auth: all mean "could not fetch"
        raise ModelUnavailableError(name, cache, _short_reason(e)) from e
    if not path:
        raise ModelUnavailableError(name, cache, "open_clip names no download for this tag")
    return Path(path)


# ---------------------------------------------------------------- loaders


def load_pretrained(
    name: str, arch: str, pretrained: str, device: torch.device, precision: Precision
) -> OpenClipEncoder:
    """`arch:tag` (downloaded and cached) or `arch:PATH` (a state-dict file for that arch)."""

    tag_cfg = open_clip.get_pretrained_cfg(arch, pretrained)
    kwargs: dict[str, Any] = {}
    if tag_cfg:
        weights = fetch_weights(name, arch, pretrained)
        kwargs["force_preprocess_cfg"] = {
            k: tag_cfg[k] for k in ("mean", "std", "interpolation", "resize_mode") if k in tag_cfg
        }
        if tag_cfg.get("quick_gelu"):
            kwargs["force_quick_gelu"] = True
        tag_id = pretrained
    else:
        weights = Path(pretrained).expanduser()
        if not weights.is_file():
            raise InvalidInputError(
                f"model '{name}': '{pretrained}' is neither a weights tag of {arch} nor a file; "
                f"see 'cliplens models' for tags"
            )
        tag_id = "file"
    model = _create(name, arch, pretrained=str(weights), **kwargs)
    tokenizer = open_clip.get_tokenizer(arch)
    model_id = f"{arch}:{tag_id}@{combined_digest([weights])}"
    encoder = OpenClipEncoder.from_model(
        model,
        tokenizer,
        name=name,
        arch=arch,
        model_id=model_id,
        device=device,
        precision=precision,
        weights=(weights,),
    )
    encoder.model_cfg = open_clip.get_model_config(arch)
    return encoder


def load_hub(name: str, repo: str, device: torch.device, precision: Precision) -> OpenClipEncoder:
    """`hf-hub:org/name`: an open_clip model published on the Hugging Face hub."""

    cache = get_settings().model_cache
    if try_to_load_from_cache(repo, "open_clip_config.json", cache_dir=str(cache)) is None:
        _check_hub_reachable(name, cache)
    cache.mkdir(parents=True, exist_ok=True)
    try:
        model = open_clip.create_model(f"hf-hub:{repo}", cache_dir=str(cache))
        tokenizer = open_clip.get_tokenizer(f"hf-hub:{repo}", cache_dir=str(cache))
    except Exception as e:
        raise ModelUnavailableError(name, cache, _short_reason(e)) from e
    weights = tuple(
        Path(hit)
        for fn in HUB_WEIGHT_FILES
        if isinstance(hit := try_to_load_from_cache(repo, fn, cache_dir=str(cache)), str)
    )[:1]
    digest = combined_digest(weights) if weights else "unknown"
    return OpenClipEncoder.from_model(
        model,
        tokenizer,
        name=name,
        arch=f"hf-hub:{repo}",
        model_id=f"hf-hub:{repo}@{digest}",
        device=device,
        precision=precision,
        weights=weights,
    )


LOCAL_FILE_FORMAT = "cliplens-checkpoint"


def load_local(
    name: str, path: Path, device: torch.device, precision: Precision
) -> OpenClipEncoder:
    """`local:PATH`: a checkpoint that records its own architecture.

    Either a folder in open_clip's layout (open_clip_config.json + weights; what
    open_clip's `local-dir:` and the hub use, and what `cliplens train` writes), or a
    single file saved by `save_checkpoint` ({"format", "model_cfg", "state_dict"}).
    """

    path = path.expanduser()
    if path.is_dir():
        config = path / "open_clip_config.json"
        if not config.is_file():
            raise InvalidInputError(
                f"model '{name}': folder {path} has no open_clip_config.json; save checkpoints "
                f"with cliplens.save_checkpoint or open_clip's hub layout"
            )
        weights = tuple(p for p in sorted(path.iterdir()) if p.suffix in CHECKPOINT_SUFFIXES)
        if not weights:
            raise InvalidInputError(f"model '{name}': folder {path} holds no weights file")
        saved = json.loads(config.read_text())
        arch = saved.get("cliplens", {}).get("arch", path.name)
        model_cfg = saved.get("model_cfg")

        if model_cfg and is_towers_config(model_cfg):  # the offline towers, fine-tuned
            model, tokenizer = build_towers_clip(model_cfg, pretrained=False)
            _load_state(name, model, weights[0])
        else:
            model = _create(name, f"local-dir:{path}")
            tokenizer = open_clip.get_tokenizer(f"local-dir:{path}")
    elif path.is_file():
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(ckpt, dict) or ckpt.get("format") != LOCAL_FILE_FORMAT:
            raise InvalidInputError(
                f"model '{name}': {path} does not record its architecture; load a bare "
                f"state dict as 'ARCH:{path}' (e.g. ViT-B-32:{path})"
            )
        arch = ckpt.get("arch", "custom")
        model_cfg = ckpt["model_cfg"]
        model, tokenizer = build_from_cfg(name, ckpt["model_cfg"], ckpt.get("preprocess_cfg"))
        model.load_state_dict(ckpt["state_dict"])
        weights = (path,)
    else:
        raise InvalidInputError(f"model '{name}': {path} does not exist")
    model_id = f"local:{arch}@{combined_digest(weights)}"
    encoder = OpenClipEncoder.from_model(
        model,
        tokenizer,
        name=name,
        arch=arch,
        model_id=model_id,
        device=device,
        precision=precision,
        weights=weights,
    )
    encoder.model_cfg = model_cfg
    return encoder


def _load_state(name: str, model: Any, weights: Path) -> None:
    if weights.suffix == ".safetensors":
        state = load_file(str(weights))
    else:
        state = torch.load(weights, map_location="cpu", weights_only=True)
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise InvalidInputError(f"model '{name}': {weights} does not fit its config ({e})") from e


def build_from_cfg(name: str, model_cfg: dict, preprocess_cfg: dict | None) -> tuple[Any, Callable]:
    """An open_clip CLIP with its own tokenizer, from a config dict (single-file checkpoints)."""

    cfg = dict(model_cfg)
    if "hf_model_name" in cfg.get("text_cfg", {}) or "multimodal_cfg" in cfg:
        raise InvalidInputError(
            f"model '{name}': single-file checkpoints hold CLIP-style text towers only; save "
            f"this model as a folder with save_checkpoint"
        )
    model = open_clip.CLIP(**cfg)
    pp = {**asdict(PreprocessCfg()), **(preprocess_cfg or {}), "size": model.visual.image_size}
    model.visual.preprocess_cfg = pp
    context = cfg.get("text_cfg", {}).get("context_length", 77)
    return model, open_clip.tokenizer.SimpleTokenizer(context_length=context)


def save_checkpoint(
    model: torch.nn.Module,
    path: str | os.PathLike,
    model_cfg: dict[str, Any],
    arch: str,
    preprocess_cfg: dict[str, Any] | None = None,
) -> Path:
    """Write `model` (an open_clip CLIP) so that `load_model("local:PATH")` loads it for
    every task.

    Why: a fine-tuned or trained model becomes a model name like any other. A folder gets
    open_clip's layout (open_clip_config.json + safetensors, which open_clip's own
    `local-dir:` also reads); a path ending in .pt gets one self-describing file.

    >>> import cliplens
    >>> encoder = cliplens.load_model("ViT-B-32:openai")
    >>> cliplens.save_checkpoint(encoder.model, "run/model", encoder.model_cfg, "ViT-B-32")
    """
    path = Path(path)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    if path.suffix == ".pt":
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(
            {
                "format": LOCAL_FILE_FORMAT,
                "arch": arch,
                "model_cfg": model_cfg,
                "preprocess_cfg": preprocess_cfg or {},
                "state_dict": state,
            },
            path,
        )
        return path

    path.mkdir(parents=True, exist_ok=True)
    # open_clip reads model_cfg and preprocess_cfg and ignores the rest
    cfg = {
        "model_cfg": model_cfg,
        "preprocess_cfg": preprocess_cfg or {},
        "cliplens": {"arch": arch},
    }
    (path / "open_clip_config.json").write_text(json.dumps(cfg, indent=2))
    save_file(state, str(path / "open_clip_model.safetensors"))
    return path


def _create(name: str, model_name: str, **kwargs: Any) -> Any:

    try:
        return open_clip.create_model(model_name, load_weights=True, **kwargs)
    except (RuntimeError, ValueError, KeyError, FileNotFoundError) as e:
        raise ModelError(
            f"model '{name}': open_clip could not build it ({_short_reason(e)})"
        ) from e
