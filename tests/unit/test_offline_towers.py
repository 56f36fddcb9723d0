"""The offline model's towers as a CLIP to fine-tune (`train clip --init offline`)."""

from __future__ import annotations

import numpy as np
import torch

from cliplens.datasets.shapes import sample, write_shapes
from cliplens.models.offline import build_towers_clip, towers_config
from cliplens.train.clip import ClipTrainConfig, train_clip
from cliplens.train.data import read_pairs


def test_image_tower_starts_as_the_offline_mobilenet(offline):
    model, tokenizer = build_towers_clip(towers_config(), pretrained=True)
    model.eval()
    pixels = torch.from_numpy(np.stack([offline.load_pixels(sample(0, i).image) for i in range(3)]))
    with torch.no_grad():
        ours = model.visual.trunk(pixels)  # pooled, before the new projection
        theirs = offline._pooled_features(pixels)
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)
    ids = tokenizer(["a red circle"])
    assert ids.shape == (1, 64) and int(ids[0, 0]) == 101  # MiniLM's [CLS]


def test_fine_tuned_towers_save_and_load_for_every_task(tmp_path, capsys):
    from cliplens import load_model

    write_shapes(tmp_path / "s", n=12, seed=0, size=32, val_fraction=0.0, heldout=0)
    pairs = read_pairs(tmp_path / "s" / "train.jsonl")
    cfg = ClipTrainConfig(
        model_cfg={},
        init="offline",
        epochs=1,
        batch_size=4,
        lr=1e-5,
        warmup_steps=1,
        precision="bf16",
    )
    result = train_clip(cfg, pairs, tmp_path / "run", max_steps=2)
    assert result.steps == 2 and np.isfinite(result.losses).all()
    model = load_model(f"local:{result.model_path}", device="cpu", precision="fp32")
    assert model.info.arch == "offline-towers" and model.info.dim == 256
    # what loads is what was trained: every tensor of the run's last checkpoint
    trained = torch.load(tmp_path / "run" / "last.pt", weights_only=False)["model"]
    loaded = model.model.state_dict()
    assert sorted(loaded) == sorted(trained)
    for name, value in trained.items():
        assert torch.equal(loaded[name].float(), value.float()), name
    img = model.encode_images([pairs[0].image])
    txt = model.encode_texts(["a red circle", "a blue square"])
    assert img.shape == (1, 256) and txt.shape == (2, 256)
    assert np.allclose(np.linalg.norm(txt, axis=1), 1, atol=1e-4)


def test_a_siglip_fine_tune_of_the_towers_is_built_with_its_bias():
    """The saved config of a SigLIP fine-tune records its bias; the towers are built with
    the parameter, so its weights load (they would not without it)."""
    plain, _ = build_towers_clip(towers_config(), pretrained=False)
    assert plain.logit_bias is None
    biased, _ = build_towers_clip(towers_config() | {"init_logit_bias": -10.0}, pretrained=False)
    assert biased.logit_bias.item() == -10.0
    biased.load_state_dict(plain.state_dict() | {"logit_bias": torch.tensor([-7.0])})
    assert biased.logit_bias.item() == -7.0
