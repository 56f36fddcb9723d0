"""Linear probes: fitting, regularisation by validation, k-shot curves, files, folders."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from cliplens.errors import InvalidInputError
from cliplens.tasks.probe import (
    C_GRID,
    LinearProbe,
    fit_probe,
    kshot,
    labelled_folder,
    split_per_class,
)


def blobs(n_per: int, classes: int = 3, dim: int = 16, spread: float = 1.0, seed: int = 0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 3, (classes, dim))
    x = np.concatenate([c + rng.normal(0, spread, (n_per, dim)) for c in centres])
    y = [f"class{k}" for k in range(classes) for _ in range(n_per)]
    return x.astype(np.float32), y


def test_probe_separates_blobs_and_picks_c_by_validation():
    x, y = blobs(40)
    probe = fit_probe(x, y, "space@1")
    assert probe.metrics["C"] in C_GRID
    assert probe.metrics["cv_accuracy"] > 0.9
    test_x, test_y = blobs(20, seed=0)  # same centres (same seed), fresh draws below
    rng = np.random.default_rng(5)
    test_x = test_x + rng.normal(0, 0.5, test_x.shape).astype(np.float32)
    assert np.mean(np.array(probe.predict(test_x)) == np.array(test_y)) > 0.9
    p = probe.probabilities(test_x)
    assert np.allclose(p.sum(axis=1), 1.0, atol=1e-5)


def test_chosen_c_is_the_best_of_the_grid_on_validation():
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    x, y = blobs(15, classes=3, dim=100, spread=4.0, seed=2)  # weak signal, many dims
    probe = fit_probe(x, y, "s")
    cv = StratifiedKFold(n_splits=5, shuffle=True, random_state=0)
    scores = {
        c: cross_val_score(
            make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=3000)), x, y, cv=cv
        ).mean()
        for c in C_GRID
    }
    assert probe.metrics["cv_accuracy"] == pytest.approx(max(scores.values()))
    assert scores[probe.metrics["C"]] == max(scores.values())


def test_binary_probe_and_file_round_trip(tmp_path):
    x, y = blobs(20, classes=2)
    probe = fit_probe(x, y, "space@1")
    assert probe.weights.shape == (2, 16)
    again = LinearProbe.load(probe.save(tmp_path / "head.npz"))
    assert again.classes == probe.classes and again.model_id == "space@1"
    assert np.allclose(again.probabilities(x), probe.probabilities(x))
    (tmp_path / "junk").write_bytes(b"not a probe")
    with pytest.raises(InvalidInputError, match="junk"):
        LinearProbe.load(tmp_path / "junk")


def test_single_example_per_class_uses_the_default_c():
    x, y = blobs(1, classes=4)
    probe = fit_probe(x, y, "s")
    assert "cv_accuracy" not in probe.metrics
    assert probe.predict(x) == y


def test_one_class_is_refused():
    with pytest.raises(InvalidInputError, match="two classes"):
        fit_probe(np.zeros((4, 3)), ["a"] * 4, "s")


def test_kshot_curve_rises_with_shots_and_skips_what_cannot_be_drawn():
    x, y = blobs(30, classes=4, spread=2.5)
    pool, test = split_per_class(y, 0.3)
    assert not set(pool) & set(test) and len(pool) + len(test) == len(y)
    assert {y[i] for i in test} == set(y)  # every class is tested
    rows = kshot(
        x[pool], [y[i] for i in pool], x[test], [y[i] for i in test], shots=(1, 16, 64), repeats=3
    )
    assert [r.shots for r in rows] == [1, 16]  # 64 is more than a class holds
    assert rows[1].accuracy > rows[0].accuracy
    assert rows[1].accuracy > 0.5  # chance is 0.25
    assert rows[0].to_dict() == {
        "shots": 1,
        "accuracy": rows[0].accuracy,
        "std": rows[0].std,
        "repeats": 3,
    }


def test_labelled_folder_reads_class_subfolders(tmp_path):
    for name in ("cat", "dog"):
        (tmp_path / name).mkdir()
        for i in range(2):
            Image.new("RGB", (8, 8), (i * 50, 0, 0)).save(tmp_path / name / f"{i}.png")
    (tmp_path / "notes.txt").write_text("ignored")
    files, labels = labelled_folder(tmp_path)
    assert labels == ["cat", "cat", "dog", "dog"]
    assert all(f.suffix == ".png" for f in files)
    with pytest.raises(InvalidInputError, match="two subfolders"):
        labelled_folder(tmp_path / "cat")
