"""clip-front, clip-retrieval's web front end, unmodified, against `serve --clip-retrieval`.

The built page ships inside the clip-retrieval wheel (front/build). It is served from a
static server on loopback, with its config.json pointing at this server, and opened in
headless Chromium as its users open it: `?back=http://127.0.0.1:PORT&index=NAME`. Type a
query, press Enter: the photos appear, the cat first for "a cat". The screenshot is kept
in the test's temp folder.

Needs Debian's chromium and Playwright's Python package (skipped with the reason where
they are missing, which CLIPLENS_NO_SKIPS=1, as CI sets, turns into a failure)."""

from __future__ import annotations

import functools
import http.server
import importlib.metadata
import json
import shutil
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from cliplens.catalog.db import Catalog
from cliplens.catalog.update import update_catalog
from cliplens.models.ref import ModelRef
from cliplens.server import ServerSettings, create_app
from tests_helpers import browser_or_skip, calm_policy, launch_chromium, live_server, watched_page


@contextmanager
def static_server(folder: Path) -> Iterator[str]:
    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

    handler = functools.partial(Quiet, directory=str(folder))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()


@pytest.mark.slow
def test_clip_front_searches_this_server_in_chromium(tmp_path, photos):
    browser_or_skip()
    from playwright.sync_api import sync_playwright

    build = Path(str(importlib.metadata.distribution("clip-retrieval").locate_file("front/build")))
    assert (build / "index.html").exists(), build
    front = tmp_path / "front"
    shutil.copytree(build, front)
    db = tmp_path / "photos.db"
    with Catalog(db) as cat:
        update_catalog(cat, ModelRef("offline"), [photos], workers=0)
        cat_id = cat.files_under([photos.resolve()])[str((photos / "cat.jpg").resolve())].id

    with static_server(front) as origin:
        # clip-front asks for the safety and violence filters: calm_policy says why this one
        policy = str(calm_policy(tmp_path))
        settings = ServerSettings(
            model="offline", db=db, clip_retrieval=True, cors_origins=(origin,), policy=policy
        )
        with live_server(create_app(settings), settings) as port:
            back = f"http://127.0.0.1:{port}"
            config = {"defaultBackend": back, "defaultIndex": "photos"}
            (front / "config.json").write_text(json.dumps(config))
            with sync_playwright() as p:
                browser = launch_chromium(p)
                page, errors = watched_page(browser)
                page.goto(f"{origin}/?back={back}&index=photos")
                page.locator("#searchBar").fill("a cat")
                page.locator("#searchBar").press("Enter")
                pics = page.locator("img.pic")
                pics.first.wait_for(timeout=30_000)
                # every result's image really loaded, from this server
                page.wait_for_function(
                    "() => { const s = document.querySelector('clip-front').shadowRoot;"
                    " const pics = [...s.querySelectorAll('img.pic')];"
                    " return pics.length > 0"
                    " && pics.every(i => i.complete && i.naturalWidth > 0) }",
                    timeout=30_000,
                )
                sources = [pics.nth(i).get_attribute("src") for i in range(pics.count())]
                page.screenshot(path=tmp_path / "clip-front-a-cat.png", full_page=True)
                browser.close()
    assert len(sources) == len(list(photos.iterdir()))
    assert sources[0] == f"{back}/v1/images/{cat_id}"
    assert all(s.startswith(f"{back}/v1/images/") for s in sources)
    assert errors == []
    print(f"screenshot in {tmp_path}")
