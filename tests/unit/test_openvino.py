"""The OpenVINO engine: converted once, checked against PyTorch's fp32 forward, run later
without torch, chosen by the speed measured here, int8 kept apart from full precision;
and everything on PyTorch when openvino cannot be imported."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from cliplens.cli.main import main
from cliplens.device import Precision
from cliplens.errors import ModelError
from cliplens.models import openvino
from cliplens.models.ref import ModelRef
from cliplens.settings import get_settings

pytest.importorskip("openvino", reason="the OpenVINO engine's tests need openvino")
pytest.importorskip("nncf", reason="int8 needs nncf")


@pytest.fixture(scope="module")
def ov_home(tmp_path_factory: pytest.TempPathFactory):
    """One CLIPLENS_HOME for the module: the tiny model is converted and measured once."""
    mp = pytest.MonkeyPatch()
    home = tmp_path_factory.mktemp("ov-home")
    mp.setenv("CLIPLENS_HOME", str(home))
    get_settings.cache_clear()
    yield home
    mp.undo()
    get_settings.cache_clear()


@pytest.fixture(scope="module")
def name(tiny_model_dir: Path) -> str:
    return f"local:{tiny_model_dir}"


@pytest.fixture(scope="module")
def files(photos: Path) -> list[Path]:
    return sorted(photos.iterdir())


@pytest.fixture(scope="module")
def want(ov_home, name, files) -> np.ndarray:
    """PyTorch's fp32 embeddings: the reference every engine is held to."""
    return ModelRef(name, device="cpu", precision="fp32", engine="torch").encode_images(files)


def _meta_path(model_id: str) -> Path:
    return openvino.folder_for(model_id) / "meta.json"


def test_converted_tower_reproduces_pytorch_fp32(ov_home, name, files, want):
    torch_id = ModelRef(name, engine="torch").info.model_id
    today = ModelRef(name, device="cpu", engine="torch").encode_images(files)  # the default
    for precision in ("fp32", "bf16"):
        ref = ModelRef(name, device="cpu", precision=precision, engine="openvino")
        got = ref.encode_images(files)
        assert (ref.info.engine, ref.info.precision) == ("openvino", precision)
        assert ref.info.model_id == torch_id  # the same vectors: one catalog key
        assert (got * want).sum(1).min() >= 0.9999, precision
        assert (got * today).sum(1).min() >= 0.9999, precision
    measured = openvino.read_measured(torch_id)
    assert measured is not None and measured.photos == 63  # 21 photos x 3 views
    for precision in (Precision.FP32, Precision.BF16):
        variant = measured.variants[precision]
        assert variant.kept and variant.min_cosine >= 0.9999 and variant.images_per_s > 0
    assert (openvino.folder_for(torch_id) / "image.xml").is_file()
    assert (openvino.folder_for(torch_id) / "image.bin").stat().st_size > 100_000


def test_a_later_process_runs_the_network_without_torch(ov_home, name, files, want):
    ModelRef(name, device="cpu", precision="fp32", engine="openvino").ready()  # converted
    code = (
        "import json, sys\n"
        "from cliplens.models.ref import ModelRef\n"
        f"ref = ModelRef({name!r}, device='cpu', precision='fp32', engine='openvino')\n"
        f"vectors = ref.encode_images({[str(f) for f in files]!r})\n"
        "loaded = sorted(m for m in sys.modules if m.split('.')[0] == 'torch')\n"
        "print(json.dumps({'torch': loaded, 'vectors': vectors.tolist()}))\n"
    )
    env = {**os.environ, "CLIPLENS_HOME": str(ov_home)}
    run = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
    )
    assert run.returncode == 0, run.stderr
    out = json.loads(run.stdout)
    assert out["torch"] == []
    assert (np.array(out["vectors"]) * want).sum(1).min() >= 0.9999


def test_auto_runs_the_engine_measured_faster_here(ov_home, name):
    from cliplens.models.openvino_runtime import OpenVinoEncoder
    from cliplens.models.torch_encoder import TorchEncoder
    from cliplens.models.zoo import describe_engines

    torch_id = ModelRef(name, device="cpu", precision="fp32", engine="openvino").info.model_id
    ModelRef(name, device="cpu", precision="fp32", engine="openvino").ready()
    path = _meta_path(torch_id)
    original = path.read_text()
    try:
        for torch_speed, engine_type, engine in (
            (1e9, TorchEncoder, "torch"),
            (1e-3, OpenVinoEncoder, "openvino"),
        ):
            meta = json.loads(original)
            for entry in meta["cpus"].values():
                entry["torch_images_per_s"] = torch_speed
            path.write_text(json.dumps(meta))
            assert isinstance(ModelRef(name, device="cpu", engine="auto").ready(), engine_type)
            assert describe_engines(name)["engine (auto)"].startswith(engine)
    finally:
        path.write_text(original)


def test_text_tower_converted_checked_and_used_for_many_texts(ov_home, name):
    torch_id = ModelRef(name, engine="torch").info.model_id
    ModelRef(name, device="cpu", precision="fp32", engine="openvino").ready()
    text = openvino.read_measured(torch_id).text
    assert text["kept"] and text["min_cosine"] >= 0.9999 and text["texts_per_s"] > 0
    labels = [f"a photo of thing number {i}" for i in range(100)]
    want = ModelRef(name, device="cpu", precision="fp32", engine="torch").encode_texts(labels)
    path = _meta_path(torch_id)
    original = path.read_text()
    try:
        for bar, used in ((1e-3, True), (1e9, False)):  # measured faster, then slower
            meta = json.loads(original)
            for entry in meta["cpus"].values():
                entry["text"]["bar_texts_per_s"] = bar
            path.write_text(json.dumps(meta))
            ref = ModelRef(name, device="cpu", engine="auto")
            got = ref.encode_texts(labels)
            assert bool(ref._ov_text_tower) is used  # a tower built (False: decided none)
            if used:  # the converted fp32 tower
                assert (got * want).sum(1).min() >= 0.9999
            else:  # the path texts took before (here no ONNX export: PyTorch)
                before = ModelRef(name, device="cpu", engine="torch").encode_texts(labels)
                np.testing.assert_allclose(got, before, atol=1e-6)
            one = ModelRef(name, device="cpu", engine="auto")
            one.encode_texts(["a cat"])  # a one-shot query stays on ONNX Runtime
            assert not one._ov_text_tower
    finally:
        path.write_text(original)


def test_int8_is_its_own_model_kept_apart_in_a_catalog(
    ov_home, name, files, want, photos, tmp_path, capsys, monkeypatch
):
    ref = ModelRef(name, device="cpu", precision="int8", engine="auto")
    base = ModelRef(name, engine="torch").info.model_id
    assert ref.info.model_id == base + "+int8"  # known before any network is built
    got = ref.encode_images(files)
    assert ref.info.quantized_from == base and ref.info.precision == "int8"
    cos = (got * want).sum(1)
    assert cos.mean() >= 0.99 and not np.allclose(got, want, atol=1e-6)  # close, not equal
    measured = openvino.read_measured(base)
    assert measured.variants[Precision.INT8].kept
    assert measured.variants[Precision.INT8].agreement >= 0.98

    db = tmp_path / "c.db"
    monkeypatch.setenv("CLIPLENS_ENGINE", "torch")
    assert main(["index", str(photos), "--db", str(db), "--model", name]) == 0
    capsys.readouterr()
    argv = ["index", str(photos), "--db", str(db), "--model", name, "--precision", "int8"]
    assert main([*argv, "--engine", "auto", "--verbose"]) == 0
    err = capsys.readouterr().err
    assert f"holds {len(files)} full-precision vectors" in err and "kept apart" in err
    assert "on openvino int8" in err
    from cliplens.catalog.db import open_catalog

    held = {m.model_id: m.count for m in open_catalog(db, readonly=True).models()}
    assert held == {base: len(files), base + "+int8": len(files)}


def test_int8_refused_with_its_figures_and_not_measured_again(fresh_home, name, monkeypatch):
    from cliplens.models import openvino_convert

    monkeypatch.setattr(openvino_convert, "INT8_MIN_AGREEMENT", 1.01)  # nothing passes
    with pytest.raises(
        ModelError, match=r"int8 is refused on this CPU: top-1 zero-shot agreement .*%"
    ) as e:
        ModelRef(name, device="cpu", precision="int8", engine="auto").ready()
    assert "\n" not in str(e.value) and "mean" in str(e.value)
    monkeypatch.setattr(openvino_convert, "measure", lambda *a: pytest.fail("measured again"))
    with pytest.raises(ModelError, match="int8 is refused"):
        ModelRef(name, device="cpu", precision="int8", engine="auto").ready()
    monkeypatch.setenv(openvino.UNCHECKED_ENV, "1")  # for timing on random weights only
    refused = ModelRef(name, device="cpu", precision="int8", engine="auto").ready()
    assert refused.info.model_id.endswith("+int8") and refused.info.engine == "openvino"


def test_cli_engine_flag_and_models_info(ov_home, name, photos, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("CLIPLENS_ENGINE", "torch")
    db = tmp_path / "c.db"
    argv = ["index", str(photos), "--db", str(db), "--model", name, "--verbose"]
    assert main([*argv, "--engine", "openvino", "--precision", "fp32"]) == 0
    assert "on openvino fp32" in capsys.readouterr().err
    assert main(["models", "info", name, "--format", "json"]) == 0
    details = json.loads(capsys.readouterr().out)
    assert details["openvino fp32"].startswith("kept: min cosine")
    assert details["torch"].endswith("images/s")
    assert main([*argv, "--engine", "onnx"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "auto, torch or openvino" in err


def test_without_openvino_everything_runs_on_pytorch(tmp_path, name, photos):
    blocked = tmp_path / "blocked"
    (blocked / "openvino").mkdir(parents=True)
    (blocked / "openvino" / "__init__.py").write_text("raise ImportError('blocked here')\n")
    env = {
        **os.environ,
        "PYTHONPATH": str(blocked),
        "CLIPLENS_HOME": str(tmp_path / "home"),
        "CLIPLENS_ENGINE": "auto",
    }
    cli = [sys.executable, "-m", "cliplens.cli.main"]
    db = str(tmp_path / "c.db")

    def run(*argv: str) -> subprocess.CompletedProcess:
        return subprocess.run([*cli, *argv], env=env, capture_output=True, text=True, timeout=300)

    done = run("index", str(photos), "--db", db, "--model", name, "--verbose")
    assert done.returncode == 0, done.stderr
    assert "on torch" in done.stderr and "7 new" in done.stderr
    for extra in (["--engine", "openvino"], ["--precision", "int8"]):
        refused = run("index", str(photos), "--db", db + "2", "--model", name, *extra)
        assert refused.returncode == 1, refused.stderr
        assert "pip install 'cliplens[openvino]'" in refused.stderr
        assert "Traceback" not in refused.stderr and refused.stderr.count("\n") == 1


def _parent_of(_: object) -> int:
    return os.getppid()


def test_decoders_are_not_forked_from_a_process_running_openvino(ov_home, name):
    """A decoder forked from a process with OpenVINO's threads spun and never decoded:
    once openvino is loaded, the indexer's workers come from a fork server."""
    from cliplens import decode_ahead
    from cliplens.decode_ahead import process_pool

    ModelRef(name, device="cpu", precision="fp32", engine="openvino").ready()  # compiled
    assert decode_ahead._fork_unsafe
    with process_pool(2, int) as pool:
        parents = {pool.submit(_parent_of, i).result() for i in range(4)}
    assert os.getpid() not in parents and len(parents) == 1  # the fork server's children


def test_auto_leaves_a_visible_gpu_to_pytorch(ov_home, name, monkeypatch):
    from cliplens.models import ref as ref_module
    from cliplens.models.openvino_runtime import OpenVinoEncoder

    ModelRef(name, device="cpu", precision="fp32", engine="openvino").ready()  # measured
    monkeypatch.setattr(ref_module, "gpu_visible", lambda: True)
    for device in (None, "auto"):
        assert not isinstance(
            ModelRef(name, device=device, engine="auto")._engine_encoder(), OpenVinoEncoder
        )
    assert isinstance(ModelRef(name, device="cpu", engine="openvino").ready(), OpenVinoEncoder)
