"""`search --preview`, `similar --preview`: a thumbnail beside each result, drawn with the
terminal's own image protocol (kitty's graphics, iTerm2's inline images, or sixel).

Nothing here writes an escape code unless the output is a terminal that draws images:
`detect` says which protocol it speaks, or None, and None means the plain table. The
environment names most terminals; sixel is asked of the terminal itself (DA1, `ESC [ c`:
attribute 4 is sixel graphics), as chafa, timg and notcurses do, with a short timeout.
`CLIPLENS_PREVIEW=kitty|iterm2|sixel|none` overrides the guess (tmux and screen need it:
they pass images through only when set up to)."""

from __future__ import annotations

import base64
import io
import os
import re
import select
import shutil
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, get_args

from cliplens.cli.output import hit_label, shown
from cliplens.errors import ClipLensError, InvalidInputError

if TYPE_CHECKING:
    from PIL import Image

    from cliplens.searchable import Hit

# Commands import the library inside their bodies, so that `cliplens --help` and every
# other command start without torch (tests/unit/test_structure.py checks --help); this
# module imports Pillow and numpy only when it draws.

Protocol = Literal["kitty", "iterm2", "sixel"]
PROTOCOLS: tuple[str, ...] = get_args(Protocol)
ENV_VAR = "CLIPLENS_PREVIEW"
DA1_TIMEOUT_S = 0.2  # a terminal answers DA1 in a few ms, even over ssh on a LAN
ROWS, COLS = 4, 8  # a thumbnail's cells
GAP = 2  # columns between a thumbnail and its text
# cell size in pixels where the terminal does not report it: kitty and iTerm2 scale the
# image to its cells, so only the aspect matters; sixel draws pixels as they are, so its
# guess is a small cell, and a thumbnail never runs past its rows
GUESSED_CELL: dict[str, tuple[int, int]] = {"kitty": (10, 20), "iterm2": (10, 20), "sixel": (8, 16)}
MAX_CELL_PX = 64  # a bigger report is wrong, and would make huge thumbnails
KITTY_CHUNK = 4096  # base64 bytes per kitty escape code (the spec's limit)
SIXEL_COLORS = 256  # colour registers: what xterm, mlterm, foot and wezterm offer

_DA1_REPLY = re.compile(rb"\x1b\[\?([0-9;]*)c")

# ------------------------------------------------------------------ detection


def _isatty(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError, OSError):  # no such method, or a closed file
        return False


def detect(
    stream: Any,
    env: Mapping[str, str] | None = None,
    *,
    stdin: Any = None,
    tty: str = "/dev/tty",
    timeout: float = DA1_TIMEOUT_S,
) -> Protocol | None:
    """The image protocol the terminal behind `stream` speaks, or None (a pipe, a file, a
    terminal without images, tmux or screen unless CLIPLENS_PREVIEW says so)."""
    env = os.environ if env is None else env
    if not _isatty(stream):
        return None
    forced = env.get(ENV_VAR, "").strip().lower()
    if forced in ("none", "off"):
        return None
    if forced in PROTOCOLS:
        return forced  # type: ignore[return-value]
    if forced not in ("", "auto"):
        choices = ", ".join((*PROTOCOLS, "none", "auto"))
        raise InvalidInputError(f"{ENV_VAR}={forced!r} is not a preview protocol; use {choices}")
    term, program = env.get("TERM", ""), env.get("TERM_PROGRAM", "")
    if env.get("TMUX") or term.startswith(("screen", "tmux")):
        return None  # images reach the terminal only through passthrough
    if (
        term in ("xterm-kitty", "xterm-ghostty")
        or env.get("KITTY_WINDOW_ID")
        or program == "ghostty"
    ):
        return "kitty"
    if program in ("iTerm.app", "WezTerm") or env.get("LC_TERMINAL") == "iTerm2":
        return "iterm2"
    if term in ("", "dumb") or not _isatty(sys.stdin if stdin is None else stdin):
        return None  # no one to answer a query (a script feeding stdin, a cron job)
    attributes = query_da1(tty, timeout)
    return "sixel" if attributes is not None and 4 in attributes else None


def query_da1(tty: str = "/dev/tty", timeout: float = DA1_TIMEOUT_S) -> tuple[int, ...] | None:
    """The terminal's primary device attributes (`ESC [ c`), asked on `tty` without echo
    or line buffering and restored afterwards; None when it is silent past `timeout`, is
    no terminal, or belongs to another process group (asking would stop this process)."""
    if not sys.platform.startswith(("linux", "darwin")):
        return None
    import termios  # here: Linux and macOS only

    try:
        fd = os.open(tty, os.O_RDWR | os.O_NOCTTY)
    except OSError:
        return None
    try:
        if _in_background(fd):
            return None
        try:
            saved = termios.tcgetattr(fd)
        except termios.error:
            return None
        quiet = [*saved[:6], list(saved[6])]
        quiet[3] &= ~(termios.ICANON | termios.ECHO)
        quiet[6][termios.VMIN], quiet[6][termios.VTIME] = 0, 0
        try:
            termios.tcsetattr(fd, termios.TCSANOW, quiet)
            os.write(fd, b"\x1b[c")
            return _read_da1(fd, timeout)
        except (OSError, termios.error):
            return None
        finally:
            termios.tcsetattr(fd, termios.TCSANOW, saved)
    finally:
        os.close(fd)


def _in_background(fd: int) -> bool:
    """Whether `fd` is this process's controlling terminal and another process group has
    it: changing its settings then stops this process (SIGTTOU). Any other terminal
    (tcgetpgrp fails) is safe to ask."""
    try:
        return os.tcgetpgrp(fd) != os.getpgrp()
    except OSError:
        return False


def _read_da1(fd: int, timeout: float) -> tuple[int, ...] | None:
    deadline = time.monotonic() + timeout
    answer = b""
    while (left := deadline - time.monotonic()) > 0:
        ready, _, _ = select.select([fd], [], [], left)
        if not ready:
            return None
        chunk = os.read(fd, 256)
        if not chunk:
            return None
        answer += chunk
        found = _DA1_REPLY.search(answer)
        if found:
            return tuple(int(a) for a in found.group(1).split(b";") if a)
    return None


# ------------------------------------------------------------------ encoders


def kitty(png: bytes, cols: int, rows: int) -> str:
    """kitty's graphics protocol: transmit and display a PNG over cols x rows cells, the
    cursor left where it is (C=1), the terminal's replies suppressed in every chunk (q=2:
    otherwise they arrive on stdin as if typed)."""
    data = base64.standard_b64encode(png).decode("ascii")
    chunks = [data[i : i + KITTY_CHUNK] for i in range(0, len(data), KITTY_CHUNK)] or [""]
    codes = []
    for i, chunk in enumerate(chunks):
        more = int(i < len(chunks) - 1)
        keys = f"a=T,f=100,c={cols},r={rows},C=1,q=2,m={more}" if i == 0 else f"m={more},q=2"
        codes.append(f"\x1b_G{keys};{chunk}\x1b\\")
    return "".join(codes)


def iterm2(data: bytes, cols: int, rows: int) -> str:
    """iTerm2's inline image (also WezTerm's): width and height in cells (a bare number is
    cells in iTerm2's spec), inside which the image keeps its aspect; size is the file's."""
    payload = base64.standard_b64encode(data).decode("ascii")
    args = f"inline=1;width={cols};height={rows};preserveAspectRatio=1;size={len(data)}"
    return f"\x1b]1337;File={args}:{payload}\x07"


def sixel_palette(image: Image.Image) -> Image.Image:
    """The image in at most SIXEL_COLORS colours (mode P), as `sixel` draws it."""
    if image.mode == "P":  # a palette holds 256 colours at most
        return image
    return image.convert("RGB").quantize(colors=SIXEL_COLORS)


def _percent(value: int) -> int:
    return round(value * 100 / 255)


def _run_length(chars: str) -> str:
    return re.sub(r"(.)\1{3,}", lambda m: f"!{len(m.group(0))}{m.group(1)}", chars)


def sixel(image: Image.Image) -> str:
    """One sixel image (DCS `ESC P 0;1 q` ... `ESC \\`): raster attributes (square pixels,
    width, height), a colour register per colour used (RGB in percent), then bands six
    pixels high, one pass per colour present (`#n`, run-length `!N`, `$` back to the band's
    start, `-` to the next band). P2=1 leaves unpainted pixels as they were: the rows below
    the image in its last band."""
    import numpy as np  # here: drawing only

    indexed = sixel_palette(image)
    pixels = np.asarray(indexed, dtype=np.uint8)
    height, width = pixels.shape
    palette = indexed.getpalette() or []
    parts = [f'\x1bP0;1q"1;1;{width};{height}']
    for c in np.unique(pixels).tolist():
        r, g, b = [*palette[3 * c : 3 * c + 3], 0, 0, 0][:3]
        parts.append(f"#{c};2;{_percent(r)};{_percent(g)};{_percent(b)}")
    weights = (1 << np.arange(6, dtype=np.int32)).reshape(6, 1)
    bands = []
    for top in range(0, height, 6):
        band = pixels[top : top + 6]
        passes = []
        for c in np.unique(band).tolist():
            bits = ((band == c) * weights[: len(band)]).sum(axis=0)
            end = int(np.flatnonzero(bits)[-1]) + 1  # nothing to draw past the last pixel
            chars = (bits[:end] + 63).astype(np.uint8).tobytes().decode("ascii")
            passes.append(f"#{c}{_run_length(chars)}")
        bands.append("$".join(passes))
    parts.append("-".join(bands))  # no "-" after the last band: it would add six rows
    parts.append("\x1b\\")
    return "".join(parts)


# ------------------------------------------------------------------ layout


@dataclass(frozen=True)
class Cells:
    """Where thumbnails go: their size in cells, a cell's pixels, the terminal's width."""

    cols: int = COLS
    rows: int = ROWS
    cell_w: int = 10
    cell_h: int = 20
    width: int = 80

    @property
    def box(self) -> tuple[int, int]:
        return self.cols * self.cell_w, self.rows * self.cell_h


def measure(stream: Any, protocol: Protocol) -> Cells:
    """The terminal's columns and cell size (TIOCGWINSZ's pixel fields, which kitty,
    iTerm2, WezTerm, foot and xterm fill); the protocol's guess where it gives none."""
    cell_w, cell_h = GUESSED_CELL[protocol]
    width = shutil.get_terminal_size().columns
    try:
        import fcntl
        import struct
        import termios

        raw = fcntl.ioctl(stream.fileno(), termios.TIOCGWINSZ, b"\0" * 8)
        rows, cols, x_px, y_px = struct.unpack("HHHH", raw)
    except (ImportError, AttributeError, ValueError, OSError, io.UnsupportedOperation):
        return Cells(cell_w=cell_w, cell_h=cell_h, width=width)
    if cols:
        width = cols
    if rows and cols and x_px and y_px:
        reported = (x_px // cols, y_px // rows)
        if all(0 < p <= MAX_CELL_PX for p in reported):
            cell_w, cell_h = reported
    return Cells(cell_w=cell_w, cell_h=cell_h, width=width)


def thumbnail(path: str, box: tuple[int, int], time: float | None = None) -> Image.Image:
    """The photo through cliplens's opener, decoded small (JPEG draft mode), fit in box; a
    video's frame at `time`."""
    from PIL import Image

    from cliplens.images import open_image

    if time is not None:
        from cliplens.video import frame_at  # PyAV: only for a video's moment

        image = frame_at(path, time, max(box) * 2)
    else:
        image = open_image(path, min_size=max(box))
    image.thumbnail(box, Image.Resampling.LANCZOS)
    return image


def _png_in_box(image: Image.Image, box: tuple[int, int]) -> bytes:
    """A PNG of the box's size, the image centred on transparency: a terminal that scales
    it to the box's cells keeps the photo's aspect."""
    from PIL import Image

    canvas = Image.new("RGBA", box, (0, 0, 0, 0))
    canvas.paste(image, ((box[0] - image.width) // 2, (box[1] - image.height) // 2))
    out = io.BytesIO()
    canvas.save(out, format="PNG", compress_level=1)
    return out.getvalue()


def encode(image: Image.Image, protocol: Protocol, cells: Cells) -> str:
    """A thumbnail as the escape codes that draw it over cells.cols x cells.rows."""
    if protocol == "sixel":
        return sixel(image)
    png = _png_in_box(image, cells.box)
    draw = kitty if protocol == "kitty" else iterm2
    return draw(png, cells.cols, cells.rows)


def _drawn(hit: Hit, protocol: Protocol, cells: Cells) -> str | None:
    """The thumbnail's escape codes, or None for a photo that cannot be read (gone,
    damaged, not served from here): its row is printed without one."""
    try:
        return encode(thumbnail(hit.path, cells.box, hit.time), protocol, cells)
    except (ClipLensError, OSError, ValueError):  # Pillow's failures included
        return None


def block(image: str | None, text: str, cells: Cells) -> str:
    """One result: its thumbnail with the text beside it, cut into lines that fit beside.
    Lines are reserved first (scrolling if need be) and the image drawn between saving
    and restoring the cursor, so every protocol leaves the cursor where the text goes."""
    indent = cells.cols + GAP
    if image is None:  # nothing beside it: the terminal wraps it as any line
        return f"{' ' * indent}{text}\n"
    room = max(cells.width - indent, 20)
    lines = [text[i : i + room] for i in range(0, len(text), room)] or [""]
    height = max(cells.rows, len(lines))
    out = ["\n" * height, f"\x1b[{height}A", "\x1b7", image, "\x1b8"]
    out += [f"\r\x1b[{indent}C{line}\n" for line in lines]
    if height > len(lines):
        out.append(f"\x1b[{height - len(lines)}B")
    out.append("\r")
    return "".join(out)


def blocks(hits: Sequence[Hit], offset: int, protocol: Protocol, cells: Cells) -> Iterator[str]:
    """Each result's block, in order, thumbnails made a few at a time (Pillow decodes
    without the GIL)."""
    with ThreadPoolExecutor(max_workers=min(8, max(1, len(hits)))) as pool:
        drawn = pool.map(lambda h: _drawn(h, protocol, cells), hits)
        for i, (hit, image) in enumerate(zip(hits, drawn, strict=True)):
            label = shown(hit_label(hit.path, hit.time, hit.moments), newlines=False)
            yield block(image, f"{offset + i + 1}  {hit.score:.3f}  {label}", cells)


def print_previews(
    hits: Sequence[Hit], offset: int = 0, stream: Any = None, env: Mapping[str, str] | None = None
) -> bool:
    """Draw the results with thumbnails if the terminal can; False (nothing written) if
    not, and the caller prints its table."""
    stream = sys.stdout if stream is None else stream
    protocol = detect(stream, env)
    if protocol is None:
        return False
    cells = measure(stream, protocol)
    for text in blocks(hits, offset, protocol, cells):
        stream.write(text)
        stream.flush()
    return True
