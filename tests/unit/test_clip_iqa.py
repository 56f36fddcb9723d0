"""CLIP-IQA as published: cliplens's faithful mode against pyiqa's own CLIPIQA."""

from __future__ import annotations

import json
import sys
import types
from dataclasses import replace

import numpy as np
import pytest
from PIL import Image

import cliplens
from cliplens.errors import InvalidInputError
from cliplens.tasks.clip_iqa import MIN_SIDE, encode_whole, fit_side
from cliplens.tasks.quality import MAX_SIDE


def random_rn50():
    """OpenAI's RN50 layout with random weights, rounded to fp16 as OpenAI's checkpoints are
    (pyiqa's loader casts the network to fp16 before loading, so both hold the same numbers).
    The zero-initialised last norms of each block are randomised so every block counts."""
    import open_clip
    import torch

    torch.manual_seed(0)
    model = open_clip.create_model("RN50-quickgelu", pretrained=None).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bn3.weight"):
                p.normal_(1.0, 0.2)
            p.copy_(p.half().float())
    return model


def pyiqa_clipiqa(monkeypatch, state_dict):
    """pyiqa's CLIPIQA (`clipiqa`, no positional embedding) on the given weights.

    pyiqa ships with the dev extra (pyproject.toml): missing, this fails. Its bundled
    openai-clip imports `packaging` through `pkg_resources`, which setuptools >= 81 no
    longer has; the test provides that one name while importing it.
    """
    import packaging.version

    try:
        import pkg_resources  # noqa: F401
    except ImportError:
        shim = types.ModuleType("pkg_resources")
        shim.packaging = sys.modules["packaging"]  # type: ignore[attr-defined]
        monkeypatch.setitem(sys.modules, "pkg_resources", shim)
    assert packaging.version
    try:
        from pyiqa.archs import clip_model, clipiqa_arch
    except ImportError as e:
        pytest.fail(f"pyiqa is not installed ({e}): pip install -e '.[dev]'")
    # its loader reads OpenAI's checkpoint files only; build from the state dict instead
    monkeypatch.setattr(
        clipiqa_arch, "load", lambda *a, **k: clip_model.build_model(dict(state_dict)).float()
    )
    return clipiqa_arch.CLIPIQA(model_type="clipiqa", pretrained=False).eval()


def as_input(*images: Image.Image):
    """pyiqa's input: RGB in [0, 1], NCHW."""
    import torch

    arrays = [np.asarray(im.convert("RGB"), np.float32) / 255 for im in images]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)


def test_faithful_mode_equals_pyiqa_clipiqa(monkeypatch, tmp_path):
    import open_clip
    import skimage.data
    import torch

    from cliplens.models.openclip import OpenClipEncoder

    rn50 = random_rn50()
    reference = pyiqa_clipiqa(monkeypatch, rn50.state_dict())
    # small photos (a random RN50 on a CPU): one not square, with sides not multiples of 32
    cat = Image.fromarray(skimage.data.chelsea()).resize((226, 150), Image.Resampling.BICUBIC)
    square = [
        Image.fromarray(skimage.data.astronaut()).resize((128, 128), Image.Resampling.BICUBIC),
        Image.fromarray(skimage.data.camera()).resize((128, 128), Image.Resampling.BICUBIC),
    ]  # the second grey
    with torch.no_grad():  # one call per size (pyiqa embeds its prompts on every call)
        expected = torch.cat([reference(as_input(cat)), reference(as_input(*square))])
    expected = expected[:, 0].numpy()
    model = OpenClipEncoder.from_model(
        rn50,
        open_clip.get_tokenizer("RN50-quickgelu"),
        name="rn50-random",
        arch="RN50-quickgelu",
        model_id="rn50-random@test",
        device=torch.device("cpu"),
        precision=cliplens.Precision.FP32,
    )
    assert cliplens.iqa_mode(model) == "faithful"  # the default for this layout
    screener = cliplens.build_screener(model, prompts="clipiqa")
    assert screener.scale == pytest.approx(float(rn50.logit_scale.exp()))  # random: ~1/0.07
    files = []
    for name, image in zip(("cat.png", "astronaut.png", "camera.png"), [cat, *square], strict=True):
        image.save(tmp_path / name)  # lossless: the files hold the pixels pyiqa saw
        files.append(tmp_path / name)
    (tmp_path / "empty.png").write_bytes(b"")
    found = cliplens.screen(
        [*files[:1], tmp_path / "empty.png", *files[1:]], model, screener=screener
    )
    assert found.iqa == "faithful" and found.prompts == "clipiqa"
    assert [p.problem for p in found.problems] == ["empty"]  # reported, the rest scored
    assert [s.path for s in found.scores] == [str(f.resolve()) for f in files]
    got = np.array([s.attributes["quality"] for s in found.scores])
    assert np.abs(got - expected).max() < 1e-4, (got, expected)
    # what the comparison tells apart: the centre crop, or CLIP's trained scale of 100 in
    # place of the model's own, each moves the score by far more than 1e-4
    [crop] = cliplens.screen([cat], model, screener=replace(screener, iqa="crop")).scores
    assert abs(crop.attributes["quality"] - expected[0]) > 1e-3
    whole = encode_whole(model, [cat], MAX_SIDE).vectors
    hundred = replace(screener, scale=100.0).attribute_scores(whole)[0, 0]
    assert abs(hundred - expected[0]) > 1e-3


def test_faithful_mode_is_refused_for_a_vit_and_crop_is_its_default(tiny):
    assert cliplens.iqa_mode(tiny) == "crop"
    with pytest.raises(InvalidInputError, match=r"`iqa` faithful needs an OpenAI-layout ResNet"):
        cliplens.iqa_mode(tiny, "faithful")
    with pytest.raises(InvalidInputError, match=r"`iqa` whole: one of faithful, crop"):
        cliplens.iqa_mode(tiny, "whole")
    with pytest.raises(InvalidInputError, match=r"`prompts` fancy: one of attributes, clipiqa"):
        cliplens.build_screener(tiny, prompts="fancy")  # type: ignore[arg-type]


def test_whole_images_are_bounded_only_beyond_the_cap():
    small = Image.new("RGB", (900, 300))
    assert fit_side(small, 1024) is small  # within the cap: untouched, as pyiqa sees it
    assert fit_side(Image.new("RGB", (4000, 3000)), 1024).size == (1024, 768)
    assert fit_side(Image.new("RGB", (3000, 4000)), 1024).size == (768, 1024)
    assert min(fit_side(Image.new("RGB", (200, 8)), 1024).size) == MIN_SIDE


def test_quality_cli_takes_the_mode_and_the_prompt_set(tiny_model_dir, tmp_path, capsys):
    from cliplens.cli.main import main

    photo = tmp_path / "noise.png"
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (40, 60, 3), dtype=np.uint8)).save(photo)
    base = ["quality", str(photo), "-m", f"local:{tiny_model_dir}", "--format", "json"]
    assert main([*base, "--iqa", "faithful"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --iqa faithful needs an OpenAI-layout ResNet"), err
    assert "use --iqa crop" in err
    assert main([*base, "--prompts", "clipiqa", "--sort", "quality"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["iqa"] == "crop" and report["prompts"] == "clipiqa"
    [score] = report["scores"]
    assert 0 <= score["quality"] <= 1 and "sharpness" not in score
    assert main([*base, "--prompts", "clipiqa", "--sort", "sharpness"]) == 2
    assert "--sort sharpness: one of quality" in capsys.readouterr().err
