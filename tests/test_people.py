"""`retrieve people` and `retrieve search --person` over a faces index, through the CLI: people found with their
counts, named, merged and split by hand, names kept across a re-index (SQLite and PostgreSQL), an index made
before the people tables read as "no people yet", and the errors.

Faces are made here as tests/test_faces.py makes its group photo: faces pasted onto scikit-image's photos. Four
people: four faces of scikit-image's LFW subset (25 px faces, enlarged; each pair scores below 0.3 on the index's
score, each copy of one above 0.85), pasted mirrored, scaled and brightened onto different backgrounds; a group
photo holds three of them. Skipped (one line) without the faces extra, except the errors on a non-faces index.
"""
from __future__ import annotations

import importlib.util
import json
import shlex
import shutil
import sqlite3
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageEnhance

from clitools import run, run_process

HAVE_FACES = importlib.util.find_spec("dlib") is not None and importlib.util.find_spec("face_recognition_models") is not None
needs_faces = pytest.mark.skipif(not HAVE_FACES, reason="faces extra not installed: pip install -e '.[faces]'")

A, B, C, D = 15, 74, 85, 93  # LFW subset faces (skimage.data.lfw_subset()[i]) of four different people
PEOPLE = {"A": {"a1.png", "a2.png", "a3.png", "group.png"}, "B": {"b1.png", "b2.png", "group.png"},
          "C": {"c1.png"}, "D": {"group.png"}}


def _face(i: int, side: int, mirror: bool = False, bright: float = 1.0) -> Image.Image:
    import skimage.data

    im = Image.fromarray((skimage.data.lfw_subset()[i] * 255).astype(np.uint8)).convert("RGB")
    im = im.resize((side, side), Image.BICUBIC)
    return ImageEnhance.Brightness(im.transpose(Image.FLIP_LEFT_RIGHT) if mirror else im).enhance(bright)


def _photo(spots, background: str = "coffee", size=(360, 300)) -> Image.Image:
    from conftest import skimage_photo

    base = skimage_photo(background).resize(size)
    for face, at in spots:
        base.paste(face, at)
    return base


def make_photos(d: Path) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    _photo([(_face(A, 150), (100, 70))]).save(d / "a1.png")
    _photo([(_face(A, 170, mirror=True), (90, 60))], "chelsea").save(d / "a2.png")
    _photo([(_face(A, 140, bright=1.2), (60, 80))], "rocket").save(d / "a3.png")
    _photo([(_face(B, 150), (110, 70))]).save(d / "b1.png")
    _photo([(_face(B, 160, mirror=True), (40, 50))], "chelsea").save(d / "b2.png")
    _photo([(_face(C, 150), (100, 70))], "rocket").save(d / "c1.png")
    _photo([(_face(A, 150), (20, 60)), (_face(B, 140), (250, 80)), (_face(D, 130), (480, 90))],
           size=(660, 320)).save(d / "group.png")
    return d


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """The photos and a faces index of them, built once; tests work on copies of the index."""
    if not HAVE_FACES:
        pytest.skip("faces extra not installed: pip install -e '.[faces]'")
    base = tmp_path_factory.mktemp("people")
    photos = make_photos(base / "photos")
    run("index", photos, "--preset", "faces", "--index", base / "idx")
    return photos, base / "idx"


@pytest.fixture
def idx(made, tmp_path) -> Path:
    shutil.copytree(made[1], tmp_path / "idx")
    return tmp_path / "idx"


def people(idx: Path) -> tuple[list[dict], str]:
    r = run("people", "--index", idx, "--json")
    return json.loads(r.stdout)["people"], r.stderr


def files_of(idx: Path, ref) -> list[str]:
    d = json.loads(run("people", "show", str(ref), "--index", idx, "--json").stdout)
    return sorted(Path(f["path"]).name for f in d["faces"])


def who(found: list[dict], idx: Path) -> dict[str, dict]:
    """{"A": person dict, …}: each made person found by its photos."""
    out = {}
    for p in found:
        names = set(files_of(idx, p["id"]))
        out[next(k for k, v in PEOPLE.items() if v == names)] = p
    return out


def error_line(r) -> str:
    assert r.exit_code != 0 and r.stderr.startswith("Error: ") and r.stderr.count("\n") == 1, (r.exit_code, r.stderr)
    return r.stderr


@needs_faces
def test_people_listed_with_counts(idx):
    found, err = people(idx)
    assert "people updated: 9 new faces" in err and "4 new people" in err
    assert [(p["photos"], p["faces"]) for p in found] == [(4, 4), (3, 3), (1, 1), (1, 1)]  # most photos first
    assert all(p["name"] is None for p in found)
    persons = who(found, idx)  # each made person is one person, whole
    assert set(persons) == set(PEOPLE)
    for p in found:  # the representative face: one of the person's own faces, its box inside the photo
        f = p["face"]
        assert Path(f["path"]).name in files_of(idx, p["id"])
        x0, y0, x1, y1 = f["box"]
        w, h = Image.open(f["path"]).size
        assert 0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h
    again, err = people(idx)  # nothing waits: no update, the same answer
    assert again == found and "updated" not in err
    text = run("people", "--index", idx).stdout.splitlines()
    assert text[0].split()[:5] == ["id", "name", "photos", "faces", "face"]
    assert [line.split()[2:4] for line in text[1:]] == [["4", "4"], ["3", "3"], ["1", "1"], ["1", "1"]]


@needs_faces
def test_name_merge_move_round_trip(idx):
    persons = who(people(idx)[0], idx)
    a, b, d = persons["A"]["id"], persons["B"]["id"], persons["D"]["id"]
    assert "Alice" in run("people", "name", a, "Alice", "--index", idx).stdout
    run("people", "name", b, "Bob", "--index", idx)
    # a face moved out of Alice makes a person of its own; Alice has one photo less
    group_face = next(f for f in json.loads(run("people", "show", "alice", "--index", idx, "--json").stdout)["faces"]
                      if Path(f["path"]).name == "group.png")
    moved = json.loads(run("people", "move", group_face["id"], "--to", "new", "--index", idx, "--json").stdout)
    new = moved["to"]["id"]
    assert moved["from"] == a and new not in (a, b, d) and moved["to"]["faces"] == 1
    assert files_of(idx, "Alice") == ["a1.png", "a2.png", "a3.png"]
    # names are unique: the error's hint (merge them) is a command that works
    err = error_line(run("people", "name", new, "ALICE", "--index", idx, ok=False))
    hint = err.split("`")[1]
    assert hint == f"retrieve people merge {a} {new} --index {shlex.quote(str(idx))}"
    run(*shlex.split(hint)[1:])
    # after the merge: Alice's photos again, the merged person gone, the face marked as put there by hand
    res = json.loads(run("search", "--person", "Alice", "--index", idx, "--json").stdout)
    assert res["person"]["name"] == "Alice" and res["person"]["photos"] == 4
    assert sorted(Path(h["path"]).name for h in res["results"]) == sorted(PEOPLE["A"])
    hit = next(h for h in res["results"] if h["id"] == group_face["id"])
    assert (hit["face"], hit["box"]) == (group_face["face"], group_face["box"])
    assert next(f for f in json.loads(run("people", "show", a, "--index", idx, "--json").stdout)["faces"]
                if f["id"] == group_face["id"])["manual"]
    error_line(run("people", "show", new, "--index", idx, ok=False))
    # a merge into a person without a name takes the other's name; the text search names the person
    r = run("people", "merge", d, "Bob", "--index", idx)
    assert f"merged into person {d} (Bob)" in r.stdout
    text = run("search", "--person", "bob", "--index", idx).stdout
    assert text.startswith(f"person {d} (Bob): 3 photos") and "group.png" in text
    assert len(people(idx)[0]) == 2 + 0 + 1  # Alice, Bob (with D's face), C
    # move to a named person, and back
    run("people", "move", group_face["id"], "--to", "bob", "--index", idx)
    assert "group.png" not in files_of(idx, "Alice")
    run("people", "move", group_face["id"], "--to", a, "--index", idx)
    assert files_of(idx, "Alice") == sorted(PEOPLE["A"])


@needs_faces
def test_names_survive_reindex(made, tmp_path):
    """A re-indexed photo's rows are replaced (new ids): its faces keep their people, names with them; a new photo
    joins the person it matches; a named person whose photos all went is kept and finds them again."""
    photos = make_photos(tmp_path / "photos")
    idx = tmp_path / "idx"
    run("index", photos, "--index", idx, "--preset", "faces")
    persons = who(people(idx)[0], idx)
    for k, name in (("A", "Alice"), ("B", "Bob"), ("C", "Carol")):
        run("people", "name", persons[k]["id"], name, "--index", idx)
    before = {f["path"]: f["id"] for f in json.loads(run("people", "show", "Alice", "--index", idx, "--json").stdout)
              ["faces"]}
    for name in ("a1.png", "group.png"):  # changed: indexed again, new rows
        im = Image.open(photos / name)
        im.putpixel((0, 0), (1, 2, 3))
        im.save(photos / name)
    _photo([(_face(A, 160), (150, 90))], "chelsea", size=(420, 320)).save(photos / "a4.png")  # a new photo of Alice
    keep = tmp_path / "c1.png"
    shutil.move(photos / "c1.png", keep)
    (photos / "sub").mkdir()
    shutil.move(photos / "b1.png", photos / "sub" / "b1.png")  # moved: new rows, the person found by its content
    rep = json.loads(run("index", photos, "--index", idx, "--json").stdout)
    assert rep["indexed"] == 4 and rep["removed"] == 2
    found, err = people(idx)
    assert "6 new faces (5 kept their person from before a re-index, 1 joined a known person, 0 new people)" in err
    named = {p["name"]: p for p in found}
    assert named["Alice"]["photos"] == 5 and named["Bob"]["photos"] == 3 and named["Carol"]["photos"] == 0
    assert named["Alice"]["id"] == persons["A"]["id"]
    after = {f["path"]: f["id"] for f in json.loads(run("people", "show", "Alice", "--index", idx, "--json").stdout)
             ["faces"]}
    changed = {str(photos / "a1.png"), str(photos / "group.png")}
    assert all(after[p] != before[p] for p in changed) and all(after[p] == before[p] for p in set(before) - changed)
    assert str(photos / "a4.png") in after
    assert [p["name"] for p in found].count(None) == 1  # D, unnamed, still its own person
    shutil.move(keep, photos / "c1.png")  # Carol's photo back: it joins her by her centroid
    im = Image.open(photos / "sub" / "b1.png")  # the moved photo changed: its new row keeps Bob
    im.putpixel((0, 0), (1, 2, 3))
    im.save(photos / "sub" / "b1.png")
    run("index", photos, "--index", idx)
    found, err = people(idx)
    assert "2 new faces (1 kept their person from before a re-index, 1 joined a known person" in err
    assert {p["name"]: p["photos"] for p in found} == {"Alice": 5, "Bob": 3, "Carol": 1, None: 1}
    assert files_of(idx, "carol") == ["c1.png"] and "b1.png" in files_of(idx, "Bob")


@needs_faces
def test_index_made_before_the_people_tables_reads_as_no_people(idx, made):
    photos, _ = made
    with sqlite3.connect(idx / "index.db") as c:  # as an index made before them
        c.execute("DROP TABLE person_faces")
        c.execute("DROP TABLE people")
    from retrieval.curate.people import list_people, pending
    from retrieval.index.store import IndexStore

    with IndexStore.open(idx) as store:  # readers: no people yet, on the light path and through SQLAlchemy
        assert store._sqlite is not None and list_people(store) == [] and pending(store) == 9
    with IndexStore(idx) as store:
        assert list_people(store) == [] and pending(store) == 9
    assert json.loads(run("info", "--index", idx, "--json").stdout)["images"] == 9
    res = json.loads(run("search", photos / "a1.png", "--index", idx, "--json").stdout)
    assert res["results"]
    found, err = people(idx)  # the people writer creates the tables
    assert len(found) == 4 and "9 new faces" in err
    with sqlite3.connect(idx / "index.db") as c:
        assert {"people", "person_faces"} <= {r[0] for r in c.execute("SELECT name FROM sqlite_master")}


@needs_faces
def test_people_errors(idx):
    persons = who(people(idx)[0], idx)
    a = persons["A"]["id"]
    for args in (("people", "show", "999"), ("people", "name", "999", "X"), ("people", "merge", a, "Nobody"),
                 ("search", "--person", "Nobody"), ("people", "move", "999", "--to", "new"),
                 ("people", "move", persons["A"]["face"]["id"], "--to", "Nobody")):
        err = error_line(run(*args, "--index", idx, ok=False))
        assert "no person" in err or "no face 999" in err
        for hint in err.split("`")[1::2]:  # the commands it names work
            if hint.startswith("retrieve "):
                assert run(*shlex.split(hint)[1:]).exit_code == 0
    assert "cannot be a number" in error_line(run("people", "name", a, "12", "--index", idx, ok=False))
    assert "cannot be empty" in error_line(run("people", "name", a, " ", "--index", idx, ok=False))
    assert "at most 200 characters" in error_line(run("people", "name", a, "x" * 201, "--index", idx, ok=False))
    assert "control characters" in error_line(run("people", "name", a, "Eve\x1b[2J", "--index", idx, ok=False))
    assert "into itself" in error_line(run("people", "merge", a, a, "--index", idx, ok=False))
    assert "already" in error_line(run("people", "move", persons["A"]["face"]["id"], "--to", a, "--index", idx, ok=False))
    r = run("search", "--person", a, "-k", "3", "--verify", "5", "--index", idx, ok=False)
    assert r.exit_code == 2 and "-k, --verify do not apply to --person" in r.stderr
    r = run("search", "x.jpg", "--person", a, "--index", idx, ok=False)
    assert r.exit_code == 2 and "takes no query photo" in r.stderr
    r = run("search", "--index", idx, ok=False)
    assert r.exit_code == 2 and "Missing argument" in r.stderr


def test_people_need_a_faces_index(tmp_path):
    """A photo index: `retrieve people` and `search --person` are one line naming `retrieve index --preset faces`."""
    from retrieval.index.settings import IndexSettings
    from retrieval.index.store import IndexStore

    st = IndexSettings(model="efficientnet_lite0", weights_id="x", weights_source="x", preprocess={"size": 224},
                       metric="cosine", dim=4, index_type="flat", faiss_factory="Flat")
    IndexStore.create(tmp_path / "i", st).close()
    for args in (("people",), ("people", "show", "1"), ("search", "--person", "1")):
        r = run_process(*args, "--index", tmp_path / "i")
        assert r.returncode == 1 and r.stderr.count("\n") == 1, r.stderr
        assert "not a faces index" in r.stderr and "retrieve index PHOTOS --preset faces" in r.stderr


@needs_faces
def test_people_on_postgres(pg, made, tmp_path):
    """The people state on a database server: an index there made before the people tables gets them from the people
    writer; names are kept across a re-index; search --person answers from the server."""
    from sqlalchemy import create_engine, inspect, text

    from pgserver import new_database
    from retrieval.index import database

    url = new_database(pg, "retrieve_people")
    photos = tmp_path / "photos"
    shutil.copytree(made[0], photos)
    idx = tmp_path / "idx"
    try:
        run("index", photos, "--index", idx, "--db", url, "--preset", "faces")
        database.use(None)  # later commands find the database through DIR
        engine = create_engine(url)
        try:
            with engine.begin() as c:  # as an index made before the people tables
                c.execute(text("DROP TABLE person_faces"))
                c.execute(text("DROP TABLE people"))
            from retrieval.curate.people import list_people, pending
            from retrieval.index.store import IndexStore

            with IndexStore.open(idx) as store:  # a reader: no people yet
                assert store.server and list_people(store) == [] and pending(store) == 9
            r = run("search", "--person", "1", "--index", idx, "--json")  # the people writer creates the tables
            assert "people updated: 9 new faces" in r.stderr and json.loads(r.stdout)["person"]["id"] == 1
            assert {"people", "person_faces"} <= set(inspect(engine).get_table_names())
            persons = who(people(idx)[0], idx)
            run("people", "name", persons["A"]["id"], "Alice", "--index", idx)
            run("people", "merge", persons["D"]["id"], persons["C"]["id"], "--index", idx)
            im = Image.open(photos / "group.png")
            im.putpixel((0, 0), (1, 2, 3))
            im.save(photos / "group.png")
            assert json.loads(run("index", photos, "--index", idx, "--json").stdout)["indexed"] == 1
            found, err = people(idx)
            assert "3 new faces (3 kept their person" in err
            assert [(p["name"], p["photos"]) for p in found] == [("Alice", 4), (None, 3), (None, 2)]
            res = json.loads(run("search", "--person", "alice", "--index", idx, "--json").stdout)
            assert sorted(Path(h["path"]).name for h in res["results"]) == sorted(PEOPLE["A"])
            with engine.connect() as c:
                assert c.execute(text("SELECT count(*) FROM person_faces")).scalar() == 9
        finally:
            engine.dispose()
    finally:
        database.use(None)


@needs_faces
def test_help_examples_work_as_printed(made, tmp_path, monkeypatch):
    """Every example in `retrieve people [show|name|merge|move] --help` (and search's --person one) runs, each on a
    fresh copy of the index holding a person named Alice; the example's ids stand for people and faces there."""
    def _examples(*command: str) -> list[list[str]]:
        text = run(*command, "--help").stdout
        lines = text.split("Examples:", 1)[1].split("Options:", 1)[0].splitlines()
        return [shlex.split(line.split("#")[0])[1:] for line in lines if line.strip().startswith("retrieve ")]

    examples = [e for c in (["people"], ["people", "show"], ["people", "name"], ["people", "merge"],
                            ["people", "move"]) for e in _examples(*c)]
    examples += [e for e in _examples("search") if "--person" in e]
    assert len(examples) >= 12 and all(e[0] in ("people", "search") for e in examples)
    for n, argv in enumerate(examples):
        idx = tmp_path / f"idx{n}"
        shutil.copytree(made[1], idx)
        monkeypatch.setenv("RETRIEVE_INDEX", str(idx))
        persons = who(people(idx)[0], idx)
        run("people", "name", persons["A"]["id"], "Alice")
        where = {"~/faces-index": idx, "3": persons["A"]["id"], "7": persons["C"]["id"],
                 "42": persons["B"]["face"]["id"]}
        r = run(*[str(where.get(a, a)) for a in argv])
        if "--json" in argv:
            json.loads(r.stdout)
