"""The server against a hostile user (issue 17): planted links and non-images in an
indexed folder, odd tokens, configurations that cannot work. Bodies that break parsers and
slow clients: test_server_bodies.py."""

from __future__ import annotations

import asyncio
import io
import math
import os
import socket
import sqlite3
from dataclasses import replace
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from cliplens.catalog.db import Catalog, CatalogError
from cliplens.catalog.update import update_catalog
from cliplens.cli.main import main
from cliplens.errors import InvalidInputError
from cliplens.models.ref import ModelRef
from cliplens.server import ServerSettings, create_app
from conftest import make_photos
from tests_helpers import built_index_from_catalog

SECRET = b"root:x:0:0:root:/root:/bin/bash\n"
PAGE = b"<!doctype html><html><script>alert(document.cookie)</script></html>"


def _shape(r, *case: str) -> dict:
    """A 4xx in the one error shape: JSON {"error", "detail"}, one line, with nosniff."""
    assert 400 <= r.status_code < 500, (*case, r.status_code, r.text[:200])
    assert r.headers["content-type"].startswith("application/json"), case
    assert r.headers["x-content-type-options"] == "nosniff"
    body = r.json()
    assert set(body) == {"error", "detail"}, body
    assert isinstance(body["detail"], str) and body["detail"] and "\n" not in body["detail"]
    return body


def _refused(r, statuses: tuple[int, ...] = (404, 415)) -> dict:
    """A refusal in the one error shape, revealing nothing of the file."""
    assert r.status_code in statuses, (r.status_code, r.text)
    assert b"root:" not in r.content and b"<script" not in r.content
    return _shape(r)


# ------------------------------------------------------------ a folder with planted files


@pytest.fixture(scope="module")
def planted(tmp_path_factory, photos) -> dict[str, Path]:
    """An indexed folder holding two photos and what a hostile writer would plant there,
    next to a folder that is not indexed."""
    root = tmp_path_factory.mktemp("hostile").resolve()
    inside, outside = root / "photos", root / "elsewhere"
    inside.mkdir()
    outside.mkdir()
    for name in ("cat.jpg", "coffee.jpg"):
        (inside / name).write_bytes((photos / name).read_bytes())
    (outside / "private.jpg").write_bytes((photos / "rocket.jpg").read_bytes())
    (outside / "passwd").write_bytes(SECRET)
    (inside / "link-out.jpg").symlink_to(outside / "private.jpg")
    (inside / "link-in.jpg").symlink_to(inside / "cat.jpg")
    (inside / "passwd.jpg").symlink_to(outside / "passwd")
    (inside / "page.png").write_bytes(PAGE)
    (inside / "notes.jpg").write_bytes(b"not an image at all\n")
    buf = io.BytesIO()
    Image.open(photos / "coffee.jpg").save(buf, format="PNG")
    (root / "png-named.jpg").write_bytes(buf.getvalue())
    (root / "bitmap.jpg").write_bytes(
        b"#define x_width 1\n#define x_height 1\nstatic char x_bits[] = {0x00};\n"
    )
    (root / "folder.jpg").mkdir()
    os.mkfifo(root / "fifo.jpg")
    (root / "linked-folder").symlink_to(inside)
    return {"root": root, "inside": inside, "outside": outside}


@pytest.fixture(scope="module")
def hostile_db(planted, tiny_model_dir) -> Path:
    db = planted["root"] / "catalog.db"
    with Catalog(db) as cat:
        update_catalog(cat, ModelRef(f"local:{tiny_model_dir}"), [planted["inside"]], workers=0)
    return db


@pytest.fixture(scope="module")
def settings(tiny_model_dir, hostile_db) -> ServerSettings:
    return ServerSettings(model=f"local:{tiny_model_dir}", db=hostile_db, precision="fp32")


@pytest.fixture(scope="module")
def client(settings):
    with TestClient(create_app(settings)) as c:
        yield c


def _ids(db: Path) -> dict[str, tuple[int, str]]:
    """File name -> (catalog id, status) of what the indexer recorded."""
    with Catalog(db, readonly=True) as cat:
        rows = cat.files_under([db.parent])
    return {Path(p).name: (r.id, r.status) for p, r in rows.items()}


def test_a_normal_photo_is_served_typed_by_content_with_nosniff(client, hostile_db, planted):
    cat_id, status = _ids(hostile_db)["cat.jpg"]
    assert status == "ok"
    r = client.get(f"/v1/images/{cat_id}")
    assert r.status_code == 200, r.text
    assert r.content == (planted["inside"] / "cat.jpg").read_bytes()
    assert r.headers["content-type"] == "image/jpeg"
    assert r.headers["x-content-type-options"] == "nosniff"
    assert r.headers["content-length"] == str(len(r.content))
    thumb = client.get(f"/v1/thumbs/{cat_id}", params={"size": 40})
    assert thumb.status_code == 200 and thumb.headers["content-type"] == "image/jpeg"
    assert thumb.headers["x-content-type-options"] == "nosniff"
    assert max(Image.open(io.BytesIO(thumb.content)).size) == 40


def test_the_walk_records_what_was_planted_but_a_link_within_the_folder(hostile_db):
    """A link to a file inside the indexed folders is not recorded: its target is, under
    its own name (the only name the server would serve)."""
    assert set(_ids(hostile_db)) == {
        "cat.jpg",
        "coffee.jpg",
        "link-out.jpg",
        "passwd.jpg",
        "page.png",
        "notes.jpg",
    }


@pytest.mark.parametrize("name", ["link-out.jpg", "passwd.jpg", "page.png", "notes.jpg"])
def test_what_was_planted_in_an_indexed_folder_is_never_served(client, hostile_db, name):
    """Indexed through the library: a link out of the folder, a link to a text file, a
    page named .png, a text file named .jpg: no route serves any of them (a link within
    the folder is not recorded; as a row of its own it is refused: CASES below)."""
    file_id, _ = _ids(hostile_db)[name]
    for route in ("images", "thumbs"):
        _refused(client.get(f"/v1/{route}/{file_id}"))


def test_failed_files_are_refused_by_their_status(client, hostile_db):
    found = _ids(hostile_db)
    failed = [i for name, (i, status) in found.items() if status != "ok"]
    assert {"page.png", "notes.jpg"} <= {n for n, (_, s) in found.items() if s != "ok"}
    for file_id in failed:
        body = _refused(client.get(f"/v1/images/{file_id}"), (404,))
        assert body["error"] == "not_served"


# the checks on the file itself: rows marked 'ok' that point where no photo should be read
# (a catalog edited by hand, a file replaced after indexing, a build-index folder)
CASES = [  # (name, status, kind, words of the detail)
    ("inside/link-out.jpg", 404, "not_served", "symbolic link"),  # to a photo outside
    ("inside/link-in.jpg", 404, "not_served", "symbolic link"),  # to a photo inside
    ("inside/passwd.jpg", 404, "not_served", "symbolic link"),  # to a text file
    ("linked-folder/cat.jpg", 404, "not_served", "symbolic link"),  # a folder on the way
    ("inside/../inside/cat.jpg", 404, "not_served", "'..'"),  # not its own real path
    ("folder.jpg", 404, "not_served", "not a regular file"),  # a directory
    ("fifo.jpg", 404, "not_served", "not a regular file"),  # a FIFO: no wait for a writer
    ("inside/page.png", 415, "not_an_image", "HTML"),  # whatever the name says
    ("inside/notes.jpg", 415, "not_an_image", "served: JPEG"),
    ("bitmap.jpg", 415, "not_an_image", "served: JPEG"),  # XBM: text Pillow calls an image
    ("gone.jpg", 404, "file_missing", "no longer on disk"),
]


def _planted_path(root: Path, name: str) -> str:
    return str(root / name.replace("inside/", "photos/", 1))


@pytest.fixture(scope="module")
def ok_rows(planted, settings, tmp_path_factory):
    """A client of a catalog holding the CASES (and a PNG named .jpg) as rows with status
    'ok', and the rows' ids by name."""
    root = planted["root"]
    names = [c[0] for c in CASES] + ["png-named.jpg"]
    paths = {n: _planted_path(root, n) for n in names}
    db = tmp_path_factory.mktemp("ok-rows") / "catalog.db"
    with Catalog(db) as cat:
        with cat.transaction():
            cat.upsert_files([(p, 1, 1, None, "ok", None) for p in paths.values()])
        rows = cat.files_under([root])
    with TestClient(create_app(replace(settings, db=db))) as c:
        yield c, {n: rows[p].id for n, p in paths.items()}


@pytest.mark.parametrize(("name", "status", "kind", "words"), CASES)
def test_the_file_itself_is_checked(ok_rows, name, status, kind, words):
    client, ids = ok_rows
    for route in ("images", "thumbs"):
        body = _refused(client.get(f"/v1/{route}/{ids[name]}"), (status,))
        assert body["error"] == kind and words in body["detail"], body


def test_the_content_type_comes_from_the_content(ok_rows, planted):
    client, ids = ok_rows
    r = client.get(f"/v1/images/{ids['png-named.jpg']}")
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    assert r.content == (planted["root"] / "png-named.jpg").read_bytes()
    assert r.headers["x-content-type-options"] == "nosniff"


def test_a_built_index_gets_the_same_checks(tmp_path, planted, settings):
    """A build-index folder has no status: its rows' files are checked as they are served."""
    from cliplens.index.built import open_built_index

    db = tmp_path / "noise.db"
    with Catalog(db) as cat:
        make_photos(tmp_path / "noise", len(CASES) + 1)
        update_catalog(cat, ModelRef(settings.model), [tmp_path / "noise"], workers=0)
    root = planted["root"]
    targets = {str(root / "photos/cat.jpg"): (200, "")}
    targets |= {_planted_path(root, name): (status, kind) for name, status, kind, _ in CASES}
    left = list(targets)
    index = built_index_from_catalog(tmp_path / "built", db, settings.model, lambda _: left.pop(0))
    built = open_built_index(index)
    rows = {built.path_of(r): r for r in range(len(built))}
    assert set(rows) == set(targets)
    with TestClient(create_app(replace(settings, index=index))) as c:
        for path, (status, kind) in targets.items():
            for route in ("images", "thumbs"):
                r = c.get(f"/v1/{route}/{rows[path]}")
                if status == 200:
                    assert r.status_code == 200 and r.headers["content-type"] == "image/jpeg"
                else:
                    assert _refused(r, (status,))["error"] == kind, (path, route)


def _png_head(width: int, height: int) -> bytes:
    """A PNG that says it is width x height (its pixels are not there: serving reads only
    the header)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data)
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = chunk(b"IDAT", zlib.compress(b"\0"))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + idat + chunk(b"IEND", b"")


def test_the_megapixel_cap_is_the_servers(settings, tmp_path, monkeypatch):
    """/v1/images judges an image's size by --max-megapixels alone: over it is a 413 (also
    below Pillow's own limit), under it is served (also above twice Pillow's limit)."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", Image.MAX_IMAGE_PIXELS)  # put back after
    folder = tmp_path.resolve()
    sizes = {"50mp.png": (8_000, 6_250), "180mp.png": (15_000, 12_000)}
    for name, (w, h) in sizes.items():
        (folder / name).write_bytes(_png_head(w, h))
    db = folder / "catalog.db"
    with Catalog(db) as cat:
        with cat.transaction():
            cat.upsert_files([(str(folder / n), 1, 1, None, "ok", None) for n in sizes])
        ids = {Path(p).name: r.id for p, r in cat.files_under([folder]).items()}
    with TestClient(create_app(replace(settings, db=db))) as c:  # the default 40 MP
        for name in sizes:
            body = _refused(c.get(f"/v1/images/{ids[name]}"), (413,))
            assert body["error"] == "image_too_large" and "40 MP" in body["detail"], body
    with TestClient(create_app(replace(settings, db=db, max_megapixels=200))) as c:
        for name in sizes:
            r = c.get(f"/v1/images/{ids[name]}")
            assert r.status_code == 200 and r.headers["content-type"] == "image/png", r.text
            assert r.content == (folder / name).read_bytes()


def test_a_cached_thumbnail_is_checked_as_a_file_but_not_identified_again(
    settings, tmp_path, photos, monkeypatch
):
    """A thumbnail hit was made from the very file (device, inode, size, mtime) that is
    open now, so its content is not identified again; the checks of the file itself still
    run on every request, and a replaced file is a new key."""
    import cliplens.server.files as files

    calls = []
    real = files.identify
    monkeypatch.setattr(files, "identify", lambda *a, **k: calls.append(a[1]) or real(*a, **k))
    folder = tmp_path.resolve()
    photo = folder / "p.jpg"
    photo.write_bytes((photos / "cat.jpg").read_bytes())
    (folder / "other.jpg").write_bytes((photos / "coffee.jpg").read_bytes())
    db = folder / "catalog.db"
    with Catalog(db) as cat:
        with cat.transaction():
            cat.upsert_files([(str(photo), 1, 1, None, "ok", None)])
        (row,) = cat.files_under([folder]).values()
    url = f"/v1/thumbs/{row.id}?size=32"
    with TestClient(create_app(replace(settings, db=db))) as c:
        first = c.get(url)
        assert first.status_code == 200 and len(calls) == 1, first.text
        again = c.get(url)
        assert again.status_code == 200 and again.content == first.content
        assert len(calls) == 1  # a hit: not identified again
        photo.unlink()
        photo.symlink_to(folder / "other.jpg")  # the same path, now a link
        assert _refused(c.get(url), (404,))["error"] == "not_served"
        photo.unlink()
        photo.write_bytes(PAGE)  # replaced: a new key, so identified again, and refused
        assert _refused(c.get(url), (415,))["error"] == "not_an_image"
        assert len(calls) == 2


# ------------------------------------------------------------ tokens


def _statuses(app, url: str, authorizations: list[bytes | None]) -> list[int]:
    """The status of GET url with each Authorization header, its bytes as given (the test
    client would re-encode them as UTF-8)."""
    import httpx

    async def go() -> list[int]:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
            out = []
            for value in authorizations:
                headers = {} if value is None else {"Authorization": value}
                out.append((await c.get(url, headers=headers)).status_code)
            return out

    return asyncio.run(go())


@pytest.mark.parametrize("token", ["pässwörd", "voilà", "s3cret"])
def test_tokens_compare_as_bytes(settings, hostile_db, token):
    cat_id, _ = _ids(hostile_db)["cat.jpg"]
    app = create_app(replace(settings, token=token))
    url, right = f"/v1/images/{cat_id}", f"Bearer {token}".encode()
    assert _statuses(app, url, [right, f"bearer  {token} ".encode()]) == [200, 200]
    wrong = [None, b"", b"Bearer", b"Bearer ", b"Bearer \xc3\xb1", b"Bearer \xff", right + b"x"]
    wrong.append(b"Basic " + right[7:])
    latin = f"Bearer {token}".encode("latin-1", "replace")
    wrong += [latin] if latin != right else []  # the token's characters, not its UTF-8 bytes
    assert _statuses(app, url, wrong) == [401] * len(wrong)


@pytest.mark.parametrize("token", ["", " ", "\t", " lead", "trail ", "two\nlines", "nul\x00"])
def test_an_unusable_token_is_refused(token):
    with pytest.raises(InvalidInputError, match="`token`"):
        ServerSettings(token=token)


# ------------------------------------------------------------ refusing to start


@pytest.fixture
def no_serving(monkeypatch):
    """A check that fails would start a server: fail the test instead of hanging."""
    import uvicorn

    def started(*_, **__):
        raise AssertionError("the server started")

    monkeypatch.setattr(uvicorn, "run", started)
    monkeypatch.setattr(uvicorn.Server, "run", started)


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "unexpected" not in err and "Traceback" not in err
    return lines[0]


@pytest.fixture(scope="module")
def bad_catalogs(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("bad-db")
    noise = folder / "noise.db"
    noise.write_bytes(os.urandom(4096))
    newer = folder / "newer.db"
    with sqlite3.connect(newer) as con:
        con.execute("PRAGMA user_version = 99")
    return {"noise": noise, "newer": newer}


@pytest.mark.parametrize("which", ["noise", "newer"])
def test_a_catalog_that_cannot_be_read_stops_the_start(
    capsys, no_serving, bad_catalogs, tiny_model_dir, which
):
    db = bad_catalogs[which]
    with pytest.raises(CatalogError, match=str(db)):
        create_app(ServerSettings(model=f"local:{tiny_model_dir}", db=db))
    assert main(["serve", "--model", f"local:{tiny_model_dir}", "--db", str(db)]) == 1
    assert str(db) in _one_line_error(capsys)


def test_a_catalog_that_breaks_after_the_start_is_a_503(settings, hostile_db, tmp_path):
    import shutil

    db = tmp_path / "catalog.db"
    shutil.copy(hostile_db, db)
    with TestClient(create_app(replace(settings, db=db))) as c:
        db.write_bytes(os.urandom(4096))
        r = c.get("/v1/images/1")
        assert r.status_code == 503 and r.json()["error"] == "catalog_unavailable", r.text


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("--timeout", "nan"),
        ("--timeout", "inf"),
        ("--timeout", "0"),
        ("--timeout", "-1"),
        ("--max-upload-mb", "nan"),
        ("--max-upload-mb", "0"),
        ("--max-megapixels", "nan"),
        ("--max-megapixels", "-inf"),
        ("--port", "70000"),
        ("--port", "-1"),
        ("--port", "x"),
        ("--token", ""),
    ],
)
def test_settings_that_cannot_work_are_usage_errors(
    capsys, no_serving, hostile_db, option, value, tiny_model_dir
):
    argv = ["serve", "--model", f"local:{tiny_model_dir}", "--db", str(hostile_db)]
    assert main([*argv, option, value]) == 2
    assert option in _one_line_error(capsys)


@pytest.mark.parametrize(
    "field",
    [
        "timeout_s",
        "max_upload_mb",
        "max_megapixels",
        "head_timeout_s",
        "body_timeout_s",
        "keep_alive_s",
    ],
)
def test_settings_refuse_limits_that_are_not_finite_and_positive(field):
    for value in (math.nan, math.inf, 0.0, -1.0):
        with pytest.raises(InvalidInputError, match="a finite number > 0"):
            ServerSettings(**{field: value})


def test_a_port_in_use_is_one_line(capsys, no_serving, hostile_db, tiny_model_dir):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        argv = ["serve", "--model", f"local:{tiny_model_dir}", "--db", str(hostile_db)]
        assert main([*argv, "--port", str(port)]) == 1
    assert f"127.0.0.1:{port}" in _one_line_error(capsys)
