"""The HTTP service in-process: every route, its errors, the token, limits and concurrency
(serving a build-index folder: test_server_index.py)."""

from __future__ import annotations

import asyncio
import io
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from cliplens.catalog.db import Catalog
from cliplens.models.ref import ModelRef
from cliplens.server import ServerSettings, create_app
from server_fixtures import app_with as _app
from server_fixtures import catalog_db, client, settings  # noqa: F401 (fixtures)
from server_fixtures import error_of as _error
from server_fixtures import upload as _upload


def test_health_models_and_page(client, tiny_model_dir):
    health = client.get("/v1/health").json()
    assert health["status"] == "ok" and health["catalog"] is True and health["auth"] is False
    models = client.get("/v1/models").json()
    assert models["model"] == f"local:{tiny_model_dir}"
    assert [m["embeddings"] for m in models["catalog"]] == [7]
    page = client.get("/")
    assert page.status_code == 200 and '<input id="q"' in page.text
    assert "http://" not in page.text and "https://" not in page.text  # no CDN
    assert client.get("/app.js").status_code == 200
    assert "/v1/search" in client.get("/openapi.json").json()["paths"]


def test_embed_matches_the_library(client, tiny, photos):
    cat = photos / "cat.jpg"
    r = client.post("/v1/embed", data={"texts": ["a cat", "a dog"]}, files=[_upload(cat)])
    assert r.status_code == 200, r.text
    body = r.json()
    np.testing.assert_allclose(body["texts"], tiny.encode_texts(["a cat", "a dog"]), atol=1e-5)
    np.testing.assert_allclose(body["images"], tiny.encode_images([cat]), atol=1e-5)
    assert body["image_names"] == ["cat.jpg"] and body["dim"] == len(body["texts"][0])
    _error(client.post("/v1/embed", data={}), 400, "invalid_input")


def test_classify_and_its_errors(client, photos, tmp_path):
    files = [_upload(photos / "cat.jpg"), _upload(photos / "rocket.jpg")]
    r = client.post("/v1/classify", data={"labels": "cat, rocket, car", "top_k": "3"}, files=files)
    assert r.status_code == 200, r.text
    preds = r.json()["predictions"]
    assert [p["name"] for p in preds] == ["cat.jpg", "rocket.jpg"]
    for p in preds:
        scores = [x["score"] for x in p["labels"]]
        assert sorted(scores, reverse=True) == scores and sum(scores) == pytest.approx(1, abs=1e-4)
    # missing field, empty labels, not an image, an empty file, a path as a name
    _error(client.post("/v1/classify", files=files), 422, "invalid_request")
    _error(client.post("/v1/classify", data={"labels": " , "}, files=files), 400, "invalid_input")
    text = ("images", ("notes.jpg", b"hello, I am text", "image/jpeg"))
    detail = _error(
        client.post("/v1/classify", data={"labels": "a,b"}, files=[text]), 415, "not_an_image"
    )
    assert "notes.jpg" in detail and "text file" in detail
    empty = ("images", ("../../etc/passwd", b"", "image/png"))
    detail = _error(
        client.post("/v1/classify", data={"labels": "a,b"}, files=[empty]), 400, "empty_image"
    )
    assert "passwd" in detail and "../" not in detail


def test_search_get_post_and_image(client, tiny, photos):
    r = client.get("/v1/search", params={"q": "a cat", "n": 3})
    assert r.status_code == 200, r.text
    hits = r.json()["results"]
    assert len(hits) == 3 and hits[0]["score"] >= hits[1]["score"] >= hits[2]["score"]
    for h in hits:
        assert h["image_url"] == f"/v1/images/{h['id']}" and Path(h["path"]).name == h["name"]
    # the same query as weighted JSON terms, and a catalog photo as a term
    body = {"terms": [{"text": "a cat"}], "n": 3}
    assert client.post("/v1/search", json=body).json()["results"] == hits
    every = client.get("/v1/search", params={"q": "x", "n": 7}).json()["results"]
    cat_id = next(h["id"] for h in every if h["name"] == "cat.jpg")
    by_id = client.post("/v1/search", json={"terms": [{"id": cat_id}], "n": 1}).json()
    assert by_id["results"][0]["id"] == cat_id and by_id["results"][0]["score"] > 0.999
    # an uploaded photo finds itself first
    r = client.post(
        "/v1/search/image", files=[_upload(photos / "rocket.jpg", "image")], data={"n": "2"}
    )
    assert r.status_code == 200, r.text
    assert r.json()["results"][0]["name"] == "rocket.jpg"
    assert r.json()["results"][0]["score"] == pytest.approx(1, abs=1e-3)


def test_weighted_queries_and_bad_json(client, tiny):
    q = "2:sunset - people"
    got = client.get("/v1/search", params={"q": q, "n": 7}).json()["results"]
    a, b = tiny.encode_texts(["sunset", "people"])
    v = (2 * a - b) / np.linalg.norm(2 * a - b)
    with Catalog(client.app.state.service.db, readonly=True) as cat:
        ids, _, matrix = cat.vectors(tiny.info.model_id)
    order = ids[np.argsort(-(matrix.astype(np.float32) @ v), kind="stable")]
    assert [h["id"] for h in got] == order.tolist()
    bad = {"content": b'{"terms": [', "headers": {"content-type": "application/json"}}
    r = client.post("/v1/search", **bad)
    _error(r, 422, "invalid_request")
    _error(client.post("/v1/search", json={"terms": []}), 422, "invalid_request")
    _error(
        client.post("/v1/search", json={"terms": [{"text": "a", "id": 1}]}), 422, "invalid_request"
    )
    _error(client.get("/v1/search", params={"q": "cat - cat"}), 400, "invalid_input")
    _error(client.get("/v1/search"), 422, "invalid_request")
    _error(client.get("/v1/search", params={"q": "cat", "n": 0}), 422, "invalid_request")


def test_files_only_by_catalog_id(client, photos):
    hits = client.get("/v1/search", params={"q": "coffee", "n": 7}).json()["results"]
    cat = next(h for h in hits if h["name"] == "coffee.jpg")
    r = client.get(cat["image_url"])
    assert r.status_code == 200 and r.content == (photos / "coffee.jpg").read_bytes()
    thumb = client.get(cat["thumb_url"], params={"size": 64})
    assert thumb.status_code == 200 and thumb.headers["content-type"] == "image/jpeg"
    assert max(Image.open(io.BytesIO(thumb.content)).size) == 64
    _error(client.get("/v1/images/999999"), 404, "unknown_id")
    _error(client.get("/v1/thumbs/999999"), 404, "unknown_id")
    _error(client.get("/v1/similar/999999"), 404, "unknown_id")
    # a path in the URL is no route at all (404); anything else is not an id (422)
    paths = ["../../etc/passwd", "..%2F..%2Fetc%2Fpasswd", "%2Fetc%2Fpasswd", "1%2F..%2F"]
    tricks = {t: (404, "not_found") for t in [*paths, "1%2F..%2F..%2Fetc%2Fpasswd"]}
    tricks |= {t: (422, "invalid_request") for t in ["-1", "1.5", "0x1", "%00"]}
    for trick, (status, kind) in tricks.items():
        for route in ("images", "thumbs", "similar"):
            r = client.get(f"/v1/{route}/{trick}")
            _error(r, status, kind)
            assert b"root:" not in r.content
    # a query that names a file is text: nothing is opened
    r = client.get("/v1/search", params={"q": str(photos / "cat.jpg"), "n": 1})
    assert r.status_code == 200
    assert r.json()["results"][0]["score"] < 0.999  # not the photo's own embedding


def test_similar(client):
    hits = client.get("/v1/search", params={"q": "rocket", "n": 7}).json()["results"]
    first = hits[0]
    r = client.get(f"/v1/similar/{first['id']}", params={"n": 3})
    assert r.status_code == 200
    got = r.json()["results"]
    assert len(got) == 3 and first["id"] not in [h["id"] for h in got]


def test_similar_route_is_the_library_call(client, settings):
    """/v1/similar/{id} answers what `cliplens.similar` answers for that photo id."""
    from cliplens.tasks.search import similar

    first = client.get("/v1/search", params={"q": "rocket", "n": 1}).json()["results"][0]
    got = client.get(f"/v1/similar/{first['id']}", params={"n": 3}).json()["results"]
    with Catalog(settings.db, readonly=True) as cat:
        hits = similar(cat, ModelRef(settings.model, precision="fp32"), first["id"], 3)
    assert [h["id"] for h in got] == [h.id for h in hits]
    assert [h["score"] for h in got] == pytest.approx([h.score for h in hits], abs=1e-5)


def test_create_app_reads_its_files_before_any_request(settings, tmp_path):
    """A bad policy, captioner or quality probe stops `create_app` itself, in one line."""
    from cliplens.device import Precision
    from cliplens.errors import ClipLensError

    assert settings.precision is Precision.FP32  # a str is parsed
    import torch

    (tmp_path / "junk.npz").write_bytes(b"junk")
    (tmp_path / "junk.pt").write_bytes(b"junk")
    torch.save({"fc.weight": torch.zeros(2, 2)}, tmp_path / "other.pt")  # not ClipCap's
    for change, words in (
        ({"policy": str(tmp_path / "none.yaml")}, "none.yaml"),
        ({"captioner": tmp_path}, str(tmp_path)),
        ({"captioner": tmp_path / "junk.pt"}, "cannot be read as a PyTorch state dict"),
        ({"captioner": tmp_path / "other.pt"}, "is not a ClipCap checkpoint"),
        ({"quality_probe": tmp_path / "junk.npz"}, "junk.npz"),
    ):
        with pytest.raises(ClipLensError) as caught:
            _app(settings, **change)
        assert "\n" not in str(caught.value) and words in str(caught.value), change


def test_score_moderate_quality_and_caption_routes(client, tiny, photos):
    from cliplens.tasks.score import clip_score

    cat, coffee = photos / "cat.jpg", photos / "coffee.jpg"
    r = client.post(
        "/v1/score",
        data={"prompt": "a cat", "references": ["a cat", "a kitten"]},
        files=[_upload(cat), _upload(coffee)],
    )
    assert r.status_code == 200, r.text
    body = r.json()
    # decoded whole (no reduced-scale JPEG decode), as the reference code reads images
    img = tiny.encode_images([Image.open(f).convert("RGB") for f in (cat, coffee)])
    expected = clip_score(img, tiny.encode_texts(["A photo depicts a cat"])[0])
    assert [s["clip_score"] for s in body["scores"]] == pytest.approx(expected.tolist(), abs=1e-4)
    assert all(s["ref_clip_score"] is not None for s in body["scores"])
    assert body["prefix"] == "A photo depicts "
    r = client.post(
        "/v1/score", data={"prompt": "a cat", "prefix": " "}, files=[_upload(cat), _upload(coffee)]
    )
    raw = clip_score(img, tiny.encode_texts(["a cat"])[0])
    assert [s["clip_score"] for s in r.json()["scores"]] == pytest.approx(raw.tolist(), abs=1e-4)
    assert raw.tolist() != pytest.approx(expected.tolist(), abs=1e-4)
    _error(
        client.post("/v1/score", data={"prompt": "  "}, files=[_upload(cat)]), 400, "invalid_input"
    )
    # moderation and quality: the library's own answers for the same files
    from cliplens.tasks.moderate import moderate
    from cliplens.tasks.quality import screen

    with pytest.warns(UserWarning, match="calibrated for"):  # the default policy's model
        r = client.post("/v1/moderate", files=[_upload(cat), _upload(coffee)])
        want = moderate([cat, coffee], tiny).verdicts
    assert r.status_code == 200, r.text
    got = r.json()["verdicts"]
    assert [v["name"] for v in got] == ["cat.jpg", "coffee.jpg"]
    for v, w in zip(got, want, strict=True):
        assert (v["flagged"], v["category"], v["concept"]) == (w.flagged, w.category, w.concept)
        assert v["score"] == pytest.approx(w.score, abs=1e-3)
        assert v["threshold"] == pytest.approx(w.threshold, abs=1e-6)
    r = client.post("/v1/quality", files=[_upload(coffee), _upload(cat)])
    assert r.status_code == 200, r.text
    got = r.json()["scores"]
    want = [s.to_dict() for s in screen([coffee, cat], tiny).scores]
    assert [g["name"] for g in got] == ["coffee.jpg", "cat.jpg"]
    for g, w in zip(got, want, strict=True):
        assert g["distortion"] == w["distortion"] and len(g["attributes"]) >= 6
        for name, value in g["attributes"].items():
            assert value == pytest.approx(w[name], abs=1e-3), name
    assert (r.json()["iqa"], r.json()["prompts"]) == ("crop", "attributes")
    # pyiqa's prompt set, as `quality check --prompts clipiqa` scores it
    r = client.post("/v1/quality", data={"prompts": "clipiqa"}, files=[_upload(cat)])
    assert r.status_code == 200 and r.json()["prompts"] == "clipiqa", r.text
    want = screen([cat], tiny, prompts="clipiqa").scores[0].to_dict()
    assert set(r.json()["scores"][0]["attributes"]) == {"quality"}
    assert r.json()["scores"][0]["attributes"]["quality"] == pytest.approx(
        want["quality"], abs=1e-3
    )
    faithful = client.post("/v1/quality", data={"iqa": "faithful"}, files=[_upload(cat)])
    assert "faithful" in _error(faithful, 400, "invalid_input")
    assert (
        client.post("/v1/quality", data={"prompts": "x"}, files=[_upload(cat)]).status_code == 422
    )
    _error(client.post("/v1/caption", files=[_upload(cat)]), 404, "no_captioner")


def test_token(settings, photos):
    with _app(settings, token="s3cret") as c:
        assert c.get("/v1/health").status_code == 200
        assert c.get("/v1/health").json()["auth"] is True
        r = c.get("/v1/search", params={"q": "cat"})
        _error(r, 401, "unauthorized")
        assert r.headers["www-authenticate"] == "Bearer"
        wrong = {"Authorization": "Bearer no"}
        _error(c.get("/v1/search", params={"q": "cat"}, headers=wrong), 401, "unauthorized")
        _error(c.get("/v1/images/1"), 401, "unauthorized")
        _error(c.post("/v1/embed", data={"texts": ["a"]}), 401, "unauthorized")
        ok = c.get("/v1/search", params={"q": "cat"}, headers={"Authorization": "Bearer s3cret"})
        assert ok.status_code == 200
        assert c.get("/").status_code == 200  # the page itself holds no data


def test_upload_and_pixel_limits(settings, photos):
    with _app(settings, max_upload_mb=0.01) as c:  # about 10 kB
        big = ("images", ("big.png", b"\x89PNG" + b"0" * 20_000, "image/png"))
        _error(c.post("/v1/embed", files=[big]), 413, "too_large")
    with _app(settings, max_megapixels=0.01) as c:
        detail = _error(
            c.post("/v1/embed", files=[_upload(photos / "cat.jpg")]), 413, "image_too_large"
        )
        assert "cat.jpg" in detail
    with _app(settings, max_files=1) as c:
        files = [_upload(photos / "cat.jpg"), _upload(photos / "coffee.jpg")]
        _error(c.post("/v1/embed", files=files), 400, "invalid_input")


def test_timeout_gives_503(settings):
    with _app(settings, timeout_s=1e-4) as c:
        _error(c.post("/v1/embed", data={"texts": ["a cat"] * 64}), 503, "timeout")
        _error(c.get("/v1/search", params={"q": "a cat"}), 503, "timeout")  # batched route


def test_concurrent_requests_are_safe(client, tiny):
    """Model calls are serialised: 24 concurrent mixed requests all answer, correctly."""
    import httpx

    expected = tiny.encode_texts(["a cat"])[0]

    async def go():
        transport = httpx.ASGITransport(app=client.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as ac:
            jobs = []
            for i in range(12):
                jobs.append(ac.get("/v1/search", params={"q": f"photo {i}", "n": 2}))
                jobs.append(ac.post("/v1/embed", data={"texts": ["a cat"]}))
            return await asyncio.gather(*jobs)

    responses = asyncio.run(go())
    assert [r.status_code for r in responses] == [200] * 24
    for r in responses[1::2]:
        np.testing.assert_allclose(r.json()["texts"][0], expected, atol=1e-5)


def test_batched_searches_match_single_ones_and_keep_their_own_errors(client, monkeypatch):
    """Concurrent searches are answered in batches: each gets exactly what it would get
    alone, and a bad query fails only itself."""
    import httpx

    queries = [f"photo number {i}" for i in range(10)]
    alone = [client.get("/v1/search", params={"q": q, "n": 3}).json() for q in queries]
    batcher = client.app.state.service.batcher
    sizes: list[int] = []
    answer = batcher._answer

    def counted(batch):
        sizes.append(len(batch))
        return answer(batch)

    monkeypatch.setattr(batcher, "_answer", counted)

    async def go():
        transport = httpx.ASGITransport(app=client.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as ac:
            jobs = [ac.get("/v1/search", params={"q": q, "n": 3}) for q in queries]
            jobs.append(ac.get("/v1/search", params={"q": "cat - cat"}))
            jobs.append(ac.post("/v1/search", json={"terms": [{"id": 999999}]}))
            return await asyncio.gather(*jobs)

    *good, cancel, unknown = asyncio.run(go())
    assert sum(sizes) == 12 and max(sizes) > 1, sizes  # batched: fewer model calls than queries
    for got, want in zip((r.json() for r in good), alone, strict=True):
        # the same hits; scores within rounding, the texts of a batch being encoded together
        assert [h["id"] for h in got["results"]] == [h["id"] for h in want["results"]]
        scores = [h["score"] for h in got["results"]]
        assert scores == pytest.approx([h["score"] for h in want["results"]], abs=5e-6)
    _error(cancel, 400, "invalid_input")
    _error(unknown, 404, "unknown_id")


def test_no_catalog_is_a_clear_404(tiny_model_dir, tmp_path):
    app = create_app(ServerSettings(model=f"local:{tiny_model_dir}", db=tmp_path / "none.db"))
    with TestClient(app) as c:
        detail = _error(c.get("/v1/search", params={"q": "cat"}), 404, "no_catalog")
        assert "cliplens index" in detail
        assert c.get("/v1/health").json()["catalog"] is False


def test_caption_route(settings, tiny, tmp_path_factory, tiny_model_dir, photos):
    """A tiny captioner trained here; the route's captions are the library's."""
    from cliplens.captioning.model import load_captioner
    from cliplens.cli.main import main
    from cliplens.datasets.shapes import write_shapes

    data, out = tmp_path_factory.mktemp("shapes"), tmp_path_factory.mktemp("cap")
    write_shapes(data, n=40, size=32, heldout=4)
    tiny_lm = ["--lm", "scratch:gpt2", "--lm-layers", "1", "--lm-width", "32"]
    quick = ["--epochs", "1", "--batch-size", "16", "--train-precision", "fp32"]
    where = ["--out", str(out), "--db", str(out / "none.db")]
    model = ["--model", f"local:{tiny_model_dir}"]
    train = ["caption", "train", "--data", str(data / "train-full.jsonl")]
    assert main([*train, *model, *tiny_lm, *quick, *where]) == 0
    images = [photos / "cat.jpg", photos / "coffee.jpg"]
    expected = load_captioner(out / "captioner").generate(tiny.encode_images(images))
    with _app(settings, captioner=out / "captioner") as c:
        r = c.post("/v1/caption", files=[_upload(p) for p in images])
        assert r.status_code == 200, r.text
        got = r.json()["captions"]
        assert [x["name"] for x in got] == ["cat.jpg", "coffee.jpg"]
        assert [x["caption"] for x in got] == expected
        assert c.get("/v1/models").json()["captioner"] is True
        r = c.post("/v1/caption", files=[_upload(photos / "cat.jpg")], data={"rerank": "4"})
        assert r.status_code == 200 and r.json()["captions"][0]["caption"]


def test_serve_command(tmp_path, tiny_model_dir, catalog_db, capsys):
    """`cliplens serve` refuses bad files before it starts, then serves on loopback."""
    import socket
    import subprocess
    import sys
    import time

    import httpx

    from cliplens.cli.main import main

    base = ["serve", "--model", f"local:{tiny_model_dir}", "--db", str(catalog_db)]
    assert main([*base, "--captioner", str(tmp_path)]) == 2
    assert "captioner.json" in capsys.readouterr().err
    assert main([*base, "--policy", str(tmp_path / "none.yaml")]) == 2
    (tmp_path / "junk.npz").write_bytes(b"junk")
    assert main([*base, "--quality-probe", str(tmp_path / "junk.npz")]) == 2
    assert "not a cliplens" in capsys.readouterr().err
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "cliplens.cli.main", *base, "--port", str(port), "--token", "t0k"]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                health = httpx.get(f"http://127.0.0.1:{port}/v1/health", timeout=1)
                break
            except httpx.HTTPError:
                assert proc.poll() is None and time.monotonic() < deadline, "did not start"
                time.sleep(0.2)
        assert health.json()["auth"] is True
        url = f"http://127.0.0.1:{port}/v1/search"
        assert httpx.get(url, params={"q": "cat"}).status_code == 401
        auth = {"Authorization": "Bearer t0k"}
        r = httpx.get(url, params={"q": "cat"}, headers=auth, timeout=120)  # loads the model
        assert r.status_code == 200 and len(r.json()["results"]) == 7
    finally:
        proc.terminate()
        proc.wait(20)
    assert f"http://127.0.0.1:{port}/" in proc.stderr.read()


def test_search_pages_and_cut_off_are_slices_of_one_long_list(client, photos):
    def get(path: str, **params) -> dict:
        r = client.get(path, params=params)
        assert r.status_code == 200, r.text
        return r.json()

    cat_id = next(
        h["id"] for h in get("/v1/search", q="a photo", n=7)["results"] if h["name"] == "cat.jpg"
    )
    routes = [("/v1/search", {"q": "a photo"}), (f"/v1/similar/{cat_id}", {})]
    for path, params in routes:
        whole = get(path, **params, n=7)["results"]
        pages, offset, offsets = [], 0, []
        while offset is not None:
            offsets.append(offset)
            body = get(path, **params, n=2, offset=offset)
            assert body["offset"] == offset
            pages += body["results"]
            offset = body["next_offset"]
        assert pages == whole and offsets == list(range(0, len(whole), 2))
        cut = (whole[2]["score"] + whole[3]["score"]) / 2
        above = [h for h in whole if h["score"] >= cut]
        body = get(path, **params, n=2, offset=1, min_score=cut)
        assert body["results"] == above[1:3] and body["next_offset"] is None
    # POST /v1/search and the image search page the same way
    terms = {"terms": [{"text": "a photo"}]}
    whole = client.post("/v1/search", json=terms | {"n": 7}).json()["results"]
    second = client.post("/v1/search", json=terms | {"n": 3, "offset": 3}).json()
    assert second["results"] == whole[3:6] and second["next_offset"] == 6
    upload = [_upload(photos / "rocket.jpg", "image")]
    by_image = client.post("/v1/search/image", files=upload, data={"n": "7"}).json()["results"]
    paged = client.post("/v1/search/image", files=upload, data={"n": "2", "offset": "2"}).json()
    assert paged["results"] == by_image[2:4] and paged["next_offset"] == 4
    _error(client.get("/v1/search", params={"q": "a", "offset": -1}), 422, "invalid_request")
    _error(client.get("/v1/search", params={"q": "a", "min_score": 1.5}), 422, "invalid_request")
