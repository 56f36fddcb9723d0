"""ClipCap (Mokady et al. 2021): a mapping network turns a CLIP image embedding into
`prefix_length` input embeddings of a causal language model, which continues them as a
caption.

Two mappers, as in the paper: `mlp` (two layers with tanh; the LM is fine-tuned with it)
and `transformer` (the embedding is projected to `clip_length` tokens, a transformer reads
them with `prefix_length` learnt constants, and its outputs at the constants are the
prefix; the LM stays frozen).

A captioner is one folder: captioner.json (config: the encoder's name and model_id, the
LM, the mapper), mapper.safetensors, and lm/ when the LM was trained (fine-tuned or from
scratch). It refuses embeddings of any other encoder. The ClipCap authors' own checkpoint
files load through `load_captioner` too, into their modules (captioning.reference).
"""

from __future__ import annotations

import json
import math
import os
import shutil
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, get_args

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from cliplens.captioning import language_model as lms
from cliplens.captioning import reference
from cliplens.captioning.reference import ReferenceCaptioner
from cliplens.device import Precision, choose_device, choose_precision
from cliplens.errors import InvalidInputError
from cliplens.models.ref import ModelRef
from cliplens.tasks.score import rerank

if TYPE_CHECKING:
    from cliplens.images import ImageSource
    from cliplens.models.encoder import Encoder

# the mapping network: `mlp` (the LM fine-tuned with it) or `transformer` (the LM frozen)
Variant = Literal["mlp", "transformer"]
VARIANTS: tuple[Variant, ...] = get_args(Variant)
FORMAT = 1
CONFIG_FILE = "captioner.json"
MAPPER_FILE = "mapper.safetensors"


@dataclass(frozen=True)
class CaptionerConfig:
    encoder: str  # the name the encoder loads by
    encoder_id: str  # its model_id: embeddings of any other model are refused
    embed_dim: int
    lm: str  # the language model's name (see caption.language_model)
    lm_width: int  # the LM's input embedding width
    variant: Variant = "mlp"
    lm_trained: bool = True  # fine-tuned (or from scratch): saved in lm/
    prefix_length: int = 10
    clip_length: int = 10  # transformer: tokens the embedding is projected to
    mapper_layers: int = 8  # transformer
    mapper_heads: int = 8  # transformer
    max_tokens: int = 40  # caption tokens, in training and generation

    def validate(self) -> None:
        check_lm_setup(self.variant, self.lm, self.lm_trained, "lm_trained")
        if self.prefix_length < 1 or self.clip_length < 1:
            raise InvalidInputError("`prefix_length` must be at least 1")
        if self.variant == "transformer" and self.lm_width % self.mapper_heads:
            raise InvalidInputError(
                f"the LM width {self.lm_width} does not split into {self.mapper_heads} heads"
            )


def check_lm_setup(variant: Variant, lm: str, lm_trained: bool, trained: str) -> None:
    """The variant exists, and an LM from scratch is trained (it has nothing to keep);
    `trained` names the caller's parameter that says whether the LM trains."""
    if variant not in VARIANTS:
        raise InvalidInputError(f"`variant` {variant}: use mlp or transformer")
    if lms.is_scratch(lm) and not lm_trained:
        raise InvalidInputError(
            f"`lm` {lm} starts from random weights, so it cannot stay frozen; drop `{trained}`"
        )


@dataclass(frozen=True)
class EncoderIdentity:
    """What a captioner records about the encoder its embeddings come from."""

    name: str  # the name it loads by (a local: path made absolute)
    model_id: str  # embeddings of any other model are refused
    dim: int

    @classmethod
    def of(cls, encoder: Encoder) -> EncoderIdentity:
        name = encoder.info.name
        if name.startswith("local:"):
            name = "local:" + str(Path(name[len("local:") :]).expanduser().resolve())
        return cls(name, encoder.info.model_id, int(encoder.info.dim))


@dataclass(frozen=True)
class CaptionOptions:
    """How captions are searched for: greedy (the default), `beams` > 1 for beam search,
    `top_p` for nucleus sampling (seeded), or `rerank` > 1 for the best of that many
    candidates (the greedy caption and nucleus samples) as the encoder judges them."""

    beams: int = 1
    top_p: float | None = None
    temperature: float = 1.0  # of sampling
    max_tokens: int | None = None  # the captioner's own bound when None
    seed: int = 0
    rerank: int = 1
    batch_size: int = 32
    bf16: bool = False  # the LM decodes under bf16 autocast

    def __post_init__(self) -> None:
        if self.rerank > 1 and self.beams > 1:
            raise InvalidInputError("`beams` and `rerank` are different searches: pick one")


class MLPMapper(nn.Module):
    """embedding (B, D) -> prefix (B, k, W): D -> kW/2 -> tanh -> kW, as in ClipCap."""

    def __init__(self, cfg: CaptionerConfig) -> None:
        super().__init__()
        k, w = cfg.prefix_length, cfg.lm_width
        self.k, self.w = k, w
        self.net = nn.Sequential(
            nn.Linear(cfg.embed_dim, k * w // 2), nn.Tanh(), nn.Linear(k * w // 2, k * w)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).view(-1, self.k, self.w)


class TransformerMapper(nn.Module):
    """embedding -> `clip_length` tokens; with `prefix_length` learnt constants through a
    transformer; the outputs at the constants are the prefix."""

    def __init__(self, cfg: CaptionerConfig) -> None:
        super().__init__()
        self.c, self.w = cfg.clip_length, cfg.lm_width
        self.project = nn.Linear(cfg.embed_dim, cfg.clip_length * cfg.lm_width)
        self.constants = nn.Parameter(torch.randn(cfg.prefix_length, cfg.lm_width))
        layer = nn.TransformerEncoderLayer(
            cfg.lm_width,
            cfg.mapper_heads,
            dim_feedforward=2 * cfg.lm_width,
            dropout=0.0,
            activation="gelu",
            batch_first=True,
            norm_first=True,
        )
        self.transformer = nn.TransformerEncoder(
            layer, cfg.mapper_layers, enable_nested_tensor=False
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.project(x).view(-1, self.c, self.w)
        constants = self.constants.unsqueeze(0).expand(x.shape[0], -1, -1)
        return self.transformer(torch.cat([tokens, constants], dim=1))[:, self.c :]


class Captioner(nn.Module):
    """Mapper + LM + tokenizer. Embeddings go in L2-normalised, as every Encoder gives them."""

    def __init__(self, cfg: CaptionerConfig, lm: Any, tokenizer: Any) -> None:
        super().__init__()
        cfg.validate()
        if lms.embedding_width(lm) != cfg.lm_width:
            raise InvalidInputError(
                f"the language model is {lms.embedding_width(lm)} wide, "
                f"the captioner was built for {cfg.lm_width}"
            )
        self.cfg = cfg
        self.mapper = MLPMapper(cfg) if cfg.variant == "mlp" else TransformerMapper(cfg)
        self.lm = lm
        self.tokenizer = tokenizer
        self.lm.requires_grad_(cfg.lm_trained)

    @property
    def device(self) -> torch.device:
        return next(self.mapper.parameters()).device

    def prefix(self, embeddings: torch.Tensor) -> torch.Tensor:
        """(B, D) unit vectors -> (B, prefix_length, W); scaled to unit variance per entry."""
        x = embeddings.to(self.device, torch.float32)
        return self.mapper(x * math.sqrt(self.cfg.embed_dim))

    def tokenize(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(ids, mask): each caption then EOS, cut at max_tokens, padded on the right."""
        tok = self.tokenizer
        cut = self.cfg.max_tokens - 1
        words = [tok(c, add_special_tokens=False).input_ids[:cut] for c in captions]
        rows = [[*ids, tok.eos_token_id] for ids in words]
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), tok.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = torch.tensor(r)
            mask[i, : len(r)] = 1
        return ids, mask

    def inputs(
        self,
        embeddings: torch.Tensor,
        ids: torch.Tensor,
        mask: torch.Tensor,
        word_dropout: float = 0.0,
    ) -> dict[str, torch.Tensor]:
        """The LM's inputs for teacher forcing: prefix then caption; the loss sees only the
        caption's real tokens (labels -100 on the prefix and the padding).

        `word_dropout` replaces that share of the input words (never the targets) by the pad
        token, as Bowman et al. (2016) did to make a decoder use its conditioning: the LM
        cannot lean on the words before, so it reads the prefix."""
        prefix = self.prefix(embeddings)
        ids, mask = ids.to(prefix.device), mask.to(prefix.device)
        shown = ids
        if word_dropout > 0:
            drop = torch.rand(ids.shape, device=ids.device) < word_dropout
            shown = ids.masked_fill(drop, self.tokenizer.pad_token_id)
        words = self.lm.get_input_embeddings()(shown)
        batch, k = prefix.shape[0], prefix.shape[1]
        ignore = torch.full((batch, k), -100, dtype=torch.long, device=prefix.device)
        labels = torch.cat([ignore, ids.masked_fill(mask == 0, -100)], dim=1)
        ones = torch.ones((batch, k), dtype=mask.dtype, device=prefix.device)
        attention = torch.cat([ones, mask], dim=1)
        embeds = torch.cat([prefix.to(words.dtype), words], dim=1)
        return {"inputs_embeds": embeds, "attention_mask": attention, "labels": labels}

    def loss(
        self, embeddings: torch.Tensor, captions: list[str], word_dropout: float = 0.0
    ) -> torch.Tensor:
        ids, mask = self.tokenize(captions)
        return self.lm(**self.inputs(embeddings, ids, mask, word_dropout)).loss

    @torch.inference_mode()
    def generate(
        self,
        embeddings: np.ndarray | torch.Tensor,
        beams: int = 1,
        top_p: float | None = None,
        temperature: float = 1.0,
        max_tokens: int | None = None,
        seed: int = 0,
        batch_size: int = 32,
        bf16: bool = False,
        samples: int = 1,
    ) -> list[str]:
        """Captions for (N, D) embeddings: greedy (beams 1), beam search, or nucleus sampling
        with `top_p` (seeded, so the same call gives the same captions). `bf16` runs the LM
        under bf16 autocast. With `samples` > 1 (sampling only), N * samples captions come
        back, each image's together."""
        if top_p is not None and not 0 < top_p <= 1:
            raise InvalidInputError(f"`top_p` {top_p}: a top-p must be in (0, 1]")
        if beams < 1:
            raise InvalidInputError(f"`beams` {beams}: use at least 1")
        if not (math.isfinite(temperature) and temperature > 0):
            raise InvalidInputError(f"temperature {temperature}: use a finite number > 0")
        if (max_tokens is not None and max_tokens < 1) or batch_size < 1 or seed < 0:
            raise InvalidInputError(
                f"max tokens {max_tokens}, batch size {batch_size}, seed {seed}: use at least "
                "1, 1 and 0"
            )
        room = self._positions() - self.cfg.prefix_length
        if max_tokens is not None and max_tokens > room:
            raise InvalidInputError(
                f"max tokens {max_tokens}: this captioner's LM takes {room} tokens after its "
                "prefix; ask for fewer"
            )
        if top_p is not None and beams > 1:
            raise InvalidInputError("`beams` and `top_p` are different searches: pick one")
        if samples > 1 and top_p is None:
            raise InvalidInputError("several captions per image need sampling (`top_p`)")
        x = torch.as_tensor(np.asarray(embeddings, dtype=np.float32))
        if x.ndim != 2 or x.shape[1] != self.cfg.embed_dim:
            raise InvalidInputError(
                f"embeddings of shape {tuple(x.shape)}: the captioner takes (N, "
                f"{self.cfg.embed_dim})"
            )
        self.eval()
        tok = self.tokenizer
        options: dict[str, Any] = {
            "max_new_tokens": max_tokens or self.cfg.max_tokens,
            "eos_token_id": tok.eos_token_id,
            "pad_token_id": tok.pad_token_id,
            "num_beams": beams,
            "do_sample": top_p is not None,
            "num_return_sequences": samples,
        }
        if top_p is not None:
            options.update(top_p=top_p, top_k=0, temperature=temperature)
        else:  # plain search: no sampling settings from the LM's generation_config
            options.update(top_p=None, top_k=None, temperature=None)
        if beams > 1:
            options.update(early_stopping=True, length_penalty=1.0)
        generator = torch.Generator().manual_seed(seed)
        dtype = self.lm.get_input_embeddings().weight.dtype
        autocast = torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=bf16)
        out: list[str] = []
        for lo in range(0, len(x), batch_size):
            prefix = self.prefix(x[lo : lo + batch_size]).to(dtype)
            mask = torch.ones(prefix.shape[:2], dtype=torch.long, device=prefix.device)
            if top_p is not None:  # HF samples from the global generator
                torch.manual_seed(int(torch.randint(2**31, (1,), generator=generator)))
            with autocast:
                ids = self.lm.generate(inputs_embeds=prefix, attention_mask=mask, **options)
            out.extend(t.strip() for t in tok.batch_decode(ids, skip_special_tokens=True))
        return out

    def _positions(self) -> int:
        """How many positions the LM attends over (its context), prefix included."""
        config = getattr(self.lm, "config", None)
        for key in ("n_positions", "max_position_embeddings", "n_ctx"):
            value = getattr(config, key, None)
            if isinstance(value, int) and value > 0:
                return value
        return 1 << 30  # unknown: no limit of ours

    def generate_reranked(
        self,
        embeddings: np.ndarray,
        encode_texts: Callable[[list[str]], np.ndarray],
        candidates: int = 16,
        top_p: float = 0.9,
        temperature: float = 1.0,
        seed: int = 0,
        bf16: bool = False,
        max_tokens: int | None = None,
        batch_size: int = 32,
    ) -> list[str]:
        """Best of `candidates` per image, judged by CLIP: the greedy caption and
        `candidates - 1` nucleus samples, and the one whose text embedding (`encode_texts`,
        the captioner's own encoder) is closest to the image's wins. The encoder knows
        combinations the decoder's training captions never showed it, so it can overrule
        the decoder's prior."""
        if candidates < 1:
            raise InvalidInputError(f"`candidates` {candidates}: use at least 1")
        x = np.asarray(embeddings, dtype=np.float32)
        options = {"bf16": bf16, "max_tokens": max_tokens, "batch_size": batch_size}
        greedy = self.generate(x, **options)
        if candidates == 1:
            return greedy
        n = candidates - 1
        drawn = self.generate(
            x, top_p=top_p, temperature=temperature, seed=seed, samples=n, **options
        )
        pools = [[greedy[i], *drawn[i * n : (i + 1) * n]] for i in range(len(x))]
        unique = sorted({c for pool in pools for c in pool})
        vectors = dict(zip(unique, encode_texts(unique), strict=True))
        best = []
        for i, pool in enumerate(pools):
            order, _ = rerank(np.stack([vectors[c] for c in pool]), x[i])
            best.append(pool[int(order[0])])
        return best

    def captions(
        self,
        embeddings: np.ndarray,
        options: CaptionOptions | None = None,
        encoder: Encoder | None = None,
    ) -> list[str]:
        """Captions of (N, D) embeddings by the search `options` choose; reranking asks
        `encoder` (the one that made the embeddings) to judge the candidates."""
        o = options or CaptionOptions()
        if o.rerank > 1:
            if encoder is None:
                raise InvalidInputError("reranking needs the encoder that made the embeddings")
            return self.generate_reranked(
                embeddings,
                encoder.encode_texts,
                candidates=o.rerank,
                top_p=o.top_p or 1.0,
                temperature=o.temperature,
                seed=o.seed,
                bf16=o.bf16,
                max_tokens=o.max_tokens,
                batch_size=o.batch_size,
            )
        return self.generate(
            embeddings,
            beams=o.beams,
            top_p=o.top_p,
            temperature=o.temperature,
            max_tokens=o.max_tokens,
            seed=o.seed,
            batch_size=o.batch_size,
            bf16=o.bf16,
        )

    def save(self, folder: str | os.PathLike) -> Path:
        """Write the captioner folder (atomically: a folder of the same name is replaced)."""
        out = Path(folder)
        tmp = out.with_name(f".{out.name}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        state = {k: v.detach().float().contiguous() for k, v in self.mapper.state_dict().items()}
        save_file(state, tmp / MAPPER_FILE)
        if self.cfg.lm_trained:
            self.lm.save_pretrained(tmp / "lm")
            self.tokenizer.save_pretrained(tmp / "lm")
        meta = {"format": FORMAT, "config": asdict(self.cfg), "lm": lms.describe(self.lm)}
        (tmp / CONFIG_FILE).write_text(json.dumps(meta, indent=2), encoding="utf-8")
        if out.exists():
            old = out.with_name(f".{out.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out)
        return out


def check_encoder(cfg: CaptionerConfig, model_id: str, name: str) -> None:
    """Refuse embeddings from any encoder but the one the captioner was trained on."""
    if model_id != cfg.encoder_id:
        raise InvalidInputError(
            f"the captioner was trained on embeddings of {cfg.encoder} ({cfg.encoder_id}), "
            f"not of {name} ({model_id}): leave `model` out or pass `model` {cfg.encoder}"
        )


def read_config(captioner: str | os.PathLike) -> CaptionerConfig:
    """The config of the captioner folder `captioner`, read without loading any model."""
    path = Path(captioner) / CONFIG_FILE
    if not path.is_file():
        raise InvalidInputError(
            f"`captioner` {captioner}: no {CONFIG_FILE} there; pass a folder written by "
            "`cliplens caption train`"
        )
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
        known = {f.name for f in fields(CaptionerConfig)}
        cfg = CaptionerConfig(**{k: v for k, v in meta["config"].items() if k in known})
    except (ValueError, KeyError, TypeError) as e:
        raise InvalidInputError(f"{path} is not a captioner config ({e})") from e
    if meta.get("format", 0) > FORMAT:
        raise InvalidInputError(f"{path} was written by a newer cliplens; upgrade to read it")
    return cfg


def load_captioner(captioner: str | os.PathLike) -> Captioner | ReferenceCaptioner:
    """The captioner saved in the folder `captioner` (what `train_captioner` writes), or a
    checkpoint file of the ClipCap authors (`coco_weights.pt`...: see
    `load_clipcap_checkpoint`): why, to caption images with it (`caption`) or score it
    (`evaluate_captioner`).

    >>> import cliplens
    >>> captioner = cliplens.load_captioner("run/captioner")
    >>> cliplens.caption(captioner, ["photo.jpg"])  # doctest: +SKIP
    """
    if reference.is_checkpoint_file(captioner):
        return reference.load_clipcap_checkpoint(captioner)
    folder = Path(captioner)
    cfg = read_config(folder)
    if cfg.lm_trained:
        lm, tokenizer = lms.load_lm(str(folder / "lm"))
    else:
        lm, tokenizer = lms.load_lm(cfg.lm)
    model = Captioner(cfg, lm, tokenizer)
    model.mapper.load_state_dict(load_file(folder / MAPPER_FILE))
    return model.eval()


def caption(
    captioner: Captioner | ReferenceCaptioner,
    images: Sequence[ImageSource],
    options: CaptionOptions | None = None,
    model: Encoder | None = None,
) -> list[str]:
    """A caption for each image (paths, open files, PIL images, arrays): why, a sentence
    about a photo from its CLIP embedding. `model` embeds the images (by default the
    encoder the captioner was trained on; any other is refused); `options` choose the
    search (greedy by default, beams, nucleus sampling, or the encoder's pick of several).

    >>> import cliplens
    >>> captioner = cliplens.load_captioner("run/captioner")
    >>> cliplens.caption(captioner, ["photo.jpg"])  # doctest: +SKIP
    """
    if isinstance(captioner, ReferenceCaptioner):
        encoder = model if model is not None else reference_encoder(captioner)
        return captioner.caption_images(encoder, images, options)
    encoder = model if model is not None else default_encoder(captioner.cfg)
    check_encoder(captioner.cfg, encoder.info.model_id, encoder.info.name)
    return captioner.captions(encoder.encode_images(images), options, encoder)


def lm_bf16(device: str | None = None, precision: str | None = None) -> bool:
    """Whether the LM decodes in bf16: where the encoder would (the fast choice on CPUs
    with bf16) on that device at that precision."""
    return choose_precision(choose_device(device), precision) is Precision.BF16


def default_encoder(cfg: CaptionerConfig) -> Encoder:
    """The encoder a captioner was trained on, loaded when something is encoded."""
    return ModelRef(cfg.encoder)


def reference_encoder(
    captioner: ReferenceCaptioner, device: str | None = None, precision: str | None = None
) -> Encoder:
    """The CLIP an authors' checkpoint was trained on (ViT-B/32, or RN50x4 for 640-wide
    embeddings), in fp32 unless `precision` says otherwise, as their scripts ran it."""
    name = captioner.cfg.encoder
    if name is None:
        raise InvalidInputError(
            f"`captioner` {captioner.source} takes {captioner.cfg.embed_dim}-wide embeddings of "
            "no CLIP the authors used: pass the CLIP it was trained on as `model`"
        )
    return ModelRef(name, device=device, precision=precision or "fp32")
