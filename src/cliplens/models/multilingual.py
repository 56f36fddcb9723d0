"""`multilingual:` models: a text tower in 50+ languages paired with a CLIP image tower.

sentence-transformers publishes text encoders trained by distillation to land where a
CLIP model's English text tower puts the same sentence, in any of their languages; the
image tower is the teacher's own, unchanged. Such a pairing is one cliplens model:
images go through the image model (any cliplens model, loaded as usual), texts through
the sentence-transformers model (Transformer -> mean Pooling -> Dense, read from its
saved layout: modules.json, the transformer, 1_Pooling/, 2_Dense/).

Names:

    multilingual:NAME                      a pairing its authors document (`PAIRINGS`),
                                           the text tower fetched from the hub
    multilingual:TEXT_FOLDER+IMAGE_MODEL   a local sentence-transformers folder and any
                                           cliplens model name for the images, e.g.
                                           multilingual:/models/st-text+local:/models/clip

The text tower runs through transformers' AutoModel, not sentence-transformers itself:
the same computation (mean over real tokens, then each Dense layer with its saved
activation) without that package as a dependency or its 8 s of imports.

Identity: the vectors are keyed `multilingual:{text digest}+{image model_id}`. Its image
vectors equal the image model's own, so sharing the image model's model_id would let a
catalog indexed with it be searched in German without encoding a photo again. But
what belongs to the text side is keyed by model_id too: the ONNX text export
(`onnx_text.export_text` writes under `info.model_id`, `ModelRef.fast_text` reads under
`info.text_id`, which is the model_id) and the OpenVINO text tower (in the model_id's
meta.json). A shared model_id would send German queries through the image model's
exported English tower, or overwrite that export. So the pairing keeps a model_id of
its own until `ModelInfo` names the text tower apart from the image vectors; then its
model_id becomes the image model's and the text digest goes to that field
(`_identity`).
"""

from __future__ import annotations

import importlib
import json
import threading
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from cliplens.device import Precision
from cliplens.errors import InvalidInputError, ModelUnavailableError, UnknownModelError
from cliplens.models.hf_transformers import no_progress_bars, shaping_files
from cliplens.models.info import ModelInfo
from cliplens.models.onnx_text import TextGraph, padded_tokenizer
from cliplens.models.torch_encoder import TorchEncoder
from cliplens.models.weights import combined_digest
from cliplens.settings import get_settings

PREFIX = "multilingual:"


@dataclass(frozen=True)
class Pairing:
    """A text tower on the hub and the cliplens name of the image tower it matches."""

    text_repo: str
    image_model: str


PAIRINGS: dict[str, Pairing] = {
    # The model card of sentence-transformers/clip-ViT-B-32-multilingual-v1: "We use the
    # original clip-ViT-B-32 for encoding images", i.e. OpenAI's ViT-B/32 (open_clip's
    # ViT-B-32:openai). It is the only multilingual tower its authors publish for
    # images (sbert.net, "Image Search").
    "clip-ViT-B-32-multilingual-v1": Pairing(
        "sentence-transformers/clip-ViT-B-32-multilingual-v1", "ViT-B-32:openai"
    ),
}

# a transformer's weights, first found wins (safetensors before pickles)
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
# sentence-transformers' module types by their last name (older releases wrote
# sentence_transformers.models.Dense, newer ones sentence_transformers.base.modules...)
KNOWN_MODULES = ("Transformer", "Pooling", "Dense", "Normalize")
# beside the weights, the files that decide what a text's vector is (the chain, the
# tokenizer, the maximum length, lowercasing, pooling, activations): a tower with one of
# them edited is another model
SHAPING_FILES = (
    "modules.json",
    "config.json",
    "sentence_bert_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.txt",
    "sentencepiece.bpe.model",
)


def load_multilingual(
    name: str,
    target: str,
    device: torch.device,
    precision: Precision,
    load_image: Callable[..., TorchEncoder],
) -> MultilingualEncoder:
    """`multilingual:NAME` or `multilingual:TEXT_FOLDER+IMAGE_MODEL` as one encoder.

    Why: a query in German finds the photos its English translation finds, with the
    image tower those photos were (or will be) embedded by. `load_image` loads the image
    model by name (the registry's `load_model`); this module cannot import the registry,
    which imports it.
    """
    folder, image_name, label = _resolve(name, target)
    if image_name.startswith(PREFIX):
        raise UnknownModelError(
            f"model '{name}': the image model '{image_name}' is itself multilingual; "
            f"name an image model such as ViT-B-32:openai or local:PATH"
        )
    text = SentenceTower(name, folder, device, precision)
    image = load_image(image_name, device=str(device), precision=precision)
    return MultilingualEncoder.pair(name, label, text, image)


def _resolve(name: str, target: str) -> tuple[Path, str, str]:
    """(text folder, image model name, text tower label) for a `multilingual:` target."""
    pairing = PAIRINGS.get(target) or next(
        (p for p in PAIRINGS.values() if p.text_repo == target), None
    )
    if pairing is not None:
        return hub_folder(name, pairing.text_repo), pairing.image_model, pairing.text_repo
    # split at the first '+' whose left part is a sentence-transformers folder: paths and
    # model names may hold a '+' of their own
    for at in (i for i, c in enumerate(target) if c == "+"):
        folder = Path(target[:at]).expanduser()
        if (folder / "modules.json").is_file() and target[at + 1 :].strip():
            return folder.resolve(), target[at + 1 :].strip(), folder.name
    known = ", ".join(PAIRINGS)
    if "+" in target:
        raise InvalidInputError(
            f"model '{name}': no sentence-transformers folder (one holding modules.json) "
            f"before a '+' in '{target}'; write {PREFIX}TEXT_FOLDER+IMAGE_MODEL"
        )
    raise UnknownModelError(
        f"model '{name}': '{target}' is not a known pairing ({known}); for your own text "
        f"tower write {PREFIX}TEXT_FOLDER+IMAGE_MODEL"
    )


# ---------------------------------------------------------------- the hub


def hub_folder(name: str, repo: str) -> Path:
    """The text tower's files from the hub, into the model cache (cache first; offline,
    the one-line `ModelUnavailableError` at once)."""
    from huggingface_hub import list_repo_files, snapshot_download

    from cliplens.models.hub import check_reachable as _check_hub_reachable
    from cliplens.models.hub import short_reason as _short_reason

    cache = get_settings().model_cache
    hit = _cached_snapshot(repo, cache)
    if hit is not None:
        return hit
    _check_hub_reachable(name, cache)
    cache.mkdir(parents=True, exist_ok=True)
    try:
        patterns = _wanted(list_repo_files(repo))
        folder = Path(snapshot_download(repo, cache_dir=str(cache), allow_patterns=patterns))
    except Exception as e:  # network, hub, auth: all mean "could not fetch"
        raise ModelUnavailableError(name, cache, _short_reason(e)) from e
    if not (folder / "modules.json").is_file():
        raise ModelUnavailableError(name, cache, f"{repo} has no modules.json")
    return folder


def _cached_snapshot(repo: str, cache: Path) -> Path | None:
    from huggingface_hub import snapshot_download

    try:
        folder = Path(snapshot_download(repo, cache_dir=str(cache), local_files_only=True))
    except Exception:  # not cached (the hub client's own LocalEntryNotFoundError and kin)
        return None
    return folder if _complete(folder) else None


def _complete(folder: Path) -> bool:
    """Whether a snapshot holds what loading it reads: modules.json, and the weights of
    its Transformer and of each Dense layer (a download cut short lacks some)."""
    try:
        modules = json.loads((folder / "modules.json").read_text())
        kinds = [(str(m.get("type", "")).rpartition(".")[2], m.get("path", "")) for m in modules]
    except (OSError, ValueError, TypeError, AttributeError):
        return False
    needs = [folder / path for kind, path in kinds if kind in ("Transformer", "Dense")]
    return bool(needs) and all(any((d / fn).is_file() for fn in WEIGHT_FILES) for d in needs)


def _wanted(files: list[str]) -> list[str]:
    """What a PyTorch forward needs of a repo: configs, tokenizer and one weights file
    per folder, not its ONNX, OpenVINO, TensorFlow or Flax copies."""
    skipped = ("onnx/", "openvino/")
    keep = [f for f in files if not f.startswith(skipped)]
    weights: dict[str, str] = {}
    for f in keep:
        folder, _, base = f.rpartition("/")
        if base in WEIGHT_FILES and (
            folder not in weights or WEIGHT_FILES.index(base) < WEIGHT_FILES.index(weights[folder])
        ):
            weights[folder] = base
    other = [f for f in keep if f.rpartition("/")[2] not in WEIGHT_FILES]
    texts = [f for f in other if f.endswith((".json", ".txt", ".model"))]
    return texts + [f"{d}/{w}" if d else w for d, w in weights.items()]


# ---------------------------------------------------------------- the text tower


def _read_json(name: str, path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise InvalidInputError(f"model '{name}': cannot read {path} ({e})") from e


def _weights_in(name: str, folder: Path) -> Path:
    for fn in WEIGHT_FILES:
        if (folder / fn).is_file():
            return folder / fn
    raise InvalidInputError(
        f"model '{name}': {folder} holds no {' or '.join(WEIGHT_FILES)}; save the model "
        f"with sentence-transformers' save()"
    )


def _modules(name: str, folder: Path) -> list[tuple[str, Path]]:
    """modules.json as (kind, folder) in order, checked: a Transformer, mean Pooling,
    then Dense layers and at most a Normalize."""
    found = []
    for entry in _read_json(name, folder / "modules.json"):
        kind = str(entry.get("type", "")).rpartition(".")[2]
        if kind not in KNOWN_MODULES:
            raise InvalidInputError(
                f"model '{name}': {folder} has a {entry.get('type')} module; cliplens "
                f"reads {', '.join(KNOWN_MODULES)} modules"
            )
        found.append((kind, folder / entry.get("path", "")))
    kinds = [k for k, _ in found]
    # a last Normalize changes nothing here (rows are normalised anyway); anywhere else
    # it would change what the Dense layers see
    layers = kinds[2:-1] if kinds[-1:] == ["Normalize"] else kinds[2:]
    if kinds[:2] != ["Transformer", "Pooling"] or any(k != "Dense" for k in layers):
        raise InvalidInputError(
            f"model '{name}': {folder} chains {' -> '.join(kinds) or 'nothing'}; cliplens "
            f"reads Transformer -> Pooling -> Dense layers (-> Normalize)"
        )
    return found


def _check_pooling(name: str, folder: Path) -> None:
    """Mean pooling, in either way sentence-transformers writes it."""
    cfg = _read_json(name, folder / "config.json")
    mode = cfg.get("pooling_mode")
    if mode is None:  # older releases: one flag per mode
        mode = [
            k.removeprefix("pooling_mode_")
            for k, v in cfg.items()
            if k.startswith("pooling_mode_") and v
        ]
    modes = [mode] if isinstance(mode, str) else list(mode)
    if modes not in (["mean"], ["mean_tokens"]):
        raise InvalidInputError(
            f"model '{name}': {folder} pools by {', '.join(modes) or 'nothing'}; cliplens "
            f"reads mean pooling only"
        )


def _activation(name: str, path: str | None) -> torch.nn.Module:
    """The Dense layer's activation as saved ("torch.nn.modules.activation.Tanh"); only
    torch's own modules, as sentence-transformers allows without remote code."""
    if not path:
        return torch.nn.Identity()
    module, _, attr = path.rpartition(".")
    cls = None
    if path.startswith("torch."):
        try:
            cls = getattr(importlib.import_module(module), attr, None)
        except ImportError:
            cls = None
    if not (isinstance(cls, type) and issubclass(cls, torch.nn.Module)):
        raise InvalidInputError(
            f"model '{name}': Dense activation '{path}' is not a torch.nn module; cliplens "
            f"runs torch's own activations only"
        )
    return cls()


def _dense(name: str, folder: Path) -> tuple[torch.nn.Module, Path]:
    """One Dense layer (Linear, then its activation) and its weights file."""
    from safetensors.torch import load_file

    cfg = _read_json(name, folder / "config.json")
    if cfg.get("use_residual"):
        raise InvalidInputError(
            f"model '{name}': {folder} adds a residual; cliplens reads plain Dense layers"
        )
    try:
        sizes = int(cfg["in_features"]), int(cfg["out_features"])
    except (KeyError, TypeError, ValueError) as e:
        raise InvalidInputError(
            f"model '{name}': {folder}/config.json names no in_features and out_features"
        ) from e
    linear = torch.nn.Linear(*sizes, bias=bool(cfg.get("bias", True)))
    weights = _weights_in(name, folder)
    if weights.suffix == ".safetensors":
        state = load_file(str(weights))
    else:
        state = torch.load(weights, map_location="cpu", weights_only=True)
    try:
        linear.load_state_dict({k.removeprefix("linear."): v for k, v in state.items()})
    except RuntimeError as e:
        raise InvalidInputError(
            f"model '{name}': {weights} does not fit {folder}/config.json"
        ) from e
    if "activation_function" in cfg:
        activation = _activation(name, cfg["activation_function"])
    else:  # none saved: sentence-transformers' default
        activation = torch.nn.Tanh()
    return torch.nn.Sequential(linear, activation), weights


class _PooledDense(torch.nn.Module):
    """(ids, mask) -> the transformer's mean over real tokens -> each Dense layer: the
    whole text tower as one module (for the ONNX export as well)."""

    def __init__(self, transformer: torch.nn.Module, dense: torch.nn.Module) -> None:
        super().__init__()
        self.transformer, self.dense = transformer, dense

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        hidden = self.transformer(input_ids=ids, attention_mask=mask).last_hidden_state.float()
        m = mask.unsqueeze(-1).float()
        return self.dense((hidden * m).sum(1) / m.sum(1).clamp(min=1e-9))


class SentenceTower:
    """A sentence-transformers text model in its saved layout, run through transformers.

    Why: the forward is three steps, and transformers is already a dependency; loading it
    takes a second where sentence-transformers' imports take eight.
    """

    def __init__(self, name: str, folder: Path, device: torch.device, precision: Precision) -> None:
        from tokenizers import normalizers
        from transformers import AutoModel, AutoTokenizer

        modules = _modules(name, folder)
        root = modules[0][1]
        _check_pooling(name, modules[1][1])
        layers = [_dense(name, path) for kind, path in modules[2:] if kind == "Dense"]
        sbert = root / "sentence_bert_config.json"
        cfg = _read_json(name, sbert) if sbert.is_file() else {}
        try:
            with no_progress_bars():
                self.tokenizer = AutoTokenizer.from_pretrained(str(root))
                model = AutoModel.from_pretrained(str(root))
        except (OSError, ValueError) as e:
            raise InvalidInputError(f"model '{name}': transformers cannot load {root} ({e})") from e
        if cfg.get("do_lower_case") and self.tokenizer.is_fast:  # as sentence-transformers does
            backend = self.tokenizer.backend_tokenizer
            rest = [backend.normalizer] if backend.normalizer is not None else []
            backend.normalizer = normalizers.Sequence([normalizers.Lowercase(), *rest])
        positions = getattr(model.config, "max_position_embeddings", 512)
        self.max_length = int(
            cfg.get("max_seq_length") or min(self.tokenizer.model_max_length, positions)
        )
        dense = torch.nn.Sequential(*(layer for layer, _ in layers)).to(device)
        model = model.to(device=device, dtype=precision.dtype).eval().requires_grad_(False)
        self.module = _PooledDense(model, dense.eval().requires_grad_(False)).eval()
        self.device = device
        out = [m for layer, _ in layers for m in layer.modules() if isinstance(m, torch.nn.Linear)]
        self.dim = out[-1].out_features if out else int(model.config.hidden_size)
        folders = dict.fromkeys([folder, *(path for _, path in modules)])
        shaping = [f for d in folders for f in shaping_files(d, SHAPING_FILES, patterns=())]
        # what the identity is a digest of, and what ModelRef's records check
        self.files = (_weights_in(name, root), *(w for _, w in layers), *shaping)
        self.n_params = sum(p.numel() for p in self.module.parameters())
        # a fast tokenizer keeps its padding and truncation settings in shared state, set
        # anew by a call with other settings: one call at a time
        self._tokenizer_lock = threading.Lock()

    def ids(self, texts: list[str]) -> list[list[int]]:
        """The token ids the tower sees, unpadded and cut at `max_length`."""
        with self._tokenizer_lock:
            batch = self.tokenizer(list(texts), truncation=True, max_length=self.max_length)
        return batch["input_ids"]

    def __call__(self, texts: list[str]) -> torch.Tensor:
        with self._tokenizer_lock:
            batch = self.tokenizer(
                list(texts),
                padding=True,
                truncation=True,
                max_length=self.max_length,
                return_tensors="pt",
            )
        batch = batch.to(self.device)
        return self.module(batch["input_ids"], batch["attention_mask"])


# ---------------------------------------------------------------- the pairing


def _identity(text: SentenceTower, image: ModelInfo) -> str:
    """The pairing's model_id: its own, since the text side is keyed by model_id too
    (module docstring)."""
    return f"multilingual:{combined_digest(text.files)}+{image.model_id}"


class MultilingualEncoder(TorchEncoder):
    """Images through the image model, texts through the multilingual text tower."""

    def __init__(self, text: SentenceTower, image: TorchEncoder, info: ModelInfo) -> None:
        self.text, self.image, self.info = text, image, info
        self.default_batch_size = image.default_batch_size
        self.decode_workers = image.decode_workers

    @classmethod
    def pair(
        cls, name: str, label: str, text: SentenceTower, image: TorchEncoder
    ) -> MultilingualEncoder:
        """The two towers as one model, refused where their vectors differ in size."""
        i = image.info
        if text.dim != i.dim:
            raise InvalidInputError(
                f"model '{name}': the text tower {label} makes {text.dim}-d vectors and the "
                f"image model {i.name} {i.dim}-d; pair a text tower trained to match that "
                f"image tower"
            )
        try:
            image_params = sum(p.numel() for p in image.image_tower().parameters())
        except InvalidInputError:  # a backend without a separable image tower
            image_params = i.n_params
        info = ModelInfo(
            name=name,
            model_id=_identity(text, i),
            arch=f"multilingual({label}, {i.arch})",
            dim=i.dim,
            preprocessing=i.preprocessing,
            logit_scale=i.logit_scale,
            logit_bias=i.logit_bias,
            context_length=text.max_length,
            weights=(*i.weights, *text.files),
            n_params=image_params + text.n_params,
            device=i.device,
            precision=i.precision,
            cosine_threshold=i.cosine_threshold,
        )
        return cls(text, image, info)

    def _encode_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.image._encode_pixels(pixels)

    def _encode_text_batch(self, texts: list[str]) -> torch.Tensor:
        return self.text(texts)

    def image_tower(self) -> torch.nn.Module:
        return self.image.image_tower()

    def with_image_tower(self, tower: torch.nn.Module, model_id: str) -> MultilingualEncoder:
        image = self.image.with_image_tower(tower, model_id)
        return MultilingualEncoder(self.text, image, replace(self.info, model_id=model_id))

    def token_counts(self, texts: list[str]) -> list[int] | None:
        return [len(row) for row in self.text.ids(texts)]

    def text_graph(self) -> TextGraph | None:
        if self.info.precision != Precision.FP32:
            return None
        return TextGraph(
            module=self.text.module,
            tokenizer=padded_tokenizer(self.text.tokenizer, self.text.max_length),
            cleaner="none",
            with_mask=True,
            any_length=True,
            token_ids=self.text.ids,
        )
