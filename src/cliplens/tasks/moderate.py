"""Content moderation by cosine similarity to unsafe concepts, with per-concept thresholds.

The scheme is the Stable Diffusion safety checker's: an image is flagged when its cosine
to some concept's embedding passes that concept's threshold; when a "special care"
concept hits, every threshold is lowered by the policy's adjustment. Policies (YAML) are
parsed in `tasks.policy`; thresholds belong to the model they were set for. A head
trained on example embeddings (`tasks.heads`: logistic regression, or the small MLP of
LAION's CLIP NSFW detector) can be added to a policy and flags on its own probability.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import ImageFilter

from cliplens.errors import ImageError, InvalidInputError
from cliplens.images import ImageSource, iter_image_files, open_image
from cliplens.models.encoder import Encoder
from cliplens.store.files import write_atomic
from cliplens.tasks.embed import Embedded, embed_files, embed_images
from cliplens.tasks.heads import HEAD_KINDS, Head, HeadKind, LinearHead, fit_mlp, load_head
from cliplens.tasks.policy import HEAD_CATEGORY, Concept, Policy, PolicyError, load_policy

if TYPE_CHECKING:
    from cliplens.catalog.db import Catalog

# ---------------------------------------------------------------------------- verdicts


@dataclass
class Verdict:
    """Whether one image is flagged, and by which concept."""

    path: str
    flagged: bool
    category: str  # of the concept closest to (or past) its threshold
    concept: str
    score: float  # cosine to that concept
    threshold: float  # its threshold, after any special-care adjustment
    special_care: str | None = None  # the special concept that hit, if any
    head_probability: float | None = None

    @property
    def margin(self) -> float:
        return self.score - self.threshold

    def to_dict(self) -> dict[str, Any]:
        d = {
            "path": self.path,
            "flagged": self.flagged,
            "category": self.category,
            "concept": self.concept,
            "score": round(self.score, 4),
            "threshold": round(self.threshold, 4),
            "margin": round(self.margin, 4),
            "special_care": self.special_care,
        }
        if self.head_probability is not None:
            d["head_probability"] = round(self.head_probability, 4)
        return d


@dataclass
class Moderator:
    """A policy with its concepts embedded by one model, ready to judge embeddings."""

    policy: Policy
    model_id: str
    concept_vectors: np.ndarray  # (C, D)
    thresholds: np.ndarray  # (C,)
    categories: list[str]
    labels: list[str]
    special_vectors: np.ndarray  # (S, D)
    special_thresholds: np.ndarray  # (S,)
    special_labels: list[str]
    head: Head | None = None

    def margins(self, vectors: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(scores (N, C), effective thresholds (N, C), special hit index or -1 (N,))."""
        scores = vectors @ self.concept_vectors.T
        special = np.full(len(vectors), -1)
        adjust = np.zeros(len(vectors))
        if len(self.special_labels):
            sm = vectors @ self.special_vectors.T - self.special_thresholds
            hit = sm.max(axis=1) > 0
            special[hit] = sm[hit].argmax(axis=1)
            adjust[hit] = self.policy.adjustment
        return scores, self.thresholds[None, :] - adjust[:, None], special

    def judge(self, paths: list[str], vectors: np.ndarray) -> list[Verdict]:
        scores, thresholds, special = self.margins(vectors)
        probs = self.head.probability(vectors) if self.head is not None else None
        out = []
        for i, path in enumerate(paths):
            j = int(np.argmax(scores[i] - thresholds[i]))
            v = Verdict(
                path=path,
                flagged=bool(scores[i, j] > thresholds[i, j]),
                category=self.categories[j],
                concept=self.labels[j],
                score=float(scores[i, j]),
                threshold=float(thresholds[i, j]),
                special_care=self.special_labels[special[i]] if special[i] >= 0 else None,
            )
            head = self.policy.head
            if probs is not None and head is not None:
                v.head_probability = float(probs[i])
                if not v.flagged and probs[i] >= head.threshold:
                    v.flagged, v.category, v.concept = True, head.category, "trained head"
            out.append(v)
        return out


def build_moderator(policy: Policy, model: Encoder) -> Moderator:
    """Embed the policy's concepts (texts and example images) with `model`.

    Why: the concepts are embedded once, then every image is judged by arithmetic.

    >>> import cliplens
    >>> moderator = cliplens.build_moderator(cliplens.load_policy(), cliplens.ModelRef("offline"))
    >>> moderator.judge(["a.jpg"], vectors_of_a)  # doctest: +SKIP
    """
    info = model.info
    if policy.model and policy.model != info.name:
        warnings.warn(
            f"policy '{policy.name}' was calibrated for {policy.model}, not {info.name}: its "
            "thresholds may not fit; run 'cliplens moderate calibrate' for this model",
            stacklevel=2,
        )

    def embed(concepts: list[Concept]) -> np.ndarray:
        out = np.zeros((len(concepts), info.dim), np.float32)
        texts = [i for i, k in enumerate(concepts) if k.text is not None]
        images = [i for i, k in enumerate(concepts) if k.image is not None]
        if texts:
            out[texts] = model.encode_texts([concepts[i].text for i in texts])
        if images:
            out[images] = model.encode_images([concepts[i].image for i in images])
        return out

    pairs = policy.concepts
    head = None
    if policy.head is not None:
        head = load_head(policy.head.file)
        if head.model_id != info.model_id:
            raise PolicyError(
                f"head {policy.head.file} was trained on {head.model_id}, not {info.model_id}; "
                "train one for this model with 'cliplens moderate train-head'"
            )
    return Moderator(
        policy=policy,
        model_id=info.model_id,
        concept_vectors=embed([k for _, k in pairs]),
        thresholds=np.array([k.threshold for _, k in pairs], np.float64),
        categories=[c for c, _ in pairs],
        labels=[k.label for _, k in pairs],
        special_vectors=embed(list(policy.special_care)),
        special_thresholds=np.array([k.threshold for k in policy.special_care], np.float64),
        special_labels=[k.label for k in policy.special_care],
        head=head,
    )


# ---------------------------------------------------------------------------- moderation


@dataclass
class Moderation:
    """Verdicts on the images that could be read, and why the others could not."""

    verdicts: list[Verdict]
    failures: list[ImageError] = field(default_factory=list)
    reused: int = 0  # embeddings taken from the catalog

    @property
    def flagged(self) -> list[Verdict]:
        return [v for v in self.verdicts if v.flagged]

    def to_dict(self) -> dict[str, Any]:
        return {"verdicts": [v.to_dict() for v in self.verdicts]}


def moderate(
    images: Sequence[ImageSource],
    model: Encoder,
    policy: Policy | None = None,
    *,
    moderator: Moderator | None = None,
    names: Sequence[str] | None = None,
    catalog: Catalog | None = None,
    max_megapixels: float | None = None,
    progress: bool = False,
) -> Moderation:
    """Judge images against a policy (the shipped default unless one is given).

    Why: one call flags what a policy names, from files (embeddings of unchanged files
    come from `catalog`) or images already open (named by `names`). `moderator` (from
    `build_moderator`) is reused instead of embedding the policy's concepts again.

    >>> import cliplens
    >>> found = cliplens.moderate(["photos/a.jpg"], cliplens.ModelRef("offline"))
    >>> [v.to_dict() for v in found.flagged]
    """
    moderator = moderator or build_moderator(policy or load_policy(), model)
    done = embed_images(model, images, names, catalog, progress, max_megapixels)
    return Moderation(moderator.judge(done.paths, done.vectors), done.failures, done.reused)


@dataclass
class Examples:
    """Embedded images that must be flagged and images that must pass."""

    positives: Embedded
    negatives: Embedded
    categories: list[str] | None = None  # of each positive, when its folder names one


def labelled_examples(
    positive: str | os.PathLike,
    negative: str | os.PathLike,
    model: Encoder,
    catalog: Catalog | None = None,
    max_megapixels: float | None = None,
    progress: bool = False,
) -> Examples:
    """Embeddings of the images under the `positive` and `negative` folders, and each
    positive's category: its subfolder under `positive`, when all positives sit in
    subfolders. Unreadable images are left out (`Embedded.failures` says why).

    >>> import cliplens
    >>> examples = cliplens.labelled_examples("flag/", "pass/", cliplens.ModelRef("offline"))
    >>> examples.categories  # ['nudity', 'violence', ...] when flag/ has those subfolders
    """
    found = []
    for folder, name in ((Path(positive), "positive"), (Path(negative), "negative")):
        if not folder.is_dir():
            raise InvalidInputError(f"`{name}` {folder} is not a folder of images")
        found.append(list(iter_image_files([folder])))
    options = {"max_megapixels": max_megapixels, "progress": progress}
    pos = embed_files(model, found[0], catalog, **options)
    neg = embed_files(model, found[1], catalog, **options)
    root = Path(positive).resolve()
    parts = [Path(p).relative_to(root).parts for p in pos.paths]
    categories = [p[0] for p in parts] if parts and all(len(p) > 1 for p in parts) else None
    return Examples(pos, neg, categories)


# ---------------------------------------------------------------------------- calibration


@dataclass
class OperatingPoint:
    offset: float  # added to the thresholds
    precision: float
    recall: float
    roc_auc: float
    pr_auc: float
    positives: int
    negatives: int

    def to_dict(self) -> dict[str, float]:
        return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in vars(self).items()}


def choose_offset(
    margins: np.ndarray,
    labels: np.ndarray,
    target_precision: float | None = None,
    target_recall: float | None = None,
) -> OperatingPoint:
    """The offset to add to thresholds so that flagging `margin > offset` meets the target.

    With a precision target: the lowest offset (most recall) whose precision on these
    examples is at least the target. With a recall target: the highest offset (most
    precision) whose recall is at least the target.
    """
    # scikit-learn takes a second to import: only where something is fitted or measured
    from sklearn.metrics import average_precision_score, roc_auc_score

    if (target_precision is None) == (target_recall is None):
        raise InvalidInputError("give exactly one of `target_precision` or `target_recall`")
    labels = np.asarray(labels, bool)
    if labels.all() or not labels.any():
        raise InvalidInputError("calibration needs both positive and negative examples")
    order = np.argsort(-margins, kind="stable")
    m, y = margins[order], labels[order]
    tp = np.cumsum(y)
    fp = np.cumsum(~y)
    last = np.r_[m[1:] != m[:-1], True]  # cut only between distinct margins
    precision, recall = (tp / (tp + fp))[last], (tp / y.sum())[last]
    cuts = m[last]
    # flagging the first k rows means offset just below m[k-1]; midpoint to the next value
    below = np.r_[m[np.flatnonzero(last)[:-1] + 1], m[-1] - 1e-3]
    offsets = (cuts + below) / 2
    if target_precision is not None:
        ok = np.flatnonzero(precision >= target_precision)
        k = ok[-1] if len(ok) else 0  # the deepest cut that still meets it
    else:
        ok = np.flatnonzero(recall >= target_recall)
        k = ok[0]
    return OperatingPoint(
        offset=float(offsets[k]),
        precision=float(precision[k]),
        recall=float(recall[k]),
        roc_auc=float(roc_auc_score(labels, margins)),
        pr_auc=float(average_precision_score(labels, margins)),
        positives=int(labels.sum()),
        negatives=int((~labels).sum()),
    )


def calibrate(
    moderator: Moderator,
    positives: np.ndarray,
    negatives: np.ndarray,
    target_precision: float | None = None,
    target_recall: float | None = None,
    positive_categories: list[str] | None = None,
) -> tuple[Policy, dict[str, OperatingPoint]]:
    """Thresholds chosen from labelled embeddings: one offset for the whole policy, or, when
    each positive names its category, one per category (against all the negatives).

    Why: a target precision or recall is met on these examples, not guessed.

    >>> import cliplens
    >>> policy, points = cliplens.calibrate(moderator, flag_vectors, pass_vectors, 0.9)
    >>> points["all"].to_dict()
    """
    vectors = np.concatenate([positives, negatives])
    labels = np.r_[np.ones(len(positives), bool), np.zeros(len(negatives), bool)]
    scores, thresholds, _ = moderator.margins(vectors)
    margins = scores - thresholds
    cats = np.array(moderator.categories)
    points: dict[str, OperatingPoint] = {}
    if positive_categories is None:
        point = choose_offset(margins.max(axis=1), labels, target_precision, target_recall)
        points["all"] = point
        offsets = dict.fromkeys(moderator.categories, point.offset)
    else:
        offsets = {}
        pos_cats = np.array(positive_categories)
        for cat in dict.fromkeys(moderator.categories):
            rows = np.r_[pos_cats == cat, np.ones(len(negatives), bool)]
            if not rows[: len(positives)].any():
                continue  # no examples for this category: leave it as it was
            cat_margin = margins[:, cats == cat].max(axis=1)[rows]
            points[cat] = choose_offset(cat_margin, labels[rows], target_precision, target_recall)
            offsets[cat] = points[cat].offset
    return moderator.policy.shifted(offsets), points


def calibrate_policy(
    moderator: Moderator,
    examples: Examples,
    model_name: str,
    target_precision: float | None = None,
    target_recall: float | None = None,
) -> tuple[Policy, dict[str, OperatingPoint]]:
    """The moderator's policy with thresholds chosen on `examples` (per category when the
    positives name theirs), named and noted as calibrated for `model_name`.

    Why: thresholds belong to the model and the images they were set on.

    >>> import cliplens
    >>> examples = cliplens.labelled_examples("flag/", "pass/", model)
    >>> policy, points = cliplens.calibrate_policy(moderator, examples, model.info.name, 0.9)
    """
    categories = examples.categories
    if categories is not None:
        unknown = sorted(set(categories) - set(moderator.categories))
        if unknown:
            raise InvalidInputError(
                f"`positive` subfolders {', '.join(unknown)} are not categories of the policy "
                f"({', '.join(dict.fromkeys(moderator.categories))})"
            )
    pos, neg = examples.positives, examples.negatives
    new, points = calibrate(
        moderator, pos.vectors, neg.vectors, target_precision, target_recall, categories
    )
    if target_precision is not None:
        target = f"precision >= {target_precision}"
    else:
        target = f"recall >= {target_recall}"
    old = moderator.policy
    note = (
        f"Calibrated for {model_name} on {len(pos.paths)} positive and "
        f"{len(neg.paths)} negative images for {target}. Started from: {old.note}"
    )
    new = replace(new, model=model_name, note=note, name=f"{old.name}-calibrated")
    return new, points


def train_head(
    positives: np.ndarray,
    negatives: np.ndarray,
    model_id: str,
    folds: int = 5,
    seed: int = 0,
    head: HeadKind = "linear",
) -> Head:
    """A head on embeddings, its metrics cross-validated (stratified folds): `head`
    "linear" (logistic regression, class-balanced) or "mlp" (the layers of LAION's CLIP
    NSFW detector, `tasks.heads.MlpHead`).

    Why: where concepts in words miss, a head learns from example images;
    `Policy.with_head` adds it to a policy.

    >>> import cliplens
    >>> head = cliplens.train_head(flag_vectors, pass_vectors, model.info.model_id)
    >>> head.save("flag.head.npz"), head.metrics["cv_roc_auc"]
    """
    # scikit-learn takes a second to import: only where something is fitted or measured
    from sklearn.metrics import accuracy_score, average_precision_score, roc_auc_score
    from sklearn.model_selection import StratifiedKFold

    if head not in HEAD_KINDS:
        raise InvalidInputError(f"`head` {head}: {' or '.join(HEAD_KINDS)}")
    x = np.concatenate([positives, negatives]).astype(np.float64)
    y = np.r_[np.ones(len(positives), int), np.zeros(len(negatives), int)]
    folds = min(folds, int(y.sum()), int(len(y) - y.sum()))
    if folds < 2:
        raise InvalidInputError("a head needs at least 2 positive and 2 negative images")
    p = np.zeros(len(y))
    cv = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    for train, test in cv.split(x, y):
        p[test] = _fit_head(head, x[train], y[train], model_id, seed).probability(x[test])
    metrics = {
        "cv_accuracy": float(accuracy_score(y, p >= 0.5)),
        "cv_roc_auc": float(roc_auc_score(y, p)),
        "cv_pr_auc": float(average_precision_score(y, p)),
        "folds": float(folds),
        "positives": float(y.sum()),
        "negatives": float(len(y) - y.sum()),
    }
    return replace(_fit_head(head, x, y, model_id, seed), metrics=metrics)


def _fit_head(kind: HeadKind, x: np.ndarray, y: np.ndarray, model_id: str, seed: int) -> Head:
    if kind == "mlp":
        return fit_mlp(x, y, model_id, seed)
    from sklearn.linear_model import LogisticRegression

    clf = LogisticRegression(C=10.0, max_iter=2000, class_weight="balanced").fit(x, y)
    return LinearHead(clf.coef_[0].astype(np.float32), float(clf.intercept_[0]), model_id)


def head_file_for(policy_file: str | Path) -> Path:
    """Where a head trained for the policy `policy_file` is kept: beside it, OUT.head.npz."""
    return Path(policy_file).with_suffix(".head.npz")


def save_with_head(
    policy: Policy,
    head: Head,
    model: str,
    out: str | Path,
    threshold: float = 0.5,
    category: str = HEAD_CATEGORY,
) -> Path:
    """Save `head` beside `out` (`head_file_for`) and, at `out`, `policy` flagging by it
    too; returns the head's file.

    Why: a policy file and its head travel together, and the policy names the model whose
    embeddings the head reads.

    >>> import cliplens
    >>> head = cliplens.train_head(flag_vectors, pass_vectors, model.info.model_id)
    >>> cliplens.save_with_head(cliplens.load_policy(), head, model.info.name, "mine.yaml")
    """
    head_file = head.save(head_file_for(out))
    policy.with_head(head_file, model, threshold, category).save(Path(out))
    return head_file


# ---------------------------------------------------------------------------- redaction


def redact(path: str | Path, out_dir: str | Path, radius_fraction: float = 0.06) -> Path:
    """Write a heavily blurred copy of an image into out_dir; the original is not touched.

    Why: a flagged photo can still be shown, or sent on, without what flagged it.

    >>> import cliplens
    >>> cliplens.redact("photos/cat.jpg", "redacted")  # redacted/cat.jpg
    """
    src = Path(path).resolve()
    out_dir = Path(out_dir).resolve()
    out = out_dir / f"{src.stem}.redacted.jpg"
    n = 1
    while out.exists():
        n += 1
        out = out_dir / f"{src.stem}.redacted-{n}.jpg"
    if out == src:
        raise InvalidInputError(f"`out_dir` {out_dir} would overwrite {src}")
    image = open_image(src)
    radius = max(4.0, radius_fraction * max(image.size))
    blurred = image.filter(ImageFilter.GaussianBlur(radius))
    out_dir.mkdir(parents=True, exist_ok=True)
    write_atomic(out, lambda tmp: blurred.save(tmp, format="JPEG", quality=85))
    return out
