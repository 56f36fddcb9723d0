"""Running a converted image tower (models.openvino): compiled for the CPU, fed by the
same reading and batching as every engine, without torch."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from cliplens.decode_ahead import mark_fork_unsafe
from cliplens.device import Precision, cpu_has_fast_bf16
from cliplens.models.batched import BatchedEncoder, unit_rows
from cliplens.models.info import ModelInfo
from cliplens.models.openvino import Variant, folder_for

if TYPE_CHECKING:
    from cliplens.images import ImageSource
    from cliplens.models.encoder import ImageEncoding
    from cliplens.models.torch_encoder import TorchEncoder


def compile_config(precision: Precision, mode: str = "THROUGHPUT") -> dict[str, Any]:
    """How a tower is compiled: throughput streams over this process's cores (or one
    stream on all of them, for LATENCY), and the inference precision (int8 networks run
    their other layers in bf16 where the CPU has it, as OpenVINO does by default)."""
    hint = "bf16" if precision is Precision.BF16 else "f32"
    if precision is Precision.INT8:
        hint = "bf16" if cpu_has_fast_bf16() else "f32"
    threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    config: dict[str, Any] = {"INFERENCE_PRECISION_HINT": hint, "PERFORMANCE_HINT": mode}
    if threads:
        config["INFERENCE_NUM_THREADS"] = threads
    return config


class CompiledTower:
    """An IR compiled for the CPU: (B, 3, H, W) pixels -> (B, D) unnormalised rows, a
    batch split over the compiled streams."""

    def __init__(self, xml: Path, precision: Precision) -> None:
        import openvino as ov  # ~0.3 s: only when a network runs

        mark_fork_unsafe()  # OpenVINO's threads: decoder processes must not be forked now
        core = ov.Core()
        self.compiled = core.compile_model(core.read_model(xml), "CPU", compile_config(precision))
        self.streams = max(1, int(self.compiled.get_property("NUM_STREAMS")))
        self.queue = ov.AsyncInferQueue(self.compiled, self.streams)
        self._lock = threading.Lock()  # one batch at a time (a server encodes from threads)

    def __call__(self, pixels: np.ndarray) -> np.ndarray:
        with self._lock:
            return self._run(np.ascontiguousarray(pixels, dtype=np.float32))

    def _run(self, pixels: np.ndarray) -> np.ndarray:
        if self.streams == 1 or len(pixels) < 2 * self.streams:
            return np.array(self.compiled(pixels)[0], dtype=np.float32)
        parts = np.array_split(pixels, self.streams)
        out: list[np.ndarray | None] = [None] * len(parts)

        def done(request: Any, i: int) -> None:
            out[i] = np.array(request.get_output_tensor(0).data, dtype=np.float32)

        self.queue.set_callback(done)
        for i, part in enumerate(parts):
            self.queue.start_async({0: part}, i)
        self.queue.wait_all()
        return np.concatenate(out)  # type: ignore[arg-type]


class OpenVinoEncoder(BatchedEncoder):
    """Images through a compiled OpenVINO tower, texts through the ONNX text tower (or
    PyTorch where there is none); `load()` builds the PyTorch model for what needs it
    (training, gradients, probe features of the offline model)."""

    def __init__(
        self,
        info: ModelInfo,
        variant: Variant,
        feature_id: str,
        torch_loader: Callable[[], TorchEncoder],
        texts: Callable[[list[str]], np.ndarray] | None = None,
    ) -> None:
        base = info.quantized_from or info.model_id
        self.tower = CompiledTower(folder_for(base) / variant.file, variant.precision)
        self.info = info
        self.variant = variant
        self._feature_id = feature_id
        self._torch_loader = torch_loader
        self._texts = texts
        self.decode_workers = min(4, os.cpu_count() or 1)

    def _embed_pixels(self, pixels: np.ndarray) -> np.ndarray:
        return unit_rows(self.tower(pixels))

    def _embed_text_batch(self, texts: list[str]) -> np.ndarray:
        if self._texts is not None:
            return self._texts(texts)
        return self.load().encode_texts(texts)

    def load(self) -> TorchEncoder:
        """The PyTorch model (built on first use) for what the engine cannot do."""
        return self._torch_loader()

    def ready(self) -> OpenVinoEncoder:
        return self

    @property
    def feature_id(self) -> str:
        if self._feature_id == self.info.text_id:
            return self.info.model_id
        return self._feature_id

    def encode_features(
        self,
        items: Sequence[ImageSource],
        batch_size: int | None = None,
        progress: bool = False,
        max_megapixels: float | None = None,
    ) -> ImageEncoding:
        """Probe features: the embeddings, or the PyTorch model's own features where it has
        others (the offline model's pooled CNN features)."""
        if self._feature_id == self.info.text_id:
            return self.encode_images_lenient(items, batch_size, progress, max_megapixels)
        return self.load().encode_features(items, batch_size, progress, max_megapixels)
