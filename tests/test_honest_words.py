"""Honest words (issue #29): every surface says what its heat maps are, "exactly" only where the channel terms add up
to the score shown -- checked here against the cosine this file computes itself from the backbone's embeddings --,
and the channel shares stay shares of the evidence for the match when the score is negative or near zero."""
from __future__ import annotations

import html
import json
import re
from pathlib import Path

import numpy as np
import pytest

from clitools import ROOT, run, run_json
from conftest import skimage_photo

PAPER = "SFAM (Similar Feature Activation Maps, arXiv:2506.01636)"
# what each method's outputs say, pinned: (the sentence on stdout and in explained.text, the start of explained.map)
WORDS = {
    "sfam": ("The score decomposes exactly into 1280 channel terms (SFAM's CIS), which add up to it; the heat maps "
             "(the default map, built on SFAM)",
             f"The default map (sfam), built on {PAPER}. The paper's part: the score's channel terms (CIS) weight each "
             "photo's own feature maps. What retrieve adds: the same weighting on a finer layer of the network; a gate "
             "that keeps the regions whose local features match between the two photos;"),
    "sfam-plain": ("The score decomposes exactly into 1280 channel terms (SFAM's CIS), which add up to it; the heat "
                   "maps are the paper's map",
                   f"The paper's map, {PAPER}: each photo's feature maps weighted by the score's channel terms (CIS), "
                   "negative values cut; nothing added."),
    "gradcam": ("The heat maps are Grad-CAM's gradient saliency of this score (where it is sensitive), not a "
                "decomposition of it.",
                "Grad-CAM (a baseline): each photo's feature maps weighted by the score's average gradient: a gradient "
                "saliency of the score (where it is sensitive), not a decomposition of it."),
    "occlusion": ("The heat maps are an occlusion saliency of this score (how much it drops where a grey patch hides "
                  "the photo), not a decomposition of it.",
                  "Occlusion (a baseline): how much the score drops when a grey patch hides each place of a photo: an "
                  "occlusion saliency of the score, not a decomposition of it."),
}
DECOMPOSES = {"sfam", "sfam-plain"}


def _cosine(u, v) -> float:
    u, v = np.asarray(u, np.float64), np.asarray(v, np.float64)
    return float(u @ v / (np.linalg.norm(u) * np.linalg.norm(v)))


def _embed(backbone, paths, side: int) -> np.ndarray:
    """Raw pooled embeddings of photos decoded at ``side``, straight from the backbone (float64)."""
    from retrieval.images import load_image

    return backbone.embed_arrays([backbone.preprocess.array(load_image(p, min_side=side)) for p in paths]) \
        .astype(np.float64)


@pytest.fixture(scope="module")
def pair(tmp_path_factory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("pair")
    a, b = d / "cat.png", d / "cat crop.jpg"
    cat = skimage_photo("chelsea")
    cat.save(a)
    cat.crop((50, 10, 351, 287)).save(b, quality=90)
    return a, b


@pytest.mark.parametrize("method", list(WORDS))
def test_each_method_says_what_its_maps_are_without_an_index(method, pair, lite0, tmp_path):
    """`retrieve explain A B --method M` (no index): stdout, explain.json and report.html say what the maps are;
    "exactly"/"decomposes" only for SFAM's maps, whose channel terms add up to the cosine computed here."""
    a, b = pair
    out = tmp_path / "out"
    text = run("explain", a, b, "--method", method, "--input-size", "160", "--out", out).stdout
    doc = json.loads((out / "explain.json").read_text())
    sentence, map_words = WORDS[method]
    assert sentence in text and doc["explained"]["text"].startswith(sentence)
    assert doc["explained"]["map"].startswith(map_words) and doc["method"] == method
    # the score: the model's own cosine at 160 px, computed here from the backbone's embeddings
    v = _embed(lite0.at_size(160), (a, b), 160)
    cos = _cosine(v[0], v[1])
    assert doc["score"] == pytest.approx(cos, abs=1e-5) and f"score {cos:.4f}" in text
    report = (out / "report.html").read_text()
    caption = re.search(r"<p class='muted' id='map-words'>(.*?)</p>", report, re.S).group(1)
    assert html.unescape(caption).startswith(doc["explained"]["map"])  # the report's caption: this method's map
    if method in DECOMPOSES:
        assert doc["explained"]["exact"] and doc["cis_sum"] == pytest.approx(cos, abs=1e-5)
        assert "exactly" in text and "decomposes" in text
    else:
        assert not doc["explained"]["exact"] and "cis_sum" not in doc and doc["top_channels"] == []
        for words in (text, doc["explained"]["text"], doc["explained"]["map"], report):
            assert "exactly" not in words and "decomposes" not in words  # never said of a saliency
    if method != "sfam":  # only the default map's words list what retrieve adds
        assert "What retrieve adds" not in report and "What retrieve adds" not in doc["explained"]["map"]


@pytest.mark.parametrize("method", ["sfam", "gradcam"])
def test_with_an_index_the_words_hold_for_the_index_score(method, photos, lite0, tmp_path):
    """`retrieve explain A B --index`: the score and Σ CIS against the cosine of the two photos' embeddings in the
    index's space, computed here (A and B embedded by the backbone, centred on the index's head mean if it has one)."""
    import sqlite3

    from retrieval.match.verify import decode_side
    from retrieval.index.store import IndexStore

    idx = tmp_path / "idx"
    run_json("index", photos, "--index", idx)
    a, b = photos / "chelsea.jpg", photos / "more" / "cat_crop.jpg"
    doc = run_json("explain", a, b, "--index", idx, "--method", method, "--out", tmp_path / "o")
    with IndexStore.open(idx) as store:
        settings, size = store.settings, int(store.settings.preprocess["size"])
    with sqlite3.connect(idx / "index.db") as con:
        arrays = {n: np.frombuffer(d, np.float64) for n, d in con.execute("SELECT name, data FROM arrays")}
    v = _embed(lite0.at_size(size), (a, b), decode_side(settings))
    m = arrays.get("head_mean", np.zeros(v.shape[1]))
    assert "head_proj" not in arrays  # the general preset's head centres only
    truth = _cosine(v[0] - m, v[1] - m)
    assert doc["score"] == pytest.approx(truth, abs=1e-4)
    sentence, map_words = WORDS[method]
    assert doc["explained"]["text"].startswith(sentence) and doc["explained"]["map"].startswith(map_words)
    if method in DECOMPOSES:
        assert doc["explained"]["exact"] and doc["cis_sum"] == pytest.approx(truth, abs=1e-4)
    else:
        assert not doc["explained"]["exact"] and "exactly" not in doc["explained"]["text"]


def _explanation(d, method="sfam"):
    from explain.methods import Explanation

    z = np.zeros((4, 4), np.float32)
    return Explanation(method, "cosine", d.score, z, z, z, z, cis=d.cis, cis_target=d.total,
                       details={"map": "g ⊕ s, g = ReLU(D32↑)·ReLU(D16)·G16/max"})


def test_exact_is_a_check_that_can_fail():
    """Σ CIS (through G = PᵀP) against the cosine of P(q − m), P(r − m) (computed from P): a head whose G disagrees
    with its P is caught, and nothing then says "exactly"."""
    from explain.cis import decompose
    from explain.run import explained_text
    from retrieval.index.head import LinearHead
    from retrieval.metric import metric

    rng = np.random.default_rng(7)
    q, r, mean, proj = rng.random(32), rng.random(32), rng.random(32) * 0.5, rng.standard_normal((8, 32))
    head = LinearHead(mean, proj, 10)
    (d,) = decompose(q, r[None], metric("cosine"), head)
    truth = _cosine(proj @ (q - mean), proj @ (r - mean))
    assert d.score == pytest.approx(truth, abs=1e-12) and d.total == pytest.approx(truth, abs=1e-12) and d.exact
    assert "decomposes exactly" in explained_text(_explanation(d))

    class Wrong(LinearHead):
        def gram_apply(self, x):  # G ≠ PᵀP: the channel terms no longer add up to the cosine
            return 1.5 * super().gram_apply(x)

    (bad,) = decompose(q, r[None], metric("cosine"), Wrong(mean, proj, 10))
    assert bad.score == pytest.approx(truth, abs=1e-12) and not bad.exact
    e = _explanation(bad)
    assert not e.exact and "exactly" not in explained_text(e) and "do not decompose" in explained_text(e)


def _negative_pair(seed: int = 3, c: int = 256):
    """Two embeddings with a negative cosine whose channel terms have both signs."""
    rng = np.random.default_rng(seed)
    q = rng.standard_normal(c)
    r = -0.6 * q + rng.standard_normal(c)
    return q, r


def test_channel_shares_of_a_negative_pair_stay_shares_of_the_evidence(tmp_path):
    """A constructed pair with a negative cosine: the channel table gives each channel's share of the positive terms
    (in 0–100 %, summing to at most 100 %), says so in the JSON and the report, and says the channels against the
    match outweigh those for it; as shares of the score itself, the channels for the match would read negative."""
    from explain.cis import SHARE_OF, decompose
    from explain.render import ReportItem, write_report
    from explain.run import pair_record
    from retrieval.metric import metric
    from retrieval.verdict import verdict

    q, r = _negative_pair()
    truth = _cosine(q, r)
    assert truth < -0.3
    (d,) = decompose(q, r[None], metric("cosine"))
    assert d.score == pytest.approx(truth, abs=1e-12) and d.exact
    e = _explanation(d)
    rec = pair_record(e, "cosine similarity", verdict(d.score), [], {})
    terms = q * r / (np.linalg.norm(q) * np.linalg.norm(r))  # the CIS by their definition
    pos = terms[terms > 0].sum()
    assert (terms > 0).any() and (terms[terms > 0] / truth < 0).all()  # as shares of the score: all negative
    shares = [c["share"] for c in rec["top_channels"]]
    assert shares and all(0 < s <= 1 for s in shares) and sum(shares) <= 1 + 1e-12
    for c in rec["top_channels"]:
        assert c["share"] == pytest.approx(terms[c["channel"]] / pos, rel=1e-9)
    assert "outweigh" in rec["channels_note"] and rec["channels_share_of"] == SHARE_OF
    assert rec["explained"]["text"].startswith("The score decomposes exactly")
    assert "not positive" in rec["explained"]["text"]
    from PIL import Image

    img = Image.new("RGB", (4, 4))
    write_report(tmp_path / "r.html", "negative", [ReportItem("pair", "a", "b", img, img, e, rec)], {})
    page = html.unescape((tmp_path / "r.html").read_text())
    assert f"Share: {SHARE_OF}." in page and "outweigh" in page
    assert all(float(p) <= 100 for p in re.findall(r"<td>([\d.]+)%</td>", page))


def test_channel_shares_when_the_terms_nearly_cancel():
    """Σ CIS near zero: shares of the score would run to ±10 and beyond; shares of the evidence stay in 0–100 %."""
    from explain.cis import channel_rows

    rng = np.random.default_rng(11)
    cis = rng.standard_normal(128)
    cis -= cis.mean() - 1e-3  # Σ = 0.128 over terms of about ±1
    assert max(abs(cis / cis.sum())) > 10
    rows, note = channel_rows(cis)
    assert all(0 < row["share"] <= 1 for row in rows) and sum(row["share"] for row in rows) <= 1 + 1e-12
    assert "-0.0000" not in channel_rows(np.abs(cis))[1]  # no negative zero when nothing is against


def test_the_web_app_offers_every_map_the_cli_does():
    """The pair page's method switch lists the paper's map (sfam-plain) with the default and the baselines, and the
    server accepts each of them."""
    from explain.methods import METHODS
    from web.service import METHODS as WEB

    page = (ROOT / "web" / "static" / "pair.html").read_text()
    offered = re.findall(r'<option value="([^"]+)"', page)
    assert offered == list(WEB) and set(WEB) == set(METHODS)
    assert "the paper's map" in page and "built on SFAM" in page
    assert "d.explained.map" in (ROOT / "web" / "static" / "pair.js").read_text()  # the page's words: the server's


def test_a_faces_index_offers_the_papers_map_too(tmp_path):
    """The web app's switch offers sfam-plain on every index: a faces index explains with it (the same score, split
    exactly), and says which map it drew."""
    import importlib.util

    if importlib.util.find_spec("dlib") is None or importlib.util.find_spec("face_recognition_models") is None:
        pytest.skip("faces extra not installed: pip install -e '.[faces]'")
    photos = tmp_path / "photos"
    photos.mkdir()
    face = skimage_photo("astronaut")
    face.save(photos / "astronaut.png")
    face.crop((50, 0, 400, 400)).save(photos / "crop.jpg", quality=90)
    idx = tmp_path / "idx"
    run("index", photos, "--index", idx, "--preset", "faces")
    a, b = photos / "astronaut.png", photos / "crop.jpg"
    hit = next(h for h in run_json("search", a, "--index", idx, "-k", "3")["results"] if h["path"] == str(b))
    for method, (sentence, map_words) in (("sfam-plain", WORDS["sfam-plain"]), ("sfam", WORDS["sfam"])):
        doc = run_json("explain", a, b, "--index", idx, "--method", method, "--face-b", str(hit["face"]),
                       "--out", tmp_path / method)
        assert doc["score"] == pytest.approx(hit["score"], abs=1e-5) and doc["explained"]["exact"]
        assert doc["cis_sum"] == pytest.approx(hit["score"], abs=1e-5)
        assert doc["explained"]["text"].startswith(sentence.replace("1280", "128"))
        assert doc["explained"]["map"].startswith(map_words.rstrip(";"))
    assert "the paper's map as a faint floor" not in doc["explained"]["map"]  # faces: the gated map alone
