"""`search --preview` and `similar --preview` through the CLI: thumbnails on a terminal that
draws images, and exactly the usual output everywhere else."""

from __future__ import annotations

import re
import shutil
import sys

import pytest

from cliplens.cli.main import main

KITTY_IMAGE = "\x1b_Ga=T"


@pytest.fixture
def indexed(tmp_path, photos, tiny_model_dir):
    """A copy of the photos, indexed: (folder, the query options)."""
    folder = tmp_path / "photos"
    shutil.copytree(photos, folder)
    db = str(tmp_path / "c.db")
    model = f"local:{tiny_model_dir}"
    assert main(["index", str(folder), "--model", model, "--db", db, "--workers", "0"]) == 0
    return folder, ["--in", str(folder), "--model", model, "--db", db, "--no-index"]


def test_preview_into_a_pipe_prints_what_it_always_did(indexed, capsys, monkeypatch):
    folder, where = indexed
    monkeypatch.setenv("TERM", "xterm-kitty")  # a kitty terminal, but stdout is a pipe
    capsys.readouterr()
    commands = [
        ["search", "a photo", *where, "-n", "7"],
        ["search", "a photo", *where, "-n", "3", "--offset", "2", "--format", "json"],
        ["search", "a photo", *where, "--format", "paths"],
        ["similar", str(folder / "cat.jpg"), *where, "-n", "4"],
    ]
    for command in commands:
        assert main(command) == 0
        plain = capsys.readouterr().out
        monkeypatch.setenv("CLIPLENS_PREVIEW", "kitty")
        assert main([*command, "--preview"]) == 0
        monkeypatch.delenv("CLIPLENS_PREVIEW")
        previewed = capsys.readouterr().out
        assert previewed == plain and "\x1b" not in previewed and str(folder) in plain


def test_preview_on_a_kitty_terminal_draws_each_result(indexed, capsys, monkeypatch):
    folder, where = indexed
    monkeypatch.setenv("CLIPLENS_PREVIEW", "kitty")
    monkeypatch.setenv("COLUMNS", "400")  # every row on one line
    gone = folder / "coffee.jpg"
    gone.unlink()  # after indexing: the catalog still lists it (--no-index)
    capsys.readouterr()
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)
    assert main(["search", "a photo", *where, "-n", "7", "--preview"]) == 0
    out = capsys.readouterr().out
    # a row beside its thumbnail follows the restored cursor; a row without one is indented
    rows = re.findall(r"(\x1b8\r\x1b\[10C| {10})(\d+)  ([\d.]+)  (.+)\n", out)
    assert [int(rank) for _, rank, _, _ in rows] == list(range(1, 8))
    assert out.count(KITTY_IMAGE) == 6 and out.count("\x1b7") == 6
    for start, _, _, path in rows:
        assert (start == " " * 10) == (path == str(gone)), path
    assert main(["similar", str(folder / "cat.jpg"), *where, "-n", "3", "--preview"]) == 0
    out = capsys.readouterr().out
    rows = re.findall(r"(\x1b8\r\x1b\[10C| {10})(\d+)  ([\d.]+)  (.+)\n", out)
    assert len(rows) == 3 and out.count(KITTY_IMAGE) == sum(p != str(gone) for *_, p in rows)
    assert main(["search", "a photo", *where, "-n", "2", "--preview", "-f", "paths"]) == 0
    assert "\x1b" not in capsys.readouterr().out  # only the table gets thumbnails
