"""What CLIP-guided generation optimises and how (`GenerateConfig`), with the defaults it
picks: the generator, its learning rate, an animation's frame interval. Torch-free, so the
CLI's help can show the defaults without importing the loop."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from cliplens.errors import InvalidInputError
from cliplens.generation.image_budget import check_size
from cliplens.limits import MAX_CUTOUTS, MAX_SEED, MAX_STEPS, finite_number, whole_number

# what is optimised: a Fourier spectrum (no weights needed) or a VQGAN's latent grid
GeneratorKind = Literal["fourier", "vqgan"]
# Adam's step size unless one is given: the Fourier image's, and VQGAN-CLIP's
DEFAULT_LR: dict[GeneratorKind, float] = {"fourier": 0.05, "vqgan": 0.1}
ANIMATION_FRAMES = 50  # frames an animation gets when no frame interval is given


def animation_interval(steps: int) -> int:
    """The frame interval of an animation of `steps` steps when none is given (300 -> 6)."""
    return max(1, steps // ANIMATION_FRAMES)


@dataclass(frozen=True)
class GenerateConfig:
    """What to optimise and how. The generator is a VQGAN when its config and checkpoint
    are given, else a Fourier image; `lr` None is that generator's DEFAULT_LR. `animate`
    keeps frames for an animation: every `save_every` steps, or ANIMATION_FRAMES of them
    when `save_every` is 0.

    Why: numbers are checked where they are made, so a bad one fails before any work.

    >>> import cliplens
    >>> cfg = cliplens.GenerateConfig(size=128, steps=100, save_every=10)
    >>> cfg.generator, cfg.learning_rate  # ('fourier', 0.05)
    """

    size: int = 256
    steps: int = 300
    lr: float | None = None
    cutouts: int = 16
    seed: int = 0
    save_every: int = 0  # keep a frame every N steps (0: none, or an animation's default)
    tv: float = 0.0  # weight of a total-variation penalty (smoothness; 0: none)
    vqgan_config: Path | None = None  # a taming-transformers config (YAML)
    vqgan_checkpoint: Path | None = None  # and its checkpoint
    trust_checkpoint: bool = False  # unpickle a checkpoint that holds more than weights
    init_image: Path | None = None  # start from this image
    animate: bool = False  # keep frames for an animation

    def __post_init__(self) -> None:
        check_size(self.size)
        whole_number(self.steps, "steps", 1, MAX_STEPS)
        whole_number(self.cutouts, "cut-outs per step", 1, MAX_CUTOUTS)
        if self.lr is not None:
            finite_number(self.lr, "learning rate", 0, low_open=True, example="0.05")
        finite_number(self.tv, "smoothness (tv) weight", 0)
        whole_number(self.save_every, "frame interval (steps)", 0, MAX_STEPS)
        whole_number(self.seed, "seed", 0, MAX_SEED)
        if (self.vqgan_config is None) != (self.vqgan_checkpoint is None):
            raise InvalidInputError("give both `vqgan_config` and `vqgan_checkpoint`, or neither")

    @property
    def generator(self) -> GeneratorKind:
        return "vqgan" if self.vqgan_config is not None else "fourier"

    @property
    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else DEFAULT_LR[self.generator]

    @property
    def frame_interval(self) -> int:
        """Steps between kept frames (0: none): `save_every`, else an animation's default."""
        if self.save_every or not self.animate:
            return self.save_every
        return animation_interval(self.steps)

    @property
    def frames(self) -> int:
        every = self.frame_interval
        return self.steps // every if every else 0
