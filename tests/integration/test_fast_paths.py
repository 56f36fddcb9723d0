"""What a query or a no-op index must not pay for: loading the model, importing torch."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np

from cliplens.catalog.db import Catalog
from cliplens.catalog.update import update_catalog
from cliplens.cli.main import main
from cliplens.models.onnx_text import PROBES, find_text_encoder
from cliplens.models.ref import ModelRef, recorded_info
from cliplens.tasks.search import parse_query, query_vector, search
from conftest import TINY_CFG, make_photos, make_tiny_clip


def test_noop_index_does_not_load_the_model(tmp_path, tiny_model_dir):
    name = f"local:{tiny_model_dir}"
    folder = tmp_path / "p"
    make_photos(folder, 4)
    cat = Catalog(tmp_path / "c.db")
    first = ModelRef(name, device="cpu", precision="fp32")
    assert update_catalog(cat, first, [folder], workers=0).new == 4
    assert first.loaded

    again = ModelRef(name, device="cpu", precision="fp32")
    stats = update_catalog(cat, again, [folder], workers=0)
    assert stats.unchanged == 4 and stats.new == stats.changed == 0
    assert not again.loaded
    assert again.info.model_id == first.info.model_id

    make_photos(folder, 5, seed=1)  # 4 rewritten with new pixels, 1 new
    third = ModelRef(name, device="cpu", precision="fp32")
    stats = update_catalog(cat, third, [folder], workers=0)
    assert (stats.changed, stats.new) == (4, 1)
    assert third.loaded


def test_record_is_dropped_when_weights_change(tmp_path, tiny_model_dir):
    folder = tmp_path / "ckpt"
    shutil.copytree(tiny_model_dir, folder)
    name = f"local:{folder}"
    ref = ModelRef(name, device="cpu", precision="fp32")
    ref.load()
    recorded = recorded_info(name)
    assert recorded is not None and recorded.model_id == ref.info.model_id
    assert recorded.preprocessing == ref.info.preprocessing
    weights = next(p for p in folder.iterdir() if p.suffix in (".safetensors", ".bin", ".pt"))
    st = weights.stat()
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert recorded_info(name) is None


def test_text_tower_export_matches_pytorch(tiny_model_dir, fresh_home):
    name = f"local:{tiny_model_dir}"
    ref = ModelRef(name, device="cpu", precision="fp32")
    torch_encoder = ref.load()
    assert ref.needs_fast_text()  # not yet exported here: this test exports it
    assert ref.prepare_fast_text()
    assert not ref.needs_fast_text()
    fast = find_text_encoder(ref.info.model_id)
    assert fast is not None
    texts = [*PROBES, "a red boat on a lake", "Ünïcödé Straße"]
    want = torch_encoder.encode_texts(texts)
    got = fast.encode_texts(texts)
    assert got.shape == want.shape
    assert float((want * got).sum(1).min()) > 0.9999
    # the tokenizer was saved in the form that loads fast, and still gives the backend's ids
    saved = json.loads((fast.folder / "tokenizer.json").read_text(encoding="utf-8"))
    assert saved["model"]["merges"] and all(isinstance(m, str) for m in saved["model"]["merges"])
    ids, mask = fast.token_ids(texts)
    unpadded = [row[keep.astype(bool)].tolist() for row, keep in zip(ids, mask, strict=True)]
    assert unpadded == torch_encoder.text_graph().token_ids(texts)
    # CLIP's BPE tables beside it, which a one-shot query reads instead of the file
    assert fast.tokenizer.tables is not None

    fresh = ModelRef(name)  # a later process: text queries without loading the model
    vec = fresh.encode_texts(["a red boat on a lake"])
    assert not fresh.loaded
    np.testing.assert_allclose(vec[0], want[-2], atol=1e-4)


def test_a_saved_tokenizer_keeps_merges_it_cannot_write_as_strings(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    from cliplens.models.onnx_text import save_tokenizer

    vocab = {"a": 0, "b": 1, " ": 2, "ab": 3, "a ": 4, "a b": 5}
    bpe = models.BPE(vocab=vocab, merges=[("a", "b"), ("a", " "), ("a ", "b")])
    tok = Tokenizer(bpe)
    tok.pre_tokenizer = pre_tokenizers.Split("|", behavior="removed")
    save_tokenizer(tok, tmp_path / "t.json")
    merges = json.loads((tmp_path / "t.json").read_text())["model"]["merges"]
    assert merges == [["a", "b"], ["a", " "], ["a ", "b"]]  # "a  b" would not split back
    back = Tokenizer.from_file(str(tmp_path / "t.json"))
    assert back.encode("a b|ab|a b a").ids == tok.encode("a b|ab|a b a").ids == [5, 3, 5, 2, 0]


def test_offline_text_export_matches_pytorch(fresh_home):
    ref = ModelRef("offline", device="cpu", precision="fp32")
    texts = [*PROBES, "a cup of coffee"]
    before = ref.load().encode_texts(texts)
    assert ref.needs_fast_text()  # not yet exported here: this test exports it
    assert ref.prepare_fast_text()
    # exporting must leave the model as it was (the exporter restores the module's mode)
    np.testing.assert_allclose(ref.load().encode_texts(texts), before, atol=1e-6)
    fast = find_text_encoder(ref.info.model_id)
    assert float((before * fast.encode_texts(texts)).sum(1).min()) > 0.9999


def test_cli_runs_noop_index_and_text_query_without_torch(tmp_path, tiny_model_dir, capsys):
    """After one normal run, `index` (nothing new) and `search "text"` run with torch and
    open_clip made unimportable, and find what the PyTorch path finds."""
    name = f"local:{tiny_model_dir}"
    folder, db = tmp_path / "p", tmp_path / "c.db"
    make_photos(folder, 6)
    assert main(["index", str(folder), "--db", str(db), "--model", name]) == 0
    capsys.readouterr()
    cat = Catalog(db, readonly=True)
    ref = ModelRef(name)
    expected = [
        h.path
        for h in search(
            cat, ref.load(), query_vector(ref.load(), parse_query("a red boat"), cat), 3
        )
    ]

    blocker = tmp_path / "blocked"
    for mod in ("torch", "open_clip", "torchvision", "transformers"):
        (blocker / mod).mkdir(parents=True)
        (blocker / mod / "__init__.py").write_text(f"raise ImportError('{mod} is blocked')\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(blocker), *sys.path])}
    cmd = [sys.executable, "-m", "cliplens.cli.main"]
    noop = subprocess.run(
        [*cmd, "index", str(folder), "--db", str(db), "--model", name, "--format", "json"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert noop.returncode == 0, noop.stderr
    assert json.loads(noop.stdout)["unchanged"] == 6
    query = subprocess.run(
        [
            *cmd,
            "search",
            "a red boat",
            "--in",
            str(folder),
            "--db",
            str(db),
            "--model",
            name,
            "-n",
            "3",
            "--format",
            "json",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert query.returncode == 0, query.stderr
    assert [h["path"] for h in json.loads(query.stdout)] == expected
    # a photo that needs encoding does need torch: the error says so instead of hanging
    make_photos(folder / "new", 1, seed=9)
    needs = subprocess.run(
        [*cmd, "index", str(folder), "--db", str(db), "--model", name],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert needs.returncode != 0
    assert "blocked" in needs.stderr


def test_fast_text_can_be_switched_off(monkeypatch, tiny_model_dir):
    name = f"local:{tiny_model_dir}"
    assert ModelRef(name, device="cpu", precision="fp32").prepare_fast_text()
    monkeypatch.setenv("CLIPLENS_FAST_TEXT", "0")
    ref = ModelRef(name, device="cpu", precision="fp32")
    ref.encode_texts(["a cat"])
    assert ref.loaded  # went through PyTorch


def test_unexportable_model_is_noted_once(tmp_path, monkeypatch):
    from cliplens.models import onnx_text as fast_text
    from cliplens.models.openclip import OpenClipEncoder, save_checkpoint

    folder = save_checkpoint(make_tiny_clip(seed=5), tmp_path / "ckpt", TINY_CFG, arch="tiny-test")
    monkeypatch.setattr(OpenClipEncoder, "text_graph", lambda self: None)
    ref = ModelRef(f"local:{folder}", device="cpu", precision="fp32")
    assert ref.needs_fast_text()
    assert ref.prepare_fast_text() is False
    model_id = ref.info.model_id
    assert fast_text.attempted(model_id) and not fast_text.exported(model_id)
    assert not ref.needs_fast_text()  # not tried again
    assert find_text_encoder(model_id) is None


def test_the_command_exits_with_mains_code_and_its_objects_frozen(tmp_path):
    """`cliplens` (cli.main.run) skips the cycle collector's pass over every object at exit,
    and keeps main's exit code and what atexit handlers do."""
    probe = (
        "import atexit, gc, sys; "
        "atexit.register(lambda: print('frozen', gc.get_freeze_count() > 0)); "
        "from cliplens.cli.main import run; sys.argv[0] = 'cliplens'; run()"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    bad = subprocess.run(
        [sys.executable, "-c", probe, "search", "x", "--top", "0"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bad.returncode == 2, bad.stderr
    assert bad.stdout.strip() == "frozen True"
    assert bad.stderr.startswith("error: ")
    ok = subprocess.run(
        [sys.executable, "-c", probe, "--help"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.splitlines()[-1] == "frozen True"
