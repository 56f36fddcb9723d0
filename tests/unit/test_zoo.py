"""`known_models` and `cliplens models`: open_clip's zoo with the figures open_clip (or,
for the newest families, their authors) publish, read from the tables cliplens ships
(checked here against those tables, read on their own)."""

from __future__ import annotations

import csv
import fnmatch
import json
from importlib import resources
from pathlib import Path

import pytest

from cliplens.cli.main import main
from cliplens.errors import InvalidInputError
from cliplens.models import zoo

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: pytest brings tomli
    import tomli as tomllib

DATA_FILES = ("openclip_results.tsv", "openclip_profile.tsv")
AUTHORS_FILE = "published_results.tsv"


def shipped_rows(filename: str) -> list[dict[str, str]]:
    """A shipped table as the csv module reads it: comment lines skipped, tab-separated."""
    text = resources.files("cliplens.models").joinpath("data").joinpath(filename).read_text("utf-8")
    return list(
        csv.DictReader((ln for ln in text.splitlines() if not ln.startswith("#")), delimiter="\t")
    )


@pytest.fixture(scope="module")
def entries() -> dict[str, zoo.ModelEntry]:
    return {e.name: e for e in zoo.known_models()}


@pytest.fixture(scope="module")
def pretrained() -> list[tuple[str, str]]:
    import open_clip

    return open_clip.list_pretrained()


def listed_json(capsys, *args: str) -> list[dict]:
    assert main(["models", "--format", "json", *args]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.mark.parametrize("family", ["MobileCLIP2", "SigLIP2", "PE-Core"])
def test_listing_holds_the_new_families_with_their_resolution(family, entries, pretrained):
    import open_clip

    tags = [(arch, tag) for arch, tag in pretrained if family in arch]
    assert tags, f"open_clip {open_clip.__version__} lists no {family} tag"
    for arch, tag in tags:
        entry = entries[f"{arch}:{tag}"]
        size = open_clip.get_model_config(arch)["vision_cfg"]["image_size"]
        assert entry.resolution == size and entry.resolution >= 224


def test_imagenet_figure_is_the_shipped_tables_row(entries):
    (row,) = [
        r
        for r in shipped_rows("openclip_results.tsv")
        if (r["name"], r["pretrained"]) == ("ViT-B-32", "openai")
    ]
    (profile,) = [r for r in shipped_rows("openclip_profile.tsv") if r["model"] == "ViT-B-32"]
    entry = entries["ViT-B-32:openai"]
    assert entry.imagenet_pct == pytest.approx(float(row["imagenet1k"]) * 100, abs=0.005)
    assert entry.average_pct == pytest.approx(float(row["average38"]) * 100, abs=0.005)
    assert entry.params_m == float(profile["mparams"])
    assert entry.gflops == float(profile["gflops"])
    assert 20 < entry.imagenet_pct < 100  # a percentage, not a fraction
    assert entry.source == zoo.FIGURES_SOURCE


def test_every_row_of_the_table_reaches_the_listing(entries):
    rows = shipped_rows("openclip_results.tsv")
    assert len(rows) > 100
    for r in rows:
        entry = entries[f"{r['name']}:{r['pretrained']}"]
        assert entry.imagenet_pct == pytest.approx(float(r["imagenet1k"]) * 100, abs=0.005)


def test_a_tag_absent_from_the_table_has_none_not_zero(entries, pretrained):
    measured = {r["name"] for r in shipped_rows("openclip_results.tsv")}
    measured |= {r["name"] for r in shipped_rows(AUTHORS_FILE)}
    absent = [f"{a}:{t}" for a, t in pretrained if "SigLIP2" in a and a not in measured]
    assert absent
    profiled = {r["model"] for r in shipped_rows("openclip_profile.tsv")}
    for name in absent:
        entry = entries[name]
        assert entry.imagenet_pct is None and entry.average_pct is None
        if name.split(":")[0] not in profiled:
            assert entry.params_m is None and entry.source is None


AUTHORS_TAGS = [
    ("MobileCLIP2-S4:dfndr2b", "apple/ml-mobileclip"),
    ("PE-Core-L-14-336:meta", "facebookresearch/perception_models"),
    ("ViT-B-16-SigLIP2:webli", "google-research/big_vision"),
]


def authors_row(name: str) -> dict[str, str]:
    (row,) = [r for r in shipped_rows(AUTHORS_FILE) if f"{r['name']}:{r['pretrained']}" == name]
    return row


@pytest.mark.parametrize(("name", "repo"), AUTHORS_TAGS)
def test_a_new_familys_tag_has_its_authors_figure_and_source(name, repo, entries):
    row = authors_row(name)
    entry = entries[name]
    assert entry.imagenet_pct == pytest.approx(float(row["imagenet1k"]) * 100, abs=0.005)
    assert 20 < entry.imagenet_pct < 100
    if row["average"]:
        assert entry.average_pct == pytest.approx(float(row["average"]) * 100, abs=0.005)
    else:
        assert entry.average_pct is None
    repo_of_row, _, rest = row["source"].partition("@")
    assert repo_of_row == repo
    assert entry.source is not None and repo in entry.source and rest[:7] in entry.source
    assert zoo.FIGURES_SOURCE not in entry.source  # open_clip's tables hold nothing of it


def test_mobileclip2_carries_its_authors_average(entries):
    row = authors_row("MobileCLIP2-S4:dfndr2b")
    assert row["average"] and entries["MobileCLIP2-S4:dfndr2b"].average_pct is not None


def test_every_row_of_the_authors_file_names_an_installed_tag(entries, pretrained):
    rows = shipped_rows(AUTHORS_FILE)
    assert len(rows) >= 11
    installed = {f"{a}:{t}" for a, t in pretrained}
    open_clips = {(r["name"], r["pretrained"]) for r in shipped_rows("openclip_results.tsv")}
    text = resources.files("cliplens.models").joinpath("data").joinpath(AUTHORS_FILE)
    header = text.read_text("utf-8")
    for r in rows:
        name = f"{r['name']}:{r['pretrained']}"
        assert name in installed, name
        assert (r["name"], r["pretrained"]) not in open_clips  # open_clip's row would win
        assert 0 < float(r["imagenet1k"]) < 1 and (not r["average"] or 0 < float(r["average"]) < 1)
        repo, _, rest = r["source"].partition("@")
        commit, _, path = rest.partition(":")
        assert len(commit) == 40 and all(c in "0123456789abcdef" for c in commit), r["source"]
        assert repo in header and commit in header and path  # the header names each source
        assert entries[name].imagenet_pct == pytest.approx(float(r["imagenet1k"]) * 100, abs=0.005)


def test_open_clips_table_comes_before_the_authors(monkeypatch):
    mine = zoo.published_figures("ViT-B-32", "openai")
    monkeypatch.setattr(
        zoo, "_authors_scores", lambda: {("ViT-B-32", "openai"): (0.1, None, "a/b@c:d")}
    )
    assert zoo.published_figures("ViT-B-32", "openai") == mine


def test_a_twin_lends_its_figures_only_with_the_same_weights(entries, monkeypatch):
    rows = {(r["name"], r["pretrained"]): r for r in shipped_rows("openclip_results.tsv")}
    if ("ViT-L-14", "dfn2b") in rows or "ViT-L-14:dfn2b" not in entries:
        pytest.skip("ViT-L-14:dfn2b is measured under its own name, or not listed")
    twin = rows[("ViT-L-14-quickgelu", "dfn2b")]
    lent = entries["ViT-L-14:dfn2b"]
    assert lent.imagenet_pct == pytest.approx(float(twin["imagenet1k"]) * 100, abs=0.005)
    monkeypatch.setattr(zoo, "_weights_source", lambda arch, tag: f"{arch}/{tag}")
    assert zoo.published_figures("ViT-L-14", "dfn2b").imagenet_pct is None


def test_sorting_puts_the_best_first_and_unknown_figures_last():
    ranked = zoo.known_models(sort="imagenet")
    scores = [e.imagenet_pct for e in ranked]
    known = [s for s in scores if s is not None]
    assert known == sorted(known, reverse=True)
    assert scores[: len(known)] == known  # every None after every figure
    small = [e.params_m for e in zoo.known_models(sort="params") if e.params_m is not None]
    assert small == sorted(small)
    with pytest.raises(InvalidInputError, match="`sort`"):
        zoo.known_models(sort="speed")  # type: ignore[arg-type]


def test_json_parses_and_carries_the_source(capsys):
    (entry,) = listed_json(capsys, "--search", "ViT-B-32:openai")
    assert entry["name"] == "ViT-B-32:openai"
    assert "mlfoundations/open_clip" in entry["source"] and "f862f86" in entry["source"]
    assert isinstance(entry["imagenet_pct"], float) and isinstance(entry["resolution"], int)


def test_search_siglip2_lists_only_siglip2(capsys, pretrained):
    names = [e["name"] for e in listed_json(capsys, "--search", "siglip2")]
    expected = [f"{a}:{t}" for a, t in pretrained if "siglip2" in f"{a}:{t}".lower()]
    assert names == expected and len(names) >= 10


def test_cached_and_sort_options_together(capsys):
    cached = listed_json(capsys, "--cached", "--sort", "name")
    assert all(e["cached"] for e in cached)
    assert [e["name"].casefold() for e in cached] == sorted(e["name"].casefold() for e in cached)
    assert main(["models", "--sort", "speed"]) == 2
    assert "--sort" in capsys.readouterr().err


def test_table_shows_the_figures_and_their_source(capsys):
    assert main(["models", "--search", "ViT-B-32:openai"]) == 0
    out = capsys.readouterr().out
    assert "ImageNet %" in out and "63.3" in out
    assert "Figures: " + zoo.FIGURES_SOURCE in out and "no licence" in out


def test_info_includes_the_tags_figures(capsys, entries):
    assert main(["models", "info", "ViT-B-32:openai", "--format", "json"]) == 0
    info = json.loads(capsys.readouterr().out)
    entry = entries["ViT-B-32:openai"]
    assert (info["imagenet_pct"], info["average_pct"]) == (entry.imagenet_pct, entry.average_pct)
    assert info["figures_source"] == zoo.FIGURES_SOURCE and info["gflops"] == entry.gflops


def test_info_names_the_authors_source_for_a_new_familys_tag(capsys, entries):
    assert main(["models", "info", "PE-Core-B-16:meta", "--format", "json"]) == 0
    info = json.loads(capsys.readouterr().out)
    entry = entries["PE-Core-B-16:meta"]
    assert info["imagenet_pct"] == entry.imagenet_pct is not None
    assert info["figures_source"] == entry.source
    assert "facebookresearch/perception_models" in info["figures_source"]


def test_the_data_files_are_package_resources_a_wheel_carries():
    data = resources.files("cliplens.models").joinpath("data")
    pyproject = Path(__file__).parents[2] / "pyproject.toml"
    globs = tomllib.loads(pyproject.read_text())["tool"]["setuptools"]["package-data"]
    for filename in DATA_FILES:
        text = data.joinpath(filename).read_text("utf-8")
        assert "mlfoundations/open_clip" in text and "MIT" in text  # names its source
        assert "f862f86cd92123615a8695ce8bcb6ecc066af452" in text
        packaged = f"models/data/{filename}"
        assert any(fnmatch.fnmatch(packaged, g) for g in globs["cliplens"]), packaged
    packaged = f"models/data/{AUTHORS_FILE}"
    assert any(fnmatch.fnmatch(packaged, g) for g in globs["cliplens"]), packaged
    assert "licence" in data.joinpath(AUTHORS_FILE).read_text("utf-8")
