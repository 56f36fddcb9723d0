"""`cliplens generate`: CLIP-guided image synthesis.

Commands import the library inside their functions, so `cliplens --help` imports none
of it (no torch).
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Annotated

import typer

from cliplens.cli.common import (
    FiniteFloat,
    ModelOpt,
    SeedOpt,
    library_names,
    out_file,
    out_folder,
)
from cliplens.cli.output import info
from cliplens.generation.config import DEFAULT_LR  # torch-free: the help shows the defaults
from cliplens.limits import MAX_CUTOUTS, MAX_LR, MAX_SIZE, MAX_STEPS, MIN_SIZE

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")
library_names("generate", trust="--trust-checkpoint")


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
            help=f"Adam's step size. [default: {DEFAULT_LR['fourier']}; "
            f"{DEFAULT_LR['vqgan']} with a VQGAN]",
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
    from cliplens.cli.output import show_progress
    from cliplens.generation.generate import (
        GenerateConfig,
        animation_format,
        generate,
        parse_prompts,
        write_animation,
    )
    from cliplens.progress import progress_bar

    prompts = parse_prompts(prompt, negative, image_prompt)
    # every path the work ends in is checked before the work, not after
    out_file(out, "--out", IMAGE_SUFFIXES)
    if animation:
        animation_format(animation)
        out_file(animation, "--animation", (".gif", ".mp4"))
    cfg = GenerateConfig(
        size=size,
        steps=steps,
        lr=lr,
        cutouts=cutouts,
        seed=seed,
        save_every=save_every,
        tv=tv,
        vqgan_config=vqgan_config,
        vqgan_checkpoint=vqgan_checkpoint,
        trust_checkpoint=trust_checkpoint,
        init_image=init_image,
        animate=animation is not None,
    )
    frames_dir = out.with_name(f"{out.stem}_frames")
    if cfg.frame_interval:
        out_folder(frames_dir, "frames folder")
    with contextlib.ExitStack() as bar:
        advance: list = []  # the bar opens at the first step: a bad generator or model shows none

        def on_step(_: int, sim: float) -> None:
            if not advance:
                advance.append(
                    bar.enter_context(progress_bar(steps, "generating", show_progress()))
                )
            advance[0](1, f"similarity {sim:.3f}")

        result = generate(model, prompts, cfg, on_step=on_step)
    frames = result.save(out, frames_dir if result.frames else None, cfg.frame_interval)
    if frames:
        info(f"wrote {len(frames)} frames to {frames_dir}")
    if animation:
        info(f"wrote {write_animation(result.frames, animation)}")
    info(f"wrote {out}: similarity {result.similarities[-1]:.3f} after {steps} steps")
