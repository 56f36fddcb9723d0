"""CLIP-IQA's image side as published (Wang et al. 2023, "Exploring CLIP for Assessing the
Look and Feel of Images"; the reference is pyiqa's `clipiqa_arch.py`).

The paper scores the whole image, not the 224 px centre crop CLIP was trained on: noise,
blur and JPEG blocks vanish when a photo is shrunk 13x. An OpenAI-layout ResNet (open_clip's
`ModifiedResNet`: RN50, RN101, RN50x4...) takes any size because its only positional
input is the attention pool's positional embedding, learnt for a 7x7 grid; the paper drops
it. So here: the image as decoded (its longest side brought down to `max_side` when it is
larger; images within it are untouched), normalised with the model's own mean and std,
through the convolutional trunk, then the attention pool without its positional embedding.

ViTs have no such mode: their position embeddings are added to every patch token before
the first block and learnt for one grid, so without them the network sees a bag of
patches, and interpolating them to another grid is not what the paper measured.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from open_clip.modified_resnet import AttentionPool2d, ModifiedResNet
from PIL import Image
from torch.nn import functional

from cliplens.decode_ahead import decode_ahead, thread_pool
from cliplens.errors import ImageError, InvalidInputError
from cliplens.images import ImageSource, open_image
from cliplens.models.encoder import ImageEncoding
from cliplens.models.torch_encoder import l2_normalize
from cliplens.progress import progress_bar

# the trunk halves the size five times: under 32 px a side there is no feature map left
MIN_SIDE = 32
_BATCH = 8  # images decoded ahead at once; those of one size go through together,
_BATCH_PIXELS = 4_000_000  # up to this many pixels a forward pass (activations: ~1 GB, RN50)


def whole_image_tower(model: Any) -> ModifiedResNet | None:
    """The model's image tower if it is an OpenAI-layout ResNet with an attention pool."""
    load = getattr(model, "load", None)
    if load is None:
        return None
    try:
        tower = load().image_tower()
    except InvalidInputError:  # a backend without a trainable tower (the offline model)
        return None
    if isinstance(tower, ModifiedResNet) and isinstance(tower.attnpool, AttentionPool2d):
        return tower
    return None


def fit_side(image: Image.Image, max_side: int) -> Image.Image:
    """`image` with its longest side at most `max_side` (Pillow's antialiased bicubic) and
    its shortest at least `MIN_SIDE`; an image within both is returned as it is."""
    w, h = image.size
    factor = min(1.0, max_side / max(w, h))
    factor = max(factor, MIN_SIDE / min(w, h))
    if factor == 1.0:
        return image
    size = (max(MIN_SIDE, round(w * factor)), max(MIN_SIDE, round(h * factor)))
    return image.resize(size, Image.Resampling.BICUBIC)


def whole_pixels(image: Image.Image, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """An RGB image -> float32 CHW, scaled to [0, 1] and normalised (no resize, no crop)."""
    x = np.asarray(image, dtype=np.float32) * np.float32(1 / 255.0)
    x = (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return np.ascontiguousarray(x.transpose(2, 0, 1))


def embed_whole(tower: ModifiedResNet, pixels: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) normalised pixels of any size -> (B, D) unnormalised embeddings: the
    trunk, then the attention pool without its positional embedding."""
    x = pixels.to(tower.conv1.weight.dtype)
    x = tower.stem(x)
    x = tower.layer4(tower.layer3(tower.layer2(tower.layer1(x))))
    pool = tower.attnpool
    tokens = x.flatten(2).permute(2, 0, 1)  # (HW, B, C)
    tokens = torch.cat([tokens.mean(dim=0, keepdim=True), tokens], dim=0)
    out, _ = functional.multi_head_attention_forward(
        query=tokens[:1],  # only the pooled token is read: the others' outputs are unused
        key=tokens,
        value=tokens,
        embed_dim_to_check=tokens.shape[-1],
        num_heads=pool.num_heads,
        q_proj_weight=pool.q_proj.weight,
        k_proj_weight=pool.k_proj.weight,
        v_proj_weight=pool.v_proj.weight,
        in_proj_weight=None,
        in_proj_bias=torch.cat([pool.q_proj.bias, pool.k_proj.bias, pool.v_proj.bias]),
        bias_k=None,
        bias_v=None,
        add_zero_attn=False,
        dropout_p=0.0,
        out_proj_weight=pool.c_proj.weight,
        out_proj_bias=pool.c_proj.bias,
        use_separate_proj_weight=True,
        training=False,
        need_weights=False,
    )
    return out[0]


def encode_whole(
    model: Any,
    items: Sequence[ImageSource],
    max_side: int,
    progress: bool = False,
    max_megapixels: float | None = None,
) -> ImageEncoding:
    """Embed whole images as CLIP-IQA does, lenient: unreadable ones are reported."""
    tower = whole_image_tower(model)
    if tower is None:
        raise InvalidInputError(f"model {model.info.name}: not an OpenAI-layout ResNet")
    prep = model.info.preprocessing
    device = next(tower.parameters()).device

    def load(item: ImageSource) -> np.ndarray | ImageError:
        try:
            # JPEGs decode at reduced scale only while the short side stays >= max_side
            image = open_image(item, min_size=max_side, max_megapixels=max_megapixels)
        except ImageError as e:
            return e
        return whole_pixels(fit_side(image, max_side), prep.mean, prep.std)

    rows: dict[int, np.ndarray] = {}
    failures: list[ImageError] = []
    with (
        progress_bar(len(items), "encoding whole images", progress) as advance,
        thread_pool(getattr(model.load(), "decode_workers", 1)) as pool,
    ):
        for start, decoded in decode_ahead(items, load, _BATCH, pool):
            by_shape: dict[tuple[int, ...], list[int]] = {}
            for offset, value in enumerate(decoded):
                if isinstance(value, ImageError):
                    failures.append(value)
                else:
                    by_shape.setdefault(value.shape, []).append(offset)
            for shape, same in by_shape.items():
                step = max(1, _BATCH_PIXELS // (shape[1] * shape[2]))
                for offsets in (same[i : i + step] for i in range(0, len(same), step)):
                    batch = torch.from_numpy(np.stack([decoded[i] for i in offsets]))
                    with torch.inference_mode():
                        vectors = l2_normalize(embed_whole(tower, batch.to(device)))
                    rows.update(zip((start + i for i in offsets), vectors, strict=True))
            advance(len(decoded))
    kept = sorted(rows)
    dim = model.info.dim
    vectors = np.stack([rows[i] for i in kept]) if kept else np.zeros((0, dim), np.float32)
    return ImageEncoding(vectors=vectors, kept=kept, failures=failures)
