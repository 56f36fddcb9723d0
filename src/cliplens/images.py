"""Opening images and finding image files: the one entry point every task uses.

`open_image` turns anything image-like into a loaded RGB `PIL.Image.Image` and every way
that can fail into a typed `ImageError` naming the input, so callers never see a raw Pillow
exception. `iter_image_files` walks folders in a deterministic order.
"""

from __future__ import annotations

import bisect
import errno
import functools
import io
import logging
import math
import os
import re
import stat
import struct
import warnings
from collections.abc import Collection, Iterable, Iterator
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageOps, JpegImagePlugin, UnidentifiedImageError

from cliplens.errors import (
    EmptyImageError,
    ImageError,
    ImageNotFoundError,
    ImageTooLargeError,
    InvalidInputError,
    NotAnImageError,
    TruncatedImageError,
    UnsupportedImageError,
    one_line,
)
from cliplens.exclusions import IGNORE_FILE, Exclusions
from cliplens.raw import RAW_EXTENSIONS, decode_raw, is_raw
from cliplens.settings import get_settings

logger = logging.getLogger(__name__)

_EXTENSIONS = (
    ".jpg .jpeg .png .webp .gif .bmp .tif .tiff .heic .heif .avif .jp2 .pnm .pbm .pgm .ppm"
)
# RAW photos are listed whether or not rawpy is installed: without it each one is reported
# as failed, naming the extra to install, rather than skipped without a word.
IMAGE_EXTENSIONS: frozenset[str] = frozenset(_EXTENSIONS.split()) | RAW_EXTENSIONS

ImageSource = str | os.PathLike | BinaryIO | Image.Image | np.ndarray

# Pillow reports damage as bare OSError/ValueError/SyntaxError; these words mean "cut short".
_TRUNCATION_HINTS = ("truncated", "broken data stream", "end of file", "premature end")
_DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, struct.error, IndexError)
_ALPHA_MODES = frozenset({"RGBA", "RGBa", "LA", "La", "PA"})
_HEIF_BRANDS = frozenset({b"heic", b"heix", b"heim", b"heis", b"hevc", b"hevx", b"mif1", b"msf1"})
_MAGIC = {b"%PDF": "a PDF document", b"PK\x03\x04": "a ZIP archive", b"\x1f\x8b": "gzip data"}
_plugins_registered = False


def register_plugins() -> None:
    """Register pillow-heif on first use (not at import), once; it stays optional."""
    global _plugins_registered
    if _plugins_registered:
        return
    _plugins_registered = True
    try:
        import pillow_heif  # ~75 ms, and optional: loads on the first decode, not at import
    except ImportError:
        return
    pillow_heif.register_heif_opener()
    # Only pillow-heif < 1.0 reads AVIF; Pillow >= 11.2 may have its own decoder, preferred.
    if hasattr(pillow_heif, "register_avif_opener"):
        Image.init()
        if "AVIF" not in Image.OPEN:
            pillow_heif.register_avif_opener()


def describe(source: ImageSource) -> str:
    """A short label for messages: the path as given, or a summary of an in-memory image."""
    if isinstance(source, Image.Image):
        return f"<PIL image {source.width}x{source.height}>"
    if isinstance(source, np.ndarray):
        return f"<array {'x'.join(map(str, source.shape))}>"
    if isinstance(source, (str, os.PathLike)):
        return os.fsdecode(source)
    return f"<{type(source).__name__}>"


def open_image(
    source: ImageSource,
    *,
    min_size: int | None = None,
    max_megapixels: float | None = None,
    label: str | None = None,
) -> Image.Image:
    """Return `source` as a fully loaded RGB image, upright, first frame only.

    `source` is a path, an open binary file (read from its start; a server decodes the
    file it has checked, never the path again), a PIL image or an array. `min_size` lets
    JPEGs decode at a reduced scale (libjpeg DCT scaling) while the short side stays
    >= min_size: callers that resize to ~224 px anyway gain ~4x on phone photos.
    `max_megapixels` (default: settings) rejects decompression bombs from the header alone.
    `label` names the source in errors (default: its path or a summary).

    Why: every image cliplens reads goes through here, so a photo looks the same to every
    task, and a bad file fails as one typed ImageError that names it.

    >>> import cliplens
    >>> image = cliplens.open_image("photos/cat.jpg", min_size=224)
    >>> image.mode, image.size
    """
    if min_size is not None and min_size < 1:
        raise InvalidInputError(f"min_size must be a positive integer, got {min_size}")
    label = label or describe(source)
    if isinstance(source, Image.Image):
        try:
            return _to_rgb(source, label, copy=True)  # never hand back the caller's object
        except _DECODE_ERRORS as e:
            raise _decode_error(label, e, None) from e
    if isinstance(source, np.ndarray):
        return _from_array(source, label)
    cap = _cap(max_megapixels)
    if isinstance(source, (str, os.PathLike)):
        path = Path(os.fsdecode(source))
        _check_file(path, label)
        try:
            file = open(path, "rb")  # noqa: PTH123, SIM115 (closed below; one open per image)
        except FileNotFoundError:
            raise ImageNotFoundError(label, "file not found") from None
        except PermissionError:
            raise ImageError(label, "permission denied") from None
        except OSError as e:
            raise ImageError(label, one_line(e)) from None
        with file:
            return _decode(file, label, cap, min_size)
    if hasattr(source, "read") and hasattr(source, "seek"):
        if _size(source) == 0:
            raise EmptyImageError(label, "empty file (0 bytes)")
        return _decode(source, label, cap, min_size)
    expected = "a path, a binary file, a PIL image or an array"
    raise InvalidInputError(f"cannot open {label} as an image: expected {expected}")


def _cap(max_megapixels: float | None) -> float:
    cap = get_settings().max_megapixels if max_megapixels is None else float(max_megapixels)
    if not cap > 0:
        raise InvalidInputError(f"max_megapixels must be positive, got {cap}")
    return cap


def _size(file: BinaryIO) -> int:
    file.seek(0, os.SEEK_END)
    size = file.tell()
    file.seek(0)
    return size


def _header(file: BinaryIO, label: str, cap: float, formats: list[str] | None) -> Image.Image:
    """The image as Pillow opens it from its header (nothing decoded yet), checked against
    the megapixel cap; every failure as a typed ImageError."""
    register_plugins()
    _raise_pillow_limit(cap)
    file.seek(0)
    try:
        # Pillow warns between its limit and twice it; we judge size ourselves, so no noise.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(file, formats=formats)
    except Image.DecompressionBombError as e:  # above 2x Pillow's limit, raised by open()
        m = re.search(r"\((\d+) pixels\)", str(e))
        raise ImageTooLargeError(label, _too_large(int(m[1]) if m else None, cap, None)) from e
    except UnidentifiedImageError as e:
        raise _unidentified(file, label) from e
    except _DECODE_ERRORS as e:
        raise _decode_error(label, e, file) from e
    pixels = img.width * img.height
    if pixels > cap * 1e6:
        with img:  # __exit__, unlike close(), leaves a caller's file open
            raise ImageTooLargeError(label, _too_large(pixels, cap, img.size))
    return img


def _decode(file: BinaryIO, label: str, cap: float, min_size: int | None) -> Image.Image:
    if is_raw(file):  # before Pillow, which would read a DNG's thumbnail IFD as the photo
        preview = functools.partial(_decode, label=label, cap=cap, min_size=min_size)
        return decode_raw(file, label, cap, min_size, preview, _too_large)
    img = _header(file, label, cap, None)
    try:
        with img:  # closes what Pillow opened for an animation; never the caller's file
            if min_size and isinstance(img, JpegImagePlugin.JpegImageFile):  # also MPO
                img.draft("RGB", (min_size, min_size))
            img.load()  # the first frame: Image.open leaves animations on frame 0
            _exif_transpose(img, label)
            return _to_rgb(img, label, copy=False)
    except ImageError:
        raise
    except _DECODE_ERRORS as e:
        raise _decode_error(label, e, file) from e


def identify(
    file: BinaryIO, label: str, formats: Collection[str], max_megapixels: float | None = None
) -> str:
    """Which of `formats` (Pillow's names: JPEG, PNG...) the file's content is, from its
    header alone, with the checks every image gets: a file that is none of them raises
    NotAnImageError, one over the megapixel cap ImageTooLargeError. The file is left at
    its start."""
    cap = _cap(max_megapixels)
    register_plugins()
    Image.init()
    known = [f for f in formats if f in Image.OPEN]
    try:
        with _header(file, label, cap, known) as img:
            return img.format or ""
    finally:
        file.seek(0)


def is_remote(path: str) -> bool:
    """A URI that fsspec reads (s3://, gs://, file://...), not a local path."""
    return "://" in path


def open_image_bytes(
    data: bytes, label: str, *, min_size: int | None = None, max_megapixels: float | None = None
) -> Image.Image:
    """`open_image` for bytes (an upload, an object-store read): the same checks and
    decoding as for a file on disk, with errors naming `label`."""
    source = io.BytesIO(data)
    return open_image(source, min_size=min_size, max_megapixels=max_megapixels, label=label)


def _check_file(path: Path, label: str) -> None:
    """Cheap stat checks first, so the common mistakes get precise messages."""
    try:
        st = path.stat()
    except FileNotFoundError:
        reason = "broken symbolic link" if path.is_symlink() else "file not found"
        raise ImageNotFoundError(label, reason) from None
    except OSError as e:
        raise ImageError(label, one_line(e)) from None
    if stat.S_ISDIR(st.st_mode):
        raise NotAnImageError(label, "is a directory, not an image file")
    if not stat.S_ISREG(st.st_mode):
        raise NotAnImageError(label, "not a regular file")
    if st.st_size == 0:
        raise EmptyImageError(label, "empty file (0 bytes)")


def _raise_pillow_limit(cap: float) -> None:
    """Make Pillow's process-wide MAX_IMAGE_PIXELS at least our cap.

    Image.open raises DecompressionBombError above twice that limit before we see the size,
    so a user asking for a higher cap would still be refused; there is no per-call knob. We
    only ever raise it: lowering it could break other code in the process.
    """
    if Image.MAX_IMAGE_PIXELS is None:
        return
    if math.isinf(cap):
        Image.MAX_IMAGE_PIXELS = None
    elif cap * 1e6 > Image.MAX_IMAGE_PIXELS:
        Image.MAX_IMAGE_PIXELS = math.ceil(cap * 1e6)


def _too_large(pixels: int | None, cap: float, size: tuple[int, int] | None) -> str:
    what = "image is too large"
    if pixels:
        mp = pixels / 1e6
        what = f"image is {mp:.1f} MP" if mp >= 0.1 else f"image is {mp:.2g} MP"
        what += f" ({size[0]}x{size[1]})" if size else ""
    hint = "raise it with --max-megapixels or CLIPLENS_MAX_MEGAPIXELS"
    return f"{what}; the limit is {cap:g} MP ({hint})"


def _exif_transpose(img: Image.Image, label: str) -> None:
    """Rotate per EXIF, in place; a damaged EXIF block must not make a good photo unreadable."""
    try:
        ImageOps.exif_transpose(img, in_place=True)
    except (*_DECODE_ERRORS, KeyError, TypeError) as e:
        logger.debug("%s: ignoring unreadable EXIF orientation (%s)", label, one_line(e))


def _to_rgb(img: Image.Image, label: str, *, copy: bool) -> Image.Image:
    """Convert any Pillow mode to RGB the way an image viewer shows it.

    Transparency goes on white (as viewers and browsers show it). Deep grayscale is rescaled
    because Pillow's convert() clips "I"/"F" values above 255 to white.
    """
    mode = img.mode
    if mode == "RGB":
        return img.copy() if copy else img
    try:
        if mode.startswith("I;16"):  # the bit depth is known: 65535 -> 255
            a = np.asarray(img).astype(np.uint32)
            return Image.fromarray(((a + 128) // 257).astype(np.uint8)).convert("RGB")
        if mode in ("I", "F"):
            return Image.fromarray(_scale_to_uint8(np.asarray(img))).convert("RGB")
        if mode in _ALPHA_MODES or "transparency" in img.info:
            rgba = img.convert("RGBA")
            out = Image.new("RGB", img.size, (255, 255, 255))
            out.paste(rgba, mask=rgba.getchannel("A"))
            return out
        return img.convert("RGB")  # P, L, 1, CMYK, YCbCr, RGBX, ...
    except ValueError as e:
        raise UnsupportedImageError(label, f"colour mode {mode} not supported ({e})") from e


def _scale_to_uint8(a: np.ndarray) -> np.ndarray:
    """32-bit int/float gray carries no bit depth: use the nominal range it fits (0..1,
    0..255 or 0..65535), else stretch min..max."""
    a = np.nan_to_num(a.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    lo, hi = float(a.min()), float(a.max())
    if lo >= 0 and hi <= 65535:
        top = next(t for t in (1.0, 255.0, 65535.0) if hi <= t)
        return np.rint(a * (255.0 / top)).astype(np.uint8)
    return np.rint((a - lo) * (255.0 / ((hi - lo) or 1.0))).astype(np.uint8)


def _from_array(a: np.ndarray, label: str) -> Image.Image:
    """HxW, HxWx1, HxWx3 or HxWx4; uint8, uint16, or float in [0, 1]."""
    shape = "x".join(map(str, a.shape))
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[..., 0]
    if a.size == 0 or not (a.ndim == 2 or (a.ndim == 3 and a.shape[2] in (3, 4))):
        raise NotAnImageError(label, f"array of shape {shape} ({a.dtype}) is not HxW/HxWx3/HxWx4")
    if a.dtype == np.uint16:
        a = ((a.astype(np.uint32) + 128) // 257).astype(np.uint8)
    elif np.issubdtype(a.dtype, np.floating):
        lo, hi = float(np.min(a)), float(np.max(a))
        if not (lo >= 0.0 and hi <= 1.0):  # also false for NaN
            raise NotAnImageError(
                label, f"float array ({a.dtype}) values must be in [0, 1], got {lo:g}..{hi:g}"
            )
        a = np.rint(a.astype(np.float32) * 255.0).astype(np.uint8)
    elif a.dtype != np.uint8:
        raise NotAnImageError(label, f"array dtype {a.dtype} (shape {shape}) is not uint8/16/float")
    return _to_rgb(Image.fromarray(np.ascontiguousarray(a)), label, copy=False)


def _decode_error(label: str, e: BaseException, file: BinaryIO | None) -> ImageError:
    msg = one_line(e)
    hinted = any(h in msg.lower() for h in _TRUNCATION_HINTS)
    if isinstance(e, EOFError) or hinted or (file is not None and _container_is_short(file)):
        return TruncatedImageError(label, f"file is truncated or damaged ({msg})")
    return NotAnImageError(label, f"cannot decode image data ({msg})")


def _read_head(file: BinaryIO, n: int) -> bytes:
    try:
        file.seek(0)
        return file.read(n)
    except OSError:
        return b""


def _container_is_short(file: BinaryIO) -> bool:
    """WebP (RIFF) and HEIF/AVIF (ISO boxes) declare their sizes, so a cut file shows; their
    decoders only say "could not create decoder object" or fail to identify the file."""
    try:
        size = _size(file)
        head = file.read(12)
        if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
            return size < int.from_bytes(head[4:8], "little") + 8
        pos = 0
        while head[4:8] == b"ftyp" and pos < size:  # walk the top-level boxes
            file.seek(pos)
            box = file.read(16)
            n = int.from_bytes(box[:4], "big")
            n = int.from_bytes(box[8:16], "big") if n == 1 else n
            if len(box) < 8 or n == 0:  # cut inside a box header / box runs to EOF
                return len(box) < 8
            pos += max(n, 8)
        return pos > size
    except OSError:
        return False


def _unidentified(file: BinaryIO, label: str) -> ImageError:
    kind = _sniff(_read_head(file, 512))
    if kind in ("HEIF", "AVIF"):
        if kind not in Image.OPEN:  # Pillow has run init(): every plugin is registered
            hint = "pip install pillow-heif" if kind == "HEIF" else "pip install -U pillow"
            return UnsupportedImageError(label, f"no {kind} decoder is installed ({hint})")
        if _container_is_short(file):
            return TruncatedImageError(label, f"{kind} file is truncated")
        return NotAnImageError(label, f"cannot decode this {kind} file (damaged?)")
    looks = f" (looks like {kind})" if kind else ""
    return NotAnImageError(label, f"not an image format Pillow can read{looks}")


def _sniff(head: bytes) -> str | None:
    """Name what a file that Pillow rejected probably is, from its first bytes."""
    if head[4:8] == b"ftyp":
        end = min(int.from_bytes(head[:4], "big"), len(head))
        brands = {head[i : i + 4] for i in range(8, end - 3, 4)}
        if brands & {b"avif", b"avis"}:
            return "AVIF"
        return "HEIF" if brands & _HEIF_BRANDS else "an MP4/MOV video"
    for magic, kind in _MAGIC.items():
        if head.startswith(magic):
            return kind
    if head and all(b >= 0x20 or b in b"\t\n\r\f" for b in head):
        text = head.lstrip().lower()
        if text.startswith(b"<svg") or (text.startswith(b"<?xml") and b"<svg" in text):
            return "an SVG vector image; rasterise it first"
        return "an HTML page" if text.startswith((b"<!doctype html", b"<html")) else "a text file"
    return None


def iter_image_files(
    paths: Iterable[str | os.PathLike],
    *,
    extensions: Collection[str] = IMAGE_EXTENSIONS,
    include_hidden: bool = False,
    exclude: Exclusions | None = None,
) -> Iterator[Path]:
    """Yield image files under `paths`, sorted at each level, each file once.

    Files named explicitly are yielded whatever their extension (the user chose them).
    Folders and files that `exclude` leaves out (its patterns, and the `.cliplensignore`
    files met on the way: cliplens.exclusions) are not entered or yielded.
    Symbolic links are followed. Each real file (st_dev, st_ino) comes once: under a name
    reached without a link where it has one (a link to a photo in the folders gives way to
    the photo, which, unlike a link, the server serves), else under the first link to it.
    A folder is entered at most twice, once through a link and once without, so link
    loops end and overlapping roots do not repeat files. Each root's files come when its
    walk is done, in walk order.

    Why: the one walk behind the catalog, embed-dataset and every command that takes
    folders, so they all see the same files.

    >>> import cliplens
    >>> photos = list(cliplens.iter_image_files(["photos/"]))
    >>> len(photos), photos[:3]
    """
    exts = {e.lower() if e.startswith(".") else f".{e.lower()}" for e in extensions}
    found: list[tuple[Path, tuple[int, int], bool]] = []  # (path, file key, through a link)
    entered: dict[tuple[int, int], bool] = {}  # folder key -> entered only through a link

    def may_enter(key: tuple[int, int], linked: bool) -> bool:
        before = entered.get(key)
        if before is None or (before and not linked):
            entered[key] = linked
            return True
        return False

    rules = exclude if exclude is not None else Exclusions()

    def walk(root: Path, dev: int, linked: bool) -> None:
        """Depth-first with an explicit stack, so deep trees hit no recursion limit."""
        listing = _scandir_sorted(root)
        specs = rules.at_root(str(root), _holds(listing, IGNORE_FILE))
        stack = [(dev, linked, iter(listing), specs)]
        while stack:
            dir_dev, dir_linked, entries, specs = stack[-1]
            entry = next(entries, None)
            if entry is None:
                stack.pop()
                continue
            if not include_hidden and entry.name.startswith("."):
                continue
            wanted = Path(entry.name).suffix.lower() in exts
            try:
                is_link = entry.is_symlink()
                through = dir_linked or is_link
                if entry.is_dir():  # follows links; a broken link is neither dir nor file
                    if specs and rules.excluded(specs, entry.path, True):
                        continue
                    st = entry.stat()
                    if may_enter((st.st_dev, st.st_ino), through):
                        listing = _scandir_sorted(Path(entry.path))
                        inner = rules.below(specs, entry.path, _holds(listing, IGNORE_FILE))
                        stack.append((st.st_dev, through, iter(listing), inner))
                elif wanted and specs and rules.excluded(specs, entry.path, False):
                    continue
                elif entry.is_file() and wanted:
                    # d_ino is free for a plain file; a link needs stat() for its target
                    st = entry.stat() if is_link else None
                    key = (st.st_dev, st.st_ino) if st else (dir_dev, entry.inode())
                    found.append((Path(entry.path), key, through))
                elif is_link and wanted:
                    logger.warning("skipping %s: broken symbolic link", entry.path)
            except OSError as e:  # vanished or unreadable entry, a link loop
                logger.warning("skipping %s: %s", entry.path, one_line(e))

    def settle() -> Iterator[Path]:
        """One root's files, in walk order, each under its chosen name; a file that an
        earlier root already gave is not given again."""
        chosen: dict[tuple[int, int], int] = {}
        for i, (_, key, linked) in enumerate(found):
            first = chosen.get(key)
            if key not in given_keys and (first is None or (found[first][2] and not linked)):
                chosen[key] = i
        given_keys.update(chosen)
        picked = [found[i][0] for i in sorted(chosen.values())]
        found.clear()
        yield from picked

    given_keys: set[tuple[int, int]] = set()
    for given in paths:
        root = Path(given)
        try:
            st = root.stat()
        except FileNotFoundError:
            reason = "broken symbolic link" if root.is_symlink() else "no such file or directory"
            raise ImageNotFoundError(os.fsdecode(given), reason) from None
        except OSError as e:  # a link loop (ELOOP), a name too long, no permission
            reason = "symbolic link loop" if e.errno == errno.ELOOP else (e.strerror or str(e))
            raise ImageNotFoundError(os.fsdecode(given), reason.lower()) from None
        if not stat.S_ISDIR(st.st_mode):
            found.append((root, (st.st_dev, st.st_ino), False))
        elif may_enter((st.st_dev, st.st_ino), False):
            walk(root, st.st_dev, False)
        yield from settle()


def _scandir_sorted(path: Path) -> list[os.DirEntry[str]]:
    try:
        with os.scandir(path) as it:
            return sorted(it, key=lambda e: e.name)
    except OSError as e:
        logger.warning("skipping directory %s: %s", path, one_line(e))
        return []


def _holds(entries: list[os.DirEntry[str]], name: str) -> bool:
    """Whether a folder's sorted listing holds a file `name` (no stat of its own)."""
    i = bisect.bisect_left(entries, name, key=lambda e: e.name)
    return i < len(entries) and entries[i].name == name and entries[i].is_file()
