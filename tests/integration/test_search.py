"""Search end to end: queries, duplicates, killed runs, readers during indexing, the CLI."""

from __future__ import annotations

import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cliplens.catalog.db import Catalog
from cliplens.catalog.update import update_catalog
from cliplens.cli.main import main
from cliplens.errors import InvalidInputError
from cliplens.tasks.search import duplicates, parse_query, query_vector, search, similar
from conftest import make_photos


def test_parse_weighted_queries(tmp_path):
    img = tmp_path / "beach.jpg"
    Image.new("RGB", (8, 8)).save(img)
    terms = parse_query(f"2:sunset + {img} - people")
    assert [(t.weight, t.text, t.image) for t in terms] == [
        (2.0, "sunset", None),
        (1.0, None, str(img.resolve())),
        (-1.0, "people", None),
    ]
    assert parse_query("a red boat")[0].text == "a red boat"
    assert parse_query("well-lit room")[0].text == "well-lit room"  # a hyphen is not an operator
    with pytest.raises(InvalidInputError, match="does not exist"):
        parse_query("./missing.jpg")
    with pytest.raises(InvalidInputError, match="empty term"):
        parse_query("cat + ")


def test_query_vector_is_the_weighted_sum(tiny):
    a, b = tiny.encode_texts(["sunset", "people"])
    v = query_vector(tiny, parse_query("2:sunset - people"))
    expected = 2 * a - b
    np.testing.assert_allclose(v, expected / np.linalg.norm(expected), atol=1e-5)
    with pytest.raises(InvalidInputError, match="cancel"):
        query_vector(tiny, parse_query("cat - cat"))
    # an image already open (an upload) joins the terms with its weight
    img = Image.new("RGB", (32, 32), (200, 40, 40))
    (c,) = tiny.encode_images([img])
    v = query_vector(tiny, parse_query("sunset"), images=[(img, 0.5)])
    expected = a + 0.5 * c
    np.testing.assert_allclose(v, expected / np.linalg.norm(expected), atol=1e-5)


def test_search_similar_and_folder_filter(tmp_path, tiny):
    make_photos(tmp_path / "a", 4)
    make_photos(tmp_path / "b", 3, seed=9)
    cat = Catalog(tmp_path / "c.db")
    update_catalog(cat, tiny, [tmp_path], workers=0)
    probe = str((tmp_path / "a" / "img002.jpg").resolve())
    hits = search(cat, tiny, probe, n=3)
    assert hits[0].path == probe and hits[0].score == pytest.approx(1.0, abs=2e-3)
    assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)
    only_b = search(cat, tiny, "anything", n=10, folders=[tmp_path / "b"])
    assert len(only_b) == 3 and all("/b/" in h.path for h in only_b)
    sims = similar(cat, tiny, probe, n=10)
    assert probe not in [h.path for h in sims] and len(sims) == 6
    # by the photo's id: its stored vector, itself excluded, the same answer
    by_id = similar(cat, tiny, hits[0].id, n=10)
    assert [h.path for h in by_id] == [h.path for h in sims]


def test_duplicates_exact_and_near(tmp_path, tiny):
    make_photos(tmp_path / "p", 1)
    # unlike noise, which a random model sees as all alike: a gradient and stripes
    ramp = np.tile(np.linspace(0, 255, 64, dtype=np.uint8), (48, 1))
    Image.fromarray(np.stack([ramp, ramp[::-1], ramp // 2], -1)).save(tmp_path / "p" / "img001.png")
    stripes = np.zeros((48, 64, 3), np.uint8)
    stripes[::4] = (0, 200, 80)
    Image.fromarray(stripes).save(tmp_path / "p" / "img002.png")
    src = tmp_path / "p" / "img000.jpg"
    (tmp_path / "p" / "copy.jpg").write_bytes(src.read_bytes())
    Image.open(src).save(tmp_path / "p" / "recompressed.jpg", quality=70)
    cat = Catalog(tmp_path / "c.db")
    update_catalog(cat, tiny, [tmp_path / "p"], workers=0)
    groups = duplicates(cat, tiny.info.model_id, [tmp_path / "p"], threshold=0.97)
    kinds = {g.kind: g for g in groups}
    assert [Path(p).name for p in kinds["exact"].paths] == ["copy.jpg", "img000.jpg"]
    assert "recompressed.jpg" in {Path(p).name for p in kinds["near"].paths}
    assert kinds["near"].score >= 0.97
    assert all("img001" not in p for g in groups for p in g.paths)


def test_exif_rotated_photo_embeds_upright(tmp_path, tiny):
    rng = np.random.default_rng(0)
    upright = Image.fromarray(rng.integers(0, 255, (40, 60, 3), dtype=np.uint8))
    upright.save(tmp_path / "upright.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # stored rotated; viewers turn it 90° clockwise
    upright.rotate(90, expand=True).save(tmp_path / "sideways.png", exif=exif)
    a, b = tiny.encode_images([str(tmp_path / "upright.png"), str(tmp_path / "sideways.png")])
    assert float(a @ b) > 0.999


def test_offline_semantic_search(tmp_path, offline, photos):
    cat = Catalog(tmp_path / "c.db")
    update_catalog(cat, offline, [photos], workers=0)
    hits = search(cat, offline, "a cat", n=2)
    assert any(Path(h.path).name == "cat.jpg" for h in hits)
    assert Path(search(cat, offline, "a cup of coffee", n=1)[0].path).name == "coffee.jpg"


def _cli_env(tiny_model_dir: Path) -> dict:
    model = f"local:{tiny_model_dir}"
    return {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "CLIPLENS_MODEL": model}


def _cmd() -> list[str]:
    return [sys.executable, "-m", "cliplens.cli.main"]


def test_killed_index_resumes_and_loses_nothing(tmp_path, tiny_model_dir):
    make_photos(tmp_path / "p", 160, size=(640, 480))
    db = tmp_path / "c.db"
    env = _cli_env(tiny_model_dir)
    # index a first part, so there is something to lose
    one = [*_cmd(), "index", str(tmp_path / "p" / "img000.jpg"), "--db", str(db)]
    first = subprocess.run(one, env=env, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr
    proc = subprocess.Popen(
        [*_cmd(), "index", str(tmp_path / "p"), "--db", str(db), "-b", "2", "--workers", "0"],
        env=env,
        stderr=subprocess.PIPE,
    )
    deadline = time.time() + 120
    rows = 0
    while time.time() < deadline and proc.poll() is None:
        con = sqlite3.connect(db, timeout=5)
        rows = con.execute("SELECT COUNT(*) FROM files").fetchone()[0]
        con.close()
        if rows >= 10:
            break
        time.sleep(0.02)
    assert proc.poll() is None, "the index finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    con = sqlite3.connect(db)
    assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    kept = con.execute("SELECT COUNT(*) FROM files").fetchone()[0]
    assert 10 <= kept < 160
    assert con.execute("SELECT COUNT(*) FROM files WHERE path LIKE '%img000.jpg'").fetchone()[0]
    con.close()
    whole = [*_cmd(), "index", str(tmp_path / "p"), "--db", str(db), "-f", "json"]
    again = subprocess.run(whole, env=env, capture_output=True, text=True, timeout=300)
    stats = json.loads(again.stdout)
    assert stats["unchanged"] >= kept - 2 and stats["new"] + stats["unchanged"] == 160


def test_search_while_indexing(tmp_path, tiny_model_dir, tiny):
    make_photos(tmp_path / "p", 120, size=(640, 480))
    db = tmp_path / "c.db"
    cat = Catalog(db)
    update_catalog(cat, tiny, [tmp_path / "p" / "img000.jpg"], workers=0)
    proc = subprocess.Popen(
        [*_cmd(), "index", str(tmp_path / "p"), "--db", str(db), "-b", "2", "--workers", "0"],
        env=_cli_env(tiny_model_dir),
        stderr=subprocess.PIPE,
    )
    seen = set()
    while proc.poll() is None:
        reader = Catalog(db)
        seen.add(len(search(reader, tiny, "a photo", n=500)))
        reader.close()
    assert proc.returncode == 0
    assert len(seen) >= 2  # readers saw the catalog grow, without errors
    assert len(search(Catalog(db), tiny, "a photo", n=500)) == 120


def test_cli_index_search_formats(tmp_path, capsys, photos):
    db = str(tmp_path / "c.db")
    assert main(["index", str(photos), "--model", "offline", "--db", db, "--workers", "0"]) == 0
    assert "7 new" in capsys.readouterr().err
    where = ["--in", str(photos), "--model", "offline", "--db", db]
    code = main(["search", "a cat", *where, "-n", "2", "--format", "paths"])
    out = capsys.readouterr().out.splitlines()
    assert code == 0 and len(out) == 2 and any(p.endswith("cat.jpg") for p in out)
    mixed = ["search", "2:a rocket", "-", "a cat", *where]
    code = main([*mixed, "-n", "1", "--format", "json", "--no-index"])
    data = json.loads(capsys.readouterr().out)
    assert code == 0 and data[0]["path"].endswith("rocket.jpg")
    code = main(["similar", str(photos / "cat.jpg"), *where, "-n", "3", "--format", "json"])
    data = json.loads(capsys.readouterr().out)
    assert code == 0 and len(data) == 3 and all(not d["path"].endswith("cat.jpg") for d in data)
    code = main(["search", "./nope.jpg", "--db", db, "--model", "offline"])
    assert code == 2 and "does not exist" in capsys.readouterr().err


def test_cli_pages_and_cut_off_are_slices_of_one_long_list(tmp_path, capsys, photos):
    db = str(tmp_path / "c.db")
    assert main(["index", str(photos), "--model", "offline", "--db", db, "--workers", "0"]) == 0
    where = ["--in", str(photos), "--model", "offline", "--db", db, "--no-index", "-f", "json"]
    for command in (["search", "a photo"], ["similar", str(photos / "cat.jpg")]):
        assert main([*command, *where, "-n", "7"]) == 0
        whole = json.loads(capsys.readouterr().out)
        assert len(whole) == (7 if command[0] == "search" else 6)
        pages = []
        for offset in (0, 2, 4, 6):
            assert main([*command, *where, "-n", "2", "--offset", str(offset)]) == 0
            pages += json.loads(capsys.readouterr().out)
        assert pages == whole
        cut = (whole[2]["score"] + whole[3]["score"]) / 2
        above = [h for h in whole if h["score"] >= cut]
        assert len(above) == 3
        assert main([*command, *where, "-n", "7", "--min-score", str(cut)]) == 0
        assert json.loads(capsys.readouterr().out) == above
        code = main([*command, *where, "-n", "2", "--offset", "1", "--min-score", str(cut)])
        assert code == 0 and json.loads(capsys.readouterr().out) == above[1:3]
    # the table numbers results from the offset
    assert main(["search", "a photo", *where[:-2], "-n", "1", "--offset", "4"]) == 0
    assert re.search(r"│ 5 +│", capsys.readouterr().out)
    assert main(["search", "a photo", *where, "--min-score", "2"]) == 2
    assert "--min-score" in capsys.readouterr().err
