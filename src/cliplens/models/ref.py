"""A model by name, loaded only when something has to be encoded.

A catalog needs a model's identity (model_id, dim, preprocessing) to know what is
already indexed; only new photos need the network itself. Every load records the
identity under CLIPLENS_HOME/loaded-models.json together with the size and mtime of
its weight files, so a later process that finds nothing to encode never imports torch
while those files are unchanged. Text queries go through the ONNX export of the text
tower when there is one (models.onnx_text).
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from cliplens import __version__
from cliplens.device import Precision, gpu_visible, parse_precision
from cliplens.errors import DependencyMissingError, InvalidInputError, ModelError
from cliplens.models import openvino
from cliplens.models.encoder import ImageEncoding
from cliplens.models.info import ModelInfo
from cliplens.models.onnx_text import (
    OnnxTextEncoder,
    attempted,
    can_export,
    export_text,
    find_text_encoder,
)
from cliplens.models.openvino import Engine, parse_engine
from cliplens.models.registry import load_model
from cliplens.settings import get_settings
from cliplens.store.files import write_atomic

if TYPE_CHECKING:
    from cliplens.images import ImageSource
    from cliplens.models.batched import BatchedEncoder
    from cliplens.models.torch_encoder import TorchEncoder


def _records_path() -> Path:
    return get_settings().home / "loaded-models.json"


def _record_key(name: str) -> str:
    """Names with relative paths in them mean different files in different folders."""
    text, plus, image = name.removeprefix("multilingual:").partition("+")
    if name.startswith("multilingual:") and plus:  # a text folder + an image model's name
        folder = str(Path(text).expanduser().resolve()) if os.sep in text else text
        return f"multilingual:{folder}+{_record_key(image)}"
    prefix, sep, target = name.rpartition(":")
    explicit = target.startswith((".", "~", os.sep))
    looks_like_path = explicit or os.sep in target
    # ORG/NAME on the hub, unless such a folder is here
    hub = name.startswith("hf-hub:") or (
        name.startswith("transformers:") and not explicit and not Path(target).exists()
    )
    if sep and looks_like_path and not hub:
        return f"{prefix}:{Path(target).expanduser().resolve()}"
    return name


def _stamps(paths: Sequence[Path]) -> list[list[Any]] | None:
    try:
        return [[str(p), (st := p.stat()).st_size, st.st_mtime_ns] for p in paths]
    except OSError:
        return None


def _read_records() -> dict[str, Any]:
    try:
        return json.loads(_records_path().read_text())
    except (OSError, ValueError):
        return {}


def recorded_info(name: str) -> ModelInfo | None:
    """The identity of `name` from an earlier load, if its weight files are unchanged."""
    rec = _read_records().get(_record_key(name))
    if not rec or rec.get("version") != __version__:
        return None
    info = ModelInfo.from_dict(rec["info"])
    if not info.weights or _stamps(info.weights) != rec.get("stamps"):
        return None
    return info


def record_info(name: str, info: ModelInfo) -> None:
    stamps = _stamps(info.weights)
    if not info.weights or stamps is None:
        return  # nothing to check a record against: always load
    records = _read_records()
    records[_record_key(name)] = {"version": __version__, "stamps": stamps, "info": info.to_dict()}
    path = _records_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, lambda tmp: tmp.write_text(json.dumps(records, indent=1)))
    except OSError:
        pass  # a read-only home only costs loading the model next time


class ModelRef:
    """A model by name that satisfies `Encoder`, loaded only when something is encoded.

    Why: a catalog scan or a text query needs the model's identity, not its network;
    the identity comes from the record of an earlier load and text queries from the
    ONNX text tower, so neither imports torch while the weight files are unchanged.
    Images go through the engine `ready()` picks: OpenVINO on CPU where it is installed
    and measured faster (models.openvino), else PyTorch.

    >>> import cliplens
    >>> model = cliplens.ModelRef("offline")
    >>> model.encode_texts(["a red boat"]).shape
    """

    def __init__(
        self,
        name: str | None = None,
        device: str | None = None,
        precision: Precision | str | None = None,
        engine: Engine | str | None = None,
    ) -> None:
        name = (name or "").strip()
        self.name = get_settings().default_model if name in ("", "default") else name
        self.device = device
        self.precision: Precision | None = parse_precision(precision)
        self.engine = parse_engine(engine)
        if self.precision is Precision.INT8 and self.engine is Engine.TORCH:
            raise InvalidInputError(
                "precision int8 runs on the OpenVINO engine; use `engine` openvino or auto"
            )
        self._encoder: TorchEncoder | None = None
        self._ready: BatchedEncoder | None = None
        self._info: ModelInfo | None = None
        self._text: OnnxTextEncoder | Literal[False] | None = None  # False: there is none
        self._text_lock = threading.Lock()
        self._load_lock = threading.Lock()
        self._ready_lock = threading.Lock()
        # models.openvino_text.TextTower once built; False: none kept and faster here
        self._ov_text_tower: Any = None
        # told before work that takes long once (converting and measuring for OpenVINO)
        self.announce: Callable[[str], None] | None = None

    @property
    def loaded(self) -> bool:
        return self._encoder is not None or self._ready is not None

    @property
    def info(self) -> ModelInfo:
        """The identity of the vectors this model makes (an int8 network's are its own)."""
        if self._ready is not None:
            return self._ready.info
        base = self._base_info()
        return openvino.int8_info(base) if self.precision is Precision.INT8 else base

    def _base_info(self) -> ModelInfo:
        if self._encoder is not None:
            return self._encoder.info
        if self._info is None:
            self._info = recorded_info(self.name) or self.load().info
        return self._info

    @property
    def feature_id(self) -> str:
        """Names the space of `encode_features` (loads the model: backends differ)."""
        return self.ready().feature_id

    def load(self) -> TorchEncoder:
        """The loaded encoder itself (imports torch and builds the network the first
        time, once even when several threads ask at once)."""
        with self._load_lock:
            if self._encoder is None:
                precision = None if self.precision is Precision.INT8 else self.precision
                self._encoder = load_model(self.name, device=self.device, precision=precision)
                record_info(self.name, self._encoder.info)
        return self._encoder

    def ready(self) -> BatchedEncoder:
        """The encoder images go through, on the engine chosen for this model and CPU
        (measured once: models.openvino), built the first time it is needed."""
        with self._ready_lock:
            if self._ready is None:
                self._ready = self._engine_encoder()
        return self._ready

    def _uses_openvino(self) -> bool:
        forced = self.engine is Engine.OPENVINO or self.precision is Precision.INT8
        if self.engine is Engine.TORCH:
            return False
        automatic = self.device in (None, "", "auto")
        if not (automatic or self.device == "cpu") or (automatic and gpu_visible()):
            if forced and not automatic:
                raise InvalidInputError(
                    f"device '{self.device}': the OpenVINO engine runs on CPU here; use "
                    f"`device` cpu, or `engine` torch"
                )
            return forced
        if not openvino.available():
            if forced:
                openvino.require(f"model {self.name} on the OpenVINO engine")
            return False
        return True

    def _engine_encoder(self) -> BatchedEncoder:
        if not self._uses_openvino():
            return self.load()
        base = self._base_info()
        want = self.precision
        measured = openvino.read_measured(base.model_id)
        if measured is None or (want is not None and want not in measured.variants):
            measured = self._measure(base, want)
            if measured is None:  # auto, and OpenVINO cannot take this model here
                return self.load()
        variant = measured.best(want)
        if variant is None and want is Precision.INT8 and os.environ.get(openvino.UNCHECKED_ENV):
            variant = measured.variants.get(want)  # refused, and asked for anyway (timing)
        auto = self.engine is Engine.AUTO and want is not Precision.INT8
        if auto and (variant is None or variant.images_per_s <= measured.torch_images_per_s):
            return self.load()
        if variant is None:
            failed = measured.variants.get(want or Precision.FP32)
            raise openvino.refusal(base, failed, want or Precision.FP32, measured.reason)
        if want is Precision.INT8:
            info = openvino.int8_info(base)
        else:
            info = replace(base, precision=variant.precision, engine="openvino", device="cpu")
        from cliplens.models.openvino_runtime import OpenVinoEncoder  # openvino, numpy, Pillow

        encoder = OpenVinoEncoder(info, variant, measured.feature_id, self.load, self._text_rows)
        if self._encoder is not None:  # built to measure: not held beside the compiled network
            self._info = self._info or self._encoder.info
            self._encoder = None
        return encoder

    def _measure(self, base: ModelInfo, want: Precision | None) -> openvino.Measured | None:
        """Convert and measure once (imports torch; a minute for a ViT-B, more for int8)."""
        from cliplens.device import cpu_has_fast_bf16
        from cliplens.models.openvino_convert import measure

        precisions = [Precision.FP32] + ([Precision.BF16] if cpu_has_fast_bf16() else [])
        if want is not None and want not in precisions:
            precisions.append(want)
        have = openvino.read_measured(base.model_id)  # what an earlier run measured here
        precisions = [p for p in precisions if have is None or p not in have.variants]
        if self.announce is not None:
            done = ", ".join(precisions)
            self.announce(
                f"converting {self.name} for OpenVINO and measuring it against PyTorch on "
                f"this CPU ({done}; once per model, a minute or more)"
            )
        torch_now = self.load()  # as the PyTorch engine would run (its speed is the bar)
        fp32 = torch_now if torch_now.info.precision is Precision.FP32 else None
        fp32 = fp32 or load_model(self.name, device="cpu", precision=Precision.FP32)
        try:
            measured = measure(fp32, torch_now, precisions)
            return self._measure_text(measured, fp32, torch_now)
        except DependencyMissingError:
            if self.engine is Engine.AUTO and want is not Precision.INT8:
                return None  # no nncf or no photos to check with: PyTorch, as before
            raise
        except ModelError:
            raise
        except Exception as e:  # a tower the converter cannot take: remembered, not retried
            reason = f"OpenVINO could not convert it ({type(e).__name__}: {e})"[:300]
            openvino.write_unsupported(base.model_id, reason)
            if self.engine is Engine.AUTO and want is not Precision.INT8:
                return None
            raise ModelError(f"model {self.name}: {reason}; use `engine` torch") from e

    def _measure_text(
        self, measured: openvino.Measured, fp32: TorchEncoder, torch_now: TorchEncoder
    ) -> openvino.Measured:
        """The text tower too, in fp32 (once)."""
        from dataclasses import asdict

        from cliplens.models.openvino_text import measure_text

        if measured.text is not None:
            return measured
        try:
            variant = measure_text(fp32, torch_now, openvino.folder_for(fp32.info.model_id))
            text = asdict(variant) if variant else {"none": "no exportable text tower"}
        except Exception as e:  # the image engine stands without it
            text = {"none": f"OpenVINO could not convert it ({type(e).__name__}: {e})"[:300]}
        measured = replace(measured, text=text)
        openvino.write_measured(measured)
        return measured

    def _ov_text(self, n: int) -> Any:
        """The OpenVINO text tower where it was kept and measured faster, for many texts
        or once the image engine is loaded anyway; None for a one-shot query (ORT)."""
        if self._ov_text_tower is not None:
            return self._ov_text_tower or None
        engine_loaded = self._ready is not None and self._ready.info.engine == "openvino"
        if self.engine is Engine.TORCH or (n < 64 and not engine_loaded):
            return None
        measured = openvino.read_measured(self.info.text_id)
        text = measured.text if measured else None
        if not measured or not text or "none" in text or not openvino.available():
            if measured:  # measured here, and no tower: decided for this process
                self._ov_text_tower = False
            return None
        from cliplens.models.openvino_text import TextTower, TextVariant

        variant = TextVariant.from_record(text)
        folder = openvino.folder_for(self.info.text_id)
        self._ov_text_tower = TextTower(folder, variant) if variant.faster else False
        return self._ov_text_tower or None

    def _text_rows(self, texts: list[str]) -> np.ndarray:
        tower = self._ov_text(len(texts))
        if tower is not None:
            return tower(texts)
        fast = self.fast_text()
        if fast is not None:
            return fast.encode_texts(texts)
        return self.load().encode_texts(texts)

    def unload(self) -> None:
        """Drop the loaded network (its memory returns once nothing else holds it)."""
        if self._info is None and self._encoder is not None:
            self._info = self._encoder.info
        self._encoder = None
        self._ready = None

    def fast_text(self) -> OnnxTextEncoder | None:
        """The ONNX text encoder for this model, or None."""
        with self._text_lock:
            if self._text is None:
                self._text = find_text_encoder(self.info.text_id) or False
        return self._text or None

    def preload_text(self) -> None:
        """Start loading the ONNX text encoder in a thread, to overlap with other work
        (a catalog scan); `encode_texts` waits for it.

        The thread is not a daemon: when the command fails before the query runs, the
        interpreter waits for the load to finish at exit, instead of tearing down
        onnxruntime (or torch) under it, which aborts the process."""
        if self._text is not None or self._encoder is not None:
            return
        if self._info is None:
            self._info = recorded_info(self.name)  # kept: the thread's lookup needs it
        if self._info is None:
            return  # finding the model's id would load it, and no export exists yet anyway
        threading.Thread(target=self._preload, name="cliplens-text-preload").start()

    def _preload(self) -> None:
        with contextlib.suppress(Exception):  # the query's own call reports the error
            self.fast_text()

    def encode_texts(
        self, texts: Sequence[str], batch_size: int = 256, progress: bool = False
    ) -> np.ndarray:
        """Embed texts in input order: through the ONNX text tower while the network is
        not loaded and an export exists, else through the network."""
        if self._encoder is None:
            if (tower := self._ov_text(len(texts))) is not None:
                return tower(list(texts))
            if (fast := self.fast_text()) is not None:
                return fast.encode_texts(list(texts))
        return self.load().encode_texts(texts, batch_size, progress)

    def encode_images(
        self,
        items: Sequence[ImageSource],
        batch_size: int | None = None,
        progress: bool = False,
        max_megapixels: float | None = None,
    ) -> np.ndarray:
        """Embed images in input order; the first unreadable image raises its ImageError."""
        return self.ready().encode_images(items, batch_size, progress, max_megapixels)

    def encode_images_lenient(
        self,
        items: Sequence[ImageSource],
        batch_size: int | None = None,
        progress: bool = False,
        max_megapixels: float | None = None,
    ) -> ImageEncoding:
        """Embed what can be read; unreadable images are skipped and reported."""
        return self.ready().encode_images_lenient(items, batch_size, progress, max_megapixels)

    def encode_features(
        self,
        items: Sequence[ImageSource],
        batch_size: int | None = None,
        progress: bool = False,
        max_megapixels: float | None = None,
    ) -> ImageEncoding:
        """Image features for linear probes, in the space named by `feature_id`."""
        return self.ready().encode_features(items, batch_size, progress, max_megapixels)

    def needs_fast_text(self) -> bool:
        """True when the text tower could be exported for torch-free queries but is not yet."""
        return not attempted(self.info.text_id) and can_export()

    def prepare_fast_text(self) -> bool:
        """Export the text tower for torch-free queries, once per model. True if ready."""
        if not self.needs_fast_text():
            return self.fast_text() is not None
        encoder = self._encoder
        fp32 = Precision.FP32
        if encoder is None or encoder.info.precision != fp32 or encoder.info.device != "cpu":
            encoder = load_model(self.name, device="cpu", precision=fp32)
        self._text = export_text(encoder) or False
        return bool(self._text)

    def __repr__(self) -> str:
        state = "loaded" if self.loaded else "not loaded"
        return f"<ModelRef {self.name} ({state})>"
