"""Draw the documentation's pictures into a folder: `python docs/figures.py docs/img`.

- speed-vs-rclip.svg and kshot.svg: charts of the figures recorded in benchmarks/RESULTS.md,
  read from its tables by their section headings, so a new measurement redraws the chart;
- search-page.png: the web page answering "a cat", served over scikit-image's photos with the
  offline model, in headless Chromium driven by Playwright;
- generated.png: an image that `cliplens.generate` drew with the offline model.

Give picture names after the folder to draw only those (e.g. `... docs/img kshot.svg`).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "RESULTS.md"
SPEED_SECTION = "Photo search against rclip"
SPEED_TABLE = "what"
KSHOT_SECTION = "Linear probes: k-shot curves"
KSHOT_TABLE = "shots per class"
MAX_BYTES = 200_000
NUMBER = re.compile(r"\d+(?:\.\d+)?")


class FigureError(RuntimeError):
    """A recorded figure could not be found or a picture could not be drawn."""


def find_table(text: str, section: str, first_header: str) -> list[list[str]]:
    """The rows (header first, the |---| line dropped) of the first Markdown table, under
    the `## ` heading that starts with `section`, whose first header cell is `first_header`."""
    lines = text.splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith(f"## {section}")), None)
    if start is None:
        raise FigureError(f"{RESULTS.name}: no section '## {section}...'")
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), None)
    rows: list[list[str]] = []
    for line in lines[start + 1 : end]:
        line = line.strip()
        if not line.startswith("|"):
            if rows:
                break
            continue
        cells = [c.strip() for c in line.strip("|").split("|")]
        if not rows and cells[0] != first_header:
            continue
        if not set("".join(cells)) <= set("-: "):
            rows.append(cells)
    if len(rows) < 2:
        raise FigureError(
            f"{RESULTS.name}: no table with a '{first_header}' column under '## {section}'"
        )
    return rows


def _seconds(cell: str, prefer: str = "") -> float:
    """The time in seconds in a cell; of several, the one whose note mentions `prefer`."""
    found = list(re.finditer(r"(\d+(?:\.\d+)?) s\b", cell))
    if not found:
        raise FigureError(f"{RESULTS.name}: no time in seconds in '{cell}'")
    ends = [m.start() for m in found[1:]] + [len(cell)]
    notes = [cell[m.end() : end] for m, end in zip(found, ends, strict=True)]
    chosen = [m for m, note in zip(found, notes, strict=True) if prefer and prefer in note]
    return float((chosen or found)[0].group(1))


def speed_figures(text: str) -> list[tuple[str, float, float]]:
    """(what, rclip seconds, cliplens seconds) per row of the rclip comparison; where rclip's
    figure is qualified, e.g. "(rclip: re-index + query)", cliplens's with that note."""
    header, *rows = find_table(text, SPEED_SECTION, SPEED_TABLE)
    if header[1:3] != ["rclip", "cliplens"]:
        raise FigureError(f"{RESULTS.name}: the rclip table's columns are {header}")
    out = []
    for what, rclip, ours, *_ in rows:
        note = re.search(r"\(rclip: (.*?)\)", what)
        label = re.sub(r"^\([a-z]\)\s*|\s*\(.*?\)", "", what).strip()
        label += f",\n{note.group(1)}" if note else ""
        prefer = note.group(1) if note else ""
        out.append((label, _seconds(rclip), _seconds(ours, prefer)))
    return out


def kshot_figures(text: str) -> tuple[list[int], dict[str, tuple[list, list, float | None]]]:
    """The shots, and per probe: the mean accuracies, their spreads and the zero-shot one."""
    header, *rows = find_table(text, KSHOT_SECTION, KSHOT_TABLE)
    shots = [int(h) for h in header[1:] if h.isdigit()]
    if not shots:
        raise FigureError(f"{RESULTS.name}: no shot counts in the k-shot table's header")
    curves = {}
    for label, *cells in rows:
        pairs = [[float(x) for x in NUMBER.findall(c)] for c in cells[: len(shots)]]
        if any(len(p) != 2 for p in pairs):
            raise FigureError(f"{RESULTS.name}: expected 'mean ± spread' cells in '{label}'")
        zero = NUMBER.findall(cells[len(shots)]) if len(cells) > len(shots) else []
        curves[label.replace("`", "")] = (
            [p[0] for p in pairs],
            [p[1] for p in pairs],
            float(zero[0]) if zero else None,
        )
    return shots, curves


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update({"svg.fonttype": "none", "svg.hashsalt": "cliplens", "font.size": 10})
    return plt


def _save_svg(fig, path: Path, caption: str) -> None:
    fig.text(0.01, 0.01, caption, fontsize=8, color="#555555", ha="left", va="bottom")
    fig.savefig(path, format="svg", metadata={"Date": None})


def draw_speed(path: Path) -> None:
    plt = _pyplot()
    rows = speed_figures(RESULTS.read_text(encoding="utf-8"))
    fig, axes = plt.subplots(
        1, 2, figsize=(8.5, 3.4), gridspec_kw={"width_ratios": [1, 2.4]}, layout="constrained"
    )
    fig.get_layout_engine().set(rect=(0, 0.06, 1, 0.94))
    groups = [rows[:1], rows[1:]]  # the first index takes minutes, the rest a second or two
    for ax, group in zip(axes, groups, strict=True):
        y = range(len(group))
        for offset, (name, col, colour) in enumerate(
            [("rclip", 1, "#9e9e9e"), ("cliplens", 2, "#1f77b4")]
        ):
            values = [row[col] for row in group]
            bars = ax.barh([i + 0.4 * offset - 0.2 for i in y], values, 0.38, label=name)
            for bar in bars:
                bar.set_color(colour)
            ax.bar_label(bars, [f"{v:g} s" for v in values], padding=3, fontsize=8)
        ax.set_yticks(list(y), [row[0] for row in group])
        ax.invert_yaxis()
        ax.set_xlabel("wall time, seconds (lower is better)")
        ax.margins(x=0.25)
        ax.spines[["top", "right"]].set_visible(False)
    handles, labels = axes[1].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower right", ncols=2, frameon=False)
    fig.suptitle("Photo search: cliplens against rclip, same photos, same machine")
    caption = f"Source: benchmarks/RESULTS.md, '{SPEED_SECTION}'; whole-process medians"
    _save_svg(fig, path, caption)
    plt.close(fig)


def draw_kshot(path: Path) -> None:
    plt = _pyplot()
    shots, curves = kshot_figures(RESULTS.read_text(encoding="utf-8"))
    fig, ax = plt.subplots(figsize=(6.4, 4.0), layout="constrained")
    fig.get_layout_engine().set(rect=(0, 0.05, 1, 0.95))
    for (label, (means, spreads, zero)), colour in zip(
        curves.items(), ["#1f77b4", "#ff7f0e", "#2ca02c"], strict=False
    ):
        ax.errorbar(shots, means, yerr=spreads, marker="o", capsize=3, color=colour, label=label)
        if zero is not None:
            ax.axhline(zero, color=colour, linestyle="--", linewidth=1)
            ax.text(
                shots[-1], zero + 0.01, f"zero-shot {zero:g}", color=colour, ha="right", fontsize=9
            )
    ax.set_xscale("log", base=2)
    ax.set_xticks(shots, [str(k) for k in shots])
    ax.set_ylim(0, 1)
    ax.set_xlabel("labelled images per class (k)")
    ax.set_ylabel("test accuracy (mean ± spread over draws)")
    ax.set_title("Linear probe on Fashion-MNIST, offline model")
    ax.legend(loc="upper left", frameon=False, fontsize=8)
    ax.grid(alpha=0.3)
    ax.spines[["top", "right"]].set_visible(False)
    _save_svg(fig, path, f"Source: benchmarks/RESULTS.md, '{KSHOT_SECTION}'")
    plt.close(fig)


def _chromium() -> str:
    path = os.environ.get("CLIPLENS_CHROMIUM", "/usr/bin/chromium")
    found = path if Path(path).exists() else shutil.which("chromium")
    if found is None:
        raise FigureError(f"no Chromium at {path} for the screenshot: apt-get install chromium")
    return found


def _serve(app):
    import uvicorn

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline:
            raise FigureError("the server did not start within 30 s")
        time.sleep(0.05)
    return server, f"http://127.0.0.1:{port}"


def draw_search_page(path: Path) -> None:
    """Screenshot at 1000x700, reduced to a 128-colour palette to stay small."""
    from PIL import Image
    from playwright.sync_api import sync_playwright

    import cliplens

    with tempfile.TemporaryDirectory() as tmp:
        photos, db = Path(tmp) / "photos", Path(tmp) / "catalog.db"
        cliplens.write_photos(photos)
        with cliplens.Catalog(db) as catalog:
            cliplens.update_catalog(catalog, cliplens.ModelRef("offline"), [photos], workers=0)
        app = cliplens.create_app(cliplens.ServerSettings(model="offline", db=db))
        server, url = _serve(app)
        try:
            with sync_playwright() as p:
                browser = p.chromium.launch(executable_path=_chromium(), args=["--no-sandbox"])
                page = browser.new_page(viewport={"width": 1000, "height": 700})
                page.goto(url + "/", timeout=30_000)
                page.fill("#q", "a cat")
                page.keyboard.press("Enter")
                page.locator("#results .hit").first.wait_for(timeout=60_000)
                page.wait_for_function(
                    "() => [...document.querySelectorAll('#results img')]"
                    ".every(i => i.complete && i.naturalWidth > 0)",
                    timeout=30_000,
                )
                page.screenshot(path=Path(tmp) / "shot.png")
                browser.close()
        finally:
            server.should_exit = True
        with Image.open(Path(tmp) / "shot.png") as shot:
            small = shot.convert("RGB").quantize(colors=128, method=Image.Quantize.MEDIANCUT)
            small.save(path, format="PNG", optimize=True)


def draw_generated(path: Path) -> None:
    """The offline model's "a goldfish": 128 px, 24 steps, 4 cut-outs, seed 0 (about 45 s)."""
    import cliplens

    cfg = cliplens.GenerateConfig(size=128, steps=24, cutouts=4, seed=0)
    cliplens.generate("offline", cliplens.parse_prompts("a goldfish"), cfg).save(path)


PICTURES = {
    "speed-vs-rclip.svg": draw_speed,
    "kshot.svg": draw_kshot,
    "search-page.png": draw_search_page,
    "generated.png": draw_generated,
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("names", nargs="*", metavar="NAME", help=f"any of {', '.join(PICTURES)}")
    args = parser.parse_args(argv)
    unknown = [n for n in args.names if n not in PICTURES]
    if unknown:
        parser.error(f"no picture named {', '.join(unknown)}; the pictures: {', '.join(PICTURES)}")
    args.out_dir.mkdir(parents=True, exist_ok=True)
    for name in args.names or PICTURES:
        path = args.out_dir / name
        start = time.monotonic()
        try:
            PICTURES[name](path)
        except (FigureError, ImportError) as e:
            print(f"figures.py: {name}: {e}", file=sys.stderr)
            return 1
        size = path.stat().st_size
        print(f"{path}: {size / 1000:.0f} KB in {time.monotonic() - start:.0f} s")
        if size > MAX_BYTES:
            print(f"figures.py: {path} is over {MAX_BYTES // 1000} KB", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
