"""Contrastive losses over a batch of paired image and text embeddings.

- `clip_loss`: CLIP's symmetric InfoNCE. Row i of the similarity matrix should pick column
  i (image to text) and column i should pick row i (text to image); the loss is the mean
  of the two cross-entropies. `logit_scale` is exp(t) for a learnable temperature t, which
  callers clamp at 100 as CLIP does.
- `siglip_loss`: SigLIP's pairwise sigmoid loss, every pair a binary decision (matching
  or not), with a learnable scale and bias; it needs no softmax over the batch.
- `nt_xent_loss`: SimCLR's NT-Xent over 2N embeddings, two views of each of N items, as
  the robust encoder's paper trains with (Ravula et al. 2021, `simclr`).

They take L2-normalised (N, D) features. `sharded_loss` is the form for several
processes: each sees the whole global batch as negatives.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F  # noqa: N812

MAX_LOGIT_SCALE = 100.0
# the contrastive loss a CLIP trains with: CLIP's softmax InfoNCE, or SigLIP's sigmoid
Loss = Literal["clip", "siglip"]


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


def nt_xent_loss(first: torch.Tensor, second: torch.Tensor, temperature: float) -> torch.Tensor:
    """SimCLR's NT-Xent over the 2N rows first[0], second[0], first[1], second[1], ...:
    each row's positive is its partner, its negatives the other 2N - 2 rows of both sides;
    the mean over all 2N anchors, at a fixed `temperature`. Rows are L2-normalised here."""
    n = len(first)
    rows = F.normalize(torch.stack([first, second], dim=1).reshape(2 * n, -1), dim=-1)
    logits = rows @ rows.T / temperature
    self_pairs = torch.eye(2 * n, dtype=torch.bool, device=rows.device)
    logits = logits.masked_fill(self_pairs, float("-inf"))
    partners = torch.arange(2 * n, device=rows.device) ^ 1  # 0 <-> 1, 2 <-> 3, ...
    return F.cross_entropy(logits, partners)


def sharded_loss(
    kind: Loss,
    image: torch.Tensor,
    text: torch.Tensor,
    logit_scale: torch.Tensor,
    logit_bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """This process's share of the global-batch loss (CLIP or SigLIP).

    Every process holds its own rows of the global batch. Features are gathered with their
    gradients (so a row used as another process's negative still learns from it), each
    process scores its own rows against everything, and the shares add up to the loss of
    one process holding the whole batch; summing gradients across processes then gives
    exactly that process's gradients. In a single process it is the plain loss.
    """
    all_image, all_text, offset = _gather_with_grad(image), _gather_with_grad(text), _offset(image)
    n, total = len(image), len(all_image)
    rows = torch.arange(n, device=image.device) + offset
    if kind == "siglip":
        logits = logit_scale * image @ all_text.T + logit_bias
        signs = -torch.ones_like(logits)
        signs[torch.arange(n), rows] = 1
        return -F.logsigmoid(signs * logits).sum() / total
    per_image = F.cross_entropy(logit_scale * image @ all_text.T, rows, reduction="sum")
    per_text = F.cross_entropy(logit_scale * text @ all_image.T, rows, reduction="sum")
    return (per_image + per_text) / (2 * total)


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _offset(x: torch.Tensor) -> int:
    rank, _ = _world()
    return rank * len(x)


def _gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Every process's `x`, stacked in rank order; the backward sums each process's
    gradients of the gathered rows into its own (a reduce-scatter)."""
    if not (dist.is_available() and dist.is_initialized()):
        return x
    # only in a process group: the functional collectives need a build with distributed
    # support. torch.distributed.nn.functional.all_gather is deprecated (torch 2.14)
    from torch.distributed._functional_collectives import all_gather_single_autograd

    return all_gather_single_autograd(x.contiguous(), 0, dist.group.WORLD)
