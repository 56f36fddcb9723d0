"""Screening: corrupt files (exact), CLIP-IQA arithmetic, distortions, the probe."""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
import pytest
from PIL import Image, ImageFilter

from cliplens.corruptions import distort
from cliplens.tasks.quality import (
    ATTRIBUTES,
    DISTORTIONS,
    DistortionProbe,
    build_screener,
    check_file,
    train_probe,
)


def broken_corpus(folder):
    """Every kind of broken file, and good files of several formats: name -> problem."""
    folder.mkdir()
    rng = np.random.default_rng(0)
    noise = Image.fromarray(rng.integers(0, 255, (60, 80, 3), dtype=np.uint8))
    expected = {}
    for name, fmt in (
        ("good.jpg", "JPEG"),
        ("good.png", "PNG"),
        ("good.webp", "WEBP"),
        ("good.gif", "GIF"),
        ("good.tiff", "TIFF"),
        ("good.bmp", "BMP"),
    ):
        noise.save(folder / name, format=fmt)
        expected[name] = None
    (folder / "empty.jpg").write_bytes(b"")
    expected["empty.jpg"] = "empty"
    buf = io.BytesIO()
    noise.save(buf, format="JPEG")
    (folder / "cut.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    expected["cut.jpg"] = "truncated"
    buf = io.BytesIO()
    noise.save(buf, format="PNG")
    (folder / "cut.png").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    expected["cut.png"] = "truncated"
    (folder / "notes.jpg").write_text("not a photo\n")
    expected["notes.jpg"] = "not_an_image"
    (folder / "garbage.png").write_bytes(rng.integers(0, 255, 4096, dtype=np.uint8).tobytes())
    expected["garbage.png"] = "not_an_image"
    noise.save(folder / "really_png.jpg", format="PNG")
    expected["really_png.jpg"] = "wrong_extension"
    Image.new("1", (20000, 20000)).save(folder / "bomb.png")  # 400 MP, ~50 kB
    expected["bomb.png"] = "too_large"
    return expected


def test_every_broken_file_is_reported_with_its_reason(tmp_path):
    expected = broken_corpus(tmp_path / "c")
    for name, problem in expected.items():
        result = check_file(tmp_path / "c" / name)
        assert result.problem == problem, (name, result)
        assert result.ok == (problem is None)
        if problem:
            assert result.reason and "\n" not in result.reason
    assert "PNG file named .jpg" in check_file(tmp_path / "c" / "really_png.jpg").reason
    assert "400.0 MP" in check_file(tmp_path / "c" / "bomb.png").reason


@dataclass
class FakeInfo:
    dim: int
    model_id: str = "fake@1"
    name: str = "fake"


class PromptModel:
    """Each prompt embeds to its own basis vector (positives and negatives opposite)."""

    def __init__(self):
        texts = [t for pair in ATTRIBUTES.values() for t in pair] + list(DISTORTIONS.values())
        self.index = {t: i for i, t in enumerate(texts)}
        self.info = FakeInfo(dim=len(texts))

    def encode_texts(self, texts):
        return np.eye(self.info.dim, dtype=np.float32)[[self.index[t] for t in texts]]


def test_clip_iqa_score_is_the_softmax_over_the_antonym_pair():
    model = PromptModel()
    screener = build_screener(model)
    good, bad = (model.index[t] for t in ATTRIBUTES["quality"])
    v = np.zeros(model.info.dim, np.float32)
    v[good], v[bad] = 0.30, 0.25  # leans to "Good photo."
    v /= np.linalg.norm(v)
    scores = screener.attribute_scores(v[None])[0]
    a, b = 100 * v[good], 100 * v[bad]
    assert scores[0] == pytest.approx(np.exp(a) / (np.exp(a) + np.exp(b)), rel=1e-5)
    assert scores[0] > 0.5
    assert scores[1:] == pytest.approx(0.5)  # no lean on the other attributes
    blurry = np.zeros(model.info.dim, np.float32)
    blurry[model.index[DISTORTIONS["blur"]]] = 1.0
    [result] = screener.score(["x"], blurry[None])
    assert result.distortion == "blur" and result.distortion_source == "zero-shot"


def test_distortions_are_graded():
    rng = np.random.default_rng(0)
    base = Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8))
    base = base.filter(ImageFilter.SMOOTH)
    x = np.asarray(base, np.float32)
    blur = [
        np.abs(np.diff(np.asarray(distort(base, "blur", k), np.float32), axis=1)).mean()
        for k in range(1, 6)
    ]
    assert blur == sorted(blur, reverse=True)  # less edge energy with each level
    dark = [np.asarray(distort(base, "underexposed", k), np.float32).mean() for k in range(1, 6)]
    assert dark == sorted(dark, reverse=True) and dark[0] < x.mean()
    noise = [
        np.abs(np.asarray(distort(base, "noise", k), np.float32) - x).mean() for k in range(1, 6)
    ]
    assert noise == sorted(noise)
    with pytest.raises(ValueError, match="level 6"):
        distort(base, "blur", 6)
    with pytest.raises(ValueError, match="unknown distortion 'fog'"):
        distort(base, "fog", 1)


def test_probe_learns_separable_types_and_round_trips(tmp_path):
    rng = np.random.default_rng(1)
    centres = rng.standard_normal((3, 24))
    labels = ["blur", "noise", "clean"] * 40
    x = np.stack([centres[["blur", "noise", "clean"].index(lab)] for lab in labels])
    x = x + 0.3 * rng.standard_normal(x.shape)
    probe = train_probe(x.astype(np.float32), labels, "fake@1")
    assert probe.classes == ["blur", "clean", "noise"]
    assert probe.metrics["cv_accuracy"] > 0.95
    again = DistortionProbe.load(probe.save(tmp_path / "probe.npz"))
    assert again.predict(x[:6]) == labels[:6]
    two = [i for i, lab in enumerate(labels) if lab != "clean"]  # a binary problem
    binary = train_probe(x[two].astype(np.float32), [labels[i] for i in two], "fake@1")
    assert binary.classes == ["blur", "noise"]
    assert binary.predict(x[two[:6]]) == [labels[i] for i in two[:6]]


def test_a_file_that_is_not_a_probe_is_a_clear_error(tmp_path):
    junk = tmp_path / "probe.npz"
    junk.write_bytes(b"not an npz")
    with pytest.raises(ValueError, match=r"probe .*probe\.npz: not a cliplens probe file"):
        DistortionProbe.load(junk)
