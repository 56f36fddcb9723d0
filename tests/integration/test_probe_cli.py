"""`cliplens probe fit / predict / kshot` end to end on a tiny model and shapes images."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from cliplens.cli.main import main
from tests_helpers import run_json


@pytest.fixture(scope="module")
def colours(tmp_path_factory):
    """Noisy images in one folder per colour (three colours, 20 each): separable for any
    encoder, even a random one."""
    root = tmp_path_factory.mktemp("colours")
    rng = np.random.default_rng(0)
    for name, rgb in {
        "red": (200, 30, 30),
        "blue": (30, 30, 200),
        "yellow": (220, 210, 30),
    }.items():
        (root / name).mkdir()
        for i in range(20):
            x = np.clip(np.array(rgb) + rng.normal(0, 40, (32, 32, 3)), 0, 255)
            Image.fromarray(x.astype(np.uint8)).save(root / name / f"{i}.png")
    return root


def test_fit_then_predict(colours, tiny_model_dir, tmp_path, capsys):
    model = f"local:{tiny_model_dir}"
    head = tmp_path / "head.npz"
    fit = run_json(
        capsys,
        [
            "probe",
            "fit",
            "--data",
            str(colours),
            "--out",
            str(head),
            "--model",
            model,
            "--format",
            "json",
        ],
    )
    assert fit["classes"] == ["blue", "red", "yellow"]
    assert fit["metrics"]["cv_accuracy"] > 0.6  # chance is 1/3
    images = sorted((colours / "red").iterdir())[:5]
    preds = run_json(
        capsys,
        [
            "probe",
            "predict",
            *map(str, images),
            "--head",
            str(head),
            "--model",
            model,
            "--top-k",
            "2",
            "--format",
            "json",
        ],
    )
    assert len(preds) == 5 and all(len(p["labels"]) == 2 for p in preds)
    assert sum(p["labels"][0]["label"] == "red" for p in preds) >= 4
    # a head fit on another model is refused with the fix
    assert (
        main(["probe", "predict", str(images[0]), "--head", str(head), "--model", "offline"]) == 2
    )
    assert "pass the --model it was fit with" in capsys.readouterr().err


def test_kshot_reports_a_curve_and_zero_shot(colours, tiny_model_dir, capsys):
    report = run_json(
        capsys,
        [
            "probe",
            "kshot",
            "--data",
            str(colours),
            "--shots",
            "1,4,50",
            "--repeats",
            "2",
            "--model",
            f"local:{tiny_model_dir}",
            "--format",
            "json",
        ],
    )
    assert [r["shots"] for r in report["kshot"]] == [1, 4]  # 50 is more than a class holds
    assert report["test_images"] == 12 and report["classes"] == 3
    assert 0 <= report["zero_shot_accuracy"] <= 1
    assert report["kshot"][1]["accuracy"] > 0.5
    assert main(["probe", "kshot", "--data", str(colours), "--shots", "x"]) == 2
    assert "--shots x" in capsys.readouterr().err


def test_fit_needs_class_folders(tmp_path, capsys):
    (tmp_path / "only").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "only" / "a.png")
    assert main(["probe", "fit", "--data", str(tmp_path), "--out", str(tmp_path / "h")]) == 2
    assert "at least two subfolders" in capsys.readouterr().err
