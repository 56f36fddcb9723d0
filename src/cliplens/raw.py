"""Camera RAW photos (DNG, CR2, CR3, NEF, ARW, RAF, ORF, RW2...) through rawpy (LibRaw).

`images.open_image` hands a file here when `is_raw` says so, and gets back an upright RGB
image, or a typed ImageError, like any other format. rawpy is optional (the `raw` extra)
and imported only when a RAW file is decoded, so the JPEG path pays nothing for it.

What is decoded, cheapest first: the camera's embedded JPEG preview when its short side is
at least `min_size` (decoded as every JPEG is, with draft mode); else LibRaw's half-size
demosaic (no interpolation: one pixel per 2x2 Bayer cell); the full demosaic only for a
caller that wants the whole image (`min_size` None). Which one ran is in
`image.info[RAW_INFO_KEY]`.

Why here and not in images.py: RAW files are mostly TIFF files, and Pillow opens a DNG or
NEF as a TIFF, reading its first IFD: the camera's thumbnail (often 160x120) or the raw
mosaic as grey. So they must be recognised before Pillow sees them, by content (a DNG
version tag, a colour filter array, a RAW maker's magic bytes) or, for TIFF-based RAWs
that carry no such mark in the IFDs walked here, by their extension.
"""

from __future__ import annotations

import io
import logging
import os
import struct
from collections.abc import Callable
from pathlib import PurePath
from typing import Any, BinaryIO

import numpy as np
from PIL import Image

from cliplens.errors import (
    ImageError,
    ImageTooLargeError,
    NotAnImageError,
    TruncatedImageError,
    UnsupportedImageError,
)

logger = logging.getLogger(__name__)

# What LibRaw 0.21/0.22 reads, by the names cameras give their files. ".raw" is left out
# (Panasonic, Leica and many unrelated tools use it); GoPro's .gpr needs a codec rawpy's
# wheels do not build.
_RAW_NAMES = (
    ".dng .cr2 .cr3 .crw .nef .nrw .arw .srf .sr2 .raf .orf .rw2 .rwl .pef .srw "
    ".3fr .fff .iiq .mef .mos .mrw .erf .kdc .dcr .x3f"
)
RAW_EXTENSIONS: frozenset[str] = frozenset(_RAW_NAMES.split())
INSTALL = "pip install 'cliplens[raw]'"
RAW_INFO_KEY = "cliplens.raw"  # "preview", "half-size" or "full-size": which decode ran

# Non-TIFF RAW containers, by their first bytes: these are RAW whatever the file is named.
_RAW_MAGIC = (
    (b"FUJIFILMCCD-RAW", "RAF"),
    (b"IIRO", "ORF"),
    (b"IIRS", "ORF"),
    (b"MMOR", "ORF"),
    (b"IIU\x00", "RW2"),
    (b"\x00MRM", "MRW"),
    (b"FOVb", "X3F"),
)
_TIFF_MAGIC = (b"II*\x00", b"MM\x00*")
_TIFF_LIKE = (*_TIFF_MAGIC, b"IIRO", b"IIRS", b"MMOR", b"IIU\x00")  # TIFF IFDs inside
# Formats Pillow reads: a file named .dng that holds one of these is read as what it is.
_PILLOW_MAGIC = (b"\xff\xd8\xff", b"\x89PNG", b"GIF8", b"BM", b"\x00\x00\x00\x0cjP", b"\xffO\xffQ")
_CFA, _LINEAR_RAW = 32803, 34892  # PhotometricInterpretation of a sensor's data
_MAX_IFDS, _MAX_ENTRIES, _MAX_ARRAY = 64, 4096, 1 << 16
_BYTES_PER_PIXEL = 8  # the most a RAW holds a pixel: 16-bit linear RGBA
# LibRaw's flip (bit 4 transpose, 2 flip vertical, 1 flip horizontal) as EXIF orientation
_FLIP_TO_ORIENTATION = {0: 1, 1: 2, 2: 4, 3: 3, 4: 5, 5: 8, 6: 6, 7: 7}
_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}

DecodeJpeg = Callable[[BinaryIO], Image.Image]  # images' JPEG path: draft mode, EXIF, cap
TooLarge = Callable[[int, float, tuple[int, int]], str]  # images' message for the cap


def is_raw(file: BinaryIO) -> bool:
    """Whether `file` (at any position; left at its start) should be read by LibRaw.

    By content first: a RAW maker's magic, a CR3 box, or a TIFF whose IFDs hold a DNG
    version or a colour filter array. Then by name, for TIFF-based RAWs whose raw IFD
    was not found (and for formats not sniffed here), unless the content is a format
    Pillow reads (a JPEG named .dng is a JPEG).
    """
    try:
        head = _head(file)
        if _content_is_raw(file, head):
            return True
        if not _named_raw(file):
            return False
        return not head.startswith(_PILLOW_MAGIC) and not _is_webp_or_heif(head)
    finally:
        file.seek(0)


def decode_raw(
    file: BinaryIO,
    label: str,
    cap: float,
    min_size: int | None,
    decode_jpeg: DecodeJpeg,
    too_large: TooLarge,
) -> Image.Image:
    """The RAW photo in `file` as an upright RGB image (see the module's docstring)."""
    rawpy = _import_rawpy(label)
    _check_bytes(file, label, cap)
    short = _cut_short(file)
    if short:
        raise TruncatedImageError(label, f"RAW file is truncated: {short}")
    file.seek(0)
    with rawpy.RawPy() as raw:
        try:
            raw.open_buffer(file)  # reads the file and its metadata; nothing is decoded yet
        except rawpy.LibRawError as e:
            raise _libraw_error(label, e, rawpy, _content_is_raw(file, _head(file))) from e
        sizes = raw.sizes
        _check_cap(label, sizes, cap, too_large)
        if min_size is not None:
            preview = _preview(raw, rawpy, sizes, min_size, decode_jpeg, label)
            if preview is not None:
                preview.info[RAW_INFO_KEY] = "preview"
                return preview
        half = min_size is not None and min(sizes.width, sizes.height) // 2 >= min_size
        try:
            rgb = raw.postprocess(half_size=half, use_camera_wb=True, output_bps=8)
        except rawpy.LibRawError as e:
            raise _libraw_error(label, e, rawpy, True) from e
    image = Image.fromarray(np.ascontiguousarray(rgb))  # LibRaw has applied `sizes.flip`
    image.info[RAW_INFO_KEY] = "half-size" if half else "full-size"
    return image


def _import_rawpy(label: str) -> Any:
    try:
        import rawpy  # ~30 ms and optional: only for RAW files, never on the JPEG path
    except ImportError:
        raise UnsupportedImageError(
            label, f"RAW photos need rawpy (LibRaw), which is not installed: {INSTALL}"
        ) from None
    _guard_forks(rawpy)
    return rawpy


def _guard_forks(rawpy: Any) -> None:
    """Decoder processes come from a fork server from now on (decode_ahead.process_pool).

    rawpy's wheels build LibRaw with OpenMP (their own libgomp). Once a process has run
    LibRaw, its OpenMP thread pool exists; a child forked from it (the indexer's decoder
    processes) inherits the pool's bookkeeping but not its threads, and its first demosaic
    waits for them forever (seen: `cliplens search x.dng` then indexing with workers hung
    in LibRaw::raw2image_ex; in the test suite, a forked decoder waited on a futex with
    one thread even with OpenMP set to one thread in the child). A fork server is a fresh
    interpreter: its children inherit no threads, as for OpenVINO's."""
    from cliplens.decode_ahead import mark_fork_unsafe

    if (getattr(rawpy, "flags", None) or {}).get("OPENMP", True):
        mark_fork_unsafe()


def _check_bytes(file: BinaryIO, label: str, cap: float) -> None:
    """LibRaw reads the whole file into memory: bound it by what a RAW photo under the
    megapixel cap can hold (8 bytes a pixel: 16-bit linear RGBA), so a huge file that is
    only named like a RAW is refused before it is read."""
    size = _size(file)
    if size > cap * 1e6 * _BYTES_PER_PIXEL:
        raise ImageTooLargeError(
            label,
            f"file is {size / 1e6:.3g} MB, more than a RAW photo under the {cap:g} MP limit "
            "holds (raise it with --max-megapixels or CLIPLENS_MAX_MEGAPIXELS)",
        )


def _check_cap(label: str, sizes: Any, cap: float, too_large: TooLarge) -> None:
    """The megapixel cap, from LibRaw's metadata before anything is unpacked: the photo's
    size, or the sensor's when that is larger (what unpacking allocates)."""
    photo, sensor = sizes.width * sizes.height, sizes.raw_width * sizes.raw_height
    if max(photo, sensor) > cap * 1e6:
        pixels, size = (photo, (sizes.width, sizes.height))
        if sensor > photo:
            pixels, size = (sensor, (sizes.raw_width, sizes.raw_height))
        raise ImageTooLargeError(label, too_large(pixels, cap, size))


def _preview(
    raw: Any, rawpy: Any, sizes: Any, min_size: int, decode_jpeg: DecodeJpeg, label: str
) -> Image.Image | None:
    """The embedded preview, upright, when its short side is >= min_size; None when there
    is none, it is smaller, or it cannot be read (the raw data may still be good)."""
    try:
        thumb = raw.extract_thumb()
    except rawpy.LibRawError as e:  # none, an unsupported kind, or a damaged one
        logger.debug("%s: no usable RAW preview (%s)", label, _libraw_message(e))
        return None
    try:
        if thumb.format == rawpy.ThumbFormat.JPEG:
            with Image.open(io.BytesIO(thumb.data)) as header:  # the size, nothing decoded
                size, own = header.size, header.getexif().get(0x0112)
            if min(size) < min_size:
                return None
            image = decode_jpeg(io.BytesIO(thumb.data))  # applies its own EXIF orientation
        else:  # a bitmap: HxWx3 uint8
            own, image = None, Image.fromarray(np.ascontiguousarray(thumb.data)).convert("RGB")
            if min(image.size) < min_size:
                return None
    except (ImageError, OSError, ValueError, SyntaxError) as e:
        logger.debug("%s: unreadable RAW preview, demosaicing (%s)", label, e)
        return None
    return _orient_preview(image, sizes, own)


def _orient_preview(image: Image.Image, sizes: Any, own: int | None) -> Image.Image:
    """The preview upright: as the JPEG path turned it, unless its shape says otherwise.

    LibRaw returns a JPEG preview as the camera stored it (mostly as the sensor saw it)
    and, when it has no EXIF block, writes one holding the RAW's orientation
    (`sizes.flip`); the JPEG path then turns it by that tag, or by the preview's own.
    The RAW's size and flip give the upright shape (portrait or landscape), so a preview
    that comes out the wrong shape was turned wrongly: its own tag disagreed with the
    RAW's flip (or it had none: a bitmap preview), or the camera stored it upright
    already. Among the preview as stored, turned by its tag, and turned by the flip, the
    first of the upright shape wins. A 180-degree turn keeps the shape: there the tag wins.
    """
    applied = own if own in _TRANSPOSE else 1
    flip = _FLIP_TO_ORIENTATION.get(sizes.flip & 7, 1)
    wide, tall = sizes.width, sizes.height
    if flip >= 5:  # a quarter turn (or a transpose): width and height swap
        wide, tall = tall, wide

    def upright_shape(img: Image.Image) -> bool:
        return (img.width - img.height) * (wide - tall) >= 0  # square: either

    if upright_shape(image):
        return image
    undo = {6: 8, 8: 6}.get(applied, applied)  # the other turns are their own inverses
    stored = image.transpose(_TRANSPOSE[undo]) if applied != 1 else image
    turned = stored.transpose(_TRANSPOSE[flip]) if flip != 1 else stored
    return next((c for c in (turned, stored) if upright_shape(c)), image)


def _libraw_message(e: BaseException) -> str:
    arg = e.args[0] if e.args else ""
    text = arg.decode(errors="replace") if isinstance(arg, bytes) else str(arg)
    return " ".join(text.split()) or type(e).__name__


def _libraw_error(label: str, e: BaseException, rawpy: Any, sniffed: bool) -> ImageError:
    """LibRaw's failure as the typed error every format gets, on one line."""
    msg = f"LibRaw: {_libraw_message(e)}"
    if isinstance(e, rawpy.LibRawFileUnsupportedError):
        if sniffed:
            version = ".".join(map(str, rawpy.libraw_version))
            return UnsupportedImageError(
                label,
                f"LibRaw {version} cannot read this RAW file (camera or compression "
                f"not supported; a newer rawpy may) ({msg})",
            )
        return NotAnImageError(
            label, f"not a RAW photo LibRaw can read, nor another image format ({msg})"
        )
    if isinstance(e, rawpy.LibRawIOError):
        return TruncatedImageError(label, f"RAW file is truncated or damaged ({msg})")
    if isinstance(e, rawpy.LibRawTooBigError):
        return ImageTooLargeError(label, f"RAW image is too large to decode ({msg})")
    if isinstance(e, (rawpy.LibRawUnsufficientMemoryError, rawpy.LibRawMemPoolOverflowError)):
        return ImageError(label, f"not enough memory to decode this RAW file ({msg})")
    return NotAnImageError(label, f"cannot decode RAW data, the file is damaged ({msg})")


# ---------------------------------------------------------------- sniffing


def _magic_kind(head: bytes) -> str | None:
    """The RAW format a file's first bytes name, for formats that are never anything else."""
    for magic, kind in _RAW_MAGIC:
        if head.startswith(magic):
            return kind
    if head[:2] == b"II" and head[2:4] == b"\x1a\x00" and head[6:14] == b"HEAPCCDR":
        return "CRW"
    if head[4:8] == b"ftyp" and head[8:12] == b"crx ":
        return "CR3"
    if head.startswith(b"II*\x00") and head[8:10] == b"CR":
        return "CR2"
    return None


def _content_is_raw(file: BinaryIO, head: bytes) -> bool:
    if _magic_kind(head):
        return True
    return head.startswith(_TIFF_MAGIC) and _walk_tiff(file, head, _size(file)).raw


def _is_webp_or_heif(head: bytes) -> bool:
    return (head[:4] == b"RIFF" and head[8:12] == b"WEBP") or head[4:8] == b"ftyp"


def _named_raw(file: BinaryIO) -> bool:
    name = getattr(file, "name", None)
    if not isinstance(name, (str, bytes, os.PathLike)):
        return False  # an upload, a BytesIO: no name to go by
    return PurePath(os.fsdecode(name)).suffix.lower() in RAW_EXTENSIONS


class _TiffFacts:
    """What a walk of a TIFF's IFDs found: RAW marks, and whether it is cut short."""

    def __init__(self) -> None:
        self.raw = False
        self.short: str | None = None
        self.data_end = 0


def _walk_tiff(file: BinaryIO, head: bytes, size: int) -> _TiffFacts:
    """Walk IFD0's chain and the SubIFDs (where cameras keep the raw data), bounded.

    Only what must be there counts as cut: IFD0 and the SubIFDs a tag declares (a next-IFD
    link into nowhere ends the chain, as readers treat it), and the data of the raw IFDs
    (a colour filter array or linear raw), whose byte counts DNG writers keep right; other
    IFDs' counts are left alone, since some makers' are loose.
    """
    facts = _TiffFacts()
    order = "<" if head[:2] == b"II" else ">"
    queue, seen = [(struct.unpack(order + "I", head[4:8])[0], True)], set()
    while queue and len(seen) < _MAX_IFDS:
        offset, declared = queue.pop(0)
        if offset == 0 or offset in seen:
            continue
        seen.add(offset)
        count_bytes = _read_at(file, offset, 2)
        n = min(struct.unpack(order + "H", count_bytes)[0], _MAX_ENTRIES) if count_bytes else 0
        body = _read_at(file, offset + 2, 12 * n + 4)
        if len(count_bytes) < 2 or len(body) < 12 * n + 4:
            if declared:
                facts.short = f"an IFD at byte {offset} is cut off (the file ends at byte {size})"
            continue
        tags = {}
        for i in range(n):
            tag, typ, count = struct.unpack_from(order + "HHI", body, 12 * i)
            tags[tag] = (typ, count, body[12 * i + 8 : 12 * i + 12])
        is_raw_data = bool(set(_values(file, order, tags, 262)) & {_CFA, _LINEAR_RAW})
        facts.raw |= is_raw_data or 50706 in tags  # DNGVersion
        queue += [(o, True) for o in _values(file, order, tags, 330)]  # SubIFDs
        queue.append((struct.unpack_from(order + "I", body, 12 * n)[0], False))
        if is_raw_data:
            for offsets, counts in ((273, 279), (324, 325)):  # strips, tiles
                pairs = zip(  # lists of unequal length: the shorter one's
                    _values(file, order, tags, offsets),
                    _values(file, order, tags, counts),
                    strict=False,
                )
                ends = [o + c for o, c in pairs]
                facts.data_end = max([facts.data_end, *ends])
    if facts.short is None and facts.data_end > size:
        end = facts.data_end
        facts.short = f"its raw data ends at byte {end}, the file at byte {size}"
    return facts


def _values(file: BinaryIO, order: str, tags: dict, tag: int) -> list[int]:
    """A SHORT, LONG or IFD tag's values (inline, or at the offset it gives)."""
    if tag not in tags:
        return []
    typ, count, inline = tags[tag]
    code = {3: "H", 4: "I", 13: "I"}.get(typ)
    if code is None or count == 0:
        return []
    count = min(count, _MAX_ARRAY)
    width = struct.calcsize(code) * count
    data = inline[:width] if width <= 4 else _read_at(file, _u32(order, inline), width)
    if len(data) < width:
        return []
    return list(struct.unpack(f"{order}{count}{code}", data))


def _u32(order: str, b: bytes) -> int:
    return struct.unpack(order + "I", b)[0]


def _cut_short(file: BinaryIO) -> str | None:
    """Why the container says the file is cut short, if it does (TIFF-based RAWs and CR3;
    LibRaw finds the rest): LibRaw itself says only "unsupported file format" when the
    cut took the IFDs, and prints its "unexpected end of file" to stderr."""
    head, size = _head(file), _size(file)
    if head.startswith(_TIFF_LIKE):
        return _walk_tiff(file, head, size).short
    if head[4:8] == b"ftyp":  # CR3: ISO boxes that declare their sizes
        pos = 0
        while pos < size:
            box = _read_at(file, pos, 16)
            n = int.from_bytes(box[:4], "big")
            n = int.from_bytes(box[8:16], "big") if n == 1 else n
            if n == 0:
                return None  # the last box runs to the end
            if len(box) < 8 or n < 8:
                return f"a box at byte {pos} is cut"
            pos += n
        return f"its last box ends at byte {pos}, the file at byte {size}" if pos > size else None
    return None


def _head(file: BinaryIO) -> bytes:
    return _read_at(file, 0, 16)


def _read_at(file: BinaryIO, offset: int, n: int) -> bytes:
    try:
        file.seek(offset)
        return file.read(n)
    except (OSError, ValueError, OverflowError):
        return b""


def _size(file: BinaryIO) -> int:
    file.seek(0, os.SEEK_END)
    size = file.tell()
    file.seek(0)
    return size
