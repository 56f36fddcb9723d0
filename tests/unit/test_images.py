"""open_image and iter_image_files. Every fixture is generated here with Pillow/numpy."""

from __future__ import annotations

import builtins
import io
import sys
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, PngImagePlugin

from cliplens import images
from cliplens.errors import (
    EmptyImageError,
    ImageError,
    ImageNotFoundError,
    ImageTooLargeError,
    InvalidInputError,
    NotAnImageError,
    TruncatedImageError,
    UnsupportedImageError,
)
from cliplens.images import IMAGE_EXTENSIONS, describe, iter_image_files, open_image
from cliplens.settings import get_settings

RED, BLUE, WHITE = (255, 0, 0), (0, 0, 255), (255, 255, 255)


@pytest.fixture(autouse=True)
def _isolated(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    """Default settings, and Pillow's global bomb limit restored after each test."""
    monkeypatch.delenv("CLIPLENS_MAX_MEGAPIXELS", raising=False)
    monkeypatch.setenv("CLIPLENS_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", Image.MAX_IMAGE_PIXELS)
    get_settings.cache_clear()
    yield
    get_settings.cache_clear()


def _halves(size: tuple[int, int] = (64, 48), mode: str = "RGB") -> Image.Image:
    """Left half red, right half blue: shows both colour handling and orientation."""
    img = Image.new("RGB", size, RED)
    img.paste(BLUE, (size[0] // 2, 0, size[0], size[1]))
    return img.convert(mode)


def _near(pixel: tuple[int, ...], want: tuple[int, ...], tol: int = 40) -> bool:
    return all(abs(a - b) <= tol for a, b in zip(pixel, want, strict=True))


def _assert_halves(img: Image.Image, size: tuple[int, int] = (64, 48)) -> None:
    assert img.mode == "RGB"
    assert img.size == size
    w, h = size
    assert _near(img.getpixel((w // 4, h // 2)), RED), img.getpixel((w // 4, h // 2))
    assert _near(img.getpixel((3 * w // 4, h // 2)), BLUE), img.getpixel((3 * w // 4, h // 2))


def _try_save(img: Image.Image, path: Path, fmt: str) -> bool:
    """Whether this Pillow (plus pillow-heif) can encode `fmt` here."""
    if fmt == "HEIF":
        try:
            import pillow_heif
        except ImportError:
            return False
        pillow_heif.register_heif_opener()
    try:
        img.save(path, format=fmt)
    except (KeyError, OSError, ValueError):
        path.unlink(missing_ok=True)
        return False
    return True


def _without_decoder(monkeypatch: pytest.MonkeyPatch, fmt: str) -> None:
    """Simulate a Pillow with no plugin for `fmt` and no pillow-heif to register."""
    monkeypatch.setitem(sys.modules, "pillow_heif", None)  # import -> ImportError
    monkeypatch.setattr(images, "_plugins_registered", False)
    Image.init()
    monkeypatch.setattr(Image, "OPEN", {k: v for k, v in Image.OPEN.items() if k != fmt})
    monkeypatch.setattr(Image, "ID", [i for i in Image.ID if i != fmt])


# ---------------------------------------------------------------- formats


@pytest.mark.parametrize(
    ("fmt", "ext"),
    [
        ("JPEG", "jpg"),
        ("PNG", "png"),
        ("WEBP", "webp"),
        ("GIF", "gif"),
        ("BMP", "bmp"),
        ("TIFF", "tiff"),
        ("PPM", "ppm"),
    ],
)
def test_common_formats_open_as_rgb(tmp_path: Path, fmt: str, ext: str) -> None:
    path = tmp_path / f"img.{ext}"
    _halves().save(path, format=fmt)
    _assert_halves(open_image(path))
    _assert_halves(open_image(str(path)))


@pytest.mark.parametrize("fmt", ["GIF", "WEBP", "TIFF"])
def test_animation_gives_first_frame(tmp_path: Path, fmt: str) -> None:
    path = tmp_path / f"anim.{fmt.lower()}"
    first, second = Image.new("RGB", (32, 32), RED), Image.new("RGB", (32, 32), BLUE)
    first.save(path, format=fmt, save_all=True, append_images=[second], duration=100)
    with Image.open(path) as check:
        assert check.n_frames == 2
    img = open_image(path)
    assert img.size == (32, 32)
    assert _near(img.getpixel((16, 16)), RED)


@pytest.mark.parametrize(("fmt", "ext"), [("HEIF", "heic"), ("AVIF", "avif")])
def test_heic_and_avif(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fmt: str, ext: str):
    path = tmp_path / f"photo.{ext}"
    if _try_save(_halves(), path, fmt):
        _assert_halves(open_image(path))
        _without_decoder(monkeypatch, fmt)  # the same file on an install that cannot read it
    else:  # no encoder here: a minimal ISO-BMFF header is all the sniffing needs
        brand = b"heic" if fmt == "HEIF" else b"avif"
        path.write_bytes(b"\x00\x00\x00\x18ftyp" + brand + b"\x00\x00\x00\x00mif1" + brand)
        _without_decoder(monkeypatch, fmt)
    with pytest.raises(UnsupportedImageError) as info:
        open_image(path)
    assert "pip install" in info.value.reason
    if fmt == "HEIF":
        assert "pip install pillow-heif" in info.value.reason
    assert str(path) in str(info.value)


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    path = tmp_path / "rotated.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: display rotated 90 degrees clockwise
    _halves((80, 40)).save(path, exif=exif, quality=95)
    img = open_image(path)
    assert img.size == (40, 80)
    # clockwise rotation puts the left (red) half on top
    assert _near(img.getpixel((20, 10)), RED)
    assert _near(img.getpixel((20, 70)), BLUE)


def test_palette_with_transparency_goes_on_white(tmp_path: Path) -> None:
    path = tmp_path / "pal.png"
    img = Image.new("P", (4, 1))
    img.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    img.putdata([0, 1, 1, 0])
    img.save(path, transparency=0)
    out = open_image(path)
    assert out.mode == "RGB"
    assert out.getpixel((0, 0)) == WHITE  # transparent black -> white, not black
    assert out.getpixel((1, 0)) == RED


@pytest.mark.parametrize("mode", ["RGBA", "LA"])
def test_alpha_goes_on_white(tmp_path: Path, mode: str) -> None:
    arr = np.zeros((1, 3, 4), np.uint8)
    arr[0, 0] = (0, 0, 0, 0)  # fully transparent black
    arr[0, 1] = (0, 0, 0, 255)  # opaque black
    arr[0, 2] = (0, 0, 0, 128)  # half-transparent black
    path = tmp_path / f"{mode}.png"
    Image.fromarray(arr).convert(mode).save(path)
    out = open_image(path)
    assert out.getpixel((0, 0)) == WHITE
    assert out.getpixel((1, 0)) == (0, 0, 0)
    assert all(120 <= c <= 135 for c in out.getpixel((2, 0)))


def test_cmyk_jpeg(tmp_path: Path) -> None:
    path = tmp_path / "cmyk.jpg"
    Image.new("CMYK", (16, 16), (0, 255, 255, 0)).save(path)  # zero cyan/key = red
    with Image.open(path) as raw:
        assert raw.mode == "CMYK"
    out = open_image(path)
    assert out.mode == "RGB"
    assert _near(out.getpixel((8, 8)), RED)


def test_16bit_grayscale_png_uses_full_range(tmp_path: Path) -> None:
    path = tmp_path / "deep.png"
    gradient = np.linspace(0, 65535, 256).round().astype(np.uint16)
    Image.fromarray(np.tile(gradient, (4, 1))).save(path)
    with Image.open(path) as raw:
        assert raw.mode.startswith("I;16")
    out = np.asarray(open_image(path))
    assert out.shape == (4, 256, 3)
    row = out[0, :, 0].astype(int)
    assert row[0] <= 1 and row[-1] >= 254  # not all white, not all black
    assert 120 <= row[128] <= 135
    assert (np.diff(row) >= 0).all()


@pytest.mark.parametrize(
    "arr",
    [np.linspace(0, 65535, 64).astype(np.int32), np.linspace(0, 1, 64).astype(np.float32)],
    ids=["I", "F"],
)
def test_32bit_gray_modes_are_rescaled_not_clipped(arr: np.ndarray) -> None:
    src = Image.fromarray(arr.reshape(1, 64))
    assert src.mode in ("I", "F")
    row = np.asarray(open_image(src))[0, :, 0].astype(int)
    assert row[0] == 0 and row[-1] == 255
    assert 100 <= row[32] <= 155  # a plain convert() would give 255 (I) or 0/1 (F) here


def test_jpeg_draft_decodes_reduced(tmp_path: Path) -> None:
    path = tmp_path / "big.jpg"
    Image.new("RGB", (4000, 3000), (40, 90, 200)).save(path, quality=90)
    small = open_image(path, min_size=256)
    assert 256 <= min(small.size) < 3000
    assert _near(small.getpixel((10, 10)), (40, 90, 200), tol=8)
    assert open_image(path).size == (4000, 3000)
    assert open_image(path, min_size=5000).size == (4000, 3000)  # never below min_size


def test_min_size_does_not_shrink_other_formats(tmp_path: Path) -> None:
    path = tmp_path / "big.png"
    Image.new("RGB", (1200, 900)).save(path)
    assert open_image(path, min_size=64).size == (1200, 900)


# ---------------------------------------------------------------- errors


def _bad_missing(tmp: Path) -> Path:
    return tmp / "nope.jpg"


def _bad_empty(tmp: Path) -> Path:
    (tmp / "empty.jpg").write_bytes(b"")
    return tmp / "empty.jpg"


def _bad_text(tmp: Path) -> Path:
    (tmp / "notes.jpg").write_text("these are my holiday notes\n")
    return tmp / "notes.jpg"


def _bad_truncated_jpeg(tmp: Path) -> Path:
    buf = io.BytesIO()
    noise = np.random.default_rng(0).integers(0, 256, (120, 160, 3), dtype=np.uint8)
    Image.fromarray(noise).save(buf, format="JPEG")
    data = buf.getvalue()
    (tmp / "cut.jpg").write_bytes(data[: int(len(data) * 0.4)])
    return tmp / "cut.jpg"


def _bad_truncated_webp(tmp: Path) -> Path:
    buf = io.BytesIO()
    noise = np.random.default_rng(1).integers(0, 256, (120, 160, 3), dtype=np.uint8)
    Image.fromarray(noise).save(buf, format="WEBP")
    data = buf.getvalue()
    (tmp / "cut.webp").write_bytes(data[: int(len(data) * 0.6)])
    return tmp / "cut.webp"


def _bad_bomb(tmp: Path) -> Path:
    Image.new("1", (20000, 20000)).save(tmp / "bomb.png")  # ~50 kB on disk, 400 MP
    return tmp / "bomb.png"


def _bad_directory(tmp: Path) -> Path:
    (tmp / "album.jpg").mkdir()
    return tmp / "album.jpg"


def _bad_pdf(tmp: Path) -> Path:
    (tmp / "scan.png").write_bytes(b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n1 0 obj\n")
    return tmp / "scan.png"


def _bad_broken_link(tmp: Path) -> Path:
    (tmp / "gone.jpg").symlink_to(tmp / "never-existed.jpg")
    return tmp / "gone.jpg"


BAD_FILES: list[tuple[Callable[[Path], Path], type[ImageError], str]] = [
    (_bad_missing, ImageNotFoundError, "not found"),
    (_bad_empty, EmptyImageError, "empty file (0 bytes)"),
    (_bad_text, NotAnImageError, "text file"),
    (_bad_truncated_jpeg, TruncatedImageError, "truncated"),
    (_bad_truncated_webp, TruncatedImageError, "truncated"),
    (_bad_bomb, ImageTooLargeError, "is 400.0 MP; the limit is 100 MP"),
    (_bad_directory, NotAnImageError, "directory"),
    (_bad_pdf, NotAnImageError, "PDF"),
    (_bad_broken_link, ImageNotFoundError, "broken symbolic link"),
]


@pytest.mark.parametrize(("make", "error", "words"), BAD_FILES, ids=lambda x: str(x)[:24])
def test_bad_files_raise_typed_one_line_errors(
    tmp_path: Path, make: Callable[[Path], Path], error: type[ImageError], words: str
) -> None:
    path = make(tmp_path)
    with pytest.raises(error) as info:
        open_image(path)
    message = str(info.value)
    assert type(info.value) is error
    assert message.startswith(f"{path}: ")
    assert info.value.path == str(path)
    assert words in message
    assert "\n" not in message and "\r" not in message


def test_too_large_message_says_how_to_raise_it(tmp_path: Path) -> None:
    with pytest.raises(ImageTooLargeError) as info:
        open_image(_bad_bomb(tmp_path))
    assert "--max-megapixels" in str(info.value)
    assert "CLIPLENS_MAX_MEGAPIXELS" in str(info.value)


def test_size_cap_is_checked_before_decoding(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    path = tmp_path / "small.png"
    Image.new("RGB", (200, 100)).save(path)

    def no_decoding(self: Image.Image) -> None:
        raise AssertionError("pixels were decoded")

    monkeypatch.setattr(PngImagePlugin.PngImageFile, "load", no_decoding)
    with pytest.raises(ImageTooLargeError, match=r"0\.02 MP"):
        open_image(path, max_megapixels=0.01)


def test_cap_comes_from_settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "small.png"
    Image.new("RGB", (200, 100)).save(path)
    monkeypatch.setenv("CLIPLENS_MAX_MEGAPIXELS", "0.001")
    get_settings.cache_clear()
    with pytest.raises(ImageTooLargeError, match=r"the limit is 0\.001 MP"):
        open_image(path)
    assert open_image(path, max_megapixels=1).size == (200, 100)  # argument wins


def test_pillow_limit_is_raised_to_the_cap_never_lowered(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "img.png"
    Image.new("RGB", (60, 60)).save(path)  # 3600 px: over 2x the limit below
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    assert open_image(path, max_megapixels=0.01).size == (60, 60)
    assert Image.MAX_IMAGE_PIXELS == 10_000
    with pytest.raises(ImageTooLargeError):
        open_image(path, max_megapixels=0.001)
    assert Image.MAX_IMAGE_PIXELS == 10_000


def test_bomb_warning_does_not_escape(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "img.png"
    Image.new("RGB", (40, 40)).save(path)  # 1600 px: Pillow warns above 1000
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with pytest.raises(ImageTooLargeError):
            open_image(path, max_megapixels=0.0005)


def test_file_handles_are_closed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    gif = tmp_path / "anim.gif"
    Image.new("RGB", (8, 8), RED).save(gif, save_all=True, append_images=[_halves((8, 8))])
    tif = tmp_path / "pages.tif"
    Image.new("RGB", (8, 8)).save(tif, save_all=True, append_images=[Image.new("RGB", (8, 8))])
    jpg = tmp_path / "a.jpg"
    _halves().save(jpg)
    cut = _bad_truncated_jpeg(tmp_path)
    opened: list[io.IOBase] = []
    real_open = builtins.open

    def tracking_open(*args, **kwargs):
        f = real_open(*args, **kwargs)
        opened.append(f)
        return f

    monkeypatch.setattr(builtins, "open", tracking_open)
    for path in (gif, tif, jpg):
        img = open_image(path)
        assert np.asarray(img).shape[:2] == img.size[::-1]  # pixels usable, file closed
    with pytest.raises(TruncatedImageError):
        open_image(cut)
    assert len(opened) >= 4
    assert all(f.closed for f in opened)


def test_bad_arguments() -> None:
    with pytest.raises(InvalidInputError):
        open_image(_halves(), min_size=0)
    with pytest.raises(InvalidInputError):
        open_image("x.jpg", max_megapixels=0)
    with pytest.raises(InvalidInputError):
        open_image(b"\xff\xd8 raw bytes")  # type: ignore[arg-type]


# ---------------------------------------------------------------- in-memory inputs


def test_pil_input_is_converted_without_mutation() -> None:
    src = Image.new("RGBA", (2, 1), (0, 0, 0, 0))
    src.putpixel((1, 0), (10, 20, 30, 255))
    out = open_image(src)
    assert out.mode == "RGB" and src.mode == "RGBA"
    assert out.getpixel((0, 0)) == WHITE and out.getpixel((1, 0)) == (10, 20, 30)
    assert src.getpixel((0, 0)) == (0, 0, 0, 0)
    rgb = Image.new("RGB", (2, 2), RED)
    copy = open_image(rgb)
    assert copy is not rgb
    copy.putpixel((0, 0), BLUE)
    assert rgb.getpixel((0, 0)) == RED


def test_pil_input_keeps_its_orientation(tmp_path: Path) -> None:
    path = tmp_path / "rotated.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6
    _halves((80, 40)).save(path, exif=exif)
    with Image.open(path) as src:
        assert open_image(src).size == (80, 40)


def test_numpy_inputs() -> None:
    rgb = np.random.default_rng(0).integers(0, 256, (3, 4, 3), dtype=np.uint8)
    before = rgb.copy()
    out = open_image(rgb)
    assert out.mode == "RGB" and out.size == (4, 3)
    assert np.array_equal(np.asarray(out), rgb)
    out.putpixel((0, 0), (1, 2, 3))  # the result does not alias the caller's array
    assert np.array_equal(rgb, before)

    assert open_image(np.full((2, 2, 3), 0.5)).getpixel((0, 0)) == (128, 128, 128)
    assert open_image(np.full((2, 5), 200, np.uint8)).getpixel((4, 1)) == (200, 200, 200)
    assert open_image(np.full((2, 2), 65535, np.uint16)).getpixel((0, 0)) == WHITE
    rgba = np.zeros((1, 1, 4), np.uint8)  # transparent
    assert open_image(rgba).getpixel((0, 0)) == WHITE


@pytest.mark.parametrize(
    ("arr", "words"),
    [
        (np.zeros((2, 3, 5), np.uint8), "2x3x5"),
        (np.zeros(7, np.uint8), "shape 7"),
        (np.zeros((0, 4, 3), np.uint8), "0x4x3"),
        (np.zeros((2, 2, 3), np.int64), "int64"),
        (np.zeros((2, 2), bool), "bool"),
        (np.full((2, 2, 3), 2.0), "[0, 1]"),
        (np.full((2, 2, 3), np.nan, np.float32), "[0, 1]"),
    ],
)
def test_bad_arrays(arr: np.ndarray, words: str) -> None:
    with pytest.raises(NotAnImageError) as info:
        open_image(arr)
    assert words in str(info.value)
    assert str(info.value).startswith(f"<array {'x'.join(map(str, arr.shape))}>: ")


def test_describe(tmp_path: Path) -> None:
    assert describe("photos/cat.jpg") == "photos/cat.jpg"
    assert describe(tmp_path / "cat.jpg") == str(tmp_path / "cat.jpg")
    assert describe(Image.new("RGB", (640, 480))) == "<PIL image 640x480>"
    assert describe(np.zeros((3, 4, 3))) == "<array 3x4x3>"


# ---------------------------------------------------------------- folder walking


def _touch(root: Path, *names: str) -> None:
    for name in names:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(b"x")


def _rel(paths: list[Path], root: Path) -> list[str]:
    return [p.relative_to(root).as_posix() for p in paths]


def test_extensions_constant() -> None:
    assert {".jpg", ".jpeg", ".png", ".webp", ".heic", ".avif", ".tiff", ".ppm"} <= IMAGE_EXTENSIONS
    assert all(e == e.lower() and e.startswith(".") for e in IMAGE_EXTENSIONS)


def test_walk_is_recursive_sorted_and_filtered(tmp_path: Path) -> None:
    _touch(tmp_path, "b.jpg", "a.png", "Upper.JPG", "z.txt", "sub/c.jpeg", "sub/deep/d.webp")
    _touch(tmp_path, ".hidden.jpg", ".cache/e.jpg", "sub/.thumbs/f.png")
    found = _rel(list(iter_image_files([tmp_path])), tmp_path)
    assert found == ["Upper.JPG", "a.png", "b.jpg", "sub/c.jpeg", "sub/deep/d.webp"]
    with_hidden = _rel(list(iter_image_files([tmp_path], include_hidden=True)), tmp_path)
    assert {".hidden.jpg", ".cache/e.jpg", "sub/.thumbs/f.png"} <= set(with_hidden)
    assert len(with_hidden) == 8
    only_png = _rel(list(iter_image_files([tmp_path], extensions={"PNG"})), tmp_path)
    assert only_png == ["a.png"]


def test_walk_symlink_loop_terminates(tmp_path: Path) -> None:
    _touch(tmp_path, "root/a.jpg", "root/sub/b.jpg", "outside/c.jpg")
    root = tmp_path / "root"
    (root / "sub" / "loop").symlink_to(root, target_is_directory=True)
    (root / "ext").symlink_to(tmp_path / "outside", target_is_directory=True)
    (root / "dangling.jpg").symlink_to(tmp_path / "missing.jpg")
    found = _rel(list(iter_image_files([root])), root)
    assert found == ["a.jpg", "ext/c.jpg", "sub/b.jpg"]


def test_walk_explicit_files_and_overlapping_roots(tmp_path: Path) -> None:
    _touch(tmp_path, "a.jpg", "sub/b.png", "notes.txt")
    roots = [tmp_path / "notes.txt", tmp_path / "sub/b.png", tmp_path, tmp_path / "sub"]
    found = list(iter_image_files([*roots, tmp_path / "a.jpg"]))
    assert _rel(found, tmp_path) == ["notes.txt", "sub/b.png", "a.jpg"]
    assert all(isinstance(p, Path) for p in found)


def test_walk_keeps_relative_roots(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _touch(tmp_path, "pics/a.jpg")
    monkeypatch.chdir(tmp_path)
    assert list(iter_image_files(["pics"])) == [Path("pics/a.jpg")]
    assert not next(iter_image_files(["pics"])).is_absolute()


def test_walk_missing_root_raises(tmp_path: Path) -> None:
    _touch(tmp_path, "a.jpg")
    walker = iter_image_files([tmp_path, tmp_path / "nope"])
    assert next(walker) == tmp_path / "a.jpg"
    with pytest.raises(ImageNotFoundError) as info:
        next(walker)
    assert str(tmp_path / "nope") in str(info.value)


def test_open_files_decode_as_their_paths_and_stay_open(tmp_path: Path) -> None:
    jpg = tmp_path / "a.jpg"
    _halves((640, 480)).save(jpg, quality=90)
    by_path = np.asarray(open_image(jpg, min_size=100))
    with jpg.open("rb") as f:
        f.read(7)  # wherever the caller left it: read from the start
        by_file = np.asarray(open_image(f, min_size=100, label="photo 1"))
        assert not f.closed
        with pytest.raises(ImageTooLargeError, match="photo 1"):
            open_image(f, max_megapixels=0.1, label="photo 1")
        assert not f.closed  # a refusal leaves the caller's file open too
        assert images.identify(f, "photo 1", ["PNG", "JPEG"]) == "JPEG"
        assert f.tell() == 0
        with pytest.raises(NotAnImageError):
            images.identify(f, "photo 1", ["PNG"])
    np.testing.assert_array_equal(by_file, by_path)  # draft decode included
    by_bytes = images.open_image_bytes(jpg.read_bytes(), "upload", min_size=100)
    np.testing.assert_array_equal(np.asarray(by_bytes), by_path)
    with pytest.raises(EmptyImageError, match="upload"):
        images.open_image_bytes(b"", "upload")
