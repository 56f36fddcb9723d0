"""The training loop: it learns, it resumes exactly, locks hold, its model loads everywhere."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from cliplens.cli.main import main
from cliplens.datasets.shapes import class_names, write_shapes
from cliplens.train.clip import ClipTrainConfig, build_model, train_clip
from cliplens.train.data import read_pairs

TINY = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8, "head_width": 32},
    "text_cfg": {"context_length": 24, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes")
    write_shapes(root, n=200, seed=0, size=32, val_fraction=0.1)
    return root


def config(**kw) -> ClipTrainConfig:
    base = dict(
        model_cfg=TINY,
        arch="tiny-shapes",
        epochs=50,
        batch_size=32,
        lr=2e-3,
        warmup_steps=5,
        checkpoint_every=1000,
    )
    return ClipTrainConfig(**(base | kw))


def test_training_lowers_the_loss(shapes, tmp_path):
    pairs = read_pairs(shapes / "train.jsonl")
    result = train_clip(config(), pairs, tmp_path / "run", max_steps=30)
    assert result.steps == 30 and result.stopped_early
    assert np.mean(result.losses[-5:]) < np.mean(result.losses[:5]) - 0.3
    log = [json.loads(x) for x in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if "loss" in r] == list(range(1, 31))


def test_one_step_lowers_the_loss_on_a_fixed_batch(shapes, tmp_path):
    from cliplens.train.clip import Pairs
    from cliplens.train.loss import clip_loss

    batch = read_pairs(shapes / "train.jsonl")[:32]  # the whole data is one batch
    cfg = config(batch_size=32, warmup_steps=1, lr=1e-4)  # a small step: the gradient's way
    result = train_clip(cfg, batch, tmp_path / "one", max_steps=1)
    model, tokenizer = build_model(cfg)
    model.load_state_dict(torch.load(tmp_path / "one" / "last.pt", weights_only=False)["model"])
    pixels, tokens = Pairs(batch, model, tokenizer).batch(np.arange(32))
    with torch.no_grad():
        img = model.encode_image(pixels, normalize=True)
        txt = model.encode_text(tokens, normalize=True)
        after = clip_loss(img, txt, model.logit_scale.exp())
    assert float(after) < result.losses[0] - 0.05  # losses[0] is the loss before the step


def test_resume_continues_the_loss_curve_exactly(shapes, tmp_path):
    pairs = read_pairs(shapes / "train.jsonl")
    straight = train_clip(config(), pairs, tmp_path / "a", max_steps=16)
    first = train_clip(config(), pairs, tmp_path / "b", max_steps=8)
    resumed = train_clip(config(), pairs, tmp_path / "b", max_steps=16)  # picks up last.pt
    assert first.losses == pytest.approx(straight.losses[:8], abs=1e-6)
    assert len(resumed.losses) == 8
    np.testing.assert_allclose(resumed.losses, straight.losses[8:], atol=1e-6)
    with pytest.raises(ValueError, match="other settings"):
        train_clip(config(lr=1e-4), pairs, tmp_path / "b", max_steps=20)


def test_locked_image_tower_does_not_move(shapes, tmp_path):
    pairs = read_pairs(shapes / "train.jsonl")
    before, _ = build_model(config())
    train_clip(config(lock="image"), pairs, tmp_path / "lit", max_steps=5)
    state = torch.load(tmp_path / "lit" / "last.pt", weights_only=False)["model"]
    for name, value in before.state_dict().items():
        if name.startswith("visual."):
            assert torch.equal(value, state[name]), name
    assert not torch.equal(before.state_dict()["text_projection"], state["text_projection"])


def test_trained_model_evaluates_and_loads_for_every_task(shapes, tmp_path, capsys):
    pairs = read_pairs(shapes / "train.jsonl")
    val = read_pairs(shapes / "val.jsonl")
    rows = [json.loads(x) for x in (shapes / "heldout.jsonl").read_text().splitlines()]
    held = [
        (p, f"{r['objects'][0]['colour']} {r['objects'][0]['kind']}")
        for p, r in zip(read_pairs(shapes / "heldout.jsonl"), rows, strict=True)
        if len(r["objects"]) == 1
    ]
    result = train_clip(config(epochs=1, classes=class_names()), pairs, tmp_path / "run", val, held)
    [m] = result.metrics
    assert {"i2t_R@1", "t2i_R@10", "zero_shot_accuracy"} <= set(m)
    assert 0 <= m["zero_shot_accuracy"] <= 1 and m["zero_shot_n"] == len(held)
    model = f"local:{result.model_path}"
    image = str(pairs[0].image)
    assert (
        main(
            [
                "classify",
                image,
                "--model",
                model,
                "--labels",
                "red circle,blue square",
                "--format",
                "json",
            ]
        )
        == 0
    )
    assert json.loads(capsys.readouterr().out)[0]["labels"][0]["label"] in {
        "red circle",
        "blue square",
    }
    db = str(tmp_path / "catalog.db")
    assert main(["index", str(shapes / "images"), "--model", model, "--db", db]) == 0
    capsys.readouterr()
    assert (
        main(
            [
                "search",
                "a red circle",
                "--in",
                str(shapes / "images"),
                "--model",
                model,
                "--db",
                db,
                "-n",
                "3",
                "--format",
                "json",
            ]
        )
        == 0
    )
    hits = json.loads(capsys.readouterr().out)
    assert len(hits) == 3 and all(h["path"].endswith(".png") for h in hits)


def test_train_cli_runs_and_reports(shapes, tmp_path, capsys):
    cfg = tmp_path / "tiny.json"
    cfg.write_text(json.dumps(TINY))
    code = main(
        [
            "train",
            "clip",
            "--data",
            str(shapes / "train.jsonl"),
            "--val",
            str(shapes / "val.jsonl"),
            "--zero-shot",
            str(shapes / "heldout.jsonl"),
            "--classes",
            str(shapes / "classes.txt"),
            "--model-config",
            str(cfg),
            "--templates",
            str(shapes / "templates.txt"),
            "--epochs",
            "1",
            "--batch-size",
            "32",
            "--out",
            str(tmp_path / "run"),
            "--format",
            "json",
        ]
    )
    report = json.loads(capsys.readouterr().out)
    assert code == 0 and report["epochs"] == 1 and report["model"]
    assert "zero_shot_accuracy" in report["metrics"][0]
    assert (
        main(
            [
                "train",
                "clip",
                "--data",
                str(shapes / "train.jsonl"),
                "--out",
                str(tmp_path / "x"),
                "--model-config",
                "huge",
            ]
        )
        == 2
    )
    assert "--model-config huge" in capsys.readouterr().err
    bad = tmp_path / "bad-templates.txt"
    bad.write_text("no placeholder here\n")
    assert (
        main(
            [
                "train",
                "clip",
                "--data",
                str(shapes / "train.jsonl"),
                "--out",
                str(tmp_path / "y"),
                "--templates",
                str(bad),
            ]
        )
        == 2
    )
    assert "each with {}" in capsys.readouterr().err


def test_two_processes_take_the_same_steps_as_one(shapes, tmp_path):
    """torchrun with 2 CPU processes (gloo), 16 rows each, against 1 process with 32."""
    import os
    import subprocess
    import sys

    cfg = tmp_path / "tiny.json"
    cfg.write_text(json.dumps(TINY))
    args = [
        "train",
        "clip",
        "--data",
        str(shapes / "train.jsonl"),
        "--model-config",
        str(cfg),
        "--epochs",
        "1",
        "--batch-size",
        "32",
        "--lr",
        "2e-3",
        "--warmup",
        "2",
    ]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "OMP_NUM_THREADS": "1"}
    one = subprocess.run(
        [sys.executable, "-m", "cliplens.cli.main", *args, "--out", str(tmp_path / "one")],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert one.returncode == 0, one.stderr
    two = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            "2",
            "-m",
            "cliplens.cli.main",
            *args,
            "--out",
            str(tmp_path / "two"),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert two.returncode == 0, two.stderr[-3000:]

    def losses(run):
        rows = (tmp_path / run / "log.jsonl").read_text().splitlines()
        return [json.loads(x)["loss"] for x in rows if '"loss"' in x]

    assert len(losses("one")) == len(losses("two")) == 5  # 180 pairs, 32 a step
    np.testing.assert_allclose(losses("two"), losses("one"), rtol=1e-4)
    a = torch.load(tmp_path / "one" / "last.pt", weights_only=False)["model"]
    b = torch.load(tmp_path / "two" / "last.pt", weights_only=False)["model"]
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-4


def test_fine_tuning_starts_from_the_initial_model(shapes, tmp_path, tiny_model_dir):
    from cliplens.models.openclip import load_local

    pairs = read_pairs(shapes / "train.jsonl")
    cfg = config(init=f"local:{tiny_model_dir}", model_cfg={}, lr=1e-4, epochs=1)
    result = train_clip(cfg, pairs, tmp_path / "ft", max_steps=3)
    saved = json.loads((result.model_path / "open_clip_config.json").read_text())
    from conftest import TINY_CFG

    assert saved["model_cfg"] == TINY_CFG
    initial = load_local("a", tiny_model_dir, torch.device("cpu"), _fp32()).model.state_dict()
    tuned = load_local("b", result.model_path, torch.device("cpu"), _fp32()).model.state_dict()
    moved = [k for k in initial if not torch.equal(initial[k], tuned[k])]
    assert moved  # it trained
    w = "visual.transformer.resblocks.0.mlp.c_fc.weight"
    assert (tuned[w] - initial[w]).norm() < 0.05 * initial[w].norm()  # from the initial weights
    code = main(
        [
            "train",
            "clip",
            "--data",
            str(shapes / "train.jsonl"),
            "--out",
            str(tmp_path),
            "--init",
            "offline",
            "--model-config",
            "tiny-shapes",
        ]
    )
    assert code == 2


def _fp32():
    from cliplens.device import Precision

    return Precision("fp32")


def test_siglip_fine_tuning_of_a_clip_starts_at_siglips_scale_and_bias(
    shapes, tmp_path, tiny_model_dir
):
    """A CLIP has no bias and a temperature learnt without one: both start at SigLIP's
    init (t' = log 10, b = -10); a SigLIP checkpoint keeps its own."""
    import math

    pairs = read_pairs(shapes / "train.jsonl")
    cfg = config(init=f"local:{tiny_model_dir}", model_cfg={}, loss="siglip", lr=1e-7, epochs=1)
    result = train_clip(cfg, pairs, tmp_path / "ft", max_steps=1)
    state = torch.load(tmp_path / "ft" / "last.pt", weights_only=False)["model"]
    assert float(state["logit_scale"]) == pytest.approx(math.log(10), abs=1e-3)
    assert float(state["logit_bias"]) == pytest.approx(-10, abs=1e-3)
    from cliplens.models.openclip import load_local

    clip_scale = load_local("a", tiny_model_dir, torch.device("cpu"), _fp32()).model.logit_scale
    assert abs(float(clip_scale) - math.log(10)) > 0.1  # the CLIP's own was another
    # a SigLIP checkpoint (this run's model, its scale and bias moved) keeps its own
    from safetensors.torch import load_file, save_file

    weights = result.model_path / "open_clip_model.safetensors"
    moved = load_file(str(weights)) | {
        "logit_scale": torch.tensor(1.5),
        "logit_bias": torch.tensor(-3.0),
    }
    save_file(moved, str(weights))
    again = config(init=f"local:{result.model_path}", model_cfg={}, loss="siglip", lr=1e-7)
    train_clip(again, pairs, tmp_path / "ft2", max_steps=1)
    kept = torch.load(tmp_path / "ft2" / "last.pt", weights_only=False)["model"]
    assert float(kept["logit_scale"]) == pytest.approx(1.5, abs=1e-3)
    assert float(kept["logit_bias"]) == pytest.approx(-3.0, abs=1e-3)
