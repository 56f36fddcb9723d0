"""CLIPScore and RefCLIPScore as the reference implementation computes them
(jmhessel/clipscore): the same random ViT-B-32 weights, embedded by open_clip alone with
"A photo depicts " before every candidate and reference, against `cliplens score`."""

from __future__ import annotations

import numpy as np
import pytest

from cliplens.tasks.score import PREFIX, prefixed
from tests_helpers import run_json


@pytest.fixture(scope="module")
def vit_b32(tmp_path_factory):
    """(open_clip model, its eval transform, its tokenizer, a cliplens checkpoint of it)."""
    import open_clip
    import torch

    from cliplens.models.openclip import save_checkpoint

    torch.manual_seed(0)
    model, _, transform = open_clip.create_model_and_transforms("ViT-B-32")
    folder = tmp_path_factory.mktemp("vitb32") / "ckpt"
    save_checkpoint(model, folder, open_clip.get_model_config("ViT-B-32"), arch="ViT-B-32")
    return model.eval(), transform, open_clip.get_tokenizer("ViT-B-32"), folder


def _reference(vit_b32, files, captions, references=None):
    """Per-image CLIPScore (and RefCLIPScore) computed the reference's way: prefixed texts,
    L2-normalised features, w = 2.5; the text side is max over references, clipped at 0
    as the paper writes it."""
    import torch
    from PIL import Image

    model, transform, tokenizer, _ = vit_b32
    with torch.no_grad():
        pics = torch.stack([transform(Image.open(f).convert("RGB")) for f in files])
        img = model.encode_image(pics).numpy()
        txt = model.encode_text(tokenizer(["A photo depicts " + c for c in captions])).numpy()
        img /= np.linalg.norm(img, axis=1, keepdims=True)
        txt /= np.linalg.norm(txt, axis=1, keepdims=True)
        clip = 2.5 * np.clip(np.sum(img * txt, axis=1), 0, None)
        if references is None:
            return clip, None
        ref = model.encode_text(tokenizer(["A photo depicts " + r for r in references])).numpy()
        ref /= np.linalg.norm(ref, axis=1, keepdims=True)
        text_side = np.maximum((txt @ ref.T).max(axis=1), 0)
        return clip, 2 * clip * text_side / (clip + text_side)


def test_prefix_is_the_references_and_gets_its_space():
    from cliplens.cli.score import DEFAULT_PREFIX

    assert PREFIX == DEFAULT_PREFIX == "A photo depicts "
    assert prefixed(["a dog"]) == ["A photo depicts a dog"]
    assert prefixed(["a dog"], "An image of") == ["An image of a dog"]
    assert prefixed(["a dog"], "") == ["a dog"]


def test_score_equals_the_reference_on_the_same_weights(capsys, photos, vit_b32, tmp_path):
    files = sorted(photos.glob("*.jpg"))[:4]
    refs = ["a dog running on grass", "a brown dog", "a cat on a sofa"]
    (tmp_path / "refs.txt").write_text("\n".join(refs) + "\n")
    args = ["--model", f"local:{vit_b32[3]}", "--precision", "fp32", "-f", "json"]
    scored = ["score", *map(str, files), "-p", "a dog running"]
    out = run_json(capsys, [*scored, "--refs", str(tmp_path / "refs.txt"), *args])
    clip, harmonic = _reference(vit_b32, files, ["a dog running"] * len(files), refs)
    assert clip.max() > 0  # the comparison is not between zeros
    np.testing.assert_allclose([r["clip_score"] for r in out["images"]], clip, atol=1e-4)
    np.testing.assert_allclose([r["ref_clip_score"] for r in out["images"]], harmonic, atol=1e-4)
    # the raw text (--prefix "") is another number, and it is open_clip's without the prefix
    raw = run_json(capsys, [*scored, "--prefix", "", *args])
    model, transform, tokenizer, _ = vit_b32
    import torch
    from PIL import Image

    pics = torch.stack([transform(Image.open(f).convert("RGB")) for f in files])
    with torch.no_grad():
        img = model.encode_image(pics)
        txt = model.encode_text(tokenizer(["a dog running"]))
    cos = torch.nn.functional.cosine_similarity(img, txt).numpy()
    np.testing.assert_allclose([r["cosine"] for r in raw["images"]], cos, atol=1e-4)
    assert not np.allclose([r["clip_score"] for r in raw["images"]], clip, atol=1e-3)


def test_captions_file_and_rerank_use_the_prefix(capsys, photos, vit_b32, tmp_path):
    import json

    files = sorted(photos.glob("*.jpg"))[:2]
    rows = [
        {"image": str(files[0]), "caption": "a rocket", "references": ["a rocket on its pad"]},
        {"image": str(files[1]), "caption": "a cup", "references": ["coffee", "a mug"]},
    ]
    (tmp_path / "c.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = ["--model", f"local:{vit_b32[3]}", "--precision", "fp32", "-f", "json"]
    out = run_json(capsys, ["score", "--captions", str(tmp_path / "c.jsonl"), *args])
    for row, r, f in zip(out["images"], rows, files, strict=True):
        clip, harmonic = _reference(vit_b32, [f], [r["caption"]], r["references"])
        assert row["clip_score"] == pytest.approx(float(clip[0]), abs=1e-4)
        assert row["ref_clip_score"] == pytest.approx(float(harmonic[0]), abs=1e-4)
    ranked = run_json(capsys, ["rerank", "a rocket", *map(str, files), *args])
    clip, _ = _reference(vit_b32, files, ["a rocket"] * 2)
    by_path = {str(f.resolve()): float(c) for f, c in zip(files, clip, strict=True)}
    assert all(r["clip_score"] == pytest.approx(by_path[r["path"]], abs=1e-4) for r in ranked)
