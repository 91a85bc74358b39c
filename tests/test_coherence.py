"""One answer everywhere: a pair's score is the same on every surface (the search table, ``search --json``, the
explained search's JSON and report, ``retrieve explain --index``, the web API over a real socket), equal to the score
computed by its definition from the stored vectors, and the channel terms (CIS) add up to it; for each preset."""
from __future__ import annotations

import json
import shutil
import sqlite3
import urllib.parse
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from clitools import ROOT, run, run_json, start_server, stop

SAMPLES = ROOT / "data" / "samples"


def _by_definition(idx: Path, a: str, b: str, face: tuple[int, int] | None = None) -> float:
    """The score of the indexed photos (or faces) ``a`` and ``b`` from their stored raw embeddings and the index's head,
    by the head's definition e = P (x − m), the cosine of e_a and e_b; in float64, sharing no code with retrieve's
    scoring."""
    import sqlite3

    con = sqlite3.connect(str(idx / "index.db"))
    try:
        settings = {k: json.loads(v) for k, v in con.execute("SELECT key, value FROM settings")}
        if face is None:
            va, vb = (np.frombuffer(con.execute("SELECT vector FROM images WHERE path = ?", (p,)).fetchone()[0],
                                    np.float32).astype(np.float64) for p in (a, b))
        else:
            va, vb = (np.frombuffer(con.execute("SELECT vector FROM images WHERE path = ? AND face = ?",
                                                (p, f)).fetchone()[0], np.float32).astype(np.float64)
                      for p, f in ((a, face[0]), (b, face[1])))
        arrays = {n: np.frombuffer(d, np.float64).reshape(json.loads(s))
                  for n, s, d in con.execute("SELECT name, shape, data FROM arrays")}
    finally:
        con.close()
    assert settings["metric"] == "cosine"
    ea, eb = va, vb
    if "head_mean" in arrays:
        ea, eb = va - arrays["head_mean"], vb - arrays["head_mean"]
        if "head_proj" in arrays:
            ea, eb = arrays["head_proj"] @ ea, arrays["head_proj"] @ eb
    return float(ea @ eb / (np.linalg.norm(ea) * np.linalg.norm(eb)))


def _get(url: str, token: str) -> dict:
    req = urllib.request.Request(url, headers={"Authorization": f"token {token}"})
    with urllib.request.urlopen(req, timeout=300) as r:
        return json.loads(r.read())


def _web_scores(idx: Path, base: Path, a: str, b: str, explain: bool = True,
                ids: dict | None = None) -> tuple[float, float | None, float | None]:
    """(the search score of b for query a, the explained score, its Σ CIS) through `retrieve serve`'s API; ``ids``:
    the rows of a and b ({path: id}) where a photo has several (a faces index)."""
    pytest.importorskip("starlette", reason="the serve extra is not installed (pip install -e '.[serve]')")
    proc, url, token = start_server(idx, cwd=base)
    try:
        images = _get(url + "api/images?limit=500", token)["images"]
        ids = ids or {i["path"]: i["id"] for i in images}
        assert {a, b} <= {i["path"] for i in images}
        found = _get(url + f"api/search?q={ids[a]}&k=10", token)
        score = next(h["score"] for h in found["results"] if h["id"] == ids[b])
        if not explain:
            return score, None, None
        doc = _get(url + "api/explain?" + urllib.parse.urlencode({"q": ids[a], "r": ids[b]}), token)
        return score, doc["score"], doc["cis_sum"]
    finally:
        stop(proc)


def _table_score(text: str, path: str) -> float:
    line = next(ln for ln in text.splitlines() if ln.rstrip().endswith(path))
    return float(line.split()[1])


@pytest.mark.parametrize("preset", ["general", "instance"])
def test_one_score_on_every_surface(preset, tmp_path):
    photos = tmp_path / "photos"
    shutil.copytree(SAMPLES, photos)
    idx = tmp_path / "idx"
    run("index", photos, "--index", idx, "--preset", preset)
    q, r = str(photos / "chelsea.png"), str(photos / "chelsea_crop_flipped.jpg")
    truth = _by_definition(idx, q, r)

    plain = run_json("search", q, "--index", idx, "-k", "5")
    hit = next(h for h in plain["results"] if h["path"] == r)
    table = _table_score(run("search", q, "--index", idx, "-k", "5").stdout, r)
    ex = run_json("search", q, "--index", idx, "-k", "5", "--explain", "--out", tmp_path / "ex")
    eh = next(h for h in ex["results"] if h["path"] == r)
    pair = run_json("explain", q, r, "--index", idx, "--out", tmp_path / "pair")
    saved = json.loads((tmp_path / "pair" / "explain.json").read_text())
    web, web_explained, web_cis = _web_scores(idx, tmp_path, q, r)

    scores = {"search --json": hit["score"], "search table": table, "search --explain --json": eh["score"],
              "its explanation": eh["explanation"]["score"], "explain --index": pair["score"],
              "explain.json": saved["score"], "/api/search": web, "/api/explain": web_explained}
    for where, s in scores.items():
        assert round(s, 4) == round(truth, 4), (where, s, truth)
    for where, cis in {"search --explain": eh["explanation"]["cis_sum"], "explain --index": pair["cis_sum"],
                       "/api/explain": web_cis}.items():
        assert cis == pytest.approx(truth, abs=1e-5), where  # the CIS add up to that very score
    assert pair["explained"]["exact"] and eh["explanation"]["explained"]["exact"]
    for report in (tmp_path / "ex" / "report.html", tmp_path / "pair" / "report.html"):
        assert f"score {truth:.4f}" in report.read_text()  # the report leads with it
    shares = [c["share"] for c in pair["top_channels"]]
    assert all(0 < s <= 1 for s in shares) and sum(shares) <= 1 + 1e-9  # shares of that score's evidence


def test_one_score_on_every_surface_for_faces(tmp_path):
    import importlib.util

    if importlib.util.find_spec("dlib") is None or importlib.util.find_spec("face_recognition_models") is None:
        pytest.skip("faces extra not installed: pip install -e '.[faces]'")
    from test_faces import _group

    from conftest import skimage_photo

    photos = tmp_path / "photos"
    photos.mkdir()
    astronaut = skimage_photo("astronaut")
    astronaut.save(photos / "astronaut.png")
    _group(astronaut, skimage_photo("coffee")).save(photos / "group.png")
    idx = tmp_path / "idx"
    run("index", photos, "--index", idx, "--preset", "faces")
    q, r = str(photos / "astronaut.png"), str(photos / "group.png")
    found = run_json("search", q, "--index", idx, "-k", "5")
    hit = found["results"][0]
    assert hit["path"] == r and hit["verdict"]["headline"] == "the same person"
    truth = _by_definition(idx, q, r, (0, hit["face"]))
    table = _table_score(run("search", q, "--index", idx, "-k", "5").stdout, r)  # rank 1: the first line of r
    ex = run_json("search", q, "--index", idx, "-k", "5", "--explain", "--out", tmp_path / "ex")
    eh = next(h for h in ex["results"] if h["id"] == hit["id"])
    pair = run_json("explain", q, r, "--index", idx, "--face-b", str(hit["face"]), "--out", tmp_path / "pair")
    with sqlite3.connect(idx / "index.db") as con:  # the tiles of face 0 of q and of the hit's face of r
        rows = {(p, f): i for i, p, f in con.execute("SELECT id, path, face FROM images")}
    web, web_explained, web_cis = _web_scores(idx, tmp_path, q, r, ids={q: rows[q, 0], r: rows[r, hit["face"]]})
    for where, s in {"search --json": hit["score"], "search table": table, "search --explain": eh["score"],
                     "its explanation": eh["explanation"]["score"], "explain --index": pair["score"],
                     "/api/search": web, "/api/explain": web_explained}.items():
        assert round(s, 4) == round(truth, 4), (where, s, truth)
    for where, cis in {"search --explain": eh["explanation"]["cis_sum"], "explain --index": pair["cis_sum"],
                       "/api/explain": web_cis}.items():
        assert cis == pytest.approx(truth, abs=1e-5), where
    assert pair["verdict"]["headline"] == eh["verdict"]["headline"] == "the same person"


def test_report_is_light_on_sample_and_12_mp_photos(tmp_path):
    """A default `search --explain -k 5` writes at most 5 MB, on the sample photos and on 12 MP photos."""
    from conftest import skimage_photo

    photos = tmp_path / "photos"
    shutil.copytree(SAMPLES, photos)
    idx = tmp_path / "idx"
    run("index", photos, "--index", idx)
    run("search", photos / "chelsea.png", "--index", idx, "-k", "5", "--explain", "--out", tmp_path / "small")
    big = tmp_path / "big"
    big.mkdir()
    for name in ("chelsea", "coffee", "astronaut", "rocket", "camera", "horse"):
        skimage_photo(name).resize((4000, 3000)).save(big / f"{name}.jpg", quality=92)
    run("index", big, "--index", tmp_path / "bigidx")
    out = run("search", big / "chelsea.jpg", "--index", tmp_path / "bigidx", "-k", "5", "--explain", "--out",
              tmp_path / "large").stdout
    assert f"report: {tmp_path / 'large' / 'report.html'}" in out  # the folder the command prints
    for folder in ("small", "large"):
        size = sum(f.stat().st_size for f in (tmp_path / folder).iterdir())
        assert 0 < size <= 5_000_000, (folder, size)
        assert len(list((tmp_path / folder).glob("*_map.npy"))) == 10
