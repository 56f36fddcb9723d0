"""The methods cliplens shares with a reference implementation give its numbers, on the
same random weights and inputs: zero-shot classifiers (open_clip's
build_zero_shot_classifier), the preprocessing (open_clip's eval transform), the CLIP and
SigLIP losses (open_clip's ClipLoss and SigLipLoss), and moderation's special-care rule
(the Stable Diffusion safety checker's, written here from diffusers'
StableDiffusionSafetyChecker.forward_onnx)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cliplens.images import open_image
from cliplens.tasks.classify import load_templates, zero_shot_weights
from cliplens.tasks.moderate import Moderator
from cliplens.tasks.policy import Policy
from cliplens.train.loss import clip_loss, siglip_loss

LABELS = ["cat", "coffee mug", "rocket", "red_panda", "astronaut", "horse"]


def test_zero_shot_weights_equal_open_clips_with_the_80_templates(tiny, tiny_model_dir):
    from open_clip import get_tokenizer
    from open_clip.zero_shot_classifier import build_zero_shot_classifier
    from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES

    templates = load_templates("imagenet")
    assert templates == [t("{}") for t in OPENAI_IMAGENET_TEMPLATES]
    model = tiny.model.float().eval()
    tokenizer = get_tokenizer("ViT-B-32", context_length=model.context_length)
    with torch.no_grad():
        theirs = build_zero_shot_classifier(
            model, tokenizer, [x.replace("_", " ") for x in LABELS], OPENAI_IMAGENET_TEMPLATES
        )
    ours = zero_shot_weights(tiny, LABELS, templates)
    assert ours.shape == (len(LABELS), theirs.shape[0])
    np.testing.assert_allclose(ours, theirs.numpy().T, atol=1e-6)


def test_preprocessing_equals_open_clips_eval_transform_on_a_whole_decode(tiny, photos):
    from open_clip import image_transform
    from PIL import Image

    prep = tiny.info.preprocessing
    theirs = image_transform(prep.image_size, is_train=False, mean=prep.mean, std=prep.std)
    for f in sorted(photos.glob("*.jpg")):
        expected = theirs(Image.open(f).convert("RGB")).numpy()
        np.testing.assert_allclose(prep(open_image(f)), expected, atol=1e-6, err_msg=f.name)


@pytest.mark.parametrize("n", [1, 7, 64])
def test_clip_and_siglip_losses_equal_open_clips(n):
    from open_clip.loss import ClipLoss, SigLipLoss

    g = torch.Generator().manual_seed(n)
    image = torch.nn.functional.normalize(torch.randn(n, 32, generator=g, dtype=torch.float64))
    text = torch.nn.functional.normalize(torch.randn(n, 32, generator=g, dtype=torch.float64))
    scale, bias = torch.tensor(14.3, dtype=torch.float64), torch.tensor(-10.0, dtype=torch.float64)
    assert float(clip_loss(image, text, scale)) == pytest.approx(
        float(ClipLoss()(image, text, scale)), abs=1e-12
    )
    assert float(siglip_loss(image, text, scale, bias)) == pytest.approx(
        float(SigLipLoss()(image, text, scale, bias)), abs=1e-12
    )


def _safety_checker(images, concepts, concept_w, special, special_w):
    """diffusers' vectorised safety checker on normalised embeddings: a special-care hit
    (cos > its weight) lowers every concept's weight by 0.01; flagged if any concept's
    cos exceeds its (lowered) weight."""
    special_scores = images @ special.T - special_w
    special_care = np.any(special_scores > 0, axis=1)
    concept_scores = images @ concepts.T - concept_w + 0.01 * special_care[:, None]
    return np.any(concept_scores > 0, axis=1)


def test_special_care_rule_equals_the_safety_checkers():
    rng = np.random.default_rng(0)
    d, n = 16, 20_000

    def unit(k):
        x = rng.standard_normal((k, d))
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    concepts, special, images = unit(17), unit(3), unit(n)
    # thresholds where a sizeable share of images falls within 0.01 of them
    concept_w = rng.uniform(0.55, 0.65, 17)
    special_w = rng.uniform(0.45, 0.55, 3)
    policy = Policy(name="sd", categories=(), adjustment=0.01)
    moderator = Moderator(
        policy=policy,
        model_id="random",
        concept_vectors=concepts,
        thresholds=concept_w,
        categories=["nsfw"] * 17,
        labels=[f"concept{i}" for i in range(17)],
        special_vectors=special,
        special_thresholds=special_w,
        special_labels=[f"special{i}" for i in range(3)],
    )
    verdicts = moderator.judge([str(i) for i in range(n)], images)
    ours = np.array([v.flagged for v in verdicts])
    theirs = _safety_checker(images, concepts, concept_w, special, special_w)
    near = np.any(np.abs(images @ concepts.T - concept_w) < 0.01, axis=1)
    special_hits = np.array([v.special_care is not None for v in verdicts])
    assert theirs.sum() > 100 and special_hits.sum() > 100 and near.sum() > 100
    assert (ours != theirs).sum() == 0
    # the comparison can fail: without the adjustment, near-threshold images disagree
    moderator.policy = Policy(name="sd", categories=(), adjustment=0.0)
    unadjusted = np.array([v.flagged for v in moderator.judge([""] * n, images)])
    assert (unadjusted != theirs).sum() > 10
