"""A VQGAN from taming-transformers as the generator of CLIP-guided synthesis (CLIP+VQGAN).

The user supplies the model's config (YAML) and its checkpoint (a Lightning .ckpt), as
published with taming-transformers (e.g. vqgan_imagenet_f16_16384). The autoencoder is
built from taming's own modules (Encoder, Decoder, the quantizers), so checkpoint keys
match by construction; taming's LightningModule is not used: it imports pytorch_lightning
APIs that Lightning 2 removed, and builds a perceptual loss that downloads VGG weights.

The image is a latent grid z, snapped to the nearest codebook entry on each forward pass
with a straight-through gradient, decoded, and clamped to [0, 1] with a gradient that still
pushes out-of-range pixels back in (VQGAN-CLIP's recipe).
"""

from __future__ import annotations

import contextlib
import io
import os
import pickle
import re
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from cliplens.errors import InvalidInputError
from cliplens.generation.image_budget import (
    IMAGE_BYTES_PER_PIXEL,
    available_memory,
    check_memory,
    check_size,
)
from cliplens.textfile import read_text

# the model targets whose weights this can load, and the key prefix of their autoencoder
_TARGETS = {
    "taming.models.vqgan.VQModel": ("vq", ""),
    "taming.models.vqgan.GumbelVQ": ("gumbel", ""),
    "taming.models.cond_transformer.Net2NetTransformer": (None, "first_stage_model."),
}
INSTALL_HINT = "pip install --no-deps taming-transformers-rom1504 && pip install einops"


def _taming():
    # optional, installed by hand (INSTALL_HINT): only when a VQGAN is built
    try:
        from taming.modules.diffusionmodules import model as ae
        from taming.modules.vqvae import quantize
    except ImportError as e:
        raise InvalidInputError(f"a VQGAN needs taming-transformers ({e}); {INSTALL_HINT}") from e
    return ae, quantize


class VQGAN(nn.Module):
    """Encoder, quantizer and decoder of a taming-transformers VQModel or GumbelVQ, without
    the training loss. Attribute names follow taming's, so its state dicts load as they are."""

    def __init__(self, kind: str, ddconfig: dict, n_embed: int, embed_dim: int) -> None:
        super().__init__()
        ae, quantize = _taming()
        self.kind = kind
        self.encoder = ae.Encoder(**ddconfig)
        with contextlib.redirect_stdout(io.StringIO()):  # it prints the latent's shape
            self.decoder = ae.Decoder(**ddconfig)
        z = ddconfig["z_channels"]
        if kind == "gumbel":
            self.quantize = quantize.GumbelQuantize(z, embed_dim, n_embed=n_embed)
        else:
            self.quantize = quantize.VectorQuantizer2(n_embed, embed_dim, beta=0.25)
        self.quant_conv = nn.Conv2d(z, embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(embed_dim, z, 1)
        mult = tuple(ddconfig.get("ch_mult", (1, 2, 4, 8)))
        self.factor = 2 ** (len(mult) - 1)
        # memory per output pixel of decoding with gradients: each ResNet block keeps about
        # 8 activations of its width for backward, at its level's resolution (1/4 per level)
        blocks = int(ddconfig.get("num_res_blocks", 2)) + 1
        width = int(ddconfig.get("ch", 128))
        self.bytes_per_pixel = sum(4 * 8 * blocks * width * m / 4**i for i, m in enumerate(mult))

    @property
    def codebook(self) -> torch.Tensor:
        """(n_embed, embed_dim)"""
        q = self.quantize
        return q.embed.weight if self.kind == "gumbel" else q.embedding.weight

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] -> quantised latents (B, embed_dim, H/f, W/f)."""
        return self.quantize(self.quant_conv(self.encoder(x)))[0]

    def decode(self, z_q: torch.Tensor) -> torch.Tensor:
        """Quantised latents -> images, roughly in [-1, 1]."""
        return self.decoder(self.post_quant_conv(z_q))


def read_vqgan_config(path: str | os.PathLike) -> tuple[str, dict[str, Any], str]:
    """(kind, params, checkpoint key prefix) of the autoencoder in a taming-transformers
    YAML config."""
    p = Path(path)
    text = read_text(p, "VQGAN config", "a taming-transformers YAML config")
    try:
        cfg = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise InvalidInputError(f"VQGAN config {p}: cannot read it ({e})") from e
    model = cfg.get("model") if isinstance(cfg, dict) else None
    target = model.get("target") if isinstance(model, dict) else None
    if target not in _TARGETS:
        known = ", ".join(_TARGETS)
        raise InvalidInputError(
            f"VQGAN config {p}: model.target is {target!r}; give the config of one of {known}"
        )
    params = model.get("params") or {}
    prefix = _TARGETS[target][1]
    if _TARGETS[target][0] is None:  # a transformer: its first stage is the VQGAN
        first = params.get("first_stage_config") or {}
        target, params = first.get("target"), first.get("params") or {}
        if target not in _TARGETS or _TARGETS[target][0] is None:
            raise InvalidInputError(f"VQGAN config {p}: its first stage is {target!r}, not a VQGAN")
    missing = [k for k in ("ddconfig", "n_embed", "embed_dim") if k not in params]
    if missing:
        raise InvalidInputError(f"VQGAN config {p}: model.params lacks {', '.join(missing)}")
    return _TARGETS[target][0], params, prefix


def load_vqgan(
    config: str | os.PathLike, checkpoint: str | os.PathLike, trust: bool = False
) -> VQGAN:
    """The autoencoder of a taming-transformers config + checkpoint, frozen, on the CPU.

    Checkpoints load with torch's weights-only unpickler. Lightning checkpoints may also
    hold pickled training objects, which that refuses; `trust=True` loads them with the full
    unpickler, which runs code from the file: only for checkpoints from a trusted source."""
    kind, params, prefix = read_vqgan_config(config)
    model = VQGAN(kind, params["ddconfig"], int(params["n_embed"]), int(params["embed_dim"]))
    ckpt = Path(checkpoint)
    if not ckpt.is_file():
        raise InvalidInputError(f"VQGAN checkpoint {ckpt}: no such file")
    try:
        state = torch.load(ckpt, map_location="cpu", weights_only=not trust)
    except pickle.UnpicklingError as e:
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
        if not found:  # not a checkpoint at all
            raise InvalidInputError(f"VQGAN checkpoint {ckpt}: cannot read it ({e})") from e
        raise InvalidInputError(
            f"VQGAN checkpoint {ckpt} holds pickled objects besides weights ({found[1]}); "
            "if you trust its source, pass `trust`"
        ) from e
    except (OSError, RuntimeError, EOFError) as e:
        raise InvalidInputError(f"VQGAN checkpoint {ckpt}: cannot read it ({e})") from e
    weights = state.get("state_dict", state) if isinstance(state, dict) else None
    if not isinstance(weights, dict):
        raise InvalidInputError(f"VQGAN checkpoint {ckpt}: no state_dict in it")
    weights = {k[len(prefix) :]: v for k, v in weights.items() if k.startswith(prefix)}
    mismatch = f"VQGAN checkpoint {ckpt} does not match config {config}"
    hint = "give the config published with this checkpoint"
    try:
        missing, _unused = model.load_state_dict(weights, strict=False)  # the loss's are unused
    except RuntimeError as e:  # shapes differ
        detail = next((x.strip() for x in str(e).splitlines() if "size mismatch" in x), str(e))
        raise InvalidInputError(f"{mismatch}: {detail}; {hint}") from e
    if missing:
        raise InvalidInputError(
            f"{mismatch}: {len(missing)} weights missing (e.g. {missing[0]}); {hint}"
        )
    return model.eval().requires_grad_(False)


class _ClampWithGrad(torch.autograd.Function):
    """clamp(x, 0, 1) whose gradient still flows where it moves x back into range."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x)
        return x.clamp(0, 1)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        (x,) = ctx.saved_tensors
        inward = grad * (x - x.clamp(0, 1)) >= 0  # descent moves x by -grad
        return grad * inward


class VQGANImage(nn.Module):
    """An image as a VQGAN latent grid (the generator interface: forward() -> (1, 3, H, W))."""

    def __init__(self, vqgan: VQGAN, size: int, seed: int = 0) -> None:
        super().__init__()
        f = vqgan.factor
        if size < f or size % f:
            raise InvalidInputError(f"`size` {size}: use a multiple of {f} for this VQGAN")
        check_size(size)
        self.bytes_per_pixel = IMAGE_BYTES_PER_PIXEL + vqgan.bytes_per_pixel
        check_memory(size, self.bytes_per_pixel, available_memory(), what="the VQGAN's decoding")
        self.size, self.side = size, size // f
        self._vqgan = [vqgan]  # frozen and not a parameter of this module
        codebook = vqgan.codebook.detach()
        rng = torch.Generator().manual_seed(seed)
        codes = torch.randint(codebook.shape[0], (self.side * self.side,), generator=rng)
        self.z = nn.Parameter(self._grid(codebook[codes]))

    def _grid(self, vectors: torch.Tensor) -> torch.Tensor:
        return vectors.T.reshape(1, -1, self.side, self.side).contiguous()

    def quantised(self) -> torch.Tensor:
        """z snapped to its nearest codebook entries, with a straight-through gradient."""
        codebook = self._vqgan[0].codebook
        flat = self.z.flatten(2)[0].T  # (side*side, embed_dim)
        idx = torch.cdist(flat, codebook).argmin(dim=1)
        z_q = self._grid(codebook[idx])
        return self.z + (z_q - self.z).detach()

    def forward(self) -> torch.Tensor:
        x = self._vqgan[0].decode(self.quantised())
        return _ClampWithGrad.apply((x + 1) / 2)

    @torch.no_grad()
    def init_from(self, image: torch.Tensor) -> None:
        """Start from an image (1, 3, size, size) in [0, 1]."""
        self.z.copy_(self._vqgan[0].encode(image * 2 - 1))
