"""`cliplens generate`: CLIP-guided image synthesis."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import numpy as np
import typer

from cliplens.cli.common import ModelOpt
from cliplens.cli.output import info
from cliplens.errors import InvalidInputError


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
    size: Annotated[int, typer.Option("--size", help="Image side in pixels.")] = 256,
    steps: Annotated[int, typer.Option("--steps")] = 300,
    cutouts: Annotated[int, typer.Option("--cutouts", help="Cut-outs per step.")] = 16,
    lr: Annotated[float, typer.Option("--lr")] = 0.05,
    seed: Annotated[int, typer.Option("--seed")] = 0,
    out: Annotated[Path, typer.Option("--out", "-o", help="The image (PNG).")] = Path("out.png"),
    save_every: Annotated[
        int,
        typer.Option("--save-every", help="Keep a frame every N steps: OUT_frames/ and a GIF."),
    ] = 0,
    model: ModelOpt = None,
) -> None:
    """Optimise an image (Fourier-parameterised) so CLIP matches it to the prompts."""
    from PIL import Image

    from cliplens.cli.output import show_progress
    from cliplens.images import open_image
    from cliplens.models.registry import load_model
    from cliplens.tasks.generate import (
        FourierImage,
        GenerateConfig,
        Prompt,
        generate,
        parse_prompts,
    )

    prompts = parse_prompts(prompt)
    if negative:
        prompts.append(Prompt(negative.strip(), -1.0))
    if image_prompt:
        prompts.append(Prompt(None, 1.0, image_prompt))
    if steps < 1 or cutouts < 1:
        raise InvalidInputError("--steps and --cutouts must be at least 1")
    cfg = GenerateConfig(size=size, steps=steps, lr=lr, cutouts=cutouts, seed=seed,
                         save_every=save_every)  # fmt: skip
    generator = FourierImage(size)
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
        frames_dir = out.with_name(f"{out.stem}_frames")
        frames_dir.mkdir(exist_ok=True)
        images = [Image.fromarray(f) for f in result.frames]
        for i, frame in enumerate(images, 1):
            frame.save(frames_dir / f"{i * save_every:05d}.png")
        images[0].save(out.with_suffix(".gif"), save_all=True, append_images=images[1:],
                       duration=100, loop=0)  # fmt: skip
    info(f"wrote {out}: similarity {result.similarities[-1]:.3f} after {steps} steps")
