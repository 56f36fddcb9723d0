"""What the CLI shows people: a file name's control characters never reach the terminal."""

from __future__ import annotations

from cliplens.cli.output import info, print_table, warn

NAME = "/photos/evil\x1b]0;owned\x07\x1b[2J.jpg"


def test_tables_and_messages_show_control_characters_as_escapes(capsys):
    print_table(["#", "path"], [(1, NAME), (2, "a/b.jpg\nc/d.jpg")])
    warn(f"{NAME}: file is truncated")
    info(f"index: {NAME}\x9b")
    out, err = capsys.readouterr()
    for text in (out, err):
        assert "\x1b" not in text and "\x07" not in text and "\x9b" not in text
        assert "evil\\x1b]0;owned\\x07\\x1b[2J.jpg" in text
    assert "a/b.jpg" in out and "c/d.jpg" in out and "\\x0a" not in out  # lines stay lines
    assert "\\x9b" in err
