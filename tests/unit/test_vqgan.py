"""The VQGAN generator: a taming-transformers config + Lightning checkpoint, on a tiny
random model written the way taming saves one."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from cliplens.errors import InvalidInputError
from cliplens.generation.generate import Cutouts, GenerateConfig, generate, parse_prompts
from cliplens.generation.vqgan import VQGAN, VQGANImage, load_vqgan

DDCONFIG = {
    "double_z": False,
    "z_channels": 8,
    "resolution": 32,
    "in_channels": 3,
    "out_ch": 3,
    "ch": 32,
    "ch_mult": [1, 2],
    "num_res_blocks": 1,
    "attn_resolutions": [16],
    "dropout": 0.0,
}
LOSS = {
    "target": "taming.modules.losses.vqperceptual.VQLPIPSWithDiscriminator",
    "params": {
        "disc_conditional": False,
        "disc_in_channels": 3,
        "disc_start": 10000,
        "disc_weight": 0.8,
        "codebook_weight": 1.0,
    },
}


def write_vqgan(
    folder: Path,
    target: str = "taming.models.vqgan.VQModel",
    kind: str = "vq",
    prefix: str = "",
    extra: dict | None = None,
) -> tuple[Path, Path, dict]:
    """A config as taming publishes them and a Lightning-style checkpoint of random weights
    (with training-only loss weights in it, as real checkpoints have)."""
    torch.manual_seed(0)
    params = {"embed_dim": 4, "n_embed": 32, "ddconfig": DDCONFIG, "lossconfig": LOSS}
    if kind == "gumbel":
        params |= {"kl_weight": 1e-8, "temperature_scheduler_config": {}}
    model = {"base_learning_rate": 4.5e-6, "target": target, "params": params}
    if prefix:
        model = {"target": target, "params": {"first_stage_config": dict(model)}}
    config = folder / "model.yaml"
    config.write_text(yaml.safe_dump({"model": model}))
    weights = VQGAN(kind, DDCONFIG, 32, 4).state_dict()
    with torch.no_grad():  # a codebook with spread entries
        key = "quantize.embed.weight" if kind == "gumbel" else "quantize.embedding.weight"
        weights[key].copy_(torch.randn_like(weights[key]))
    sd = {prefix + k: v for k, v in weights.items()}
    sd["loss.discriminator.main.0.weight"] = torch.zeros(2, 3, 4, 4)
    ckpt = folder / "last.ckpt"
    torch.save({"epoch": 3, "global_step": 100, "state_dict": sd, **(extra or {})}, ckpt)
    return config, ckpt, weights


def test_loads_a_taming_checkpoint_and_decodes(tmp_path):
    config, ckpt, weights = write_vqgan(tmp_path)
    vqgan = load_vqgan(config, ckpt)
    for name, tensor in vqgan.state_dict().items():
        torch.testing.assert_close(tensor, weights[name], msg=name)
    assert not any(p.requires_grad for p in vqgan.parameters())
    assert vqgan.factor == 2
    gen = VQGANImage(vqgan, 32, seed=3)
    assert [n for n, _ in gen.named_parameters()] == ["z"]  # only the latents train
    assert gen.z.shape == (1, 4, 16, 16)
    with torch.no_grad():
        image = gen()
        z_q = gen.quantised()[0].flatten(1).T
    assert image.shape == (1, 3, 32, 32)
    assert float(image.min()) >= 0 and float(image.max()) <= 1
    # every latent is a codebook entry
    gap = (z_q[:, None] - vqgan.codebook[None]).abs().amax(dim=-1).min(dim=1).values
    assert float(gap.max()) < 1e-5
    torch.testing.assert_close(VQGANImage(vqgan, 32, seed=3).z, gen.z)
    assert not torch.equal(VQGANImage(vqgan, 32, seed=4).z, gen.z)


def test_gumbel_and_transformer_configs(tmp_path):
    (tmp_path / "g").mkdir()
    config, ckpt, weights = write_vqgan(tmp_path / "g", "taming.models.vqgan.GumbelVQ", "gumbel")
    vqgan = load_vqgan(config, ckpt)
    torch.testing.assert_close(vqgan.codebook, weights["quantize.embed.weight"])
    (tmp_path / "t").mkdir()
    config, ckpt, weights = write_vqgan(
        tmp_path / "t",
        "taming.models.cond_transformer.Net2NetTransformer",
        "vq",
        prefix="first_stage_model.",
    )
    # the transformer's config names its first stage; weights sit under first_stage_model.
    text = yaml.safe_load(config.read_text())
    text["model"]["params"]["first_stage_config"]["target"] = "taming.models.vqgan.VQModel"
    config.write_text(yaml.safe_dump(text))
    vqgan = load_vqgan(config, ckpt)
    torch.testing.assert_close(vqgan.codebook, weights["quantize.embedding.weight"])


def test_one_vqgan_step_lowers_the_loss(tmp_path, tiny):
    from cliplens.generation.generate import prompt_loss

    config, ckpt, _ = write_vqgan(tmp_path)
    gen = VQGANImage(load_vqgan(config, ckpt), 32, seed=0)
    tower = tiny.image_tower().eval().requires_grad_(False)
    prep = tiny.info.preprocessing
    mean = torch.tensor(prep.mean).view(1, 3, 1, 1)
    std = torch.tensor(prep.std).view(1, 3, 1, 1)
    targets = [torch.from_numpy(tiny.encode_texts(["a red circle"])[0])]
    cut = Cutouts(4, prep.image_size)

    def loss() -> torch.Tensor:
        crops = cut(gen(), torch.Generator().manual_seed(1))
        return prompt_loss(tower((crops - mean) / std), targets, [1.0])

    # a step must carry some latents into another codebook cell to change the image;
    # this tiny codebook's cells are wide, hence the large step
    opt = torch.optim.Adam(gen.parameters(), lr=0.5)
    with torch.no_grad():
        codes_before = gen.quantised().clone()
    before = loss()
    before.backward()
    assert gen.z.grad is not None and float(gen.z.grad.abs().sum()) > 0
    opt.step()
    with torch.no_grad():
        after = loss()
        assert not torch.equal(gen.quantised(), codes_before)
    assert after.item() < before.item()
    # and the whole loop runs on it, seeded
    cfg = GenerateConfig(size=32, steps=3, cutouts=2, seed=1)
    vqgan = load_vqgan(config, ckpt)
    runs = [
        generate(tiny, parse_prompts("a red circle"), cfg, VQGANImage(vqgan, 32, seed=1))
        for _ in range(2)
    ]
    np.testing.assert_array_equal(runs[0].image, runs[1].image)


def test_clamp_passes_gradients_that_move_pixels_back_in_range():
    from cliplens.generation.vqgan import _ClampWithGrad

    x = torch.tensor([-0.5, 0.5, 1.5, -0.5, 1.5], requires_grad=True)
    y = _ClampWithGrad.apply(x)
    assert y.tolist() == [0.0, 0.5, 1.0, 0.0, 1.0]
    # descent moves x by -grad: the first and third are pushed inward, the last two outward
    y.backward(torch.tensor([-1.0, 1.0, 1.0, 1.0, -1.0]))
    assert x.grad.tolist() == [-1.0, 1.0, 1.0, 0.0, 0.0]


def test_init_from_an_image_encodes_it(tmp_path):
    config, ckpt, _ = write_vqgan(tmp_path)
    vqgan = load_vqgan(config, ckpt)
    gen = VQGANImage(vqgan, 32, seed=0)
    image = torch.rand(1, 3, 32, 32)
    gen.init_from(image)
    with torch.no_grad():
        torch.testing.assert_close(gen.z, vqgan.encode(image * 2 - 1))


def test_vqgan_errors(tmp_path):
    config, ckpt, _ = write_vqgan(tmp_path)
    vqgan = load_vqgan(config, ckpt)
    with pytest.raises(InvalidInputError, match="`size` 31: use a multiple of 2"):
        VQGANImage(vqgan, 31)
    bad = tmp_path / "other.yaml"
    bad.write_text(yaml.safe_dump({"model": {"target": "ldm.models.Autoencoder"}}))
    with pytest.raises(InvalidInputError, match=r"model\.target is 'ldm\.models\.Autoencoder'"):
        load_vqgan(bad, ckpt)
    wider = yaml.safe_load(config.read_text())
    wider["model"]["params"]["ddconfig"]["ch"] = 64
    bad.write_text(yaml.safe_dump(wider))
    with pytest.raises(InvalidInputError, match="does not match config"):
        load_vqgan(bad, ckpt)
    with pytest.raises(InvalidInputError, match="no such file"):
        load_vqgan(config, tmp_path / "missing.ckpt")
    (tmp_path / "junk.ckpt").write_bytes(b"not a checkpoint")
    with pytest.raises(InvalidInputError, match="cannot read it"):
        load_vqgan(config, tmp_path / "junk.ckpt")


def test_checkpoints_with_pickled_objects_need_trust(tmp_path):
    config, ckpt, weights = write_vqgan(tmp_path, extra={"hparams": argparse.Namespace(lr=1)})
    with pytest.raises(InvalidInputError, match="pass `trust`"):
        load_vqgan(config, ckpt)
    vqgan = load_vqgan(config, ckpt, trust=True)
    torch.testing.assert_close(vqgan.codebook, weights["quantize.embedding.weight"])


def test_generate_cli_with_a_vqgan_and_an_mp4(tmp_path, tiny_model_dir):
    import imageio_ffmpeg
    from PIL import Image

    from cliplens.cli.main import main

    config, ckpt, _ = write_vqgan(tmp_path)
    base = [
        "generate",
        "a red circle",
        "--size",
        "32",
        "--steps",
        "4",
        "--cutouts",
        "2",
        "--model",
        f"local:{tiny_model_dir}",
        "--out",
        str(tmp_path / "v.png"),
    ]
    vq = ["--vqgan-config", str(config), "--vqgan-checkpoint", str(ckpt)]
    assert main([*base, *vq, "--animation", str(tmp_path / "v.mp4")]) == 0
    assert Image.open(tmp_path / "v.png").size == (32, 32)
    reader = imageio_ffmpeg.read_frames(str(tmp_path / "v.mp4"))
    meta = next(reader)
    assert tuple(meta["size"]) == (32, 32)
    assert len(list(reader)) == 4  # --animation alone keeps a frame per step here
    assert main([*base, *vq[:2]]) == 2  # a config without its checkpoint
    assert main([*base, *vq, "--animation", str(tmp_path / "v.avi")]) == 2
