"""Contrastive losses over a batch of paired image and text embeddings.

- `clip_loss`: CLIP's symmetric InfoNCE. Row i of the similarity matrix should pick column
  i (image to text) and column i should pick row i (text to image); the loss is the mean
  of the two cross-entropies. `logit_scale` is exp(t) for a learnable temperature t, which
  callers clamp at 100 as CLIP does.
- `siglip_loss`: SigLIP's pairwise sigmoid loss, every pair a binary decision (matching
  or not), with a learnable scale and bias; it needs no softmax over the batch.

Both take L2-normalised (N, D) features. With features gathered from every process
(`gather_features`), each process sees the whole global batch as negatives.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F  # noqa: N812

MAX_LOGIT_SCALE = 100.0


def clip_loss(image: torch.Tensor, text: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    logits = logit_scale * image @ text.T
    labels = torch.arange(len(image), device=image.device)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


def siglip_loss(
    image: torch.Tensor, text: torch.Tensor, logit_scale: torch.Tensor, logit_bias: torch.Tensor
) -> torch.Tensor:
    logits = logit_scale * image @ text.T + logit_bias
    signs = 2 * torch.eye(len(image), device=image.device) - 1  # +1 on the diagonal, -1 off it
    return -F.logsigmoid(signs * logits).sum() / len(image)


def gather_features(x: torch.Tensor) -> torch.Tensor:
    """Concatenate `x` from every process, keeping this process's rows differentiable."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    parts = [torch.zeros_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.detach())
    parts[dist.get_rank()] = x
    return torch.cat(parts)
