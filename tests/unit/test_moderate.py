"""Moderation: policy files, verdict arithmetic, calibration, trained heads, redaction."""

from __future__ import annotations

import hashlib
import textwrap
from dataclasses import dataclass

import numpy as np
import pytest
from PIL import Image

from cliplens.tasks.moderate import (
    LinearHead,
    build_moderator,
    calibrate,
    choose_offset,
    redact,
    train_head,
)
from cliplens.tasks.policy import PolicyError, load_policy, parse_policy


@dataclass
class FakeInfo:
    dim: int
    model_id: str = "fake@1"
    name: str = "fake"


class FakeModel:
    """Texts embed to vectors the test chooses: moderation arithmetic without a network."""

    def __init__(self, table: dict[str, np.ndarray]) -> None:
        self.table = table
        self.info = FakeInfo(dim=len(next(iter(table.values()))))

    def encode_texts(self, texts):
        return np.stack([self.table[t] for t in texts]).astype(np.float32)


def unit(*xs: float) -> np.ndarray:
    v = np.array(xs, np.float32)
    return v / np.linalg.norm(v)


def test_default_policy_loads_with_its_model_and_note():
    policy = load_policy("default")
    assert policy.model == "ViT-B-32-256:datacomp_s34b_b86k"
    names = {c.name for c in policy.categories}
    assert {"sexual", "violence", "gore", "weapons", "drugs", "hate_symbols", "self_harm"} <= names
    assert policy.special_care and policy.adjustment == pytest.approx(0.01)
    assert "calibrate" in policy.note
    assert all(0.15 <= k.threshold <= 0.3 for _, k in policy.concepts)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("name: x\ncategories: a: b\n", "line 2: not valid YAML (mapping values are not allowed"),
        ("name: x\ncategorys: {}\n", "line 2: unknown key 'categorys'"),
        (
            "name: x\ncategories:\n  a:\n    - text: cat\n      treshold: 0.2\n",
            "line 5: unknown key 'treshold'",
        ),
        (
            "name: x\ncategories:\n  a:\n    - text: cat\n      threshold: 1.5\n",
            "line 5: category 'a' concept 'threshold' is 1.5, outside [-1, 1]",
        ),
        (
            "name: x\ncategories:\n  a:\n    - text: cat\n      threshold: high\n",
            "line 5: category 'a' concept 'threshold' must be a number",
        ),
        (
            "name: x\ncategories:\n  a:\n    - threshold: 0.2\n",
            "line 4: a concept in category 'a' needs exactly one of text or image",
        ),
        (
            "name: x\ncategories:\n  a:\n    - text: cat\n",
            "line 4: a concept in category 'a' has no threshold",
        ),
        ("name: x\nname: y\ncategories: {}\n", "line 2: duplicate key 'name'"),
        ("categories:\n  a:\n    - {text: cat, threshold: 0.2}\n", "missing 'name'"),
        ("name: x\ncategories:\n  a: []\n", "line 3: category 'a' needs a non-empty list"),
        (
            "name: x\nspecial_care:\n  adjustment: 0.9\n  concepts: [{text: a, threshold: 0.2}]\n"
            "categories:\n  a: [{text: b, threshold: 0.2}]\n",
            "line 3: special_care 'adjustment'",
        ),
    ],
)
def test_bad_policies_name_the_line_and_key(tmp_path, text, message):
    path = tmp_path / "p.yaml"
    path.write_text(text)
    with pytest.raises(PolicyError) as err:
        load_policy(path)
    assert message in str(err.value)
    assert str(path) in str(err.value)
    assert "\n" not in str(err.value)


def test_policy_round_trips_and_resolves_example_images(tmp_path):
    (tmp_path / "examples").mkdir()
    Image.new("RGB", (8, 8), "red").save(tmp_path / "examples" / "red.png")
    path = tmp_path / "p.yaml"
    path.write_text(
        textwrap.dedent("""\
        name: mine
        model: offline
        special_care:
          concepts:
            - {text: a child, threshold: 0.3}
        categories:
          colour:
            - {image: examples/red.png, threshold: 0.9}
            - {text: something red, threshold: 0.25}
        """)
    )
    policy = load_policy(path)
    image = policy.categories[0].concepts[0].image
    assert image == str((tmp_path / "examples" / "red.png").resolve())
    assert policy.adjustment == pytest.approx(0.01)  # the Stable Diffusion checker's default
    again = tmp_path / "again.yaml"
    policy.save(again)
    reloaded = load_policy(again)
    assert reloaded.categories == policy.categories
    assert reloaded.special_care == policy.special_care
    assert "examples/red.png" in again.read_text()  # kept relative to the policy


def test_missing_example_image_is_rejected(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text("name: x\ncategories:\n  a:\n    - image: nope.jpg\n      threshold: 0.5\n")
    with pytest.raises(PolicyError, match=r"line 4: example image .*nope\.jpg does not exist"):
        load_policy(path)


POLICY = """\
name: arithmetic
special_care:
  adjustment: 0.1
  concepts:
    - {text: special, threshold: 0.5}
categories:
  bad:
    - {text: bad, threshold: 0.5}
  worse:
    - {text: worse, threshold: 0.8}
"""


def arithmetic_model() -> FakeModel:
    return FakeModel(
        {"bad": unit(1, 0, 0, 0), "worse": unit(0, 1, 0, 0), "special": unit(0, 0, 1, 0)}
    )


def test_verdicts_follow_thresholds_and_special_care():
    mod = build_moderator(parse_policy(POLICY), arithmetic_model())
    plain = unit(0.45, 0, 0, np.sqrt(1 - 0.45**2))  # cos 0.45 to "bad": under 0.5
    special = unit(0.45, 0, 0.6, np.sqrt(1 - 0.45**2 - 0.36))  # and cos 0.6 to "special"
    worse = unit(0.3, 0.85, 0, np.sqrt(1 - 0.09 - 0.85**2))
    v_plain, v_special, v_worse = mod.judge(["a", "b", "c"], np.stack([plain, special, worse]))
    assert not v_plain.flagged and v_plain.category == "bad"
    assert v_plain.score == pytest.approx(0.45, abs=1e-6)
    assert v_plain.margin == pytest.approx(-0.05, abs=1e-6)
    assert v_plain.special_care is None
    # a special-care hit lowers every threshold by the adjustment: 0.45 > 0.5 - 0.1
    assert v_special.flagged and v_special.special_care == "special"
    assert v_special.threshold == pytest.approx(0.4)
    assert v_special.margin == pytest.approx(0.05, abs=1e-6)
    # the verdict names the concept furthest past (or closest to) its own threshold
    assert v_worse.flagged and (v_worse.category, v_worse.concept) == ("worse", "worse")
    assert v_worse.margin == pytest.approx(0.05, abs=1e-6)


def test_choose_offset_meets_precision_on_held_out_data():
    rng = np.random.default_rng(0)

    def sample(n):
        margins = np.r_[rng.normal(1.0, 1.0, n), rng.normal(-1.0, 1.0, n)]
        return margins, np.r_[np.ones(n, bool), np.zeros(n, bool)]

    fit_m, fit_y = sample(4000)
    test_m, test_y = sample(4000)
    for target in (0.9, 0.95, 0.99):
        point = choose_offset(fit_m, fit_y, target_precision=target)
        assert point.precision >= target
        flagged = test_m > point.offset
        held_out = (flagged & test_y).sum() / flagged.sum()
        assert abs(held_out - target) <= 0.02, (target, held_out)
        assert 0.9 < point.roc_auc < 0.95  # two unit normals 2 apart: AUC = 0.921
    point = choose_offset(fit_m, fit_y, target_recall=0.8)
    assert point.recall >= 0.8
    assert ((test_m > point.offset) & test_y).sum() / test_y.sum() == pytest.approx(0.8, abs=0.02)
    with pytest.raises(ValueError, match="exactly one"):
        choose_offset(fit_m, fit_y)


def synthetic_embeddings(rng, direction, n, strength):
    """Unit vectors whose cosine to `direction` is about `strength` (plus noise)."""
    noise = rng.standard_normal((n, len(direction)))
    noise -= np.outer(noise @ direction, direction)
    noise /= np.linalg.norm(noise, axis=1, keepdims=True)
    cos = np.clip(strength + 0.08 * rng.standard_normal(n), -0.99, 0.99)
    return (cos[:, None] * direction + np.sqrt(1 - cos[:, None] ** 2) * noise).astype(np.float32)


def test_calibrated_policy_reaches_target_precision_on_held_out_embeddings():
    rng = np.random.default_rng(1)
    dim = 32
    bad = unit(*rng.standard_normal(dim))
    model = FakeModel(
        {
            "bad": bad,
            "worse": unit(*rng.standard_normal(dim)),
            "special": unit(*rng.standard_normal(dim)),
        }
    )
    mod = build_moderator(parse_policy(POLICY), model)

    def data(n):
        return synthetic_embeddings(rng, bad, n, 0.35), synthetic_embeddings(rng, bad, n, 0.15)

    pos, neg = data(3000)
    policy, points = calibrate(mod, pos, neg, target_precision=0.95)
    assert set(points) == {"all"}
    tuned = build_moderator(policy, model)
    test_pos, test_neg = data(3000)
    flagged = np.array([v.flagged for v in tuned.judge(["x"] * 6000, np.r_[test_pos, test_neg])])
    precision = flagged[:3000].sum() / flagged.sum()
    assert abs(precision - 0.95) <= 0.02
    # per category: only the category with examples moves
    policy2, points2 = calibrate(
        mod, pos, neg, target_precision=0.95, positive_categories=["bad"] * len(pos)
    )
    assert set(points2) == {"bad"}
    assert policy2.categories[1] == mod.policy.categories[1]


def test_trained_head_cross_validates_saves_and_flags(tmp_path):
    rng = np.random.default_rng(2)
    direction = unit(*rng.standard_normal(16))
    pos = synthetic_embeddings(rng, direction, 200, 0.4)
    neg = synthetic_embeddings(rng, direction, 200, 0.0)
    head = train_head(pos, neg, "fake@1")
    assert head.metrics["cv_accuracy"] > 0.9 and head.metrics["cv_roc_auc"] > 0.95
    path = head.save(tmp_path / "h.head.npz")
    again = LinearHead.load(path)
    np.testing.assert_allclose(again.probability(pos), head.probability(pos))
    assert again.model_id == "fake@1" and again.metrics == head.metrics
    policy_file = tmp_path / "p.yaml"
    policy_file.write_text(POLICY + f"head:\n  file: {path.name}\n  threshold: 0.5\n")
    model = FakeModel({k: unit(*rng.standard_normal(16)) for k in ("bad", "worse", "special")})
    mod = build_moderator(load_policy(policy_file), model)
    verdicts = mod.judge(["p"] * 100, np.r_[pos[:50], neg[:50]])
    probs = head.probability(np.r_[pos[:50], neg[:50]])
    for v, prob in zip(verdicts, probs, strict=True):
        assert v.head_probability == pytest.approx(prob, abs=1e-6)
        if prob >= 0.5:
            assert v.flagged
        if v.flagged and v.concept == "trained head":
            assert prob >= 0.5 and v.category == "trained head"
    assert (probs[:50] >= 0.5).sum() >= 40 and (probs[50:] >= 0.5).sum() <= 10
    model.info.model_id = "other@2"
    with pytest.raises(PolicyError, match="trained on fake@1, not other@2"):
        build_moderator(load_policy(policy_file), model)


def test_redact_writes_a_blurred_copy_and_keeps_the_original(tmp_path):
    rng = np.random.default_rng(3)
    src = tmp_path / "photo.png"
    Image.fromarray(rng.integers(0, 255, (64, 80, 3), dtype=np.uint8)).save(src)
    before = hashlib.sha256(src.read_bytes()).hexdigest()
    out = redact(src, tmp_path / "out")
    second = redact(src, tmp_path / "out")
    assert out != second and out.exists() and second.exists()  # never overwrites
    assert hashlib.sha256(src.read_bytes()).hexdigest() == before
    blurred = np.asarray(Image.open(out), np.float32)
    original = np.asarray(Image.open(src), np.float32)
    assert blurred.shape == original.shape
    assert blurred.std() < original.std() / 3  # the detail is gone
