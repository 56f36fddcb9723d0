"""Moderation heads: LAION's CLIP NSFW detector's MLP (LAION-AI/CLIP-based-NSFW-Detector,
src/models.py) beside the logistic regression, trained, saved, loaded and applied."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_moderate import POLICY, FakeModel, synthetic_embeddings, unit

from cliplens.cli.main import main
from cliplens.tasks.heads import LinearHead, MlpHead, fit_mlp, laion_layout, load_head
from cliplens.tasks.moderate import build_moderator, train_head
from cliplens.tasks.policy import PolicyError, load_policy
from conftest import make_photos
from tests_helpers import run_json


class LaionB32(torch.nn.Module):
    """LAION's NSFWModel_B32 as their repository builds it: Normalization (mean, variance),
    Dense 512-32 ReLU, 32-32 ReLU then Dropout(0.5), 32-1 sigmoid."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(512))
        self.register_buffer("variance", torch.ones(512))
        self.linear_1 = torch.nn.Linear(512, 32)
        self.linear_2 = torch.nn.Linear(32, 32)
        self.linear_3 = torch.nn.Linear(32, 1)
        self.dropout = torch.nn.Dropout(0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = (x - self.mean) / (self.variance.sqrt() + 1e-10)
        x = torch.relu(self.linear_1(x))
        x = self.dropout(torch.relu(self.linear_2(x)))
        return torch.sigmoid(self.linear_3(x))


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(4)
    direction = unit(*rng.standard_normal(512))
    pos = synthetic_embeddings(rng, direction, 100, 0.3)
    neg = synthetic_embeddings(rng, direction, 100, 0.0)
    return pos, neg


@pytest.fixture(scope="module")
def mlp(data):
    return train_head(*data, "fake@1", head="mlp")


def test_mlp_head_is_laions_b32_and_trains_saves_and_loads(data, mlp, tmp_path):
    pos, neg = data
    head = mlp
    assert isinstance(head, MlpHead)
    assert head.shapes == [(512, 32), (32, 32), (32, 1)]
    assert head.metrics["cv_accuracy"] > 0.9 and head.metrics["cv_roc_auc"] > 0.95
    # LAION's module, given these weights in its own layout, scores as the head does
    laion = LaionB32().double().eval()
    (w1, b1), (w2, b2), (w3, b3) = head.layers
    state = {"mean": head.mean, "variance": head.variance, "linear_1.weight": w1}
    state |= {"linear_1.bias": b1, "linear_2.weight": w2, "linear_2.bias": b2}
    state |= {"linear_3.weight": w3, "linear_3.bias": b3}
    laion.load_state_dict({k: torch.from_numpy(np.asarray(v)) for k, v in state.items()})
    x = np.r_[pos[:20], neg[:20]]
    with torch.no_grad():
        theirs = laion(torch.from_numpy(x.astype(np.float64)))[:, 0].numpy()
    np.testing.assert_allclose(head.probability(x), theirs, atol=1e-6)
    again = load_head(head.save(tmp_path / "h.head.npz"))
    assert isinstance(again, MlpHead) and again.model_id == "fake@1"
    np.testing.assert_array_equal(again.probability(x), head.probability(x))
    assert again.metrics == head.metrics
    with pytest.raises(PolicyError, match="an MLP head, not a linear one"):
        LinearHead.load(tmp_path / "h.head.npz")
    with pytest.raises(ValueError, match="`head` svm: linear or mlp"):
        train_head(pos, neg, "fake@1", head="svm")  # type: ignore[arg-type]


def test_l14_embeddings_get_laions_l14_layers():
    assert laion_layout(768) == ((64, 512, 256), 0.0)
    assert laion_layout(512) == laion_layout(64) == ((32, 32), 0.5)
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((8, 768)), np.r_[np.ones(4, int), np.zeros(4, int)]
    assert fit_mlp(x, y, "l14@1", epochs=1).shapes == [(768, 64), (64, 512), (512, 256), (256, 1)]


def test_policy_flags_by_an_mlp_head(data, mlp, tmp_path):
    pos, neg = data
    path = mlp.save(tmp_path / "p.head.npz")
    policy_file = tmp_path / "p.yaml"
    policy_file.write_text(POLICY + f"head:\n  file: {path.name}\n  threshold: 0.5\n")
    rng = np.random.default_rng(5)
    model = FakeModel({k: unit(*rng.standard_normal(512)) for k in ("bad", "worse", "special")})
    mod = build_moderator(load_policy(policy_file), model)
    vectors = np.r_[pos[:30], neg[:30]]
    probs = load_head(path).probability(vectors)
    verdicts = mod.judge(["p"] * 60, vectors)
    assert [v.head_probability for v in verdicts] == pytest.approx(probs.tolist(), abs=1e-6)
    assert all(v.flagged for v, p in zip(verdicts, probs, strict=True) if p >= 0.5)
    assert sum(v.flagged for v in verdicts[:30]) >= 25


def test_train_head_cli_fits_an_mlp(tmp_path, tiny_model_dir, capsys):
    pos, neg = tmp_path / "pos", tmp_path / "neg"
    make_photos(pos, 6, seed=1)
    make_photos(neg, 6, seed=2)
    args = ["moderate", "train-head", "--positive", str(pos), "--negative", str(neg)]
    args += ["--model", f"local:{tiny_model_dir}", "--db", str(tmp_path / "c.db")]
    report = run_json(
        capsys, [*args, "--out", str(tmp_path / "m.yaml"), "--head", "mlp", "-f", "json"]
    )
    head = load_head(report["head"])
    assert isinstance(head, MlpHead) and head.shapes[-1] == (32, 1)
    assert report["metrics"]["positives"] == 6
    assert main([*args, "--out", str(tmp_path / "x.yaml"), "--head", "svm"]) == 2
    assert "--head svm: linear or mlp" in capsys.readouterr().err
