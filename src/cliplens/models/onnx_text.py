"""Text queries without torch: a model's text tower exported once to ONNX.

Importing torch and building a CLIP model costs seconds; a one-shot `cliplens search
"a red boat"` needs only the text tower. The first time a model is loaded for search
or indexing, its text tower is exported in fp32 to CLIPLENS_HOME/text/<model_id>/
together with a `tokenizers` tokenizer that reproduces the backend's token ids. The
export is checked before it is kept (same token ids, cosine >= 0.9999 to the PyTorch
tower on a fixed set of texts); otherwise queries simply go through PyTorch.

This module imports neither torch nor open_clip until `export_text` is called.
"""

from __future__ import annotations

import contextlib
import html
import json
import os
import re
import shutil
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from cliplens.models.bpe import TextTokenizer, write_tables
from cliplens.settings import get_settings
from cliplens.store.files import read_record, write_atomic

if TYPE_CHECKING:
    from cliplens.models.info import ModelInfo
    from cliplens.models.torch_encoder import TorchEncoder

FORMAT = 2  # 2: the BPE tables beside the tokenizer (models.bpe)
GRAPH = "text.opt.onnx"  # + text.opt.data (the weights)
MIN_COSINE = 0.9999
# texts the export must reproduce: cases, punctuation, digits, entities, accents, CJK,
# emoji, whitespace runs, and a text longer than any context (truncation)
PROBES = [
    "a photo of a cat",
    "A Red BOAT at sunset!",
    "two dogs, three cats & 4 birds",
    "it's the photographer's 35mm lens",
    "café crème brûlée",
    "東京タワー at night",
    "a 🐱 on a sofa",
    "  lots   of\tspace\n here ",
    "Tom &amp; Jerry",
    "x",
    "",
    " ".join(["a very long description of a crowded market street"] * 30),
]


@dataclass
class TextGraph:
    """What a backend hands over for export (built by Encoder.text_graph)."""

    module: Any  # torch module, fp32: (ids[, mask]) -> (B, D) unnormalised embeddings
    tokenizer: Any  # tokenizers.Tokenizer with truncation and padding set
    cleaner: str  # "clip": ftfy + html unescape + whitespace + lower; "none"
    with_mask: bool  # the module takes an attention mask as second input
    any_length: bool  # the module takes any number of tokens (else the padded context)
    token_ids: Callable[[list[str]], list[list[int]]]  # the backend's own ids, unpadded


def padded_tokenizer(hf: Any, max_length: int) -> Any:
    """The `tokenizers` pipeline of a transformers fast tokenizer, cut at `max_length` and
    padded with its pad token: a TextGraph's tokenizer."""
    from tokenizers import Tokenizer  # only for an ONNX export

    tok = Tokenizer.from_str(hf.backend_tokenizer.to_str())
    tok.enable_truncation(max_length=max_length)
    tok.enable_padding(pad_id=hf.pad_token_id or 0, pad_token=hf.pad_token or "[PAD]")
    return tok


def save_tokenizer(tokenizer: Any, path: Path) -> None:
    """Save a `tokenizers` Tokenizer so that it loads fast, and check that the saved file
    gives the same token ids on the probes.

    A byte-level BPE's merges go out as "a b" strings, not pairs: `Tokenizer.from_file`
    reads them about 25% faster (70 against 93 ms for CLIP's 48,894 merges here), which a
    one-shot query waits for. Pairs stay where a token holds a space (the string form
    could not be split back)."""
    from tokenizers import Tokenizer

    config = json.loads(tokenizer.to_str())
    merges = config.get("model", {}).get("merges")
    if merges and all(isinstance(m, list) and " " not in "".join(m) for m in merges):
        config["model"]["merges"] = [" ".join(m) for m in merges]
    want = [e.ids for e in tokenizer.encode_batch(PROBES)]

    def write(tmp: Path) -> None:
        tmp.write_text(json.dumps(config, ensure_ascii=False), encoding="utf-8")
        if [e.ids for e in Tokenizer.from_file(str(tmp)).encode_batch(PROBES)] != want:
            raise RuntimeError(f"{path.name}: the saved tokenizer gives other token ids")

    write_atomic(path, write)
    write_tables(path)  # where it is CLIP's BPE: a one-shot query need not parse the file


def _optimise(source: Path, target: Path) -> None:
    """Save ONNX Runtime's portable graph optimisations, weights in a separate file that
    loads without being parsed as protobuf."""
    import onnxruntime as ort  # optional, and ~0.2 s: only where a tower is used

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    opts.optimized_model_filepath = str(target)
    config = {
        "session.optimized_model_external_initializers_file_name": target.stem + ".data",
        "session.optimized_model_external_initializers_min_size_in_bytes": "1024",
    }
    for key, value in config.items():
        opts.add_session_config_entry(key, value)
    ort.InferenceSession(str(source), opts, providers=["CPUExecutionProvider"])


def folder_for(model_id: str) -> Path:
    return get_settings().home / "text" / re.sub(r"[^A-Za-z0-9._-]+", "_", model_id)


def clean_clip(text: str) -> str:
    """open_clip's 'lower' cleaning: ftfy, html unescape twice, collapse whitespace, lower."""
    if not (text.isascii() and text.isprintable()):
        import ftfy  # only non-ASCII text needs it (0.1 s to import)

        text = ftfy.fix_text(text)
    text = html.unescape(html.unescape(text))
    return " ".join(text.split()).lower()


CLEANERS: dict[str, Callable[[str], str]] = {"clip": clean_clip, "none": lambda t: t}


class OnnxTextEncoder:
    """encode_texts through ONNX Runtime: float32, L2-normalised rows."""

    def __init__(self, folder: Path, prepack: bool = False) -> None:
        """`prepack` lays the weights out for speed: +0.2 s to load, -5 ms a batch; worth
        it for a long-lived process, not for a one-shot query."""
        import onnxruntime as ort  # optional, and ~0.2 s: only where a tower is used

        self.folder = folder
        self.meta = json.loads((folder / "meta.json").read_text())
        self.tokenizer = TextTokenizer(folder / "tokenizer.json")
        self._clean = CLEANERS[self.meta["cleaner"]]
        opts = ort.SessionOptions()
        opts.log_severity_level = 4  # failures surface as exceptions
        # the graph was optimised at export; skipping that here makes loading 6x faster
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        if not prepack:
            opts.add_session_config_entry("session.disable_prepacking", "1")
        # threads that spin after a run take the core the query's product over the
        # catalog needs next (a one-shot query over 100k vectors: 37-52 against 17-28 ms)
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(
            str(folder / GRAPH), opts, providers=["CPUExecutionProvider"]
        )

    @property
    def model_id(self) -> str:
        return self.meta["model_id"]

    def token_ids(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        return self.tokenizer([self._clean(str(t)) for t in texts])

    def encode_texts(self, texts: Sequence[str], batch_size: int = 64) -> np.ndarray:
        rows = []
        for start in range(0, len(texts), batch_size):
            ids, mask = self.token_ids(texts[start : start + batch_size])
            feed = {"ids": ids} | ({"mask": mask} if self.meta["with_mask"] else {})
            rows.append(self.session.run(None, feed)[0].astype(np.float32))
        if not rows:
            return np.zeros((0, self.meta["dim"]), np.float32)
        x = np.concatenate(rows)
        return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def _enabled() -> bool:
    return os.environ.get("CLIPLENS_FAST_TEXT", "1") != "0"


def _meta(model_id: str) -> dict[str, Any] | None:
    return read_record(folder_for(model_id) / "meta.json", FORMAT, model_id)


def attempted(model_id: str) -> bool:
    """Whether an export of `model_id` was tried (and either kept or found unsupported)."""
    return _meta(model_id) is not None


def exported(model_id: str) -> bool:
    """Whether `model_id` has a checked export (without loading it)."""
    meta = _meta(model_id)
    return meta is not None and not meta.get("unsupported")


def find_text_encoder(model_id: str) -> OnnxTextEncoder | None:
    """The exported text tower of `model_id`, or None (not exported, or no onnxruntime)."""
    if not _enabled() or not exported(model_id):
        return None
    try:
        return OnnxTextEncoder(folder_for(model_id))
    except ImportError:
        return None


def can_export() -> bool:
    if not _enabled():
        return False
    try:
        import onnxruntime  # noqa: F401 (optional: is it installed?)
    except ImportError:
        return False
    return True


def export_text(encoder: TorchEncoder) -> OnnxTextEncoder | None:
    """Export `encoder`'s text tower (load it in fp32 for an exact tower) and check it.

    Returns the ready encoder, or None when the backend cannot be exported or the check
    fails; then only a note of why stays on disk (so it is not retried) and queries keep
    using PyTorch.
    """
    import torch  # only to export: queries through this module never import it

    graph = encoder.text_graph()
    if graph is None:
        return _unsupported(encoder.info, "this backend's tokenizer or tower is not exportable")
    graph.module.eval()  # the exporter restores the mode it finds: make that inference
    info = encoder.info
    final = folder_for(info.model_id)
    tmp = final.with_name(f".{final.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        clean = CLEANERS[graph.cleaner]
        batch = graph.tokenizer.encode_batch([clean(t) for t in PROBES])
        ours = [[i for i, m in zip(e.ids, e.attention_mask, strict=True) if m] for e in batch]
        if ours != graph.token_ids(PROBES):
            return _unsupported(info, "the exported tokenizer gives other token ids")
        with warnings.catch_warnings(), torch.inference_mode():
            warnings.simplefilter("ignore")
            # what the backend itself gives, full context and all
            want = encoder.encode_texts(PROBES)
            _export_onnx(graph, batch, tmp / "text.onnx")
        _optimise(tmp / "text.onnx", tmp / GRAPH)
        for raw in tmp.glob("text.onnx*"):  # the exporter's graph and its weights file
            raw.unlink()
        save_tokenizer(graph.tokenizer, tmp / "tokenizer.json")
        meta = {
            "format": FORMAT,
            "model_id": info.model_id,
            "name": info.name,
            "dim": info.dim,
            "cleaner": graph.cleaner,
            "with_mask": graph.with_mask,
        }
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        fast = OnnxTextEncoder(tmp)
        # other batch shapes than the traced one: one text at a time, and in reverse
        try:
            got = np.concatenate([fast.encode_texts([t]) for t in PROBES])
            backwards = fast.encode_texts(PROBES[::-1])[::-1]
        except Exception as e:  # e.g. a shape the trace fixed
            return _unsupported(info, f"the exported tower fails on other shapes ({e})")
        cosine = float(min((got * want).sum(1).min(), (backwards * want).sum(1).min()))
        if cosine < MIN_COSINE:
            return _unsupported(info, f"the exported tower reaches cosine {cosine:.5f} only")
        meta["min_cosine"] = round(cosine, 7)
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        shutil.rmtree(final, ignore_errors=True)
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp.replace(final)
        return OnnxTextEncoder(final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _export_onnx(graph: TextGraph, batch: list[Any], path: Path) -> None:
    """torch.onnx.export of the text tower, traced on the tokenized probes `batch`."""
    import torch  # see export_text

    ids = torch.tensor([e.ids for e in batch])
    mask = torch.tensor([e.attention_mask for e in batch])
    args = (ids, mask) if graph.with_mask else (ids,)
    names = ["ids", "mask"] if graph.with_mask else ["ids"]
    # torch.export keeps sizes symbolic (the TorchScript exporter bakes attention's
    # sequence length into reshapes)
    dims = {0: torch.export.Dim("batch")}
    if graph.any_length:
        dims[1] = torch.export.Dim("tokens", min=2, max=ids.shape[1])
    shapes = {name: dims for name in names}  # the modules' forward() argument names
    torch.onnx.export(
        graph.module,
        args,
        str(path),
        dynamo=True,
        input_names=names,
        output_names=["vectors"],
        dynamic_shapes=shapes,
        verbose=False,
    )


def _unsupported(info: ModelInfo, reason: str) -> None:
    """Remember that this model keeps the PyTorch path, so it is not tried again."""
    folder = folder_for(info.model_id)
    meta = {"format": FORMAT, "model_id": info.model_id, "unsupported": reason}
    with contextlib.suppress(OSError):
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "meta.json").write_text(json.dumps(meta, indent=1))
    return None
