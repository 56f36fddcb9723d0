"""Bounds on the numbers tasks and training take, and the checks that enforce them.

The library's configs check their numbers here when they are made, so a direct caller
gets the same one-line error as the command line; the CLI's options use the same bounds.
Torch-free on purpose: the CLI imports this at startup.
"""

from __future__ import annotations

import math

from cliplens.errors import InvalidInputError

MAX_SEED = 2**32 - 1  # numpy's generators take seeds in [0, 2**32)
MIN_SIZE, MAX_SIZE = 16, 8192  # side in pixels of a generated image
MAX_STEPS = 100_000  # optimisation steps of one generated image
MAX_CUTOUTS = 128  # per step: each is a pass through the image tower and back
MAX_EPOCHS = 100_000
MAX_TRAIN_STEPS = 1_000_000_000  # optimiser steps (and warmup steps) of a training run
MAX_LR = 10.0  # above this no optimiser here converges; the loss check would stop it
MAX_MINUTES = 1_000_000.0  # about two years
MAX_QUERIES = 100_000  # held-out queries an index's recall is measured with (exactly)

# ClipCap captioners (train.caption, and `caption train`/`run`/`eval`)
MAX_PREFIX_LENGTH = 512  # prefix tokens the mapper puts before the caption
MAX_MAPPER_LAYERS = 64  # of the transformer mapper
MAX_LM_LAYERS = 64  # of a scratch LM
MIN_LM_WIDTH, MAX_LM_WIDTH = 8, 8192  # of a scratch LM
MAX_CAPTION_TOKENS = 1024  # the longest caption, in training and when generating

# robust distillation (train.robust, and `train robust`)
MAX_TEMPERATURE = 100.0  # of its InfoNCE loss
MAX_ALIGN_WEIGHT = 1e6  # of its 1 - cosine term

# the five steps of the two damage scales of cliplens.corruptions, each set by its tables:
# `distort` imitates camera faults, `corrupt` follows ImageNet-C (they differ on purpose)
DISTORTION_LEVELS = (1, 2, 3, 4, 5)
SEVERITIES = (1, 2, 3, 4, 5)

MIN_SHAPE_SIZE, MAX_SHAPE_SIZE = 16, 1024  # pixels a side: the shapes are drawn for small CLIPs


def _span(low: float | None, high: float | None, low_open: bool, high_open: bool) -> str:
    parts = []
    if low is not None:
        parts.append(f"{'>' if low_open else '>='} {low:g}")
    if high is not None:
        parts.append(f"{'<' if high_open else '<='} {high:g}")
    return " and ".join(parts)


def finite_number(
    value: float,
    what: str,
    low: float | None = None,
    high: float | None = None,
    *,
    low_open: bool = False,
    high_open: bool = False,
    example: str = "",
) -> float:
    """`value` if it is a finite number in the range, else an error naming `what`."""
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    if ok and low is not None:
        ok = value > low if low_open else value >= low
    if ok and high is not None:
        ok = value < high if high_open else value <= high
    if not ok:
        span = _span(low, high, low_open, high_open)
        wanted = " ".join(x for x in ("a finite number", span) if x)
        hint = f", e.g. {example}" if example else ""
        raise InvalidInputError(f"{what} {value}: use {wanted}{hint}")
    return float(value)


def whole_number(value: int, what: str, low: int | None = None, high: int | None = None) -> int:
    """`value` if it is an integer in [low, high], else an error naming `what`."""
    ok = isinstance(value, int) and not isinstance(value, bool)
    if ok and low is not None:
        ok = value >= low
    if ok and high is not None:
        ok = value <= high
    if not ok:
        raise InvalidInputError(
            f"{what} {value}: use a whole number {_span(low, high, False, False)}"
        )
    return value
