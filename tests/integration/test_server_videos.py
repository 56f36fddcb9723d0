"""Videos through the server and the page: a catalog holding a clip that shows a cat for
4 s, then a rocket for 4 s (as H.264 MP4 and as VP9 WebM), beside a photo of coffee,
indexed with the offline model. Search finds the clip at the right moment; its thumbnail
is the frame at a moment; the file is served by its content, in byte ranges; in Chromium a
video result plays from its moment.

The browser test needs Debian's chromium and Playwright, as test_web_page.py does (a skip
there is a failure under CLIPLENS_NO_SKIPS=1)."""

from __future__ import annotations

import io
import os
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from cliplens.server import ServerSettings, create_app
from cliplens.server.files import video_type
from server_fixtures import error_of
from tests_helpers import browser_or_skip, launch_chromium, live_server, make_video, watched_page

CAT_UNTIL = 4.0  # the clip: the cat from 0 to 4 s, the rocket from 4 to 8 s
END = 8.0


@pytest.fixture(scope="module")
def media(tmp_path_factory) -> dict[str, Path]:
    """The indexed folder's files, the catalog, and a text file named .mp4 and an HLS
    playlist named .mp4 recorded as indexed videos (a file replaced after indexing)."""
    from skimage import data

    import cliplens

    root = tmp_path_factory.mktemp("videos").resolve()
    folder = root / "media"
    folder.mkdir()
    shots = [(data.chelsea(), CAT_UNTIL), (data.rocket(), END - CAT_UNTIL)]
    files = {
        "mp4": make_video(folder / "clip.mp4", shots),
        "webm": make_video(folder / "clip.webm", shots),
        "photo": folder / "coffee.jpg",
    }
    Image.fromarray(data.coffee()).save(files["photo"])
    planted = root / "planted"
    planted.mkdir()
    files["text"] = planted / "notes.mp4"
    files["text"].write_text("these are notes, not a video\n" * 20)
    files["playlist"] = planted / "list.mp4"
    files["playlist"].write_text(f"#EXTM3U\n#EXTINF:4,\nfile://{files['mp4']}\n#EXT-X-ENDLIST\n")
    db = root / "catalog.db"
    sampling = cliplens.VideoSampling(min_gap=0.5, max_gap=2)
    with cliplens.open_catalog(db) as cat:
        cliplens.update_catalog(
            cat, cliplens.ModelRef("offline"), [folder], video=sampling, workers=0
        )
        with cat.transaction():
            rows = [(str(files[k]), 1, 1, None, "ok", None, "video") for k in ("text", "playlist")]
            cat.upsert_files(rows)
    files["db"] = db
    return files


@pytest.fixture(scope="module")
def settings(media) -> ServerSettings:
    return ServerSettings(model="offline", db=media["db"])


@pytest.fixture(scope="module")
def client(settings):
    with TestClient(create_app(settings)) as c:
        yield c


@pytest.fixture(scope="module")
def ids(media) -> dict[str, int]:
    from cliplens.catalog.db import Catalog

    with Catalog(media["db"], readonly=True) as cat:
        rows = cat.files_under([media["db"].parent])
    return {key: rows[str(media[key])].id for key in ("mp4", "webm", "photo", "text", "playlist")}


def _results(client, q: str) -> dict[str, dict]:
    r = client.get("/v1/search", params={"q": q, "n": 10})
    assert r.status_code == 200, r.text
    return {hit["name"]: hit for hit in r.json()["results"]}


@pytest.mark.parametrize(
    ("q", "start", "end"), [("a cat", 0.0, CAT_UNTIL), ("a rocket", CAT_UNTIL, END)]
)
def test_search_finds_the_video_at_its_moment(client, ids, q, start, end):
    found = _results(client, q)
    clip = found["clip.mp4"]
    assert clip["id"] == ids["mp4"] and clip["kind"] == "video"
    assert start <= clip["time"] < end, clip
    assert clip["moments"][0] == {"time": clip["time"], "score": clip["score"]}
    scores = [m["score"] for m in clip["moments"]]
    assert scores == sorted(scores, reverse=True) and len(scores) >= 2
    assert clip["score"] > found["coffee.jpg"]["score"]
    # the thumbnail is the frame at that moment, and more parameters go after it with &
    thumb = urlsplit(clip["thumb_url"])
    assert thumb.path == f"/v1/thumbs/{ids['mp4']}"
    assert parse_qs(thumb.query) == {"t": [f"{clip['time']:g}"]}
    assert client.get(clip["thumb_url"] + "&size=32").headers["content-type"] == "image/jpeg"
    assert clip["image_url"] == f"/v1/images/{ids['mp4']}"

    photo = found["coffee.jpg"]
    assert (photo["kind"], photo["time"], photo["moments"]) == ("image", None, [])
    assert photo["thumb_url"] == f"/v1/thumbs/{ids['photo']}"


def test_each_moment_is_the_library_s_list_through_every_search_route(client, media, ids):
    """`each_moment`: a video's moments are results of their own, as the library lists
    them, by GET, POST and in a batch beside a grouped query."""
    import cliplens
    from cliplens.server.batching import SearchQuery

    with cliplens.open_catalog(media["db"], readonly=True) as cat:
        want = cliplens.search(cat, cliplens.ModelRef("offline"), "a cat", 30, each_moment=True)
    expected = [(Path(h.path).name, None if h.time is None else round(h.time, 3)) for h in want]
    assert sum(name == "clip.mp4" for name, _ in expected) >= 4  # its moments, each a row
    body = {"terms": [{"text": "a cat"}], "n": 30, "each_moment": True}
    for r in (
        client.get("/v1/search", params={"q": "a cat", "n": 30, "each_moment": "true"}),
        client.post("/v1/search", json=body),
    ):
        assert r.status_code == 200, r.text
        got = r.json()["results"]
        assert [(g["name"], g["time"]) for g in got] == expected
        assert got[0]["score"] == pytest.approx(want[0].score, abs=1e-4)
        clips = [g for g in got if g["name"] == "clip.mp4"]
        assert {g["id"] for g in clips} == {ids["mp4"]}
        assert all(g["moments"] == [{"time": g["time"], "score": g["score"]}] for g in clips)
        assert all(g["thumb_url"].endswith(f"?t={g['time']:g}") for g in clips)
    # a batch holding both kinds of query answers each as it asked
    service = client.app.state.service
    grouped, each = service.batcher._answer(
        [SearchQuery(["a cat"], [1.0], [], [], 30), SearchQuery(["a cat"], [1.0], [], [], 30, True)]
    )
    assert [(Path(h.path).name, h.time) for h in each] == [
        (Path(h.path).name, h.time) for h in want
    ]
    assert len({h.path for h in grouped}) == len(grouped) < len(each)


def test_similar_to_a_video_finds_the_same_clip_as_a_video(client, ids):
    r = client.get(f"/v1/similar/{ids['mp4']}", params={"n": 5})
    assert r.status_code == 200, r.text
    hits = r.json()["results"]
    assert ids["mp4"] not in [h["id"] for h in hits]
    assert hits[0]["id"] == ids["webm"] and hits[0]["kind"] == "video"
    assert hits[0]["time"] is not None and hits[0]["thumb_url"].startswith(
        f"/v1/thumbs/{ids['webm']}?t="
    )


@pytest.fixture(scope="module")
def looks(offline):
    """How much a JPEG looks like the cat rather than the rocket: the offline model's
    cosine to the cat photo minus its cosine to the rocket photo."""
    from skimage import data

    cat, rocket = offline.encode_images([data.chelsea(), data.rocket()])

    def catness(jpeg: bytes) -> float:
        (v,) = offline.encode_images([Image.open(io.BytesIO(jpeg))])
        return float(v @ cat - v @ rocket)

    return catness


def test_clip_retrieval_shows_a_video_at_the_moment_found(settings, looks):
    """clip-front's thumbnails of a video result are its frame at the moment the query
    found (the rocket's, 4 s in), not its first frame (the cat's)."""
    import base64
    import json
    from dataclasses import replace

    body = {"text": "a rocket", "modality": "image", "num_images": 10, "num_result_ids": 10}
    with TestClient(create_app(replace(settings, clip_retrieval=True))) as c:
        r = c.post("/knn-service", content=json.dumps(body), headers={"Content-Type": "text/plain"})
    assert r.status_code == 200, r.text
    videos = [row for row in r.json() if row["image_path"].endswith((".mp4", ".webm"))]
    assert len(videos) == 2
    for row in videos:
        assert looks(base64.b64decode(row["image"])) < 0, row["image_path"]  # the rocket


@pytest.mark.parametrize(("t", "cat"), [("1", True), ("5", False), ("0.5", True), ("7.5", False)])
def test_a_video_thumbnail_is_its_frame_at_t(client, ids, looks, t, cat):
    r = client.get(f"/v1/thumbs/{ids['mp4']}", params={"t": t, "size": 128})
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "image/jpeg" and r.content[:2] == b"\xff\xd8"
    img = Image.open(io.BytesIO(r.content))
    assert max(img.size) == 128
    assert (looks(r.content) > 0) == cat, (t, looks(r.content))
    assert client.get(f"/v1/thumbs/{ids['mp4']}", params={"t": t, "size": 128}).content == (
        r.content
    )  # cached, with its moment in the key


def test_a_video_thumbnail_defaults_to_the_first_frame_and_past_the_end_to_the_last(
    client, ids, looks
):
    first = client.get(f"/v1/thumbs/{ids['webm']}", params={"size": 64})
    assert first.status_code == 200 and looks(first.content) > 0
    past = client.get(f"/v1/thumbs/{ids['webm']}", params={"size": 64, "t": 3600})
    assert past.status_code == 200 and looks(past.content) < 0
    error_of(client.get(f"/v1/thumbs/{ids['mp4']}", params={"t": -1}), 422, "invalid_request")


_AT_ONCE = """
import sys
from concurrent.futures import ThreadPoolExecutor

import httpx

from cliplens.server import ServerSettings, create_app
from tests_helpers import live_server

settings = ServerSettings(model="offline", db=sys.argv[1])
ids = [int(i) for i in sys.argv[2:]]
with live_server(create_app(settings), settings) as port:
    base = f"http://127.0.0.1:{port}/v1/thumbs"

    def get(k):
        url = f"{base}/{ids[k % len(ids)]}"
        return httpx.get(url, params={"t": k / 8, "size": 48}, timeout=20).status_code

    with ThreadPoolExecutor(8) as pool:
        print(sorted(set(pool.map(get, range(64)))))
"""


def test_thumbnails_of_videos_asked_at_once_all_come(media, ids):
    """64 frames not yet cached, asked for at once over a real server, come in bounded
    time. A video decoding while other threads ran deadlocked the whole process (FFmpeg's
    decoding threads taking the GIL for PyAV's log callback), so the server runs in a
    child that the test can wait for."""
    import subprocess
    import sys

    tests = Path(__file__).resolve().parents[1]
    argv = [sys.executable, "-c", _AT_ONCE, str(media["db"]), str(ids["mp4"]), str(ids["webm"])]
    paths = [str(tests), *filter(None, [os.environ.get("PYTHONPATH")])]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(paths)}
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=30, env=env)
    except subprocess.TimeoutExpired:
        pytest.fail("thumbnails of videos asked for at once did not all come within 30 s")
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["[200]"]


def test_a_photo_ignores_t(client, ids):
    plain = client.get(f"/v1/thumbs/{ids['photo']}", params={"size": 64})
    assert plain.status_code == 200
    assert client.get(f"/v1/thumbs/{ids['photo']}", params={"size": 64, "t": 3}).content == (
        plain.content
    )


@pytest.mark.parametrize(
    ("header", "part"),
    [
        ("bytes=10-19", slice(10, 20)),
        ("bytes=0-0", slice(0, 1)),
        ("bytes=100-", slice(100, None)),
        ("bytes=-16", slice(-16, None)),
        ("bytes=1000-99999999999999999999999", slice(1000, None)),  # to the end
        ("Bytes = 5 - 9", slice(5, 10)),
    ],
)
def test_a_byte_range_is_those_bytes(client, media, ids, header, part):
    whole = media["mp4"].read_bytes()
    r = client.get(f"/v1/images/{ids['mp4']}", headers={"Range": header})
    assert r.status_code == 206, r.text
    assert r.content == whole[part]
    first = part.start % len(whole)
    assert r.headers["content-range"] == f"bytes {first}-{first + len(r.content) - 1}/{len(whole)}"
    assert r.headers["content-length"] == str(len(r.content))
    assert r.headers["content-type"] == "video/mp4"
    assert r.headers["accept-ranges"] == "bytes"


@pytest.mark.parametrize("header", [None, "bytes=0-1,4-5", "bytes=9-2", "items=0-5", "bytes=x-"])
def test_no_range_or_one_not_understood_is_the_whole_file(client, media, ids, header):
    r = client.get(f"/v1/images/{ids['mp4']}", headers={"Range": header} if header else {})
    assert r.status_code == 200, r.text
    assert r.content == media["mp4"].read_bytes()
    assert r.headers["content-type"] == "video/mp4" and r.headers["accept-ranges"] == "bytes"


@pytest.mark.parametrize("first", ["size", "size+5"])
def test_a_range_past_the_end_is_416_with_the_size(client, media, ids, first):
    size = media["mp4"].stat().st_size
    start = size if first == "size" else size + 5
    r = client.get(f"/v1/images/{ids['mp4']}", headers={"Range": f"bytes={start}-"})
    error_of(r, 416, "range_not_satisfiable")
    assert r.headers["content-range"] == f"bytes */{size}"
    error_of(
        client.get(f"/v1/images/{ids['mp4']}", headers={"Range": "bytes=-0"}),
        416,
        "range_not_satisfiable",
    )


def test_the_served_type_is_the_content_s(client, media, ids):
    webm = client.get(f"/v1/images/{ids['webm']}", headers={"Range": "bytes=0-99"})
    assert webm.status_code == 206 and webm.headers["content-type"] == "video/webm"
    assert webm.content == media["webm"].read_bytes()[:100]
    photo = client.get(f"/v1/images/{ids['photo']}", headers={"Range": "bytes=0-1"})
    assert photo.status_code == 206 and photo.content == b"\xff\xd8"
    assert photo.headers["content-type"] == "image/jpeg"


def test_every_container_the_indexer_reads_gets_thumbnails_and_is_served(tmp_path, offline):
    """Camcorders' MPEG-TS (.mts as TS, .m2ts with its time codes), MPEG-PS, ASF and Ogg:
    indexed like the rest, so their results must have a frame at a moment (they had been
    refused as no served container) and their bytes, typed by their content."""
    from skimage import data

    import cliplens

    folder = tmp_path / "camcorder"
    folder.mkdir()
    made = {
        "a.mts": ("libx264", "video/mp2t"),
        "b.m2ts": ("libx264", "video/mp2t"),
        "c.mpg": ("mpeg2video", "video/mpeg"),
        "d.wmv": ("wmv2", "video/x-ms-asf"),
        "e.ogv": ("libvpx", "video/ogg"),
    }
    for name, (codec, _) in made.items():
        make_video(folder / name, [(data.chelsea(), 1.0), (data.rocket(), 1.0)], codec=codec)
    db = tmp_path / "c.db"
    with cliplens.open_catalog(db) as cat:
        sampling = cliplens.VideoSampling(min_gap=0.5, max_gap=2)
        stats = cliplens.update_catalog(cat, offline, [folder], video=sampling, workers=0)
        assert (stats.videos, stats.failed) == (5, 0)
        ids = {Path(p).name: r.id for p, r in cat.files_under([folder]).items()}
    with TestClient(create_app(ServerSettings(model="offline", db=db))) as c:
        for name, (_, content_type) in made.items():
            thumb = c.get(f"/v1/thumbs/{ids[name]}", params={"t": 1.5, "size": 48})
            assert thumb.status_code == 200, (name, thumb.text)
            assert max(Image.open(io.BytesIO(thumb.content)).size) == 48
            whole = c.get(f"/v1/images/{ids[name]}", headers={"Range": "bytes=0-99"})
            assert whole.status_code == 206 and whole.headers["content-type"] == content_type
            assert whole.content == (folder / name).read_bytes()[:100]


@pytest.mark.parametrize("name", ["text", "playlist"])
def test_a_video_that_is_not_one_is_refused(client, ids, name):
    for route in ("images", "thumbs"):
        r = client.get(f"/v1/{route}/{ids[name]}")
        detail = error_of(r, 415, "not_an_image")
        assert "served videos: MP4" in detail and "EXTM3U" not in r.text


def _ebml(doc_type: bytes | None) -> bytes:
    """An EBML header (version, then the DocType if given), as Matroska files start."""
    body = b"\x42\x86\x81\x01"  # EBMLVersion 1
    if doc_type is not None:
        body += b"\x42\x82" + bytes([0x80 | len(doc_type)]) + doc_type
    return b"\x1a\x45\xdf\xa3" + bytes([0x80 | len(body)]) + body + b"\x18\x53\x80\x67"


@pytest.mark.parametrize(
    ("head", "expected"),
    [
        (b"\x00\x00\x00\x18ftypisom\x00\x00\x02\x00", "video/mp4"),
        (b"\x00\x00\x00\x14ftypqt  \x00\x00\x02\x00", "video/quicktime"),
        (b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00", None),  # a HEIF photo
        (b"\x00\x00\x00\x18ftypavif\x00\x00\x00\x00", None),
        (_ebml(b"webm"), "video/webm"),
        (_ebml(b"matroska"), "video/x-matroska"),
        (_ebml(None), "video/x-matroska"),  # Matroska is EBML's default
        (_ebml(b"other"), None),
        (_ebml(b"webm")[:9], "video/x-matroska"),  # cut before its DocType: the default
        (b"RIFF\x10\x00\x00\x00AVI LIST", "video/x-msvideo"),
        (b"RIFF\x10\x00\x00\x00WAVEfmt ", None),
        (b"#EXTM3U\n#EXTINF:4,\n", None),
        (b"<!doctype html>", None),
        (b"\x00\x00\x01\xba\x44\x00", "video/mpeg"),  # an MPEG-PS pack header
        (b"\x00\x00\x01\xb3", None),  # a bare MPEG video stream: no container
        (bytes.fromhex("3026b2758e66cf11a6d900aa0062ce6c") + b"\x00" * 8, "video/x-ms-asf"),
        (b"OggS\x00\x02", "video/ogg"),
        ((b"G" + b"\x00" * 187) * 3, "video/mp2t"),  # three 188-byte packets
        ((b"\x00" * 4 + b"G" + b"\x00" * 187) * 3, "video/mp2t"),  # M2TS: 192 bytes each
        ((b"G" + b"\x00" * 187) * 2, None),  # two packets are not enough to tell
    ],
)
def test_video_containers_by_their_first_bytes(head, expected):
    assert video_type(head) == expected


def test_a_real_webm_and_mp4_are_typed(media):
    assert video_type(media["webm"].read_bytes()[:4096]) == "video/webm"
    assert video_type(media["mp4"].read_bytes()[:4096]) == "video/mp4"


# ------------------------------------------------------------ in Chromium


def _play_from_the_moment(page, origin: str, hit: dict, shot: Path) -> None:
    """Search "a rocket" on the page, check the WebM clip's badge, click it, and wait
    (bounded) for its player to stand at the hit's moment."""
    from playwright.sync_api import expect

    page.fill("#q", "a rocket")
    page.keyboard.press("Enter")
    card = page.locator("#results .hit.video").filter(has_text="clip.webm")
    expect(card).to_be_visible(timeout=30_000)
    minutes, seconds = divmod(int(hit["time"]), 60)
    expect(card.locator(".badge")).to_have_text(f"▶ {minutes:02d}:{seconds:02d}")
    assert card.locator(".moment").count() == len(hit["moments"]) - 1
    page.wait_for_function(
        "() => [...document.querySelectorAll('#results img')]"
        ".every(i => i.complete && i.naturalWidth > 0)",
        timeout=15_000,
    )
    card.locator(".play").click()
    video = card.locator("video")
    expect(video).to_be_visible(timeout=10_000)
    page.wait_for_function(
        """([id, t]) => {
            const v = document.querySelector(`#results .hit[data-id="${id}"] video`);
            return v && v.readyState >= 2 && !v.seeking && Math.abs(v.currentTime - t) < 0.5;
        }""",
        arg=[hit["id"], hit["time"]],
        timeout=15_000,
    )
    assert abs(video.evaluate("v => v.currentTime") - hit["time"]) < 0.5
    assert video.evaluate("v => v.videoWidth") == 320
    page.screenshot(path=shot, full_page=True)


@pytest.mark.slow
def test_a_video_result_plays_from_its_moment_in_chromium(settings, client, ids, tmp_path):
    browser_or_skip()
    from playwright.sync_api import expect, sync_playwright

    hit = _results(client, "a rocket")["clip.webm"]
    assert CAT_UNTIL <= hit["time"] < END
    with live_server(create_app(settings), settings) as port, sync_playwright() as p:
        origin = f"http://127.0.0.1:{port}"
        browser = launch_chromium(p)
        page, errors = watched_page(browser)
        served: list[str] = []
        page.on(
            "response",
            lambda r: (
                served.append(r.headers.get("content-type", ""))
                if f"/v1/images/{ids['webm']}" in r.url
                else None
            ),
        )
        page.goto(origin + "/")
        _play_from_the_moment(page, origin, hit, tmp_path / "video-moment.png")
        assert served and set(served) == {"video/webm"}

        # "Similar" keeps "more like this": the MP4 of the same clip comes first
        page.locator("#results .hit.video").filter(has_text="clip.webm").locator(".similar").click()
        expect(page.locator("#results-title")).to_have_text("Similar to clip.webm")
        expect(page.locator("#results .hit .name").first).to_have_text("clip.mp4")
        browser.close()
    assert errors == []
    assert (tmp_path / "video-moment.png").stat().st_size > 10_000


@pytest.mark.slow
def test_with_a_token_the_video_is_fetched_with_it_and_plays(media, settings, client, tmp_path):
    browser_or_skip()
    from dataclasses import replace

    from playwright.sync_api import expect, sync_playwright

    hit = _results(client, "a rocket")["clip.webm"]
    guarded = replace(settings, token="s3cret-token")
    with live_server(create_app(guarded), guarded) as port, sync_playwright() as p:
        origin = f"http://127.0.0.1:{port}"
        browser = launch_chromium(p)
        page, errors = watched_page(browser)
        page.goto(origin + "/")
        expect(page.locator("#token-form")).to_be_visible()
        page.fill("#token", "s3cret-token")
        page.locator("#token-form button").click()
        _play_from_the_moment(page, origin, hit, tmp_path / "video-moment-token.png")
        src = page.locator("#results .hit.video video").first.evaluate("v => v.currentSrc")
        assert src.startswith("blob:")
        browser.close()
    assert errors == []


def test_frames_match_their_segments_in_the_clip_itself(media):
    """The fixture's clip is what the tests above assume: a cat, then a rocket."""
    from cliplens.video import frame_at

    early = np.asarray(frame_at(str(media["mp4"]), 1.0, 64), np.float32)
    late = np.asarray(frame_at(str(media["mp4"]), 6.0, 64), np.float32)
    assert np.abs(early - late).mean() > 20
