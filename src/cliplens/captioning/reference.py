"""ClipCap as its authors published it (Mokady et al. 2021, rmokady/CLIP_prefix_caption):
their mapping networks with their parameter names, GPT-2, and their decoding, so the
checkpoints they released (`coco_weights.pt`, `conceptual_weights.pt`: MLP, GPT-2 fine-tuned;
`coco_prefix-*.pt` / the transformer COCO model: GPT-2 frozen) load strictly and caption as
their `predict.py` does.

A checkpoint is the whole model's state dict: `clip_project.*` (the mapper) and `gpt.*` (a
GPT2LMHeadModel). Everything is read from its keys and shapes:

  mlp          clip_project.model.0/2   D -> k*W/2 -> tanh -> k*W   (prefix_length k <= 10)
  linear       clip_project             D -> k*W                    (their k > 10 fallback)
  transformer  clip_project.linear (D -> c*W), .prefix_const (k, W), .transformer.layers.*:
               pre-norm layers, 8 heads, queries and keys/values without bias, ReLU MLP

The prefix is the raw CLIP image embedding in fp32 (the MLP checkpoints), or that embedding
divided by its norm (`normalize_prefix`, as the transformer model's notebook does).
Decoding is their `generate2` (greedy: their nucleus filter keeps the top token, then takes
the argmax) or `generate_beam`: at most 67 tokens, stopping after the token of ".".
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
from torch import nn

from cliplens.errors import ImageError, InvalidInputError, ModelError
from cliplens.settings import get_settings

if TYPE_CHECKING:
    from collections.abc import Sequence

    from cliplens.captioning.model import CaptionOptions
    from cliplens.images import ImageSource
    from cliplens.models.encoder import Encoder

Mapping = Literal["mlp", "linear", "transformer"]
STOP = "."  # their stop token: decoding ends after it
ENTRY_LENGTH = 67  # their bound on generated tokens
HEADS = 8  # the transformer mapper's heads, fixed in their code
# the CLIP each embedding width means in their scripts: ViT-B/32 (512) or RN50x4 (640,
# `--is_rn`); open_clip names
ENCODERS = {512: "ViT-B-32:openai", 640: "RN50x4:openai"}
CHECKPOINT_SUFFIXES = (".pt", ".pth", ".bin")


@dataclass(frozen=True)
class ReferenceConfig:
    """What a checkpoint holds, read from its keys and shapes."""

    mapping: Mapping
    embed_dim: int  # D: the CLIP embedding
    prefix_length: int  # k
    clip_length: int  # transformer: tokens the embedding is projected to (0 otherwise)
    mapper_layers: int  # transformer (0 otherwise)
    mapper_hidden: int  # transformer: the layers' MLP width (2 W in theirs)
    lm_width: int  # W
    lm_layers: int
    lm_heads: int
    lm_inner: int
    vocab: int
    positions: int
    normalize_prefix: bool

    @property
    def encoder(self) -> str | None:
        """The open_clip model the checkpoint was trained on, where the width says."""
        return ENCODERS.get(self.embed_dim)


def _layers(state: dict[str, torch.Tensor], prefix: str) -> int:
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    found = {int(m.group(1)) for k in state if (m := pattern.match(k))}
    return max(found) + 1 if found else 0


def _shape(state: dict[str, Any], key: str) -> tuple[int, ...]:
    value = state.get(key)
    return tuple(value.shape) if isinstance(value, torch.Tensor) else ()


def infer_config(
    state: dict[str, Any],
    source: str,
    normalize_prefix: bool | None = None,
    lm_heads: int | None = None,
) -> ReferenceConfig:
    """The checkpoint's layout from its state dict; `source` names it in errors."""
    not_clipcap = (
        f"`captioner` {source} is not a ClipCap checkpoint (the authors' state dict with "
        "clip_project.* and gpt.* weights); pass one of theirs or a folder written by "
        "`cliplens caption train`"
    )
    wte, wpe = (
        _shape(state, "gpt.transformer.wte.weight"),
        _shape(state, "gpt.transformer.wpe.weight"),
    )
    if len(wte) != 2 or len(wpe) != 2:
        raise InvalidInputError(not_clipcap)
    vocab, width = wte
    inner = _shape(state, "gpt.transformer.h.0.mlp.c_fc.weight")
    lm_layers = _layers(state, "gpt.transformer.h.")
    heads = lm_heads or max(1, width // 64)  # every GPT-2 size has 64-wide heads
    if lm_layers == 0 or len(inner) != 2 or width % heads:
        raise InvalidInputError(not_clipcap)
    mlp0, mlp2 = (
        _shape(state, "clip_project.model.0.weight"),
        _shape(state, "clip_project.model.2.weight"),
    )
    linear, const = (
        _shape(state, "clip_project.linear.weight"),
        _shape(state, "clip_project.prefix_const"),
    )
    plain = _shape(state, "clip_project.weight")
    clip_length = mapper_layers = hidden = 0
    if len(mlp0) == 2 and len(mlp2) == 2:
        mapping: Mapping = "mlp"
        embed_dim, out = mlp0[1], mlp2[0]
    elif len(linear) == 2 and len(const) == 2:
        mapping, embed_dim, out = "transformer", linear[1], const[0] * width
        clip_length, rest = divmod(linear[0], width)
        mapper_layers = _layers(state, "clip_project.transformer.layers.")
        hidden = _shape(state, "clip_project.transformer.layers.0.mlp.fc1.weight")[:1] or (0,)
        hidden = hidden[0]
        if rest or const[1] != width or not mapper_layers or not hidden or width % HEADS:
            raise InvalidInputError(not_clipcap)
    elif len(plain) == 2:
        mapping, embed_dim, out = "linear", plain[1], plain[0]
    else:
        raise InvalidInputError(not_clipcap)
    prefix_length, rest = divmod(out, width)
    if rest or prefix_length < 1:
        raise InvalidInputError(
            f"`captioner` {source}: its mapper gives {out} numbers, not a whole number of "
            f"GPT-2 inputs {width} wide; the file is not a ClipCap checkpoint"
        )
    return ReferenceConfig(
        mapping=mapping,
        embed_dim=int(embed_dim),
        prefix_length=int(prefix_length),
        clip_length=int(clip_length),
        mapper_layers=mapper_layers,
        mapper_hidden=int(hidden),
        lm_width=int(width),
        lm_layers=lm_layers,
        lm_heads=int(heads),
        lm_inner=int(inner[1]),
        vocab=int(vocab),
        positions=int(wpe[0]),
        normalize_prefix=(mapping == "transformer")
        if normalize_prefix is None
        else normalize_prefix,
    )


# ------------------------------------------------------------------ the authors' modules


class ReferenceMLP(nn.Module):
    """Their `MLP((D, k*W // 2, k*W))`: Linear, Tanh, Linear under `model`."""

    def __init__(self, embed_dim: int, out: int) -> None:
        super().__init__()
        self.model = nn.Sequential(
            nn.Linear(embed_dim, out // 2), nn.Tanh(), nn.Linear(out // 2, out)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


class ReferenceAttention(nn.Module):
    """Their MultiHeadAttention (self-attention only): queries and keys/values without
    bias, keys then values in `to_keys_values`' output, a projection with bias."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.scale = (width // heads) ** -0.5
        self.to_queries = nn.Linear(width, width, bias=False)
        self.to_keys_values = nn.Linear(width, 2 * width, bias=False)
        self.project = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # the products in their einsum form: the same float sums as theirs, not just close
        b, n, c = x.shape
        h = self.heads
        q = self.to_queries(x).reshape(b, n, h, c // h)
        kv = self.to_keys_values(x).reshape(b, n, 2, h, c // h)
        scores = torch.einsum("bnhd,bmhd->bnmh", q, kv[:, :, 0]) * self.scale
        mixed = torch.einsum("bnmh,bmhd->bnhd", scores.softmax(dim=2), kv[:, :, 1])
        return self.project(mixed.reshape(b, n, c))


class ReferenceFeedForward(nn.Module):
    """Their MlpTransformer: fc1, ReLU, fc2."""

    def __init__(self, width: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x)))


class ReferenceLayer(nn.Module):
    """Their TransformerLayer: pre-norm attention and MLP, each added to its input."""

    def __init__(self, width: int, hidden: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(width)
        self.attn = ReferenceAttention(width, HEADS)
        self.norm2 = nn.LayerNorm(width)
        self.mlp = ReferenceFeedForward(width, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ReferenceTransformer(nn.Module):
    def __init__(self, width: int, hidden: int, layers: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(ReferenceLayer(width, hidden) for _ in range(layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


class ReferenceTransformerMapper(nn.Module):
    """Their TransformerMapper: the embedding as `clip_length` tokens, then `prefix_length`
    learnt constants, through the transformer (no final norm); the outputs at the constants
    are the prefix."""

    def __init__(self, cfg: ReferenceConfig) -> None:
        super().__init__()
        self.clip_length = cfg.clip_length
        self.transformer = ReferenceTransformer(cfg.lm_width, cfg.mapper_hidden, cfg.mapper_layers)
        self.linear = nn.Linear(cfg.embed_dim, cfg.clip_length * cfg.lm_width)
        self.prefix_const = nn.Parameter(torch.zeros(cfg.prefix_length, cfg.lm_width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.linear(x).view(x.shape[0], self.clip_length, -1)
        const = self.prefix_const.unsqueeze(0).expand(x.shape[0], -1, -1)
        return self.transformer(torch.cat([tokens, const], dim=1))[:, self.clip_length :]


def build_mapper(cfg: ReferenceConfig) -> nn.Module:
    out = cfg.prefix_length * cfg.lm_width
    if cfg.mapping == "mlp":
        return ReferenceMLP(cfg.embed_dim, out)
    if cfg.mapping == "linear":
        return nn.Linear(cfg.embed_dim, out)
    return ReferenceTransformerMapper(cfg)


def build_gpt(cfg: ReferenceConfig) -> nn.Module:
    # heavy: transformers loads only when a language model is used
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        vocab_size=cfg.vocab,
        n_positions=cfg.positions,
        n_embd=cfg.lm_width,
        n_layer=cfg.lm_layers,
        n_head=cfg.lm_heads,
        n_inner=cfg.lm_inner,
        bos_token_id=min(50256, cfg.vocab - 1),  # GPT-2's <|endoftext|>, where it exists
        eos_token_id=min(50256, cfg.vocab - 1),
    )
    return GPT2LMHeadModel(config)


# ------------------------------------------------------------------ the captioner


class ReferenceCaptioner(nn.Module):
    """The authors' ClipCaptionModel: `clip_project` and `gpt`, their decoding."""

    def __init__(self, cfg: ReferenceConfig, tokenizer: Any, source: str = "") -> None:
        super().__init__()
        self.cfg, self.tokenizer, self.source = cfg, tokenizer, source
        self.clip_project = build_mapper(cfg)
        self.gpt = build_gpt(cfg)
        stop = tokenizer.encode(STOP)
        if not stop:
            raise InvalidInputError(f"the tokenizer has no token for {STOP!r} to stop on")
        self.stop_id = int(stop[0])

    @property
    def device(self) -> torch.device:
        return next(self.clip_project.parameters()).device

    def prefix(self, embeddings: np.ndarray | torch.Tensor) -> torch.Tensor:
        """(B, D) CLIP embeddings (raw; divided by their norm with `normalize_prefix`) ->
        (B, prefix_length, W), as their predict.py makes it."""
        x = torch.as_tensor(embeddings).to(self.device, torch.float32)
        if x.ndim != 2 or x.shape[1] != self.cfg.embed_dim:
            raise InvalidInputError(
                f"embeddings of shape {tuple(x.shape)}: the checkpoint takes (N, "
                f"{self.cfg.embed_dim}) CLIP embeddings"
            )
        if self.cfg.normalize_prefix:
            x = x / x.norm(dim=-1, keepdim=True)
        return self.clip_project(x).reshape(x.shape[0], self.cfg.prefix_length, -1)

    def _room(self, max_tokens: int | None) -> int:
        n = max_tokens or ENTRY_LENGTH
        room = self.cfg.positions - self.cfg.prefix_length
        if n < 1 or n > room:
            raise InvalidInputError(
                f"`max_tokens` {n}: this GPT-2 takes 1 to {room} tokens after its prefix"
            )
        return n

    @torch.inference_mode()
    def greedy_ids(self, prefix: torch.Tensor, max_tokens: int | None = None) -> list[list[int]]:
        """Their generate2 for each row of `prefix`: the most likely token each step, until
        the stop token (kept) or `max_tokens` (67)."""
        n = self._room(max_tokens)
        wte = self.gpt.get_input_embeddings()
        out = self.gpt(inputs_embeds=prefix, use_cache=True)
        rows: list[list[int]] = [[] for _ in range(prefix.shape[0])]
        done = torch.zeros(prefix.shape[0], dtype=torch.bool, device=prefix.device)
        for _ in range(n):
            token = out.logits[:, -1, :].argmax(dim=-1)
            for i in torch.nonzero(~done).flatten().tolist():
                rows[i].append(int(token[i]))
            done |= token == self.stop_id
            if bool(done.all()):
                break
            out = self.gpt(inputs_embeds=wte(token)[:, None], cache=out.cache, use_cache=True)
        return rows

    @torch.inference_mode()
    def beam_text(self, prefix: torch.Tensor, beams: int = 5, max_tokens: int | None = None) -> str:
        """Their generate_beam for one prefix (1, k, W): beams ranked by mean log
        probability; a beam ends at the stop token; the best beam's text."""
        n = self._room(max_tokens)
        wte = self.gpt.get_input_embeddings()
        logp = self.gpt(inputs_embeds=prefix).logits[:, -1].softmax(-1).log()
        scores, tokens = logp.topk(beams, -1)
        scores, tokens = scores[0], tokens.permute(1, 0)
        embeds = torch.cat([prefix.expand(beams, -1, -1), wte(tokens)], dim=1)
        lengths = torch.ones(beams, device=prefix.device)
        stopped = tokens[:, 0] == self.stop_id
        for _ in range(n - 1):
            if bool(stopped.all()):
                break
            logp = self.gpt(inputs_embeds=embeds).logits[:, -1].softmax(-1).log()
            logp[stopped] = -float("inf")
            logp[stopped, 0] = 0.0  # an ended beam goes on with token 0 at no cost
            total = scores[:, None] + logp
            lengths[~stopped] += 1
            best, flat = (total / lengths[:, None]).view(-1).topk(beams, -1)
            source, token = flat // total.shape[1], flat % total.shape[1]
            lengths = lengths[source]
            tokens = torch.cat([tokens[source], token[:, None]], dim=1)
            embeds = torch.cat([embeds[source], wte(token)[:, None]], dim=1)
            scores = best * lengths
            stopped = stopped[source] | (token == self.stop_id)
        order = (scores / lengths).argsort(descending=True)
        top = int(order[0])
        return self.tokenizer.decode(tokens[top, : int(lengths[top])].tolist())

    def captions(
        self,
        embeddings: np.ndarray,
        options: CaptionOptions | None = None,
        encoder: Encoder | None = None,
    ) -> list[str]:
        """Captions of (N, D) CLIP embeddings (raw, as `embed_images` gives them): greedy, or
        their beam search with `beams` > 1; texts decoded as theirs are."""
        beams = options.beams if options else 1
        max_tokens = options.max_tokens if options else None
        batch = options.batch_size if options else 32
        if options is not None and (options.top_p is not None or options.rerank > 1):
            raise InvalidInputError(
                "the authors' decoding is greedy or beam search: drop `top_p` and `candidates`"
            )
        self.eval()
        x = np.asarray(embeddings, dtype=np.float32)
        out: list[str] = []
        for lo in range(0, len(x), batch):
            prefix = self.prefix(x[lo : lo + batch])
            if beams > 1:
                out.extend(self.beam_text(p[None], beams, max_tokens) for p in prefix)
            else:
                out.extend(self.tokenizer.decode(r) for r in self.greedy_ids(prefix, max_tokens))
        return out

    def check_encoder(self, encoder: Encoder) -> None:
        if int(encoder.info.dim) != self.cfg.embed_dim:
            name = self.cfg.encoder or f"a CLIP with {self.cfg.embed_dim}-wide embeddings"
            raise InvalidInputError(
                f"`captioner` {self.source} takes {self.cfg.embed_dim}-wide CLIP embeddings "
                f"but {encoder.info.name} gives {encoder.info.dim}: pass `model` {name}"
            )

    def embed_images(
        self,
        encoder: Encoder,
        images: Sequence[ImageSource],
        max_megapixels: float | None = None,
        batch_size: int = 32,
    ) -> tuple[np.ndarray, list[int], list[ImageError]]:
        """(raw embeddings, positions kept, failures): the image tower's output before any
        normalisation, as the authors' CLIP gave it; unreadable images are skipped."""
        self.check_encoder(encoder)
        loaded = encoder.load()
        try:
            tower = loaded.image_tower()
        except InvalidInputError as e:
            raise InvalidInputError(
                f"`model` {encoder.info.name} gives no raw CLIP embedding, which the authors' "
                "checkpoints take: pass an open_clip model as `model`"
            ) from e
        param = next(tower.parameters())
        rows, kept, failures = [], [], []
        for lo in range(0, len(images), batch_size):
            pixels = []
            for i in range(lo, min(lo + batch_size, len(images))):
                try:
                    pixels.append(loaded.load_pixels(images[i], max_megapixels))
                    kept.append(i)
                except ImageError as e:
                    failures.append(e)
            if pixels:
                batch = torch.from_numpy(np.stack(pixels)).to(param.device, param.dtype)
                with torch.inference_mode():
                    rows.append(tower(batch).float().cpu().numpy())
        empty = np.zeros((0, self.cfg.embed_dim), np.float32)
        return (np.concatenate(rows) if rows else empty), kept, failures

    def caption_images(
        self,
        encoder: Encoder,
        images: Sequence[ImageSource],
        options: CaptionOptions | None = None,
    ) -> list[str]:
        """A caption per image; the first unreadable image raises its error."""
        vectors, _, failures = self.embed_images(encoder, images)
        if failures:
            raise failures[0]
        return self.captions(vectors, options)


def is_checkpoint_file(path: str | os.PathLike) -> bool:
    """Whether `captioner` names a checkpoint file rather than a captioner folder."""
    p = Path(path)
    return p.is_file() or (not p.exists() and p.suffix in CHECKPOINT_SUFFIXES)


def load_tokenizer(name: str) -> Any:
    """GPT-2's tokenizer: hub name `gpt2` (downloaded once, cached) or a local folder."""
    from cliplens.captioning.language_model import _quiet_transformers

    _quiet_transformers()
    # heavy: transformers loads only when a language model is used
    from transformers import AutoTokenizer

    local = Path(name).expanduser()
    cache = get_settings().model_cache
    try:
        if local.exists():
            return AutoTokenizer.from_pretrained(str(local))
        return AutoTokenizer.from_pretrained(name, cache_dir=str(cache))
    except OSError as e:
        if local.exists():
            raise InvalidInputError(f"`tokenizer` {name}: not a tokenizer folder ({e})") from e
        reason = str(e).split("\n")[0]
        raise ModelError(
            f"cannot fetch the tokenizer '{name}' ({reason}); it is cached under {cache} once "
            "downloaded. Without network pass `tokenizer` a folder with GPT-2's tokenizer files"
        ) from e


def read_state(path: Path, mmap: bool = False) -> dict[str, torch.Tensor]:
    """A checkpoint's tensors by name. With `mmap`, the tensors of a zip-format file are
    mapped, not read: only what is touched is loaded (a server checking the file at
    start reads its names and shapes, not its 600 MB)."""
    if not path.is_file():
        raise InvalidInputError(f"`captioner` {path}: no such file")
    try:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
        except Exception:  # a legacy (pre-zip) file cannot be mapped: read it (junk fails
            if not mmap:  # again, with the plain reader's reason)
                raise
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # unpickling fails in many ways; all mean "not a checkpoint"
        reason = str(e).strip().split("\n")[0][:200]
        if reason.isdigit():  # torch's legacy reader names only the bad magic number
            reason = f"no PyTorch file's header: {type(e).__name__} {reason}"
        raise InvalidInputError(
            f"`captioner` {path} cannot be read as a PyTorch state dict ({reason}); pass the "
            "authors' .pt file or a folder written by `cliplens caption train`"
        ) from e
    if not isinstance(state, dict):
        state = {}
    return {k: v for k, v in state.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}


def load_clipcap_checkpoint(
    path: str | os.PathLike,
    tokenizer: str = "gpt2",
    normalize_prefix: bool | None = None,
    lm_heads: int | None = None,
) -> ReferenceCaptioner:
    """A checkpoint the ClipCap authors released (or one trained with their train.py),
    built with their exact modules: why, to caption with `coco_weights.pt`,
    `conceptual_weights.pt` or the transformer COCO model as their predict.py does.

    The layout comes from the file; `tokenizer` is GPT-2's (hub name or folder);
    `normalize_prefix` overrides whether embeddings are divided by their norm first (their
    transformer model: yes; the MLP ones: no); `lm_heads` the GPT-2 heads (width / 64).

    >>> import cliplens
    >>> captioner = cliplens.load_clipcap_checkpoint("coco_weights.pt")  # doctest: +SKIP
    >>> cliplens.caption(captioner, ["photo.jpg"])  # doctest: +SKIP
    """
    file = Path(path).expanduser()
    state = read_state(file)
    cfg = infer_config(state, str(path), normalize_prefix, lm_heads)
    tok = load_tokenizer(tokenizer)
    with torch.device("meta"):  # no random initialisation: every weight comes from the file
        model = ReferenceCaptioner(cfg, tok, str(path))
    expected = model.state_dict()
    # old transformers saved GPT-2's causal mask buffers; today's model has none
    state = {
        k: v
        for k, v in state.items()
        if k in expected or not k.endswith((".attn.bias", ".attn.masked_bias"))
    }
    if "gpt.lm_head.weight" not in state:  # tied to the token embedding
        state["gpt.lm_head.weight"] = state["gpt.transformer.wte.weight"]
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as e:
        reason = str(e).strip().split("\n")[-1].strip()[:300]
        raise InvalidInputError(f"`captioner` {path}: not a ClipCap state dict ({reason})") from e
    if len(model.tokenizer) > cfg.vocab:
        raise InvalidInputError(
            f"`tokenizer` {tokenizer} has {len(model.tokenizer)} tokens, the checkpoint's GPT-2 "
            f"{cfg.vocab}: pass GPT-2's tokenizer"
        )
    return model.float().eval()
