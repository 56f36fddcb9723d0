"""Model names and what they resolve to.

offline                     the bundled ConSE model (no download)
ARCH:TAG                    open_clip architecture + pretrained tag (downloaded, cached)
ARCH:PATH                   open_clip architecture + a state-dict file
hf-hub:ORG/NAME             an open_clip model on the Hugging Face hub
local:PATH                  a checkpoint folder or file that records its architecture
transformers:ORG/NAME       a transformers CLIP, SigLIP or SigLIP2 model on the hub
transformers:FOLDER         one saved with `save_pretrained`
multilingual:NAME           a multilingual text tower paired with the image tower it was
                            trained to match (sentence-transformers' layout)
multilingual:TEXT+IMAGE     a sentence-transformers folder with any image model's name
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING

from cliplens.device import Precision, choose_device, choose_precision
from cliplens.errors import UnknownModelError
from cliplens.settings import get_settings

if TYPE_CHECKING:
    from cliplens.models.torch_encoder import TorchEncoder

OFFLINE = "offline"


class Kind(str, Enum):
    OFFLINE = "offline"
    PRETRAINED = "pretrained"  # arch:tag or arch:path
    HUB = "hf-hub"
    LOCAL = "local"
    TRANSFORMERS = "transformers"
    MULTILINGUAL = "multilingual"


@dataclass(frozen=True)
class ModelSpec:
    """A parsed model name: which backend, and what it loads."""

    name: str
    kind: Kind
    arch: str = ""
    target: str = ""  # tag, file path, hub repo or local path


def parse_model_name(name: str | None) -> ModelSpec:
    """What `name` refers to (the default model for None, "" or "default"), checked
    against open_clip's architectures and tags without loading anything."""
    name = (name or "").strip()
    if name in ("", "default"):
        name = get_settings().default_model
    if name == OFFLINE:
        return ModelSpec(name, Kind.OFFLINE)
    if name.startswith("hf-hub:"):
        repo = name.removeprefix("hf-hub:").strip("/")
        if repo.count("/") != 1:
            raise UnknownModelError(f"model '{name}': write hf-hub:ORG/NAME")
        return ModelSpec(name, Kind.HUB, target=repo)
    if name.startswith("local:"):
        path = name.removeprefix("local:")
        if not path:
            raise UnknownModelError(f"model '{name}': write local:PATH to a checkpoint")
        return ModelSpec(name, Kind.LOCAL, target=path)
    for kind, form in (
        (Kind.TRANSFORMERS, "ORG/NAME or FOLDER"),
        (Kind.MULTILINGUAL, "NAME or TEXT_FOLDER+IMAGE_MODEL"),
    ):
        prefix = f"{kind.value}:"
        if name.startswith(prefix):
            target = name.removeprefix(prefix).strip()
            if not target:
                raise UnknownModelError(f"model '{name}': write {prefix}{form}")
            return ModelSpec(name, kind, target=target)
    import open_clip  # heavy (torch): only to check a name that is not offline or local

    arch, sep, target = name.partition(":")
    known = open_clip.list_models()
    if arch not in known:
        close = difflib.get_close_matches(arch, [*known, OFFLINE], n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise UnknownModelError(
            f"model '{name}' is unknown{hint} (see 'cliplens models'; other forms: offline, "
            f"hf-hub:ORG/NAME, local:PATH, transformers:ORG/NAME, multilingual:NAME)"
        )
    tags = open_clip.list_pretrained_tags_by_model(arch)
    if not sep or not target:
        raise UnknownModelError(
            f"model '{name}' names no weights; write {arch}:TAG with TAG one of "
            f"{', '.join(tags) or '(none published)'}, or {arch}:PATH to a state-dict file"
        )
    if target not in tags and not Path(target).expanduser().exists():
        close = difflib.get_close_matches(target, tags, n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise UnknownModelError(
            f"model '{name}': '{target}' is neither a weights tag of {arch} nor a file{hint} "
            f"(tags: {', '.join(tags) or 'none'})"
        )
    return ModelSpec(name, Kind.PRETRAINED, arch=arch, target=target)


def load_model(
    name: str | None = None,
    device: str | None = None,
    precision: str | Precision | None = None,
) -> TorchEncoder:
    """Load a model by name on the best device and precision (or the ones asked for).

    Why: every backend (open_clip, hub, local checkpoints, the bundled offline model)
    comes back as one `TorchEncoder`, which satisfies `Encoder`. Use `ModelRef` instead
    where the network may not be needed at all.

    >>> import cliplens
    >>> model = cliplens.load_model("offline", device="cpu")
    >>> model.encode_texts(["a red boat"]).shape
    """
    spec = parse_model_name(name)
    dev = choose_device(device)
    prec = choose_precision(dev, precision)
    if spec.kind is Kind.OFFLINE:
        from cliplens.models.offline import OfflineEncoder  # heavy: torch, only when loaded

        return OfflineEncoder(dev, prec)
    if spec.kind is Kind.TRANSFORMERS:
        from cliplens.models.hf_transformers import load_transformers  # heavy: transformers

        return load_transformers(spec.name, spec.target, dev, prec)
    if spec.kind is Kind.MULTILINGUAL:
        from cliplens.models.multilingual import load_multilingual  # heavy: transformers

        return load_multilingual(spec.name, spec.target, dev, prec, load_image=load_model)
    from cliplens.models import openclip  # heavy: torch and open_clip, only when loaded

    if spec.kind is Kind.HUB:
        return openclip.load_hub(spec.name, spec.target, dev, prec)
    if spec.kind is Kind.LOCAL:
        return openclip.load_local(spec.name, Path(spec.target), dev, prec)
    return openclip.load_pretrained(spec.name, spec.arch, spec.target, dev, prec)
