"""Camera RAW photos through `open_image`: which decode runs (embedded preview, half-size
or full demosaic), the size and orientation that come back, and the typed errors damaged
files, impostors and a missing rawpy give. The DNGs are made from real photos
(tests/dng_files.py)."""

from __future__ import annotations

import io
import os
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cliplens.errors import (
    EmptyImageError,
    ImageError,
    ImageTooLargeError,
    NotAnImageError,
    TruncatedImageError,
    UnsupportedImageError,
)
from cliplens.images import IMAGE_EXTENSIONS, iter_image_files, open_image, open_image_bytes
from cliplens.raw import RAW_EXTENSIONS, RAW_INFO_KEY, is_raw
from dng_files import dng_bytes, jpeg_bytes, with_preview, write_dng

pytest.importorskip("rawpy")
pytest.importorskip("pidng")


@pytest.fixture(scope="module")
def cat(photos: Path) -> Image.Image:
    """451x300, landscape: a quarter turn shows at once in the size."""
    with Image.open(photos / "cat.jpg") as img:
        return img.convert("RGB").crop((0, 0, 450, 300))


def similarity(a: Image.Image, b: Image.Image) -> float:
    """Correlation of the two images' grey levels at 48x32 (brightness-blind: LibRaw
    brightens and uses another tone curve than the JPEG)."""
    x, y = (np.asarray(i.convert("L").resize((48, 32)), np.float64).ravel() for i in (a, b))
    return float(np.corrcoef(x, y)[0, 1])


def assert_upright(image: Image.Image, upright: Image.Image) -> None:
    assert image.size[0] > image.size[1]  # the cat photo is landscape
    right = similarity(image, upright)
    wrong = [similarity(image, upright.transpose(t)) for t in (Image.Transpose.ROTATE_180,)]
    wrong.append(similarity(image, upright.transpose(Image.Transpose.FLIP_LEFT_RIGHT)))
    assert right > 0.95 and all(right > w + 0.2 for w in wrong), (right, wrong)


def one_line_error(excinfo: pytest.ExceptionInfo, path: Path | str) -> str:
    message = str(excinfo.value)
    assert "\n" not in message and message.startswith(f"{path}: "), message
    return message


@pytest.mark.parametrize("orientation", [1, 3, 6, 8])
def test_demosaic_paths_are_upright_at_the_size_asked(tmp_path, cat, orientation):
    path = write_dng(tmp_path / "cat.dng", cat, orientation)
    half = open_image(path, min_size=150)  # 300 // 2 >= 150: no interpolation needed
    assert half.info[RAW_INFO_KEY] == "half-size" and half.mode == "RGB"
    assert half.size == (225, 150)
    assert_upright(half, cat)
    full = open_image(path, min_size=151)  # half size would be under min_size
    assert full.info[RAW_INFO_KEY] == "full-size" and full.size == (450, 300)
    assert_upright(full, cat)
    whole = open_image(path)  # no min_size: the whole image
    assert whole.info[RAW_INFO_KEY] == "full-size" and whole.size == (450, 300)


@pytest.mark.parametrize("orientation", [1, 3, 6, 8])
def test_preview_path_is_upright(tmp_path, cat, orientation):
    """Cameras store the preview as the sensor saw it; the RAW's flip turns it."""
    path = write_dng(tmp_path / "cat.dng", cat, orientation, preview="sensor")
    image = open_image(path, min_size=300)
    assert image.info[RAW_INFO_KEY] == "preview"
    assert image.size == (450, 300)
    assert_upright(image, cat)
    # draft mode on the preview, as on any JPEG: the short side stays >= min_size
    for min_size, size in ((150, (225, 150)), (64, (113, 75))):
        small = open_image(path, min_size=min_size)
        assert small.info[RAW_INFO_KEY] == "preview" and small.size == size
        assert_upright(small, cat)


def test_preview_orientation_when_its_tags_and_the_raw_disagree(tmp_path, cat):
    """LibRaw gives a preview without EXIF an EXIF block holding the RAW's orientation,
    and the JPEG path turns it by that; the RAW's shape settles the cases where that
    tag is wrong."""
    # its own EXIF orientation, a copy of the RAW's, as most cameras write it
    own = write_dng(tmp_path / "own.dng", cat, 6, preview="sensor", preview_exif=6)
    assert_upright(open_image(own, min_size=150), cat)
    # its own tag says upright (1) where the RAW says a quarter turn: the RAW wins
    stale = write_dng(tmp_path / "stale.dng", cat, 8, preview="sensor", preview_exif=1)
    assert_upright(open_image(stale, min_size=150), cat)
    # stored upright by the camera (a landscape preview of a portrait-held sensor)
    turned = write_dng(tmp_path / "turned.dng", cat, 6, preview="upright")
    image = open_image(turned, min_size=150)
    assert image.info[RAW_INFO_KEY] == "preview"
    assert_upright(image, cat)


def test_small_or_damaged_preview_falls_back_to_the_demosaic(tmp_path, cat):
    thumb = cat.resize((160, 106))  # a thumbnail, not a preview: too small for min_size
    path = write_dng(tmp_path / "thumb.dng", cat, 1, preview=thumb)
    image = open_image(path, min_size=150)
    assert image.info[RAW_INFO_KEY] == "half-size" and image.size == (225, 150)
    assert open_image(path, min_size=100).info[RAW_INFO_KEY] == "preview"
    # Pillow alone would have read the DNG's IFD0, the thumbnail, as the photo
    assert Image.open(path).size == (160, 106)
    # a preview whose JPEG data is garbage: the raw data is still good
    bad = bytearray(with_preview(dng_bytes(np.asarray(cat)), jpeg_bytes(cat)))
    start = bytes(bad).index(b"\xff\xd8\xff")
    bad[start + 600 : start + 4000] = b"\x00" * 3400
    (tmp_path / "bad.dng").write_bytes(bytes(bad))
    image = open_image(tmp_path / "bad.dng", min_size=150)
    assert image.info[RAW_INFO_KEY] in ("preview", "half-size")  # libjpeg may still cope
    assert image.size in ((450, 300), (225, 150))


def test_raw_from_an_open_file_or_bytes_is_known_by_its_content(tmp_path, cat):
    data = write_dng(tmp_path / "cat.dng", cat, 6).read_bytes()
    image = open_image_bytes(data, "upload", min_size=150)  # no name: a DNG by its tags
    assert image.info[RAW_INFO_KEY] == "half-size" and image.size == (225, 150)
    (tmp_path / "renamed.tif").write_bytes(data)
    assert open_image(tmp_path / "renamed.tif", min_size=150).size == (225, 150)
    with (tmp_path / "cat.dng").open("rb") as f:
        assert open_image(f, min_size=150).size == (225, 150)


def test_what_is_read_as_raw():
    def sniff(data: bytes, name: str | None = None) -> bool:
        f = io.BytesIO(data)
        if name:
            f.name = name
        found = is_raw(f)
        assert f.tell() == 0
        return found

    jpeg = jpeg_bytes(Image.new("RGB", (8, 8)))
    tiff = io.BytesIO()
    Image.new("RGB", (8, 8)).save(tiff, "TIFF")
    assert not sniff(jpeg) and not sniff(jpeg, "a.dng")  # a JPEG named .dng is a JPEG
    assert not sniff(tiff.getvalue(), "a.tif")
    assert sniff(tiff.getvalue(), "a.NEF")  # TIFF-based RAWs without a DNG tag: by name
    assert sniff(b"not a photo at all", "a.cr2") and not sniff(b"not a photo at all", "a.txt")
    assert sniff(b"FUJIFILMCCD-RAW 0201FF383501") and sniff(b"IIRO\x08\x00\x00\x00")
    assert sniff(b"\x00\x00\x00\x18ftypcrx \x00\x00\x00\x01crx isom")  # CR3
    assert sniff(b"II*\x00\x10\x00\x00\x00CR\x02\x00")  # CR2


def test_a_jpeg_named_dng_is_read_as_a_jpeg(tmp_path, cat):
    path = tmp_path / "really.dng"
    path.write_bytes(jpeg_bytes(cat))
    image = open_image(path, min_size=64)
    assert RAW_INFO_KEY not in image.info and image.size == (113, 75)  # draft mode: 1/4


def test_truncated_raw_files_are_typed_one_line_errors(tmp_path, cat):
    data = dng_bytes(np.asarray(cat))
    (tmp_path / "cut.dng").write_bytes(data[: len(data) // 2])
    with pytest.raises(TruncatedImageError) as e:
        open_image(tmp_path / "cut.dng", min_size=64)
    assert "truncated" in one_line_error(e, tmp_path / "cut.dng")
    # the camera layout: IFD0 (preview) at the end, so the cut takes the IFD
    full = with_preview(data, jpeg_bytes(cat))
    (tmp_path / "cut2.dng").write_bytes(full[:-100])
    with pytest.raises(TruncatedImageError) as e:
        open_image(tmp_path / "cut2.dng", min_size=64)
    one_line_error(e, tmp_path / "cut2.dng")
    # a file whose byte counts were cut with it: LibRaw itself finds the end of the data
    (tmp_path / "cut3.dng").write_bytes(_with_tile_bytes(data, len(data) // 4)[: len(data) // 2])
    with pytest.raises(TruncatedImageError) as e:
        open_image(tmp_path / "cut3.dng", min_size=64)
    assert "LibRaw" in one_line_error(e, tmp_path / "cut3.dng")


def _with_tile_bytes(dng: bytes, count: int) -> bytes:
    """`dng` with its TileByteCounts entry (tag 325, one LONG, inline) set to `count`."""
    out = bytearray(dng)
    ifd = struct.unpack_from("<I", out, 4)[0]
    for i in range(struct.unpack_from("<H", out, ifd)[0]):
        at = ifd + 2 + 12 * i
        if struct.unpack_from("<H", out, at)[0] == 325:
            struct.pack_into("<I", out, at + 8, count)
            return bytes(out)
    raise AssertionError("no TileByteCounts")


def test_files_named_raw_that_are_not_are_typed_errors(tmp_path):
    (tmp_path / "notes.dng").write_text("these are my notes, not a photo\n" * 20)
    with pytest.raises(NotAnImageError) as e:
        open_image(tmp_path / "notes.dng", min_size=224)
    assert "not a RAW photo" in one_line_error(e, tmp_path / "notes.dng")
    (tmp_path / "empty.nef").write_bytes(b"")
    with pytest.raises(EmptyImageError):
        open_image(tmp_path / "empty.nef")
    garbage = np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8).tobytes()
    (tmp_path / "noise.arw").write_bytes(garbage)
    with pytest.raises(ImageError) as e:
        open_image(tmp_path / "noise.arw")
    one_line_error(e, tmp_path / "noise.arw")


def test_megapixel_cap_is_checked_before_decoding(tmp_path, cat):
    path = write_dng(tmp_path / "cat.dng", cat, 6, preview="sensor")
    for min_size in (None, 150):  # the preview's path too: the answer must not depend on it
        with pytest.raises(ImageTooLargeError) as e:
            open_image(path, min_size=min_size, max_megapixels=0.1)
        assert "--max-megapixels" in one_line_error(e, path)
    assert open_image(path, min_size=300, max_megapixels=0.2).size == (450, 300)
    # LibRaw reads the whole file: a file far bigger than such a photo is refused unread
    (tmp_path / "huge.dng").write_bytes(b"\0" * 20_000)
    with pytest.raises(ImageTooLargeError) as e:
        open_image(tmp_path / "huge.dng", max_megapixels=0.001)  # 8 bytes a pixel: 8 kB
    assert "more than a RAW photo" in one_line_error(e, tmp_path / "huge.dng")


def test_without_rawpy_a_raw_file_names_the_extra(tmp_path, cat, monkeypatch):
    path = write_dng(tmp_path / "cat.dng", cat)
    jpeg = tmp_path / "cat.jpg"
    jpeg.write_bytes(jpeg_bytes(cat))
    monkeypatch.setitem(sys.modules, "rawpy", None)  # `import rawpy` raises ImportError
    with pytest.raises(UnsupportedImageError) as e:
        open_image(path, min_size=224)
    assert "pip install 'cliplens[raw]'" in one_line_error(e, path)
    assert open_image(jpeg).size == (450, 300)  # everything else still opens


def test_the_jpeg_path_imports_no_rawpy(photos):
    code = (
        "import sys\n"
        "from cliplens.images import open_image\n"
        f"open_image({str(photos / 'cat.jpg')!r}, min_size=224)\n"
        "assert 'rawpy' not in sys.modules, 'rawpy imported for a JPEG'\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr


def test_raw_files_are_listed_by_the_folder_walk(tmp_path):
    assert {".dng", ".cr2", ".cr3", ".nef", ".arw", ".raf", ".orf", ".rw2", ".pef", ".srw"} <= (
        RAW_EXTENSIONS
    )
    assert RAW_EXTENSIONS <= IMAGE_EXTENSIONS
    for name in ("a.DNG", "b.nef", "c.CR3", "d.jpg", "e.xmp", "f.txt"):
        (tmp_path / name).write_bytes(b"x")
    assert [p.name for p in iter_image_files([tmp_path])] == ["a.DNG", "b.nef", "c.CR3", "d.jpg"]


def test_a_process_that_ran_libraw_can_start_decoders(tmp_path, cat):
    """LibRaw's OpenMP pool does not survive a fork: the indexer's decoder processes,
    started after the process decoded a RAW (a query by a RAW photo, a server upload),
    would wait forever for its threads if they were forked. They come from a fork server
    from then on (decode_ahead.process_pool), and decode."""
    path = str(write_dng(tmp_path / "cat.dng", cat))
    code = (
        "from functools import partial\n"
        "from cliplens import decode_ahead\n"
        "from cliplens.images import open_image\n"
        "assert not decode_ahead._fork_unsafe\n"
        f"open_image({path!r}, min_size=100)  # the OpenMP threads exist now\n"
        "assert decode_ahead._fork_unsafe\n"
        "with decode_ahead.process_pool(1, int) as pool:\n"
        f"    job = pool.submit(partial(open_image, min_size=100), {path!r})\n"
        "    print(job.result().size)\n"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "2"}  # a team of threads even on one core
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env
    )
    assert out.returncode == 0 and out.stdout.strip() == "(225, 150)", out.stderr[-2000:]
