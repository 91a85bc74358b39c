"""Audits a person can trust: one score story, a verdict, region pairs, and a report that is light and inert."""
from __future__ import annotations

import json
import types
from html.parser import HTMLParser

import numpy as np
import pytest
import torch
from PIL import Image

from clitools import run, run_json
from conftest import skimage_photo


# -- the verdict's numbers -----------------------------------------------------------------------
def test_percentile_on_a_known_distribution():
    from retrieval.index.calibration import percentile, quantiles

    q = quantiles(np.linspace(0, 1, 100_001))  # uniform on [0, 1]: the percentile of v is 100 v
    for v in (0.001, 0.25, 0.5, 0.9, 0.992, 0.9995):
        assert percentile(q, v) == pytest.approx(100 * v, abs=0.01)
    assert percentile(q, -1) == 0 and percentile(q, 2) == 100
    rng = np.random.default_rng(1)
    x = rng.normal(size=50_000)
    qx = quantiles(x)
    for v in (-2.0, -0.3, 0.0, 1.1, 2.5):  # against the empirical share below v
        assert percentile(qx, v) == pytest.approx(100 * np.mean(x < v), abs=0.15)
    flat = quantiles(np.r_[np.zeros(500), np.ones(500)])  # ties count half
    assert percentile(flat, 0.0) == pytest.approx(25, abs=0.1) and percentile(flat, 1.0) == pytest.approx(75, abs=0.1)
    # the search's float32 score of a sampled pair is that pair's score (float64 in the sample) ± 1e-7: a tie
    pair = 0.9025915861129761
    scores = np.r_[np.linspace(0, 0.8, 900), np.full(50, pair), np.linspace(0.93, 0.95, 50)]
    qp = quantiles(scores)
    mid = percentile(qp, pair)
    assert mid == pytest.approx(92.5, abs=0.2)  # the middle of the flat stretch 90 %–95 %
    for noisy in (pair - 6e-8, pair + 6e-8, float(np.float32(pair))):
        assert percentile(qp, noisy) == mid
    assert percentile(qp, pair + 1e-3) > 94.9 and percentile(qp, pair - 1e-3) < 90.1  # not a tie


def test_verdict_words_and_neutral_title():
    from retrieval.index.calibration import Calibration, quantiles
    from retrieval.verdict import CLOSE, NO_COLLECTION, NOT_CLOSE, NOT_CONFIRMED, SAME_OBJECT, TYPICAL, verdict

    rng = np.random.default_rng(0)
    cal = Calibration(quantiles(rng.normal(0.2, 0.1, 20000)), quantiles(rng.normal(0.8, 0.05, 500)), 1000, 20000, 500)
    close = verdict(0.9, cal)  # above 99 % of random pairs and above the nearest-neighbour band (≥ 75 %)
    assert close.match and close.headline == CLOSE and close.title("a.jpg", "b.jpg") == "Why b.jpg matches a.jpg"
    assert "Closer than over 99.9 % of random pairs" in close.text
    typical = verdict(0.8, cal)  # a typical nearest neighbour: every photo has one, so not a match
    assert not typical.match and typical.headline == TYPICAL and "typical of a nearest neighbour" in typical.text
    far = verdict(0.3, cal)
    assert not far.match and far.title("a.jpg", "b.jpg") == f"a.jpg and b.jpg: {NOT_CLOSE}"
    assert f"{far.data['random_percentile']:.1f}" in far.text and far.data["random_percentile"] == pytest.approx(84.1, abs=1)
    confirmed = verdict(0.3, cal, types.SimpleNamespace(inliers=42, confirmed=True))
    assert confirmed.match and confirmed.headline == SAME_OBJECT and "same object confirmed (42" in confirmed.text
    alone = verdict(0.9, None)
    assert not alone.match and alone.headline == NO_COLLECTION and alone.title("a", "b").startswith("a and b:")


def test_no_match_words_on_an_unconfirmed_or_ordinary_pair():
    """Verification that ran and did not confirm, or a score inside the collection's nearest-neighbour band, never
    reads as a match, whatever the score; the words are a ladder: a higher score never reads weaker."""
    from retrieval.index.calibration import Calibration, quantiles
    from retrieval.verdict import CLOSE, CLOSEST_HERE, NOT_CLOSE, NOT_CONFIRMED, SOMEWHAT, TYPICAL, verdict

    rng = np.random.default_rng(1)
    cal = Calibration(quantiles(rng.normal(0.0, 0.1, 20000)), quantiles(rng.normal(0.6, 0.1, 500)), 5000, 20000, 500)
    unconfirmed = types.SimpleNamespace(inliers=5, confirmed=False)
    ladder = [CLOSE, CLOSEST_HERE, TYPICAL, SOMEWHAT, NOT_CLOSE]
    last = len(ladder)
    for score in np.linspace(-0.5, 1.0, 301):
        v = verdict(float(score), cal)
        step = ladder.index(v.headline)
        assert step <= last  # a higher score never reads weaker
        last = step
        assert v.match == (v.headline == CLOSE)
        w = verdict(float(score), cal, unconfirmed)
        assert not w.match and w.headline == NOT_CONFIRMED and "match" not in w.headline
        assert not w.title("a", "b").startswith("Why")
    assert verdict(0.55, cal).headline == TYPICAL and not verdict(0.55, cal).match  # inside the band
    assert verdict(0.75, cal).headline == CLOSE  # above it


def test_verdict_in_a_small_collection_says_it_is_small_once():
    """Below 201 photos the 99 %-of-random-pairs bar cannot be passed by all of a collection's nearest-neighbour
    pairs: a score alone never says "match" there; the closest pairs read "among the closest pairs here", and the
    collection says once that it is small."""
    from retrieval.index.calibration import Calibration
    from retrieval.verdict import CLOSEST_HERE, NOT_CLOSE, TYPICAL, collection_note, verdict

    uniform = np.linspace(0.0, 1.0, 1001)  # percentile(score) = 100·score among random pairs
    nearest = np.linspace(0.5, 1.0, 1001)
    small = Calibration(uniform, nearest, 11, 20000, 11)
    for score in (0.9, 0.95, 0.995):
        v = verdict(score, small)
        assert not v.match and v.headline == CLOSEST_HERE and "small" not in v.text  # said once, not per pair
    assert verdict(0.7, small).headline == TYPICAL
    assert verdict(0.3, small).headline == NOT_CLOSE
    assert collection_note(small).startswith("11 photos are too few for a score alone to show a match")
    assert collection_note(Calibration(uniform, nearest, 1000, 20000, 500)) is None


def test_calibration_is_sampled_when_indexing_and_matches_brute_force(photos, tmp_path):
    from retrieval.index.calibration import load
    from retrieval.index.store import IndexStore

    idx = tmp_path / "idx"
    run("index", photos, "--index", idx)
    with IndexStore.open(idx) as store:
        cal = load(store)
        assert cal is not None and cal.images == store.count() == 9
        ids, vecs = zip(*store.iter_vectors())
        x = store.transform(np.concatenate(vecs))
    sims = x @ x.T
    np.fill_diagonal(sims, -np.inf)
    nn = sims.max(1)
    off = sims[np.isfinite(sims)]
    assert cal.nearest[0] >= nn.min() - 1e-5 and cal.nearest[-1] <= nn.max() + 1e-5
    assert cal.random[0] == pytest.approx(off.min(), abs=1e-5) and cal.random[-1] == pytest.approx(off.max(), abs=1e-5)
    assert np.median(cal.random) == pytest.approx(np.median(off), abs=0.05)


# -- the exact split into region pairs -----------------------------------------------------------
@pytest.mark.parametrize("pooling", ["gap", "gem", "rmac"])
def test_pair_terms_add_up_to_the_explained_similarity(pooling):
    from explain.correspond import pair_terms
    from explain.methods import Explainer
    from retrieval.index.head import LinearHead
    from retrieval.models.pooling import parse_pooling

    rng = np.random.default_rng(3)
    c = 24
    bb = types.SimpleNamespace(pooling=parse_pooling(pooling))
    aq, ar = torch.rand(1, c, 5, 7), torch.rand(1, c, 4, 6)
    mu = rng.random(c) * 0.5
    head = LinearHead(rng.random(c), rng.standard_normal((8, c)), 10)
    for metric in ("cosine", "l2"):
        for centre in (False, True):
            for h in (None, head):
                ex = Explainer(bb, metric, mu=mu, centre=centre, head=h)
                q = bb.pooling.pool(aq.double())[0].numpy()
                r = bb.pooling.pool(ar.double())[0].numpy()
                s = pair_terms(ex, aq, ar)
                assert s.shape == (35, 24)
                assert s.sum() == pytest.approx(ex.similarity(q, r)["cis_target"], abs=1e-9)


def test_region_pairs_are_window_sums_inside_each_photo():
    from explain.correspond import correspondences, region_terms, window

    rng = np.random.default_rng(0)
    s = rng.normal(size=(14 * 10, 7 * 9))
    r = region_terms(s, (14, 10), (7, 9), (4, 3), (2, 2))
    s4 = s.reshape(14, 10, 7, 9)
    assert r[2, 5, 1, 6] == pytest.approx(s4[2:6, 5:8, 1:3, 6:8].sum())  # the definition, by hand
    corr = correspondences(s, (14, 10), (7, 9), (333, 241), (61, 4001), top=5)
    assert 1 <= len(corr) <= 5 and [c.rank for c in corr] == list(range(1, len(corr) + 1))
    assert all(0 <= c.share <= 1 for c in corr) and all(a.term >= b.term for a, b in zip(corr, corr[1:]))
    for c in corr:
        for (x0, y0, x1, y1), (h, w) in ((c.query_box, (333, 241)), (c.result_box, (61, 4001))):
            assert 0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h
    assert window((14, 10)) == (4, 2) and window((1, 1)) == (1, 1)
    assert correspondences(-np.abs(s), (14, 10), (7, 9), (333, 241), (61, 4001)) == []  # nothing for the match


def test_channel_shares_stay_between_0_and_100_percent():
    from explain.cis import channel_rows

    rng = np.random.default_rng(5)
    for shift in (0.5, 0.0, -0.5):  # Σ CIS positive, about zero, negative
        cis = rng.normal(size=1280) + shift / 100
        rows, note = channel_rows(cis)
        assert rows and all(0 <= r["share"] <= 1 for r in rows)
        assert all(r["cis"] > 0 for r in rows)
        pos, neg = cis[cis > 0].sum(), -cis[cis < 0].sum()
        assert ("outweigh" in note) == (pos <= neg)
    rows, note = channel_rows(-np.abs(rng.normal(size=64)))
    assert rows == [] and "outweigh" in note


# -- one score story, end to end -------------------------------------------------------------------
def test_every_output_leads_with_the_score_that_ranked_the_result(photos, tmp_path):
    idx, out = tmp_path / "idx", tmp_path / "ex"
    run("index", photos, "--index", idx)
    query = photos / "chelsea.jpg"
    res = json.loads(run("search", query, "--index", idx, "-k", "4", "--explain", "--out", out, "--json").stdout)
    html = (out / "report.html").read_text()
    positions = []
    for h in res["results"]:
        ex = h["explanation"]
        assert round(ex["score"], 4) == round(h["score"], 4)  # the same number
        assert ex["score_text"].startswith(f"score {h['score']:.4f}")
        assert ex["verdict"]["random_percentile"] >= 0 and "random pairs" in ex["verdict"]["text"]
        assert ex["cis_sum"] == pytest.approx(h["score"], abs=1e-5) and ex["explained"]["exact"]
        positions.append(html.index(f"score {h['score']:.4f}"))
        with Image.open(ex["png"]) as im:
            assert im.width > 400
    assert positions == sorted(positions)  # the report shows the results in rank order
    assert [h["rank"] for h in res["results"]] == [1, 2, 3, 4]
    # the pair's own audit with the same index: the same score and the same explained similarity
    top = res["results"][0]
    doc = run_json("explain", query, top["path"], "--index", idx, "--out", tmp_path / "pair")
    assert doc["score"] == pytest.approx(top["score"], abs=1e-5) and doc["cis_sum"] == pytest.approx(top["score"], abs=1e-5)
    assert doc["score_is"] == top["explanation"]["score_is"]
    text = run("explain", query, top["path"], "--index", idx, "--out", tmp_path / "pair2").stdout
    assert text.splitlines()[0].startswith(f"score {top['score']:.4f}")
    table = run("search", query, "--index", idx, "-k", "2").stdout.splitlines()
    assert table[1].split() == ["rank", "score", "path"] and table[2].split()[1] == f"{res['results'][0]['score']:.4f}"
    # without an index: says what it compares, and that there is no collection to place the score in
    alone = run_json("explain", query, top["path"], "--out", tmp_path / "alone")
    from retrieval.images import load_image
    from retrieval.models.loading import load_backbone

    bb = load_backbone("efficientnet_lite0").at_size(448)  # the model's own cosine at 448 px, computed here
    v = bb.embed_arrays([bb.preprocess.array(load_image(p, min_side=448)) for p in (query, top["path"])])
    v = v.astype(np.float64)
    cos = v[0] @ v[1] / (np.linalg.norm(v[0]) * np.linalg.norm(v[1]))
    assert alone["score"] == pytest.approx(cos, abs=1e-5)
    assert alone["explained"]["exact"] and alone["cis_sum"] == pytest.approx(cos, abs=1e-5)
    assert "no index" in alone["score_is"]
    assert "no collection" in alone["verdict"]["text"].lower() and not alone["verdict"]["match"]


def test_correspondences_in_json_are_boxes_inside_each_photo(tmp_path):
    a, b = tmp_path / "cat.png", tmp_path / "wide.jpg"
    skimage_photo("chelsea").save(a)  # 451×300
    scene = skimage_photo("brick").resize((900, 300))
    scene.paste(skimage_photo("chelsea").resize((240, 160)), (620, 120))
    scene.save(b, quality=92)
    doc = run_json("explain", a, b, "--out", tmp_path / "o")
    corr = doc["correspondences"]
    assert corr and all(0 < c["share"] <= 1 for c in corr)
    for c in corr:
        for (x0, y0, x1, y1), (w, h) in ((c["query_box"], (451, 300)), (c["result_box"], (900, 300))):
            assert 0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h
    x0, y0, x1, y1 = corr[0]["result_box"]  # the strongest pair lands on the pasted cat
    assert x1 > 620 and y1 > 120
    html = (tmp_path / "o" / "report.html").read_text()
    assert "class='marks' style='display:none'" in html and "t-marks" in html  # drawn only when ticked


class _Tags(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags: list[tuple[str, dict]] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))


def test_a_hostile_file_name_is_inert_in_the_report(tmp_path):
    evil = tmp_path / "<img src=x onerror=alert(1)>.jpg"
    skimage_photo("coffee").save(evil, quality=90)
    a = tmp_path / "a.png"
    skimage_photo("chelsea").save(a)
    run_json("explain", a, evil, "--out", tmp_path / "o")
    html = (tmp_path / "o" / "report.html").read_text()
    p = _Tags()
    p.feed(html)
    assert not any(k.startswith("on") for _, attrs in p.tags for k in attrs)
    assert all(attrs.get("src", "").startswith("data:") for t, attrs in p.tags if t == "img")
    assert sum(t == "script" for t, _ in p.tags) == 1  # ours only
    assert "&lt;img src=x onerror=alert(1)&gt;.jpg" in html


def test_output_sizes_for_a_6000_by_4000_photo(tmp_path):
    big = tmp_path / "big.jpg"
    skimage_photo("chelsea").resize((6000, 4000), Image.BICUBIC).save(big, quality=90)
    a = tmp_path / "a.png"
    skimage_photo("chelsea").save(a)
    out = tmp_path / "o"
    doc = run_json("explain", a, big, "--out", out)
    rm = np.load(doc["files"]["result_map"])
    assert rm.shape == (171, 256) and doc["result_map_scale"] == pytest.approx(256 / 6000, abs=1e-4)
    assert (out / "result_map.npy").stat().st_size < 0.1 * 2**20
    assert (out / "report.html").stat().st_size < 1.5 * 2**20
    assert (out / "pair.png").stat().st_size < 2 * 2**20
    full = run_json("explain", a, big, "--out", tmp_path / "full", "--full-maps")
    assert np.load(full["files"]["result_map"]).shape == (4000, 6000)
