"""The bundled offline model on real photos: it must give meaningful answers."""

from __future__ import annotations

import numpy as np
import pytest

from cliplens import classify, load_model
from cliplens.errors import ModelIntegrityError
from cliplens.models import offline as offline_mod

LABELS = ["cat", "dog", "car", "coffee", "rocket", "horse", "astronaut"]


def test_cat_photo_ranks_cat_first(offline, photos):
    res = classify(offline, [str(photos / "cat.jpg")], LABELS)
    assert res.predictions[0].top == "cat"


@pytest.mark.parametrize(("photo", "label"), [("coffee.jpg", "coffee"), ("rocket.jpg", "rocket")])
def test_other_photos(offline, photos, photo, label):
    assert classify(offline, [str(photos / photo)], LABELS).predictions[0].top == label


def test_text_search_finds_the_cat(offline, photos):
    files = sorted(str(p) for p in photos.iterdir())
    emb = offline.encode_images(files)
    query = offline.encode_texts(["a photo of a cat"])[0]
    assert files[int(np.argmax(emb @ query))].endswith("cat.jpg")


def test_embeddings_contract(offline, photos):
    emb = offline.encode_images([str(photos / "cat.jpg"), str(photos / "coffee.jpg")])
    assert emb.shape == (2, 384) and emb.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1, atol=1e-5)
    assert offline.info.model_id.startswith("offline-conse-k10@")


def test_bf16_agrees_with_fp32_on_real_photos(photos):
    files = sorted(str(p) for p in photos.iterdir())
    fp32 = load_model("offline", device="cpu", precision="fp32")
    bf16 = load_model("offline", device="cpu", precision="bf16")
    a, b = fp32.encode_images(files), bf16.encode_images(files)
    cos = (a * b).sum(1)
    assert cos.min() >= 0.999, cos
    t = ["a photo of a cat", "a cup of coffee", "a rocket on the launch pad"]
    assert (fp32.encode_texts(t) * bf16.encode_texts(t)).sum(1).min() >= 0.999


def test_class_table_reads_as_sentences():
    rows = offline_mod.read_class_table()
    assert len(rows) == 1000
    dogs = [r for r in rows if 151 <= int(r["index"]) <= 268]
    assert all(r["kind"] == "dog" for r in dogs)
    assert {r["kind"] for r in rows if 281 <= int(r["index"]) <= 285} == {"cat"}


def test_corrupted_weights_are_refused(monkeypatch, tmp_path):
    fake = tmp_path / "mobilenet_v2-b0353104.pth"
    fake.write_bytes(b"not the published weights")
    monkeypatch.setattr(offline_mod, "mobilenet_weights", lambda: fake)
    with pytest.raises(ModelIntegrityError, match="sha256"):
        load_model("offline", device="cpu")


def test_demo_photos_get_their_labels(offline, photos):
    """What `make demo` prints: every demo photo's top label is the right one."""
    from pathlib import Path

    from cliplens.datasets.photos import expected_labels

    makefile = (Path(__file__).parents[2] / "Makefile").read_text()
    line = next(x for x in makefile.splitlines() if x.startswith("DEMO_LABELS"))
    labels = line.split("?=", 1)[1].strip().split(",")
    truth = expected_labels()
    res = classify(offline, [str(photos / name) for name in truth], labels)
    got = {Path(p.path).name: p.top for p in res.predictions}
    assert got == truth


def test_minilm_matches_sentence_transformers():
    """Our pooling over transformers equals the sentence-transformers pipeline it replaces."""
    import torch
    from sentence_transformers import SentenceTransformer

    texts = ["a photo of a cat", "a Pekingese, a kind of dog", "espresso"]
    ours = offline_mod.MiniLM(offline_mod.minilm_dir(), torch.device("cpu"), torch.float32)
    with torch.inference_mode():
        a = torch.nn.functional.normalize(ours(texts), dim=-1).numpy()
    b = SentenceTransformer(str(offline_mod.minilm_dir()), device="cpu").encode(
        texts, normalize_embeddings=True
    )
    np.testing.assert_allclose(a, b, atol=1e-5)
