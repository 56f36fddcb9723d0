"""Zero-shot classification logic on tiny random models and hand-made embeddings."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from PIL import Image

from cliplens import classify, zero_shot_weights
from cliplens.errors import InvalidInputError
from cliplens.tasks.classify import (
    clean_labels,
    labels_from_folder,
    load_templates,
    parse_labels,
    read_labels_file,
    scores,
)


def test_template_sets():
    assert len(load_templates("imagenet")) == 80
    assert len(load_templates("default")) == 7
    assert load_templates("photo") == ["a photo of a {}."]
    assert all(t.count("{}") == 1 for t in load_templates("imagenet"))


def test_template_file_and_bad_templates(tmp_path):
    f = tmp_path / "t.txt"
    f.write_text("# comment\na photo of a {}.\n\na drawing of a {}.\n")
    assert load_templates(str(f)) == ["a photo of a {}.", "a drawing of a {}."]
    f.write_text("no placeholder here\n")
    with pytest.raises(InvalidInputError, match="contain"):
        load_templates(str(f))
    with pytest.raises(InvalidInputError, match="nor a file"):
        load_templates(str(tmp_path / "missing.txt"))


def test_label_sources(tmp_path):
    assert parse_labels(" cat, dog ,,cat ") == ["cat", "dog"]
    f = tmp_path / "labels.txt"
    f.write_text("cat\n\n# not a label\ndog\n")
    assert read_labels_file(f) == ["cat", "dog"]
    for name in ("golden_retriever", "tabby", ".hidden"):
        (tmp_path / "ds" / name).mkdir(parents=True)
    (tmp_path / "ds" / "file.txt").write_text("x")
    assert labels_from_folder(tmp_path / "ds") == ["golden_retriever", "tabby"]
    with pytest.raises(InvalidInputError):
        clean_labels([" ", ""])
    with pytest.raises(InvalidInputError):
        read_labels_file(tmp_path / "nope.txt")


def test_prompt_ensemble_is_normalised_mean(tiny):
    templates = ["a photo of a {}.", "a drawing of a {}."]
    w = zero_shot_weights(tiny, ["cat", "golden_retriever"], templates)
    assert w.shape == (2, 32)
    np.testing.assert_allclose(np.linalg.norm(w, axis=1), 1.0, atol=1e-5)
    # underscores read as spaces; the ensemble is the renormalised mean of the prompt embeddings
    prompts = tiny.encode_texts(
        ["a photo of a golden retriever.", "a drawing of a golden retriever."]
    )
    mean = prompts.mean(0)
    np.testing.assert_allclose(w[1], mean / np.linalg.norm(mean), atol=1e-5)


def test_softmax_scores_use_logit_scale(tiny):
    img = np.array([[1.0, 0.0], [0.0, 1.0]], np.float32)
    weights = np.array([[1.0, 0.0], [0.6, 0.8]], np.float32)
    p = scores(tiny, img, weights, multi_label=False)
    np.testing.assert_allclose(p.sum(1), 1.0, atol=1e-6)
    s = tiny.info.logit_scale
    expected = np.exp(s * 1.0) / (np.exp(s * 1.0) + np.exp(s * 0.6))
    assert p[0, 0] == pytest.approx(expected, rel=1e-5)
    # multi-label without a trained bias: the raw cosine, each label on its own
    np.testing.assert_allclose(scores(tiny, img, weights, multi_label=True), img @ weights.T)
    # with a sigmoid bias (SigLIP): sigmoid(scale * cos + bias)
    sig = type(tiny).__new__(type(tiny))
    sig.info = replace(tiny.info, logit_scale=10.0, logit_bias=-5.0)
    got = scores(sig, img, weights, multi_label=True)
    np.testing.assert_allclose(got, 1 / (1 + np.exp(-(10.0 * (img @ weights.T) - 5.0))), rtol=1e-6)


def test_classify_orders_labels_and_skips_bad_images(tiny, tmp_path):
    rng = np.random.default_rng(0)
    good = [Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)) for _ in range(3)]
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    res = classify(tiny, [good[0], str(bad), good[1], good[2]], ["cat", "dog", "car"], top_k=2)
    assert len(res.predictions) == 3 and len(res.failures) == 1
    assert "broken.png" in str(res.failures[0])
    for pred in res.predictions:
        assert len(pred.labels) == 2
        assert pred.labels[0][1] >= pred.labels[1][1]
    full = classify(tiny, good, ["cat", "dog", "car"])
    for pred in full.predictions:
        assert sum(s for _, s in pred.labels) == pytest.approx(1.0, abs=1e-4)
        assert pred.to_dict()["labels"][0]["label"] == pred.top


def test_multi_label_threshold(tiny):
    rng = np.random.default_rng(1)
    imgs = [Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)) for _ in range(2)]
    everything = classify(tiny, imgs, ["cat", "dog", "car"], multi_label=True, threshold=-1.0)
    assert all(len(p.labels) == 3 for p in everything.predictions)
    cut = sorted(s for p in everything.predictions for _, s in p.labels)[2]
    some = classify(tiny, imgs, ["cat", "dog", "car"], multi_label=True, threshold=cut)
    kept = [s for p in some.predictions for _, s in p.labels]
    assert all(s >= cut for s in kept) and 0 < len(kept) < 6


def test_bad_arguments(tiny):
    with pytest.raises(InvalidInputError):
        classify(tiny, [], [])
    with pytest.raises(InvalidInputError, match="top-k"):
        classify(tiny, [], ["a"], top_k=0)
