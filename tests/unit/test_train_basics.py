"""Training basics: contrastive losses against hand computation, data readers' errors."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from cliplens.train.data import DataError, read_labelled_pairs, read_pairs
from cliplens.train.loss import clip_loss, siglip_loss


def test_clip_loss_matches_a_hand_computed_case():
    image = torch.tensor([[1.0, 0.0], [0.6, 0.8]])
    text = torch.tensor([[0.8, 0.6], [0.0, 1.0]])
    scale = torch.tensor(10.0)
    sims = np.array([[0.8, 0.0], [0.96, 0.8]])  # image @ text.T, by hand
    logits = 10 * sims

    def ce(rows):  # mean cross-entropy with the diagonal as the answer
        return np.mean([-(r[i] - math.log(np.exp(r).sum())) for i, r in enumerate(rows)])

    expected = (ce(logits) + ce(logits.T)) / 2
    assert clip_loss(image, text, scale).item() == pytest.approx(expected, rel=1e-6)
    # symmetric in its two towers
    assert clip_loss(text, image, scale).item() == pytest.approx(expected, rel=1e-6)


def test_clip_loss_rewards_alignment():
    rng = torch.Generator().manual_seed(0)
    x = torch.nn.functional.normalize(torch.randn(8, 16, generator=rng), dim=-1)
    y = torch.nn.functional.normalize(torch.randn(8, 16, generator=rng), dim=-1)
    scale = torch.tensor(100.0)
    assert clip_loss(x, x, scale) < 0.01 < clip_loss(x, y, scale)
    assert clip_loss(x, x[torch.randperm(8, generator=rng)], scale) > 1.0


def test_siglip_loss_matches_a_hand_computed_case():
    image = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    text = torch.tensor([[1.0, 0.0], [0.6, 0.8]])
    scale, bias = torch.tensor(10.0), torch.tensor(-5.0)
    sims = np.array([[1.0, 0.6], [0.0, 0.8]])
    z = 10 * sims - 5
    signs = np.array([[1, -1], [-1, 1]])
    expected = -np.log(1 / (1 + np.exp(-signs * z))).sum() / 2
    assert siglip_loss(image, text, scale, bias).item() == pytest.approx(expected, rel=1e-6)


def write_image(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), "red").save(path)
    return path


def test_readers_for_jsonl_csv_and_caption_folders(tmp_path):
    write_image(tmp_path / "img" / "a.png")
    write_image(tmp_path / "img" / "b.png")
    (tmp_path / "d.jsonl").write_text(
        '{"image": "img/a.png", "caption": "a red square", "extra": 1}\n\n'
        '{"image": "img/b.png", "caption": "another"}\n'
    )
    pairs = read_pairs(tmp_path / "d.jsonl")
    assert [p.caption for p in pairs] == ["a red square", "another"]
    assert pairs[0].image == (tmp_path / "img" / "a.png").resolve()
    (tmp_path / "d.csv").write_text('filepath,title\nimg/a.png,"a red, square"\n')
    assert read_pairs(tmp_path / "d.csv")[0].caption == "a red, square"
    (tmp_path / "img" / "a.txt").write_text("sidecar caption\n")
    (tmp_path / "img" / "b.txt").write_text("second\n")
    assert [p.caption for p in read_pairs(tmp_path / "img")] == ["sidecar caption", "second"]


def test_labelled_pairs_are_read_once_whatever_the_captions_hold(tmp_path):
    """U+2028 (and the other breaks str.splitlines knows) inside a caption is text, not a
    row break: the labels line up with the rows read_pairs gives."""
    write_image(tmp_path / "a.png")
    rows = [
        {"image": "a.png", "caption": "line\u2028separated", "label": " cat "},
        {"image": "a.png", "caption": "form\x0cfeed and \x85 next line"},
        {"image": "a.png", "caption": "para\u2029graph", "label": 7},
        {"image": "a.png", "caption": "plain", "label": "dog"},
    ]
    path = tmp_path / "labelled.jsonl"
    # ensure_ascii=False: the separators are written as themselves, not as \u escapes
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), "utf-8")
    got = read_labelled_pairs(path)
    assert [p for p, _ in got] == read_pairs(path)
    assert [(p.caption, label) for p, label in got] == [
        ("line\u2028separated", "cat"),
        ("form\x0cfeed and \x85 next line", ""),
        ("para\u2029graph", ""),
        ("plain", "dog"),
    ]
    path.write_text('{"image": "a.png", "caption": "x", "label": "cat"}\n{"image": "a.png"\n')
    with pytest.raises(DataError, match="row 2: not valid JSON"):
        read_labelled_pairs(path)
    with pytest.raises(DataError, match="no such file"):
        read_labelled_pairs(tmp_path / "missing.jsonl")


@pytest.mark.parametrize(
    ("name", "text", "message"),
    [
        (
            "d.jsonl",
            '{"image": "a.png", "caption": "x"}\n{"image": "a.png"\n',
            "row 2: not valid JSON",
        ),
        (
            "d.jsonl",
            '{"image": "a.png", "caption": "x"}\n{"image": "a.png"}\n',
            "row 2: no caption",
        ),
        ("d.jsonl", '{"image": "a.png", "caption": ""}\n', "row 1: 'caption' must be a non-empty"),
        ("d.jsonl", '["a.png", "x"]\n', "row 1: expected an object"),
        (
            "d.jsonl",
            '{"image": "gone.png", "caption": "x"}\n',
            "row 1: image gone.png does not exist",
        ),
        ("d.csv", "image,caption\na.png,x\na.png,y,z\n", "row 3: more fields than the header"),
        ("d.csv", "picture,words\na.png,x\n", "row 1: the header needs an image column"),
        ("d.txt", "a.png x\n", "expected .jsonl, .csv, .tsv or a folder"),
    ],
)
def test_malformed_rows_are_errors_with_the_row_number(tmp_path, name, text, message):
    write_image(tmp_path / "a.png")
    (tmp_path / name).write_text(text)
    with pytest.raises(DataError) as err:
        read_pairs(tmp_path / name)
    assert message in str(err.value) and str(tmp_path / name) in str(err.value)


def test_caption_folder_needs_a_caption_per_image(tmp_path):
    write_image(tmp_path / "f" / "a.png")
    with pytest.raises(DataError, match=r"a\.png: no caption file a\.txt"):
        read_pairs(tmp_path / "f")


def test_sharded_loss_in_one_process_is_the_plain_loss():
    from cliplens.train.loss import sharded_loss

    g = torch.Generator().manual_seed(1)
    x = torch.nn.functional.normalize(torch.randn(6, 8, generator=g), dim=-1)
    y = torch.nn.functional.normalize(torch.randn(6, 8, generator=g), dim=-1)
    s, b = torch.tensor(20.0), torch.tensor(-3.0)
    assert sharded_loss("clip", x, y, s).item() == pytest.approx(clip_loss(x, y, s).item())
    assert sharded_loss("siglip", x, y, s, b).item() == pytest.approx(
        siglip_loss(x, y, s, b).item()
    )


def _shard(path, samples):
    import io
    import tarfile

    with tarfile.open(path, "w") as tar:
        for name, payload in samples:
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))


def _png(colour) -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (8, 8), colour).save(buf, format="PNG")
    return buf.getvalue()


def test_webdataset_shards_with_brace_patterns(tmp_path):
    from cliplens.train.data import expand_shards

    assert expand_shards("a-{08..10}.tar") == ["a-08.tar", "a-09.tar", "a-10.tar"]
    assert expand_shards("{x,y}-{0..1}.tar") == ["x-0.tar", "x-1.tar", "y-0.tar", "y-1.tar"]
    _shard(
        tmp_path / "s-0.tar",
        [
            ("k1.png", _png("red")),
            ("k1.txt", b"a red square"),
            ("d/k2.jpg", _png("blue")),
            ("d/k2.json", b'{"caption": "a blue square"}'),
        ],
    )
    _shard(tmp_path / "s-1.tar", [("k3.txt", b"a green square"), ("k3.webp", _png("green"))])
    pairs = read_pairs(tmp_path / "s-{0..1}.tar")
    assert [p.caption for p in pairs] == ["a red square", "a blue square", "a green square"]
    red = np.asarray(pairs[0].source().convert("RGB"))
    assert tuple(red[0, 0]) == (255, 0, 0)
    assert str(pairs[1].image).endswith("s-0.tar/d/k2.jpg")


@pytest.mark.parametrize(
    "samples, message",
    [
        ([("k1.png", b"x")], "sample k1: no caption"),
        ([("k1.txt", b"a caption")], "sample k1: no image"),
        ([("k1.png", b"x"), ("k1.json", b"[1]")], "sample k1: .json must be an object"),
        ([("k1.png", b"x"), ("k1.txt", b"  ")], "sample k1: empty caption"),
    ],
)
def test_malformed_shards_name_the_sample(tmp_path, samples, message):
    _shard(tmp_path / "bad.tar", samples)
    with pytest.raises(DataError, match=message):
        read_pairs(tmp_path / "bad.tar")
    with pytest.raises(DataError, match=r"missing-1\.tar does not exist"):
        read_pairs(tmp_path / "missing-{1..2}.tar")
