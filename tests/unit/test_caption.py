"""ClipCap captioner: mappers, masking, the prefix steering the LM, save/load, refusals,
decoding options, training resume, and the metrics on hand-checked cases."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from cliplens.captioning import language_model as lms
from cliplens.captioning.embedded import EmbeddedPairs, embed_pairs
from cliplens.captioning.metrics import java_available, score_captions, simple_tokenize
from cliplens.captioning.model import (
    Captioner,
    CaptionerConfig,
    EncoderIdentity,
    MLPMapper,
    TransformerMapper,
    check_encoder,
    load_captioner,
    read_config,
)
from cliplens.captioning.train import CaptionTrainConfig, train_captioner
from cliplens.errors import InvalidInputError

CAPTIONS = [
    "a red circle",
    "a blue square above a green star",
    "a small yellow triangle",
    "a black hexagon to the left of a white diamond",
]
DIM = 16
TINY_LM = lms.ScratchLM(layers=1, width=32, heads=2, vocab=300, context=64)


def _cfg(variant: str = "mlp", **kw) -> CaptionerConfig:
    base = dict(
        encoder="local:/x",
        encoder_id="enc-a",
        embed_dim=DIM,
        lm="scratch:gpt2",
        lm_width=TINY_LM.width,
        variant=variant,
        prefix_length=4,
        clip_length=3,
        mapper_layers=1,
        mapper_heads=2,
        max_tokens=48,
    )
    return CaptionerConfig(**{**base, **kw})


def _captioner(variant: str = "mlp", seed: int = 0, **kw) -> Captioner:
    torch.manual_seed(seed)
    lm, tok = lms.scratch_lm("scratch:gpt2", CAPTIONS * 5, TINY_LM)
    return Captioner(_cfg(variant, **kw), lm, tok)


def _unit(n: int, seed: int = 0) -> np.ndarray:
    x = np.random.default_rng(seed).normal(size=(n, DIM)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.mark.parametrize("variant", ["mlp", "transformer"])
def test_mapper_gives_prefix_of_lm_width(variant):
    cfg = _cfg(variant, prefix_length=7)
    mapper = MLPMapper(cfg) if variant == "mlp" else TransformerMapper(cfg)
    out = mapper(torch.from_numpy(_unit(5)))
    assert out.shape == (5, 7, TINY_LM.width)
    # each image gets its own prefix
    assert not torch.allclose(out[0], out[1])


def test_inputs_mask_prefix_and_padding():
    cap = _captioner()
    ids, mask = cap.tokenize(["a red circle", "a blue square above a green star"])
    assert mask[0].sum() < mask[1].sum()  # the short caption is padded
    assert ids[0, mask[0].sum() - 1] == cap.tokenizer.eos_token_id  # EOS ends every caption
    inputs = cap.inputs(torch.from_numpy(_unit(2)), ids, mask)
    k = cap.cfg.prefix_length
    assert inputs["inputs_embeds"].shape[:2] == (2, k + ids.shape[1])
    assert (inputs["labels"][:, :k] == -100).all()  # no loss on the prefix
    assert (inputs["labels"][0, k + int(mask[0].sum()) :] == -100).all()  # nor on padding
    assert (inputs["labels"][1, k:] == ids[1]).all()
    assert (inputs["attention_mask"][:, :k] == 1).all()
    assert (inputs["attention_mask"][0, k:] == mask[0]).all()


def test_word_dropout_hides_inputs_not_targets():
    cap = _captioner()
    ids, mask = cap.tokenize(CAPTIONS)
    emb = torch.from_numpy(_unit(len(CAPTIONS)))
    plain = cap.inputs(emb, ids, mask)
    torch.manual_seed(0)
    hidden = cap.inputs(emb, ids, mask, word_dropout=0.5)
    k = cap.cfg.prefix_length
    assert torch.equal(hidden["labels"], plain["labels"])
    pad = cap.lm.get_input_embeddings().weight[cap.tokenizer.pad_token_id]
    words, before = hidden["inputs_embeds"][:, k:], plain["inputs_embeds"][:, k:]
    changed = (words != before).any(-1)
    assert 0.3 < changed[mask == 1].float().mean() < 0.7
    assert torch.allclose(words[changed], pad.expand(int(changed.sum()), -1))
    assert torch.equal(hidden["inputs_embeds"][:, :k], plain["inputs_embeds"][:, :k])


def test_padding_does_not_change_a_captions_loss():
    """A caption scores the same alone and padded beside a longer one."""
    cap = _captioner().eval()
    emb = torch.from_numpy(_unit(2))
    with torch.no_grad():
        alone = cap.loss(emb[:1], ["a red circle"])
        ids, mask = cap.tokenize(["a red circle", "a blue square above a green star"])
        logits = cap.lm(
            **{k: v for k, v in cap.inputs(emb, ids, mask).items() if k != "labels"}
        ).logits
        n, k = int(mask[0].sum()), cap.cfg.prefix_length
        logp = torch.log_softmax(logits[0, k - 1 : k + n - 1].float(), -1)
        padded = -logp.gather(1, ids[0, :n, None]).mean()
    assert torch.allclose(alone, padded, atol=1e-5)


def _fit(cap: Captioner, emb: np.ndarray, captions: list[str], steps: int = 150) -> None:
    opt = torch.optim.AdamW([p for p in cap.parameters() if p.requires_grad], lr=3e-3)
    x = torch.from_numpy(emb)
    cap.train()
    for _ in range(steps):
        opt.zero_grad()
        cap.loss(x, captions).backward()
        opt.step()


@pytest.mark.parametrize("variant", ["mlp", "transformer"])
def test_prefix_steers_the_caption(variant):
    """Trained on a toy set, each embedding gets its own caption back: the LM reads the
    prefix (one LM and one fixed prompt could only give one caption)."""
    cap = _captioner(variant, lm_trained=True)
    emb = _unit(len(CAPTIONS), seed=1)
    _fit(cap, emb, CAPTIONS)
    out = cap.generate(emb)
    assert out == CAPTIONS
    assert len(set(out)) == len(CAPTIONS)


def test_frozen_lm_does_not_change():
    cap = _captioner("transformer", lm_trained=False, lm="gpt2")
    before = {k: v.clone() for k, v in cap.lm.state_dict().items()}
    _fit(cap, _unit(4), CAPTIONS, steps=3)
    assert all(torch.equal(before[k], v) for k, v in cap.lm.state_dict().items())
    assert not any(p.requires_grad for p in cap.lm.parameters())


def test_scratch_lm_cannot_be_frozen():
    with pytest.raises(InvalidInputError, match="cannot stay frozen"):
        _cfg(lm_trained=False).validate()


def test_scratch_tokenizer_round_trip():
    _, tok = lms.scratch_lm("scratch:gpt2", CAPTIONS, TINY_LM)
    for text in [*CAPTIONS, "unseen Words, ünïcode & digits 42"]:
        assert tok.decode(tok(text).input_ids) == text


def test_save_load_round_trip(tmp_path):
    cap = _captioner()
    emb = _unit(len(CAPTIONS), seed=1)
    _fit(cap, emb, CAPTIONS, steps=60)
    before = cap.generate(emb)
    cap.save(tmp_path / "cap")
    again = load_captioner(tmp_path / "cap")
    assert again.cfg == cap.cfg
    assert again.generate(emb) == before
    # saving over an existing captioner replaces it whole
    cap.save(tmp_path / "cap")
    assert sorted(p.name for p in (tmp_path).iterdir()) == ["cap"]


def test_frozen_lm_is_referenced_not_copied(tmp_path):
    """A frozen LM is loaded by name at load time; only the mapper is saved."""
    lm, tok = lms.scratch_lm("scratch:gpt2", CAPTIONS, TINY_LM)
    lm.save_pretrained(tmp_path / "lm-folder")
    tok.save_pretrained(tmp_path / "lm-folder")
    model, tokenizer = lms.load_lm(str(tmp_path / "lm-folder"))
    cap = Captioner(
        _cfg("transformer", lm=str(tmp_path / "lm-folder"), lm_trained=False), model, tokenizer
    )
    emb = _unit(3)
    before = cap.generate(emb)
    cap.save(tmp_path / "cap")
    assert not (tmp_path / "cap" / "lm").exists()
    assert load_captioner(tmp_path / "cap").generate(emb) == before


def test_refuses_another_encoder(tmp_path):
    cap = _captioner()
    check_encoder(cap.cfg, "enc-a", "local:/x")  # its own encoder is fine
    with pytest.raises(InvalidInputError, match="trained on embeddings of local:/x"):
        check_encoder(cap.cfg, "enc-b", "offline")
    with pytest.raises(InvalidInputError, match=r"shape \(2, 8\)"):
        cap.generate(np.zeros((2, 8), np.float32))


def test_bad_captioner_folder(tmp_path):
    with pytest.raises(InvalidInputError, match=r"no captioner\.json"):
        read_config(tmp_path)
    (tmp_path / "captioner.json").write_text("{not json")
    with pytest.raises(InvalidInputError, match="not a captioner config"):
        read_config(tmp_path)


def test_decoding_options():
    cap = _captioner()
    emb = _unit(len(CAPTIONS), seed=1)
    _fit(cap, emb, CAPTIONS)
    greedy = cap.generate(emb)
    assert cap.generate(emb, beams=3) == greedy  # a model this sure agrees with itself
    a = cap.generate(emb, top_p=0.9, temperature=3.0, seed=1)
    assert cap.generate(emb, top_p=0.9, temperature=3.0, seed=1) == a  # seeded
    draws = {tuple(cap.generate(emb, top_p=1.0, temperature=5.0, seed=s)) for s in range(4)}
    assert len(draws) > 1  # sampling does sample
    with pytest.raises(InvalidInputError, match="pick one"):
        cap.generate(emb, beams=2, top_p=0.9)
    with pytest.raises(InvalidInputError, match="top-p"):
        cap.generate(emb, top_p=1.5)
    assert all(len(c.split()) <= 3 for c in cap.generate(emb, max_tokens=3))


def test_rerank_keeps_the_candidate_closest_to_the_image():
    cap = _captioner()
    emb = _unit(len(CAPTIONS), seed=1)
    _fit(cap, emb, CAPTIONS, steps=40)  # half-trained: the samples differ
    seen: list[str] = []
    vectors: dict[str, np.ndarray] = {}

    def encode_texts(texts):
        seen.extend(texts)
        rng = np.random.default_rng(len(seen))
        for t in texts:
            vectors[t] = rng.normal(size=DIM).astype(np.float32)
        return np.stack([vectors[t] for t in texts])

    best = cap.generate_reranked(emb, encode_texts, candidates=6, temperature=2.0, seed=3)
    greedy = cap.generate(emb)
    drawn = cap.generate(emb, top_p=0.9, temperature=2.0, seed=3, samples=5)
    assert len(drawn) == 5 * len(CAPTIONS)
    for i, caption in enumerate(best):
        pool = [greedy[i], *drawn[5 * i : 5 * i + 5]]
        cos = [float(vectors[c] @ emb[i]) / np.linalg.norm(vectors[c]) for c in pool]
        assert caption == pool[int(np.argmax(cos))]
    assert len(set(seen)) == len(seen)  # each distinct caption is encoded once
    assert cap.generate_reranked(emb, encode_texts, candidates=1) == greedy
    with pytest.raises(InvalidInputError, match="need sampling"):
        cap.generate(emb, samples=3)


def test_bad_lm_names(tmp_path):
    with pytest.raises(InvalidInputError, match="no such GGUF"):
        lms.load_lm(str(tmp_path / "missing.gguf"))
    with pytest.raises(InvalidInputError, match="only inside a captioner"):
        lms.load_lm("scratch:gpt2")
    with pytest.raises(InvalidInputError, match="only scratch:gpt2"):
        lms.scratch_lm("scratch:llama", CAPTIONS, TINY_LM)


# ------------------------------------------------------------------ training


def _toy_data(n_images: int = 8) -> EmbeddedPairs:
    captions = [CAPTIONS[i % len(CAPTIONS)] for i in range(n_images)]
    emb = _unit(len(CAPTIONS), seed=1)[[i % len(CAPTIONS) for i in range(n_images)]]
    return EmbeddedPairs(emb, [f"img{i}" for i in range(n_images)], np.arange(n_images), captions)


ENCODER = EncoderIdentity(name="local:/x", model_id="enc-a", dim=DIM)


def _train_cfg(**kw) -> CaptionTrainConfig:
    base = dict(
        lm="scratch:gpt2",
        variant="mlp",
        prefix_length=4,
        mapper_layers=1,
        batch_size=4,
        epochs=3,
        warmup=2,
        checkpoint_every=2,
        eval_images=4,
        precision="fp32",
        scratch=TINY_LM,
        lr=3e-3,
    )
    return CaptionTrainConfig(**{**base, **kw})


def test_training_learns_and_logs(tmp_path):
    data = _toy_data(16)
    cfg = _train_cfg(epochs=30, lr=5e-3)
    result = train_captioner(cfg, ENCODER, data, tmp_path, val_data=data)
    assert result.losses[-1] < result.losses[0] / 3
    assert [m["epoch"] for m in result.metrics] == list(range(1, 31))
    assert {"val_loss", "val_BLEU-4", "val_CIDEr-D"} <= set(result.metrics[-1])
    assert result.metrics[-1]["val_loss"] < result.metrics[0]["val_loss"]
    cap = load_captioner(result.captioner_path)
    assert cap.cfg.encoder_id == "enc-a"
    assert cap.generate(data.vectors[:4]) == data.captions[:4]
    rows = [json.loads(x) for x in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert sum("loss" in r for r in rows) == result.steps


def test_resume_is_exact(tmp_path):
    data = _toy_data(16)
    whole = train_captioner(_train_cfg(), ENCODER, data, tmp_path / "a")
    first = train_captioner(_train_cfg(), ENCODER, data, tmp_path / "b", max_steps=5)
    assert first.stopped_early and first.steps == 5
    rest = train_captioner(_train_cfg(), ENCODER, data, tmp_path / "b")
    assert rest.steps == whole.steps
    np.testing.assert_allclose(rest.losses, whole.losses[5:], rtol=1e-5, atol=1e-6)
    a = load_captioner(whole.captioner_path).mapper.state_dict()
    b = load_captioner(rest.captioner_path).mapper.state_dict()
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_resume_refuses_other_settings(tmp_path):
    data = _toy_data(16)
    train_captioner(_train_cfg(), ENCODER, data, tmp_path, max_steps=2)
    with pytest.raises(InvalidInputError, match="other settings"):
        train_captioner(_train_cfg(lr=1e-4), ENCODER, data, tmp_path)


def test_embeddings_are_computed_once(tmp_path, tiny, photos):
    """Each distinct image is encoded once; a second run reads the cache, not the model."""
    from cliplens.train.data import Pair

    files = sorted(photos.glob("*.jpg"))[:3]
    pairs = [Pair(f, f"caption {i}") for i, f in enumerate(files)]
    pairs += [Pair(files[0], "another caption of the first")]
    calls = []

    class Counting:
        name, info = "local:/tiny", tiny.info

        def load(self):
            return self

        def ready(self):  # the encoder images go through (Encoder.ready)
            return self

        def encode_images_lenient(self, items, **kw):
            calls.append(len(items))
            return tiny.encode_images_lenient(items, **kw)

    data = embed_pairs(Counting(), pairs, tmp_path)
    assert calls == [3]
    assert data.vectors.shape == (3, tiny.info.dim)
    assert data.references()[0] == ["caption 0", "another caption of the first"]
    again = embed_pairs(Counting(), pairs, tmp_path)
    assert calls == [3]  # cached
    np.testing.assert_array_equal(again.vectors, data.vectors)
    np.testing.assert_array_equal(again.rows, data.rows)


# ------------------------------------------------------------------ metrics


def test_metrics_on_hand_checked_cases():
    """Two images, candidates equal to their single references. CIDEr-D: every n-gram
    order present matches exactly (cosine 1), and three-word captions have no 4-grams, so
    10 * (1 + 1 + 1 + 0) / 4 = 7.5; the five-word caption has all four: 10."""
    refs = [["a red circle"], ["a big blue square above"]]
    same = score_captions(["a red circle", "a big blue square above"], refs, java=False)
    assert same.per_caption["CIDEr-D"] == pytest.approx([7.5, 10.0])
    assert same.scores["CIDEr-D"] == pytest.approx(8.75)
    assert same.scores["BLEU-1"] == pytest.approx(1.0)
    assert same.scores["ROUGE-L"] == pytest.approx(1.0)
    # nothing in common but "a", which every reference has (idf 0): CIDEr-D 0
    other = score_captions(["a dog", "a cat on a mat"], refs, java=False)
    assert other.per_caption["CIDEr-D"] == pytest.approx([0.0, 0.0])
    # BLEU-1 = clipped unigram precision * brevity penalty: "a red square" vs "a red circle"
    half = score_captions(["a red square"], [["a red circle"]], java=False)
    assert half.scores["BLEU-1"] == pytest.approx(2 / 3, abs=1e-6)
    # ROUGE-L (beta 1.2): LCS 2 of 3 words each way -> F = 2/3
    assert half.scores["ROUGE-L"] == pytest.approx(2 / 3, abs=1e-6)
    assert same.skipped == {"METEOR": "needs a Java runtime", "SPICE": "needs a Java runtime"}


def test_metric_input_errors():
    with pytest.raises(InvalidInputError, match="2 captions but 1"):
        score_captions(["a", "b"], [["a"]])
    with pytest.raises(InvalidInputError, match="at least one reference"):
        score_captions(["a"], [[]])


@pytest.mark.skipif(not java_available(), reason="the PTB tokenizer and METEOR need Java")
def test_java_tokenizer_agrees_with_python_one():
    captions = [
        "A red circle, above a Blue square.",
        "two dogs' toys (red) on grass!",
        "it isn't a dog's toy; it's a 3.5 m-long \"big\" car...",
    ]
    refs = [["a red circle above a blue square"], ["two dogs' toys on the grass"], ["a big car"]]
    java = score_captions(captions, refs, metrics=("bleu", "cider", "meteor"))
    python = score_captions(captions, refs, metrics=("bleu", "cider"), java=False)
    assert java.tokenizer == "ptb" and python.tokenizer == "python"
    assert java.scores["CIDEr-D"] == pytest.approx(python.scores["CIDEr-D"])
    assert java.scores["BLEU-4"] == pytest.approx(python.scores["BLEU-4"])
    assert 0 < java.scores["METEOR"] <= 1
    assert simple_tokenize("A man's dog isn't running. (fast!)") == (
        "a man 's dog is n't running -lrb- fast -rrb-"
    )
