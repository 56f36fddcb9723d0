"""Terminal previews: which protocol a terminal speaks, each protocol's bytes, the layout."""

from __future__ import annotations

import base64
import fcntl
import io
import os
import re
import select
import struct
import termios
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cliplens.cli import preview
from cliplens.cli.preview import Cells, block, blocks, detect, encode, iterm2, kitty, sixel
from cliplens.errors import InvalidInputError
from cliplens.searchable import Hit

KITTY_ENV = {"TERM": "xterm-kitty", "CLIPLENS_PREVIEW": "kitty", "TERM_PROGRAM": "iTerm.app"}


class FakeTty(io.StringIO):
    def isatty(self) -> bool:
        return True


def _noise(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


# ------------------------------------------------------------------ detection


def test_no_terminal_means_no_protocol_whatever_the_environment(tmp_path):
    read_end, write_end = os.pipe()
    with (
        os.fdopen(write_end, "w") as pipe,
        os.fdopen(read_end) as _,
        (tmp_path / "out.txt").open("w") as file,
    ):
        for stream in (pipe, file, io.StringIO(), object()):
            assert detect(stream, KITTY_ENV) is None
            assert detect(stream, {"CLIPLENS_PREVIEW": "sixel"}) is None


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"TERM": "xterm-kitty"}, "kitty"),
        ({"TERM": "xterm-256color", "KITTY_WINDOW_ID": "3"}, "kitty"),
        ({"TERM": "xterm-ghostty"}, "kitty"),
        ({"TERM": "xterm-256color", "TERM_PROGRAM": "ghostty"}, "kitty"),
        ({"TERM": "xterm-256color", "TERM_PROGRAM": "iTerm.app"}, "iterm2"),
        ({"TERM": "xterm-256color", "TERM_PROGRAM": "WezTerm"}, "iterm2"),
        ({"TERM": "xterm-256color", "LC_TERMINAL": "iTerm2"}, "iterm2"),
        ({"TERM": "xterm-kitty", "TMUX": "/tmp/tmux-0/default,1,0"}, None),
        ({"TERM": "screen-256color", "KITTY_WINDOW_ID": "1"}, None),
        ({"TERM": "tmux-256color", "TERM_PROGRAM": "iTerm.app"}, None),
        ({"TERM": "screen", "CLIPLENS_PREVIEW": "kitty"}, "kitty"),
        ({"TERM": "xterm-kitty", "CLIPLENS_PREVIEW": "none"}, None),
        ({"TERM": "xterm-kitty", "CLIPLENS_PREVIEW": "Sixel "}, "sixel"),
        ({"TERM": "dumb", "CLIPLENS_PREVIEW": "iterm2"}, "iterm2"),
        ({"TERM": "xterm-kitty", "CLIPLENS_PREVIEW": "auto"}, "kitty"),
    ],
)
def test_each_environment_gives_its_protocol_on_a_terminal(env, expected, monkeypatch):
    def no_query(*_):
        raise AssertionError("the environment decides; no terminal query")

    monkeypatch.setattr(preview, "query_da1", no_query)
    assert detect(FakeTty(), env, stdin=FakeTty()) == expected


def test_a_bad_override_is_a_usage_error():
    with pytest.raises(InvalidInputError, match="CLIPLENS_PREVIEW='kity'"):
        detect(FakeTty(), {"CLIPLENS_PREVIEW": "kity"})


def test_no_query_without_a_terminal_on_stdin(monkeypatch):
    asked = []
    monkeypatch.setattr(preview, "query_da1", lambda *a: asked.append(a) or (62, 4))
    assert detect(FakeTty(), {"TERM": "xterm-256color"}, stdin=io.StringIO()) is None
    assert detect(FakeTty(), {"TERM": "dumb"}, stdin=FakeTty()) is None
    assert asked == []
    assert detect(FakeTty(), {"TERM": "xterm-256color"}, stdin=FakeTty()) == "sixel"
    assert len(asked) == 1


class AnsweringTerminal:
    """A pseudo-terminal whose other end waits for DA1 and answers `reply` (or nothing),
    noting whether echo and line buffering were off when the question came."""

    def __init__(self, reply: bytes | None) -> None:
        self.master, self.slave = os.openpty()
        self.path = os.ttyname(self.slave)
        self.reply, self.asked, self.lflag_when_asked = reply, b"", None
        self.thread = threading.Thread(target=self._answer, daemon=True)

    def _answer(self) -> None:
        while b"\x1b[c" not in self.asked:
            if not select.select([self.master], [], [], 2)[0]:
                return
            self.asked += os.read(self.master, 64)
        self.lflag_when_asked = termios.tcgetattr(self.slave)[3]
        if self.reply is not None:
            os.write(self.master, self.reply)

    def __enter__(self) -> AnsweringTerminal:
        self.thread.start()
        return self

    def __exit__(self, *_) -> None:
        self.thread.join(3)
        os.close(self.master)
        os.close(self.slave)


@pytest.mark.parametrize(
    ("reply", "expected"),
    [(b"\x1b[?62;4;22c", "sixel"), (b"\x1b[?62;22c", None), (b"\x1b[?64;1;2;6;9;15;4c", "sixel")],
)
def test_sixel_is_asked_of_the_terminal_and_its_settings_restored(reply, expected):
    with AnsweringTerminal(reply) as term:
        before = termios.tcgetattr(term.slave)
        found = detect(FakeTty(), {"TERM": "xterm-256color"}, stdin=FakeTty(), tty=term.path)
        term.thread.join(3)
        assert found == expected
        assert term.asked == b"\x1b[c"
        assert term.lflag_when_asked & (termios.ICANON | termios.ECHO) == 0  # asked raw
        assert termios.tcgetattr(term.slave) == before  # and restored
        assert before[3] & termios.ICANON  # a pty starts canonical: restoring is visible


def test_a_silent_terminal_times_out_quickly_and_is_restored():
    with AnsweringTerminal(None) as term:
        before = termios.tcgetattr(term.slave)
        start = time.monotonic()
        found = detect(FakeTty(), {"TERM": "xterm"}, stdin=FakeTty(), tty=term.path)
        elapsed = time.monotonic() - start
        assert found is None
        assert preview.DA1_TIMEOUT_S <= elapsed < 1.0
        assert termios.tcgetattr(term.slave) == before
    assert preview.query_da1("/nonexistent/tty") is None


def test_measure_reads_the_cell_size_the_terminal_reports():
    master, slave = os.openpty()
    try:
        fake = type("Stream", (), {"fileno": lambda self: slave})()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 30, 120, 1200, 600))
        assert preview.measure(fake, "sixel") == Cells(cell_w=10, cell_h=20, width=120)
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 30, 100, 0, 0))
        assert preview.measure(fake, "sixel") == Cells(cell_w=8, cell_h=16, width=100)
        assert preview.measure(fake, "kitty") == Cells(cell_w=10, cell_h=20, width=100)
    finally:
        os.close(master)
        os.close(slave)
    assert preview.measure(io.StringIO(), "iterm2").box == (80, 80)


# ------------------------------------------------------------------ encoders


def test_kitty_chunks_reassemble_to_the_png():
    thumb = _noise(56, 42)
    cells = Cells()
    data = encode(thumb, "kitty", cells)
    codes = re.findall(r"\x1b_G([^;\x1b]*);([^\x1b]*)\x1b\\", data)
    assert "".join(f"\x1b_G{k};{p}\x1b\\" for k, p in codes) == data  # nothing else
    assert len(codes) > 2  # noise does not compress: several chunks
    keys = [dict(kv.split("=") for kv in k.split(",")) for k, _ in codes]
    assert keys[0] == dict(a="T", f="100", c="8", r="4", C="1", q="2", m="1")
    assert [k["m"] for k in keys] == ["1"] * (len(codes) - 1) + ["0"]
    assert all(k == {"m": k["m"], "q": "2"} for k in keys[1:])  # q in every chunk
    assert all(len(p) == 4096 for _, p in codes[:-1]) and 0 < len(codes[-1][1]) <= 4096
    png = base64.b64decode("".join(p for _, p in codes), validate=True)
    shown = Image.open(io.BytesIO(png))
    assert shown.format == "PNG" and shown.size == cells.box == (80, 80)
    inner = np.asarray(shown.convert("RGBA"))[19:61, 12:68]  # centred
    assert (inner[..., 3] == 255).all() and (inner[..., :3] == np.asarray(thumb)).all()
    assert (np.asarray(shown)[:19, :, 3] == 0).all()  # the rest is transparent
    assert kitty(b"", 8, 4) == "\x1b_Ga=T,f=100,c=8,r=4,C=1,q=2,m=0;\x1b\\"


def test_iterm2_size_is_the_payload():
    data = encode(_noise(40, 30), "iterm2", Cells(cols=6, rows=3))
    found = re.fullmatch(r"\x1b\]1337;File=([^:]*):([A-Za-z0-9+/=]*)\x07", data)
    assert found is not None
    args = dict(kv.split("=") for kv in found.group(1).split(";"))
    payload = base64.b64decode(found.group(2), validate=True)
    size = str(len(payload))
    assert args == dict(inline="1", width="6", height="3", preserveAspectRatio="1", size=size)
    assert Image.open(io.BytesIO(payload)).size == (60, 60)
    assert iterm2(b"abc", 1, 1).endswith(";size=3:YWJj\x07")


def decode_sixel(data: str) -> tuple[np.ndarray, dict[int, tuple[float, float, float]]]:
    """A small sixel decoder: colour register numbers per pixel (-1: never painted), and
    the registers as RGB 0-255; a pixel painted twice fails."""
    found = re.fullmatch(r"\x1bP([0-9;]*)q(.*)\x1b\\", data, re.DOTALL)
    assert found is not None, "one DCS sixel sequence"
    assert found.group(1).split(";")[1] == "1"  # P2=1: unpainted pixels stay as they were
    body = found.group(2)
    raster = re.match(r'"1;1;(\d+);(\d+)', body)
    assert raster is not None, "raster attributes first, square pixels"
    width, height = int(raster.group(1)), int(raster.group(2))
    out = np.full((height, width), -1, dtype=np.int32)
    colours: dict[int, tuple[float, float, float]] = {}
    x = y = 0
    colour = None
    tokens = re.finditer(r"#(\d+)(?:;2;(\d+);(\d+);(\d+))?|!(\d+)([?-~])|([?-~])|(\$)|(-)", body)
    pos = raster.end()
    for t in tokens:
        if t.start() < pos:
            continue
        assert t.start() == pos, f"unexpected {body[pos : t.start()]!r}"
        pos = t.end()
        reg, r, g, b, count, repeated, single, cr, nl = t.groups()
        if reg is not None and r is not None:
            assert all(0 <= int(v) <= 100 for v in (r, g, b))
            colours[int(reg)] = tuple(int(v) * 255 / 100 for v in (r, g, b))
        elif reg is not None:
            colour = int(reg)
            assert colour in colours, "a colour is defined before it is used"
        elif cr:
            x = 0
        elif nl:
            x, y = 0, y + 6
        else:
            n, char = (int(count), repeated) if count else (1, single)
            bits = ord(char) - 63
            for i in range(6):
                if bits >> i & 1:
                    assert y + i < height and x + n <= width, "drawn inside the raster"
                    assert (out[y + i, x : x + n] == -1).all(), "each pixel painted once"
                    out[y + i, x : x + n] = colour
            x += n
    assert pos == len(body)
    return out, colours


def test_sixel_decodes_back_to_the_quantized_pixels():
    grad = np.linspace(0, 255, 37, dtype=np.uint8)
    rgb = np.asarray(_noise(37, 23)).copy()
    rgb[:11, :, 0] = grad  # smooth parts and noise: runs and many colours
    image = Image.fromarray(rgb)
    quantized = preview.sixel_palette(image)
    assert quantized.mode == "P" and len(quantized.getcolors(256)) > 100
    pixels, colours = decode_sixel(sixel(image))
    assert (pixels == np.asarray(quantized)).all()
    palette = np.asarray(quantized.getpalette(), dtype=float).reshape(-1, 3)
    for reg, rgb_value in colours.items():
        assert np.abs(palette[reg] - rgb_value).max() <= 1.3  # percent rounds to 2.55
    assert set(colours) == set(np.unique(pixels).tolist())


def test_sixel_run_length_and_flat_colours():
    image = Image.new("RGB", (50, 13), (255, 0, 0))
    image.paste((0, 0, 255), (10, 0, 50, 13))
    data = sixel(image)
    assert "!40~" in data and "!10~" in data  # runs are counted, not repeated
    assert data.count("-") == 2  # three bands, none after the last
    pixels, colours = decode_sixel(data)
    red = next(c for c, v in colours.items() if v == (255, 0, 0))
    assert (pixels[:, :10] == red).all() and (pixels[:, 10:] != red).all()
    assert (pixels >= 0).all()


# ------------------------------------------------------------------ layout


def test_block_reserves_rows_and_puts_the_text_beside_the_image():
    cells = Cells(width=40)
    out = block("<IMG>", "1  0.900  /p/a.jpg", cells)
    assert out == "\n\n\n\n\x1b[4A\x1b7<IMG>\x1b8\r\x1b[10C1  0.900  /p/a.jpg\n\x1b[3B\r"
    long = block("<IMG>", "x" * 95, cells)  # 30 columns beside the image: 4 lines
    assert long.startswith("\n\n\n\n\x1b[4A") and long.count("\r\x1b[10C") == 4
    assert "\x1b[" not in long.split("\x1b8")[1].replace("\x1b[10C", "")  # no move down
    assert block(None, "2  0.500  /p/gone.jpg", cells) == " " * 10 + "2  0.500  /p/gone.jpg\n"


def test_blocks_go_on_past_a_photo_that_cannot_be_read(tmp_path):
    good = tmp_path / "good.jpg"
    _noise(640, 480).save(good, quality=90)
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8 not really a jpeg")
    names = [good, tmp_path / "gone.jpg", broken, good]
    hits = [Hit(id=i, path=str(p), score=1 - i / 10) for i, p in enumerate(names)]
    out = list(blocks(hits, 5, "kitty", Cells(width=300)))
    assert len(out) == 4
    assert [o.count("\x1b_Ga=T") for o in out] == [1, 0, 0, 1]
    assert out[1] == " " * 10 + f"7  0.900  {tmp_path / 'gone.jpg'}\n"
    assert out[0].endswith(f"6  1.000  {good}\n\x1b[3B\r")


def test_file_names_cannot_carry_escape_codes(tmp_path):
    hit = Hit(id=1, path=str(tmp_path / "evil\x1b]0;owned\x07.jpg"), score=0.5)
    (out,) = blocks([hit], 0, "iterm2", Cells())
    assert "\x1b" not in out and "\x07" not in out and "evil\\x1b]0;owned\\x07.jpg" in out


def test_print_previews_writes_nothing_where_no_protocol(tmp_path):
    hits = [Hit(id=1, path=str(tmp_path / "a.jpg"), score=0.5)]
    plain = io.StringIO()
    assert preview.print_previews(hits, 0, plain, {"CLIPLENS_PREVIEW": "kitty"}) is False
    assert plain.getvalue() == ""
    term = FakeTty()
    assert preview.print_previews(hits, 0, term, {"CLIPLENS_PREVIEW": "sixel"}) is True
    assert term.getvalue() == " " * 10 + f"1  0.500  {Path(hits[0].path)}\n"
