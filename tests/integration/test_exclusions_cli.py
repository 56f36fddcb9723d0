"""--exclude and .cliplensignore through the commands: index, search's update, duplicates,
quality, moderate and embed-dataset's listing leave out the same files, and a file left
out after it was indexed leaves the catalog."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from cliplens.catalog.db import Catalog
from cliplens.cli.main import main
from cliplens.distributed.embed import list_images


@pytest.fixture
def library(tmp_path, photos) -> Path:
    root = tmp_path / "library"
    for sub in ("", "Private", "exports", "trip/node_modules"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    for p in photos.iterdir():
        shutil.copy(p, root / p.name)
    shutil.copy(photos / "cat.jpg", root / "Private" / "cat-private.jpg")
    shutil.copy(photos / "cat.jpg", root / "exports" / "cat-export.jpg")
    shutil.copy(photos / "rocket.jpg", root / "trip" / "node_modules" / "rocket-cached.jpg")
    return root


def run(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def indexed(db: Path) -> list[str]:
    with Catalog(db, readonly=True) as cat:
        return sorted(Path(p).name for p in cat.files_under([db.parent.parent]))


def test_excluded_photos_are_never_indexed_nor_found(tmp_path, capsys, library, tiny_model_dir):
    db = tmp_path / "state" / "c.db"
    db.parent.mkdir()
    model = ["--model", f"local:{tiny_model_dir}", "--db", db]
    code, _, err = run(
        capsys,
        "index",
        library,
        *model,
        "--workers",
        "0",
        "--exclude",
        "Private/",
        "--exclude",
        "node_modules/",
    )
    assert code == 0, err
    assert "8 new" in err  # the 7 photos and the export's copy: 2 of the 10 left out
    # a .cliplensignore written after indexing: the export leaves the catalog at the update
    (library / ".cliplensignore").write_text("exports/\n")
    where = ["--in", library, *model, "-n", "20", "-f", "json", "--exclude", "Private/"]
    code, out, err = run(capsys, "search", "a cat", *where, "--exclude", "node_modules/")
    assert code == 0, err
    assert "1 removed" in err, err
    names = [Path(h["path"]).name for h in json.loads(out)]
    assert len(names) == 7 and not {"cat-private.jpg", "cat-export.jpg", "rocket-cached.jpg"} & set(
        names
    )
    with Catalog(db, readonly=True) as cat:
        held = {Path(p).name for p in cat.files_under([library])}
    assert held == {p.name for p in library.iterdir() if p.is_file() and not p.name.startswith(".")}
    # without the --exclude, the private folder comes back in (the ignore file does not say it)
    code, out, err = run(capsys, "search", "a cat", *where[:-2])
    names = [Path(h["path"]).name for h in json.loads(out)]
    assert "cat-private.jpg" in names and "cat-export.jpg" not in names


def test_duplicates_quality_and_moderate_leave_out_the_same(
    tmp_path, capsys, library, tiny_model_dir
):
    model = ["--model", f"local:{tiny_model_dir}", "--db", tmp_path / "c.db"]
    code, out, err = run(capsys, "duplicates", library, *model, "-f", "json")
    assert code == 0, err
    copies = [g for g in json.loads(out) if g["kind"] == "exact"]
    assert any(len(g["paths"]) == 3 for g in copies)  # cat.jpg and its two copies
    code, out, err = run(
        capsys,
        "duplicates",
        library,
        *model,
        "-f",
        "json",
        "--exclude",
        "Private/",
        "--exclude",
        "exports/",
    )
    assert code == 0, err
    # exact copies (the tiny random model finds every photo near every other)
    groups = [
        sorted(Path(p).name for p in g["paths"]) for g in json.loads(out) if g["kind"] == "exact"
    ]
    assert ["rocket-cached.jpg", "rocket.jpg"] in groups  # node_modules/ was not left out
    assert not [g for g in groups if any(n.startswith("cat") for n in g)]

    (library / ".cliplensignore").write_text("Private/\nnode_modules/\n")
    for command in ("quality", "moderate"):
        code, out, err = run(
            capsys, command, library, *model, "-f", "json", "--exclude", "exports/"
        )
        assert code == 0, err
        rows = json.loads(out) if command == "moderate" else json.loads(out)["scores"]
        found = {Path(r["path"]).name for r in rows}
        assert len(found) == 7 and not {"cat-private.jpg", "cat-export.jpg"} & found, rows


def test_embed_dataset_lists_what_the_walk_gives(library):
    (library / ".cliplensignore").write_text("node_modules/\n")
    names = {Path(p).name for p in list_images([str(library)], ("Private/",))}
    assert names == {
        p.name for p in library.iterdir() if p.is_file() and not p.name.startswith(".")
    } | {"cat-export.jpg"}
