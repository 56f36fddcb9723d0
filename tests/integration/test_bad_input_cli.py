"""Bad input on the command line (issue 17, items 10 and 11): nonsense numbers, files that
are not what they should be, output paths that cannot be written. Each case must end in
one line that names the input, exit 2 (usage, bad values) or 1 (data), never "unexpected"
or a traceback, and leave nothing behind. Cases fail at validation, before any model
loads; the runs that diverge use the tiniest model and data there are."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from cliplens.cli.main import main

BINARY = bytes(range(256)) * 4  # not UTF-8 from byte 0x80 on


@pytest.fixture
def env(tmp_path: Path, photos: Path, tiny_model_dir: Path) -> dict[str, str]:
    """Names the argv templates use: {tmp}, {cat}, {photos}, {tiny}, {bin}, {file}..."""
    (tmp_path / "binary.dat").write_bytes(BINARY)
    (tmp_path / "binary.jsonl").write_bytes(BINARY)
    (tmp_path / "binary.csv").write_bytes(BINARY)
    (tmp_path / "afile").write_text("a regular file\n")
    (tmp_path / "adir").mkdir()
    (tmp_path / "movie.gif").mkdir()  # a folder with a file's name
    (tmp_path / "loop.jpg").symlink_to("loop.jpg")
    names = ("cat.jpg", "coffee.jpg", "rocket.jpg", "hubble.jpg")
    rows = [{"image": str(photos / n), "caption": f"a photo of {Path(n).stem}"} for n in names]
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    side = tmp_path / "sidecars"
    side.mkdir()
    shutil.copy(photos / "cat.jpg", side / "cat.jpg")
    (side / "cat.txt").write_bytes(BINARY)
    paths = {
        "tmp": tmp_path,
        "cat": photos / "cat.jpg",
        "photos": photos,
        "bin": tmp_path / "binary.dat",
        "file": tmp_path / "afile",
        "dir": tmp_path / "adir",
        "loop": tmp_path / "loop.jpg",
        "pairs": tmp_path / "pairs.jsonl",
        "out": tmp_path / "out",
        "side": side,
    }
    return {k: str(v) for k, v in paths.items()} | {"tiny": f"local:{tiny_model_dir}"}


def _tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def _run(capsys, argv: list[str]) -> tuple[int, str]:
    code = main(argv)
    return code, capsys.readouterr().err


def _assert_one_line(err: str, needles: tuple[str, ...]) -> None:
    lines = [x for x in err.splitlines() if x.strip()]
    assert len(lines) == 1, err
    assert "unexpected" not in err and "Traceback" not in err, err
    for needle in needles:
        assert needle in lines[0], (needle, err)


# (argv, exit code, substrings of the one line). {names} come from `env`.
TRAIN_ROBUST = "train robust --teacher {tiny} --data {photos} --out {out}"
NUMBERS = [
    # classify
    ("classify {cat} -l cat,dog --multi-label --threshold nan -m {tiny}", 2, ("--threshold",)),
    ("classify {cat} -l cat,dog --multi-label --threshold 2 -m {tiny}", 2, ("--threshold",)),
    ("classify {cat} -l cat --top-k 0 -m {tiny}", 2, ("--top-k",)),
    ("classify {cat} -l cat --top-k 1000000000000 -m {tiny}", 2, ("--top-k",)),
    ("classify {cat} -l cat --batch-size 0 -m {tiny}", 2, ("--batch-size",)),
    ("classify {cat} -l cat --max-megapixels inf -m {tiny}", 2, ("--max-megapixels",)),
    ("classify {cat} -l cat --max-megapixels -1 -m {tiny}", 2, ("--max-megapixels",)),
    # train clip: nothing may be written for these
    ("train clip --data {pairs} --out {out} --lr inf", 2, ("--lr", "finite")),
    ("train clip --data {pairs} --out {out} --lr nan", 2, ("--lr", "finite")),
    ("train clip --data {pairs} --out {out} --lr 0", 2, ("--lr",)),
    ("train clip --data {pairs} --out {out} --epochs 0", 2, ("--epochs",)),
    ("train clip --data {pairs} --out {out} --batch-size 1", 2, ("--batch-size",)),
    ("train clip --data {pairs} --out {out} --warmup -1", 2, ("--warmup",)),
    ("train clip --data {pairs} --out {out} --max-minutes nan", 2, ("--max-minutes",)),
    ("train clip --data {pairs} --out {out} --seed -1", 2, ("--seed",)),
    # train robust
    (f"{TRAIN_ROBUST} --clean-fraction 1", 2, ("--clean-fraction",)),
    (f"{TRAIN_ROBUST} --temperature inf", 2, ("--temperature",)),
    (f"{TRAIN_ROBUST} --align-weight nan", 2, ("--align-weight",)),
    (f"{TRAIN_ROBUST} --lr -inf", 2, ("--lr",)),
    (f"{TRAIN_ROBUST} --severity 1-99999999999", 2, ("severity",)),
    # caption
    ("caption train --data {pairs} --out {out} --lm-lr inf", 2, ("--lm-lr",)),
    ("caption train --data {pairs} --out {out} --lr nan", 2, ("--lr",)),
    ("caption train --data {pairs} --out {out} --max-steps 0", 2, ("--max-steps",)),
    ("caption train --data {pairs} --out {out} --lm-width 0", 2, ("--lm-width",)),
    ("caption run {cat} --captioner {dir} --top-p nan", 2, ("--top-p",)),
    ("caption run {cat} --captioner {dir} --temperature 0", 2, ("--temperature",)),
    ("caption run {cat} --captioner {dir} --beam 0", 2, ("--beam",)),
    ("caption run {cat} --captioner {dir} --max-tokens 0", 2, ("--max-tokens",)),
    ("caption eval --captioner {dir} --data {pairs} --limit 0", 2, ("--limit",)),
    # distributed
    ("build-index {dir} --out {out} --queries -1", 2, ("--queries",)),
    ("build-index {dir} --out {out} --checkpoint-minutes nan", 2, ("--checkpoint-minutes",)),
    ("embed-dataset {photos} --out {out} --max-megapixels nan", 2, ("--max-megapixels",)),
    # generate
    ("generate 'a cat' --size 100000 --out {tmp}/g.png", 2, ("--size", "8192")),
    ("generate 'a cat' --lr nan --out {tmp}/g.png", 2, ("--lr",)),
    ("generate 'a cat' --cutouts 100000 --out {tmp}/g.png", 2, ("--cutouts",)),
    ("generate 'a cat' --tv inf --out {tmp}/g.png", 2, ("--tv",)),
    ("generate 'a cat' --save-every -1 --out {tmp}/g.png", 2, ("--save-every",)),
    # score, rerank, moderate, quality, probe
    ("score {cat} --prompt cat --max-megapixels nan", 2, ("--max-megapixels",)),
    ("rerank cat {cat} -k 99999999999999999999999 -m {tiny}", 2, ("-k",)),
    ("quality {cat} --worst 99999999999999999999999 -m {tiny}", 2, ("--worst",)),
    ("probe kshot --data {dir} --shots 1,99999999999", 2, ("--shots",)),
    # datasets
    ("datasets shapes {out} --size 100000", 2, ("--size",)),
    ("datasets fashion-mnist {out} --offset -1", 2, ("--offset",)),
    ("datasets distortions {out} --levels 0", 2, ("--levels",)),
]

FILES = [
    # binary bytes where text was expected: one line naming the file
    ("moderate {cat} --policy {bin} -m {tiny}", 2, ("binary.dat", "UTF-8", "policy")),
    ("score {cat} --prompt cat --refs {bin} -m {tiny}", 2, ("binary.dat", "UTF-8")),
    ("score --captions {bin} -m {tiny}", 2, ("binary.dat", "UTF-8")),
    ("classify {cat} --labels-file {bin} -m {tiny}", 2, ("binary.dat", "UTF-8")),
    ("classify {cat} -l cat --templates {bin} -m {tiny}", 2, ("binary.dat", "UTF-8")),
    ("train clip --data {tmp}/binary.jsonl --out {out}", 2, ("binary.jsonl", "UTF-8")),
    ("train clip --data {tmp}/binary.csv --out {out}", 2, ("binary.csv", "UTF-8")),
    ("train clip --data {side} --out {out}", 2, ("cat.txt", "UTF-8")),
    ("train clip --data {pairs} --out {out} --classes {bin}", 2, ("binary.dat", "UTF-8")),
    (
        "train robust --teacher {tiny} --data {tmp}/binary.jsonl --out {out}",
        2,
        ("binary.jsonl", "UTF-8"),
    ),
    ("caption train --data {tmp}/binary.jsonl --out {out} -m {tiny}", 2, ("binary.jsonl", "UTF-8")),
    (
        "generate 'a cat' --vqgan-config {bin} --vqgan-checkpoint {file} --out {tmp}/g.png",
        2,
        ("binary.dat", "UTF-8"),
    ),
    # a file where a folder is needed, a folder where a file is, a place nobody can write
    ("train clip --data {pairs} --out {file}", 2, ("--out", "afile", "is a file")),
    ("train clip --data {pairs} --out {file}/run", 2, ("--out", "afile", "no folder")),
    ("train clip --data {pairs} --out /proc/cliplens-run", 2, ("--out", "cannot write")),
    ("train robust --teacher {tiny} --data {photos} --out {file}", 2, ("--out", "is a file")),
    ("caption train --data {pairs} --out {file} -m {tiny}", 2, ("--out", "is a file")),
    ("embed-dataset {photos} --out {file}", 2, ("--out", "afile", "is a file")),
    ("embed-dataset {photos} --out {file}/shards", 2, ("--out", "no folder")),
    ("build-index {dir} --out {file}", 2, ("--out", "afile", "is a file")),
    ("build-index {dir} --out {file}/index", 2, ("--out", "no folder")),
    ("probe fit --data {photos} --out {dir} -m {tiny}", 2, ("--out", "adir", "is a folder")),
    ("probe fit --data {photos} --out {file}/p.npz -m {tiny}", 2, ("--out", "afile is a file")),
    ("quality train --data {photos} --out {dir} -m {tiny}", 2, ("--out", "is a folder")),
    (
        "moderate calibrate --positive {dir} --negative {dir} --out {dir} -m {tiny}",
        2,
        ("--out", "is a folder"),
    ),
    ("moderate {cat} --redact {file} -m {tiny}", 2, ("--redact", "is a file")),
    ("rerank cat {cat} --copy-top {file} -m {tiny}", 2, ("--copy-top", "afile", "is a file")),
    ("rerank cat {cat} --copy-top {file}/top -m {tiny}", 2, ("--copy-top", "no folder")),
    (
        "caption eval --captioner {dir} --data {pairs} --captions-out {dir}",
        2,
        ("--captions-out", "is a folder"),
    ),
    ("generate 'a cat' --out {tmp}/x.txt", 2, ("--out", "x.txt", ".png")),
    ("generate 'a cat' --out {dir}", 2, ("--out", "adir", "is a folder")),
    ("generate 'a cat' --out {file}/g.png", 2, ("--out", "afile is a file")),
    (
        "generate 'a cat' --out {tmp}/g.png --animation {tmp}/movie.gif",
        2,
        ("--animation", "movie.gif", "is a folder"),
    ),
    ("datasets photos {file}", 2, ("afile", "is a file")),
    ("datasets shapes {file}/shapes --n 4", 2, ("no folder",)),
]


def _argv(template: str, env: dict[str, str]) -> list[str]:
    import shlex

    return [part.format(**env) for part in shlex.split(template)]


def _id(case: tuple[str, int, tuple[str, ...]]) -> str:
    return case[0].replace("{", "").replace("}", "")[:70]


@pytest.mark.parametrize(
    ("template", "code", "needles"), NUMBERS + FILES, ids=map(_id, NUMBERS + FILES)
)
def test_bad_input_is_one_line_and_writes_nothing(capsys, env, template, code, needles):
    tmp = Path(env["tmp"])
    before = _tree(tmp)
    got, err = _run(capsys, _argv(template, env))
    assert got == code, err
    _assert_one_line(err, needles)
    assert _tree(tmp) == before, "a refused command wrote something"


def test_zero_shot_rows_are_parsed_once_so_a_line_separator_is_caption_text(capsys, env):
    """U+2028 in a caption once split the --zero-shot file a second time (str.splitlines)
    and ended in a bare JSONDecodeError: now the file is read as training data is, and the
    run goes on to the next check (here a refused pair of options, before any training)."""
    tmp = Path(env["tmp"])
    row = {"image": str(Path(env["cat"])), "caption": "a cat\u2028on a mat", "label": "cat"}
    (tmp / "labelled.jsonl").write_text(json.dumps(row, ensure_ascii=False) + "\n", "utf-8")
    before = _tree(tmp)
    template = (
        "train clip --data {pairs} --out {out} --zero-shot {tmp}/labelled.jsonl "
        "--init {tiny} --model-config tiny-shapes"
    )
    code, err = _run(capsys, _argv(template, env))
    assert code == 2, err
    _assert_one_line(err, ("--init", "--model-config", "not both"))
    assert _tree(tmp) == before


def test_a_symlink_loop_is_one_failed_file_and_the_run_goes_on(capsys, env):
    argv = _argv("classify {loop} {cat} -l cat,dog -m {tiny} --format json", env)
    code = main(argv)
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert [Path(r["path"]).name for r in json.loads(captured.out)] == ["cat.jpg"]
    warnings = [x for x in captured.err.splitlines() if x.startswith("warning:")]
    assert len(warnings) == 1 and "loop.jpg" in warnings[0] and "link loop" in warnings[0]
    assert "unexpected" not in captured.err and "Traceback" not in captured.err


def _nan_after_first(real):
    """A loss function whose second call and later give nan (the graph kept)."""
    calls = []

    def loss(*args, **kwargs):
        value = real(*args, **kwargs)
        calls.append(1)
        return value * float("nan") if len(calls) > 1 else value

    return loss


def _assert_diverged(capsys, argv: list[str], out: Path, *never: str) -> None:
    code, err = _run(capsys, argv)
    assert code == 1, err
    errors = [x for x in err.splitlines() if x.startswith("error:")]
    assert len(errors) == 1 and err.splitlines()[-1] == errors[0], err
    _assert_one_line(errors[0], ("diverged", "learning rate"))
    for name in never:
        assert not (out / name).exists(), f"{name} was written after the loss became nan"


def test_train_clip_stops_when_the_loss_is_not_finite(capsys, env, monkeypatch):
    import cliplens.train.clip as clip
    from conftest import TINY_CFG

    monkeypatch.setattr(clip, "sharded_loss", _nan_after_first(clip.sharded_loss))
    config = Path(env["tmp"]) / "tiny.json"
    config.write_text(json.dumps(TINY_CFG))
    argv = _argv("train clip --data {pairs} --out {out} --batch-size 2 --epochs 2", env)
    _assert_diverged(capsys, [*argv, "--model-config", str(config)], Path(env["out"]), "model")


def test_train_robust_stops_when_the_loss_is_not_finite(capsys, env, monkeypatch):
    import cliplens.train.loss as loss

    monkeypatch.setattr(loss, "nt_xent_loss", _nan_after_first(loss.nt_xent_loss))  # the default
    argv = _argv(
        "train robust --teacher {tiny} --data {photos} --out {out} --batch-size 2 "
        "--epochs 1 --precision fp32",
        env,
    )
    _assert_diverged(capsys, argv, Path(env["out"]), "model", "student.pt", "eval.json")


def test_caption_train_stops_when_the_loss_is_not_finite(capsys, env, monkeypatch):
    from cliplens.captioning.model import Captioner

    monkeypatch.setattr(Captioner, "loss", _nan_after_first(Captioner.loss))
    argv = _argv(
        "caption train --data {pairs} --out {out} -m {tiny} --lm scratch:gpt2 "
        "--lm-layers 1 --lm-width 32 --batch-size 2 --epochs 1 --eval-images 0 "
        "--train-precision fp32 --db {tmp}/none.db",
        env,
    )
    _assert_diverged(capsys, argv, Path(env["out"]), "captioner")


def _commands(group, path=()):
    for name, command in group.commands.items():
        if hasattr(command, "commands"):
            yield from _commands(command, (*path, name))
        else:
            yield (*path, name), command


def test_every_number_option_is_bounded_and_finite():
    """No int option without both ends, no float option that lets nan or inf through."""
    import typer.main
    from typer._click.types import FloatParamType, IntParamType, IntRange

    from cliplens.cli.common import FiniteFloat
    from cliplens.cli.main import app

    loose = []
    commands = dict(_commands(typer.main.get_command(app)))
    # every command, those of cli/search and cli/serve included
    walked = {("index",), ("search",), ("similar",), ("duplicates",), ("serve",), ("train", "clip")}
    assert walked <= set(commands)
    for path, command in commands.items():
        for param in command.params:
            kind = param.type
            if isinstance(kind, IntParamType):
                ok = isinstance(kind, IntRange) and None not in (kind.min, kind.max)
            elif isinstance(kind, FloatParamType):
                ok = isinstance(kind, FiniteFloat)
            else:
                continue
            if not ok:
                loose.append(f"{' '.join(path)} {param.opts[0]}")
    assert not loose, f"unbounded numbers: {loose}"


INF, NAN = float("inf"), float("nan")
CLIP, ROBUST = "cliplens.train.clip:ClipTrainConfig", "cliplens.train.robust:RobustConfig"
CAPTION, GENERATE = (
    "cliplens.captioning.train:CaptionTrainConfig",
    "cliplens.generation.generate:GenerateConfig",
)


@pytest.mark.parametrize(
    ("config", "kwargs", "needle"),
    [
        (CLIP, {"model_cfg": {}, "lr": INF}, "learning rate inf"),
        (CLIP, {"model_cfg": {}, "lr": NAN}, "learning rate nan"),
        (CLIP, {"model_cfg": {}, "max_minutes": -1.0}, "time limit"),
        (ROBUST, {"temperature": NAN}, "temperature nan"),
        (ROBUST, {"lr": 0.0}, "learning rate 0"),
        (CAPTION, {"lr": INF}, "learning rate inf"),
        (CAPTION, {"word_dropout": NAN}, "word dropout nan"),
        (GENERATE, {"size": 100000}, "8192"),
        (GENERATE, {"lr": NAN}, "learning rate nan"),
        (
            "cliplens.distributed.embed:EmbedJob",
            {"sources": ("x",), "out": Path("o"), "max_megapixels": NAN},
            "megapixels",
        ),
    ],
)
def test_library_configs_refuse_nonsense_numbers(config, kwargs, needle):
    """The library checks its configs where they are made, for callers without the CLI; the
    messages name the input, not a command-line flag."""
    import importlib

    from cliplens.errors import InvalidInputError

    module, name = config.split(":")
    with pytest.raises(InvalidInputError, match=needle):
        getattr(importlib.import_module(module), name)(**kwargs)


def test_an_image_too_large_for_the_memory_left_is_refused_before_allocating(monkeypatch):
    import cliplens.generation.generate as generate
    from cliplens.errors import InvalidInputError

    monkeypatch.setattr(generate, "available_memory", lambda: 1_000_000_000)  # 1 GB free
    with pytest.raises(InvalidInputError, match=r"image size 4096: .* at most 2236 pixels"):
        generate.FourierImage(4096)
    generate.FourierImage(64)  # what fits is made
