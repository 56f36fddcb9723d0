"""Robust encoders by contrastive distillation: the student learns to map corrupted images
to the teacher's clean embeddings; the text side and the evaluation stay the teacher's."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from cliplens.cli.main import main
from cliplens.datasets.shapes import sample
from cliplens.tasks.probe import fit_probe
from cliplens.train.robust import (
    RobustConfig,
    corrupted_crops,
    evaluate_robust,
    train_robust,
)
from tests_helpers import run_json


@pytest.fixture(scope="module")
def images():
    return [Image.fromarray(sample(1, i, size=32).image) for i in range(64)]


@pytest.fixture(scope="module")
def trained(tiny, images, tmp_path_factory):
    cfg = RobustConfig(
        loss="clip-align",  # cliplens's loss, with its alignment term
        corruptions=("noise", "occlusion"),
        severities=(4, 5),
        epochs=6,
        batch_size=16,
        lr=2e-3,
        warmup_steps=2,
        clean_fraction=0.1,
    )
    return train_robust(tiny, images, tmp_path_factory.mktemp("robust"), cfg)


def _to_clean(encoder, teacher, images, kind):
    """(mean cosine, top-1 retrieval) of corrupted images' embeddings against the teacher's
    clean embeddings of the same images."""
    rngs = [np.random.default_rng(i) for i in range(len(images))]
    bad = corrupted_crops(teacher, images, [kind] * len(images), [5] * len(images), rngs)
    clean = corrupted_crops(teacher, images, [None] * len(images), [0] * len(images), rngs)
    sims = encoder.encode_crops(bad) @ teacher.encode_crops(clean).T
    return float(np.mean(np.diag(sims))), float(np.mean(sims.argmax(1) == np.arange(len(sims))))


def test_distillation_lowers_the_loss_and_pulls_corrupted_images_to_clean(trained, tiny, images):
    assert trained.steps == 6 * (64 // 16)
    assert np.mean(trained.losses[-4:]) < np.mean(trained.losses[:4]) - 0.2
    for kind in ("noise", "occlusion"):
        _, top1_before = _to_clean(tiny, tiny, images, kind)
        cos_after, top1_after = _to_clean(trained.student, tiny, images, kind)
        assert top1_after > top1_before + 0.1, kind
        # and stays in the teacher's space: the alignment term (without it, noise fell to 0.47)
        assert cos_after > 0.85, kind


def test_student_keeps_the_text_tower_and_saves_a_local_model(trained, tiny, images):
    from cliplens import load_model

    texts = ["a red circle", "a blue square"]
    assert np.allclose(trained.student.encode_texts(texts), tiny.encode_texts(texts))
    assert trained.student.info.model_id != tiny.info.model_id
    loaded = load_model(f"local:{trained.model_path}", device="cpu", precision="fp32")
    x = images[:4]
    np.testing.assert_allclose(loaded.encode_images(x), trained.student.encode_images(x), atol=1e-5)
    # the student's image tower moved away from the teacher's...
    teacher = tiny.image_tower().state_dict()
    student = trained.student.image_tower().state_dict()
    assert any(not torch.equal(teacher[k], student[k]) for k in teacher)
    # ...and the teacher itself did not move: it is still the checkpoint it was loaded from
    saved = load_model(tiny.info.name, device="cpu", precision="fp32").image_tower().state_dict()
    assert sorted(saved) == sorted(teacher)
    assert all(torch.equal(saved[k], teacher[k]) for k in teacher)


def test_evaluation_reports_every_condition_for_every_encoder(trained, tiny, images):
    labels = [s.objects[0].colour for s in (sample(1, i, size=32) for i in range(64))]
    probe = fit_probe(tiny.encode_images(images[32:]), labels[32:], tiny.info.model_id)
    encoders = {"teacher": tiny, "same": tiny, "student": trained.student}
    rows = evaluate_robust(
        encoders, images[:32], labels[:32], ("blur", "jpeg"), (1, 5), probe=probe
    )
    assert [(r.corruption, r.severity) for r in rows] == [
        ("clean", 0),
        ("blur", 1),
        ("blur", 5),
        ("jpeg", 1),
        ("jpeg", 5),
    ]
    for r in rows:
        assert r.accuracy["teacher"] == r.accuracy["same"]  # the same images, corrupted alike
        assert all(0 <= r.accuracy[k] <= 1 for k in ("teacher", "student"))
    assert rows[0].to_dict() == {"corruption": "clean", "severity": 0, **rows[0].accuracy}


def test_offline_teacher_trains_its_cnn(offline, tmp_path):
    imgs = [Image.fromarray(sample(2, i, size=64).image) for i in range(4)]
    cfg = RobustConfig(corruptions=("blur",), epochs=1, batch_size=4, warmup_steps=1)
    before = {k: v.clone() for k, v in offline.image_tower().state_dict().items()}
    result = train_robust(offline, imgs, tmp_path, cfg)
    assert result.steps == 1 and result.tower_path.is_file() and result.model_path is None
    assert result.student.encode_images(imgs).shape == (4, offline.info.dim)
    saved = torch.load(result.tower_path, weights_only=False)
    assert saved["teacher"] == offline.info.model_id
    # the CNN trained: the student's tower is not the teacher's, which stayed as it was
    student = result.student.image_tower().state_dict()
    assert any(not torch.equal(before[k], student[k]) for k in before)
    teacher = offline.image_tower().state_dict()
    assert all(torch.equal(before[k], teacher[k]) for k in before)


def test_robust_cli_trains_and_compares(tiny_model_dir, tmp_path, capsys):
    from cliplens.datasets.shapes import write_shapes

    write_shapes(tmp_path / "s", n=80, seed=0, size=32, val_fraction=0.5)
    s = tmp_path / "s"
    code = main(
        [
            "train",
            "robust",
            "--teacher",
            f"local:{tiny_model_dir}",
            "--data",
            str(s / "train.jsonl"),
            "--eval",
            str(s / "val.jsonl"),
            "--corruptions",
            "noise,pixelate",
            "--severity",
            "5",
            "--epochs",
            "1",
            "--batch-size",
            "16",
            "--out",
            str(tmp_path / "run"),
            "--format",
            "json",
        ]
    )
    report = json.loads(capsys.readouterr().out)
    assert code == 0 and report["steps"] == 40 // 16
    assert len(report["eval"]) == 1 + 2 * 5  # clean, then 2 corruptions x 5 severities
    saved = json.loads((tmp_path / "run" / "eval.json").read_text())
    assert saved == {"mode": "zero-shot", "rows": report["eval"]}
    assert set(report["eval"][0]) == {"corruption", "severity", "teacher", "student"}
    # a probe fit on the labelled training rows' teacher embeddings (the mechanics only:
    # evaluated on those rows, so that every class has been seen)
    rows = str(s / "train.jsonl")
    probe = run_json(
        capsys,
        [
            "train",
            "robust",
            "--teacher",
            f"local:{tiny_model_dir}",
            "--data",
            rows,
            "--eval",
            rows,
            "--eval-mode",
            "probe",
            "--loss",
            "clip-align",
            "--corruptions",
            "blur",
            "--epochs",
            "1",
            "--batch-size",
            "16",
            "--out",
            str(tmp_path / "p"),
            "-f",
            "json",
        ],
    )
    assert len(probe["eval"]) == 1 + 5 and probe["eval"][0]["teacher"] > 0.5
    assert (
        main(
            [
                "train",
                "robust",
                "--teacher",
                f"local:{tiny_model_dir}",
                "--data",
                str(s),
                "--out",
                str(tmp_path / "x"),
                "--severity",
                "9",
            ]
        )
        == 2
    )
    assert "severity '9'" in capsys.readouterr().err
    bad_loss = ["train", "robust", "--teacher", "offline", "--data", str(s), "--loss", "mse"]
    assert main([*bad_loss, "--out", str(tmp_path / "y")]) == 2
    assert "--loss mse: simclr or clip-align" in capsys.readouterr().err


def test_resume_takes_the_same_steps_as_an_uninterrupted_run(tiny, images, tmp_path):
    """The loop CLIP and ClipCap training share: a run stopped mid-epoch and resumed
    draws the same order and corruptions, so its losses are the straight run's."""
    cfg = RobustConfig(corruptions=("noise", "blur"), epochs=2, batch_size=16, warmup_steps=1)
    straight = train_robust(tiny, images, tmp_path / "a", cfg)
    first = train_robust(tiny, images, tmp_path / "b", cfg, max_steps=5)
    rest = train_robust(tiny, images, tmp_path / "b", cfg)
    assert (first.steps, rest.steps) == (5, straight.steps) == (5, 8)
    np.testing.assert_allclose(first.losses + rest.losses, straight.losses, rtol=1e-5)
    with pytest.raises(ValueError, match="other settings"):
        train_robust(tiny, images, tmp_path / "b", RobustConfig(corruptions=("blur",)))
