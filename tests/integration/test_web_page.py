"""The web page end to end in headless Chromium: a real server on a loopback port with the
offline model over scikit-image's photos, searching the catalog or a build-index folder of
the same photos. Type "a cat", see the cat first, click it, see similar photos; classify a
dropped photo. Screenshots are kept in the test's temp folder.

Needs Debian's chromium (/usr/bin/chromium) and Playwright's Python package. Where the
browser is missing the test is skipped with the reason, unless CLIPLENS_NO_SKIPS=1 (as CI
sets), which makes every skip a failure (tests/conftest.py)."""

from __future__ import annotations

import base64
import socket
import threading
import time
from pathlib import Path

import pytest

from tests_helpers import browser_or_skip, launch_chromium, watched_page


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def offline_catalog(tmp_path_factory, photos) -> Path:
    from cliplens.catalog.db import Catalog
    from cliplens.catalog.update import update_catalog
    from cliplens.models.ref import ModelRef

    db = tmp_path_factory.mktemp("web") / "catalog.db"
    with Catalog(db) as cat:
        update_catalog(cat, ModelRef("offline"), [photos], workers=0)
    return db


@pytest.fixture(scope="module", params=["catalog", "index"])
def live_server(request, tmp_path_factory, offline_catalog):
    import uvicorn

    from cliplens.server import ServerSettings, create_app
    from tests_helpers import built_index_from_catalog

    if request.param == "catalog":
        settings = ServerSettings(model="offline", db=offline_catalog)
    else:
        folder = tmp_path_factory.mktemp("web-index")
        index = built_index_from_catalog(folder, offline_catalog, "offline")
        settings = ServerSettings(index=index, db=folder / "no-catalog.db")
    app = create_app(settings)
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline, "the server did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(10)


@pytest.mark.slow
def test_search_click_similar_and_classify_in_chromium(live_server, photos, tmp_path):
    browser_or_skip()
    from playwright.sync_api import expect, sync_playwright

    with sync_playwright() as p:
        browser = launch_chromium(p)
        page, errors = watched_page(browser)
        page.goto(live_server + "/")
        expect(page.locator("#token-form")).to_be_hidden()  # this server has no token

        # type a sentence, press Enter: the cat comes first
        page.fill("#q", "a cat")
        page.keyboard.press("Enter")
        hits = page.locator("#results .hit")
        expect(hits.first).to_be_visible(timeout=30_000)
        expect(page.locator("#results-title")).to_have_text("Results for “a cat”")
        assert hits.first.locator(".name").inner_text() == "cat.jpg"
        assert hits.count() == 7
        # thumbnails really loaded
        page.wait_for_function(
            "() => [...document.querySelectorAll('#results img')]"
            ".every(i => i.complete && i.naturalWidth > 0)"
        )
        page.screenshot(path=tmp_path / "search-a-cat.png", full_page=True)

        # click it: photos similar to the cat, without the cat itself
        hits.first.click()
        expect(page.locator("#results-title")).to_have_text("Similar to cat.jpg", timeout=30_000)
        names = page.locator("#results .hit .name").all_inner_texts()
        assert len(names) == 6 and "cat.jpg" not in names
        page.screenshot(path=tmp_path / "similar-to-cat.png", full_page=True)

        # keyboard only: "/" focuses the box, Tab reaches a result, Enter opens its similar
        page.keyboard.press("/")
        assert page.evaluate("document.activeElement.id") == "q"
        page.fill("#q", "a rocket")
        page.keyboard.press("Enter")
        expect(page.locator("#results-title")).to_have_text("Results for “a rocket”")
        expect(hits.first.locator(".name")).to_have_text("rocket.jpg", timeout=30_000)
        hits.first.focus()
        page.keyboard.press("Enter")
        expect(page.locator("#results-title")).to_have_text("Similar to rocket.jpg")

        # drop a photo on the search zone: photos like it, itself first
        page.fill("#q", "")
        payload = base64.b64encode((photos / "motorcycle.jpg").read_bytes()).decode()
        drop = """([data, name]) => {
            const bytes = Uint8Array.from(atob(data), (c) => c.charCodeAt(0));
            const transfer = new DataTransfer();
            transfer.items.add(new File([bytes], name, { type: "image/jpeg" }));
            document.getElementById("drop").dispatchEvent(
                new DragEvent("drop", { dataTransfer: transfer, bubbles: true }));
        }"""
        page.evaluate(drop, [payload, "motorcycle.jpg"])
        title = page.locator("#results-title")
        expect(title).to_have_text("Photos like motorcycle.jpg", timeout=30_000)
        expect(hits.first.locator(".name")).to_have_text("motorcycle.jpg")

        # classify a photo given to the panel's file input (what a drop does)
        page.set_input_files("#classify-file", str(photos / "coffee.jpg"))
        first = page.locator("#classify-results li").first
        expect(first).to_contain_text("coffee", timeout=30_000)
        page.screenshot(path=tmp_path / "classify-coffee.png", full_page=True)
        browser.close()
    assert errors == []
    for shot in ("search-a-cat.png", "similar-to-cat.png", "classify-coffee.png"):
        assert (tmp_path / shot).stat().st_size > 10_000
    print(f"screenshots in {tmp_path}")


@pytest.mark.slow
def test_scrolling_loads_the_next_page_and_the_cut_off_applies_to_all(live_server, tmp_path):
    """Pages of 3 (`?n=3`) over the 7 photos: scrolling to "More" loads the next page, in
    the order of one long list; a cut-off shows only the photos scoring at least it."""
    browser_or_skip()
    import httpx
    from playwright.sync_api import expect, sync_playwright

    query = "a photo"
    whole = httpx.get(f"{live_server}/v1/search", params={"q": query, "n": 7}).json()["results"]
    assert len(whole) == 7
    with sync_playwright() as p:
        browser = launch_chromium(p)
        # short, so that "More" starts below the fold and only scrolling reaches it
        page, errors = watched_page(browser, height=360)
        page.goto(live_server + "/?n=3")
        page.fill("#q", query)
        page.keyboard.press("Enter")
        names = page.locator("#results .hit .name")
        expect(names).to_have_count(3, timeout=30_000)
        more = page.locator("#more")
        expect(more).to_be_visible()
        for count in (6, 7):
            more.scroll_into_view_if_needed()
            expect(names).to_have_count(count, timeout=30_000)
        expect(more).to_be_hidden()
        assert names.all_inner_texts() == [h["name"] for h in whole]
        scores = [float(s) for s in page.locator("#results .hit .score").all_inner_texts()]
        assert scores == sorted(scores, reverse=True)

        # a cut-off between the 3rd and the 4th score leaves the first 3, and no "More"
        cut = (whole[2]["score"] + whole[3]["score"]) / 2
        page.fill("#min-score", f"{cut:.6f}")
        page.locator("#min-score").dispatch_event("change")
        expect(names).to_have_count(3, timeout=30_000)
        expect(more).to_be_hidden()
        assert names.all_inner_texts() == [h["name"] for h in whole[:3]]
        page.screenshot(path=tmp_path / "cut-off.png", full_page=True)
        browser.close()
    assert errors == []
