"""The command line, in-process (fast) and once as a real subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cliplens.cli.main import main

LABELS = "cat,dog,car,coffee,rocket,horse,astronaut"


def run(capsys, *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_classify_cat_json_offline(capsys, photos):
    code, out, err = run(
        capsys,
        "classify",
        str(photos / "cat.jpg"),
        "--model",
        "offline",
        "--labels",
        "cat,dog,car,coffee,rocket",
        "--format",
        "json",
    )
    assert code == 0, err
    data = json.loads(out)
    assert data[0]["path"].endswith("cat.jpg")
    assert data[0]["labels"][0]["label"] == "cat"
    scores = [lb["score"] for lb in data[0]["labels"]]
    assert scores == sorted(scores, reverse=True)


def test_classify_folder_csv_and_table(capsys, photos, tiny_model_dir):
    code, out, _ = run(
        capsys,
        "classify",
        str(photos),
        "--model",
        f"local:{tiny_model_dir}",
        "--labels",
        LABELS,
        "--format",
        "csv",
        "--top-k",
        "2",
    )
    assert code == 0
    lines = out.strip().splitlines()
    assert lines[0] == "path,rank,label,score"
    assert len(lines) - 1 == 2 * len(list(photos.iterdir()))
    code, out, _ = run(
        capsys,
        "classify",
        str(photos / "cat.jpg"),
        "--model",
        f"local:{tiny_model_dir}",
        "--labels",
        LABELS,
    )
    assert code == 0 and "cat.jpg" in out


def test_bad_images_are_skipped_with_one_line_each(capsys, photos, tmp_path, tiny_model_dir):
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "notes.jpg").write_text("hello")
    data = (photos / "cat.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) * 2 // 5])
    code, out, err = run(
        capsys,
        "classify",
        str(photos / "cat.jpg"),
        str(tmp_path / "empty.jpg"),
        str(tmp_path / "notes.jpg"),
        str(tmp_path / "cut.jpg"),
        str(tmp_path / "missing.png"),
        "--model",
        f"local:{tiny_model_dir}",
        "--labels",
        LABELS,
        "--format",
        "json",
    )
    assert code == 0
    assert len(json.loads(out)) == 1
    warnings = [line for line in err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 4
    for name in ("empty.jpg", "notes.jpg", "cut.jpg", "missing.png"):
        assert sum(name in w for w in warnings) == 1
    assert "Traceback" not in err
    assert "skipped 4" in err


def test_exit_code_when_nothing_classified(capsys, tmp_path, tiny_model_dir):
    (tmp_path / "notes.jpg").write_text("hello")
    code, _, err = run(
        capsys,
        "classify",
        str(tmp_path / "notes.jpg"),
        "--model",
        f"local:{tiny_model_dir}",
        "--labels",
        "a,b",
    )
    assert code == 1
    assert "notes.jpg" in err and "Traceback" not in err


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--labels", "a,b", "--labels-file", "x"], "labels once"),
        (["--labels", "a", "--model", "ViT-B-33:openai"], "did you mean"),
        (["--labels", "a", "--templates", "nope.txt"], "templates"),
        (["--labels", "a", "--precision", "fp8"], "precision"),
    ],
)
def test_usage_errors_are_one_line(capsys, photos, args, needle):
    code, _, err = run(capsys, "classify", str(photos / "cat.jpg"), *args)
    assert code == 2
    assert needle in err and err.count("\n") == 1 and err.startswith("error:")


def test_empty_folder_and_unexpected_errors(capsys, tmp_path, monkeypatch):
    code, _, err = run(capsys, "classify", str(tmp_path), "--labels", "a,b")
    assert code == 2 and f"no images under {tmp_path} " in err and err.count("\n") == 1
    named = tmp_path / "holiday.jpg"  # a folder named like a photo, empty
    named.mkdir()
    code, _, err = run(capsys, "score", str(named), "--prompt", "a cat")
    assert code == 2 and f"no images under {named} " in err and err.count("\n") == 1

    def boom(*args, **kwargs):
        raise OSError("disk on fire")

    monkeypatch.setattr("cliplens.models.ref.load_model", boom)  # what ModelRef builds with
    (tmp_path / "x.png").write_bytes(b"")
    monkeypatch.delenv("CLIPLENS_DEBUG", raising=False)
    code, _, err = run(capsys, "classify", str(tmp_path), "--labels", "a,b")
    assert code == 1 and "disk on fire" in err and "Traceback" not in err


def test_models_list_and_info(capsys):
    code, out, _ = run(capsys, "models", "--format", "json")
    assert code == 0
    entries = {e["name"]: e for e in json.loads(out)}
    assert entries["offline"]["cached"] is True
    assert entries["ViT-B-32-256:datacomp_s34b_b86k"]["default"] is True
    assert len(entries) > 100
    code, out, _ = run(
        capsys, "models", "info", "ViT-B-32-256:datacomp_s34b_b86k", "--format", "json"
    )
    info = json.loads(out)
    assert (info["dim"], info["image_size"], info["params_m"]) == (512, 256, 151.3)
    assert info["preprocessing"]["interpolation"] == "bicubic"
    code, out, _ = run(capsys, "models", "info", "offline", "--format", "json")
    assert json.loads(out)["dim"] == 384


def test_datasets_photos(capsys, tmp_path):
    code, _, err = run(capsys, "datasets", "photos", str(tmp_path / "p"))
    assert code == 0 and (tmp_path / "p" / "cat.jpg").is_file()
    assert "wrote 7 photos" in err


def test_subprocess_entry_point(photos):
    """The installed console script: exit codes and stdout/stderr as a shell sees them."""
    exe = Path(sys.executable).with_name("cliplens")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "cliplens.cli.main"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    ok = subprocess.run(
        [
            *cmd,
            "classify",
            str(photos / "cat.jpg"),
            "--model",
            "offline",
            "--labels",
            "cat,dog,car,coffee,rocket",
            "--format",
            "json",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)[0]["labels"][0]["label"] == "cat"
    bad = subprocess.run(
        [*cmd, "classify", str(photos / "cat.jpg"), "--labels", "a", "--model", "nonsense-model:x"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert bad.returncode == 2
    assert bad.stderr.startswith("error:") and "Traceback" not in bad.stderr
