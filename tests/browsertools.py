"""A real browser for the tests: Debian's Chromium driven by the Python ``playwright`` package (never a browser
download). Missing either, the browser tests skip with one line saying what to install."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic"]
# Screenshots go to a temporary folder, so that running the tests never changes tracked files; with
# RETRIEVE_SCREENSHOTS=docs they refresh the pictures README shows (docs/*.png).
_DOCS = Path(__file__).resolve().parent.parent / "docs"
DOCS = _DOCS if os.environ.get("RETRIEVE_SCREENSHOTS") == "docs" else Path(os.environ.get("TMPDIR", "/tmp")) / "retrieve-screenshots"
DOCS.mkdir(parents=True, exist_ok=True)


def chromium_path() -> str | None:
    for p in (os.environ.get("RETRIEVE_CHROMIUM"), "/usr/bin/chromium", shutil.which("chromium"),
              shutil.which("chromium-browser")):
        if p and os.path.exists(p):
            return p
    return None


@pytest.fixture(scope="module")
def browser():
    """One headless Chromium for a test module."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("browser test: the playwright package is missing (pip install -e '.[test]')")
    exe = chromium_path()
    if exe is None:
        pytest.skip("browser test: no Chromium (apt-get install chromium, or set RETRIEVE_CHROMIUM)")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=exe, args=CHROMIUM_ARGS)
        try:
            yield b
        finally:
            b.close()


def computed(page, selector: str, prop: str) -> str:
    return page.eval_on_selector(selector, f"e => getComputedStyle(e).{prop}")


def drag_slider(page, selector: str, fraction: float) -> None:
    """Move a range input as a person does: press on its track at ``fraction`` of its width."""
    box = page.locator(selector).first.bounding_box()
    page.mouse.click(box["x"] + box["width"] * fraction, box["y"] + box["height"] / 2)
