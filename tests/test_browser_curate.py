"""The Duplicates and People pages in a real browser (Debian's Chromium, tests/browsertools.py), over `retrieve serve`
as its own process: the groups as rows of thumbnails with the keeper marked and each member's audit one click away;
the people as a grid of faces, a name typed under a face kept in the index, a person's photos with their face boxed
and the audit of a face against the person's representative face; on an index they do not apply to, one line.
Nothing inline, nothing from elsewhere. Screenshots: docs/duplicates.png and docs/people.png (README shows them;
refreshed with RETRIEVE_SCREENSHOTS=docs; people.png is a person's view: her photos, her face boxed in each).
"""
from __future__ import annotations

import pytest

pytest.importorskip("starlette", reason="the serve extra is not installed (pip install -e '.[serve]')")

from browsertools import DOCS, browser  # noqa: E402,F401
from clitools import run, start_server, stop  # noqa: E402
from test_web_curate import HAVE_FACES, face_set, needs_faces, photo_set  # noqa: E402


def _serve(base, *index_args):
    run("index", base / "photos", "--index", base / "idx", *index_args)
    proc, url, token = start_server(base / "idx", env={"XDG_CACHE_HOME": str(base / "cache")}, cwd=base)
    assert token, "retrieve serve printed no token"
    return proc, url, token


@pytest.fixture(scope="module")
def photos_server(tmp_path_factory, browser):
    base = tmp_path_factory.mktemp("browser_dups")
    photo_set(base / "photos")
    proc, url, token = _serve(base)
    try:
        yield url, token
    finally:
        stop(proc)


@pytest.fixture(scope="module")
def faces_server(tmp_path_factory, browser):
    if not HAVE_FACES:
        pytest.skip("faces extra not installed: pip install -e '.[faces]'")
    base = tmp_path_factory.mktemp("browser_people")
    face_set(base / "photos")
    proc, url, token = _serve(base, "--preset", "faces")
    try:
        yield url, token
    finally:
        stop(proc)


class Watched:
    """A page opened with the token, as its user does, recording what must not happen: a blocked inline script or
    style (the CSP), a script error, a dialog, a request to anywhere but this server."""

    def __init__(self, browser, server, path: str, **kw):
        url, token = server
        self.page = page = browser.new_page(**kw)
        self.csp, self.errors, self.outside = [], [], []
        page.on("console", lambda m: self.csp.append(m.text) if "Content Security Policy" in m.text else None)
        page.on("pageerror", lambda e: self.errors.append(str(e)))
        page.on("dialog", lambda d: (self.errors.append("dialog: " + d.message), d.dismiss()))
        page.on("request", lambda r: None if r.url.startswith((url, "data:", "blob:")) else self.outside.append(r.url))
        page.goto(f"{url}{path}{'&' if '?' in path else '?'}token={token}")
        assert "token=" not in page.url

    def ready(self, timeout: float = 240_000) -> None:
        self.page.wait_for_selector("body[data-ready='1']", timeout=timeout)

    def close(self) -> None:
        assert not self.csp, self.csp
        assert not self.errors, self.errors
        assert not self.outside, self.outside
        self.page.close()


def test_duplicates_page_shows_the_groups_and_opens_an_audit(photos_server, browser):
    w = Watched(browser, photos_server, "duplicates", viewport={"width": 1280, "height": 900})
    page = w.page
    w.ready()
    groups = page.locator("section.group")
    assert groups.count() >= 1
    assert "among 15 photos" in page.inner_text("#summary")
    exact = page.locator("section.group[data-tier='exact']")
    assert exact.count() == 1 and "exact copies" in exact.inner_text()
    assert sorted(exact.locator(".card .name").all_inner_texts()) == ["rocket copy.jpg", "rocket.jpg"]
    for i in range(groups.count()):  # one keeper per group, first, marked
        g = groups.nth(i)
        assert g.locator(".card.keeper").count() == 1 and "keeper" in g.locator(".card").first.inner_text()
        assert g.locator("a.card").count() == g.locator(".card").count() - 1  # every other member: its audit
    near = page.locator("section.group[data-tier='near'] a.card .evidence")
    assert near.count() >= 1 and all("pixels agree" in t for t in near.all_inner_texts())  # each copy's evidence
    page.wait_for_function("() => [...document.querySelectorAll('.group img')].every(i => i.complete && i.naturalWidth > 0)")
    DOCS.mkdir(exist_ok=True)
    page.screenshot(path=str(DOCS / "duplicates.png"), full_page=False)
    # a member's audit: the pair page, member against keeper, and back to the duplicates
    card = page.locator("section.group a.card").first
    name = card.locator(".name").inner_text()
    keeper = card.locator("xpath=..").locator(".card.keeper .name").inner_text()
    card.click()
    page.wait_for_url("**/pair?**")
    w.ready()
    title = page.inner_text("#title")
    assert name in title and keeper in title
    assert page.get_attribute("#back", "href") == "/duplicates"
    page.click("nav a[href='/duplicates']")
    w.ready()
    assert page.locator("section.group").count() == groups.count()
    # the similar-shots tier: a tick away, and in the address
    page.check("#similar")
    page.wait_for_function("() => location.search.includes('similar=1') && document.body.dataset.ready === '1'",
                           timeout=240_000)
    assert page.locator("section.group").count() >= 1
    w.close()


def test_people_page_says_why_it_is_empty_on_a_photo_index(photos_server, browser):
    w = Watched(browser, photos_server, "people")
    w.ready()
    assert w.page.locator("#status.note").count() == 1
    said = w.page.inner_text("#status")
    assert "faces index" in said and "--preset faces" in said and "\n" not in said
    assert w.page.locator("#people .card").count() == 0
    w.close()


@needs_faces
def test_people_page_names_a_person_and_audits_a_face(faces_server, browser):
    w = Watched(browser, faces_server, "people", viewport={"width": 1280, "height": 900})
    page = w.page
    w.ready()
    cards = page.locator("#people .card")
    assert cards.count() >= 1
    assert "people updated: 5 new faces" in page.inner_text("#status")  # a fresh index: its faces given people first
    her = cards.first  # most photos first: the astronaut
    assert "2 photos" in her.inner_text()
    page.wait_for_function("() => [...document.querySelectorAll('#people img')].every(i => i.complete && i.naturalWidth > 0)")
    # rename inline: type, Enter; kept after a reload
    box = her.locator("input.name-input")
    box.fill("Eileen Collins")
    box.press("Enter")
    page.wait_for_function("() => document.querySelector('#people .card .small').textContent === 'saved'")
    page.reload()
    w.ready()
    assert page.locator("#people .card").first.locator("input.name-input").input_value() == "Eileen Collins"
    # her photos: each with her face boxed
    page.locator("#people .card a.face-link").first.click()
    w.ready()
    assert page.inner_text("#who") == "Eileen Collins" and "?id=" in page.url
    assert page.locator("#photos .card").count() >= 4
    assert page.locator("#photos svg.boxes rect").count() == page.locator("#photos .card").count()
    assert page.locator("#photos .card.keeper").count() == 1  # the representative face
    page.wait_for_function("() => [...document.querySelectorAll('#one img')].every(i => i.complete && i.naturalWidth > 0)")
    DOCS.mkdir(exist_ok=True)
    page.screenshot(path=str(DOCS / "people.png"), clip={"x": 0, "y": 0, "width": 1280, "height": 600})
    # the pair audit from a face: that face against her representative face
    page.locator("#photos a.card").first.click()
    page.wait_for_url("**/pair?**")
    w.ready()
    assert "the same person" in page.inner_text("#verdict").lower()
    assert "face" in page.inner_text("#cap-q") and "face" in page.inner_text("#cap-r")
    page.go_back()
    w.ready()
    assert page.inner_text("#who") == "Eileen Collins"
    w.close()


@needs_faces
def test_duplicates_page_says_why_it_is_empty_on_a_faces_index(faces_server, browser):
    w = Watched(browser, faces_server, "duplicates")
    w.ready()
    said = w.page.inner_text("#status")
    assert "faces index" in said and "\n" not in said and w.page.locator("#status.note").count() == 1
    assert w.page.locator("section.group").count() == 0
    w.close()
