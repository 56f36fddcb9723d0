"""`cliplens generate`: CLIP-guided image synthesis."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import numpy as np
import typer

from cliplens.cli.common import FiniteFloat, ModelOpt, SeedOpt, out_file, out_folder
from cliplens.cli.output import info
from cliplens.errors import InvalidInputError
from cliplens.limits import MAX_CUTOUTS, MAX_LR, MAX_SIZE, MAX_STEPS, MIN_SIZE

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")


def generate_command(
    prompt: Annotated[
        str, typer.Argument(help='Text prompts with weights: "a red circle:1 | blurry:-0.5".')
    ],
    negative: Annotated[
        str | None, typer.Option("--negative", help="Text to steer away from (weight -1).")
    ] = None,
    image_prompt: Annotated[
        Path | None, typer.Option("--image-prompt", help="An image to steer toward.")
    ] = None,
    init_image: Annotated[
        Path | None, typer.Option("--init-image", help="Start from this image.")
    ] = None,
    size: Annotated[
        int, typer.Option("--size", help="Image side in pixels.", min=MIN_SIZE, max=MAX_SIZE)
    ] = 256,
    steps: Annotated[int, typer.Option("--steps", min=1, max=MAX_STEPS)] = 300,
    cutouts: Annotated[
        int, typer.Option("--cutouts", help="Cut-outs per step.", min=1, max=MAX_CUTOUTS)
    ] = 16,
    lr: Annotated[
        float | None,
        typer.Option(
            "--lr",
            help="Adam's step size. [default: 0.05; 0.1 with a VQGAN]",
            click_type=FiniteFloat(0, MAX_LR, min_open=True),
        ),
    ] = None,
    seed: SeedOpt = 0,
    tv: Annotated[
        float,
        typer.Option(
            "--tv",
            help="Weight of a smoothness (total-variation) penalty.",
            click_type=FiniteFloat(0, 1000),
        ),
    ] = 0.0,
    out: Annotated[
        Path, typer.Option("--out", "-o", help="The image (.png, .jpg, .webp...).")
    ] = Path("out.png"),
    save_every: Annotated[
        int,
        typer.Option(
            "--save-every", help="Keep a frame every N steps, in OUT_frames/.", min=0, max=MAX_STEPS
        ),
    ] = 0,
    animation: Annotated[
        Path | None,
        typer.Option("--animation", help="Assemble the frames into this .gif or .mp4 file."),
    ] = None,
    vqgan_config: Annotated[
        Path | None,
        typer.Option("--vqgan-config", help="A taming-transformers VQGAN config (YAML)."),
    ] = None,
    vqgan_checkpoint: Annotated[
        Path | None, typer.Option("--vqgan-checkpoint", help="Its checkpoint (.ckpt).")
    ] = None,
    trust_checkpoint: Annotated[
        bool,
        typer.Option(
            "--trust-checkpoint",
            help="Unpickle a checkpoint that holds more than weights (runs its code).",
        ),
    ] = False,
    model: ModelOpt = None,
) -> None:
    """Optimise an image (Fourier-parameterised, or a VQGAN's latents) so CLIP matches it
    to the prompts."""
    from PIL import Image

    from cliplens.cli.output import show_progress
    from cliplens.images import open_image
    from cliplens.models.registry import load_model
    from cliplens.tasks.generate import (
        FourierImage,
        GenerateConfig,
        Prompt,
        animation_format,
        generate,
        parse_prompts,
        write_animation,
    )

    prompts = parse_prompts(prompt)
    if negative:
        prompts.append(Prompt(negative.strip(), -1.0))
    if image_prompt:
        prompts.append(Prompt(None, 1.0, image_prompt))
    # every path the work ends in is checked before the work, not after
    out_file(out, "--out", IMAGE_SUFFIXES)
    if animation:
        animation_format(animation)
        out_file(animation, "--animation", (".gif", ".mp4"))
    if animation and not save_every:
        save_every = max(1, steps // 50)
    frames_dir = out.with_name(f"{out.stem}_frames")
    if save_every:
        out_folder(frames_dir, "frames folder")
    if (vqgan_config is None) != (vqgan_checkpoint is None):
        raise InvalidInputError("give both --vqgan-config and --vqgan-checkpoint, or neither")
    if vqgan_config and vqgan_checkpoint:
        from cliplens.models.vqgan import VQGANImage, load_vqgan

        vqgan = load_vqgan(vqgan_config, vqgan_checkpoint, trust=trust_checkpoint)
        generator = VQGANImage(vqgan, size, seed)
    else:
        generator = FourierImage(size, seed)
    if lr is None:
        lr = 0.1 if vqgan_config else 0.05  # VQGAN-CLIP's step; the Fourier image's
    cfg = GenerateConfig(size=size, steps=steps, lr=lr, cutouts=cutouts, seed=seed,
                         save_every=save_every, tv=tv)  # fmt: skip
    if init_image:
        import torch

        start = open_image(init_image).convert("RGB").resize((size, size))
        pixels = torch.from_numpy(np.asarray(start, np.float32) / 255).permute(2, 0, 1)[None]
        generator.init_from(pixels)
    # the optimisation loop runs on the CPU, in fp32 (gradients through the image tower)
    encoder = load_model(model, device="cpu", precision="fp32")
    from cliplens.progress import progress_bar

    with progress_bar(steps, "generating", show_progress()) as advance:
        result = generate(encoder, prompts, cfg, generator,
                          lambda step, sim: advance(1, f"similarity {sim:.3f}"))  # fmt: skip
    out.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(result.image).save(out)
    if result.frames:
        frames_dir.mkdir(exist_ok=True)
        for i, frame in enumerate(result.frames, 1):
            Image.fromarray(frame).save(frames_dir / f"{i * save_every:05d}.png")
        info(f"wrote {len(result.frames)} frames to {frames_dir}")
    if animation:
        info(f"wrote {write_animation(result.frames, animation)}")
    info(f"wrote {out}: similarity {result.similarities[-1]:.3f} after {steps} steps")
