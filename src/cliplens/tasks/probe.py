"""Linear probes: multinomial logistic regression on image embeddings (or an encoder's probe
features), the CLIP paper's measure of what a representation holds, and the cheapest way
to teach a model a few classes of your own.

`fit_probe` standardises the features, picks the inverse regularisation C by stratified
cross-validation over a grid, refits on everything, and folds the scaler into one linear
map, so a probe is just (weights, bias, classes) and predicting is a matrix product.
`kshot` measures accuracy with 1, 2, 4, ... labelled images per class against zero-shot.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cliplens.errors import InvalidInputError
from cliplens.store.npz import load_arrays, save_arrays

C_GRID = (0.01, 0.1, 1.0, 10.0, 100.0)  # inverse regularisation, on standardised features
DEFAULT_C = 1.0  # where there are too few examples per class to validate


@dataclass
class LinearProbe:
    """p(class | x) = softmax(x . W^T + b)."""

    weights: np.ndarray  # (K, D)
    bias: np.ndarray  # (K,)
    classes: list[str]
    model_id: str  # the feature space it was fit in (Encoder.feature_id)
    metrics: dict[str, float] = field(default_factory=dict)

    def probabilities(self, vectors: np.ndarray) -> np.ndarray:
        z = vectors @ self.weights.T + self.bias
        z = np.exp(z - z.max(axis=1, keepdims=True))
        return z / z.sum(axis=1, keepdims=True)

    def predict(self, vectors: np.ndarray) -> list[str]:
        return [self.classes[i] for i in self.probabilities(vectors).argmax(axis=1)]

    def save(self, path: str | os.PathLike) -> Path:
        classes = np.array(self.classes, dtype=str)
        return save_arrays(path, self.metrics, weights=self.weights, bias=self.bias,
                           classes=classes, model_id=self.model_id)  # fmt: skip

    @classmethod
    def load(cls, path: str | os.PathLike) -> LinearProbe:
        a, metrics = load_arrays(path, "probe")
        try:
            return cls(a["weights"], a["bias"], a["classes"].tolist(), str(a["model_id"]), metrics)
        except KeyError as e:
            raise InvalidInputError(f"probe {path}: not a cliplens probe file (no {e})") from e


def labelled_folder(path: str | os.PathLike) -> tuple[list[Path], list[str]]:
    """(image files, class names) from a folder with one subfolder of images per class."""
    from cliplens.images import iter_image_files

    root = Path(path)
    if not root.is_dir():
        raise InvalidInputError(f"{root} is not a folder; give one subfolder of images per class")
    folders = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    files: list[Path] = []
    labels: list[str] = []
    for folder in folders:
        found = list(iter_image_files([folder]))
        files += found
        labels += [folder.name] * len(found)
    if len({*labels}) < 2:
        raise InvalidInputError(
            f"{root} needs at least two subfolders of images, one per class; found {len({*labels})}"
        )
    return files, labels


def fit_probe(
    vectors: np.ndarray,
    labels: Sequence[str],
    model_id: str,
    grid: Sequence[float] = C_GRID,
    folds: int = 5,
    seed: int = 0,
) -> LinearProbe:
    """Fit on (vectors, labels); C is chosen by stratified cross-validation over `grid`
    (metrics: cv_accuracy of the chosen C, C, folds), or DEFAULT_C when a class has a
    single example."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import GridSearchCV, StratifiedKFold
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    classes = sorted(set(labels))
    if len(classes) < 2:
        raise InvalidInputError("a probe needs examples of at least two classes")
    if len(vectors) != len(labels):
        raise InvalidInputError(f"{len(vectors)} vectors but {len(labels)} labels")
    y = np.array([classes.index(label) for label in labels])
    folds = min(folds, int(np.bincount(y).min()))
    # standardised features: embeddings of one model sit in a narrow cone, and a probe
    # looks for small differences inside it
    pipe = make_pipeline(StandardScaler(), LogisticRegression(C=DEFAULT_C, max_iter=3000))
    metrics: dict[str, float] = {"examples": float(len(y)), "classes": float(len(classes))}
    if folds >= 2 and len(grid) > 1:
        cv = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
        search = GridSearchCV(pipe, {"logisticregression__C": list(grid)}, cv=cv)
        search.fit(vectors, y)
        clf = search.best_estimator_
        metrics.update(cv_accuracy=float(search.best_score_), folds=float(folds),
                       C=float(search.best_params_["logisticregression__C"]))  # fmt: skip
    else:
        pipe.set_params(logisticregression__C=grid[0] if len(grid) == 1 else DEFAULT_C)
        if folds >= 2:  # one C: still report its cross-validated accuracy
            from sklearn.model_selection import cross_val_score

            cv = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
            metrics["cv_accuracy"] = float(cross_val_score(pipe, vectors, y, cv=cv).mean())
            metrics["folds"] = float(folds)
        clf = pipe.fit(vectors, y)
        metrics["C"] = float(clf[1].C)
    scaler, lr = clf[0], clf[1]
    w = (lr.coef_ / scaler.scale_).astype(np.float32)  # folded back: one linear map
    b = (lr.intercept_ - lr.coef_ @ (scaler.mean_ / scaler.scale_)).astype(np.float32)
    if len(classes) == 2:  # sklearn keeps one row for binary problems
        w, b = np.stack([-w[0], w[0]]) / 2, np.array([-b[0], b[0]]) / 2
    return LinearProbe(w, b, classes, model_id, metrics)


def split_per_class(
    labels: Sequence[str], test_fraction: float = 0.2, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Indices (pool, test): a shuffled `test_fraction` of each class (at least one) is test."""
    rng = np.random.default_rng(seed)
    labels = np.asarray(labels)
    pool, test = [], []
    for c in sorted(set(labels.tolist())):
        idx = rng.permutation(np.flatnonzero(labels == c))
        n_test = max(1, round(len(idx) * test_fraction))
        if len(idx) - n_test < 1:
            raise InvalidInputError(f"class '{c}' has {len(idx)} image(s): too few to split")
        test += idx[:n_test].tolist()
        pool += idx[n_test:].tolist()
    return np.array(pool), np.array(test)


def kshot(
    vectors: np.ndarray,
    labels: Sequence[str],
    test_vectors: np.ndarray,
    test_labels: Sequence[str],
    shots: Sequence[int] = (1, 2, 4, 8, 16),
    repeats: int = 5,
    seed: int = 0,
) -> list[dict[str, float]]:
    """Test accuracy of probes fit on k images per class (drawn `repeats` times from
    `vectors`), per k: {"shots", "accuracy" (mean), "std", "repeats"}. A k above the smallest
    class's count is skipped."""
    labels = np.asarray(labels)
    truth = np.asarray(test_labels)
    classes = sorted(set(labels.tolist()))
    smallest = min(int((labels == c).sum()) for c in classes)
    rows = []
    for k in shots:
        if k < 1:
            raise InvalidInputError(f"shots {k}: must be at least 1")
        if k > smallest:
            continue
        accs = []
        for r in range(repeats):
            rng = np.random.default_rng([seed, k, r])
            pick = np.concatenate(
                [rng.choice(np.flatnonzero(labels == c), k, replace=False) for c in classes]
            )
            probe = fit_probe(vectors[pick], labels[pick].tolist(), "", folds=min(5, k))
            accs.append(float(np.mean(np.array(probe.predict(test_vectors)) == truth)))
        rows.append({"shots": k, "accuracy": float(np.mean(accs)), "std": float(np.std(accs)),
                     "repeats": repeats})  # fmt: skip
    return rows


def zero_shot_accuracy(
    model, vectors: np.ndarray, labels: Sequence[str], templates: Sequence[str]
) -> float:
    """Accuracy of zero-shot classification among the class names (folder names)."""
    from cliplens.tasks.classify import zero_shot_weights

    classes = sorted(set(labels))
    pred = (vectors @ zero_shot_weights(model, classes, templates).T).argmax(axis=1)
    return float(np.mean(np.array(classes)[pred] == np.asarray(labels)))
