"""retrieve serve in a real browser: start the command over the sample photos, upload a photo, wait for the grid,
open a pair page, move the opacity slider and flip the layers, and check what the page says. Screenshots go to
docs/serve-search.png and docs/serve-pair.png (README shows them; refreshed with RETRIEVE_SCREENSHOTS=docs)."""
from __future__ import annotations

import base64
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest

pytest.importorskip("starlette", reason="the serve extra is not installed (pip install -e '.[serve]')")

from browsertools import DOCS, browser, computed, drag_slider  # noqa: E402,F401
from clitools import entry_point, stop  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = ROOT / "data" / "samples"
EVIL = "<img src=x onerror=alert(1)>.png"


@pytest.fixture(scope="module")
def server(tmp_path_factory, browser):
    """`retrieve serve` as its own process on a free port, over an index of data/samples."""
    from indexer import index_paths

    base = tmp_path_factory.mktemp("browser")
    photos = base / "photos"
    shutil.copytree(SAMPLES, photos)
    shutil.copy(SAMPLES / "coins.png", photos / EVIL)  # a file name that is HTML: it must stay text
    index_paths([str(photos)], base / "index")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "XDG_CACHE_HOME": str(base / "cache")}
    proc = subprocess.Popen(entry_point() + ["serve", "--index", str(base / "index"), "--port", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=base)
    try:
        url = None
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            m = re.search(r"at (http://127\.0\.0\.1:\d+/)", line)
            if m:
                url = m.group(1)
                break
        assert url, f"retrieve serve printed no URL: {proc.stderr.read() if proc.poll() is not None else ''}"
        yield url
    finally:
        stop(proc)


def test_search_upload_then_audit_a_pair(server, browser):
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    outside = []
    page.on("request", lambda r: None if r.url.startswith((server, "data:", "blob:")) else outside.append(r.url))
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(server)
    dialogs = []
    page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
    page.wait_for_selector("#collection .card")
    assert "12 photos" in page.inner_text("#info")
    assert EVIL in page.inner_text("#collection")  # shown as text, not run
    assert page.locator("#collection img[src='x']").count() == 0
    # drop a photo on the drop zone, as from a file manager
    b64 = base64.b64encode((SAMPLES / "chelsea_crop_flipped.jpg").read_bytes()).decode()
    dt = page.evaluate_handle("""(b64) => {
        const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
        const dt = new DataTransfer();
        dt.items.add(new File([bytes], "chelsea_crop_flipped.jpg", {type: "image/jpeg"}));
        return dt;
    }""", b64)
    page.dispatch_event("#drop", "dragover", {"dataTransfer": dt})
    page.dispatch_event("#drop", "drop", {"dataTransfer": dt})
    page.wait_for_selector("#results .card", timeout=120_000)
    cards = page.locator("#results .card")
    assert cards.count() == 10
    first = cards.first.inner_text()
    assert "chelsea_crop_flipped.jpg" in first and "score 1.0000" in first  # the upload's twin in the index
    second = cards.nth(1).inner_text()
    assert "chelsea.png" in second and re.search(r"score 0\.\d{4}", second)
    assert page.eval_on_selector("#results .card img", "i => i.complete && i.naturalWidth > 0")
    # paging, then back
    page.click("#next")
    page.wait_for_function("() => document.querySelector('#results .card .score').textContent.startsWith('#11')")
    page.click("#prev")
    page.wait_for_function("() => document.querySelector('#results .card .score').textContent.startsWith('#1 ')")
    DOCS.mkdir(exist_ok=True)
    page.screenshot(path=str(DOCS / "serve-search.png"), full_page=False)

    # the pair page of the second result (the uncropped cat)
    page.locator("#results .card").nth(1).click()
    page.wait_for_url("**/pair?**")
    page.wait_for_selector("body[data-ready='1']", timeout=120_000)
    title = page.inner_text("#title")
    assert "chelsea.png" in title and "uploaded photo" in title
    assert page.inner_text("#score").startswith("score 0.")
    assert "random pairs in this collection" in page.inner_text("#verdict")
    assert "heat maps draw this score" in page.inner_text("#explained")  # the maps are of the score above
    for sel in ("#photo-q", "#photo-r", "#heat-q", "#heat-r"):
        page.wait_for_function(f"() => document.querySelector('{sel}').complete && "
                               f"document.querySelector('{sel}').naturalWidth > 0")
    assert float(computed(page, "#heat-q", "opacity")) == pytest.approx(0.6, abs=0.01)
    # move the opacity slider: the overlays follow
    drag_slider(page, "#opacity", 0.15)
    op = float(computed(page, "#heat-r", "opacity"))
    assert 0 < op < 0.3  # about 0.15 (the thumb's width shifts it a little near the ends)
    assert float(computed(page, "#heat-q", "opacity")) == pytest.approx(op)
    # region pairs: a layer that is off until ticked
    assert computed(page, "svg.regions", "display") == "none"
    page.check("#show-regions")
    assert computed(page, "svg.regions", "display") != "none"
    assert page.locator("#stack-q svg.regions rect").count() >= 1
    assert page.locator("#regions tr").count() >= 2
    # the channel table is folded
    assert not page.locator("#channels").is_visible()
    page.click("#channels-summary")
    assert page.locator("#channels").is_visible()
    # verification: the inlier layer
    page.check("#verify")
    page.wait_for_selector("body[data-ready='1']", timeout=120_000)
    assert "inliers" in page.inner_text("#inliers-note")
    page.check("#show-inliers")
    assert computed(page, "svg.inliers", "display") != "none"
    drag_slider(page, "#opacity", 0.6)
    page.screenshot(path=str(DOCS / "serve-pair.png"), full_page=True)
    # hide the heat maps
    page.uncheck("#show-heat")
    assert computed(page, "#heat-q", "display") == "none"
    # the downloads answer
    for sel in ("#dl-json", "#dl-report"):
        href = page.get_attribute(sel, "href")
        r = page.request.get(server.rstrip("/") + href)
        assert r.status == 200
    assert not outside, outside
    assert not errors, errors
    assert not dialogs, dialogs
    page.close()


def test_non_image_upload_shows_a_clear_message(server, browser, tmp_path):
    page = browser.new_page()
    page.goto(server)
    bad = tmp_path / "notes.jpg"
    bad.write_text("not a photo at all")
    page.set_input_files("#file", str(bad))
    page.wait_for_selector("#status.error")
    msg = page.inner_text("#status")
    assert "notes.jpg" in msg and "not a recognised image format" in msg
    page.close()
