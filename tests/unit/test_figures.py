"""docs/figures.py reads the charts' figures from benchmarks/RESULTS.md by its headings: the
real file must still hold both tables, and a missing one fails with a message naming it."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def figures():
    spec = importlib.util.spec_from_file_location("docs_figures", ROOT / "docs" / "figures.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def results() -> str:
    return (ROOT / "benchmarks" / "RESULTS.md").read_text(encoding="utf-8")


def test_speed_table_is_found_in_results(figures, results):
    rows = figures.speed_figures(results)
    assert len(rows) >= 2
    assert rows[0][0].startswith("first index")
    for label, rclip, ours in rows:
        assert label and rclip > 0 and ours > 0


def test_speed_row_qualified_for_rclip_takes_the_matching_cliplens_figure(figures):
    text = (
        "## Photo search against rclip 9\n\n| what | rclip | cliplens |\n|---|---|---|\n"
        "| (a) first index | 10.0 s | **8.0 s** |\n"
        "| (b) re-run (rclip: re-index + query) | 1.20 s | "
        "**0.22 s** (`index`), **0.59 s** (`search`: re-index + query) |\n"
    )
    rows = figures.speed_figures(text)
    assert rows == [("first index", 10.0, 8.0), ("re-run,\nre-index + query", 1.2, 0.59)]


def test_kshot_table_is_found_in_results(figures, results):
    shots, curves = figures.kshot_figures(results)
    assert shots == sorted(shots) and len(shots) >= 2
    assert curves
    for means, spreads, zero in curves.values():
        assert len(means) == len(spreads) == len(shots)
        assert all(0 <= m <= 1 for m in means)
        assert zero is None or 0 <= zero <= 1


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("# Benchmark results\n", "no section '## Linear probes"),
        ("## Linear probes: k-shot curves\n\nno table here\n", "no table with a 'shots per"),
    ],
)
def test_missing_kshot_table_fails_clearly(figures, text, message):
    with pytest.raises(figures.FigureError, match=message):
        figures.kshot_figures(text)


def test_unknown_picture_name_is_refused(figures, tmp_path, capsys):
    with pytest.raises(SystemExit):
        figures.main([str(tmp_path), "nope.svg"])
    assert "no picture named nope.svg" in capsys.readouterr().err
