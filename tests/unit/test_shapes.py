"""The procedural captioned shapes dataset: deterministic, truthful captions, held-out pairs."""

from __future__ import annotations

import json

import numpy as np

from cliplens.cli.main import main
from cliplens.datasets.shapes import (
    COLOURS,
    HELDOUT,
    SHAPES,
    Shape,
    class_names,
    named_objects,
    names_all_objects,
    sample,
    write_shapes,
)


def test_same_seed_same_bytes_other_seed_other_image():
    a, b = sample(0, 7), sample(0, 7)
    assert a.caption == b.caption and np.array_equal(a.image, b.image)
    assert not np.array_equal(sample(1, 7).image, a.image)
    assert a.image.shape == (64, 64, 3) and a.image.dtype == np.uint8
    assert sample(0, 7, size=96).image.shape == (96, 96, 3)


def test_captions_say_what_is_drawn_and_where():
    for i in range(300):
        s = sample(3, i)
        for obj in s.objects:
            assert obj.phrase in s.caption
            # the shape's colour is painted at its centre
            h, w, _ = s.image.shape
            px = s.image[int(obj.y * h), int(obj.x * w)]
            assert tuple(px) == COLOURS[obj.colour], (s.caption, obj, px)
        if len(s.objects) == 2:
            a, b = s.objects
            dx, dy = b.x - a.x, b.y - a.y
            if "to the left of" in s.caption:
                assert dx > 0 and abs(dx) >= abs(dy)
            elif "above" in s.caption:
                assert dy > 0 and abs(dy) > abs(dx)
        else:
            assert s.caption.split()[-1] in {"left", "right", "top", "bottom", "centre"}


def test_training_captions_mix_details_and_stay_truthful():
    details = {"full": 0, "sizes": 0, "bare": 0}
    for i in range(400):
        s = sample(4, i)
        bare = " and ".join(f"a {o.colour} {o.kind}" for o in s.objects)
        sizes = " and ".join(o.phrase for o in s.objects)
        kind = {s.caption: "full", sizes: "sizes", bare: "bare"}[s.train_caption]
        details[kind] += 1
        assert np.array_equal(s.image, sample(4, i).image)
    assert 160 < details["full"] < 240 and details["sizes"] > 60 and details["bare"] > 60


def test_heldout_pairs_never_appear_in_training():
    assert len(HELDOUT) == len(SHAPES)  # one colour per shape
    assert len({c for _, c in HELDOUT}) == len(SHAPES)  # each a different colour
    for i in range(1500):
        assert all((o.kind, o.colour) not in HELDOUT for o in sample(0, i, "train").objects)
        assert any((o.kind, o.colour) in HELDOUT for o in sample(0, i, "heldout").objects)


def test_write_shapes_and_cli(tmp_path, capsys):
    counts = write_shapes(tmp_path / "a", n=40, seed=2)
    assert counts == {"train": 38, "val": 2, "heldout": 2}
    rows = [json.loads(line) for line in (tmp_path / "a" / "train.jsonl").read_text().splitlines()]
    assert len(rows) == 38 and all((tmp_path / "a" / r["image"]).is_file() for r in rows)
    assert rows[0]["caption"] == sample(2, 0).train_caption
    val = json.loads((tmp_path / "a" / "val.jsonl").read_text().splitlines()[0])
    assert val["caption"] == sample(2, 38).caption  # val continues the training stream
    assert (tmp_path / "a" / "classes.txt").read_text().split("\n")[:-1] == class_names()
    prompts = (tmp_path / "a" / "templates.txt").read_text().split("\n")[:-1]
    assert len(prompts) == 15 and all("{}" in t for t in prompts)
    assert prompts[0].format("red circle") == "a small red circle on the left"
    assert main(["datasets", "shapes", str(tmp_path / "b"), "--n", "20", "--seed", "2"]) == 0
    again = (tmp_path / "b" / "train.jsonl").read_text().splitlines()
    assert [json.loads(x)["caption"] for x in again] == [r["caption"] for r in rows[:19]]
    full = [json.loads(x) for x in (tmp_path / "a" / "train-full.jsonl").read_text().splitlines()]
    assert [r["caption"] for r in full] == [sample(2, i).caption for i in range(38)]
    assert [{**r, "caption": ""} for r in full] == [{**r, "caption": ""} for r in rows]
    held = [json.loads(x) for x in (tmp_path / "a" / "heldout.jsonl").read_text().splitlines()]
    assert held[0]["caption"] == sample(2, 0, "heldout").caption  # evaluation: full detail
    assert main(["datasets", "shapes", str(tmp_path / "c"), "--n", "0"]) == 2
    assert "'--n'" in (err := capsys.readouterr().err) and "0 is not in the range" in err


def test_named_objects_reads_colour_shape_pairs():
    assert named_objects("a small red circle above a large blue star") == [
        ("red", "circle"),
        ("blue", "star"),
    ]
    assert named_objects("A red circle, and a blue square") == [
        ("red", "circle"),
        ("blue", "square"),
    ]
    assert named_objects("a circle that is red") == []  # a colour counts only before its shape
    assert named_objects("a red huge circle") == []  # only a size word may sit between
    red, blue = Shape("circle", "red", "small", 0.2, 0.5), Shape("star", "blue", "large", 0.7, 0.5)
    assert names_all_objects("a large blue star to the right of a small red circle", [red, blue])
    assert not names_all_objects("a small red circle", [red, blue])  # one missing
    assert not names_all_objects("a red star and a blue circle", [red, blue])  # swapped
    assert not names_all_objects("a red circle and a red circle and a blue star", [red, blue])
    for i in range(20):  # every full caption the dataset writes names its objects
        s = sample(0, i, "heldout")
        assert names_all_objects(s.caption, s.objects)
