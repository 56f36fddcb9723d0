"""transformers-format checkpoints (`transformers:FOLDER`, `transformers:ORG/NAME`): tiny
random CLIPModel, SiglipModel and Siglip2Model saved with save_pretrained, whose vectors
through cliplens must be transformers' own."""

from __future__ import annotations

import copy
import io
import json
import math
import shutil
import socket
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

transformers = pytest.importorskip("transformers")
pytest.importorskip("sentencepiece")  # SigLIP's tokenizer

import cliplens  # noqa: E402
from cliplens.errors import InvalidInputError, ModelUnavailableError  # noqa: E402
from cliplens.models.hf_transformers import preprocessing_of  # noqa: E402
from tests_helpers import texts_from_threads  # noqa: E402

TEXTS = [
    "a photo of a cat",
    "A Red BOAT at sunset!",
    "two dogs and a cat",
    "x",
    " ".join(["a very long description of a crowded street"] * 20),  # past any context
]
TOWER = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2}
TOWER |= {"num_attention_heads": 2}
SENTENCES = [
    "a photo of a cat",
    "a picture of a dog on the grass",
    "the red boat at sunset",
    "two people walking in the city",
    "an astronaut in space",
    "a cup of coffee on a table",
]


# ---------------------------------------------------------------- tiny checkpoints


def _clip_tokenizer() -> object:
    """CLIP's byte-level BPE cut to its first 800 merges (open_clip's bundled vocabulary)."""
    from open_clip.tokenizer import SimpleTokenizer

    tok = SimpleTokenizer()
    merges = [pair for pair, _ in sorted(tok.bpe_ranks.items(), key=lambda kv: kv[1])][:800]
    vocab = [*list(tok.encoder)[:512], *("".join(m) for m in merges)]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    return transformers.CLIPTokenizer(
        vocab={t: i for i, t in enumerate(vocab)}, merges=merges, model_max_length=77
    )


def _sp_tokenizer(folder: Path) -> object:
    """A sentencepiece model trained on a few sentences, as SigLIP's tokenizer."""
    import sentencepiece as spm

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(SENTENCES * 20),
        model_writer=buf,
        vocab_size=60,
        hard_vocab_limit=False,
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,
        minloglevel=2,
    )
    path = folder / "sp.model"
    path.write_bytes(buf.getvalue())
    return transformers.SiglipTokenizer(vocab_file=str(path))


def _gemma_tokenizer() -> object:
    """SigLIP 2's tokenizer (Gemma's BPE, lowercased) over letters and a few merges."""
    merges = [("▁", "a"), ("c", "a"), ("ca", "t"), ("▁", "p"), ("h", "o"), ("t", "o")]
    chars = sorted(set("abcdefghijklmnopqrstuvwxyz0123456789!?.,&'▁"))
    vocab = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>", *chars, *("".join(m) for m in merges)]
    return transformers.Siglip2Tokenizer(
        vocab={t: i for i, t in enumerate(vocab)}, merges=merges, model_max_length=64
    )


def _save(model: torch.nn.Module, processor: object, folder: Path) -> Path:
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def make_clip(folder: Path, seed: int = 0) -> Path:
    tok = _clip_tokenizer()
    n = len(tok)
    text = {**TOWER, "vocab_size": n, "max_position_embeddings": 77}
    text |= {"bos_token_id": n - 2, "eos_token_id": n - 1, "pad_token_id": n - 1}
    config = transformers.CLIPConfig(
        text_config=text,
        vision_config={**TOWER, "image_size": 32, "patch_size": 8},
        projection_dim=16,
    )
    torch.manual_seed(seed)
    model = transformers.CLIPModel(config).eval()
    image = transformers.CLIPImageProcessor(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}
    )
    return _save(model, transformers.CLIPProcessor(image_processor=image, tokenizer=tok), folder)


def _siglip_text(tok: object) -> dict:
    ids = {"pad_token_id": tok.pad_token_id, "eos_token_id": tok.eos_token_id}
    ids["bos_token_id"] = tok.bos_token_id
    return {**TOWER, "vocab_size": len(tok), "max_position_embeddings": 64, **ids}


def _set_logits(model: torch.nn.Module) -> torch.nn.Module:
    """SigLIP's init leaves scale 1 and bias 0; set trained-like ones."""
    with torch.no_grad():
        model.logit_scale.fill_(math.log(10.0))
        model.logit_bias.fill_(-2.0)
    return model


def make_siglip(folder: Path, seed: int = 0) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    tok = _sp_tokenizer(folder)
    config = transformers.SiglipConfig(
        text_config=_siglip_text(tok),
        vision_config={**TOWER, "image_size": 32, "patch_size": 8},
    )
    torch.manual_seed(seed)
    model = _set_logits(transformers.SiglipModel(config).eval())
    image = transformers.SiglipImageProcessor(size={"height": 32, "width": 32})
    processor = transformers.SiglipProcessor(image_processor=image, tokenizer=tok)
    return _save(model, processor, folder)


def make_siglip2(folder: Path, seed: int = 0) -> Path:
    """NaFlex: 16-pixel patches, at most 256 of them (Siglip2Processor's defaults)."""
    tok = _gemma_tokenizer()
    config = transformers.Siglip2Config(
        text_config=_siglip_text(tok),
        vision_config={**TOWER, "num_patches": 256, "patch_size": 16},
    )
    torch.manual_seed(seed)
    model = _set_logits(transformers.Siglip2Model(config).eval())
    image = transformers.Siglip2ImageProcessor(patch_size=16, max_num_patches=256)
    processor = transformers.Siglip2Processor(image_processor=image, tokenizer=tok)
    return _save(model, processor, folder)


MAKERS = {"clip": make_clip, "siglip": make_siglip, "siglip2": make_siglip2}
# what the processor needs for the texts the model was trained on (SigLIP: padded to 64)
TEXT_KWARGS = {
    "clip": {"padding": True, "truncation": True},
    "siglip": {"padding": "max_length", "truncation": True},
    "siglip2": {},
}


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return {kind: make(tmp_path_factory.mktemp(kind) / "model") for kind, make in MAKERS.items()}


@pytest.fixture(scope="module")
def loaded(saved: dict[str, Path]) -> dict[str, object]:
    return {
        kind: cliplens.load_model(f"transformers:{folder}", device="cpu", precision="fp32")
        for kind, folder in saved.items()
    }


def _reference(folder: Path) -> tuple[torch.nn.Module, object]:
    model = transformers.AutoModel.from_pretrained(str(folder)).eval()
    return model, transformers.AutoProcessor.from_pretrained(str(folder))


def _unit(x: object) -> np.ndarray:
    x = x if isinstance(x, torch.Tensor) else x.pooler_output
    return torch.nn.functional.normalize(x.float(), dim=-1).detach().numpy()


def _square_photo(side: int | None) -> Image.Image:
    from skimage import data

    photo = Image.fromarray(data.astronaut())  # 512x512
    return photo if side is None else photo.resize((side, side), Image.Resampling.BICUBIC)


def _square_photos(side: int | None) -> list[Image.Image]:
    from skimage import data

    out = []
    for fn in (data.astronaut, data.chelsea, data.coffee, data.rocket):
        photo = Image.fromarray(fn())
        w, h = photo.size
        s = min(w, h)
        photo = photo.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s))
        out.append(photo if side is None else photo.resize((side, side), Image.Resampling.BICUBIC))
    return out


def _input_side(kind: str) -> int:
    return 256 if kind == "siglip2" else 32


# ---------------------------------------------------------------- vectors


@pytest.mark.parametrize("kind", list(MAKERS))
def test_images_at_the_models_size_are_transformers_vectors(kind, saved, loaded):
    """Photos already at the input size: cliplens's whole path (crop, normalise, patches
    for SigLIP 2) gives get_image_features of the processor's input."""
    model, processor = _reference(saved[kind])
    photos = _square_photos(_input_side(kind))
    with torch.inference_mode():
        want = _unit(model.get_image_features(**processor(images=photos, return_tensors="pt")))
    got = loaded[kind].encode_images(photos)
    assert got.shape == want.shape
    assert np.abs(got - want).max() <= 1e-5


@pytest.mark.parametrize("kind", list(MAKERS))
def test_processor_pixels_give_transformers_vectors(kind, saved, loaded):
    """Larger photos are resized by Pillow in cliplens, by torchvision in the processor:
    the network on the processor's own pixels agrees to 1e-5, the whole path to 1e-3
    (resampling rounding: about 1e-4 on these photos)."""
    model, processor = _reference(saved[kind])
    photos = _square_photos(None)
    inputs = processor(images=photos, return_tensors="pt")
    encoder = loaded[kind]
    with torch.inference_mode():
        want = _unit(model.get_image_features(**inputs))
        pixels = inputs["pixel_values"]
        if kind == "siglip2":  # the processor's patches back into a square crop
            b, _, _ = pixels.shape
            grid = pixels.reshape(b, 16, 16, 16, 16, 3).permute(0, 5, 1, 3, 2, 4)
            pixels = grid.reshape(b, 3, 256, 256)
        ours = _unit(encoder._encode_pixels(pixels))
    assert np.abs(ours - want).max() <= 1e-5
    got = encoder.encode_images(photos)
    assert np.abs(got - want).max() <= 1e-3 and (got * want).sum(axis=1).min() >= 0.9999


@pytest.mark.parametrize("kind", list(MAKERS))
def test_texts_are_transformers_vectors(kind, saved, loaded):
    model, processor = _reference(saved[kind])
    inputs = processor(text=TEXTS, return_tensors="pt", **TEXT_KWARGS[kind])
    with torch.inference_mode():
        want = _unit(model.get_text_features(**inputs))
    encoder = loaded[kind]
    got = encoder.encode_texts(TEXTS)
    assert np.abs(got - want).max() <= 1e-5
    # one at a time: a text's vector does not depend on the others in its batch
    alone = np.concatenate([encoder.encode_texts([t]) for t in TEXTS])
    assert np.abs(alone - want).max() <= 1e-5
    counts = encoder.token_counts(TEXTS)
    assert counts[-1] == encoder.info.context_length and counts[3] < counts[0]


def test_siglip_texts_are_padded_to_the_full_context(saved, loaded):
    """SigLIP pools the last position: padding to the longest text would change vectors."""
    model, processor = _reference(saved["siglip"])
    short = TEXTS[:2]
    with torch.inference_mode():
        longest = _unit(
            model.get_text_features(**processor(text=short, padding=True, return_tensors="pt"))
        )
    got = loaded["siglip"].encode_texts(short)
    assert np.abs(got - longest).max() > 1e-3  # the convention matters...
    assert loaded["siglip"].info.context_length == 64  # ...and cliplens pads to 64


# ---------------------------------------------------------------- identity and settings


@pytest.mark.parametrize("kind", list(MAKERS))
def test_info_from_the_checkpoint(kind, loaded):
    info = loaded[kind].info
    assert info.model_id.startswith(f"transformers:{kind}@")
    assert info.dim == (16 if kind == "clip" else 32)
    assert info.logit_bias is None if kind == "clip" else info.logit_bias == pytest.approx(-2.0)
    if kind != "clip":
        assert info.logit_scale == pytest.approx(10.0, rel=1e-5)
    pp = info.preprocessing
    side = _input_side(kind)
    assert (pp.image_size, pp.resize_size) == (side, side)
    assert pp.resize_mode == ("shortest" if kind == "clip" else "squash")
    assert pp.interpolation == ("bilinear" if kind == "siglip2" else "bicubic")
    assert pp.mean == ((0.48145466, 0.4578275, 0.40821073) if kind == "clip" else (0.5,) * 3)
    assert info.weights[0].suffix == ".safetensors"
    assert {"config.json", "processor_config.json"} <= {p.name for p in info.weights[1:]}


def test_model_id_follows_the_weights(saved, loaded, tmp_path):
    same = shutil.copytree(saved["clip"], tmp_path / "copy")
    other = make_clip(tmp_path / "other", seed=1)
    load = lambda f: cliplens.load_model(f"transformers:{f}", device="cpu", precision="fp32")  # noqa: E731
    assert load(same).info.model_id == loaded["clip"].info.model_id
    assert load(other).info.model_id != loaded["clip"].info.model_id


def _edit_json(path: Path, edit) -> None:
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


@pytest.mark.parametrize(
    "file, section, setting",
    [
        ("processor_config.json", "image_processor", {"image_mean": [0.5] * 3}),
        ("processor_config.json", "image_processor", {"crop_size": {"height": 24, "width": 24}}),
        ("config.json", "vision_config", {"layer_norm_eps": 0.1}),
        ("config.json", "text_config", {"hidden_act": "gelu"}),
        ("tokenizer_config.json", None, {"model_max_length": 8}),
    ],
)
def test_model_id_follows_the_files_that_shape_vectors(
    file, section, setting, saved, loaded, tmp_path
):
    """Beside the weights, the model's, processor's and tokenizer's settings decide the
    vectors: an edited copy is another model, a moved one the same."""
    moved = tmp_path / "moved"
    shutil.move(shutil.copytree(saved["clip"], tmp_path / "copy"), moved)
    edited = shutil.copytree(saved["clip"], tmp_path / "edited")
    _edit_json(edited / file, lambda d: (d[section] if section else d).update(setting))
    load = lambda f: cliplens.load_model(f"transformers:{f}", device="cpu", precision="fp32")  # noqa: E731
    assert load(moved).info.model_id == loaded["clip"].info.model_id
    assert load(edited).info.model_id != loaded["clip"].info.model_id


def test_a_record_is_not_used_once_a_processor_setting_changes(saved, tmp_path, fresh_home):
    from cliplens.models.ref import ModelRef, recorded_info

    folder = shutil.copytree(saved["clip"], tmp_path / "m")
    name = f"transformers:{folder}"
    first = ModelRef(name, device="cpu", precision="fp32")
    first.load()
    assert recorded_info(first.name) is not None
    _edit_json(
        folder / "processor_config.json", lambda d: d["image_processor"].update(image_std=[0.5] * 3)
    )
    assert recorded_info(first.name) is None  # loaded again, not read from the record
    again = ModelRef(name, device="cpu", precision="fp32")
    assert again.info.preprocessing.std == (0.5,) * 3
    assert again.info.model_id != first.info.model_id


def test_siglip_scores_are_read_in_fp32_under_bf16(tmp_path):
    """A logit_scale of 117.33 is 115.5 in bf16 and a bias of -12.93 is -12.9375, which
    moves sigmoid scores near 0.5: both come from the checkpoint, unrounded."""
    folder = make_siglip(tmp_path / "siglip")
    model = transformers.AutoModel.from_pretrained(str(folder))
    with torch.no_grad():
        model.logit_scale.fill_(math.log(117.33))
        model.logit_bias.fill_(-12.93)
    model.save_pretrained(folder)
    for precision in ("fp32", "bf16"):
        info = cliplens.load_model(f"transformers:{folder}", device="cpu", precision=precision).info
        assert info.logit_scale == pytest.approx(117.33, rel=1e-6), precision
        assert info.logit_bias == pytest.approx(-12.93, abs=1e-6), precision


def test_open_clip_scores_are_read_in_fp32_under_bf16(tiny_model_dir, tiny):
    """The open_clip backend too: the tiny model's scale, 1/0.07 = 14.29, is 14.25 in bf16."""
    model = cliplens.load_model(f"local:{tiny_model_dir}", device="cpu", precision="bf16")
    assert model.info.logit_scale == pytest.approx(1 / 0.07, rel=1e-5)
    assert model.info.logit_scale == pytest.approx(tiny.info.logit_scale, rel=1e-6)


def test_a_checkpoint_missing_weights_is_refused(saved, tmp_path):
    """A safetensors without the text tower would load with random text weights."""
    from safetensors.torch import load_file, save_file

    folder = shutil.copytree(saved["clip"], tmp_path / "partial")
    state = load_file(str(folder / "model.safetensors"))
    kept = {k: v for k, v in state.items() if not k.startswith("text_model.")}
    save_file(kept, str(folder / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(InvalidInputError) as err:
        cliplens.load_model(f"transformers:{folder}", device="cpu", precision="fp32")
    msg = str(err.value)
    n = len(state) - len(kept)
    assert str(folder) in msg and f"lacks {n} " in msg and "text_model." in msg
    assert "\n" not in msg


def test_height_and_width_are_squashed_before_the_crop(tmp_path):
    """CLIPImageProcessor with a height x width size squashes to it, then crops: an odd
    photo gets the processor's own pixels (the Pillow processor, resampled as cliplens)."""
    saved_to = tmp_path / "processor"
    transformers.CLIPImageProcessor(
        size={"height": 32, "width": 32}, crop_size={"height": 32, "width": 32}
    ).save_pretrained(saved_to)
    image = transformers.AutoImageProcessor.from_pretrained(str(saved_to), use_fast=False)
    pp, _ = preprocessing_of("m", image.to_dict())
    rng = np.random.default_rng(0)
    photo = Image.fromarray(rng.integers(0, 256, (45, 37, 3), dtype=np.uint8))  # 37x45
    want = image(images=[photo], return_tensors="pt")["pixel_values"][0].numpy()
    assert np.abs(pp(photo) - want).max() <= 1e-5
    # a squash and then a smaller crop is not a preprocessing cliplens has
    with pytest.raises(InvalidInputError, match="crop_size equal to size"):
        preprocessing_of("m", image.to_dict() | {"crop_size": {"height": 24, "width": 24}})


def test_texts_from_several_threads(loaded):
    """Batches and token counts tokenize with different padding: from 6 threads at once,
    each gets what it gets alone."""
    texts_from_threads(
        loaded["clip"], [f"a photo of a cat number {i} " * (i % 9 + 1) for i in range(32)]
    )


def test_preprocessing_of_processor_settings():
    clip, patch = preprocessing_of(
        "m",
        {
            "size": {"shortest_edge": 256},
            "crop_size": {"height": 224, "width": 224},
            "do_center_crop": True,
            "resample": 2,
        },
    )
    assert (clip.image_size, clip.resize_size, clip.resize_mode, clip.interpolation) == (
        224,
        256,
        "shortest",
        "bilinear",
    )
    assert patch is None
    naflex, patch = preprocessing_of("m", {"patch_size": 16, "max_num_patches": 1000})
    assert (naflex.image_size, patch) == (31 * 16, 16)  # the largest square grid that fits
    with pytest.raises(InvalidInputError, match="not a square"):
        preprocessing_of("m", {"size": {"height": 224, "width": 320}})
    with pytest.raises(InvalidInputError, match="1/255"):
        preprocessing_of("m", {"size": {"height": 224, "width": 224}, "do_normalize": False})


def test_siglip2_pads_patches_as_the_processor_does(saved):
    """A grid smaller than max_num_patches is padded and masked, as Siglip2ImageProcessor
    pads: 3x3 patches of 16 in a budget of 12."""
    model, _ = _reference(saved["siglip2"])
    image = transformers.Siglip2ImageProcessor(patch_size=16, max_num_patches=12)
    photo = _square_photo(48)
    from cliplens.models.hf_transformers import _PatchTower

    inputs = image(images=[photo], max_num_patches=12, return_tensors="pt")
    assert inputs["pixel_attention_mask"].sum() == 9
    pixels = torch.from_numpy(
        preprocessing_of("m", image.to_dict() | {"max_num_patches": 12})[0](photo)
    )
    with torch.inference_mode():
        want = _unit(model.get_image_features(**inputs))
        got = _unit(_PatchTower(model, 16, 12)(pixels[None]))
    assert np.abs(got - want).max() <= 1e-5


# ---------------------------------------------------------------- errors


def test_hub_name_without_network_fails_at_once(monkeypatch):
    from huggingface_hub import constants

    def no_dns(*args, **kwargs):
        raise socket.gaierror(-2, "Name or service not known")

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(socket, "getaddrinfo", no_dns)
    name = "transformers:openai/clip-vit-base-patch32"
    start = time.monotonic()
    with pytest.raises(ModelUnavailableError) as err:
        cliplens.load_model(name, device="cpu")
    assert time.monotonic() - start < 2.0
    msg = str(err.value)
    cache = cliplens.settings.get_settings().model_cache
    assert name in msg and str(cache) in msg and "cannot resolve" in msg
    assert "\n" not in msg
    # the alternatives that need no network: the bundled model, or files already here
    assert all(f"'{alt}" in msg for alt in ("offline", "local:PATH", "transformers:FOLDER"))


def test_hub_offline_flag_fails_at_once(monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ModelUnavailableError, match="HF_HUB_OFFLINE"):
        cliplens.load_model("transformers:google/siglip-base-patch16-224", device="cpu")


def test_folder_that_is_not_a_transformers_save(tmp_path, tiny_model_dir):
    (tmp_path / "notes.txt").write_text("hello")
    for folder, match in (
        (tmp_path, "not a transformers save"),
        (tiny_model_dir, "local:PATH"),  # open_clip's layout: says how to load it
    ):
        with pytest.raises(InvalidInputError, match=match) as err:
            cliplens.load_model(f"transformers:{folder}", device="cpu")
        assert str(folder) in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(InvalidInputError, match="neither a folder nor a hub repo"):
        cliplens.load_model("transformers:./no/such/folder", device="cpu")


def test_folder_without_weights(tmp_path, saved):
    folder = shutil.copytree(saved["clip"], tmp_path / "m")
    (folder / "model.safetensors").unlink()
    with pytest.raises(InvalidInputError, match="holds no weights"):
        cliplens.load_model(f"transformers:{folder}", device="cpu")


# ---------------------------------------------------------------- tasks


def test_siglip_multi_label_scores_are_sigmoids(loaded):
    encoder = loaded["siglip"]
    labels = ["astronaut", "cat", "coffee"]
    photo = _square_photo(32)
    result = cliplens.classify(
        encoder, [photo], labels, templates="none", multi_label=True, threshold=-1.0
    )
    scores = dict(result.predictions[0].labels)
    info = encoder.info
    cos = encoder.encode_images([photo])[0] @ encoder.encode_texts(labels).T
    want = 1 / (1 + np.exp(-(info.logit_scale * cos + info.logit_bias)))
    assert [scores[lb] for lb in labels] == pytest.approx(want.tolist(), abs=1e-5)
    assert abs(sum(scores.values()) - 1.0) > 0.05  # independent, not a softmax
    # the default cut-off of a sigmoid model is a probability of one half
    default = cliplens.classify(encoder, [photo], labels, templates="none", multi_label=True)
    assert default.threshold == 0.5
    kept = {lb for lb, s in scores.items() if s >= 0.5}
    assert {lb for lb, _ in default.predictions[0].labels} == kept


def test_image_tower_is_the_encoders_network(loaded):
    """image_tower (OpenVINO, fine-tuning) is the network images go through, with the
    vision weights only."""
    for kind, encoder in loaded.items():
        tower = encoder.image_tower()
        pixels = torch.from_numpy(encoder.info.preprocessing(_square_photo(None)))[None]
        with torch.inference_mode():
            assert torch.equal(tower(pixels), encoder._encode_pixels(pixels)), kind
        text_weights = {id(p) for p in encoder.model.text_model.parameters()}
        assert not text_weights & {id(p) for p in tower.parameters()}, kind
        retrained = encoder.with_image_tower(copy.deepcopy(tower), "transformers:retrained")
        assert retrained.info.model_id == "transformers:retrained"
        assert encoder.info.model_id.startswith("transformers:")


def test_clip_text_tower_exports_and_siglip_declines(saved, fresh_home):
    from cliplens.models.ref import ModelRef

    ref = ModelRef(f"transformers:{saved['clip']}", device="cpu", precision="fp32")
    assert ref.prepare_fast_text()
    fast = ref.fast_text()
    want = cliplens.load_model(f"transformers:{saved['clip']}", device="cpu").encode_texts(TEXTS)
    assert (fast.encode_texts(TEXTS) * want).sum(axis=1).min() >= 0.9999
    siglip = ModelRef(f"transformers:{saved['siglip']}", device="cpu", precision="fp32")
    assert not siglip.prepare_fast_text()
