"""Library messages name parameters; each edge shows them as its users know them."""

from __future__ import annotations

from cliplens.cli.main import _flag_namer, main
from cliplens.errors import name_params


def test_name_params_replaces_each_parameter():
    message = "`max_megapixels` must be positive; or leave `timeout_s` out"
    shown = name_params(message, {"max_megapixels": "--max-megapixels"}.get)
    assert shown == "--max-megapixels must be positive; or leave `timeout_s` out"


def test_name_params_leaves_other_backticks():
    assert name_params("run `cliplens index` first", str.upper) == "run `cliplens index` first"


def test_flags_of_the_running_command():
    serve = _flag_namer(["serve", "--port", "8000"])
    assert serve("timeout_s") == "--timeout"  # registered: the option is --timeout
    assert serve("max_upload_mb") == "--max-upload-mb"  # the option of that name
    classify = _flag_namer(["classify", "cat.jpg", "--labels", "cat"])
    assert classify("labels") == "--labels"
    assert classify("paths") == "PATHS"  # an argument by its metavar
    caption = _flag_namer(["caption", "train", "pairs.jsonl"])
    assert caption("train_lm") == "--freeze-lm"
    assert caption("out_dir") == "--out"


def test_cli_prints_the_flag_for_a_library_parameter(capsys, tmp_path):
    # the library's parse_shots names `shots`; the command's option is --shots
    code = main(["probe", "kshot", "--data", str(tmp_path), "--shots", "x"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("error: --shots x: comma-separated integers"), err
