"""The robust encoder's paper loss (NT-Xent, Ravula et al. 2021) against a computation
written from the authors' `criterion` (Sriram-Ravula/Contrastive-Inversion,
noisy_clip_dataparallel.py, loss_type "simclr"), and the gather the sharded CLIP loss uses
in a process group."""

from __future__ import annotations

import socket
import warnings

import numpy as np
import pytest
import torch
import torch.distributed as dist
from PIL import Image

from cliplens.datasets.shapes import sample
from cliplens.train.loss import _gather_with_grad, clip_loss, nt_xent_loss, sharded_loss
from cliplens.train.robust import RobustConfig, corrupted_crops, train_robust


def reference_simclr(clean: torch.Tensor, noisy: torch.Tensor, tau: float) -> torch.Tensor:
    """The authors' steps: interleave the two sides into 2N rows, cosine similarity of
    every pair, exp(sim / tau), the diagonal masked out of the denominator, the partner of
    each even row (diagonal +1) and of each odd row (diagonal -1), summed, halved, / N."""
    bsz = clean.shape[0]
    full = torch.cat([clean.unsqueeze(1), noisy.unsqueeze(1)], dim=1).view(2 * bsz, 1, -1)
    t1 = full.expand(2 * bsz, 2 * bsz, -1)
    t2 = full.permute(1, 0, 2).expand(2 * bsz, 2 * bsz, -1)
    sim = torch.nn.CosineSimilarity(dim=-1)(t1, t2)
    exp_sim = torch.exp(sim / tau)
    mask = torch.ones_like(exp_sim) - torch.eye(2 * bsz, dtype=exp_sim.dtype)
    logmat = -torch.log(exp_sim) + torch.log(torch.sum(mask * exp_sim, 1))
    part1 = torch.sum(torch.diag(logmat, diagonal=1)[np.arange(0, 2 * bsz, 2)])
    part2 = torch.sum(torch.diag(logmat, diagonal=-1)[np.arange(0, 2 * bsz, 2)])
    return (part1 + part2) / 2 / bsz


def test_nt_xent_is_the_authors_simclr_loss_with_its_gradients():
    g = torch.Generator().manual_seed(0)
    for n, d in ((2, 3), (8, 16), (33, 64)):
        clean = torch.randn(n, d, generator=g, dtype=torch.float64) * 3  # not unit: both normalise
        noisy = (clean + torch.randn(n, d, generator=g, dtype=torch.float64)).requires_grad_()
        ours = nt_xent_loss(clean, noisy, 0.1)
        theirs = reference_simclr(clean, noisy, 0.1)
        assert abs(ours.item() - theirs.item()) < 1e-6, (n, d)
        (g_ours,) = torch.autograd.grad(ours, noisy)
        (g_theirs,) = torch.autograd.grad(theirs, noisy)
        torch.testing.assert_close(g_ours, g_theirs, atol=1e-9, rtol=1e-6)
    # the same-side negatives count: the clip-style loss (student against teacher only),
    # with 2N - 2 negatives fewer, is another number (unrelated views: log 65 against log 33)
    far = torch.nn.functional.normalize(torch.randn(2, n, d, generator=g), dim=-1)
    plain = clip_loss(far[1], far[0], torch.tensor(10.0))
    assert nt_xent_loss(far[0], far[1], 0.1).item() - plain.item() > 0.4


@pytest.fixture(scope="module")
def images():
    return [Image.fromarray(sample(1, i, size=32).image) for i in range(48)]


def _top1_to_clean(encoder, teacher, images, kind):
    rngs = [np.random.default_rng(i) for i in range(len(images))]
    bad = corrupted_crops(teacher, images, [kind] * len(images), [5] * len(images), rngs)
    clean = corrupted_crops(teacher, images, [None] * len(images), [0] * len(images), rngs)
    sims = encoder.encode_crops(bad) @ teacher.encode_crops(clean).T
    return float(np.mean(sims.argmax(1) == np.arange(len(sims))))


def test_training_with_the_papers_loss_moves_the_student_to_the_clean_images(
    tiny, images, tmp_path
):
    cfg = RobustConfig(
        corruptions=("noise",), severities=(5,), epochs=4, batch_size=16, lr=2e-3, warmup_steps=1
    )
    assert (cfg.loss, cfg.temperature, cfg.alignment) == ("simclr", 0.1, 0.0)
    result = train_robust(tiny, images, tmp_path, cfg)
    assert result.steps == 4 * 3
    assert np.mean(result.losses[-3:]) < np.mean(result.losses[:3]) - 0.2
    before = _top1_to_clean(tiny, tiny, images, "noise")
    after = _top1_to_clean(result.student, tiny, images, "noise")
    assert after > before + 0.1
    with pytest.raises(ValueError, match="`loss` infonce: simclr or clip-align"):
        RobustConfig(loss="infonce")  # type: ignore[arg-type]


@pytest.fixture
def one_process_group():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_gather_in_a_process_group_warns_nothing_and_keeps_the_gradients(one_process_group):
    g = torch.Generator().manual_seed(1)
    image = torch.nn.functional.normalize(torch.randn(6, 8, generator=g), dim=-1)
    text = torch.nn.functional.normalize(torch.randn(6, 8, generator=g), dim=-1)
    scale = torch.tensor(20.0)
    a, b = image.clone().requires_grad_(), text.clone().requires_grad_()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the deprecated torch.distributed.nn gather warned
        gathered = _gather_with_grad(a)
        assert gathered is not a  # the collective ran
        loss = sharded_loss("clip", a, b, scale)
        loss.backward()
    torch.testing.assert_close(gathered.detach(), image)
    x, y = image.clone().requires_grad_(), text.clone().requires_grad_()
    plain = clip_loss(x, y, scale)
    plain.backward()
    torch.testing.assert_close(loss.detach(), plain.detach())
    torch.testing.assert_close(a.grad, x.grad)
    torch.testing.assert_close(b.grad, y.grad)
