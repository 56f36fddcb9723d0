"""Model loading and the Encoder contract, on tiny random open_clip models."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cliplens import load_model
from cliplens.errors import (
    ImageNotFoundError,
    InvalidInputError,
    ModelUnavailableError,
    NotAnImageError,
    UnknownModelError,
)
from cliplens.models.openclip import save_checkpoint
from cliplens.models.registry import Kind, parse_model_name
from conftest import TINY_CFG, make_tiny_clip


def _images(n: int, seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [
        Image.fromarray(rng.integers(0, 255, (40 + i, 50, 3), dtype=np.uint8)) for i in range(n)
    ]


def test_encode_images_shape_norm_and_order(tiny):
    imgs = _images(5)
    out = tiny.encode_images(imgs, batch_size=2)
    assert out.shape == (5, 32) and out.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-5)
    # input order is kept across batches: encoding one at a time gives the same rows
    single = np.concatenate([tiny.encode_images([im]) for im in imgs])
    np.testing.assert_allclose(out, single, atol=1e-5)
    reversed_out = tiny.encode_images(imgs[::-1], batch_size=3)
    np.testing.assert_allclose(reversed_out[::-1], out, atol=1e-5)


def test_encode_accepts_paths_pil_and_arrays(tiny, tmp_path):
    img = _images(1)[0]
    img.save(tmp_path / "a.png")
    arr = np.asarray(img)
    out = tiny.encode_images([str(tmp_path / "a.png"), img, arr, tmp_path / "a.png"])
    np.testing.assert_allclose(out[0], out[1], atol=1e-5)
    np.testing.assert_allclose(out[0], out[2], atol=1e-5)
    np.testing.assert_allclose(out[0], out[3], atol=1e-5)


def test_encode_texts(tiny):
    out = tiny.encode_texts(["a dog", "a cat", "a dog"])
    assert out.shape == (3, 32)
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(out[0], out[2], atol=1e-6)
    assert not np.allclose(out[0], out[1])
    with pytest.raises(InvalidInputError):
        tiny.encode_texts("a dog")


def test_strict_encode_raises_on_bad_image_naming_it(tiny, tmp_path):
    bad = tmp_path / "bad.jpg"
    bad.write_text("not an image")
    with pytest.raises(NotAnImageError, match=r"bad\.jpg"):
        tiny.encode_images([_images(1)[0], str(bad)])


def test_lenient_encode_skips_and_reports(tiny, tmp_path):
    bad = tmp_path / "bad.jpg"
    bad.write_text("not an image")
    imgs = _images(3)
    res = tiny.encode_images_lenient(
        [imgs[0], str(bad), imgs[1], str(tmp_path / "gone.png"), imgs[2]], batch_size=2
    )
    assert res.kept == [0, 2, 4]
    assert res.vectors.shape == (3, 32)
    assert [type(f) for f in res.failures] == [NotAnImageError, ImageNotFoundError]
    np.testing.assert_allclose(res.vectors, tiny.encode_images(imgs), atol=1e-5)


def test_model_id_is_stable_and_tracks_weights(tiny, tiny_model_dir, tmp_path):
    again = load_model(f"local:{tiny_model_dir}", precision="fp32")
    assert again.info.model_id == tiny.info.model_id
    assert tiny.info.model_id.startswith("local:tiny-test@")
    other = save_checkpoint(make_tiny_clip(seed=1), tmp_path / "other", TINY_CFG, arch="tiny-test")
    assert load_model(f"local:{other}").info.model_id != tiny.info.model_id


def test_local_single_file_and_arch_path_forms(tiny, tmp_path):
    import open_clip

    ref = tiny.encode_images(_images(2))
    # a single self-describing file
    file = save_checkpoint(make_tiny_clip(), tmp_path / "tiny.pt", TINY_CFG, arch="tiny-test")
    single = load_model(f"local:{file}", precision="fp32")
    np.testing.assert_allclose(single.encode_images(_images(2)), ref, atol=1e-5)
    # ARCH:PATH: a bare state dict for an architecture open_clip knows
    cfg_dir = tmp_path / "cfgs"
    cfg_dir.mkdir()
    (cfg_dir / "tiny-arch.json").write_text(__import__("json").dumps(TINY_CFG))
    open_clip.add_model_config(cfg_dir)
    state = tmp_path / "state.pt"
    torch.save(make_tiny_clip().state_dict(), state)
    arch_path = load_model(f"tiny-arch:{state}", precision="fp32")
    np.testing.assert_allclose(arch_path.encode_images(_images(2)), ref, atol=1e-5)
    assert arch_path.info.model_id.startswith("tiny-arch:file@")
    # a bare state dict does not say what it is: local: refuses it with the ARCH:PATH hint
    with pytest.raises(InvalidInputError, match="ARCH:"):
        load_model(f"local:{state}")


def test_bf16_matches_fp32(tiny_model_dir):
    fp32 = load_model(f"local:{tiny_model_dir}", precision="fp32")
    bf16 = load_model(f"local:{tiny_model_dir}", precision="bf16")
    assert bf16.info.precision == "bf16"
    imgs = _images(4)
    cos = (fp32.encode_images(imgs) * bf16.encode_images(imgs)).sum(1)
    assert cos.min() > 0.99


@pytest.mark.parametrize(
    ("name", "kind"),
    [
        ("offline", Kind.OFFLINE),
        ("hf-hub:laion/x", Kind.HUB),
        ("local:/x", Kind.LOCAL),
        ("ViT-B-32:openai", Kind.PRETRAINED),
        ("ViT-B-32-256:datacomp_s34b_b86k", Kind.PRETRAINED),
    ],
)
def test_parse_model_names(name, kind):
    assert parse_model_name(name).kind is kind


@pytest.mark.parametrize(
    ("name", "match"),
    [
        ("ViT-B-33:openai", "did you mean"),
        ("ViT-B-32", "names no weights"),
        ("ViT-B-32:no-such-tag", "neither a weights tag"),
        ("hf-hub:justone", "ORG/NAME"),
        ("local:", "local:PATH"),
    ],
)
def test_bad_model_names(name, match):
    with pytest.raises(UnknownModelError, match=match):
        parse_model_name(name)


def test_missing_weights_without_network_names_alternatives(monkeypatch, tmp_path):
    import socket

    def no_dns(*args, **kwargs):
        raise socket.gaierror(-2, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", no_dns)
    with pytest.raises(ModelUnavailableError) as err:
        load_model("ViT-B-32-256:datacomp_s34b_b86k")
    msg = str(err.value)
    assert "ViT-B-32-256:datacomp_s34b_b86k" in msg and "offline" in msg and "local:" in msg
    assert str(Path(__import__("os").environ["CLIPLENS_HOME"])) in msg
    assert "\n" not in msg


def test_hub_model_without_network(monkeypatch):
    import socket

    def no_dns(*args, **kwargs):
        raise socket.gaierror(-2, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", no_dns)
    with pytest.raises(ModelUnavailableError, match="cannot resolve"):
        load_model("hf-hub:laion/CLIP-ViT-B-32-laion2B-s34B-b79K")


def test_behind_a_proxy_only_the_proxy_must_resolve(monkeypatch, tmp_path):
    """Where HTTPS_PROXY reaches the hub (and the hub's name does not resolve here, as on
    many company networks), the check asks only for the proxy; NO_PROXY is honoured."""
    import socket

    from huggingface_hub import constants

    from cliplens.models.hub import check_reachable

    def only(*names: str):
        def resolve(host, *args, **kwargs):
            if host in names:
                return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("10.0.0.8", 443))]
            raise socket.gaierror(-2, "Name or service not known")

        return resolve

    for var in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy", "NO_PROXY", "no_proxy"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.test:3128")
    monkeypatch.setattr(socket, "getaddrinfo", only("proxy.test"))
    check_reachable("ViT-B-32:openai", tmp_path)  # the proxy resolves: go on to download
    monkeypatch.setattr(socket, "getaddrinfo", only())
    with pytest.raises(ModelUnavailableError, match=r"cannot resolve the proxy proxy\.test"):
        check_reachable("ViT-B-32:openai", tmp_path)
    monkeypatch.setenv("NO_PROXY", "huggingface.co")  # the hub is reached directly
    monkeypatch.setattr(socket, "getaddrinfo", only("proxy.test"))
    with pytest.raises(ModelUnavailableError, match=r"cannot resolve huggingface\.co"):
        check_reachable("ViT-B-32:openai", tmp_path)


def test_cached_weights_are_used_without_network(monkeypatch):
    """A tag whose weights are in the cache loads with the network gone."""
    import socket

    import open_clip

    from cliplens.models import openclip
    from cliplens.settings import get_settings

    cfg = open_clip.get_pretrained_cfg("ViT-B-32-256", "datacomp_s34b_b86k")
    repo = cfg["hf_hub"].rstrip("/")
    # lay the file out exactly as the hub client caches it
    cache = get_settings().model_cache / f"models--{repo.replace('/', '--')}"
    (cache / "refs").mkdir(parents=True, exist_ok=True)
    (cache / "refs" / "main").write_text("abc123")
    snap = cache / "snapshots" / "abc123"
    snap.mkdir(parents=True, exist_ok=True)
    target = snap / "open_clip_model.safetensors"
    target.write_bytes(b"placeholder")
    monkeypatch.setattr(socket, "getaddrinfo", lambda *a, **k: (_ for _ in ()).throw(OSError()))
    try:
        assert openclip.cached_weights("ViT-B-32-256", "datacomp_s34b_b86k") == target
        assert openclip.fetch_weights("x", "ViT-B-32-256", "datacomp_s34b_b86k") == target
    finally:
        target.unlink()


def test_device_and_precision_validation():
    with pytest.raises(InvalidInputError, match="fp16"):
        load_model("offline", device="cpu", precision="fp16")
    with pytest.raises(InvalidInputError, match="precision"):
        load_model("offline", device="cpu", precision="fp8")
    if not torch.cuda.is_available():
        with pytest.raises(InvalidInputError, match="CUDA"):
            load_model("offline", device="cuda")


# ------------------------------------------------------------------ the Encoder protocol


def _protocol_members() -> set[str]:
    from cliplens.models.encoder import Encoder

    own = {n for c in Encoder.__mro__ if c.__module__ == Encoder.__module__ for n in vars(c)}
    return {n for n in own if not n.startswith("_")}


def test_every_encoder_satisfies_the_protocol(tiny, offline, tiny_model_dir):
    from cliplens.models.encoder import Encoder
    from cliplens.models.ref import ModelRef

    assert isinstance(tiny, Encoder)
    assert isinstance(offline, Encoder)
    assert isinstance(ModelRef(f"local:{tiny_model_dir}"), Encoder)
    assert isinstance(ModelRef("offline"), Encoder)


def test_model_ref_has_every_protocol_member_with_its_signature():
    """Fails when the protocol gains a member that ModelRef lacks, or when the two
    signatures part (runtime isinstance only checks that the names exist)."""
    import inspect

    from cliplens.models.encoder import Encoder
    from cliplens.models.ref import ModelRef

    members = _protocol_members()
    assert {"info", "feature_id", "load", "encode_images", "encode_texts"} <= members
    for name in members:
        assert hasattr(ModelRef, name), f"ModelRef lacks Encoder.{name}"
        want, have = getattr(Encoder, name), getattr(ModelRef, name)
        if callable(want):
            assert inspect.signature(have).parameters.keys() == (
                inspect.signature(want).parameters.keys()
            ), name


def test_model_ref_delegates_lenient_images_and_features(offline, tmp_path):
    from cliplens.models.ref import ModelRef

    ref = ModelRef("offline", device="cpu")
    missing = tmp_path / "missing.jpg"
    images = [*_images(2), missing]
    lenient = ref.encode_images_lenient(images, batch_size=2)
    assert lenient.kept == [0, 1] and len(lenient.failures) == 1
    assert lenient.failures[0].path == str(missing)
    np.testing.assert_allclose(lenient.vectors, offline.encode_images(images[:2]), atol=1e-5)
    features = ref.encode_features(images)
    assert features.kept == [0, 1] and features.vectors.shape[0] == 2
    assert ref.feature_id == offline.feature_id != ref.info.model_id  # the CNN's pooled space
    assert ref.encode_texts(["a cat"], batch_size=1).shape == (1, ref.info.dim)
    with pytest.raises(InvalidInputError, match="precision"):
        ModelRef("offline", precision="fp8")
