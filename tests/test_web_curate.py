"""The web app's Duplicates and People API over real sockets (`retrieve serve` as its own process): the groups are
`find_duplicates`' on the same index, computed once per index state and paged; the people are `retrieve people`'s,
each with a thumbnail of their face, their photos and the pair audit of each face against the person's
representative face; a name set through the guarded POST is the index's; what does not apply to the index is one
line. Photo index: data/samples plus an exact copy; faces index: as tests/test_faces.py makes one (skipped, one
line, without the faces extra).
"""
from __future__ import annotations

import importlib.util
import json
import shutil
import time
import urllib.parse
from pathlib import Path

import pytest
from clitools import run

pytest.importorskip("starlette", reason="the serve extra is not installed (pip install -e '.[serve]')")

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = ROOT / "data" / "samples"
HAVE_FACES = importlib.util.find_spec("dlib") is not None and importlib.util.find_spec("face_recognition_models") is not None
needs_faces = pytest.mark.skipif(not HAVE_FACES, reason="faces extra not installed: pip install -e '.[faces]'")


EDITED = {"chelsea small.jpg": "chelsea.png", "coffee mirrored.jpg": "coffee.png",
          "astronaut turned.jpg": "astronaut.png"}  # an edited copy → its original


def photo_set(photos: Path) -> None:
    """data/samples (among them a cropped, flipped cat and a cropped, darkened coffee), a byte-for-byte copy of the
    rocket and three edited copies (:data:`EDITED`: resized and recompressed, mirrored, turned by 90° and
    brightened): the exact copy and the edited copies are the groups to find."""
    from PIL import Image, ImageEnhance, ImageOps

    shutil.copytree(SAMPLES, photos)
    (photos / "CREDITS.md").unlink()
    shutil.copy(SAMPLES / "rocket.jpg", photos / "rocket copy.jpg")
    cat = Image.open(SAMPLES / "chelsea.png").convert("RGB")
    cat.resize((cat.width * 6 // 10, cat.height * 6 // 10)).save(photos / "chelsea small.jpg", quality=70)
    ImageOps.mirror(Image.open(SAMPLES / "coffee.png").convert("RGB")).save(photos / "coffee mirrored.jpg", quality=85)
    turned = Image.open(SAMPLES / "astronaut.png").convert("RGB").rotate(90, expand=True)
    ImageEnhance.Brightness(turned).enhance(1.2).save(photos / "astronaut turned.jpg", quality=85)


def face_set(photos: Path) -> None:
    """tests/test_faces.py's photos: the astronaut, a group photo of her face three times, the coffee (no face)."""
    from conftest import skimage_photo
    from test_faces import _group

    photos.mkdir()
    astronaut, coffee = skimage_photo("astronaut"), skimage_photo("coffee")
    astronaut.save(photos / "astronaut.png")
    _group(astronaut, coffee).save(photos / "group.png")
    coffee.save(photos / "coffee.png")


@pytest.fixture(scope="module")
def photos_served(tmp_path_factory):
    from servetools import Served

    base = tmp_path_factory.mktemp("curate_photos")
    photo_set(base / "photos")
    idx = base / "idx"
    run("index", base / "photos", "--index", idx)
    server = Served(idx, base, env={"XDG_CACHE_HOME": str(base / "cache")})
    yield server, base / "photos", idx
    server.stop()


@pytest.fixture(scope="module")
def faces_served(tmp_path_factory):
    if not HAVE_FACES:
        pytest.skip("faces extra not installed: pip install -e '.[faces]'")
    from servetools import Served

    base = tmp_path_factory.mktemp("curate_faces")
    face_set(base / "photos")
    idx = base / "idx"
    run("index", base / "photos", "--index", idx, "--preset", "faces")
    server = Served(idx, base, env={"XDG_CACHE_HOME": str(base / "cache")})
    yield server, base / "photos", idx
    server.stop()


def groups(server, query: str = "", timeout: float = 240) -> tuple[int, dict]:
    """GET /api/duplicates, asking again while it answers 202 (still finding them), as the page does."""
    deadline = time.monotonic() + timeout
    while True:
        status, d = server.json("api/duplicates" + (f"?{query}" if query else ""))
        if status != 202 or time.monotonic() > deadline:
            return status, d
        assert d["status"] in ("computing", "waiting") and 0 <= d["done"], d
        time.sleep(0.5)


def _same_groups(web: dict, want: dict) -> None:
    assert [(g["id"], g["tier"], [m["row_id"] for m in g["members"]]) for g in web["groups"]] == \
        [(g["id"], g["tier"], [m["row_id"] for m in g["members"]]) for g in want["groups"]]
    for wg, g in zip(web["groups"], want["groups"]):
        for wm, m in zip(wg["members"], g["members"]):
            assert {k: wm[k] for k in m} == m  # every field of find_duplicates' JSON, unchanged


def test_duplicates_are_find_duplicates_with_thumbnails_and_audits(photos_served):
    from retrieval.curate.duplicates import find_duplicates
    from retrieval.index.store import IndexStore

    server, _, idx = photos_served
    status, web = groups(server)
    assert status == 200, web
    with IndexStore.open(idx) as store:
        want = find_duplicates(store).to_dict()
    assert web["photos"] == want["photos"] == 15 and web["total_groups"] == len(want["groups"])
    _same_groups(web, want)
    # the made answers: the byte-for-byte copy is an exact group of two, each edited copy is in its original's
    # near-duplicate group, with its original the keeper (larger, or as large and older)
    exact = [g for g in web["groups"] if g["tier"] == "exact"]
    assert len(exact) == 1 and sorted(Path(m["path"]).name for m in exact[0]["members"]) == ["rocket copy.jpg",
                                                                                          "rocket.jpg"]
    near = {Path(m["path"]).name: g for g in web["groups"] if g["tier"] == "near" for m in g["members"]}
    for copy, original in EDITED.items():
        assert copy in near and near[copy] is near.get(original), copy
        assert Path(near[copy]["members"][0]["path"]).name == original
    for g in web["groups"]:
        keeper = g["members"][0]
        assert keeper["keeper"] and "pair" not in keeper and sum(m["keeper"] for m in g["members"]) == 1
        for m in g["members"]:
            status, body = server.request(m["thumb"])
            assert status == 200 and body[:2] == b"\xff\xd8"  # a JPEG
        for m in g["members"][1:]:
            q = urllib.parse.parse_qs(urllib.parse.urlsplit(m["pair"]).query)
            assert (q["q"], q["r"], q["from"]) == ([str(m["row_id"])], [str(keeper["row_id"])], ["duplicates"])
    # the audit a member links to answers: the member against its keeper
    m = next(m for g in web["groups"] for m in g["members"][1:])
    status, doc = server.json("api/explain?" + urllib.parse.urlsplit(m["pair"]).query)
    assert status == 200, doc
    assert doc["shown"]["query"]["id"] == m["row_id"] and doc["shown"]["result"]["path"] == \
        next(g for g in web["groups"] if m in g["members"])["members"][0]["path"]


def test_duplicates_are_found_once_per_index_state_and_paged(photos_served, tmp_path):
    server, photos, idx = photos_served
    status, first = groups(server)
    t0 = time.monotonic()
    status, again = groups(server)
    assert status == 200 and again["seconds"] == first["seconds"]  # the kept answer, not a new computation
    assert time.monotonic() - t0 < 5
    status, page = groups(server, "limit=1&offset=1")
    assert status == 200 and page["groups"] == first["groups"][1:2] and page["total_groups"] == first["total_groups"]
    assert page["more"] == (first["total_groups"] > 2)
    for query, word in (("limit=0", "limit"), ("limit=201", "limit"), ("offset=-1", "offset"), ("offset=x", "offset"),
                        ("wait=3", "wait"), ("wait=x", "wait")):
        status, d = server.json(f"api/duplicates?{query}")
        assert status == 400 and word in d["error"] and "\n" not in d["error"], (query, d)
    # the similar-shots tier: its own computation, at least the near and exact groups
    status, sim = groups(server, "similar=1")
    assert status == 200 and sim["similar"] and sim["total_groups"] >= first["total_groups"]
    # a new indexing run: the next request finds the groups of the new state, in the background (asked not to
    # wait, it answers at once with the progress)
    shutil.copy(photos / "coffee.png", photos / "coffee again.png")
    run("index", photos, "--index", idx)
    status, d = server.json("api/duplicates?wait=0")
    assert status == 202 and d["status"] in ("computing", "waiting") and not d["similar"], d
    status, new = groups(server)
    assert status == 200 and new["photos"] == first["photos"] + 1
    assert any(g["tier"] == "exact" and {Path(m["path"]).name for m in g["members"]} == {"coffee.png", "coffee again.png"}
               for g in new["groups"])


def test_people_do_not_apply_to_a_photo_index(photos_served):
    server, _, _ = photos_served
    for path in ("api/people", "api/people/1"):
        status, d = server.json(path)
        assert status == 400 and "faces index" in d["error"] and "\n" not in d["error"], d
    status, d = server.json("api/people/1/name", json.dumps({"name": "Alice"}).encode(),
                            {"Content-Type": "application/json"})
    assert status == 400 and "faces index" in d["error"], d


def test_the_pages_are_served_under_the_policy(photos_served):
    server, _, _ = photos_served
    for path in ("duplicates", "people", "static/duplicates.js", "static/people.js"):
        status, body = server.request(path)
        assert status == 200 and body, path
    for page in ("duplicates", "people"):
        status, body = server.request(page)
        assert f'<script src="/static/{page}.js"></script>'.encode() in body and b"<script>" not in body
        assert b"style=" not in body
    # every new route is behind the guard: no token, no answer
    token, server.token = server.token, None
    try:
        for path in ("duplicates", "people", "api/duplicates", "api/people", "api/people/1", "thumb/1?face=1"):
            status, body = server.request(path)
            assert status == 403 and b"no token" in body, path
    finally:
        server.token = token


@needs_faces
def test_duplicates_do_not_apply_to_a_faces_index(faces_served):
    server, _, _ = faces_served
    status, d = groups(server)
    assert status == 400 and "faces index" in d["error"] and "\n" not in d["error"], d


@needs_faces
def test_people_are_retrieve_peoples_with_their_faces_and_audits(faces_served):
    import io

    from PIL import Image

    from retrieval.curate import people as P
    from retrieval.index.store import IndexStore

    server, _, idx = faces_served
    status, d = server.json("api/people")
    assert status == 200, d
    assert d["updated"] and d["updated"]["new_people"] >= 1  # a fresh index: its faces were given people first
    status, d = server.json("api/people")
    assert status == 200 and d["updated"] is None, d  # then nothing is left to do
    with IndexStore.open(idx) as store:
        want = P.list_people(store)
        assert [{k: p[k] for k in ("id", "name", "photos", "faces")} for p in d["people"]] == \
            [{k: v for k, v in p.to_dict().items() if k != "face"} for p in want]  # = retrieve people --json
        assert [{k: p["face"][k] for k in ("id", "path", "box")} for p in d["people"]] == [p.to_dict()["face"] for p in want]
        rows = store.face_rows([p.face[0] for p in want])
    # the astronaut: her own photo and the three faces of the group photo, one person
    her = max(d["people"], key=lambda p: p["faces"])
    assert her["faces"] >= 4 and her["photos"] == 2
    # a person's tile is their face, cropped from the photo (its box and a margin)
    status, body = server.request(her["face"]["thumb"])
    assert status == 200, body
    tile = Image.open(io.BytesIO(body))
    x0, y0, x1, y1 = her["face"]["box"]
    row = rows[her["face"]["id"]]
    assert max(tile.size) < max(row.width, row.height) / 2 and abs(tile.size[0] / tile.size[1] - (x1 - x0) / (y1 - y0)) < 0.2
    # their faces: retrieve people show's, each face with its box and the audit against the representative face
    status, one = server.json(f"api/people/{her['id']}")
    assert status == 200, one
    with IndexStore.open(idx) as store:
        want = P.faces_of(store, her["id"])
        assert [{k: f[k] for k in w} for f, w in zip(one["faces"], want)] == want  # = retrieve people show --json
        assert one["person"]["id"] == her["id"] and len(one["faces"]) == her["faces"]
    assert sum(f["representative"] for f in one["faces"]) == 1
    face = next(f for f in one["faces"] if not f["representative"])
    q = urllib.parse.parse_qs(urllib.parse.urlsplit(face["pair"]).query)
    assert q["q"] == [str(face["id"])] and q["r"] == [str(her["face"]["id"])]
    status, doc = server.json("api/explain?" + urllib.parse.urlencode({"q": q["q"][0], "r": q["r"][0]}))
    assert status == 200, doc
    assert (doc["face_a"], doc["face_b"]) == (face["face"], rows[her["face"]["id"]].face)  # that face pair
    assert doc["verdict"]["headline"] == "the same person"
    for path in ("api/people/999999", "api/people/x", "api/people/0"):
        status, d = server.json(path)
        assert status in (400, 404) and "\n" not in d["error"], (path, d)


@needs_faces
def test_naming_a_person_is_guarded_and_kept_in_the_index(faces_served):
    from retrieval.curate import people as P
    from retrieval.index.lock import WriterLock
    from retrieval.index.store import IndexStore

    server, photos, idx = faces_served
    status, listed = server.json("api/people")
    pid = max(listed["people"], key=lambda p: p["faces"])["id"]
    url = f"api/people/{pid}/name"
    as_json = {"Content-Type": "application/json"}
    status, p = server.json(url, json.dumps({"name": "Eileen Collins"}).encode(), as_json)
    assert status == 200 and p["name"] == "Eileen Collins", p
    with IndexStore.open(idx) as store:
        assert P.person_named(store, "Eileen Collins").id == pid
    status, d = server.json("api/people")
    assert next(p for p in d["people"] if p["id"] == pid)["name"] == "Eileen Collins"
    # from another site, or without the token: refused before the handler
    status, d = server.json(url, b'{"name": "Mallory"}', {**as_json, "Origin": "http://evil.example"})
    assert status == 403, d
    token, server.token = server.token, None
    try:
        status, d = server.json(url, b'{"name": "Mallory"}', as_json)
        assert status == 403, d
    finally:
        server.token = token
    # bad bodies: one line each
    for body, headers, code in ((b"name=Mallory", {"Content-Type": "application/x-www-form-urlencoded"}, 400),
                                (b"{", as_json, 400), (b'{"name": 3}', as_json, 400),
                                (json.dumps({"name": "a" * 201}).encode(), as_json, 400),
                                (json.dumps({"name": "a\x00b"}).encode(), as_json, 400),
                                (b'{"name": "  "}', as_json, 400), (b'{"name": "42"}', as_json, 400),
                                (json.dumps({"name": "a" * 5000}).encode(), as_json, 413)):
        status, d = server.json(url, body, headers)
        assert status == code and "\n" not in d["error"], (body[:30], d)
    # while another retrieve writes the index: a 409 that says so, and nothing changes
    lock = WriterLock(idx)
    lock.acquire("test")
    try:
        status, d = server.json(url, b'{"name": "Mallory"}', as_json)
        assert status == 409 and "being written" in d["error"], d
    finally:
        lock.release()
    with IndexStore.open(idx) as store:
        assert P.person_named(store, str(pid)).name == "Eileen Collins"
    # names are unique: another person under the same name is a one-line 400 that says how to merge them
    others = [p for p in listed["people"] if p["id"] != pid]
    if others:
        status, e = server.json(f"api/people/{others[0]['id']}/name", b'{"name": "eileen collins"}', as_json)
        assert status == 400 and "merge" in e["error"] and "\n" not in e["error"], e
    status, e = server.json("api/people/999999/name", b'{"name": "Nobody"}', as_json)
    assert status == 404, e
    # a new photo of her: its two faces (hers, and the detection on her suit's badge) wait for a person; while another retrieve writes the index the page says so
    # and shows the people as they were, then her face joins her, name and all
    shutil.copy(photos / "astronaut.png", photos / "astronaut again.png")
    run("index", photos, "--index", idx, "--preset", "faces")
    lock = WriterLock(idx)
    lock.acquire("test")
    try:
        status, d = server.json("api/people")
        assert status == 200 and d["updated"]["waiting"] == 2 and "being written" in d["updated"]["locked"], d
        assert next(p for p in d["people"] if p["id"] == pid)["photos"] == 2
    finally:
        lock.release()
    status, d = server.json("api/people")
    assert status == 200 and d["updated"]["faces"] == 2 and d["updated"]["joined"] == 2, d
    assert next(p for p in d["people"] if p["id"] == pid) | {"face": None} == \
        {"id": pid, "name": "Eileen Collins", "photos": 3, "faces": 5, "face": None, "url": f"/people?id={pid}"}
