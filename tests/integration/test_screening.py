"""Moderation and screening end to end with the offline model and real photos, via the CLI."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from cliplens.catalog.db import Catalog
from cliplens.catalog.update import update_catalog
from cliplens.cli.main import main
from cliplens.datasets.distorted import write_distortions
from cliplens.datasets.photos import write_photos
from cliplens.tasks.embed import embed_files
from cliplens.tasks.moderate import build_moderator
from cliplens.tasks.policy import parse_policy
from tests_helpers import run_json


@pytest.fixture(scope="module")
def tiles(tmp_path_factory):
    """Clean 2x2 tiles of the seven photos, a folder per photo."""
    root = tmp_path_factory.mktemp("tiles")
    for photo in write_photos(root / "photos"):
        write_distortions(root / photo.stem, [photo], kinds=("clean",))
    return root


def cat_policy(offline, photos, tmp_path):
    """A one-concept policy whose threshold sits between the cat photo and the others."""
    text = (
        "name: cats\nmodel: offline\ncategories:\n"
        "  cat:\n    - {text: a photo of a cat, threshold: 0.0}\n"
    )
    mod = build_moderator(parse_policy(text), offline)
    files = sorted(photos.iterdir())
    scores = {
        f.name: v.score
        for f, v in zip(
            files, mod.judge([str(f) for f in files], offline.encode_images(files)), strict=True
        )
    }
    others = max(s for n, s in scores.items() if n != "cat.jpg")
    assert scores["cat.jpg"] > others
    path = tmp_path / "cats.yaml"
    path.write_text(text.replace("0.0", f"{(scores['cat.jpg'] + others) / 2:.4f}"))
    return path


def test_moderate_cli_flags_redacts_and_reuses_the_catalog(tmp_path, offline, photos, capsys):
    policy = cat_policy(offline, photos, tmp_path)
    verdicts = run_json(
        capsys,
        [
            "moderate",
            str(photos),
            "--policy",
            str(policy),
            "--model",
            "offline",
            "--format",
            "json",
        ],
    )
    assert {v["path"].rsplit("/", 1)[-1]: v["flagged"] for v in verdicts} == {
        "cat.jpg": True,
        "coffee.jpg": False,
        "rocket.jpg": False,
        "motorcycle.jpg": False,
        "cameraman.png": False,
        "hubble.jpg": False,
        "page.png": False,
    }
    cat = next(v for v in verdicts if v["flagged"])
    assert cat["margin"] > 0 and cat["concept"] == "a photo of a cat"
    flagged = run_json(
        capsys,
        [
            "moderate",
            str(photos),
            "--policy",
            str(policy),
            "--model",
            "offline",
            "--format",
            "json",
            "--only-flagged",
            "--redact",
            str(tmp_path / "redacted"),
        ],
    )
    assert len(flagged) == 1
    assert [p.name for p in (tmp_path / "redacted").iterdir()] == ["cat.redacted.jpg"]
    # an indexed folder is not encoded again
    db = Catalog(tmp_path / "c.db")
    update_catalog(db, offline, [photos], workers=0)
    done = embed_files(offline, sorted(photos.iterdir()), Catalog(tmp_path / "c.db", readonly=True))
    assert done.reused == 7
    fresh = embed_files(offline, sorted(photos.iterdir()))
    np.testing.assert_allclose(done.vectors, fresh.vectors, atol=2e-3)  # stored as float16


def test_bad_policy_is_a_one_line_error_with_exit_code_2(tmp_path, photos, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\ncategories:\n  a:\n    - {text: cat, threshold: 2}\n")
    assert main(["moderate", str(photos), "--policy", str(bad), "--model", "offline"]) == 2
    err = capsys.readouterr().err.strip()
    assert "line 4" in err and "outside [-1, 1]" in err and len(err.splitlines()) == 1


def test_calibrate_and_train_head_from_folders(tmp_path, tiles, capsys):
    pos, neg = tmp_path / "pos", tmp_path / "neg"
    for name in ("cat", "coffee"):
        shutil.copytree(tiles / name / "clean", pos / name)
    for name in ("rocket", "motorcycle", "cameraman", "hubble", "page"):
        shutil.copytree(tiles / name / "clean", neg / name)
    policy = tmp_path / "policy.yaml"
    policy.write_text(
        "name: food and pets\ncategories:\n"
        "  cat:\n    - {text: a photo of a cat, threshold: 0.3}\n"
        "  coffee:\n    - {text: a cup of coffee, threshold: 0.3}\n"
    )
    out = tmp_path / "calibrated.yaml"
    report = run_json(
        capsys,
        [
            "moderate",
            "calibrate",
            "--policy",
            str(policy),
            "--positive",
            str(pos),
            "--negative",
            str(neg),
            "--target-precision",
            "0.9",
            "--out",
            str(out),
            "--model",
            "offline",
            "--format",
            "json",
        ],
    )
    assert set(report["points"]) == {"cat", "coffee"}  # subfolders named after categories
    assert all(p["precision"] >= 0.9 for p in report["points"].values())
    verdicts = run_json(
        capsys,
        [
            "moderate",
            str(pos),
            str(neg),
            "--policy",
            str(out),
            "--model",
            "offline",
            "--format",
            "json",
        ],
    )
    flagged = {v["path"] for v in verdicts if v["flagged"]}
    assert all("/pos/" in p for p in flagged) and flagged
    headed = tmp_path / "headed.yaml"
    result = run_json(
        capsys,
        [
            "moderate",
            "train-head",
            "--policy",
            str(policy),
            "--positive",
            str(pos),
            "--negative",
            str(neg),
            "--out",
            str(headed),
            "--model",
            "offline",
            "--format",
            "json",
        ],
    )
    assert result["metrics"]["cv_roc_auc"] > 0.8
    assert "head:" in headed.read_text()


def test_quality_reports_broken_files_and_exits_1(tmp_path, photos, capsys):
    folder = tmp_path / "mixed"
    shutil.copytree(photos, folder)
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "half.jpg").write_bytes((photos / "cat.jpg").read_bytes()[:20000])
    assert main(["quality", str(folder), "--integrity-only", "--format", "json"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert {p["path"].rsplit("/", 1)[-1]: p["problem"] for p in report["problems"]} == {
        "empty.jpg": "empty",
        "half.jpg": "truncated",
    }
    assert report["scores"] == []
    # scoring decodes each file once, through the encoder, and finds the same problems
    assert main(["quality", str(folder), "--model", "offline", "--format", "json"]) == 1
    full = json.loads(capsys.readouterr().out)
    assert full["problems"] == report["problems"]
    assert len(full["scores"]) == 7
    assert (
        main(["quality", str(photos), "--model", "offline", "--worst", "3", "--format", "json"])
        == 0
    )
    scores = json.loads(capsys.readouterr().out)["scores"]
    assert len(scores) == 3
    assert [s["quality"] for s in scores] == sorted(s["quality"] for s in scores)
    assert all(0 <= s[a] <= 1 for s in scores for a in ("sharpness", "noisiness", "contrast"))


def test_distortion_probe_beats_chance_on_held_out_photos(tmp_path, capsys):
    """Few-shot: train on five photos' distorted tiles, test on two photos never seen."""
    photos = write_photos(tmp_path / "photos")
    kinds = ("clean", "blur", "noise", "jpeg", "underexposed")
    held_out = [p for p in photos if p.stem in ("cat", "motorcycle")]
    train = [p for p in photos if p not in held_out]
    write_distortions(tmp_path / "train", train, kinds, levels=(2, 4))
    write_distortions(tmp_path / "test", held_out, kinds, levels=(3,))
    probe = tmp_path / "probe.npz"
    trained = run_json(
        capsys,
        [
            "quality",
            "train",
            "--data",
            str(tmp_path / "train"),
            "--out",
            str(probe),
            "--model",
            "offline",
            "--format",
            "json",
        ],
    )
    assert trained["classes"] == sorted(kinds)
    assert (
        main(
            [
                "quality",
                str(tmp_path / "test"),
                "--probe",
                str(probe),
                "--model",
                "offline",
                "--format",
                "json",
            ]
        )
        == 0
    )
    scores = json.loads(capsys.readouterr().out)["scores"]
    assert len(scores) == 40 and all(s["distortion_source"] == "probe" for s in scores)
    right = [s["distortion"] == s["path"].split("/")[-2] for s in scores]
    accuracy = sum(right) / len(right)
    assert accuracy >= 0.45, accuracy  # chance: 0.20


def test_datasets_distortions_writes_a_probe_layout(tmp_path, capsys):
    assert main(["datasets", "distortions", str(tmp_path / "d"), "--levels", "2,4"]) == 0
    folders = {p.name: len(list(p.iterdir())) for p in (tmp_path / "d").iterdir()}
    assert folders["clean"] == 28  # 7 photos x 4 tiles
    assert folders["blur"] == folders["jpeg"] == 56  # x 2 levels
    assert set(folders) == {
        "clean",
        "blur",
        "noise",
        "jpeg",
        "underexposed",
        "overexposed",
        "low_resolution",
    }
    assert main(["datasets", "distortions", str(tmp_path / "e"), "--levels", "9"]) == 2
    assert "level 9" in capsys.readouterr().err
