"""Real DNG files made from real photos, for the RAW tests and benchmarks/bench_raw.py.

A photo's sRGB pixels are linearised and sampled through an RGGB Bayer filter, as a
sensor would have recorded them, and written by pidng (the raw mosaic in IFD0, with the
colour matrix of a camera whose native space is linear sRGB, so LibRaw's output looks
like the photo). pidng writes no preview, so `with_preview` adds one the way cameras lay
out their DNGs: a new IFD0 holding the JPEG preview, with the raw IFD as its SubIFD.
"""

from __future__ import annotations

import io
import struct
from pathlib import Path

import numpy as np
from PIL import Image

WHITE = 4095  # a 12-bit sensor

# XYZ (D65) -> linear sRGB: DNG's ColorMatrix1 for a camera that records linear sRGB
_XYZ_TO_SRGB = [3.2406, -1.5372, -0.4986, -0.9689, 1.8758, 0.0415, 0.0557, -0.2040, 1.0570]

# EXIF orientation -> how the sensor saw an upright photo (the inverse of the turn that
# shows it upright)
SENSOR_VIEW = {
    1: None,
    3: Image.Transpose.ROTATE_180,
    6: Image.Transpose.ROTATE_90,
    8: Image.Transpose.ROTATE_270,
}


def mosaic(rgb: np.ndarray) -> np.ndarray:
    """An RGGB Bayer mosaic (uint16, 12-bit) of an 8-bit sRGB image, cropped to even size."""
    h, w = rgb.shape[0] // 2 * 2, rgb.shape[1] // 2 * 2
    linear = (rgb[:h, :w].astype(np.float32) / 255.0) ** 2.2
    out = np.empty((h, w), np.float32)
    out[0::2, 0::2] = linear[0::2, 0::2, 0]
    out[0::2, 1::2] = linear[0::2, 1::2, 1]
    out[1::2, 0::2] = linear[1::2, 0::2, 1]
    out[1::2, 1::2] = linear[1::2, 1::2, 2]
    return np.round(out * WHITE).astype(np.uint16)


def dng_bytes(rgb: np.ndarray, orientation: int = 1, bits: int = 16) -> bytes:
    """A DNG of `rgb` as the sensor recorded it (pass the sensor's view: see SENSOR_VIEW),
    uncompressed, its 12-bit samples stored in 16 bits or packed in 12. (pidng's lossless
    JPEG compression fails on Python >= 3.10: PY_SSIZE_T_CLEAN.)"""
    from pidng.core import RAW2DNG
    from pidng.defs import CalibrationIlluminant, CFAPattern, DNGVersion
    from pidng.defs import PhotometricInterpretation as Photometric
    from pidng.dng import DNGTags, Tag

    cfa = mosaic(rgb)
    h, w = cfa.shape
    tags = DNGTags()
    for tag, value in (
        (Tag.ImageWidth, w),
        (Tag.ImageLength, h),
        (Tag.TileWidth, w),
        (Tag.TileLength, h),
        (Tag.Orientation, orientation),
        (Tag.PhotometricInterpretation, Photometric.Color_Filter_Array),
        (Tag.SamplesPerPixel, 1),
        (Tag.BitsPerSample, bits),
        (Tag.CFARepeatPatternDim, [2, 2]),
        (Tag.CFAPattern, CFAPattern.RGGB),
        (Tag.BlackLevel, 0),
        (Tag.WhiteLevel, WHITE),
        (Tag.ColorMatrix1, [[round(v * 10000), 10000] for v in _XYZ_TO_SRGB]),
        (Tag.CalibrationIlluminant1, CalibrationIlluminant.D65),
        (Tag.AsShotNeutral, [[1, 1], [1, 1], [1, 1]]),
        (Tag.Make, "cliplens"),
        (Tag.Model, "test sensor"),
        (Tag.UniqueCameraModel, "cliplens test sensor"),
        (Tag.DNGVersion, DNGVersion.V1_4),
        (Tag.DNGBackwardVersion, DNGVersion.V1_2),
    ):
        tags.set(tag, value)
    writer = RAW2DNG()
    writer.options(tags, path="", compress=False)
    return bytes(writer.convert(cfa))


def jpeg_bytes(image: Image.Image, quality: int = 90, exif_orientation: int | None = None) -> bytes:
    out = io.BytesIO()
    extra = {}
    if exif_orientation is not None:
        exif = Image.Exif()
        exif[0x0112] = exif_orientation
        extra["exif"] = exif.tobytes()
    image.save(out, "JPEG", quality=quality, **extra)
    return out.getvalue()


def with_preview(dng: bytes, jpeg: bytes, orientation: int = 1) -> bytes:
    """`dng` (one IFD: the raw) with a JPEG preview as its new IFD0 and the raw as its
    SubIFD, as cameras and Adobe's converter write them. The preview is stored as given."""
    assert dng[:4] == b"II*\x00", "pidng writes little-endian TIFF"
    raw_ifd = struct.unpack_from("<I", dng, 4)[0]
    width, height = Image.open(io.BytesIO(jpeg)).size
    out = bytearray(dng)
    out += b"\0" * (-len(out) % 2)
    jpeg_at = len(out)
    out += jpeg + b"\0" * (len(jpeg) % 2)
    bits_at = len(out)
    out += struct.pack("<3H", 8, 8, 8)
    entries = [  # (tag, type, count, value or offset), sorted by tag
        (254, 4, 1, 1),  # NewSubfileType: a reduced-resolution copy
        (256, 4, 1, width),
        (257, 4, 1, height),
        (258, 3, 3, bits_at),
        (259, 3, 1, 7),  # JPEG
        (262, 3, 1, 6),  # YCbCr
        (273, 4, 1, jpeg_at),
        (274, 3, 1, orientation),
        (277, 3, 1, 3),
        (278, 4, 1, height),
        (279, 4, 1, len(jpeg)),
        (330, 4, 1, raw_ifd),  # SubIFDs: the raw
        (50706, 1, 4, int.from_bytes(bytes([1, 4, 0, 0]), "little")),  # DNGVersion
    ]
    ifd_at = len(out)
    out += struct.pack("<H", len(entries))
    for tag, typ, count, value in entries:
        if typ == 3 and count == 1:
            out += struct.pack("<HHIHH", tag, typ, count, value, 0)
        else:
            out += struct.pack("<HHII", tag, typ, count, value)
    out += struct.pack("<I", 0)
    struct.pack_into("<I", out, 4, ifd_at)
    return bytes(out)


def write_dng(
    path: Path,
    upright: Image.Image,
    orientation: int = 1,
    preview: Image.Image | str | None = None,
    preview_exif: int | None = None,
    bits: int = 16,
) -> Path:
    """Write the DNG a camera held in `orientation` would make of the `upright` photo.

    `preview`: None (no preview), "sensor" (the whole photo as the sensor saw it, the
    usual layout), "upright" (already turned by the camera), or an image stored as is.
    `preview_exif` gives the preview JPEG its own EXIF orientation tag.
    """
    turn = SENSOR_VIEW[orientation]
    sensor = upright.transpose(turn) if turn is not None else upright
    data = dng_bytes(np.asarray(sensor.convert("RGB")), orientation, bits)
    if preview is not None:
        shown = (
            {"sensor": sensor, "upright": upright}[preview] if isinstance(preview, str) else preview
        )
        data = with_preview(data, jpeg_bytes(shown, exif_orientation=preview_exif), orientation)
    path.write_bytes(data)
    return path
