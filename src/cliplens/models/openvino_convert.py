"""Converting a model's image tower to OpenVINO once, and measuring what it gives.

`measure` converts the fp32 PyTorch tower to OpenVINO's IR (once per model), compiles it
at each precision asked for, compares each with PyTorch's fp32 forward on fixed photos
and times each against PyTorch on this CPU; int8 is NNCF's post-training quantisation
on a fixed calibration set. What it finds goes to meta.json (models.openvino).

The fixed photos are the 21 that scikit-image ships (natural photos, textures, text,
microscopy), in fixed views: 4 per photo calibrate int8 (84), 3 others check every
precision (63). The same model therefore always gives the same int8 network.
"""

from __future__ import annotations

import contextlib
import io
import os
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps

from cliplens.device import Precision, cpu_name
from cliplens.errors import DependencyMissingError
from cliplens.models.batched import unit_rows
from cliplens.models.openvino import (
    INT8_MIN_AGREEMENT,
    INT8_MIN_MEAN_COSINE,
    MIN_COSINE,
    Measured,
    Variant,
    folder_for,
    read_measured,
    write_measured,
)
from cliplens.models.openvino_runtime import CompiledTower
from cliplens.models.torch_encoder import TorchEncoder
from cliplens.preprocess import Preprocessing

# scikit-image's bundled images, in a fixed order (names of skimage.data functions)
PHOTOS = (
    "astronaut",
    "chelsea",
    "coffee",
    "rocket",
    "stereo_motorcycle",
    "hubble_deep_field",
    "immunohistochemistry",
    "retina",
    "colorwheel",
    "logo",
    "camera",
    "page",
    "moon",
    "coins",
    "text",
    "brick",
    "grass",
    "gravel",
    "clock",
    "horse",
    "cell",
)
# (side as a share of the short side, left and top as shares of the free room, mirrored)
CALIBRATION_VIEWS = (
    (1.0, 0.5, 0.5, False),
    (0.75, 0, 0, False),
    (0.75, 1, 1, True),
    (0.5, 0.5, 0.5, False),
)
CHECK_VIEWS = ((1.0, 0.5, 0.5, True), (0.75, 1, 0, False), (0.6, 0.3, 0.7, True))
TIMED_BATCH = 32
FP32_IR = "image.xml"
INT8_IR = "image-int8.xml"


def fixed_photos() -> list[Image.Image]:
    """scikit-image's 21 bundled images as RGB, in a fixed order."""
    try:
        from skimage import data  # the fixed photos ship in scikit-image
    except ImportError as e:
        raise DependencyMissingError(
            "checking an OpenVINO network needs scikit-image's photos: pip install "
            "'cliplens[openvino]'"
        ) from e
    photos = []
    for name in PHOTOS:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pixels = getattr(data, name)()
        if name == "stereo_motorcycle":
            pixels = pixels[0]
        image = Image.fromarray(np.asarray(pixels))
        if image.mode != "RGB":
            image = image.convert("RGB")
        photos.append(image)
    return photos


def views(photos: Sequence[Image.Image], prep: Preprocessing, spec: Sequence[tuple]) -> np.ndarray:
    """uint8 NHWC crops: for each photo, each view of `spec`, through `prep.crop`."""
    out = []
    for image in photos:
        w, h = image.size
        for share, fx, fy, mirror in spec:
            side = round(share * min(w, h))
            left, top = round(fx * (w - side)), round(fy * (h - side))
            view = image.crop((left, top, left + side, top + side))
            out.append(prep.crop(ImageOps.mirror(view) if mirror else view))
    return np.stack(out)


def _cosines(got: np.ndarray, want: np.ndarray) -> np.ndarray:
    return (unit_rows(got) * want).sum(1)


def _images_per_s(
    run: Callable[[np.ndarray], np.ndarray], batch: np.ndarray, repeats: int = 2
) -> float:
    run(batch)  # warm up (first-call allocations, kernels)
    t = time.perf_counter()
    for _ in range(repeats):
        run(batch)
    return repeats * len(batch) / (time.perf_counter() - t)


def _is_transformer(module: torch.nn.Module) -> bool:
    return any("attention" in type(m).__name__.lower() for m in module.modules())


def save_ir(model: Any, xml: Path) -> None:
    """Save an IR (xml + bin) so that a reader never sees half of one: both under
    temporary names, then the weights and the graph renamed into place."""
    import openvino as ov

    tmp = xml.with_name(f".{xml.stem}.{os.getpid()}.xml")
    ov.save_model(model, tmp, compress_to_fp16=False)
    tmp.with_suffix(".bin").replace(xml.with_suffix(".bin"))
    tmp.replace(xml)


def _convert(module: torch.nn.Module, example: np.ndarray, xml: Path) -> None:
    import openvino as ov

    with warnings.catch_warnings(), torch.inference_mode(), quiet():
        warnings.simplefilter("ignore")
        model = ov.convert_model(module, example_input=torch.from_numpy(example[:1]))
    save_ir(model, xml)


def _quantize(xml: Path, calibration: np.ndarray, transformer: bool, out: Path) -> None:
    """NNCF's static post-training int8 quantisation, SmoothQuant for transformers."""
    try:
        import nncf
    except ImportError as e:
        raise DependencyMissingError(
            "precision int8 needs the nncf package: pip install 'cliplens[openvino]'"
        ) from e
    import openvino as ov

    dataset = nncf.Dataset([calibration[i : i + 1] for i in range(len(calibration))])
    kwargs = {"model_type": nncf.ModelType.TRANSFORMER} if transformer else {}
    with warnings.catch_warnings(), quiet():
        warnings.simplefilter("ignore")
        quantized = nncf.quantize(
            ov.Core().read_model(xml), dataset, subset_size=len(calibration), **kwargs
        )
    save_ir(quantized, out)


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """The converter and NNCF report and draw progress bars on stdout, where a command's
    output goes: kept off it."""
    import logging

    logging.getLogger("nncf").setLevel(logging.ERROR)
    with contextlib.redirect_stdout(io.StringIO()):
        yield


def measure(
    encoder: TorchEncoder,
    torch_encoder: TorchEncoder,
    precisions: Sequence[Precision],
) -> Measured:
    """Convert `encoder`'s tower (fp32, CPU) if not yet, then check and time each of
    `precisions` on this CPU against `torch_encoder` (the PyTorch engine as it would
    run); the figures are merged into meta.json and returned."""
    info = encoder.info
    prep = info.preprocessing
    folder = folder_for(info.model_id)
    folder.mkdir(parents=True, exist_ok=True)
    photos = fixed_photos()
    check = prep.normalize(views(photos, prep, CHECK_VIEWS))
    calibration = prep.normalize(views(photos, prep, CALIBRATION_VIEWS))
    module = encoder.image_graph().eval()
    with torch.inference_mode():
        want = unit_rows(module(torch.from_numpy(check)).float().numpy())
    if not (folder / FP32_IR).is_file():
        _convert(module, check, folder / FP32_IR)
    timed = calibration[:TIMED_BATCH]
    torch_speed = _images_per_s(torch_encoder._embed_pixels, timed)
    earlier = read_measured(info.model_id)
    variants = dict(earlier.variants) if earlier else {}
    for precision in precisions:
        if precision is Precision.INT8:
            variants[precision] = _int8(encoder, module, calibration, check, want, timed)
        else:
            variants[precision] = _full(folder / FP32_IR, precision, check, want, timed)
    measured = Measured(
        model_id=info.model_id,
        cpu=cpu_name(),
        torch_precision=torch_encoder.info.precision,
        torch_images_per_s=round(torch_speed, 2),
        variants=variants,
        feature_id=encoder.feature_id,
        photos=len(check),
        text=earlier.text if earlier else None,
    )
    write_measured(measured)
    return measured


def _full(
    xml: Path, precision: Precision, check: np.ndarray, want: np.ndarray, timed: np.ndarray
) -> Variant:
    tower = CompiledTower(xml, precision)
    cos = _cosines(tower(check), want)
    kept = bool(cos.min() >= MIN_COSINE)
    return Variant(
        precision=precision,
        kept=kept,
        file=xml.name,
        images_per_s=round(_images_per_s(tower, timed), 2),
        min_cosine=round(float(cos.min()), 7),
        mean_cosine=round(float(cos.mean()), 7),
        reason="" if kept else f"cosine to PyTorch's fp32 {cos.min():.5f} < {MIN_COSINE}",
    )


def _int8(
    encoder: TorchEncoder,
    module: torch.nn.Module,
    calibration: np.ndarray,
    check: np.ndarray,
    want: np.ndarray,
    timed: np.ndarray,
) -> Variant:
    folder = folder_for(encoder.info.model_id)
    if not (folder / INT8_IR).is_file():
        _quantize(folder / FP32_IR, calibration, _is_transformer(module), folder / INT8_IR)
    tower = CompiledTower(folder / INT8_IR, Precision.INT8)
    got = unit_rows(tower(check))
    cos = (got * want).sum(1)
    labels = encoder.encode_texts(zero_shot_prompts())
    agreement = float(((got @ labels.T).argmax(1) == (want @ labels.T).argmax(1)).mean())
    reasons = []
    if cos.mean() < INT8_MIN_MEAN_COSINE:
        reasons.append(f"mean cosine to fp32 {cos.mean():.4f} < {INT8_MIN_MEAN_COSINE}")
    if agreement < INT8_MIN_AGREEMENT:
        reasons.append(
            f"top-1 zero-shot agreement {100 * agreement:.1f}% < {100 * INT8_MIN_AGREEMENT:.0f}%"
        )
    return Variant(
        precision=Precision.INT8,
        kept=not reasons,
        file=INT8_IR,
        images_per_s=round(_images_per_s(tower, timed), 2),
        min_cosine=round(float(cos.min()), 7),
        mean_cosine=round(float(cos.mean()), 7),
        agreement=round(agreement, 4),
        reason="; ".join(reasons),
    )


def zero_shot_prompts() -> list[str]:
    """100 of the ImageNet classes (every tenth) as prompts: the labels int8 must agree
    with fp32 on. All 1000 would cost 100 s of text encoding here for a ViT-B-32."""
    from cliplens.models.offline import read_class_table  # the table ships with cliplens

    return [f"a photo of {row['text']}" for row in read_class_table()[::10]]
