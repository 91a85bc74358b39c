"""retrieve serve in a real browser: start the command over the sample photos, upload a photo, wait for the grid,
open a pair page, move the opacity slider and flip the layers, and check what the page says. Screenshots go to
docs/serve-search.png and docs/serve-pair.png (README shows them; refreshed with RETRIEVE_SCREENSHOTS=docs)."""
from __future__ import annotations

import base64
import re
import shutil
from pathlib import Path

import pytest

pytest.importorskip("starlette", reason="the serve extra is not installed (pip install -e '.[serve]')")

from browsertools import DOCS, browser, computed, drag_slider  # noqa: E402,F401
from clitools import start_server, stop  # noqa: E402

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
    proc, url, token = start_server(base / "index", env={"XDG_CACHE_HOME": str(base / "cache")}, cwd=base)
    try:
        assert token, "retrieve serve printed no token"
        yield url, token
    finally:
        stop(proc)


def _open(browser, server, **kw):
    """A new page that opens the URL `retrieve serve` printed (token and all), as its user does."""
    url, token = server
    page = browser.new_page(**kw)
    csp = []  # the console reports each thing the Content-Security-Policy blocked
    page.on("console", lambda m: csp.append(m.text) if "Content Security Policy" in m.text else None)
    page.goto(f"{url}?token={token}")
    assert page.url == url  # the token left the address bar (and the history) at once
    return page, csp


def test_search_upload_then_audit_a_pair(server, browser):
    page, csp = _open(browser, server, viewport={"width": 1280, "height": 900})
    outside = []
    page.on("request", lambda r: None if r.url.startswith((server[0], "data:", "blob:")) else outside.append(r.url))
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))
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
    assert "score decomposes exactly" in page.inner_text("#explained")  # the maps are of the score above
    assert page.inner_text("#map-words").startswith("The default map (sfam), built on SFAM")  # what the maps are
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
        r = page.request.get(server[0].rstrip("/") + href)
        assert r.status == 200
    # the paper's map, one click away; a baseline says it is no decomposition of the score
    page.select_option("#method", "sfam-plain")
    page.wait_for_selector("body[data-ready='1']", timeout=120_000)
    assert page.inner_text("#map-words").startswith("The paper's map, SFAM")
    assert "the paper's map" in page.inner_text("#explained") and "method=sfam-plain" in page.url
    page.select_option("#method", "gradcam")
    page.wait_for_selector("body[data-ready='1']", timeout=120_000)
    said = page.inner_text("#explained") + page.inner_text("#map-words")
    assert "not a decomposition" in said and "exactly" not in said
    assert not outside, outside
    assert not errors, errors
    assert not dialogs, dialogs
    assert not csp, csp  # nothing inline, nothing the policy had to block
    page.close()


def test_non_image_upload_shows_a_clear_message(server, browser, tmp_path):
    page, _ = _open(browser, server)
    bad = tmp_path / "notes.jpg"
    bad.write_text("not a photo at all")
    page.set_input_files("#file", str(bad))
    page.wait_for_selector("#status.error")
    msg = page.inner_text("#status")
    assert "notes.jpg" in msg and "not a recognised image format" in msg
    page.close()


def test_without_the_token_the_page_says_how_to_get_in(server, browser):
    page = browser.new_page()
    r = page.goto(server[0])
    assert r.status == 403 and "open the URL that retrieve serve printed" in page.inner_text("body")
    page.close()


def test_the_served_report_runs_sandboxed(server, browser):
    """The report is one file with inline script: served with `sandbox`, its script runs (the slider moves the
    overlay) in an opaque origin that cannot read the user's cookie or call the API."""
    page, _ = _open(browser, server)
    url = server[0]
    ids = [i["id"] for i in page.request.get(url + "api/images?limit=3").json()["images"]]
    doc = page.request.get(url + f"api/explain?q={ids[0]}&r={ids[1]}").json()
    page.goto(url.rstrip("/") + doc["downloads"]["report"])
    page.wait_for_selector("img.heat")
    drag_slider(page, "input.t-op", 0.1)
    assert float(computed(page, "img.heat", "opacity")) < 0.3  # its own script runs
    assert page.evaluate("self.origin") == "null"
    assert page.evaluate("fetch('/api/health').then(r => r.status, e => 'blocked')") == "blocked"
    assert page.evaluate("(() => { try { return document.cookie; } catch (e) { return 'blocked'; } })()") \
        in ("", "blocked")
    page.close()
