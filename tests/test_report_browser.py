"""The static report `retrieve search IMG --explain` writes, opened from disk in a real browser: its opacity
slider and show/hide toggle change the heat-map overlays, and it loads nothing but itself (file:// and data:
URLs). Screenshot: docs/report.png (refreshed with RETRIEVE_SCREENSHOTS=docs)."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from browsertools import DOCS, browser, computed, drag_slider  # noqa: F401
from clitools import run

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = ROOT / "data" / "samples"


@pytest.fixture(scope="module")
def report(tmp_path_factory, browser) -> Path:
    base = tmp_path_factory.mktemp("report")
    photos = base / "photos"
    photos.mkdir()
    for name in ("chelsea.png", "chelsea_crop_flipped.jpg", "coffee.png", "rocket.jpg"):
        shutil.copy(SAMPLES / name, photos / name)
    from indexer import index_paths

    index_paths([str(photos)], base / "index")
    run("search", str(photos / "chelsea.png"), "--index", str(base / "index"), "-k", "2", "--explain",
        "--out", str(base / "out"))  # the command itself, in-process (the browser is the slow part)
    return base / "out" / "report.html"


def test_report_controls_change_the_overlay_and_nothing_is_fetched(report, browser):
    page = browser.new_page(viewport={"width": 1200, "height": 900})
    requests = []

    def route(r):
        requests.append(r.request.url)
        if r.request.url.startswith(("file://", "data:")):
            r.continue_()
        else:
            r.abort()

    page.route("**/*", route)
    failed = []
    page.on("requestfailed", lambda r: failed.append(r.url))
    page.goto(report.as_uri())
    page.wait_for_load_state("load")
    assert requests and all(u.startswith(("file://", "data:")) for u in requests), requests
    assert not failed, failed
    first = "section:nth-of-type(1)"
    assert page.locator("section").count() == 2
    assert "score" in page.inner_text(f"{first} h2")
    heat = f"{first} img.heat"
    assert page.eval_on_selector(heat, "i => i.complete && i.naturalWidth > 0")
    before = float(computed(page, heat, "opacity"))
    assert before == pytest.approx(0.6, abs=0.01)
    drag_slider(page, f"{first} input.t-op", 0.1)
    after = float(computed(page, heat, "opacity"))
    assert after < 0.25 and after < before - 0.3  # the thumb's width shifts the value a little near the ends
    other = float(computed(page, "section:nth-of-type(2) img.heat", "opacity"))
    assert other == pytest.approx(0.6, abs=0.01)  # each pair has its own controls
    drag_slider(page, f"{first} input.t-op", 0.6)
    page.uncheck(f"{first} input.t-heat")
    assert computed(page, heat, "display") == "none"
    assert page.locator(heat).first.is_hidden()
    page.check(f"{first} input.t-heat")
    assert computed(page, heat, "display") != "none"
    if page.locator(f"{first} input.t-marks").count():
        page.check(f"{first} input.t-marks")
        assert computed(page, f"{first} svg.marks", "display") != "none"
    DOCS.mkdir(exist_ok=True)
    page.screenshot(path=str(DOCS / "report.png"), full_page=False)
    page.close()
