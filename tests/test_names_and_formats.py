"""Issue 28, a strange folder: any file name (not UTF-8, emoji, control characters) indexes, searches, explains,
checks and is served, round-tripping byte for byte; phone photos (HEIC/HEIF, AVIF) decode upright; photo formats
retrieve does not decode are named with the reason. Through the installed command, with a strict UTF-8 stdout (a
name that cannot be encoded would crash the printing, not pass silently)."""
from __future__ import annotations

import base64
import json
import os
import re
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageOps

from clitools import ROOT, entry_point, stop
from conftest import skimage_photo
from retrieval.names import ESCAPED, from_db, json_name, shown, to_db

LATIN1 = b"caf\xe9.jpg"  # a Latin-1 name: not UTF-8
EMOJI = "\U0001F600 coffee.jpg"  # valid UTF-8, 4 bytes a character
HOSTILE = "evil\n\x1b[31mred\u202egpj.png"  # a newline, a terminal escape, a bidi override
STRICT = {"PYTHONIOENCODING": "utf-8", "LC_ALL": "C.UTF-8", "RETRIEVE_THREADS": "1"}


def cli(*args, ok: bool = True, **kw) -> subprocess.CompletedProcess:
    """``retrieve ARGS`` through the entry point; ``bytes`` arguments pass a file name that is not UTF-8 as is."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), **STRICT}
    r = subprocess.run(entry_point() + [a if isinstance(a, bytes) else str(a) for a in args], capture_output=True,
                       text=True, timeout=600, env=env, cwd=kw.pop("cwd", ROOT), **kw)
    if ok:
        assert r.returncode == 0, f"exit {r.returncode}\nstdout: {r.stdout}\nstderr: {r.stderr}"
    return r


def lines(r) -> list[dict]:
    return [json.loads(line) for line in r.stdout.splitlines() if line.strip()]


@pytest.fixture(scope="module")
def named(tmp_path_factory):
    """A folder holding a Latin-1 name, an emoji name and a hostile name (the cat twice, the coffee), indexed."""
    base = tmp_path_factory.mktemp("names")
    photos = base / "photos"
    photos.mkdir()
    cat = skimage_photo("chelsea")
    cat.save(photos / "cat.png")
    latin1 = os.path.join(os.fsencode(photos), LATIN1)
    with open(latin1, "wb") as f:
        cat.crop((20, 10, 440, 290)).save(f, format="JPEG", quality=90)
    skimage_photo("coffee").save(photos / EMOJI, quality=90)
    skimage_photo("rocket").save(photos / HOSTILE)
    index = base / "index"
    r = cli("index", photos, "--index", index, "--json")
    assert json.loads(r.stdout)["indexed"] == 4 and not r.stderr.strip(), r.stderr
    return base, photos, index, latin1


def test_names_are_stored_losslessly_and_plain_names_as_they_always_were(named):
    base, photos, index, latin1 = named
    with sqlite3.connect(index / "index.db") as con:
        stored = {p for (p,) in con.execute("SELECT path FROM images")}
    assert str(photos / EMOJI) in stored and str(photos / "cat.png") in stored  # UTF-8 names unchanged
    escaped = [p for p in stored if p.startswith(ESCAPED)]
    assert len(escaped) == 1 and os.fsencode(from_db(escaped[0])) == latin1
    for name in ("/a/caf\udce9.jpg", "/a/b\\c\udcff", ESCAPED + "/x", "escaped:\\udce9", "/plain/ü😀", "\\", ""):
        assert from_db(to_db(name)) == name
        assert to_db(name) == name or to_db(name).startswith(ESCAPED)
        to_db(name).encode("utf-8")  # what SQLite and PostgreSQL take
    assert to_db("/a/caf\udce9.jpg") != to_db("/a/caf\\udce9.jpg")  # the literal text of an escape is another name


def test_search_prints_readable_names_and_its_json_opens_the_same_files(named):
    base, photos, index, latin1 = named
    r = cli("search", photos, "--index", index, "-k", "3")
    out = r.stdout.splitlines()
    assert any(line.endswith("caf\\xe9.jpg") for line in out), r.stdout  # the undecodable byte as \xNN
    assert any(line.endswith(EMOJI) for line in out), r.stdout
    assert any(line.endswith("evil\\x0a\\x1b[31mred\\u202egpj.png") for line in out), r.stdout  # one line, inert
    assert "\x1b" not in r.stdout and "\u202e" not in r.stdout
    assert len(out) == 4 * 5  # 4 queries: name, header, 3 results

    (q,) = lines(cli("search", photos / "cat.png", "--index", index, "-k", "3", "--json"))
    top = q["results"][0]
    assert os.fsencode(top["path"]) == latin1  # Python's json.loads gives back the name, byte for byte
    assert base64.b64decode(top["path_bytes"]) == latin1
    with open(top["path"], "rb") as f, open(latin1, "rb") as g:
        assert f.read() == g.read()
    emoji = next(h for h in q["results"] if h["path"].endswith(EMOJI))
    assert "path_bytes" not in emoji and Path(emoji["path"]).is_file()
    assert "query_bytes" not in q

    (q,) = lines(cli("search", latin1, "--index", index, "-k", "1", "--json"))  # the name as a query, from argv
    assert os.fsencode(q["query"]) == latin1 and base64.b64decode(q["query_bytes"]) == latin1
    assert q["results"][0]["path"] == str(photos / "cat.png")


def test_explain_both_ways_writes_readable_reports_and_exact_json(named):
    base, photos, index, latin1 = named
    out = base / "explained"
    r = cli("search", latin1, "--index", index, "-k", "2", "--explain", "--out", out)
    assert "report:" in r.stdout
    html = (out / "report.html").read_text(encoding="utf-8")
    assert "caf\\xe9.jpg" in html and "\ufffd" not in html

    doc = json.loads(cli("explain", photos / EMOJI, latin1, "--index", index, "--out", base / "pair", "--json").stdout)
    assert doc["query"] == str(photos / EMOJI) and "query_bytes" not in doc
    assert os.fsencode(doc["result"]) == latin1 and base64.b64decode(doc["result_bytes"]) == latin1
    saved = json.loads((base / "pair" / "explain.json").read_text())
    assert os.fsencode(saved["result"]) == latin1 and Path(saved["result"]).is_file()
    assert EMOJI in (base / "pair" / "report.html").read_text(encoding="utf-8")

    r = cli("explain", latin1, photos / "cat.png", "--index", index, "--out", base / "pair2")
    assert "report:" in r.stdout and (base / "pair2" / "pair.png").is_file()


def test_check_names_a_missing_file_readably(named):
    base, photos, index, latin1 = named
    assert "consistent" in cli("check", "--index", index).stdout
    away = os.path.join(os.fsencode(base), LATIN1)
    os.rename(latin1, away)
    try:
        r = cli("check", "--index", index, ok=False)
        assert r.returncode == 1 and "missing file: " + str(photos) + "/caf\\xe9.jpg" in r.stdout, r.stdout
        d = json.loads(cli("check", "--index", index, "--json", ok=False).stdout)
        assert [os.fsencode(p) for p in d["missing_files"]] == [latin1]
    finally:
        os.rename(away, latin1)


def test_the_web_app_lists_and_serves_both_names(named, tmp_path):
    """Over a real socket: /api/images gives each name (readable ``name``, exact ``path``), /photo/<id> its bytes."""
    pytest.importorskip("starlette", reason="the serve extra is not installed (pip install -e '.[serve]')")
    import httpx

    base, photos, index, latin1 = named
    env = {**os.environ, "PYTHONPATH": str(ROOT), "XDG_CACHE_HOME": str(tmp_path / "cache"), **STRICT}
    extra = ["--no-token"] if "--no-token" in cli("serve", "--help").stdout else []
    proc = subprocess.Popen(entry_point() + ["serve", "--index", str(index), "--port", "0", *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path)
    try:
        url = None
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and url is None:
            line = proc.stdout.readline()
            if not line:
                break
            m = re.search(r"at (http://127\.0\.0\.1:\d+/\S*)", line)
            url = m.group(1) if m else None
        assert url, f"retrieve serve printed no URL: {proc.stderr.read() if proc.poll() is not None else ''}"
        root = re.match(r"http://[^/]+", url).group(0)
        with httpx.Client(timeout=60) as client:
            client.get(url)  # the printed URL, as a browser opens it first
            r = client.get(root + "/api/images?limit=100")
            assert r.status_code == 200, r.text
            ims = {os.fsencode(i["path"]): i for i in r.json()["images"]}
            assert latin1 in ims and ims[latin1]["name"] == "caf\\xe9.jpg"
            emoji = os.fsencode(str(photos / EMOJI))
            assert ims[emoji]["name"] == EMOJI
            for path in (latin1, emoji):
                got = client.get(f"{root}/photo/{ims[path]['id']}")
                assert got.status_code == 200, got.text
                with open(path, "rb") as f:
                    assert got.content == f.read()
            s = client.get(f"{root}/api/search?q={ims[latin1]['id']}&k=1").json()
            assert s["results"][0]["path"] == str(photos / "cat.png")
    finally:
        stop(proc)


def test_shown_escapes_only_what_a_person_cannot_read():
    assert shown("/p/caf\udce9.jpg") == "/p/caf\\xe9.jpg"
    assert shown("/p/é 😀 \u200d 日本.jpg") == "/p/é 😀 \u200d 日本.jpg"
    assert shown("a\tb\x7f\u2028\u202e") == "a\\x09b\\x7f\\u2028\\u202e"
    assert json_name("path", "/p/ok.jpg") == {"path": "/p/ok.jpg"}


# -- phone photos and formats not decoded ---------------------------------------------------------------------------
def _stored(index: Path) -> dict[str, tuple[int, int, np.ndarray]]:
    with sqlite3.connect(index / "index.db") as con:
        return {Path(p).name: (w, h, np.frombuffer(v, np.float32))
                for p, w, h, v in con.execute("SELECT path, width, height, vector FROM images")}


def _cos(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


def test_heic_and_avif_index_upright_and_the_rest_is_named(tmp_path):
    """A HEIC and an AVIF saved sideways with EXIF orientation 6 (made here through pillow-heif and Pillow) index as
    the upright photo: the size and the embedding of the same photo saved upright as PNG (the sideways PNG, as the
    unrotated photo would embed, is far from it). A broken .jpg, a camera raw file and a JPEG XL are each named on
    stderr with the reason; a .txt is passed over in silence."""
    pytest.importorskip("pillow_heif", reason="pillow-heif is not installed (a dependency: pip install pillow-heif)")
    from PIL import features

    photos = tmp_path / "photos"
    photos.mkdir()
    cat = skimage_photo("chelsea")  # 451 x 300: landscape as stored, portrait once rotated
    upright = ImageOps.exif_transpose(_with_orientation(cat, 6))
    assert upright.size == (300, 451)
    upright.save(photos / "upright.png")
    cat.save(photos / "sideways.png")  # what the HEIC would embed if its orientation were lost
    exif = Image.Exif()
    exif[0x0112] = 6
    import pillow_heif

    pillow_heif.register_heif_opener()
    cat.save(photos / "phone.heic", format="HEIF", exif=exif.tobytes(), quality=95)
    avif = features.check("avif")
    if avif:
        cat.save(photos / "phone.avif", format="AVIF", exif=exif.tobytes(), quality=95)
    (photos / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0" + b"not a photo" * 20)
    (photos / "IMG_0001.CR2").write_bytes(b"II*\x00" + bytes(200))
    (photos / "scan.jxl").write_bytes(b"\xff\x0a" + bytes(200))
    (photos / "notes.txt").write_text("not a photo")
    index = tmp_path / "index"

    r = cli("index", photos, "--index", index, "--json")
    d = json.loads(r.stdout)
    assert d["indexed"] == 3 + avif and d["skipped"] == 3, r.stdout + r.stderr
    err = r.stderr.strip().splitlines()
    assert sorted(err) == sorted([
        f"{photos / 'IMG_0001.CR2'}: a camera raw file: not decoded (index the JPEG the camera wrote beside it, or an "
        "exported copy)",
        f"{photos / 'broken.jpg'}: cannot decode: truncated image data",
        f"{photos / 'scan.jxl'}: JPEG XL: not supported (index a JPEG, PNG, WebP, HEIC or AVIF copy)"]), r.stderr

    rows = _stored(index)
    w, h, ref = rows["upright.png"]
    assert (w, h) == (300, 451)
    for name in ("phone.heic",) + (("phone.avif",) if avif else ()):
        assert rows[name][:2] == (300, 451), name
        assert _cos(rows[name][2], ref) > 0.97, name
        assert _cos(rows[name][2], ref) > _cos(rows["sideways.png"][2], ref) + 0.05, name

    (q,) = lines(cli("search", photos / "phone.heic", "--index", index, "-k", "1", "--json"))
    assert Path(q["results"][0]["path"]).name in ("upright.png", "phone.avif")
    again = json.loads(cli("index", photos, "--index", index, "--json").stdout)
    assert again["skipped_before"] == 3 and again["indexed"] == 0  # remembered, not reported again


def _with_orientation(img: Image.Image, orientation: int) -> Image.Image:
    img = img.copy()
    img.getexif()[0x0112] = orientation
    return img


def test_pillow_heif_is_imported_only_for_an_iso_media_file():
    """A search among JPEGs never pays for importing the HEIF plugin."""
    code = ("import sys, io\nfrom PIL import Image\nfrom retrieval.images import decode_image\n"
            "b = io.BytesIO(); Image.new('RGB', (8, 8)).save(b, 'JPEG'); decode_image(b.getvalue(), 'x.jpg')\n"
            "print('pillow_heif' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                       env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=120)
    assert r.stdout.strip() == "False", r.stderr


# -- PostgreSQL ------------------------------------------------------------------------------------------------------
def test_names_round_trip_through_postgresql(named, tmp_path):
    """The same folder indexed into PostgreSQL: the Latin-1 and the emoji names come back byte for byte."""
    from pgserver import new_database, server

    url, why, cluster = server()
    if url is None:
        pytest.skip(why)
    try:
        base, photos, _, latin1 = named
        db = new_database(url, "retrieve_names")
        index = tmp_path / "pgindex"
        r = cli("index", photos, "--index", index, "--db", db, "--json")
        assert json.loads(r.stdout)["indexed"] == 4, r.stderr
        (q,) = lines(cli("search", photos / "cat.png", "--index", index, "-k", "3", "--json"))
        got = {os.fsencode(h["path"]) for h in q["results"]}
        assert latin1 in got and os.fsencode(str(photos / EMOJI)) in got
        assert "consistent" in cli("check", "--index", index).stdout
        again = json.loads(cli("index", photos, "--index", index, "--json").stdout)
        assert again["unchanged"] == 4 and again["indexed"] == 0  # the stored names match the files found
    finally:
        if cluster is not None:
            cluster.stop()
