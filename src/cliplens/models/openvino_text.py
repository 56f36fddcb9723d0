"""Text towers on OpenVINO: the tower and tokenizer of the ONNX export (models.onnx_text),
converted once beside the image tower in fp32, kept only where they reproduce PyTorch's
fp32 tower (cosine >= 0.9999 on `onnx_text.PROBES` one at a time, and on those and 256
label-like texts batched in reverse), and used where they were measured faster than the
text path a model has without them (the ONNX Runtime export, else PyTorch). Not bf16: a
bf16 text tower passed that check on a tiny random CLIP and then gave 0.99990 on other
texts, where bf16 image towers keep 0.99995.

One-shot queries keep the ONNX Runtime path: importing openvino alone costs 0.3 s. The
OpenVINO tower pays for many texts at once (classify's labels and templates) and once a
process has the engine loaded anyway (a server that embeds uploads).
"""

from __future__ import annotations

import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from cliplens.decode_ahead import mark_fork_unsafe
from cliplens.device import Precision
from cliplens.models.batched import unit_rows
from cliplens.models.bpe import TextTokenizer
from cliplens.models.onnx_text import (
    CLEANERS,
    MIN_COSINE,
    PROBES,
    find_text_encoder,
    save_tokenizer,
)

if TYPE_CHECKING:
    from cliplens.models.torch_encoder import TorchEncoder

TEXT_IR = "text.xml"
TOKENIZER = "text-tokenizer.json"
BATCH = 64


@dataclass(frozen=True)
class TextVariant:
    """A converted text tower on this CPU: kept or not, and its speed against the bar."""

    precision: Precision
    kept: bool
    texts_per_s: float
    bar: str  # what it was timed against: "onnxruntime" or "torch"
    bar_texts_per_s: float
    min_cosine: float
    cleaner: str
    with_mask: bool
    reason: str = ""

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> TextVariant:
        """The variant as `openvino.Measured.text` holds it (its dataclass fields)."""
        return cls(**{**record, "precision": Precision(record["precision"])})

    @property
    def faster(self) -> bool:
        return self.kept and self.texts_per_s > self.bar_texts_per_s

    def figures(self) -> str:
        verdict = "kept" if self.kept else f"refused ({self.reason})"
        return (
            f"{verdict}: {self.precision}, min cosine {self.min_cosine:.5f}, "
            f"{self.texts_per_s:.0f} texts/s against {self.bar_texts_per_s:.0f} on {self.bar}"
        )


class TextTower:
    """A compiled text tower and its tokenizer: texts -> L2-normalised float32 rows."""

    def __init__(self, folder: Path, variant: TextVariant) -> None:
        import openvino as ov  # only when a tower runs

        from cliplens.models.openvino_runtime import compile_config

        self.tokenizer = TextTokenizer(folder / TOKENIZER)
        self.clean = CLEANERS[variant.cleaner]
        self.with_mask = variant.with_mask
        mark_fork_unsafe()  # OpenVINO's threads (decode_ahead.process_pool)
        core = ov.Core()
        config = compile_config(variant.precision, mode="LATENCY")  # one batch, all cores
        self.compiled = core.compile_model(core.read_model(folder / TEXT_IR), "CPU", config)
        self._lock = threading.Lock()

    def __call__(self, texts: list[str]) -> np.ndarray:
        rows = []
        for start in range(0, len(texts), BATCH):
            ids, mask = self.tokenizer([self.clean(str(t)) for t in texts[start : start + BATCH]])
            feed = [ids, mask] if self.with_mask else [ids]
            with self._lock:
                rows.append(np.array(self.compiled(feed)[0], dtype=np.float32))
        return unit_rows(np.concatenate(rows)) if rows else np.zeros((0, 0), np.float32)


def _labels() -> list[str]:
    """256 label-like texts to time a tower on (ImageNet class prompts)."""
    from cliplens.models.offline import read_class_table  # the table ships with cliplens

    return [f"a photo of {row['text']}" for row in read_class_table()[:256]]


def _per_s(run: Any, texts: list[str]) -> float:
    run(texts[:BATCH])  # warm up
    t = time.perf_counter()
    run(texts)
    return len(texts) / (time.perf_counter() - t)


def measure_text(
    encoder: TorchEncoder, torch_encoder: TorchEncoder, folder: Path
) -> TextVariant | None:
    """Convert `encoder`'s text tower (fp32, CPU) into `folder`, check it against
    PyTorch's fp32 tower and time it; None where the backend has no exportable tower (as
    for the ONNX export)."""
    import openvino as ov
    import torch

    from cliplens.models.openvino_convert import quiet, save_ir

    graph = encoder.text_graph()
    if graph is None:
        return None
    clean = CLEANERS[graph.cleaner]
    probes = graph.tokenizer.encode_batch([clean(t) for t in PROBES])
    args = [torch.tensor([e.ids for e in probes])]
    if graph.with_mask:
        args.append(torch.tensor([e.attention_mask for e in probes]))
    with warnings.catch_warnings(), torch.inference_mode(), quiet():
        warnings.simplefilter("ignore")
        model = ov.convert_model(
            graph.module.eval(),
            example_input=tuple(args),
            input=[ov.PartialShape([-1, -1])] * len(args),
        )
    save_ir(model, folder / TEXT_IR)
    save_tokenizer(graph.tokenizer, folder / TOKENIZER)
    labels = _labels()
    texts = [*PROBES, *labels]  # the export's probes, and label-like texts
    want = encoder.encode_texts(texts)
    fast = find_text_encoder(encoder.info.model_id)
    bar, bar_run = ("onnxruntime", fast.encode_texts) if fast else ("torch", None)
    bar_run = bar_run or torch_encoder.encode_texts
    bar_speed = round(_per_s(bar_run, labels), 1)
    fp32 = Precision.FP32
    tower = TextTower(
        folder, TextVariant(fp32, True, 0.0, bar, bar_speed, 0.0, graph.cleaner, graph.with_mask)
    )
    one_by_one = np.concatenate([tower([t]) for t in PROBES])
    backwards = tower(texts[::-1])[::-1]
    cosine = float(
        min((one_by_one * want[: len(PROBES)]).sum(1).min(), (backwards * want).sum(1).min())
    )
    kept = cosine >= MIN_COSINE
    return TextVariant(
        precision=fp32,
        kept=kept,
        texts_per_s=round(_per_s(tower, labels), 1),
        bar=bar,
        bar_texts_per_s=bar_speed,
        min_cosine=round(cosine, 7),
        cleaner=graph.cleaner,
        with_mask=graph.with_mask,
        reason="" if kept else f"cosine to PyTorch's fp32 {cosine:.5f} < {MIN_COSINE}",
    )
