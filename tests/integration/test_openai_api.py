"""OpenAI's embeddings API under /openai/v1: the real `openai` client against a live
server, and every error under /openai/ in OpenAI's shape (while /v1 keeps its own)."""

from __future__ import annotations

import base64
from dataclasses import replace
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest
from fastapi.testclient import TestClient

from cliplens.server import ServerSettings, create_app
from conftest import TINY_CFG
from tests_helpers import live_server

TOKEN = "openai-s3cret"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
DIM = TINY_CFG["embed_dim"]
CONTEXT = TINY_CFG["text_cfg"]["context_length"]
TEXTS = ["a photo of a cat", "two dogs, three cats & 4 birds", "a cup of coffee " * 12]


def _data_uri(path: Path, media: str = "image/jpeg") -> str:
    return f"data:{media};base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def _tokens(texts: list[str]) -> int:
    """open_clip's own count for the tiny model's texts: start and end tokens, cut at
    the context length."""
    from open_clip.tokenizer import SimpleTokenizer

    tok = SimpleTokenizer()
    return sum(min(len(tok.encode(t)) + 2, CONTEXT) for t in texts)


@pytest.fixture(scope="module")
def settings(tiny_model_dir, tmp_path_factory) -> ServerSettings:
    return ServerSettings(
        model=f"local:{tiny_model_dir}",
        db=tmp_path_factory.mktemp("openai") / "none.db",  # no catalog: none is needed
        token=TOKEN,
        precision="fp32",
        device="cpu",
    )


@pytest.fixture(scope="module")
def base_url(settings):
    with live_server(create_app(settings), settings) as port:
        yield f"http://127.0.0.1:{port}"


@pytest.fixture(scope="module")
def client(base_url):
    http = openai.DefaultHttpxClient(trust_env=False)  # 127.0.0.1, never through a proxy
    c = openai.OpenAI(
        base_url=base_url + "/openai/v1", api_key=TOKEN, max_retries=0, http_client=http
    )
    yield c
    c.close()


# ------------------------------------------------------------ the openai client


def test_texts_embed_as_the_library_and_v1_embed_do(client, base_url, settings, tiny):
    want = tiny.encode_texts(TEXTS)
    one = client.embeddings.create(model=settings.model, input=TEXTS[0])  # base64, decoded
    assert [d.index for d in one.data] == [0] and one.model == settings.model
    np.testing.assert_allclose(one.data[0].embedding, want[0], atol=1e-5)
    floats = client.embeddings.create(model=settings.model, input=TEXTS, encoding_format="float")
    got = np.array([d.embedding for d in floats.data])
    assert got.shape == (len(TEXTS), DIM) and [d.index for d in floats.data] == [0, 1, 2]
    np.testing.assert_allclose(got, want, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1, atol=1e-5)
    raw = client.embeddings.create(model=settings.model, input=TEXTS, encoding_format="base64")
    assert all(isinstance(d.embedding, str) for d in raw.data)
    decoded = [np.frombuffer(base64.b64decode(d.embedding), dtype="<f4") for d in raw.data]
    np.testing.assert_array_equal(np.array(decoded, dtype=np.float32), got.astype(np.float32))
    # the same vectors as cliplens's own route
    with httpx.Client(base_url=base_url, headers=AUTH, trust_env=False) as http:
        v1 = http.post("/v1/embed", data={"texts": TEXTS}).json()["texts"]
    np.testing.assert_allclose(got, v1, atol=1e-6)


def test_usage_counts_the_tokenizer_s_tokens(client, settings):
    r = client.embeddings.create(model=settings.model, input=TEXTS)
    assert r.usage.prompt_tokens == r.usage.total_tokens == _tokens(TEXTS)
    assert _tokens(TEXTS[2:]) == CONTEXT  # the long text is cut at the context
    single = client.embeddings.create(model=settings.model, input="x")
    assert single.usage.prompt_tokens == 3  # start, "x", end: no padding


def test_images_as_data_uris(client, base_url, settings, tiny, photos):
    paths = [photos / "cat.jpg", photos / "coffee.jpg"]
    r = client.embeddings.create(
        model=settings.model,
        input=[_data_uri(p) for p in paths],
        encoding_format="float",
        extra_body={"modality": "image"},
    )
    got = np.array([d.embedding for d in r.data])
    np.testing.assert_allclose(got, tiny.encode_images(paths), atol=1e-5)
    assert r.usage.prompt_tokens == r.usage.total_tokens == 0
    # the media type is the client's word: the content decides (a JPEG sent as PNG)
    png = client.embeddings.create(
        model=settings.model,
        input=_data_uri(paths[0], "image/png"),
        extra_body={"modality": "image"},
    )
    np.testing.assert_allclose(png.data[0].embedding, got[0], atol=1e-6)
    with httpx.Client(base_url=base_url, headers=AUTH, trust_env=False) as http:
        files = [("images", (p.name, p.read_bytes(), "image/jpeg")) for p in paths]
        v1 = http.post("/v1/embed", files=files).json()["images"]
    np.testing.assert_allclose(got, v1, atol=1e-6)


def test_models_list_and_retrieve(client, settings, tiny):
    listed = client.models.list()
    assert [m.id for m in listed] == [settings.model]
    assert all(m.owned_by == "cliplens" and m.created > 1_600_000_000 for m in listed)
    assert client.models.retrieve(settings.model).id == settings.model  # '/' and ':' in it
    by_id = client.embeddings.create(model=tiny.info.model_id, input="a cat", user="u-1")
    assert by_id.model == tiny.info.model_id and len(by_id.data[0].embedding) == DIM
    with pytest.raises(openai.NotFoundError) as e:
        client.models.retrieve("gpt-4o")
    assert e.value.code == "model_not_found"


def test_the_client_raises_its_typed_errors(client, base_url, settings):
    wrong = openai.OpenAI(
        base_url=base_url + "/openai/v1",
        api_key="not-the-token",
        max_retries=0,
        http_client=openai.DefaultHttpxClient(trust_env=False),
    )
    with wrong, pytest.raises(openai.AuthenticationError) as e:
        wrong.embeddings.create(model=settings.model, input="a cat")
    assert e.value.code == "invalid_api_key" and "Bearer" in e.value.body["message"]
    with pytest.raises(openai.NotFoundError) as e:
        client.embeddings.create(model="text-embedding-3-small", input="a cat")
    assert e.value.code == "model_not_found" and e.value.param == "model"
    message = e.value.body["message"]
    assert settings.model in message and "GET /openai/v1/models" in message
    with pytest.raises(openai.BadRequestError) as e:
        client.embeddings.create(model=settings.model, input="a cat", dimensions=DIM // 2)
    assert e.value.param == "dimensions" and f"have {DIM} dimensions" in e.value.body["message"]
    ok = client.embeddings.create(model=settings.model, input="a cat", dimensions=DIM)
    assert len(ok.data[0].embedding) == DIM


# ------------------------------------------------------------ errors in OpenAI's shape


@pytest.fixture(scope="module")
def app_client(settings):
    with TestClient(create_app(settings), headers=AUTH) as c:
        yield c


def _oai(r, status: int, code: str | None = None, param: str | None = None) -> str:
    """An error in OpenAI's shape with its status; returns the one-line message."""
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json")
    if status != 500:  # a 500 is answered outside the middleware that adds it (app.py)
        assert r.headers["x-content-type-options"] == "nosniff"
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    error = body["error"]
    assert error["type"] == ("invalid_request_error" if status < 500 else "server_error")
    assert isinstance(error["message"], str) and error["message"] and "\n" not in error["message"]
    assert "`" not in error["message"]  # parameters named as the client knows them
    if code is not None:
        assert error["code"] == code, error
    assert error["param"] == param, error
    return error["message"]


def _embed(c: TestClient, model: str, **body):
    return c.post("/openai/v1/embeddings", json={"model": model, **body})


@pytest.mark.parametrize(
    ("body", "param", "words"),
    [
        ({"input": "a"}, "model", "model"),
        ({"model": 5, "input": "a"}, "model", "string"),
        ({"input": 5}, "input", "a number"),
        ({"input": None}, "input", "null"),
        ({"input": {"text": "a"}}, "input", "an object"),
        ({"input": []}, "input", "empty list"),
        ({"input": ["a", 3]}, "input", "input[1]"),
        ({"input": ["a", ""]}, "input", "input[1] is empty"),
        ({"input": [1, 2, 3]}, "input", "send the texts as strings"),
        ({"input": [[1, 2], [3]]}, "input", "token ids"),
        ({"input": ["a"] * 257}, "input", "at most 256"),
        ({"input": "a", "encoding_format": "int8"}, "encoding_format", "'float' or 'base64'"),
        ({"input": "a", "dimensions": "many"}, "dimensions", "integer"),
        ({"input": "a", "modality": "audio"}, "modality", "'text' or 'image'"),
    ],
)
def test_bad_bodies_are_400s_that_name_the_field(app_client, settings, body, param, words):
    body = body if param == "model" else {"model": settings.model, **body}
    r = app_client.post("/openai/v1/embeddings", json=body)
    assert words in _oai(r, 400, param=param)


@pytest.mark.parametrize(
    ("content", "words"),
    [
        (b'{"model": "x", "input": [', "not valid JSON"),
        (b"", "no body"),
        (b'{"model": "x", "input": "\xff\xfe"}', "UTF-8"),
    ],
)
def test_unparsable_bodies_are_400s(app_client, content, words):
    headers = {"content-type": "application/json"}
    r = app_client.post("/openai/v1/embeddings", content=content, headers=headers)
    message = _oai(r, 400)
    assert words in message and "/docs" not in message


@pytest.mark.parametrize(
    ("item", "status", "code", "words"),
    [
        ("https://example.com/cat.jpg", 400, "invalid_input", "data: URI"),
        ("cat.jpg", 400, "invalid_input", "not a data: URI"),
        ("data:text/plain;base64,aGVsbG8=", 400, "invalid_input", "not an image"),
        ("data:image/png,rawbytes", 400, "invalid_input", ";base64"),
        ("data:image/png;base64,***", 400, "invalid_input", "not base64"),
        ("data:image/png;base64,", 400, "empty_image", "input[0]"),
        (
            "data:image/png;base64," + base64.b64encode(b"hello, I am text").decode(),
            415,
            "not_an_image",
            "input[0]",
        ),
    ],
)
def test_bad_images_are_refused_in_openai_s_shape(app_client, settings, item, status, code, words):
    r = _embed(app_client, settings.model, input=[item], modality="image")
    assert words in _oai(r, status, code, param="input")


def test_image_limits(settings, photos):
    cat = _data_uri(photos / "cat.jpg")
    with TestClient(create_app(replace(settings, max_files=2)), headers=AUTH) as c:
        r = _embed(c, settings.model, input=[cat] * 3, modality="image")
        message = _oai(r, 400, "invalid_input", param="input")
        assert "at most 2" in message and "--max-files" in message
    with TestClient(create_app(replace(settings, max_megapixels=0.01)), headers=AUTH) as c:
        r = _embed(c, settings.model, input=[cat], modality="image")
        assert "MP" in _oai(r, 413, "image_too_large", param="input")


def test_bodies_over_the_limit_are_413s(settings):
    big = "x" * 20_000
    with TestClient(create_app(replace(settings, max_upload_mb=0.01)), headers=AUTH) as c:
        by_length = _embed(c, settings.model, input=big)  # refused by its Content-Length
        assert "MB" in _oai(by_length, 413, "too_large")

        def chunks():
            yield b'{"model": "m", "input": "'
            yield big.encode()
            yield b'"}'

        headers = {"content-type": "application/json"}
        streamed = c.post("/openai/v1/embeddings", content=chunks(), headers=headers)
        assert "content-length" not in streamed.request.headers  # refused as it streams
        assert "MB" in _oai(streamed, 413, "too_large")


def test_token_model_and_path_errors(settings, app_client):
    with TestClient(create_app(settings)) as bare:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}):
            r = bare.post(
                "/openai/v1/embeddings", json={"model": "m", "input": "a"}, headers=headers
            )
            assert "Bearer" in _oai(r, 401, "invalid_api_key")
            assert r.headers["www-authenticate"] == "Bearer"
            _oai(bare.get("/openai/v1/models", headers=headers), 401, "invalid_api_key")
    message = _oai(_embed(app_client, "gpt-x", input="a"), 404, "model_not_found", "model")
    assert '"gpt-x"' in message and settings.model in message
    _oai(app_client.get("/openai/v1/models/local:/nope"), 404, "model_not_found", "model")
    assert "/openai/v1/embeddings" in _oai(app_client.get("/openai/v1/nope"), 404, "not_found")
    wrong_method = app_client.get("/openai/v1/embeddings")
    assert wrong_method.status_code in (404, 405)  # the page's folder answers a GET
    _oai(wrong_method, wrong_method.status_code)


def test_timeouts_and_failures_are_server_errors(settings, monkeypatch):
    with TestClient(create_app(replace(settings, timeout_s=1e-4)), headers=AUTH) as c:
        assert "busy" in _oai(_embed(c, settings.model, input=["a cat"] * 64), 503, "timeout")
    app = create_app(settings)

    def broken(*_a, **_k):
        raise RuntimeError("a bug")

    monkeypatch.setattr(app.state.service.ref, "encode_texts", broken)
    with TestClient(app, headers=AUTH, raise_server_exceptions=False) as c:
        r = _embed(c, settings.model, input="a")
        message = _oai(r, 500, "internal")
        assert "RuntimeError" in message and "a bug" not in message
        assert r.headers.get_list("x-content-type-options") == ["nosniff"]
        ours = c.post("/v1/embed", data={"texts": ["a cat"]})
        assert ours.status_code == 500 and ours.json()["error"] == "internal", ours.text
        assert ours.headers.get_list("x-content-type-options") == ["nosniff"]


def test_v1_errors_keep_their_own_shape(settings, app_client):
    def old(r, status: int, kind: str) -> None:
        assert r.status_code == status, r.text
        body = r.json()
        assert set(body) == {"error", "detail"} and body["error"] == kind, body

    old(app_client.get("/v1/nope"), 404, "not_found")
    old(app_client.post("/v1/search", json={"terms": []}), 422, "invalid_request")
    old(app_client.post("/v1/embed", data={}), 400, "invalid_input")
    with TestClient(create_app(settings)) as bare:
        old(bare.post("/v1/embed", data={"texts": ["a"]}), 401, "unauthorized")
    with TestClient(create_app(replace(settings, max_upload_mb=0.01)), headers=AUTH) as c:
        old(c.post("/v1/embed", data={"texts": ["x" * 20_000]}), 413, "too_large")
    # the schema says so: OpenAI's shape under /openai/, cliplens's elsewhere
    spec = app_client.app.openapi()
    embeddings = spec["paths"]["/openai/v1/embeddings"]["post"]["responses"]
    assert embeddings["401"]["content"]["application/json"]["schema"]["$ref"].endswith(
        "/OpenAIErrorOut"
    )
    search = spec["paths"]["/v1/search"]["get"]["responses"]
    assert search["401"]["content"]["application/json"]["schema"]["$ref"].endswith("/ErrorOut")


def test_the_backends_count_the_tokens_their_tower_sees(tiny, offline):
    """What usage counts where no text tower is exported (a bf16 network, say): the
    backend's own tokenizer, start and end tokens included, padding not."""
    texts = ["x", "a photo of a cat", " ".join(["word"] * 300)]
    padded = tiny.tokenizer(texts)  # open_clip's SimpleTokenizer pads with 0
    assert tiny.token_counts(texts) == (padded != 0).sum(1).tolist()
    assert tiny.token_counts(texts)[-1] == padded.shape[1]  # cut at the context
    mask = offline.text.tokenizer(texts, padding=True, truncation=True, max_length=256)
    assert offline.token_counts(texts) == [sum(row) for row in mask["attention_mask"]]
