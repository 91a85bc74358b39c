"""`retrieve serve --index FACES` answers as `retrieve search --json` does on that index, over a real socket: one
result per face with its box, the same scores and the same verdicts, for an uploaded photo that is itself in the
index, a photo of several faces and an indexed face's tile; what does not apply to faces is a one-line 400.

Skipped (one line) without the faces extra. Photos as tests/test_faces.py makes them: scikit-image's astronaut, a
group photo of her face pasted three times onto the coffee photo, and the coffee photo (no face).
"""
from __future__ import annotations

import importlib.util
import sqlite3
import urllib.parse
from pathlib import Path

import pytest

from clitools import run, run_json

HAVE_FACES = importlib.util.find_spec("dlib") is not None and importlib.util.find_spec("face_recognition_models") is not None
pytestmark = [pytest.mark.skipif(not HAVE_FACES, reason="faces extra not installed: pip install -e '.[faces]'"),
              pytest.mark.filterwarnings("ignore::DeprecationWarning")]
pytest.importorskip("starlette", reason="the serve extra is not installed (pip install -e '.[serve]')")


@pytest.fixture(scope="module")
def faces_served(tmp_path_factory):
    from conftest import skimage_photo
    from servetools import Served
    from test_faces import _group

    base = tmp_path_factory.mktemp("serve_faces")
    photos = base / "photos"
    photos.mkdir()
    astronaut, coffee = skimage_photo("astronaut"), skimage_photo("coffee")
    astronaut.save(photos / "astronaut.png")
    _group(astronaut, coffee).save(photos / "group.png")
    coffee.save(photos / "coffee.png")
    idx = base / "idx"
    run("index", photos, "--index", idx, "--preset", "faces")
    server = Served(idx, base)
    yield server, photos, idx, base
    server.stop()


def _same_answer(web: dict, cli: dict) -> None:
    """Paths, face numbers, boxes, scores (4 decimals) and verdicts of every result, and the query's face."""
    assert web.get("error") is None and cli.get("error") is None
    assert (web["face"], web["box"], web["faces_in_query"]) == (cli["face"], cli["box"], cli["faces_in_query"])
    assert len(web["results"]) == len(cli["results"]) > 0
    for w, c in zip(web["results"], cli["results"]):
        assert (w["rank"], w["id"], w["path"], w["face"], w["box"]) == (c["rank"], c["id"], c["path"], c["face"],
                                                                          c["box"])
        assert round(w["score"], 4) == round(c["score"], 4)
        assert w["verdict"] == c["verdict"]


def test_an_uploaded_photo_in_the_index_gets_the_clis_answer(faces_served):
    """The issue's case: a photo that is itself in the faces index, uploaded, finds itself first (score 1, "the
    same person"), then the rest as the CLI ranks them (an upload is not a row of the index: as --include-self)."""
    server, photos, idx, _ = faces_served
    for name in ("astronaut.png", "group.png"):
        status, web = server.upload("api/search?k=10", photos / name)
        assert status == 200, web
        cli = run_json("search", photos / name, "--index", idx, "-k", "10", "--include-self")
        _same_answer(web, cli)
        own = [h for h in web["results"] if h["path"] == str(photos / name) and h["face"] == web["face"]]
        assert own and own[0]["score"] == pytest.approx(1.0, abs=1e-4)
        assert own[0]["verdict"]["headline"] == "the same person"
    # the astronaut's face in the group photo: three faces, each the same person as the astronaut's own photo
    status, web = server.upload("api/search?k=10", photos / "astronaut.png")
    group = [h for h in web["results"] if h["path"] == str(photos / "group.png")]
    assert sorted(h["face"] for h in group) == [0, 1, 2]
    assert all(h["verdict"]["headline"] == "the same person" for h in group)


def test_an_indexed_face_is_searched_as_the_cli_searches_that_face(faces_served):
    """A face tile (a row id) is the query `retrieve search PHOTO --face N` makes: that face, itself left out."""
    server, photos, idx, _ = faces_served
    with sqlite3.connect(idx / "index.db") as con:
        rows = {(p, f): i for i, p, f in con.execute("SELECT id, path, face FROM images")}
    group = str(photos / "group.png")
    for face in (0, 1, 2):
        status, web = server.json(f"api/search?q={rows[group, face]}&k=10")
        assert status == 200, web
        cli = run_json("search", group, "--index", idx, "-k", "10", "--face", str(face))
        _same_answer(web, cli)
        assert rows[group, face] not in [h["id"] for h in web["results"]]
    # its explanation has the score that ranked the pair
    a, b = rows[group, 1], rows[str(photos / "astronaut.png"), 0]
    status, found = server.json(f"api/search?q={a}&k=10")
    hit = next(h for h in found["results"] if h["id"] == b)
    status, doc = server.json("api/explain?" + urllib.parse.urlencode({"q": a, "r": b}))
    assert status == 200, doc
    assert round(doc["score"], 4) == round(hit["score"], 4) and doc["verdict"]["headline"] == "the same person"


def test_what_does_not_apply_to_faces_is_one_line(faces_served):
    server, photos, idx, _ = faces_served
    with sqlite3.connect(idx / "index.db") as con:
        one = con.execute("SELECT id FROM images LIMIT 1").fetchone()[0]
    for query in (f"q={one}&qe=2", f"q={one}&verify=10"):
        status, d = server.json(f"api/search?{query}")
        assert status == 400 and "faces index" in d["error"] and "\n" not in d["error"], d
    status, d = server.json(f"api/search?q={one}&qe=0&verify=0")  # what the search page sends by default
    assert status == 200, d
    status, d = server.upload("api/search", photos / "coffee.png")
    assert status == 400 and "no face found" in d["error"] and "\n" not in d["error"], d
    status, d = server.json(f"api/explain?q={one}&r={one}&verify=1")
    assert status == 400 and "faces index" in d["error"], d


def test_the_served_faces_match_the_index_rows(faces_served):
    """/api/images lists one tile per face (the rows the search answers with)."""
    server, photos, idx, _ = faces_served
    status, d = server.json("api/images?limit=100")
    with sqlite3.connect(idx / "index.db") as con:
        n = con.execute("SELECT count(*) FROM images").fetchone()[0]
    assert status == 200 and d["total"] == n == len(d["images"])
    assert Path(photos / "group.png").as_posix() in {i["path"] for i in d["images"]}
