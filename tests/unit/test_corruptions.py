"""Corruptions for robust training: each changes the image, more at higher severity."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from cliplens.corruptions import (
    CORRUPTIONS,
    corrupt,
    parse_corruptions,
    parse_severities,
)
from cliplens.errors import InvalidInputError


@pytest.fixture(scope="module")
def image():
    from cliplens.datasets.shapes import sample

    return Image.fromarray(sample(0, 3, size=64).image)


@pytest.mark.parametrize("kind", CORRUPTIONS)
def test_damage_grows_with_severity_and_keeps_the_size(image, kind):
    clean = np.asarray(image, np.float32)
    damage = []
    for level in (1, 3, 5):
        out = corrupt(image, kind, level, np.random.default_rng(0))
        assert out.size == image.size and out.mode == "RGB"
        damage.append(np.abs(np.asarray(out, np.float32) - clean).mean())
    assert damage[0] > 0
    assert damage[0] < damage[1] < damage[2]


def test_same_generator_state_same_output(image):
    a = corrupt(image, "noise", 3, np.random.default_rng(7))
    b = corrupt(image, "noise", 3, np.random.default_rng(7))
    c = corrupt(image, "noise", 3, np.random.default_rng(8))
    assert np.array_equal(np.asarray(a), np.asarray(b))
    assert not np.array_equal(np.asarray(a), np.asarray(c))


def test_parsing_and_errors(image):
    assert parse_corruptions("blur, noise,blur") == ("blur", "noise")
    assert parse_severities("1-5") == (1, 2, 3, 4, 5)
    assert parse_severities("3,5") == (3, 5)
    for bad in ("0-5", "x", "6", ""):
        with pytest.raises(InvalidInputError, match="severity"):
            parse_severities(bad)
    with pytest.raises(InvalidInputError, match="fog"):
        parse_corruptions("blur,fog")
    with pytest.raises(InvalidInputError, match="corruption 'fog'"):
        corrupt(image, "fog", 1, np.random.default_rng(0))
