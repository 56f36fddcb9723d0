"""Helpers shared by test modules."""

from __future__ import annotations

import json

from cliplens.cli.main import main


def run_json(capsys, argv: list[str]):
    """Run the CLI in-process; it must succeed; returns its JSON output."""
    code = main(argv)
    captured = capsys.readouterr()
    assert code == 0, captured.err
    return json.loads(captured.out)
