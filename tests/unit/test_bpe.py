"""CLIP's BPE from SQLite tables (models.bpe) against `tokenizers` itself."""

from __future__ import annotations

import functools
import itertools
import json
import random
import string
import subprocess
import sys

import numpy as np
import pytest
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers

from cliplens.models import bpe
from cliplens.models.bpe import TextTokenizer, table_path, write_tables
from cliplens.models.offline import read_class_table
from cliplens.models.onnx_text import save_tokenizer


@functools.cache
def clip_tokenizer(pad_to_context: bool) -> Tokenizer:
    import open_clip  # its BPE vocabulary ships with the package

    from cliplens.models.openclip import _clip_tokenizer

    return _clip_tokenizer(open_clip.get_tokenizer("ViT-B-32"), 77, pad_to_context)


def texts(n: int) -> list[str]:
    """Label-like phrases from ImageNet's class names and CLIP's own words, mixed cases,
    punctuation, digits, contractions, runs of symbols, and random printable ASCII."""
    rng = random.Random(0)
    vocab = json.loads(clip_tokenizer(False).to_str())["model"]["vocab"]
    words = [t[:-4] for t in vocab if t.endswith("</w>") and t[:-4].isascii() and t[:-4].isalpha()]
    labels = [row["text"] for row in read_class_table() if row["text"].isascii()]
    out = []
    for i in range(n):
        kind = i % 4
        if kind == 0:
            out.append(rng.choice(labels))
        elif kind == 1:
            phrase = " ".join(rng.choice(words) for _ in range(rng.randint(1, 14)))
            out.append(phrase.title() if i % 3 == 0 else phrase)
        elif kind == 2:
            glue = rng.choice(["'s ", "'re ", "'ll ", "n't ", ", ", "!! ", " 35mm ", "... "])
            out.append(glue.join(rng.choice(words) for _ in range(rng.randint(1, 6))))
        else:
            alphabet = string.ascii_letters + string.digits + string.punctuation + "    "
            out.append("".join(rng.choice(alphabet) for _ in range(rng.randint(0, 80))))
    return out


@pytest.mark.parametrize("pad_to_context", [True, False])
def test_the_tables_give_the_ids_and_masks_tokenizers_gives(tmp_path, pad_to_context):
    hf = clip_tokenizer(pad_to_context)
    save_tokenizer(hf, tmp_path / "t.json")
    assert table_path(tmp_path / "t.json").exists()
    ours = TextTokenizer(tmp_path / "t.json")
    assert ours.tables is not None
    batch = [*texts(2400), " ".join(["a long caption of a crowded street"] * 20)]
    assert all(bpe.handles(t) for t in batch)
    for start in range(0, len(batch), 7):  # batches of mixed lengths: padding and masks
        part = batch[start : start + 7]
        ids, mask = ours(part)
        want = hf.encode_batch(part)
        np.testing.assert_array_equal(ids, [e.ids for e in want], err_msg=str(part))
        np.testing.assert_array_equal(mask, [e.attention_mask for e in want])
    assert ours._tokenizer is None  # every one of them came from the tables


def test_other_text_goes_through_tokenizers_with_the_same_ids(tmp_path):
    hf = clip_tokenizer(False)
    save_tokenizer(hf, tmp_path / "t.json")
    ours = TextTokenizer(tmp_path / "t.json")
    batch = ["café crème", "東京タワー", "a 🐱", "tab\there", "a photo of a cat"]
    ids, mask = ours(batch)
    want = hf.encode_batch(batch)
    np.testing.assert_array_equal(ids, [e.ids for e in want])
    np.testing.assert_array_equal(mask, [e.attention_mask for e in want])
    assert ours._tokenizer is not None


def test_a_one_shot_ascii_query_does_not_load_tokenizers(tmp_path):
    save_tokenizer(clip_tokenizer(True), tmp_path / "t.json")
    want = clip_tokenizer(True).encode("a photo of a cat").ids
    code = (
        "import sys; from pathlib import Path; from cliplens.models.bpe import TextTokenizer\n"
        f"ids, _ = TextTokenizer(Path({str(tmp_path / 't.json')!r}))(['a photo of a cat'])\n"
        "print(ids[0].tolist(), 'tokenizers' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == f"{want} False"


def test_no_tables_for_a_tokenizer_of_another_shape(tmp_path):
    vocab = {"[UNK]": 0, "a": 1, "b": 2, "ab": 3}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[("a", "b")], unk_token="[UNK]"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    save_tokenizer(tok, tmp_path / "t.json")
    assert not table_path(tmp_path / "t.json").exists()
    ours = TextTokenizer(tmp_path / "t.json")
    ids, _ = ours(["AB ab"])
    assert ids.tolist() == [[3, 3]]  # lower-cased by its normalizer, which tables lack
    assert ours.tables is None


def test_tables_that_would_give_other_ids_are_not_kept(tmp_path, monkeypatch):
    save_tokenizer(clip_tokenizer(True), tmp_path / "t.json")
    table_path(tmp_path / "t.json").unlink()
    # a wrong reading of the pre-tokenizer: digits in runs instead of one at a time
    wrong = {**bpe._ASCII_CLASSES, r"[\p{N}]": "[0-9]+"}
    monkeypatch.setattr(bpe, "_ASCII_CLASSES", wrong)
    assert not write_tables(tmp_path / "t.json")
    assert not table_path(tmp_path / "t.json").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["t.json"]  # no temporary file left


def test_unreadable_tables_fall_back_to_tokenizers(tmp_path):
    hf = clip_tokenizer(False)
    save_tokenizer(hf, tmp_path / "t.json")
    table_path(tmp_path / "t.json").write_bytes(b"not a database")
    ours = TextTokenizer(tmp_path / "t.json")
    ids, _ = ours(["a photo of a cat"])
    assert ids[0].tolist() == hf.encode("a photo of a cat").ids


def test_the_word_cache_stays_bounded(tmp_path, monkeypatch):
    save_tokenizer(clip_tokenizer(False), tmp_path / "t.json")
    ours = TextTokenizer(tmp_path / "t.json")
    monkeypatch.setattr(bpe, "MAX_CACHED", 50)
    words = ["".join(w) for w in itertools.islice(itertools.product("abcdefghij", repeat=3), 120)]
    ids, _ = ours(words)
    assert ours.tables is not None and 0 < len(ours.tables._cache) <= 50  # of 120 words
    want = clip_tokenizer(False).encode_batch(words)
    np.testing.assert_array_equal(ids, [e.ids for e in want])
