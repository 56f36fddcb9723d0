"""CLIPScore, RefCLIPScore and reranking: the formulas on hand-made embeddings and on a
model's, and the `score` / `rerank` commands."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from cliplens.cli.main import main
from cliplens.errors import InvalidInputError
from cliplens.tasks.score import W, clip_score, ref_clip_score, rerank
from tests_helpers import run_json


def _at(cos: float) -> np.ndarray:
    """A unit vector at cosine `cos` to e1, in 3-d."""
    return np.array([cos, math.sqrt(1 - cos**2), 0.0], np.float32)


E1 = np.array([1.0, 0.0, 0.0], np.float32)


def test_clip_score_is_w_times_positive_cosine():
    images = np.stack([_at(0.6), _at(-0.3), _at(1.0)])
    np.testing.assert_allclose(clip_score(images, E1), [2.5 * 0.6, 0.0, 2.5], atol=1e-6)
    assert W == 2.5
    # scale does not matter: the cosine is taken
    np.testing.assert_allclose(clip_score(3 * images, 2 * E1), clip_score(images, E1), atol=1e-6)
    # paired texts, one per image
    texts = np.stack([E1, E1, _at(0.5)])
    np.testing.assert_allclose(clip_score(images, texts), [1.5, 0.0, 1.25], atol=1e-6)


def test_clip_score_on_model_embeddings(tiny, photos):
    files = sorted(photos.glob("*.jpg"))[:4]
    img = tiny.encode_images(files)
    txt = tiny.encode_texts(["a cat"])
    expected = 2.5 * np.maximum(img @ txt[0], 0)
    np.testing.assert_allclose(clip_score(img, txt), expected, atol=1e-5)


def test_ref_clip_score_is_the_harmonic_mean():
    # candidate c = e1; image at cos 0.6 -> CLIP-S 1.5; best reference at cos 0.8
    image = _at(0.6)[None]
    refs = [np.stack([_at(0.2), _at(0.8)])]
    ref, harmonic = ref_clip_score(image, E1, refs)
    assert ref[0] == pytest.approx(0.8, abs=1e-6)
    assert harmonic[0] == pytest.approx(2 * 1.5 * 0.8 / (1.5 + 0.8), abs=1e-6)
    # references pointing away count as 0, and so does the harmonic mean
    ref, harmonic = ref_clip_score(image, E1, [np.stack([_at(-0.2)])])
    assert ref[0] == 0 and harmonic[0] == 0
    with pytest.raises(InvalidInputError, match="no reference"):
        ref_clip_score(image, E1, [np.zeros((0, 3), np.float32)])
    with pytest.raises(InvalidInputError, match="1 images but 2 reference sets"):
        ref_clip_score(image, E1, refs * 2)


def test_rerank_orders_by_fit_and_keeps_ties_in_order():
    images = np.stack([_at(0.1), _at(0.9), _at(0.5), _at(0.9)])
    order, cos = rerank(images, E1)
    assert order.tolist() == [1, 3, 2, 0]
    np.testing.assert_allclose(cos, [0.1, 0.9, 0.5, 0.9], atol=1e-6)


def test_shape_errors():
    with pytest.raises(InvalidInputError, match="2 images but 3 texts"):
        clip_score(np.ones((2, 3)), np.ones((3, 3)))
    with pytest.raises(InvalidInputError, match=r"\(N, D\)"):
        clip_score(np.ones((2, 3, 1)), E1)


# ------------------------------------------------------------------ commands


def _model(tiny_model_dir):
    return ["--model", f"local:{tiny_model_dir}", "--precision", "fp32"]


def test_score_cli(capsys, photos, tiny_model_dir, tiny, tmp_path):
    files = sorted(photos.glob("*.jpg"))[:3]
    out = run_json(
        capsys,
        [
            "score",
            *map(str, files),
            "--prompt",
            "a cat",
            "--format",
            "json",
            *_model(tiny_model_dir),
        ],
    )
    img, txt = tiny.encode_images(files), tiny.encode_texts(["A photo depicts a cat"])[0]
    assert [r["path"] for r in out["images"]] == [str(f.resolve()) for f in files]
    np.testing.assert_allclose([r["cosine"] for r in out["images"]], img @ txt, atol=2e-3)
    scores = [r["clip_score"] for r in out["images"]]
    expected = [2.5 * max(r["cosine"], 0) for r in out["images"]]
    np.testing.assert_allclose(scores, expected, atol=1e-3)
    assert out["mean"]["clip_score"] == pytest.approx(np.mean(scores), abs=1e-3)
    (tmp_path / "refs.txt").write_text("a cat on a sofa\n# a comment\na kitten\n")
    with_refs = run_json(
        capsys,
        [
            "score",
            str(files[0]),
            "-p",
            "a cat",
            "--refs",
            str(tmp_path / "refs.txt"),
            "-f",
            "json",
            *_model(tiny_model_dir),
        ],
    )
    row = with_refs["images"][0]
    refs = ["A photo depicts a cat on a sofa", "A photo depicts a kitten"]
    r = tiny.encode_texts(refs) @ tiny.encode_texts(["A photo depicts a cat"])[0]
    assert row["ref_score"] == pytest.approx(max(float(r.max()), 0), abs=2e-3)
    c, s = row["clip_score"], row["ref_score"]
    assert row["ref_clip_score"] == pytest.approx(2 * c * s / (c + s) if c + s else 0, abs=2e-3)


def test_score_captions_file(capsys, photos, tiny_model_dir, tmp_path):
    files = sorted(photos.glob("*.jpg"))[:2]
    lines = [
        {"image": str(files[0]), "caption": "a cat", "references": ["a cat", "a pet"]},
        {"image": str(files[1]), "caption": "a rocket", "references": ["a rocket"]},
    ]
    (tmp_path / "c.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    out = run_json(
        capsys,
        ["score", "--captions", str(tmp_path / "c.jsonl"), "-f", "json", *_model(tiny_model_dir)],
    )
    assert [r["caption"] for r in out["images"]] == ["a cat", "a rocket"]
    # each caption is also a reference of its own image: reference score 1
    assert all(r["ref_score"] == pytest.approx(1.0, abs=1e-3) for r in out["images"])
    assert "ref_clip_score" in out["mean"]


def test_score_errors(capsys, photos, tmp_path, tiny_model_dir):
    image = str(next(photos.glob("*.jpg")))
    assert main(["score", image, *_model(tiny_model_dir)]) == 2
    assert "--prompt TEXT" in capsys.readouterr().err
    assert main(["score", image, "-p", "  ", *_model(tiny_model_dir)]) == 2
    assert "empty" in capsys.readouterr().err
    assert main(["score", image, "-p", "x", "--refs", str(tmp_path / "no.txt")]) == 2
    assert "no such file" in capsys.readouterr().err
    (tmp_path / "bad.jsonl").write_text('{"image": "a.jpg"}\n')
    assert main(["score", "--captions", str(tmp_path / "bad.jsonl")]) == 2
    assert "line 1" in capsys.readouterr().err


def test_rerank_cli(capsys, photos, tiny_model_dir, tiny, tmp_path):
    files = sorted(photos.glob("*.jpg"))
    out = run_json(
        capsys,
        [
            "rerank",
            "a rocket",
            *map(str, files),
            "-k",
            "2",
            "--copy-top",
            str(tmp_path / "best"),
            "-f",
            "json",
            *_model(tiny_model_dir),
        ],
    )
    cos = tiny.encode_images(files) @ tiny.encode_texts(["a rocket"])[0]
    best = [str(files[i].resolve()) for i in np.argsort(-cos, kind="stable")[:2]]
    assert [r["path"] for r in out] == best
    assert [r["rank"] for r in out] == [1, 2]
    copied = sorted(p.name for p in (tmp_path / "best").iterdir())
    assert copied == sorted(f"{i + 1}-{p.split('/')[-1]}" for i, p in enumerate(best))
    assert main(["rerank", "a rocket", str(files[0]), "-k", "0"]) == 2
    assert "'-k'" in (err := capsys.readouterr().err) and "0 is not in the range" in err
