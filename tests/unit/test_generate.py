"""CLIP-guided generation: prompt syntax, the Fourier image, the loss, a step, the seed."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from cliplens.errors import InvalidInputError
from cliplens.generation.generate import (
    Cutouts,
    FourierImage,
    GenerateConfig,
    Prompt,
    generate,
    parse_prompts,
    prompt_loss,
    spherical_distance,
    total_variation,
)


def test_parse_prompts_weights_and_text_colons():
    assert parse_prompts("a red circle:1 | blurry:-0.5") == [
        Prompt("a red circle", 1.0),
        Prompt("blurry", -0.5),
    ]
    assert parse_prompts("a blue square") == [Prompt("a blue square", 1.0)]
    assert parse_prompts("a 16:9 poster:2") == [Prompt("a 16:9 poster", 2.0)]
    assert parse_prompts("ratio 16:9 poster") == [Prompt("ratio 16:9 poster", 1.0)]


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("a red circle | ", "empty part"),
        (":2 | a star", "weight without text"),
        ("blurry:-1", "positive weight"),
        ("a star:nan", "finite"),
    ],
)
def test_parse_prompts_errors(spec, message):
    with pytest.raises(InvalidInputError, match=message):
        parse_prompts(spec)


def test_fourier_image_range_shape_and_inverse():
    gen = FourierImage(32)
    with torch.no_grad():
        image = gen()
    assert image.shape == (1, 3, 32, 32)
    assert float(image.min()) > 0 and float(image.max()) < 1
    target = torch.rand(1, 3, 32, 32) * 0.8 + 0.1
    gen.init_from(target)
    with torch.no_grad():
        assert torch.allclose(gen(), target, atol=1e-4)
    with pytest.raises(InvalidInputError, match="`size` 8"):
        FourierImage(8)


def test_total_variation_penalty_smooths():
    flat = torch.full((1, 3, 16, 16), 0.3)
    assert float(total_variation(flat)) == 0.0
    stripes = flat.clone()
    stripes[..., ::2] = 0.7
    assert float(total_variation(stripes)) == pytest.approx(0.4, abs=1e-6)


def test_spherical_distance():
    e1, e2 = torch.tensor([[1.0, 0.0]]), torch.tensor([0.0, 1.0])
    assert float(spherical_distance(e1, e1[0])) == pytest.approx(0.0, abs=1e-6)
    assert float(spherical_distance(e1, e2)) == pytest.approx(2 * (math.pi / 4) ** 2, abs=1e-6)


def test_one_step_lowers_the_loss(tiny):
    """On the same cut-outs, one Adam step on the image lowers the prompt loss."""
    gen = FourierImage(48)
    tower = tiny.image_tower().eval().requires_grad_(False)
    prep = tiny.info.preprocessing
    mean = torch.tensor(prep.mean).view(1, 3, 1, 1)
    std = torch.tensor(prep.std).view(1, 3, 1, 1)
    targets = [torch.from_numpy(v) for v in tiny.encode_texts(["a red circle", "blurry"])]
    weights = [1.0, -0.5]
    cut = Cutouts(8, prep.image_size)

    def loss() -> torch.Tensor:
        crops = cut(gen(), torch.Generator().manual_seed(1))
        return prompt_loss(tower((crops - mean) / std), targets, weights)

    opt = torch.optim.Adam(gen.parameters(), lr=0.05)
    before = loss()
    before.backward()
    opt.step()
    with torch.no_grad():
        after = loss()
    assert after.item() < before.item()


def test_generation_is_seeded_and_moves_toward_the_prompt(tiny):
    prompts = parse_prompts("a red circle")
    cfg = GenerateConfig(size=32, steps=12, cutouts=4, seed=5, save_every=4, lr=0.1)
    a = generate(tiny, prompts, cfg)
    b = generate(tiny, prompts, cfg)
    np.testing.assert_array_equal(a.image, b.image)
    assert a.image.shape == (32, 32, 3) and a.image.dtype == np.uint8
    assert len(a.frames) == 3
    c = generate(tiny, prompts, GenerateConfig(size=32, steps=12, cutouts=4, seed=6, lr=0.1))
    assert not np.array_equal(a.image, c.image)
    # a smoothness penalty gives a smoother image from the same start
    smooth = generate(
        tiny, prompts, GenerateConfig(size=32, steps=12, cutouts=4, seed=5, lr=0.1, tv=20.0)
    )

    def tv_of(image):
        return float(total_variation(torch.from_numpy(image).float().permute(2, 0, 1)[None]))

    assert tv_of(smooth.image) < tv_of(a.image)
    assert np.mean(a.similarities[-3:]) > np.mean(a.similarities[:3])


def test_generate_cli(tmp_path, tiny_model_dir, photos, capsys):
    from PIL import Image

    from cliplens.cli.main import main

    photo = str(next(photos.glob("*.jpg")))
    args = [
        "generate",
        "a red circle:1 | blurry:-0.5",
        "--negative",
        "noise",
        "--image-prompt",
        photo,
        "--init-image",
        photo,
        "--size",
        "32",
        "--steps",
        "4",
        "--cutouts",
        "2",
        "--save-every",
        "2",
        "--model",
        f"local:{tiny_model_dir}",
    ]
    assert (
        main([*args, "--out", str(tmp_path / "a.png"), "--animation", str(tmp_path / "a.gif")]) == 0
    )
    assert "similarity" in capsys.readouterr().err
    assert Image.open(tmp_path / "a.png").size == (32, 32)
    assert sorted(p.name for p in (tmp_path / "a_frames").iterdir()) == ["00002.png", "00004.png"]
    assert Image.open(tmp_path / "a.gif").n_frames == 2
    assert main([*args, "--out", str(tmp_path / "b.png")]) == 0
    assert (tmp_path / "a.png").read_bytes() == (tmp_path / "b.png").read_bytes()  # seeded
    assert main(["generate", "blurry:-1", "--model", f"local:{tiny_model_dir}"]) == 2
    assert "positive weight" in capsys.readouterr().err


def test_an_animation_keeps_frames_without_an_interval():
    assert GenerateConfig(steps=300, animate=True).frame_interval == 6  # 50 frames
    assert GenerateConfig(steps=300, animate=True, save_every=10).frame_interval == 10
    assert GenerateConfig(steps=10, animate=True).frames == 10  # at least one step apart
    assert GenerateConfig(steps=300).frames == 0
