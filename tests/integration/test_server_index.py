"""The HTTP service over a build-index folder (`serve --index`): search, files and
thumbnails by the index's row ids, object-store photos, and a rebuilt index served
without a restart."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from server_fixtures import app_with as _app
from server_fixtures import catalog_db, client, settings  # noqa: F401 (fixtures)
from server_fixtures import error_of as _error
from server_fixtures import upload as _upload
from tests_helpers import built_index_from_catalog

# ------------------------------------------------------------ serving a build-index folder


@pytest.fixture(scope="module")
def index_dir(tmp_path_factory, catalog_db, tiny_model_dir) -> Path:
    folder = tmp_path_factory.mktemp("built")
    return built_index_from_catalog(folder, catalog_db, f"local:{tiny_model_dir}")


def test_search_a_built_index_like_the_catalog(client, settings, index_dir, photos):
    """With --index, search, similar, weighted ids, files and thumbnails work by the index's
    row ids, and rank as the catalog does over the same vectors."""
    with _app(settings, index=index_dir, model=None, db=index_dir / "none.db") as c:
        health = c.get("/v1/health").json()
        assert health["searches"] == "index" and health["searchable"] is True
        assert health["catalog"] is False and health["model"] == settings.model
        assert [m["embeddings"] for m in c.get("/v1/models").json()["catalog"]] == [7]
        for q in ("a cat", "rocket"):
            got = c.get("/v1/search", params={"q": q, "n": 5}).json()["results"]
            want = client.get("/v1/search", params={"q": q, "n": 5}).json()["results"]
            assert [h["path"] for h in got] == [h["path"] for h in want]
            np.testing.assert_allclose(
                [h["score"] for h in got], [h["score"] for h in want], atol=1e-4
            )
        hits = c.get("/v1/search", params={"q": "coffee", "n": 7}).json()["results"]
        assert sorted(h["id"] for h in hits) == list(range(7))  # row numbers
        coffee = next(h for h in hits if h["name"] == "coffee.jpg")
        assert c.get(coffee["image_url"]).content == (photos / "coffee.jpg").read_bytes()
        thumb = c.get(coffee["thumb_url"], params={"size": 48})
        assert max(Image.open(io.BytesIO(thumb.content)).size) == 48
        similar = c.get(f"/v1/similar/{coffee['id']}", params={"n": 3}).json()["results"]
        assert len(similar) == 3 and coffee["id"] not in [h["id"] for h in similar]
        by_id = c.post("/v1/search", json={"terms": [{"id": coffee["id"]}], "n": 1}).json()
        assert by_id["results"][0]["id"] == coffee["id"]
        assert by_id["results"][0]["score"] == pytest.approx(1.0, abs=1e-4)
        for route in ("images", "thumbs", "similar"):
            assert "0 to 6" in _error(c.get(f"/v1/{route}/7"), 404, "unknown_id")
        r = c.post("/v1/search/image", files=[_upload(photos / "cat.jpg", "image")])
        assert r.status_code == 200 and r.json()["results"][0]["name"] == "cat.jpg"


def test_built_index_refuses_another_model(settings, index_dir, capsys):
    from cliplens.cli.main import main

    with _app(settings, index=index_dir, model="offline") as c:
        detail = _error(c.get("/v1/search", params={"q": "a cat"}), 400, "invalid_input")
        assert str(index_dir) in detail and "leave --model out" in detail
    assert main(["serve", "--index", str(index_dir), "--model", "offline"]) == 2
    assert "holds vectors of" in capsys.readouterr().err
    assert main(["serve", "--index", str(index_dir.parent)]) == 2  # not an index folder
    assert "build-index" in capsys.readouterr().err


def test_built_index_of_object_store_photos(tmp_path, settings, catalog_db, photos):
    """Photos that live behind fsspec URIs are served and thumbnailed from there."""
    import fsspec

    memory = fsspec.filesystem("memory")
    uri = lambda p: f"memory://cliplens-test/{Path(p).name}"  # noqa: E731
    for p in photos.iterdir():
        memory.pipe(uri(p), p.read_bytes())
    index = built_index_from_catalog(tmp_path, catalog_db, settings.model, uri)
    try:
        with _app(settings, index=index) as c:
            hits = c.get("/v1/search", params={"q": "a cat", "n": 7}).json()["results"]
            cat = next(h for h in hits if h["name"] == "cat.jpg")
            assert cat["path"] == "memory://cliplens-test/cat.jpg"
            r = c.get(cat["image_url"])
            assert r.content == (photos / "cat.jpg").read_bytes()
            assert r.headers["content-type"] == "image/jpeg"
            thumb = c.get(cat["thumb_url"], params={"size": 32})
            assert max(Image.open(io.BytesIO(thumb.content)).size) == 32
            memory.rm(uri(photos / "coffee.jpg"))
            gone = next(h for h in hits if h["name"] == "coffee.jpg")
            assert "cannot be read" in _error(c.get(gone["image_url"]), 404, "file_missing")
    finally:
        memory.rm("memory://cliplens-test", recursive=True)


def test_object_store_photos_are_checked_by_content(tmp_path, settings, catalog_db, photos):
    """An object-store photo gets the content checks of a file on disk: its Content-Type
    is its content's, and what is no image in a served format is refused with a 415,
    whatever its name says (a page named .png), by the image and the thumbnail routes."""
    import fsspec

    memory = fsspec.filesystem("memory")
    base = "memory://cliplens-typed"
    png = io.BytesIO()
    Image.open(photos / "coffee.jpg").save(png, format="PNG")
    page = b"<!doctype html><html><script>alert(document.cookie)</script></html>"
    renamed = {"cat.jpg": ("planted.png", page), "coffee.jpg": ("coffee.jpg", png.getvalue())}

    def uri(p) -> str:
        name, data = renamed.get(Path(p).name, (Path(p).name, Path(p).read_bytes()))
        memory.pipe(f"{base}/{name}", data)
        return f"{base}/{name}"

    index = built_index_from_catalog(tmp_path, catalog_db, settings.model, uri)
    try:
        with _app(settings, index=index) as c:
            hits = c.get("/v1/search", params={"q": "a cat", "n": 7}).json()["results"]
            by_name = {h["name"]: h for h in hits}
            for url in (by_name["planted.png"]["image_url"], by_name["planted.png"]["thumb_url"]):
                r = c.get(url)
                assert "planted.png" in _error(r, 415, "not_an_image")
                assert b"<script" not in r.content
                assert r.headers["x-content-type-options"] == "nosniff"
            r = c.get(by_name["coffee.jpg"]["image_url"])
            assert r.status_code == 200 and r.headers["content-type"] == "image/png"
            assert r.content == png.getvalue()
            thumb = c.get(by_name["coffee.jpg"]["thumb_url"], params={"size": 24})
            assert max(Image.open(io.BytesIO(thumb.content)).size) == 24
    finally:
        memory.rm(base, recursive=True)


def test_a_rebuilt_index_is_served_without_a_restart(tmp_path, settings, catalog_db, monkeypatch):
    """build-index (or --update) into the served folder: the old build serves until the
    new one is complete (index.json written last), then the new one does."""
    import shutil

    from cliplens.server.service import Service

    monkeypatch.setattr(Service, "recheck_s", 0.0)
    served = built_index_from_catalog(tmp_path / "a", catalog_db, settings.model)
    rebuilt = built_index_from_catalog(
        tmp_path / "b", catalog_db, settings.model, lambda p: f"{p}.v2"
    )

    def replace(name: str) -> None:  # as build-index writes: a new file renamed into place
        shutil.copy(rebuilt / name, served / f".{name}.tmp")
        (served / f".{name}.tmp").replace(served / name)

    def paths(c) -> list[str]:
        r = c.get("/v1/search", params={"q": "a cat", "n": 7})
        assert r.status_code == 200, r.text
        return [h["path"] for h in r.json()["results"]]

    with _app(settings, index=served) as c:
        before = paths(c)
        assert len(before) == 7 and not any(p.endswith(".v2") for p in before)
        (served / "index.json").unlink()  # a build has started
        replace("index.faiss")
        replace("paths.arrow")
        assert paths(c) == before  # incomplete: the open index keeps serving
        replace("index.json")
        assert paths(c) == [f"{p}.v2" for p in before]
