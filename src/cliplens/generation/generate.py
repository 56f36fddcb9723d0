"""CLIP-guided image synthesis: optimise a generator's parameters so that CLIP embeds random
cut-outs of the image close to the prompts (CLIP+VQGAN's recipe), with augmentations so the
result does not become an adversarial pattern.

Prompts use VQGAN-CLIP's syntax: "a red circle:1 | blurry:-0.5". A negative weight pushes
the image away from that text. The distance is the squared spherical distance between unit
vectors, as VQGAN-CLIP uses.

Generators share one interface: a module whose forward() gives a (1, 3, H, W) image in
[0, 1], whose trainable parameters are what the loop optimises, and whose init_from(image)
starts it from a picture. `FourierImage` needs no weights: the image is parameterised by its
Fourier spectrum, scaled so that low frequencies dominate, with decorrelated colour, as
Lucid's feature visualisation does. `cliplens.generation.vqgan.VQGANImage` decodes a VQGAN
latent grid (taming-transformers weights supplied by the user).

What to optimise and how is a `GenerateConfig` (`generation/config.py`, torch-free);
`generate` builds the generator it names and loads the guide model from a name.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image
from torch import nn

from cliplens.errors import InvalidInputError
from cliplens.generation.config import GenerateConfig
from cliplens.generation.image_budget import (
    IMAGE_BYTES_PER_PIXEL,
    available_memory,
    check_memory,
    check_size,
)
from cliplens.generation.vqgan import VQGANImage, load_vqgan
from cliplens.images import open_image
from cliplens.models.encoder import Encoder
from cliplens.models.registry import load_model
from cliplens.store.files import write_atomic

if TYPE_CHECKING:
    from cliplens.models.torch_encoder import TorchEncoder

# Lucid's square root of the colour correlation matrix of ImageNet, from its SVD
_COLOUR_SQRT = torch.tensor([[0.26, 0.09, 0.02], [0.27, 0.00, -0.05], [0.27, -0.09, 0.03]])
_COLOUR_SQRT = _COLOUR_SQRT / _COLOUR_SQRT.norm(dim=0).max()


@dataclass(frozen=True)
class Prompt:
    text: str | None
    weight: float = 1.0
    image: Path | None = None


def parse_prompts(
    spec: str, negative: str | None = None, image: Path | None = None
) -> list[Prompt]:
    """ "a red circle:1 | blurry:-0.5" -> text prompts with weights (default 1). A colon is
    a weight only when a number follows it, so "16:9 poster" stays text. `negative` is a
    text to steer away from (weight -1), `image` an image to steer toward (weight 1).

    >>> import cliplens
    >>> cliplens.parse_prompts("a red circle:1 | blurry:-0.5")
    >>> # [Prompt('a red circle', 1.0), Prompt('blurry', -0.5)]
    """
    prompts = []
    for part in spec.split("|"):
        part = part.strip()
        if not part:
            raise InvalidInputError(
                f"prompt '{spec}': an empty part between '|'; write 'text:weight | text:weight'"
            )
        text, weight = part, 1.0
        head, sep, tail = part.rpartition(":")
        if sep:
            try:
                weight = float(tail)
                text = head.strip()
            except ValueError:
                pass  # the colon belongs to the text
        if not text:
            raise InvalidInputError(f"prompt part '{part}': a weight without text")
        if not math.isfinite(weight):
            raise InvalidInputError(f"prompt part '{part}': the weight must be a finite number")
        prompts.append(Prompt(text, weight))
    if not any(p.weight > 0 for p in prompts):
        raise InvalidInputError(f"prompt '{spec}': at least one part needs a positive weight")
    if negative:
        prompts.append(Prompt(negative.strip(), -1.0))
    if image:
        prompts.append(Prompt(None, 1.0, image))
    return prompts


class FourierImage(nn.Module):
    """An image as a scaled Fourier spectrum with decorrelated colour (no weights needed)."""

    bytes_per_pixel = IMAGE_BYTES_PER_PIXEL

    def __init__(self, size: int, seed: int = 0, decay: float = 1.0, std: float = 0.01) -> None:
        super().__init__()
        check_size(size)
        check_memory(size, self.bytes_per_pixel, available_memory(), what="a Fourier image")
        fy = torch.fft.fftfreq(size)[:, None]
        fx = torch.fft.rfftfreq(size)[None, :]
        freqs = torch.sqrt(fx**2 + fy**2)
        self.register_buffer("scale", 1.0 / torch.clamp(freqs, min=1.0 / size) ** decay)
        rng = torch.Generator().manual_seed(seed)
        self.spectrum = nn.Parameter(torch.randn(3, size, size // 2 + 1, 2, generator=rng) * std)
        self.size = size

    def forward(self) -> torch.Tensor:
        spectrum = torch.view_as_complex(self.spectrum) * self.scale
        image = torch.fft.irfft2(spectrum, s=(self.size, self.size), norm="ortho")
        colour = torch.einsum("ij,jhw->ihw", _COLOUR_SQRT.to(image), image)
        return torch.sigmoid(colour)[None]

    @torch.no_grad()
    def init_from(self, image: torch.Tensor) -> None:
        """Start from an image (1, 3, H, W) in [0, 1]: the inverse of forward()."""
        x = image[0].clamp(1e-3, 1 - 1e-3)
        logits = torch.log(x / (1 - x))
        decorrelated = torch.linalg.solve(_COLOUR_SQRT.to(x), logits.reshape(3, -1))
        spectrum = torch.fft.rfft2(decorrelated.reshape(x.shape), norm="ortho") / self.scale
        self.spectrum.copy_(torch.view_as_real(spectrum))


class Cutouts(nn.Module):
    """`n` random square crops resized to the model's input, with a random flip and a little
    noise each step. Crop sides are uniform between the model's input size (never enlarged
    from fewer pixels; the whole image if it is smaller) and the whole image, as VQGAN-CLIP
    draws them."""

    def __init__(self, n: int, out_size: int, noise: float = 0.05):
        super().__init__()
        self.n, self.out_size, self.noise = n, out_size, noise

    def forward(self, image: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        _, _, h, w = image.shape
        side = min(h, w)
        smallest = min(side, self.out_size)
        crops = []
        for _ in range(self.n):
            u = float(torch.rand((), generator=generator))
            s = int(smallest + (side - smallest) * u)
            y = int(torch.randint(0, h - s + 1, (), generator=generator))
            x = int(torch.randint(0, w - s + 1, (), generator=generator))
            crop = image[:, :, y : y + s, x : x + s]
            size = (self.out_size, self.out_size)
            crop = nn.functional.interpolate(
                crop, size=size, mode="bilinear", align_corners=False, antialias=s > self.out_size
            )
            if float(torch.rand((), generator=generator)) < 0.5:
                crop = crop.flip(-1)
            crops.append(crop)
        batch = torch.cat(crops)
        noise = torch.randn(batch.shape, generator=generator) * self.noise
        return (batch + noise).clamp(0, 1)


def spherical_distance(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """2 * arcsin(|x - y| / 2)^2 between unit vectors: (N, D) x (D,) -> (N,)."""
    x = nn.functional.normalize(x, dim=-1)
    y = nn.functional.normalize(y, dim=-1)
    return (x - y).norm(dim=-1).div(2).arcsin().pow(2).mul(2)


def total_variation(image: torch.Tensor) -> torch.Tensor:
    """Mean absolute difference between neighbouring pixels (1, 3, H, W) -> scalar."""
    dy = (image[..., 1:, :] - image[..., :-1, :]).abs().mean()
    dx = (image[..., :, 1:] - image[..., :, :-1]).abs().mean()
    return dx + dy


def prompt_loss(emb: torch.Tensor, targets: list[torch.Tensor], weights) -> torch.Tensor:
    """Sum over prompts of weight * mean spherical distance of the cut-outs' embeddings."""
    pairs = zip(weights, targets, strict=True)
    terms = [float(w) * spherical_distance(emb, t).mean() for w, t in pairs]
    return torch.stack(terms).sum()


def build_generator(cfg: GenerateConfig) -> nn.Module:
    """The generator `cfg` names, checked and started (from `cfg.init_image` if given),
    before any CLIP model is loaded.

    >>> import cliplens
    >>> cfg = cliplens.GenerateConfig(vqgan_config=Path("a.yaml"), vqgan_checkpoint=Path("a.ckpt"))
    >>> generator = cliplens.build_generator(cfg)  # a bad checkpoint fails here, not later
    """
    generator: FourierImage | VQGANImage
    if cfg.vqgan_config is not None and cfg.vqgan_checkpoint is not None:
        trust = cfg.trust_checkpoint
        vqgan = load_vqgan(cfg.vqgan_config, cfg.vqgan_checkpoint, trust=trust)
        generator = VQGANImage(vqgan, cfg.size, cfg.seed)
    else:
        generator = FourierImage(cfg.size, cfg.seed)
    if cfg.init_image is not None:
        start = open_image(cfg.init_image).convert("RGB").resize((cfg.size, cfg.size))
        pixels = np.asarray(start, np.float32) / 255
        generator.init_from(torch.from_numpy(pixels).permute(2, 0, 1)[None])
    return generator


def guide_model(name: str | None) -> TorchEncoder:
    """The CLIP model that guides generation: on the CPU, in fp32 (the loop's gradients
    run through its image tower).

    >>> import cliplens
    >>> model = cliplens.guide_model("ViT-B-32:openai")
    >>> cliplens.generate(model, cliplens.parse_prompts("a red boat"), cliplens.GenerateConfig())
    """
    return load_model(name, device="cpu", precision="fp32")


@dataclass
class GenerateResult:
    image: np.ndarray  # (H, W, 3) uint8
    losses: list[float]
    similarities: list[float]  # mean cosine of the cut-outs to the first positive prompt
    frames: list[np.ndarray]

    def save(
        self, out: str | Path, frames_dir: str | Path | None = None, every: int = 1
    ) -> list[Path]:
        """Write the image to `out` and the kept frames into `frames_dir` as NNNNN.png (the
        step each was kept at, frames kept every `every` steps); returns the frames'
        paths. Each file is written whole or not at all."""

        def write(path: Path, pixels: np.ndarray) -> None:
            path.parent.mkdir(parents=True, exist_ok=True)
            image = Image.fromarray(pixels)
            fmt = Image.registered_extensions().get(path.suffix.lower())
            write_atomic(path, lambda tmp: image.save(tmp, format=fmt))

        write(Path(out), self.image)
        written = []
        if frames_dir is not None:
            for i, frame in enumerate(self.frames, 1):
                written.append(Path(frames_dir) / f"{i * every:05d}.png")
                write(written[-1], frame)
        return written


def generate(
    model: Encoder | str | None,
    prompts: list[Prompt],
    cfg: GenerateConfig,
    generator: nn.Module | None = None,
    on_step: Callable[[int, float], None] | None = None,
) -> GenerateResult:
    """Optimise `generator` (`build_generator(cfg)` by default) toward the prompts, guided
    by `model`: an Encoder, or a model name (None: the default) loaded by `guide_model`
    once the generator is built, so a bad VQGAN fails before any model loads. The same
    seed gives the same image on CPU (seed the generator's start with it too).

    Why: CLIP can draw what it knows, which shows what a model has learnt of a prompt.

    >>> import cliplens
    >>> prompts = cliplens.parse_prompts("a red boat | blurry:-0.5")
    >>> cliplens.generate("offline", prompts, cliplens.GenerateConfig())
    """
    torch.manual_seed(cfg.seed)
    image_gen = generator if generator is not None else build_generator(cfg)
    if cfg.frames:
        per_pixel = getattr(image_gen, "bytes_per_pixel", IMAGE_BYTES_PER_PIXEL)
        check_memory(cfg.size, per_pixel, available_memory(), cfg.frames, "the optimisation")
    if model is None or isinstance(model, str):
        encoder: Encoder = guide_model(model)
        torch.manual_seed(cfg.seed)  # loading may draw from torch's generator
    else:
        encoder = model
    rng = torch.Generator().manual_seed(cfg.seed)
    network = encoder.load()
    tower = network.image_tower().eval()
    tower.requires_grad_(False)
    prep = encoder.info.preprocessing
    mean = torch.tensor(prep.mean).view(1, 3, 1, 1)
    std = torch.tensor(prep.std).view(1, 3, 1, 1)
    targets, weights = _targets(encoder, prompts)
    first = int(np.argmax(weights > 0))
    cut = Cutouts(cfg.cutouts, prep.image_size)
    params = [p for p in image_gen.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=cfg.learning_rate)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, cfg.steps))
    losses, sims, frames = [], [], []
    every = cfg.frame_interval
    for step in range(cfg.steps):
        image = image_gen()
        emb = tower(((cut(image, rng) - mean) / std).float())
        loss = prompt_loss(emb, targets, weights)
        if cfg.tv:
            loss = loss + cfg.tv * total_variation(image)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        with torch.no_grad():
            unit = nn.functional.normalize(targets[first], dim=0)
            cos = nn.functional.normalize(emb, dim=-1) @ unit
        losses.append(loss.item())
        sims.append(float(cos.mean()))
        if on_step:
            on_step(step + 1, sims[-1])
        if every and (step + 1) % every == 0:
            frames.append(_to_uint8(image))
    with torch.no_grad():
        final = _to_uint8(image_gen())
    return GenerateResult(final, losses, sims, frames)


def _targets(encoder: Encoder, prompts: list[Prompt]) -> tuple[list[torch.Tensor], np.ndarray]:
    texts = [p.text for p in prompts if p.text is not None]
    text_emb = iter(encoder.encode_texts(texts)) if texts else iter(())
    images = [p.image for p in prompts if p.image is not None]
    image_emb = iter(encoder.encode_images(images)) if images else iter(())
    rows = [next(text_emb) if p.text is not None else next(image_emb) for p in prompts]
    targets = [torch.from_numpy(np.asarray(row, np.float32)) for row in rows]
    return targets, np.array([p.weight for p in prompts], dtype=np.float64)


def _to_uint8(image: torch.Tensor) -> np.ndarray:
    return (image[0].detach().permute(1, 2, 0).clamp(0, 1).numpy() * 255).round().astype(np.uint8)


def animation_format(path: Path) -> str:
    """'.gif' or '.mp4', from the file name; anything else is refused."""
    if path.suffix.lower() not in (".gif", ".mp4"):
        raise InvalidInputError(f"animation {path}: name a .gif or .mp4 file")
    return path.suffix.lower()


def write_animation(frames: list[np.ndarray], path: str | Path, fps: int = 10) -> Path:
    """Frames -> an animated GIF (Pillow) or an MP4 (H.264, through imageio-ffmpeg),
    by the file's suffix."""
    path = Path(path)
    suffix = animation_format(path)
    if not frames:
        raise InvalidInputError(f"animation {path}: no frames were kept")
    path.parent.mkdir(parents=True, exist_ok=True)
    if suffix == ".gif":
        images = [Image.fromarray(f) for f in frames]
        options = {"save_all": True, "append_images": images[1:], "loop": 0}
        write_atomic(
            path, lambda tmp: images[0].save(tmp, "GIF", duration=round(1000 / fps), **options)
        )
        return path
    try:
        import imageio_ffmpeg  # optional (the generate extra): only for MP4
    except ImportError as e:
        raise InvalidInputError(
            f"animation {path}: MP4 needs imageio-ffmpeg (pip install 'cliplens[generate]'), "
            "or name a .gif"
        ) from e
    h, w = frames[0].shape[:2]
    even = (w - w % 2, h - h % 2)  # yuv420p (what players expect) needs even sides

    def write_mp4(tmp: Path) -> None:
        options = {"codec": "libx264", "pix_fmt_out": "yuv420p", "macro_block_size": 1}
        # the temporary file has no .mp4 suffix: name the container
        writer = imageio_ffmpeg.write_frames(
            str(tmp), even, fps=fps, quality=8, output_params=["-f", "mp4"], **options
        )
        writer.send(None)
        for frame in frames:
            writer.send(np.ascontiguousarray(frame[: even[1], : even[0]]))
        writer.close()

    write_atomic(path, write_mp4)
    return path
