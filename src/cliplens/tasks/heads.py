"""Trained moderation heads on embeddings: a probability that an image is to be flagged.

- `LinearHead`: logistic regression (cliplens's own, scikit-learn, class-balanced).
- `MlpHead`: the architecture of LAION's CLIP-based NSFW detectors
  (LAION-AI/CLIP-based-NSFW-Detector, `src/models.py`): the embedding standardised by the
  training set's mean and variance, then Dense layers with ReLU and a sigmoid output. For
  ViT-B/32's 512-d embeddings (and any width other than 768) 512-32-32-1 with dropout 0.5
  after the second layer; for ViT-L/14's 768-d 768-64-512-256-1 without dropout
  (`laion_layout`). LAION fitted theirs with AutoKeras; cliplens fits the same layers with
  Adam on a class-balanced binary cross-entropy.

Both evaluate with NumPy alone (moderation needs no torch to apply a head) and are kept as
plain arrays in an .npz; a file without a "kind" is a linear head (the older layout).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

import numpy as np

from cliplens.errors import InvalidInputError
from cliplens.store.npz import load_arrays, save_arrays
from cliplens.tasks.policy import PolicyError

# which head `train_head` fits: logistic regression, or LAION's MLP
HeadKind = Literal["linear", "mlp"]
HEAD_KINDS: tuple[HeadKind, ...] = get_args(HeadKind)
_NORM_EPS = 1e-10  # LAION's Normalization: (x - mean) / (sqrt(variance) + 1e-10)


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.clip(z, -50, 50)))


@dataclass(frozen=True)
class LinearHead:
    """A logistic-regression head on embeddings: p = sigmoid(x . w + b)."""

    weights: np.ndarray  # (D,)
    bias: float
    model_id: str
    metrics: dict[str, float] = field(default_factory=dict)

    def probability(self, vectors: np.ndarray) -> np.ndarray:
        return _sigmoid(vectors @ self.weights + self.bias)

    def save(self, path: str | Path) -> Path:
        arrays = {"weights": self.weights, "bias": self.bias, "model_id": self.model_id}
        return save_arrays(path, self.metrics, kind="linear", **arrays)

    @classmethod
    def load(cls, path: str | Path) -> LinearHead:
        head = load_head(path)
        if not isinstance(head, LinearHead):
            raise PolicyError(f"head {path}: an MLP head, not a linear one")
        return head


@dataclass(frozen=True)
class MlpHead:
    """LAION's NSFW detector's layers: standardise, then Dense + ReLU, a sigmoid last."""

    mean: np.ndarray  # (D,)
    variance: np.ndarray  # (D,)
    layers: tuple[tuple[np.ndarray, np.ndarray], ...]  # (weight (out, in), bias (out,))
    model_id: str
    metrics: dict[str, float] = field(default_factory=dict)

    @property
    def shapes(self) -> list[tuple[int, int]]:
        """(in, out) of each Dense layer, e.g. [(512, 32), (32, 32), (32, 1)]."""
        return [(w.shape[1], w.shape[0]) for w, _ in self.layers]

    def probability(self, vectors: np.ndarray) -> np.ndarray:
        x = (np.asarray(vectors, np.float64) - self.mean) / (np.sqrt(self.variance) + _NORM_EPS)
        for w, b in self.layers[:-1]:
            x = np.maximum(x @ w.T + b, 0.0)
        w, b = self.layers[-1]
        return _sigmoid(x @ w.T + b)[:, 0]

    def save(self, path: str | Path) -> Path:
        arrays = {"mean": self.mean, "variance": self.variance, "model_id": self.model_id}
        for i, (w, b) in enumerate(self.layers):
            arrays |= {f"w{i}": w, f"b{i}": b}
        return save_arrays(path, self.metrics, kind="mlp", **arrays)


Head = LinearHead | MlpHead


def load_head(path: str | Path) -> Head:
    """A head saved by `LinearHead.save` or `MlpHead.save`."""
    try:
        a, metrics = load_arrays(path, "head")
        kind = str(a["kind"]) if "kind" in a else "linear"
        model_id = str(a["model_id"])
        if kind == "linear":
            return LinearHead(a["weights"], float(a["bias"]), model_id, metrics)
        if kind != "mlp":
            raise InvalidInputError(f"head {path}: unknown kind '{kind}' (not a cliplens head)")
        n = sum(1 for k in a if k.startswith("w"))
        layers = tuple((a[f"w{i}"], a[f"b{i}"]) for i in range(n))
        return MlpHead(a["mean"], a["variance"], layers, model_id, metrics)
    except (InvalidInputError, KeyError) as e:
        hint = " (train it with 'cliplens moderate train-head')"
        raise PolicyError(str(e).split(" (")[0] + hint) from e


def laion_layout(dim: int) -> tuple[tuple[int, ...], float]:
    """(hidden widths, dropout after the second hidden layer) of LAION's detector for
    embeddings of width `dim`: L/14's for 768, B/32's for every other width."""
    if dim == 768:
        return (64, 512, 256), 0.0
    return (32, 32), 0.5


def fit_mlp(
    x: np.ndarray, y: np.ndarray, model_id: str, seed: int = 0, epochs: int = 20
) -> MlpHead:
    """LAION's layers fitted on embeddings `x` and 0/1 labels `y`: Adam (lr 1e-3), batches
    of 32, binary cross-entropy with each class weighted by n / (2 n_class)."""
    # heavy: torch loads only where an MLP head is fitted
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # layers this small run several times faster on one thread
    try:
        return _fit_mlp(torch, x, y, model_id, seed, epochs)
    finally:
        torch.set_num_threads(threads)


def _fit_mlp(
    torch: Any, x: np.ndarray, y: np.ndarray, model_id: str, seed: int, epochs: int
) -> MlpHead:
    hidden, dropout = laion_layout(x.shape[1])
    mean, variance = x.mean(axis=0), x.var(axis=0)
    z = torch.from_numpy(((x - mean) / (np.sqrt(variance) + _NORM_EPS)).astype(np.float32))
    target = torch.from_numpy(y.astype(np.float32))
    counts = np.bincount(y, minlength=2)
    weight = torch.from_numpy((len(y) / (2.0 * counts[y])).astype(np.float32))
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    widths = (x.shape[1], *hidden)
    modules: list[torch.nn.Module] = []
    for i, (a, b) in enumerate(itertools.pairwise(widths)):
        modules += [torch.nn.Linear(a, b), torch.nn.ReLU()]
        if i == 1 and dropout:
            modules.append(torch.nn.Dropout(dropout))
    net = torch.nn.Sequential(*modules, torch.nn.Linear(widths[-1], 1))
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-3)
    net.train()
    for _ in range(epochs):
        order = torch.randperm(len(z), generator=generator)
        for start in range(0, len(z), 32):
            idx = order[start : start + 32]
            logits = net(z[idx])[:, 0]
            loss = torch.nn.functional.binary_cross_entropy_with_logits(
                logits, target[idx], weight=weight[idx]
            )
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    linears = [m for m in net if isinstance(m, torch.nn.Linear)]
    layers = tuple(
        (m.weight.detach().double().numpy(), m.bias.detach().double().numpy()) for m in linears
    )
    return MlpHead(mean, variance, layers, model_id)
