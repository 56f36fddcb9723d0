"""The ClipCap authors' checkpoints: random weights in their state-dict layout load
through cliplens, and cliplens's prefixes and captions equal those of modules and decoding
loops written here from their paper and repository (rmokady/CLIP_prefix_caption: train.py's
MLP, TransformerMapper and TransformerLayer; predict.py's generate2 and generate_beam)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as nnf

from cliplens.captioning import language_model as lms
from cliplens.captioning.model import CaptionOptions
from cliplens.captioning.reference import infer_config, load_clipcap_checkpoint
from cliplens.errors import InvalidInputError

D, W, GPT_LAYERS = 16, 32, 2
WORDS = ["a dog on the grass.", "two cats sleep on a red sofa.", "a man rides a horse."]


# ---------------------------------------------------------------- the authors' modules


class PaperMLP(nn.Module):
    def __init__(self, sizes):
        super().__init__()
        layers = []
        for i in range(len(sizes) - 1):
            layers.append(nn.Linear(sizes[i], sizes[i + 1]))
            if i < len(sizes) - 2:
                layers.append(nn.Tanh())
        self.model = nn.Sequential(*layers)

    def forward(self, x):
        return self.model(x)


class PaperAttention(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.heads, self.scale = heads, (dim // heads) ** -0.5
        self.to_queries = nn.Linear(dim, dim, bias=False)
        self.to_keys_values = nn.Linear(dim, dim * 2, bias=False)
        self.project = nn.Linear(dim, dim)

    def forward(self, x):
        b, n, c = x.shape
        q = self.to_queries(x).reshape(b, n, self.heads, c // self.heads)
        kv = self.to_keys_values(x).reshape(b, n, 2, self.heads, c // self.heads)
        k, v = kv[:, :, 0], kv[:, :, 1]
        att = (torch.einsum("bnhd,bmhd->bnmh", q, k) * self.scale).softmax(dim=2)
        return self.project(torch.einsum("bnmh,bmhd->bnhd", att, v).reshape(b, n, c))


class PaperMlpTransformer(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(nnf.relu(self.fc1(x)))


class PaperLayer(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = PaperAttention(dim, 8)
        self.mlp = PaperMlpTransformer(dim, int(dim * 2.0))

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class PaperTransformer(nn.Module):
    def __init__(self, dim, layers):
        super().__init__()
        self.layers = nn.ModuleList(PaperLayer(dim) for _ in range(layers))

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


class PaperTransformerMapper(nn.Module):
    def __init__(self, dim_clip, dim_embedding, prefix_length, clip_length, layers):
        super().__init__()
        self.clip_length = clip_length
        self.transformer = PaperTransformer(dim_embedding, layers)
        self.linear = nn.Linear(dim_clip, clip_length * dim_embedding)
        self.prefix_const = nn.Parameter(torch.randn(prefix_length, dim_embedding))

    def forward(self, x):
        x = self.linear(x).view(x.shape[0], self.clip_length, -1)
        const = self.prefix_const.unsqueeze(0).expand(x.shape[0], *self.prefix_const.shape)
        return self.transformer(torch.cat((x, const), dim=1))[:, self.clip_length :]


class PaperModel(nn.Module):
    """ClipCaptionModel: clip_project and gpt (a GPT2LMHeadModel)."""

    def __init__(self, mapping, vocab, prefix_length=10, clip_length=6, layers=2, dim=D):
        from transformers import GPT2Config, GPT2LMHeadModel

        super().__init__()
        self.prefix_length = prefix_length
        config = GPT2Config(
            vocab_size=vocab,
            n_positions=128,
            n_embd=W,
            n_layer=GPT_LAYERS,
            n_head=1,
            n_inner=48,
            bos_token_id=vocab - 1,
            eos_token_id=vocab - 1,
        )
        self.gpt = GPT2LMHeadModel(config)
        if mapping == "mlp":
            self.clip_project = PaperMLP((dim, W * prefix_length // 2, W * prefix_length))
        elif mapping == "linear":
            self.clip_project = nn.Linear(dim, W * prefix_length)
        else:
            self.clip_project = PaperTransformerMapper(dim, W, prefix_length, clip_length, layers)
        for name, p in self.clip_project.named_parameters():  # norms and biases not trivial
            if "norm" in name:
                nn.init.normal_(p, 1.0 if name.endswith("weight") else 0.0, 0.3)

    def prefix(self, x):
        return self.clip_project(x).reshape(x.shape[0], self.prefix_length, -1)


def paper_generate2(model, tokenizer, embed, entry_length=67, top_p=0.8, stop=None):
    stop = tokenizer.encode(".")[0] if stop is None else stop
    tokens, generated = None, embed
    with torch.no_grad():
        for _ in range(entry_length):
            logits = model.gpt(inputs_embeds=generated).logits[:, -1, :]
            sorted_logits, sorted_indices = torch.sort(logits, descending=True)
            remove = torch.cumsum(nnf.softmax(sorted_logits, dim=-1), dim=-1) > top_p
            remove[..., 1:] = remove[..., :-1].clone()
            remove[..., 0] = 0
            logits[:, sorted_indices[remove]] = -float("inf")
            token = torch.argmax(logits, -1).unsqueeze(0)
            tokens = token if tokens is None else torch.cat((tokens, token), dim=1)
            generated = torch.cat((generated, model.gpt.transformer.wte(token)), dim=1)
            if stop == token.item():
                break
    ids = tokens.squeeze(0).tolist()
    return ids, tokenizer.decode(ids)


def paper_generate_beam(model, tokenizer, embed, beam_size=5, entry_length=67, stop_token="."):
    stop = tokenizer.encode(stop_token)[0]
    tokens = scores = None
    lengths = torch.ones(beam_size)
    stopped = torch.zeros(beam_size, dtype=torch.bool)
    generated = embed
    wte = model.gpt.transformer.wte
    with torch.no_grad():
        for _ in range(entry_length):
            logits = model.gpt(inputs_embeds=generated).logits[:, -1, :].softmax(-1).log()
            if scores is None:
                scores, next_tokens = logits.topk(beam_size, -1)
                generated = generated.expand(beam_size, *generated.shape[1:])
                next_tokens, scores = next_tokens.permute(1, 0), scores.squeeze(0)
                tokens = next_tokens
            else:
                logits[stopped] = -float("inf")
                logits[stopped, 0] = 0
                total = scores[:, None] + logits
                lengths[~stopped] += 1
                average, next_tokens = (total / lengths[:, None]).view(-1).topk(beam_size, -1)
                source = next_tokens // total.shape[1]
                lengths = lengths[source]
                next_tokens = (next_tokens % total.shape[1]).unsqueeze(1)
                tokens = torch.cat((tokens[source], next_tokens), dim=1)
                generated = generated[source]
                scores = average * lengths
                stopped = stopped[source]
            embed_next = wte(next_tokens.squeeze()).view(generated.shape[0], 1, -1)
            generated = torch.cat((generated, embed_next), dim=1)
            stopped = stopped + next_tokens.eq(stop).squeeze()
            if stopped.all():
                break
    scores = scores / lengths
    texts = [tokenizer.decode(t[: int(n)]) for t, n in zip(tokens.numpy(), lengths, strict=True)]
    return [texts[i] for i in scores.argsort(descending=True)]


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    _, tok = lms.scratch_lm("scratch:gpt2", WORDS * 4, lms.ScratchLM(vocab=300))
    folder = tmp_path_factory.mktemp("tok")
    tok.save_pretrained(folder)
    return folder


def _checkpoint(folder, tokenizer_dir, mapping, seed=0, **kw):
    from transformers import AutoTokenizer

    torch.manual_seed(seed)
    vocab = len(AutoTokenizer.from_pretrained(str(tokenizer_dir))) + 3
    paper = PaperModel(mapping, vocab, **kw).eval()
    state = dict(paper.state_dict())
    for i in range(GPT_LAYERS):  # the causal-mask buffers old transformers saved
        state[f"gpt.transformer.h.{i}.attn.bias"] = torch.ones(1, 1, 128, 128).tril()
        state[f"gpt.transformer.h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    path = folder / f"{mapping}.pt"
    torch.save(state, path)
    return paper, path


def _embeddings(n=3, seed=0):
    return torch.from_numpy(np.random.default_rng(seed).normal(0, 3, (n, D)).astype(np.float32))


# ---------------------------------------------------------------- tests


@pytest.mark.parametrize("mapping", ["mlp", "linear", "transformer"])
def test_prefix_equals_the_authors_modules(tmp_path, tokenizer_dir, mapping):
    kw = {"prefix_length": 5, "clip_length": 3} if mapping == "transformer" else {}
    paper, path = _checkpoint(tmp_path, tokenizer_dir, mapping, **kw)
    cap = load_clipcap_checkpoint(path, tokenizer=str(tokenizer_dir))
    cfg = cap.cfg
    assert (cfg.mapping, cfg.embed_dim, cfg.lm_width, cfg.lm_layers) == (mapping, D, W, 2)
    assert cfg.prefix_length == kw.get("prefix_length", 10)
    assert cfg.normalize_prefix is (mapping == "transformer")  # as the authors ran them
    x = _embeddings()
    with torch.no_grad():
        raw = paper.prefix(x)
        unit = paper.prefix(x / x.norm(dim=-1, keepdim=True))
    ours = load_clipcap_checkpoint(path, tokenizer=str(tokenizer_dir), normalize_prefix=False)
    with torch.no_grad():
        assert torch.allclose(ours.prefix(x), raw, atol=1e-6, rtol=0)
        normalized = load_clipcap_checkpoint(
            path, tokenizer=str(tokenizer_dir), normalize_prefix=True
        )
        assert torch.allclose(normalized.prefix(x), unit, atol=1e-6, rtol=0)
        assert not torch.allclose(raw, unit, atol=1e-3)  # the mode matters


@pytest.mark.parametrize("mapping", ["mlp", "transformer"])
def test_greedy_caption_equals_generate2(tmp_path, tokenizer_dir, mapping):
    paper, path = _checkpoint(tmp_path, tokenizer_dir, mapping, seed=1)
    cap = load_clipcap_checkpoint(path, tokenizer=str(tokenizer_dir), normalize_prefix=False)
    x = _embeddings(2, seed=2)
    with torch.no_grad():
        prefixes = paper.prefix(x)
    n = 67 if mapping == "mlp" else 24  # their bound once; a shorter one is kept too
    expected = [paper_generate2(paper, cap.tokenizer, p[None], entry_length=n) for p in prefixes]
    got = cap.greedy_ids(cap.prefix(x), max_tokens=n)
    assert got == [ids for ids, _ in expected]
    assert all(len(ids) == n for ids in got)  # random weights: no "." before the bound
    options = CaptionOptions(max_tokens=None if mapping == "mlp" else n)
    assert cap.captions(x.numpy(), options) == [text for _, text in expected]
    # the stop rule: generation ends after the stop token, which is kept
    cap.stop_id = expected[0][0][2]
    stopped = paper_generate2(paper, cap.tokenizer, prefixes[:1], stop=cap.stop_id)
    assert cap.greedy_ids(cap.prefix(x[:1])) == [stopped[0]]
    assert len(stopped[0]) <= 3 and stopped[0][-1] == cap.stop_id


def test_beam_search_equals_generate_beam(tmp_path, tokenizer_dir):
    paper, path = _checkpoint(tmp_path, tokenizer_dir, "mlp", seed=3)
    cap = load_clipcap_checkpoint(path, tokenizer=str(tokenizer_dir))
    x = _embeddings(2, seed=4)
    with torch.no_grad():
        expected = [
            paper_generate_beam(paper, cap.tokenizer, paper.prefix(x[i : i + 1]), entry_length=30)[
                0
            ]
            for i in range(2)
        ]
    assert cap.captions(x.numpy(), CaptionOptions(beams=5, max_tokens=30)) == expected
    with pytest.raises(InvalidInputError, match="`top_p`"):
        cap.captions(x.numpy(), CaptionOptions(top_p=0.9))


def test_bad_checkpoints_say_so(tmp_path, tokenizer_dir, tiny):
    text = tmp_path / "notes.pt"
    text.write_text("not a checkpoint")
    with pytest.raises(InvalidInputError, match="cannot be read as a PyTorch state dict"):
        load_clipcap_checkpoint(text, tokenizer=str(tokenizer_dir))
    other = tmp_path / "other.pt"
    torch.save({"fc.weight": torch.zeros(3, 3)}, other)
    with pytest.raises(InvalidInputError, match="not a ClipCap checkpoint"):
        load_clipcap_checkpoint(other, tokenizer=str(tokenizer_dir))
    _, path = _checkpoint(tmp_path, tokenizer_dir, "mlp")
    state = torch.load(path)
    state["clip_project.model.2.weight"] = torch.zeros(W * 10 + 1, W * 5)
    with pytest.raises(InvalidInputError, match="whole number"):
        infer_config(state, "x.pt")
    cap = load_clipcap_checkpoint(path, tokenizer=str(tokenizer_dir))
    assert cap.cfg.encoder is None  # 16 wide: no CLIP of theirs
    with pytest.raises(InvalidInputError, match="takes 16-wide CLIP embeddings"):
        cap.check_encoder(tiny)  # 32 wide


def test_raw_embeddings_are_the_image_towers(tmp_path, tokenizer_dir, tiny, photos):
    _, path = _checkpoint(tmp_path, tokenizer_dir, "mlp", dim=32)
    cap = load_clipcap_checkpoint(path, tokenizer=str(tokenizer_dir))
    files = sorted(photos.glob("*.jpg"))[:3]
    raw, kept, failures = cap.embed_images(tiny, [*files, tmp_path / "missing.jpg"])
    assert kept == [0, 1, 2] and len(failures) == 1
    unit = raw / np.linalg.norm(raw, axis=1, keepdims=True)
    np.testing.assert_allclose(unit, tiny.encode_images(files), atol=1e-5)
    assert not np.allclose(np.linalg.norm(raw, axis=1), 1.0, atol=1e-2)  # not normalised


def test_a_mapped_read_gives_the_tensors_of_zip_and_legacy_files(tmp_path, tokenizer_dir):
    """What a server's start reads (`mmap`): the same tensors as a full read, for the zip
    format and for a legacy file (which cannot be mapped and is read instead); junk is
    refused with the plain reader's reason, in one line."""
    from cliplens.captioning.reference import read_state

    _, path = _checkpoint(tmp_path, tokenizer_dir, "mlp")
    legacy = tmp_path / "legacy.pt"
    torch.save(torch.load(path), legacy, _use_new_zipfile_serialization=False)
    want = read_state(path)
    for file in (path, legacy):
        got = read_state(file, mmap=True)
        assert set(got) == set(want)
        for name, tensor in want.items():
            assert torch.equal(got[name], tensor), (file.name, name)
        assert infer_config(got, str(file)) == infer_config(want, str(file))
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"junk" * 10)
    with pytest.raises(InvalidInputError, match="no PyTorch file's header") as e:
        read_state(junk, mmap=True)
    assert "\n" not in str(e.value)
