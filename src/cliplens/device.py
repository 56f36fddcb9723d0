"""Device and precision choice.

bf16 weights pay on CPUs with native bf16 dot products (Intel AMX, AVX512_BF16 on
Intel and AMD Zen 4+): matmuls run 2.5-5x faster than fp32 and the embeddings agree
with fp32 to a cosine above 0.999. Elsewhere fp32 is the safe choice on CPU.

`Precision` is importable without torch (ModelInfo, ModelRef and the server settings
are torch-free); torch is imported by the functions that pick a device or a dtype.
"""

from __future__ import annotations

import functools
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING

from cliplens.errors import InvalidInputError

if TYPE_CHECKING:
    import torch


class Precision(StrEnum):
    """The number format of a model's weights and activations."""

    FP32 = "fp32"
    BF16 = "bf16"
    FP16 = "fp16"
    INT8 = "int8"  # OpenVINO only: a network quantised after training (models.openvino)

    @property
    def dtype(self) -> torch.dtype:
        import torch  # only when a network is built: Precision itself stays torch-free

        if self is Precision.INT8:
            raise InvalidInputError(
                "precision int8 runs on the OpenVINO engine only; use `engine` openvino "
                "(pip install 'cliplens[openvino]') or precision bf16 or fp32"
            )
        return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[self.value]


def gpu_visible() -> bool:
    """Whether a GPU torch could use is visible, without importing torch (a CUDA driver's
    device files, or Apple silicon): decides whether a CPU engine may run by default."""
    import platform
    import sys

    if sys.platform == "darwin":
        return platform.machine() == "arm64"
    return Path("/proc/driver/nvidia/gpus").is_dir() or Path("/dev/nvidia0").exists()


def cpu_name() -> str:
    """The CPU's model name (where an engine's speed was measured)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


@functools.cache
def cpu_has_fast_bf16() -> bool:
    """True when the CPU has bf16 dot-product instructions (AMX-BF16 or AVX512_BF16)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:  # not Linux: no cheap way to tell, stay with fp32
        return False
    flags: set[str] = set()
    for line in text.splitlines():
        if line.startswith("flags"):
            flags.update(line.split(":", 1)[1].split())
            break
    return bool({"amx_bf16", "avx512_bf16"} & flags)


def choose_device(requested: str | None = None) -> torch.device:
    """The device asked for (checked to exist here), or the best one present."""
    import torch  # a device is chosen only to build a network: keeps this module torch-free

    if requested in (None, "", "auto"):
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(requested)
    except RuntimeError as e:
        raise InvalidInputError(
            f"device '{requested}' is not a device name; use cpu, cuda, cuda:N or mps"
        ) from e
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InvalidInputError(
            f"device '{requested}': CUDA is not available here; use `device` cpu"
        )
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise InvalidInputError(
            f"device '{requested}': MPS is not available here; use `device` cpu"
        )
    return device


def parse_precision(requested: str | Precision | None) -> Precision | None:
    """`requested` as a Precision; None for automatic (None, "" or "auto")."""
    if requested in (None, "", "auto"):
        return None
    try:
        return Precision(requested)
    except ValueError as e:
        raise InvalidInputError(
            f"precision '{requested}' is unknown; use fp32, bf16, fp16, int8 or auto"
        ) from e


def choose_precision(device: torch.device, requested: str | Precision | None = None) -> Precision:
    """The precision asked for (checked against the device), or the best one for it."""
    import torch  # see choose_device

    precision = parse_precision(requested)
    if precision is not None:
        if device.type == "cpu" and precision is Precision.FP16:
            raise InvalidInputError("precision fp16 is not supported on CPU; use bf16 or fp32")
        if precision is Precision.INT8:
            precision.dtype  # noqa: B018 (raises: torch networks have no int8 here)
        return precision
    if device.type == "cuda":
        return Precision.BF16 if torch.cuda.is_bf16_supported() else Precision.FP16
    if device.type == "mps":
        return Precision.FP16
    return Precision.BF16 if cpu_has_fast_bf16() else Precision.FP32
