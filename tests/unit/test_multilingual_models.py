"""`multilingual:` models: a sentence-transformers text tower paired with an image model.

The text towers here are tiny random (or briefly trained) BERTs saved by
sentence-transformers itself, so what cliplens computes is compared with that package's
own `encode`; the image side is the suite's tiny open_clip model or the offline model.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from cliplens import load_model
from cliplens.device import Precision
from cliplens.errors import InvalidInputError, ModelUnavailableError, UnknownModelError
from cliplens.models.multilingual import PAIRINGS, load_multilingual
from tests_helpers import texts_from_threads

st = pytest.importorskip("sentence_transformers")

# parallel sentences: what the photos of `write_photos` show, and a few others
PAIRS = [
    ("a photo of a cat", "ein Foto einer Katze"),
    ("a cup of coffee", "eine Tasse Kaffee"),
    ("a rocket launch", "ein Raketenstart"),
    ("a motorcycle", "ein Motorrad"),
    ("a man with a camera", "ein Mann mit einer Kamera"),
    ("galaxies in deep space", "Galaxien im tiefen Weltraum"),
    ("a page of printed text", "eine Seite mit gedrucktem Text"),
    ("a dog on the beach", "ein Hund am Strand"),
    ("a red boat on the lake", "ein rotes Boot auf dem See"),
    ("a bowl of soup", "eine Schüssel Suppe"),
    ("a snowy mountain", "ein verschneiter Berg"),
    ("a city at night", "eine Stadt bei Nacht"),
]
TEXTS = [
    "a photo of a cat",
    "eine Katze auf dem Sofa",
    "Ein ROTES Boot",  # case: the tokenizer lowercases or not, as saved
    "a much longer sentence about a dog on the beach that runs past the tower's "
    "maximum sequence length of sixteen tokens, so it is cut",
    "",
]


def build_text_tower(
    folder: Path, dim: int, activation: torch.nn.Module | None = None, seed: int = 0
) -> st.SentenceTransformer:
    """A random sentence-transformers model (WordPiece trained on PAIRS, a 2-layer BERT,
    mean pooling, Dense to `dim`), saved into `folder` by sentence-transformers."""
    from sentence_transformers.base.modules import Dense
    from sentence_transformers.base.modules.transformer import Transformer
    from sentence_transformers.sentence_transformer.modules import Pooling
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import BertConfig, BertModel, PreTrainedTokenizerFast

    special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=False)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    sentences = [s for pair in PAIRS for s in pair]
    tok.train_from_iterator(
        sentences, trainers.WordPieceTrainer(vocab_size=300, special_tokens=special)
    )
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", cls), ("[SEP]", sep)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
        model_max_length=16,
    )
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=tok.get_vocab_size(),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=32,
    )
    raw = folder.with_name(folder.name + "-raw")
    BertModel(config).save_pretrained(raw)
    fast.save_pretrained(raw)
    transformer = Transformer(str(raw))
    pooling = Pooling(transformer.get_embedding_dimension(), pooling_mode="mean")
    dense = Dense(32, dim, activation_function=activation or torch.nn.Tanh())
    model = st.SentenceTransformer(modules=[transformer, pooling, dense], device="cpu")
    model.save(str(folder))
    return model


@pytest.fixture(scope="module")
def text_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("st") / "text"
    build_text_tower(folder, dim=32)
    return folder


@pytest.fixture(scope="module")
def paired(text_folder: Path, tiny_model_dir: Path):
    return load_model(f"multilingual:{text_folder}+local:{tiny_model_dir}", "cpu", "fp32")


def _reference(folder: Path, texts: list[str]) -> np.ndarray:
    model = st.SentenceTransformer(str(folder), device="cpu")
    return model.encode(texts, normalize_embeddings=True, convert_to_numpy=True)


def test_texts_are_what_sentence_transformers_encodes(paired, text_folder):
    ours = paired.encode_texts(TEXTS, batch_size=2)
    np.testing.assert_allclose(ours, _reference(text_folder, TEXTS), atol=1e-5)
    assert ours.shape == (len(TEXTS), 32)
    # the long text is cut at the saved maximum (16), start and end tokens included
    assert paired.token_counts(TEXTS)[3] == 16


def test_images_are_the_image_models_own(paired, tiny, photos):
    files = sorted(photos.iterdir())[:4]
    np.testing.assert_allclose(paired.encode_images(files), tiny.encode_images(files), atol=1e-6)
    assert paired.info.preprocessing == tiny.info.preprocessing


def test_a_trained_image_tower_keeps_the_text_tower(paired, photos):
    """What robust training does with a model: a copy of its image tower, trained, under
    a new model_id; the text side is the same."""
    import copy

    tower = copy.deepcopy(paired.image_tower())
    with torch.no_grad():
        next(tower.parameters()).mul_(1.5)
    trained = paired.with_image_tower(tower, "robust-test")
    files = sorted(photos.iterdir())[:2]
    assert trained.info.model_id == "robust-test"
    np.testing.assert_array_equal(trained.encode_texts(TEXTS), paired.encode_texts(TEXTS))
    assert not np.allclose(trained.encode_images(files), paired.encode_images(files))


def test_identity_names_both_towers_and_differs_from_the_image_model(paired, tiny, text_folder):
    info = paired.info
    assert info.model_id.startswith("multilingual:")
    assert info.model_id.endswith("+" + tiny.info.model_id)
    assert info.model_id != tiny.info.model_id  # the text side is keyed by model_id too
    assert info.dim == 32 and info.text_id == info.model_id
    assert (text_folder / "model.safetensors") in info.weights
    assert set(tiny.info.weights) <= set(info.weights)
    # another text tower is another model
    other = text_folder.parent / "other"
    build_text_tower(other, dim=32, seed=1)
    again = load_model(f"multilingual:{other}+local:{tiny.info.weights[0].parent}", "cpu", "fp32")
    assert again.info.model_id != info.model_id
    assert again.info.model_id.endswith("+" + tiny.info.model_id)


def test_a_text_tower_of_another_size_is_refused(text_folder, tiny_model_dir):
    small = text_folder.parent / "small"
    build_text_tower(small, dim=16)
    with pytest.raises(InvalidInputError) as e:
        load_model(f"multilingual:{small}+local:{tiny_model_dir}", "cpu", "fp32")
    message = str(e.value)
    assert "\n" not in message and "16-d" in message and "32-d" in message


def test_names_that_cannot_be_paired_say_what_to_write(tmp_path, text_folder):
    with pytest.raises(UnknownModelError, match="clip-ViT-B-32-multilingual-v1"):
        load_model("multilingual:no-such-pairing", "cpu")
    with pytest.raises(InvalidInputError, match="TEXT_FOLDER\\+IMAGE_MODEL"):
        load_model(f"multilingual:{tmp_path}+ViT-B-32:openai", "cpu")
    with pytest.raises(UnknownModelError, match="itself multilingual"):
        load_model(f"multilingual:{text_folder}+multilingual:{text_folder}+offline", "cpu")


def test_a_documented_pairing_offline_fails_at_once(fresh_home, monkeypatch):
    from huggingface_hub import constants

    name = "multilingual:clip-ViT-B-32-multilingual-v1"
    for offline in (True, False):
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", offline)
        if not offline:  # no network: the host does not resolve

            def no_dns(*args, **kwargs):
                raise OSError("no network")

            monkeypatch.setattr("socket.getaddrinfo", no_dns)
        start = time.monotonic()
        with pytest.raises(ModelUnavailableError) as e:
            load_model(name, "cpu")
        assert time.monotonic() - start < 2
        message = str(e.value)
        assert "\n" not in message and name in message and str(fresh_home / "models") in message
        assert "'offline'" in message and "'multilingual:TEXT_FOLDER+IMAGE_MODEL'" in message


def test_a_documented_pairing_loads_from_the_cache(fresh_home, monkeypatch, text_folder, tiny):
    """The text tower of a pairing in `PAIRINGS` comes from the hub cache without network,
    and its image model is loaded by the name the pairing gives."""
    import shutil

    from huggingface_hub import constants

    pairing = PAIRINGS["clip-ViT-B-32-multilingual-v1"]
    repo = fresh_home / "models" / ("models--" + pairing.text_repo.replace("/", "--"))
    commit = "0" * 40
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    shutil.copytree(text_folder, repo / "snapshots" / commit)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    asked = []

    def load_image(name, device, precision):
        asked.append(name)
        return tiny

    model = load_multilingual(
        "multilingual:clip-ViT-B-32-multilingual-v1",
        "clip-ViT-B-32-multilingual-v1",
        torch.device("cpu"),
        Precision.FP32,
        load_image=load_image,
    )
    assert asked == ["ViT-B-32:openai"]
    np.testing.assert_allclose(model.encode_texts(TEXTS), _reference(text_folder, TEXTS), atol=1e-5)


def _legacy(folder: Path, out: Path, lower: bool) -> Path:
    """`folder` rewritten as sentence-transformers 2.x saved models (the hub's
    clip-ViT-B-32-multilingual-v1 among them): module types under
    sentence_transformers.models, one flag per pooling mode, pickled Dense weights, the
    maximum length and lowercasing in sentence_bert_config.json, Identity activation."""
    import shutil

    from safetensors.torch import load_file

    shutil.copytree(folder, out)
    modules = json.loads((out / "modules.json").read_text())
    for m in modules:
        m["type"] = "sentence_transformers.models." + m["type"].rpartition(".")[2]
    (out / "modules.json").write_text(json.dumps(modules))
    pooling = {
        "word_embedding_dimension": 32,
        "pooling_mode_cls_token": False,
        "pooling_mode_mean_tokens": True,
        "pooling_mode_max_tokens": False,
        "pooling_mode_mean_sqrt_len_tokens": False,
    }
    (out / "1_Pooling" / "config.json").write_text(json.dumps(pooling))
    dense = json.loads((out / "2_Dense" / "config.json").read_text())
    dense["activation_function"] = "torch.nn.modules.linear.Identity"
    for key in ("module_input_name", "module_output_name"):
        dense.pop(key, None)
    (out / "2_Dense" / "config.json").write_text(json.dumps(dense))
    state = load_file(str(out / "2_Dense" / "model.safetensors"))
    torch.save(state, out / "2_Dense" / "pytorch_model.bin")
    (out / "2_Dense" / "model.safetensors").unlink()
    sbert = {"max_seq_length": 8, "do_lower_case": lower}
    (out / "sentence_bert_config.json").write_text(json.dumps(sbert))
    return out


def test_the_older_saved_layout_reads_the_same(text_folder, tiny_model_dir):
    ids = set()
    for lower in (False, True):
        legacy = _legacy(text_folder, text_folder.parent / f"legacy-{lower}", lower)
        model = load_model(f"multilingual:{legacy}+local:{tiny_model_dir}", "cpu", "fp32")
        np.testing.assert_allclose(model.encode_texts(TEXTS), _reference(legacy, TEXTS), atol=1e-5)
        assert max(model.token_counts(TEXTS)) == 8
        assert (legacy / "2_Dense" / "pytorch_model.bin") in model.info.weights
        same_ids = model.text.ids(["Ein ROTES Boot"]) == model.text.ids(["ein rotes boot"])
        assert same_ids is lower  # the saved tokenizer is cased: only do_lower_case folds it
        ids.add(model.info.model_id)
    assert len(ids) == 2  # the same weights, lowercased or not, are two models


def test_a_last_normalize_is_read_and_one_elsewhere_refused(text_folder, tiny_model_dir):
    import shutil

    normalize = {"idx": 3, "name": "3", "path": "3_Normalize", "type": "x.Normalize"}
    for where, ok in ((3, True), (2, False)):
        folder = text_folder.parent / f"normalize-{where}"
        shutil.copytree(text_folder, folder)
        modules = json.loads((folder / "modules.json").read_text())
        modules.insert(where, normalize)
        (folder / "modules.json").write_text(json.dumps(modules))
        name = f"multilingual:{folder}+local:{tiny_model_dir}"
        if ok:
            texts = load_model(name, "cpu", "fp32").encode_texts(TEXTS)
            np.testing.assert_allclose(texts, _reference(text_folder, TEXTS), atol=1e-5)
        else:
            with pytest.raises(InvalidInputError, match="Pooling -> Normalize -> Dense"):
                load_model(name, "cpu", "fp32")


def test_other_pooling_is_refused(text_folder, tiny_model_dir):
    import shutil

    folder = text_folder.parent / "cls-pooled"
    shutil.copytree(text_folder, folder)
    cfg = json.loads((folder / "1_Pooling" / "config.json").read_text())
    (folder / "1_Pooling" / "config.json").write_text(json.dumps(cfg | {"pooling_mode": "cls"}))
    with pytest.raises(InvalidInputError, match="mean pooling only"):
        load_model(f"multilingual:{folder}+local:{tiny_model_dir}", "cpu", "fp32")


def test_text_tower_exports_for_torch_free_queries_under_its_own_id(
    fresh_home, text_folder, tiny_model_dir
):
    """The ONNX export is the pairing's, kept apart from the image model's English one."""
    from cliplens.models.onnx_text import folder_for
    from cliplens.models.ref import ModelRef

    image = ModelRef(f"local:{tiny_model_dir}", device="cpu", precision="fp32")
    assert image.prepare_fast_text()
    ref = ModelRef(f"multilingual:{text_folder}+local:{tiny_model_dir}", "cpu", "fp32")
    assert ref.prepare_fast_text()
    assert (folder_for(ref.info.model_id) / "meta.json").is_file()
    queries = [t for t in TEXTS if t]
    fast = ref.fast_text().encode_texts(queries)
    np.testing.assert_allclose(fast, _reference(text_folder, queries), atol=1e-4)
    # the image model's own export still gives its own text tower's vectors
    english = ModelRef(f"local:{tiny_model_dir}", device="cpu", precision="fp32")
    assert not np.allclose(english.encode_texts(queries[:1]), fast[:1], atol=1e-2)
    np.testing.assert_allclose(
        english.fast_text().encode_texts(queries), english.load().encode_texts(queries), atol=1e-4
    )


def test_a_german_query_finds_what_its_english_translation_finds(tmp_path, offline, photos):
    """No real multilingual tower can be fetched here, so one is made the way its authors
    made theirs, in miniature: a tiny text tower trained for a few seconds to put each
    English sentence of PAIRS and its German translation where the offline model's own
    text tower puts the English one, then paired with the offline model's images. This
    checks that the pairing carries that alignment into a catalog's search (each German
    query's best photo is its English query's, and the offline model's own); on these
    training sentences, not as a claim about unseen ones."""
    from cliplens import open_catalog, search, update_catalog

    folder = tmp_path / "student"
    student = build_text_tower(folder, dim=384)
    english, german = [e for e, _ in PAIRS], [d for _, d in PAIRS]
    goal = torch.from_numpy(offline.encode_texts(english)).repeat(2, 1)
    features = student.preprocess(english + german)
    optimiser = torch.optim.Adam(student.parameters(), lr=1e-2)
    student.train()
    for _ in range(120):
        out = student(dict(features))["sentence_embedding"]
        loss = (1 - torch.nn.functional.cosine_similarity(out, goal)).mean()
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    student.eval()
    student.save(str(folder))

    model = load_model(f"multilingual:{folder}+offline", "cpu", "fp32")
    files = sorted(photos.iterdir())
    scores = offline.encode_texts(english) @ offline.encode_images(files).T
    top2 = -np.sort(-scores, axis=1)[:, :2]
    clear = [i for i in range(len(PAIRS)) if top2[i, 0] - top2[i, 1] > 0.05]
    assert len(clear) >= 6  # photos the offline model itself tells apart
    catalog = open_catalog(tmp_path / "catalog.db")
    update_catalog(catalog, model, [photos], workers=0)
    for i in clear:
        best = str(files[int(scores[i].argmax())].resolve())
        for query in PAIRS[i]:
            assert search(catalog, model, query, n=1)[0].path == best, query
    vectors = model.encode_texts(english + german)
    cosines = (vectors[: len(PAIRS)] * vectors[len(PAIRS) :]).sum(1)
    assert cosines.min() > 0.95


def test_only_what_a_pytorch_forward_needs_is_fetched():
    from cliplens.models.multilingual import _wanted

    repo = [
        ".gitattributes",
        "README.md",
        "modules.json",
        "config.json",
        "config_sentence_transformers.json",
        "sentence_bert_config.json",
        "special_tokens_map.json",
        "tokenizer_config.json",
        "vocab.txt",
        "model.safetensors",
        "pytorch_model.bin",
        "tf_model.h5",
        "1_Pooling/config.json",
        "2_Dense/config.json",
        "2_Dense/pytorch_model.bin",
        "onnx/model.onnx",
        "onnx/config.json",
        "openvino/openvino_model.xml",
    ]
    wanted = set(_wanted(repo))
    assert {"model.safetensors", "2_Dense/pytorch_model.bin", "vocab.txt"} <= wanted
    assert {"modules.json", "1_Pooling/config.json", "2_Dense/config.json"} <= wanted
    assert not wanted & {"pytorch_model.bin", "tf_model.h5", "README.md", "onnx/config.json"}
    assert not any(f.startswith(("onnx/", "openvino/")) for f in wanted)


def test_an_activation_outside_torch_is_refused(text_folder, tiny_model_dir):
    import shutil

    folder = text_folder.parent / "odd-activation"
    shutil.copytree(text_folder, folder)
    path = folder / "2_Dense" / "config.json"
    path.write_text(json.dumps(json.loads(path.read_text()) | {"activation_function": "os.system"}))
    with pytest.raises(InvalidInputError, match=r"not a torch\.nn module"):
        load_model(f"multilingual:{folder}+local:{tiny_model_dir}", "cpu", "fp32")


def test_a_dense_layer_without_a_saved_activation_is_tanh(text_folder, tiny_model_dir):
    """sentence-transformers reads a Dense config without activation_function as Tanh."""
    import shutil

    folder = text_folder.parent / "no-activation"
    shutil.copytree(text_folder, folder)
    path = folder / "2_Dense" / "config.json"
    cfg = json.loads(path.read_text())
    del cfg["activation_function"]
    path.write_text(json.dumps(cfg))
    model = load_model(f"multilingual:{folder}+local:{tiny_model_dir}", "cpu", "fp32")
    np.testing.assert_allclose(model.encode_texts(TEXTS), _reference(folder, TEXTS), atol=1e-5)


def test_a_cached_snapshot_without_its_weights_is_fetched_again(
    fresh_home, monkeypatch, text_folder
):
    """A download cut short leaves modules.json without weights: such a snapshot is not
    the cache's answer (offline, the one-line error that it cannot be fetched)."""
    import shutil

    from huggingface_hub import constants

    from cliplens.models.multilingual import hub_folder

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    name = "multilingual:clip-ViT-B-32-multilingual-v1"
    for n, missing in enumerate(("model.safetensors", "2_Dense/model.safetensors", None)):
        repo = f"test/partial-{n}"
        cached = fresh_home / "models" / ("models--" + repo.replace("/", "--"))
        commit = "0" * 40
        (cached / "refs").mkdir(parents=True)
        (cached / "refs" / "main").write_text(commit)
        snapshot = shutil.copytree(text_folder, cached / "snapshots" / commit)
        if missing is None:  # complete: the cache's answer
            assert hub_folder(name, repo) == snapshot
            continue
        (snapshot / missing).unlink()
        with pytest.raises(ModelUnavailableError, match="HF_HUB_OFFLINE"):
            hub_folder(name, repo)


def test_texts_from_several_threads(paired):
    """Batches and token counts tokenize with different padding: from 6 threads at once,
    each gets what it gets alone."""
    texts = [f"ein Foto einer Katze {i} " * (i % 5 + 1) for i in range(32)]
    texts_from_threads(paired, texts)


def test_loading_leaves_transformers_progress_bars_as_they_were(text_folder):
    from transformers.utils import logging as hf_logging

    from cliplens.models.multilingual import SentenceTower

    was = hf_logging.is_progress_bar_enabled()
    try:
        for enabled in (True, False):
            (hf_logging.enable_progress_bar if enabled else hf_logging.disable_progress_bar)()
            SentenceTower("m", text_folder, torch.device("cpu"), Precision.FP32)
            assert hf_logging.is_progress_bar_enabled() is enabled
    finally:
        (hf_logging.enable_progress_bar if was else hf_logging.disable_progress_bar)()
