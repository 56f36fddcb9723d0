"""What a model is, without importing torch: enough to key, scan and search a catalog."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cliplens.device import Precision
from cliplens.preprocess import Preprocessing

# an int8 network's model_id is its full-precision model's with this suffix
INT8_SUFFIX = "+int8"


@dataclass(frozen=True)
class ModelInfo:
    """What a loaded model is. `model_id` (arch + weights hash) keys stored embeddings.

    Torch-free, so a catalog can be keyed and searched without loading the network.

    >>> import cliplens
    >>> info = cliplens.ModelRef("offline").info
    >>> info.model_id, info.dim, info.preprocessing.image_size
    """

    name: str
    model_id: str
    arch: str
    dim: int
    preprocessing: Preprocessing
    logit_scale: float
    logit_bias: float | None = None
    context_length: int | None = None
    weights: tuple[Path, ...] = ()
    n_params: int = 0
    device: str = "cpu"
    precision: Precision = Precision.FP32
    # what runs the network: "torch" or "openvino" (models.openvino)
    engine: str = "torch"
    # an int8 network's full-precision model: its text tower and space (model_id differs,
    # so a catalog keeps int8 vectors apart from fp32 and bf16 ones)
    quantized_from: str | None = None
    # multi-label default: cosine similarity above which a label counts as present
    cosine_threshold: float = 0.25

    @property
    def text_id(self) -> str:
        """The model_id whose text tower embeds this model's texts."""
        return self.quantized_from or self.model_id

    @property
    def weights_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.weights if p.exists())

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["weights"] = [str(p) for p in self.weights]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelInfo:
        d = dict(d)
        pp = d.pop("preprocessing")
        for key in ("mean", "std"):
            pp[key] = tuple(pp[key])
        known = {f.name for f in dataclasses.fields(cls)}
        if "precision" in d:
            d["precision"] = Precision(d["precision"])
        return cls(
            preprocessing=Preprocessing(**pp),
            weights=tuple(Path(p) for p in d.pop("weights", ())),
            **{k: v for k, v in d.items() if k in known},
        )
