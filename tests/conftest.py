"""Shared fixtures: an isolated CLIPLENS_HOME, tiny random open_clip models, real photos."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

# every test run writes caches into its own home, never the user's, and removes it at exit
# (it holds exported text towers and language models: hundreds of MB a run)
_HOME = tempfile.mkdtemp(prefix="cliplens-test-home-")
os.environ["CLIPLENS_HOME"] = _HOME
atexit.register(shutil.rmtree, _HOME, ignore_errors=True)
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
# The suite runs image towers on PyTorch unless a test asks for an engine: converting and
# measuring a model for OpenVINO in every fresh home would double the suite's time
# (tests/unit/test_openvino.py covers that engine, `auto` included).
os.environ.setdefault("CLIPLENS_ENGINE", "torch")


def _no_skips(report) -> None:
    """With CLIPLENS_NO_SKIPS=1 (CI sets it) a skip fails, with its reason: a missing
    browser, Java, Ray or SmolLM2 package must not pass as green."""
    if os.environ.get("CLIPLENS_NO_SKIPS") == "1" and report.skipped:
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else report.longrepr
        report.outcome = "failed"
        report.longrepr = f"skipped, and CLIPLENS_NO_SKIPS=1 requires it to run: {reason}"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    _no_skips(outcome.get_result())


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    outcome = yield  # a module that skips itself (importorskip) as it is collected
    _no_skips(outcome.get_result())


TINY_CFG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8, "head_width": 32},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}


def make_tiny_clip(seed: int = 0):
    import open_clip
    import torch

    torch.manual_seed(seed)
    return open_clip.CLIP(**TINY_CFG).eval()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A checkpoint folder in open_clip's layout holding a tiny random CLIP."""
    from cliplens.models.openclip import save_checkpoint

    return save_checkpoint(
        make_tiny_clip(), tmp_path_factory.mktemp("tiny") / "ckpt", TINY_CFG, arch="tiny-test"
    )


@pytest.fixture(scope="session", autouse=True)
def text_towers_exported(tiny_model_dir: Path) -> None:
    """The text towers of the tiny model and of the offline model exported to ONNX in the
    session's CLIPLENS_HOME before the first test: text is encoded by the exported tower
    in every test, whatever ran before, so a file run alone tests what the whole suite
    tests. A test of the path without an export makes its own CLIPLENS_HOME (`fresh_home`)
    or its own model."""
    from cliplens.models.ref import ModelRef

    for name in (f"local:{tiny_model_dir}", "offline"):
        assert ModelRef(name, device="cpu", precision="fp32").prepare_fast_text(), name


@pytest.fixture
def fresh_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty CLIPLENS_HOME for this test alone (nothing exported, cached or recorded)."""
    from cliplens.settings import get_settings

    home = tmp_path / "home"
    monkeypatch.setenv("CLIPLENS_HOME", str(home))
    get_settings.cache_clear()
    yield home
    monkeypatch.undo()
    get_settings.cache_clear()


@pytest.fixture(scope="session")
def tiny(tiny_model_dir: Path):
    from cliplens import load_model

    return load_model(f"local:{tiny_model_dir}", device="cpu", precision="fp32")


@pytest.fixture(scope="session")
def photos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """scikit-image's real photos as files (cat.jpg, coffee.jpg, rocket.jpg, ...)."""
    from cliplens.datasets.photos import write_photos

    folder = tmp_path_factory.mktemp("photos")
    write_photos(folder)
    return folder


@pytest.fixture(scope="session")
def offline():
    """The bundled offline model (real weights), loaded once for the session, its text
    tower already exported."""
    from cliplens import load_model

    return load_model("offline", device="cpu")


def make_photos(
    folder: Path, n: int, seed: int = 0, size: tuple[int, int] = (64, 48)
) -> list[Path]:
    """n random-noise JPEGs, distinct and deterministic."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        img = Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))
        path = folder / f"img{i:03d}.jpg"
        img.save(path, quality=90)
        paths.append(path)
    return paths
