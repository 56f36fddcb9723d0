"""Token ids for a saved `tokenizers` file, with CLIP's BPE tables in SQLite beside it.

A one-shot `cliplens search "a red boat"` waits for its tokenizer: `Tokenizer.from_file`
parses CLIP's 49,408 tokens and 48,894 merges in about 70 ms, for a query that needs a
few dozen of them. Where the saved tokenizer is CLIP's byte-level BPE, its vocabulary and
merge ranks are also written to `<name>.bpe.db`, read in place (about 1 ms to open, a
lookup per candidate merge), and plain ASCII text is encoded from it. Any other text, or
a tokenizer of another shape, goes through `tokenizers` itself, loaded on first use.

The tables are written only after they give `tokenizers`' own ids on a fixed set of
texts, and `tests/unit/test_bpe.py` compares both on thousands of generated ones.
"""

from __future__ import annotations

import itertools
import json
import re
import sqlite3
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cliplens.store.files import write_atomic

FORMAT = 1
MAX_CACHED = 10_000  # words whose ids are kept (a query's words recur; a server's are many)
# the character classes of CLIP's pre-tokenizer (open_clip and transformers write it with
# them), and what each matches on printable ASCII, the only text encoded from the tables:
# there \p{L} is [A-Za-z], \p{N} is [0-9], and the only white space is " "
_ASCII_CLASSES = {
    r"[\p{L}]+": "[A-Za-z]+",
    r"[\p{N}]": "[0-9]",
    r"[^\s\p{L}\p{N}]+": "[^ A-Za-z0-9]+",
}


def ascii_pattern(pattern: str) -> str | None:
    """The pre-tokenizer's regex as it acts on printable ASCII, or None where it uses
    other Unicode classes than CLIP's."""
    for unicode, ascii_ in _ASCII_CLASSES.items():
        pattern = pattern.replace(unicode, ascii_)
    if "\\p" in pattern or "\\P" in pattern:
        return None
    try:
        re.compile(pattern)
    except re.error:
        return None
    return pattern


def table_path(tokenizer_json: Path) -> Path:
    return tokenizer_json.with_suffix(".bpe.db")


@dataclass(frozen=True)
class Layout:
    """What the tables need to know besides the merges and the vocabulary."""

    pattern: str  # the pre-tokenizer's regex on printable ASCII
    suffix: str  # appended to a word's last symbol ("</w>")
    bos: int
    eos: int
    max_length: int | None  # truncation, counting bos and eos
    pad_id: int
    pad_to: int | None  # None: the longest in the batch; else a fixed length

    @classmethod
    def of(cls, config: dict[str, Any]) -> Layout | None:
        """The layout of a `tokenizers` config, or None where it is not CLIP's BPE."""
        try:
            model, pre, post = config["model"], config["pre_tokenizer"], config["post_processor"]
            split, byte_level = pre["pretokenizers"]
            first, seq, last = post["single"]
            ok = (
                model["type"] == "BPE"
                and model.get("end_of_word_suffix")
                and not model.get("continuing_subword_prefix")
                and not model.get("byte_fallback")
                and model.get("dropout") is None
                and config.get("normalizer") is None
                and not config.get("added_tokens")
                and pre["type"] == "Sequence"
                and split["type"] == "Split"
                and ascii_pattern(split["pattern"]["Regex"]) is not None
                and split["behavior"] == "Removed"
                and split["invert"] is True
                and byte_level["type"] == "ByteLevel"
                and not byte_level.get("add_prefix_space")
                and byte_level.get("use_regex") is False
                and post["type"] == "TemplateProcessing"
                and "Sequence" in seq
            )
            bos = post["special_tokens"][first["SpecialToken"]["id"]]["ids"]
            eos = post["special_tokens"][last["SpecialToken"]["id"]]["ids"]
            trunc, pad = config.get("truncation"), config.get("padding")
            ok = ok and len(bos) == 1 and len(eos) == 1
            ok = ok and (not trunc or (trunc["direction"] == "Right" and not trunc["stride"]))
            ok = ok and (not pad or (pad["direction"] == "Right" and not pad["pad_to_multiple_of"]))
            if not ok:
                return None
            strategy = pad["strategy"] if pad else "BatchLongest"
            return cls(
                pattern=ascii_pattern(split["pattern"]["Regex"]) or "",
                suffix=model["end_of_word_suffix"],
                bos=int(bos[0]),
                eos=int(eos[0]),
                max_length=int(trunc["max_length"]) if trunc else None,
                pad_id=int(pad["pad_id"]) if pad else 0,
                pad_to=None if strategy == "BatchLongest" else int(strategy["Fixed"]),
            )
        except (KeyError, TypeError, ValueError):
            return None


# texts the tables must encode as `tokenizers` does before they are kept
CHECKS = [
    "a photo of a cat",
    "A Red BOAT at sunset!",
    "two dogs, three cats & 4 birds... 1234567890",
    "it's the photographer's 35mm lens; they're here, we've gone, I'm, you'll, he'd",
    "'s''t 'S don't (parentheses) [brackets] {braces} <tags> \\back/slash",
    "<start_of_text>x<end_of_text> <|endoftext|>",
    "aaaaaaaa zzzz qqqqq xylophone antidisestablishmentarianism",
    '~!@#$%^&*()_+`-=|:;"?,.',
    "x",
    "",
    " ".join(["a very long description of a crowded market street"] * 30),
]


def write_tables(tokenizer_json: Path) -> bool:
    """Write the BPE tables of a saved `tokenizers` file beside it (atomically), checked
    against `tokenizers` on CHECKS; False, and nothing written, where the file is not a
    tokenizer they can stand for or they would give other ids."""
    from tokenizers import Tokenizer

    config = json.loads(tokenizer_json.read_text(encoding="utf-8"))
    layout = Layout.of(config)
    if layout is None:
        return False
    merges = [m.split(" ") if isinstance(m, str) else m for m in config["model"]["merges"]]
    if any(len(m) != 2 for m in merges):
        return False

    def write(tmp: Path) -> None:
        db = sqlite3.connect(tmp)
        try:
            db.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT)")
            db.execute("CREATE TABLE vocab (token TEXT PRIMARY KEY, id INTEGER) WITHOUT ROWID")
            db.execute("CREATE TABLE merges (pair TEXT PRIMARY KEY, rank INTEGER) WITHOUT ROWID")
            meta = {"format": FORMAT, **layout.__dict__}
            db.execute("INSERT INTO meta VALUES ('layout', ?)", (json.dumps(meta),))
            db.executemany("INSERT INTO vocab VALUES (?, ?)", config["model"]["vocab"].items())
            # "a b": a pair of tokens never holds a space on the ASCII path; a pair listed
            # twice keeps its last rank, as in `tokenizers`
            pairs = ((f"{a} {b}", r) for r, (a, b) in enumerate(merges) if " " not in a + b)
            db.executemany("INSERT OR REPLACE INTO merges VALUES (?, ?)", pairs)
            db.commit()
        finally:
            db.close()
        tables = Tables(tmp)
        try:
            got = [tables.encode(t) for t in CHECKS]
        except KeyError as e:
            raise _MismatchError(str(e)) from e
        finally:
            tables.close()
        if got != want:
            raise _MismatchError("other token ids")

    tokenizer = Tokenizer.from_file(str(tokenizer_json))
    tokenizer.no_padding()
    want = [e.ids for e in tokenizer.encode_batch(CHECKS)]
    try:
        write_atomic(table_path(tokenizer_json), write)
    except _MismatchError:
        return False
    return True


class _MismatchError(Exception):
    pass


class Tables:
    """CLIP's BPE from the tables: ASCII text -> token ids, as `tokenizers` gives them."""

    def __init__(self, path: Path) -> None:
        # immutable: no locks, no journal (the file is replaced whole, never changed); a
        # tower is often loaded on one thread and used on others (one at a time: _lock)
        uri = f"{path.resolve().as_uri()}?immutable=1"
        self.db = sqlite3.connect(uri, uri=True, check_same_thread=False)
        self._lock = threading.Lock()
        meta = json.loads(self.db.execute("SELECT value FROM meta").fetchone()[0])
        if meta.pop("format") != FORMAT:
            raise ValueError(f"{path}: BPE tables of another format")
        self.layout = Layout(**meta)
        self._split = re.compile(self.layout.pattern)
        self._cache: dict[str, list[int]] = {}

    def close(self) -> None:
        self.db.close()

    def _ranks(self, pairs: set[str]) -> dict[str, int]:
        marks = ",".join("?" * len(pairs))
        query = f"SELECT pair, rank FROM merges WHERE pair IN ({marks})"
        return dict(self.db.execute(query, tuple(pairs)).fetchall())

    def _word(self, piece: str) -> list[int]:
        """One pre-tokenized piece: merge the lowest-ranked pair until none is left."""
        if piece in self._cache:
            return self._cache[piece]
        word = [*piece[:-1], piece[-1] + self.layout.suffix]
        known: dict[str, int] = {}
        while len(word) > 1:
            pairs = {f"{a} {b}" for a, b in itertools.pairwise(word)}
            if new := pairs - known.keys():
                known.update(dict.fromkeys(new, -1) | self._ranks(new))
            ranked = [(known[p], p) for p in pairs if known[p] >= 0]
            if not ranked:
                break
            first, second = min(ranked)[1].split(" ")
            merged, i = [], 0
            while i < len(word):
                if i + 1 < len(word) and word[i] == first and word[i + 1] == second:
                    merged.append(first + second)
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = merged
        marks = ",".join("?" * len(word))
        query = f"SELECT token, id FROM vocab WHERE token IN ({marks})"
        ids = dict(self.db.execute(query, tuple(word)).fetchall())
        if len(ids) != len(set(word)):
            raise KeyError(f"tokens missing from the vocabulary: {set(word) - ids.keys()}")
        if len(self._cache) >= MAX_CACHED:  # a server meets words without end: start over
            self._cache.clear()
        self._cache[piece] = out = [ids[t] for t in word]
        return out

    def encode(self, text: str) -> list[int]:
        """The ids of printable ASCII `text` (call `handles` first), bos and eos added."""
        pieces = [m.group(0) for m in self._split.finditer(text)]
        with self._lock:
            ids = [i for piece in pieces for i in self._word(piece)]
        if self.layout.max_length is not None:
            ids = ids[: max(self.layout.max_length - 2, 0)]
        return [self.layout.bos, *ids, self.layout.eos]


def handles(text: str) -> bool:
    return text.isascii() and text.isprintable()


class TextTokenizer:
    """A saved `tokenizers` file's ids and attention masks for a batch of texts, padded
    as the file says: from the BPE tables where they exist and the text is plain ASCII."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._tokenizer: Any = None
        self.tables: Tables | None = None
        tables = table_path(path)
        if tables.exists():
            try:
                self.tables = Tables(tables)
            except (sqlite3.Error, ValueError, TypeError, KeyError):
                self.tables = None  # unreadable: `tokenizers` does it all

    @property
    def tokenizer(self) -> Any:
        """`tokenizers.Tokenizer` itself, loaded on first use."""
        if self._tokenizer is None:
            from tokenizers import Tokenizer  # ~0.1 s with the file: only where needed

            self._tokenizer = Tokenizer.from_file(str(self.path))
        return self._tokenizer

    def __call__(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        tables = self.tables
        try:
            if tables is not None and all(handles(t) for t in texts):
                return self._from_tables(tables, [tables.encode(t) for t in texts])
        except KeyError:  # a token the vocabulary lacks: `tokenizers` knows what to do
            pass
        batch = self.tokenizer.encode_batch(list(texts))
        ids = np.array([e.ids for e in batch], dtype=np.int64)
        return ids, np.array([e.attention_mask for e in batch], dtype=np.int64)

    @staticmethod
    def _from_tables(tables: Tables, rows: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
        layout = tables.layout
        width = max([layout.pad_to or 0, *(len(r) for r in rows)])
        ids = np.full((len(rows), width), layout.pad_id, dtype=np.int64)
        mask = np.zeros((len(rows), width), dtype=np.int64)
        for i, row in enumerate(rows):
            ids[i, : len(row)] = row
            mask[i, : len(row)] = 1
        return ids, mask
