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
from typing import TYPE_CHECKING, Any

import numpy as np

from cliplens.errors import ImageError, InvalidInputError
from cliplens.images import iter_image_files
from cliplens.models.encoder import Encoder
from cliplens.store.npz import load_arrays, save_arrays
from cliplens.tasks.classify import zero_shot_weights
from cliplens.tasks.embed import embed_files

if TYPE_CHECKING:
    from cliplens.catalog.db import Catalog

C_GRID = (0.01, 0.1, 1.0, 10.0, 100.0)  # inverse regularisation, on standardised features
DEFAULT_C = 1.0  # where there are too few examples per class to validate


@dataclass
class LinearProbe:
    """p(class | x) = softmax(x . W^T + b).

    Why: a probe is the cheapest way to teach a model classes of your own.

    >>> import cliplens
    >>> probe = cliplens.LinearProbe.load("head.npz")
    >>> probe.predict_files(["a.jpg"], cliplens.ModelRef("offline")).predictions
    """

    weights: np.ndarray  # (K, D)
    bias: np.ndarray  # (K,)
    classes: list[str]
    model_id: str  # the space it was fit in: embeddings' model_id or Encoder.feature_id
    metrics: dict[str, float] = field(default_factory=dict)
    source: Path | None = None  # the file it was loaded from

    def uses_features(self, model: Encoder) -> bool:
        """Whether the probe reads `model`'s probe features (else its embeddings); a probe
        fit on another model is refused."""
        if self.model_id == model.info.model_id:
            return False
        if self.model_id == model.feature_id:
            return True
        raise InvalidInputError(
            f"`probe` {self.source or 'probe'} was fit on {self.model_id}, not "
            f"{model.info.model_id}; pass the `model` it was fit with"
        )

    def predict_files(
        self,
        files: Sequence[str | os.PathLike],
        model: Encoder,
        top_k: int = 1,
        catalog: Catalog | None = None,
        max_megapixels: float | None = None,
        progress: bool = False,
    ) -> ProbePredictions:
        """The `top_k` classes of each file that could be read, most probable first."""
        features = self.uses_features(model)
        options = {"max_megapixels": max_megapixels, "progress": progress}
        done = embed_files(model, files, catalog, features=features, **options)
        probs = self.probabilities(done.vectors)
        k = min(top_k, len(self.classes))
        order = (-probs).argsort(axis=1)[:, :k]
        predictions = [
            ProbePrediction(path, [(self.classes[j], float(probs[i, j])) for j in order[i]])
            for i, path in enumerate(done.paths)
        ]
        return ProbePredictions(predictions, done.failures)

    def probabilities(self, vectors: np.ndarray) -> np.ndarray:
        z = vectors @ self.weights.T + self.bias
        z = np.exp(z - z.max(axis=1, keepdims=True))
        return z / z.sum(axis=1, keepdims=True)

    def predict(self, vectors: np.ndarray) -> list[str]:
        return [self.classes[i] for i in self.probabilities(vectors).argmax(axis=1)]

    def save(self, path: str | os.PathLike) -> Path:
        classes = np.array(self.classes, dtype=str)
        arrays = {"weights": self.weights, "bias": self.bias, "classes": classes}
        return save_arrays(path, self.metrics, model_id=self.model_id, **arrays)

    @classmethod
    def load(cls, path: str | os.PathLike) -> LinearProbe:
        a, metrics = load_arrays(path, "probe")
        try:
            classes, model_id = a["classes"].tolist(), str(a["model_id"])
            return cls(a["weights"], a["bias"], classes, model_id, metrics, Path(path))
        except KeyError as e:
            raise InvalidInputError(f"probe {path}: not a cliplens probe file (no {e})") from e


@dataclass
class ProbePrediction:
    path: str
    labels: list[tuple[str, float]]  # (class, probability), most probable first

    def to_dict(self) -> dict[str, Any]:
        labels = [{"label": c, "probability": round(p, 6)} for c, p in self.labels]
        return {"path": self.path, "labels": labels}


@dataclass
class ProbePredictions:
    predictions: list[ProbePrediction]
    failures: list[ImageError] = field(default_factory=list)


@dataclass
class LabelledVectors:
    """Embeddings (or probe features) of a labelled folder's images that could be read."""

    vectors: np.ndarray
    labels: list[str]
    failures: list[ImageError] = field(default_factory=list)
    features: bool = False  # probe features rather than embeddings
    folder: Path | None = None  # where the images are


def embed_labelled_folder(
    folder: str | os.PathLike,
    model: Encoder,
    features: bool = False,
    catalog: Catalog | None = None,
    max_megapixels: float | None = None,
    progress: bool = False,
) -> LabelledVectors:
    """The images of a folder with one subfolder per class, embedded, with their classes.

    Why: the layout ImageFolder datasets use is the input of probes and k-shot curves.

    >>> import cliplens
    >>> data = cliplens.embed_labelled_folder("classes/", cliplens.ModelRef("offline"))
    >>> data.vectors.shape, sorted(set(data.labels))
    """
    files, labels = labelled_folder(folder)
    options = {"max_megapixels": max_megapixels, "progress": progress}
    done = embed_files(model, files, catalog, features=features, **options)
    by_path = dict(zip([str(Path(f).resolve()) for f in files], labels, strict=True))
    labelled = [by_path[p] for p in done.paths]
    return LabelledVectors(done.vectors, labelled, done.failures, features, Path(folder))


def fit_folder_probe(data: LabelledVectors, model: Encoder) -> LinearProbe:
    """A probe fit on a labelled folder's embeddings or probe features, recording that
    space: the model's embeddings or its feature space.

    >>> import cliplens
    >>> model = cliplens.ModelRef("offline")
    >>> cliplens.fit_folder_probe(cliplens.embed_labelled_folder("classes/", model), model)
    """
    space = model.feature_id if data.features else model.info.model_id
    return fit_probe(data.vectors, data.labels, space)


def labelled_folder(path: str | os.PathLike) -> tuple[list[Path], list[str]]:
    """(image files, class names) from a folder with one subfolder of images per class.

    Why: the layout people already keep labelled examples in, ready for `fit_probe`.

    >>> import cliplens
    >>> files, labels = cliplens.labelled_folder("my-classes")  # my-classes/cat/1.jpg ...
    """
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
    single example.

    Why: a few labelled images per class teach a model classes its text side misses.

    >>> import cliplens
    >>> probe = cliplens.fit_probe(vectors, ["cat", "dog", "cat"], model.info.model_id)
    >>> probe.predict(vectors)  # ['cat', 'dog', 'cat']
    """
    # scikit-learn takes a second to import: only where a probe is fitted
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
        best_c = float(search.best_params_["logisticregression__C"])
        metrics.update(cv_accuracy=float(search.best_score_), folds=float(folds), C=best_c)
    else:
        pipe.set_params(logisticregression__C=grid[0] if len(grid) == 1 else DEFAULT_C)
        if folds >= 2:  # one C: still report its cross-validated accuracy
            from sklearn.model_selection import cross_val_score  # with the others above

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


@dataclass(frozen=True)
class KShotPoint:
    """One point of a k-shot curve: probes fit on `shots` images per class, `repeats` times."""

    shots: int
    accuracy: float  # mean test accuracy over the draws
    std: float
    repeats: int

    def to_dict(self) -> dict[str, float]:
        return {
            "shots": self.shots,
            "accuracy": self.accuracy,
            "std": self.std,
            "repeats": self.repeats,
        }


def kshot(
    vectors: np.ndarray,
    labels: Sequence[str],
    test_vectors: np.ndarray,
    test_labels: Sequence[str],
    shots: Sequence[int] = (1, 2, 4, 8, 16),
    repeats: int = 5,
    seed: int = 0,
) -> list[KShotPoint]:
    """Test accuracy of probes fit on k images per class (drawn `repeats` times from
    `vectors`), per k: a `KShotPoint` (mean accuracy, its std over the draws). A k above the
    smallest class's count is skipped.

    Why: how many labelled images a class needs before a probe beats zero-shot.

    >>> import cliplens
    >>> curve = cliplens.kshot(train_x, train_y, test_x, test_y, shots=(1, 4, 16))
    >>> [(point.shots, point.accuracy) for point in curve]
    """
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
        mean, std = float(np.mean(accs)), float(np.std(accs))
        rows.append(KShotPoint(k, mean, std, repeats))
    return rows


def zero_shot_accuracy(
    model: Encoder, vectors: np.ndarray, labels: Sequence[str], templates: Sequence[str]
) -> float:
    """Accuracy of zero-shot classification among the class names (folder names)."""
    classes = sorted(set(labels))
    pred = (vectors @ zero_shot_weights(model, classes, templates).T).argmax(axis=1)
    return float(np.mean(np.array(classes)[pred] == np.asarray(labels)))


MAX_SHOTS = 100_000  # labelled images per class


def parse_shots(spec: str) -> list[int]:
    """'1,2,4,8' as sorted distinct shot counts from 1 to MAX_SHOTS."""
    try:
        ks = sorted({int(s) for s in spec.split(",") if s.strip()})
    except ValueError:
        raise InvalidInputError(f"`shots` {spec}: comma-separated integers, e.g. 1,2,4") from None
    if not ks or ks[0] < 1 or ks[-1] > MAX_SHOTS:
        raise InvalidInputError(f"`shots` {spec}: shots from 1 to {MAX_SHOTS}")
    return ks


@dataclass
class KShotReport:
    """A k-shot curve and, in the embedding space, zero-shot accuracy to compare with."""

    model: str
    classes: int
    test_images: int
    curve: list[KShotPoint]
    zero_shot_accuracy: float | None
    skipped: list[int]  # shots above the smallest class's count of training images

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "classes": self.classes,
            "test_images": self.test_images,
            "zero_shot_accuracy": self.zero_shot_accuracy,
            "kshot": [point.to_dict() for point in self.curve],
        }


def kshot_report(
    data: LabelledVectors,
    test: LabelledVectors | None,
    model: Encoder,
    shots: Sequence[int] = (1, 2, 4, 8, 16),
    repeats: int = 5,
    templates: Sequence[str] = (),
    seed: int = 0,
) -> KShotReport:
    """`kshot` on a labelled folder, tested on `test` (or a fifth of each class held out),
    against zero-shot with the class names through `templates` (embeddings only).

    Why: whether labelled images are worth collecting, and how many.

    >>> import cliplens
    >>> model = cliplens.ModelRef("offline")
    >>> cliplens.kshot_report(cliplens.embed_labelled_folder("classes/", model), None, model)
    """
    x, y = data.vectors, data.labels
    if test is not None:
        unknown = sorted(set(test.labels) - set(y))
        if unknown:
            raise InvalidInputError(f"`test` {test.folder} has classes not in `data`: {unknown}")
        tx, ty = test.vectors, test.labels
    else:
        pool, held = split_per_class(y, seed=seed)
        tx, ty = x[held], [y[i] for i in held]
        x, y = x[pool], [y[i] for i in pool]
    curve = kshot(x, y, tx, ty, shots, repeats, seed)
    skipped = [k for k in shots if k not in {point.shots for point in curve}]
    zero = None
    if not data.features:  # zero-shot needs the embedding space
        zero = zero_shot_accuracy(model, tx, ty, templates)
    return KShotReport(model.info.model_id, len(set(y)), len(ty), curve, zero, skipped)
