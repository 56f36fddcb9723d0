"""RAW photos with the real offline model: a DNG made from a photo embeds like the photo on
every decode path, and `cliplens index` indexes a folder of DNGs (reporting the broken
ones as failed) that `search` then finds, by text and by image."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cliplens.images import open_image
from cliplens.raw import RAW_INFO_KEY
from dng_files import dng_bytes, write_dng
from tests_helpers import run_json

pytest.importorskip("rawpy")
pytest.importorskip("pidng")


def upright(photos: Path, name: str) -> Image.Image:
    with Image.open(photos / name) as img:
        return img.convert("RGB")


@pytest.mark.parametrize(
    ("name", "orientation", "preview", "path"),
    [
        ("hubble.jpg", 1, None, "half-size"),  # 1000x872: half of it still >= 256
        ("cat.jpg", 6, None, "full-size"),  # 451x300: half would be under 256
        ("motorcycle.jpg", 8, None, "full-size"),
        ("cat.jpg", 6, "sensor", "preview"),
        ("motorcycle.jpg", 1, "sensor", "preview"),
        ("hubble.jpg", 3, "sensor", "preview"),
    ],
)
def test_a_dng_embeds_like_the_photo_it_came_from(
    tmp_path, photos, offline, name, orientation, preview, path
):
    photo = photos / name
    dng = write_dng(tmp_path / "photo.dng", upright(photos, name), orientation, preview)
    min_size = offline.info.preprocessing.resize_size  # what the encoder asks open_image
    assert open_image(dng, min_size=min_size).info[RAW_INFO_KEY] == path
    jpeg_vector, dng_vector = offline.encode_images([photo, dng])
    cosine = float(np.dot(jpeg_vector, dng_vector))
    assert cosine >= 0.95, (name, path, cosine)


def test_index_and_search_a_folder_of_raw_photos(tmp_path, capsys, photos):
    folder = tmp_path / "shoot"
    folder.mkdir()
    write_dng(folder / "IMG_0001.dng", upright(photos, "cat.jpg"), 6, preview="sensor")
    write_dng(folder / "IMG_0002.DNG", upright(photos, "motorcycle.jpg"), 8)
    write_dng(folder / "IMG_0003.dng", upright(photos, "hubble.jpg"), 1)
    (folder / "coffee.jpg").write_bytes((photos / "coffee.jpg").read_bytes())
    data = dng_bytes(np.asarray(upright(photos, "rocket.jpg")))
    (folder / "IMG_0004.dng").write_bytes(data[: len(data) // 3])  # cut short by a card
    (folder / "IMG_0005.nef").write_text("not a photo\n" * 50)
    db = str(tmp_path / "c.db")
    model = ["--model", "offline", "--db", db]
    # decoder processes, as a user's index runs, forked after this process ran LibRaw
    # (as `search x.dng` does before it updates the catalog): RAWs decode in them too
    open_image(folder / "IMG_0001.dng", min_size=256)
    stats = run_json(capsys, ["index", str(folder), *model, "--workers", "2", "-f", "json"])
    assert (stats["new"], stats["failed"]) == (4, 2), stats
    errors = {Path(e["path"]).name: e["error"] for e in stats["errors"]}
    assert "truncated" in errors["IMG_0004.dng"]
    assert "not a RAW photo" in errors["IMG_0005.nef"]
    assert all("\n" not in e for e in errors.values())

    where = ["--in", str(folder), *model, "--no-index", "-n", "1", "-f", "json"]
    for query, expected in (
        ("a cat", "IMG_0001.dng"),
        ("a motorcycle", "IMG_0002.DNG"),
        ("a galaxy", "IMG_0003.dng"),
    ):
        (hit,) = run_json(capsys, ["search", query, *where])
        assert Path(hit["path"]).name == expected, (query, hit)
    # a query by image: the RAW itself, decoded as the catalog decoded it
    (hit,) = run_json(capsys, ["search", str(folder / "IMG_0001.dng"), *where])
    assert Path(hit["path"]).name == "IMG_0001.dng" and hit["score"] > 0.99
    (hit,) = run_json(capsys, ["similar", str(photos / "motorcycle.jpg"), *where])
    assert Path(hit["path"]).name == "IMG_0002.DNG"


def test_the_server_takes_raw_uploads(tmp_path, photos, tiny_model_dir, tiny, monkeypatch):
    from fastapi.testclient import TestClient

    from cliplens.server import ServerSettings, create_app

    dng = write_dng(tmp_path / "cat.dng", upright(photos, "cat.jpg"), 6, preview="sensor")
    data = dng_bytes(np.asarray(upright(photos, "rocket.jpg")))
    model = f"local:{tiny_model_dir}"
    settings = ServerSettings(model=model, db=tmp_path / "c.db", precision="fp32")
    with TestClient(create_app(settings)) as client:

        def embed(body: bytes):
            # no RAW content type, no usable name: the upload is known by its content
            files = [("images", ("upload", body, "application/octet-stream"))]
            return client.post("/v1/embed", files=files)

        r = embed(dng.read_bytes())
        assert r.status_code == 200, r.text
        expected = tiny.encode_images([dng])  # opened by the library, as the indexer does
        np.testing.assert_allclose(r.json()["images"], expected, atol=1e-5)
        r = embed(data[: len(data) // 2])
        assert (r.status_code, r.json()["error"]) == (400, "truncated_image"), r.text
        monkeypatch.setitem(sys.modules, "rawpy", None)
        r = embed(dng.read_bytes())
        assert (r.status_code, r.json()["error"]) == (415, "unsupported_image"), r.text
        assert "cliplens[raw]" in r.json()["detail"]
