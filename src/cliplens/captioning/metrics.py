"""Caption metrics with the COCO caption evaluation's own scorers (pycocoevalcap): BLEU-1..4,
ROUGE-L, CIDEr-D (coco-caption's `Cider` is the CIDEr-D variant: stemming-free n-grams,
document frequencies from the references, a length penalty and clipped counts), and METEOR
and SPICE when their Java runtime (and, for SPICE, the Stanford CoreNLP 3.6.0 jars that
pycocoevalcap downloads on first use) are present.

Text is tokenised as coco-caption does, with the Stanford PTB tokenizer, when Java is
there; without Java a pure-Python equivalent is used (lower case, punctuation removed),
which gives the same tokens for captions without abbreviations ("u.s." keeps its last dot
in PTB only).
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import shutil
import sys
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from cliplens.errors import DependencyMissingError, InvalidInputError

# what coco-caption's PTBTokenizer drops after tokenising. It lower-cases first, so its
# bracket tokens (-lrb- ...) are not in the list and stay, as they do here.
_PUNCTUATION = {"''", "'", "``", "`", '"', ".", "?", "!", ",", ":", "-", "--", "...", ";"}
_BRACKETS = {"(": "-lrb-", ")": "-rrb-", "[": "-lsb-", "]": "-rsb-", "{": "-lcb-", "}": "-rcb-"}
_TOKEN = re.compile(r"[a-z]+(?=n't\b)|n't|'[a-z]+|[a-z0-9]+(?:[.\-][a-z0-9]+)*|[^\sa-z0-9]")

# the metric families `score_captions` computes
Metric = Literal["bleu", "rouge", "cider", "meteor", "spice"]


@dataclass
class CaptionScores:
    scores: dict[str, float]  # metric -> corpus score
    per_caption: dict[str, list[float]] = field(default_factory=dict)  # CIDEr-D, BLEU-4...
    skipped: dict[str, str] = field(default_factory=dict)  # metric -> why it was not run
    tokenizer: str = "ptb"


def java_available() -> bool:
    return shutil.which("java") is not None


def simple_tokenize(text: str) -> str:
    """PTB-like tokens without Java: lower case, words and punctuation split, punctuation
    dropped as coco-caption drops it."""
    tokens = (_BRACKETS.get(t, t) for t in _TOKEN.findall(text.lower().replace("\n", " ")))
    return " ".join(t for t in tokens if t not in _PUNCTUATION)


@contextlib.contextmanager
def _quiet_stderr() -> Iterator[None]:
    """Silence the Java tools' progress lines, which they write to file descriptor 2."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with Path(os.devnull).open("wb") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _tokenize(captions: Mapping[str, Sequence[str]], use_java: bool) -> dict[str, list[str]]:
    if use_java:
        # optional: pycocoevalcap is the caption extra (checked in score_captions)
        from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

        with contextlib.redirect_stdout(io.StringIO()), _quiet_stderr():
            return PTBTokenizer().tokenize(
                {k: [{"caption": c} for c in v] for k, v in captions.items()}
            )
    return {k: [simple_tokenize(c) for c in v] for k, v in captions.items()}


def _spice_ready() -> tuple[bool, str]:
    if not java_available():
        return False, "needs a Java runtime"
    import pycocoevalcap.spice  # optional: pycocoevalcap is the caption extra

    lib = Path(pycocoevalcap.spice.__file__).parent / "lib" / "stanford-corenlp-3.6.0.jar"
    if not lib.is_file():
        return False, f"needs the Stanford CoreNLP 3.6.0 jars in {lib.parent} (not downloaded)"
    return True, ""


def score_captions(
    candidates: Sequence[str],
    references: Sequence[Sequence[str]],
    metrics: Sequence[Metric] = ("bleu", "rouge", "cider", "meteor", "spice"),
    java: bool | None = None,
) -> CaptionScores:
    """Corpus scores of candidate captions against their references (one list per
    candidate): why, the numbers captioning papers report, from coco-caption's own scorers.

    METEOR and SPICE run only where Java is (`java=None`: detect); otherwise they are listed
    in `skipped` with the reason.

    >>> import cliplens
    >>> scores = cliplens.score_captions(["a red circle"], [["a red circle"]], java=False)
    >>> round(scores.scores["BLEU-1"], 2)
    1.0
    """
    if len(candidates) != len(references):
        raise InvalidInputError(f"{len(candidates)} captions but {len(references)} reference lists")
    if not candidates:
        raise InvalidInputError("no captions to score")
    if any(not r for r in references):
        raise InvalidInputError("every caption needs at least one reference")
    try:  # optional: pycocoevalcap is the caption extra
        from pycocoevalcap.bleu.bleu import Bleu
        from pycocoevalcap.cider.cider import Cider
        from pycocoevalcap.rouge.rouge import Rouge
    except ImportError as e:
        raise DependencyMissingError(
            "caption metrics need pycocoevalcap: pip install 'cliplens[caption]'"
        ) from e
    use_java = java_available() if java is None else java
    keys = [str(i) for i in range(len(candidates))]
    res = _tokenize({k: [c] for k, c in zip(keys, candidates, strict=True)}, use_java)
    gts = _tokenize({k: list(r) for k, r in zip(keys, references, strict=True)}, use_java)
    # an empty candidate trips pycocoevalcap's BLEU; a lone unknown token scores the same 0
    res = {k: [v[0] or "<empty>"] for k, v in res.items()}
    out = CaptionScores({}, tokenizer="ptb" if use_java else "python")
    quiet = contextlib.redirect_stdout(io.StringIO())
    if "bleu" in metrics:
        with quiet:
            corpus, each = Bleu(4).compute_score(gts, res, verbose=0)
        for n in range(4):
            out.scores[f"BLEU-{n + 1}"] = float(corpus[n])
        out.per_caption["BLEU-4"] = [float(s) for s in each[3]]
    if "rouge" in metrics:
        corpus, each = Rouge().compute_score(gts, res)
        out.scores["ROUGE-L"] = float(corpus)
        out.per_caption["ROUGE-L"] = [float(s) for s in each]
    if "cider" in metrics:
        corpus, each = Cider().compute_score(gts, res)
        out.scores["CIDEr-D"] = float(corpus)
        out.per_caption["CIDEr-D"] = [float(s) for s in each]
    if "meteor" in metrics:
        if use_java:
            from pycocoevalcap.meteor.meteor import Meteor  # optional: the caption extra

            with _quiet_stderr():
                corpus, _ = Meteor().compute_score(gts, res)
            out.scores["METEOR"] = float(corpus)
        else:
            out.skipped["METEOR"] = "needs a Java runtime"
    if "spice" in metrics:
        ready, why = _spice_ready() if use_java else (False, "needs a Java runtime")
        if ready:
            from pycocoevalcap.spice.spice import Spice  # optional: the caption extra

            with _quiet_stderr():
                corpus, _ = Spice().compute_score(gts, res)
            out.scores["SPICE"] = float(corpus)
        else:
            out.skipped["SPICE"] = why
    return out
