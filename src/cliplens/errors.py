"""Typed errors. Every message is one line that names the input and says what to do.

The library raises these and never exits or prints; the CLI and the server turn them
into exit codes, one-line messages and HTTP statuses at the edge.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

# A parameter as library messages name it: `max_megapixels`. The edges show it as their
# users know it: the CLI as the running command's flag (--max-megapixels), the server as
# the request field; a Python caller reads the parameter's own name.
PARAM = re.compile(r"`([a-z][a-z0-9_]*)`")


def name_params(message: str, name: Callable[[str], str | None]) -> str:
    """`message` with each `param` replaced by `name(param)` (kept as it is when None)."""
    return PARAM.sub(lambda m: name(m.group(1)) or m.group(0), message)


def one_line(e: BaseException) -> str:
    """An exception's message on one line (messages from libraries may span several)."""
    return " ".join(str(e).split()) or type(e).__name__


class ClipLensError(Exception):
    """Base class: anything cliplens raises on purpose."""

    #: exit code the CLI uses for this kind of error
    exit_code: int = 1


class InvalidInputError(ClipLensError, ValueError):
    """An argument the caller gave cannot be used (empty labels, bad template...)."""

    exit_code = 2


class DependencyMissingError(ClipLensError, ImportError):
    """An optional package a feature needs is not installed."""


# ---------------------------------------------------------------- models


class ModelError(ClipLensError):
    """Base class for model loading problems."""


class UnknownModelError(ModelError, InvalidInputError):
    """The model name does not match any known form."""

    exit_code = 2


class ModelUnavailableError(ModelError):
    """Weights could not be fetched (no network, hub down, gated repo...)."""

    def __init__(self, name: str, cache_dir: Path, reason: str) -> None:
        self.name, self.cache_dir, self.reason = name, cache_dir, reason
        # a form of the same kind of model that reads files already here, where there is one
        kin = {
            "transformers:": ", 'transformers:FOLDER' (one saved with save_pretrained)",
            "multilingual:": ", 'multilingual:TEXT_FOLDER+IMAGE_MODEL' (a text tower you have)",
        }
        same_kind = next((v for k, v in kin.items() if name.startswith(k)), "")
        super().__init__(
            f"cannot fetch weights for model '{name}' ({reason}); they are cached under "
            f"{cache_dir} once downloaded. Without network give `model` 'offline' (bundled, "
            f"no download), 'local:PATH' (a checkpoint you already have){same_kind}"
        )


class ModelIntegrityError(ModelError):
    """A weights file does not have the checksum it must have."""


# ---------------------------------------------------------------- images


class ImageError(ClipLensError):
    """An image could not be read. `path` names it, `reason` says why in a few words."""

    def __init__(self, path: str, reason: str) -> None:
        self.path, self.reason = path, reason
        super().__init__(f"{path}: {reason}")


class ImageNotFoundError(ImageError):
    pass


class EmptyImageError(ImageError):
    pass


class NotAnImageError(ImageError):
    pass


class UnsupportedImageError(ImageError):
    pass


class TruncatedImageError(ImageError):
    pass


class ImageTooLargeError(ImageError):
    pass
