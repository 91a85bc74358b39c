"""Instance-level matching: aspect-kept input, GeM pooling (with exact SFAM), DBA, geometric verification."""
from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch
from PIL import Image

from clitools import run, run_json
from conftest import skimage_photo
from explain.methods import SFAM
from retrieval.models.preprocess import Preprocess
from retrieval.models.pooling import GAP, parse_pooling
from retrieval.errors import RetrieveError
from retrieval.match.verify import MIN_INLIERS, Verification, Verifier, rerank


# -- pooling -----------------------------------------------------------------------------------
def test_gem_pools_and_splits_over_space_exactly():
    a = torch.rand(2, 16, 7, 5, dtype=torch.float64) * 6
    gem = parse_pooling("gem")
    assert gem.p == 3 and str(gem) == "gem:3"
    expect = (a.clamp_min(1e-6) ** 3).mean((2, 3)) ** (1 / 3)
    torch.testing.assert_close(gem.pool(a), expect)
    torch.testing.assert_close(gem.contributions(a).mean((2, 3)), gem.pool(a))  # the map averages to e
    assert bool((gem.pool(a) >= a.mean((2, 3)) - 1e-12).all())  # power mean ≥ arithmetic mean
    torch.testing.assert_close(parse_pooling("gem:1").pool(a), a.mean((2, 3)))  # p = 1 is GAP
    assert parse_pooling(None) is GAP and GAP.contributions(a) is a
    rmac = parse_pooling("rmac")  # Σ over regions of L2-normalised regional maxima, by its definition
    from retrieval.models.pooling import rmac_regions

    regions = rmac_regions(7, 5)
    assert len(regions) >= 6 and all(y + s <= 7 and x + s <= 5 for y, x, s in regions)
    expect = sum(torch.nn.functional.normalize(a[:, :, y:y + s, x:x + s].amax((2, 3)), dim=1) for y, x, s in regions)
    torch.testing.assert_close(rmac.pool(a), expect)
    torch.testing.assert_close(rmac.contributions(a).mean((2, 3)), rmac.pool(a))
    for bad in ("max", "gem:x", "gem:0.5"):
        with pytest.raises(RetrieveError):
            parse_pooling(bad)


@pytest.mark.parametrize("centre", [False, True])
def test_sfam_with_gem_is_exact_on_real_photos(lite0, centre):
    bb = lite0.at_size(224).replace(pooling=parse_pooling("gem"))
    q, r = skimage_photo("chelsea"), skimage_photo("coffee")
    mu = np.full(1280, 0.1)
    e = SFAM(bb, "cosine", mu=mu, centre=centre).explain(q, r)
    a = bb.eager_features(bb.preprocess.batch([q, r])).double()
    v = ((a.clamp_min(1e-6) ** 3).mean((2, 3)) ** (1 / 3)).numpy()  # GeM by its definition
    if centre:
        v = v - mu
    cos = float(v[0] @ v[1] / np.linalg.norm(v[0]) / np.linalg.norm(v[1]))
    assert abs(float(e.cis.sum()) - cos) < 1e-4 and abs(e.score - cos) < 1e-4
    assert e.result_map.shape == (r.height, r.width) and e.result_map.max() == pytest.approx(1.0)


# -- aspect-kept input -------------------------------------------------------------------------
def test_long_side_resize_keeps_the_aspect_within_one_stride():
    pre = Preprocess(448, resize="long")
    for w, h in ((640, 480), (480, 640), (1000, 200), (300, 300), (4000, 3000), (50, 2000)):
        ph, pw = pre.shape_for(w, h)
        assert max(ph, pw) == 448 and ph % 32 == 0 and pw % 32 == 0
        assert (ph >= pw) == (h >= w)
        assert abs(min(ph, pw) - min(w, h) * 448 / max(w, h)) <= 16 or min(ph, pw) == 32
    assert Preprocess(448).shape_for(640, 480) == (448, 448)
    with pytest.raises(RetrieveError):
        Preprocess(448, resize="crop")


def test_mixed_shapes_embed_in_order_and_match_one_by_one(lite0):
    bb = lite0.replace(preprocess=lite0.preprocess.replace(size=256, resize="long"))
    imgs = [skimage_photo(n) for n in ("chelsea", "astronaut", "coffee")]
    imgs.append(imgs[0].transpose(Image.ROTATE_90))  # landscape, square, landscape, portrait: 3 shapes
    arrays = [bb.preprocess.array(im) for im in imgs]
    assert len({a.shape for a in arrays}) == 3
    together = bb.embed_arrays(arrays)
    for im, arr, v in zip(imgs, arrays, together):
        eager = bb.eager_features(torch.from_numpy(arr)[None]).mean((2, 3))[0].numpy()
        np.testing.assert_allclose(v, eager, rtol=1e-3, atol=1e-4)  # fast path (dynamic shapes) = eager


def test_index_with_long_gem_through_the_cli(photos, tmp_path):
    idx = tmp_path / "idx"
    run("index", photos, "--index", idx, "--input-size", "320", "--resize", "long", "--pooling", "gem")
    info = run_json("info", "--index", idx)
    assert (info["resize"], info["pooling"], info["input_size"]) == ("long", "gem:3", 320)
    res = run_json("search", photos / "chelsea.jpg", "--index", idx, "-k", "2", "--include-self")
    assert res["results"][0]["path"] == str(photos / "chelsea.jpg") and res["results"][0]["score"] > 0.999
    assert res["results"][1]["path"].endswith("cat_crop.jpg")
    bad = run("index", photos, "--index", idx, "--pooling", "gap", ok=False)
    assert bad.exit_code != 0 and "pooling gem:3" in bad.output


# -- geometric verification ---------------------------------------------------------------------
def rephotographed(img: Image.Image, background: Image.Image, seed: int = 0) -> Image.Image:
    """``img`` warped in perspective, darker, blurred, pasted onto ``background``: a phone photo of it."""
    from PIL import ImageFilter

    rng = random.Random(seed)
    bg = background.resize((640, 480))
    obj = img.resize((300, round(300 * img.height / img.width)))
    w, h = obj.size
    jit = [rng.uniform(-0.12, 0.12) * w for _ in range(8)]
    quad = (jit[0], jit[1], jit[2], h + jit[3], w + jit[4], h + jit[5], w + jit[6], jit[7])
    warped = obj.transform((w, h), Image.QUAD, quad, Image.BILINEAR)
    mask = Image.new("L", (w, h), 255).transform((w, h), Image.QUAD, quad, Image.BILINEAR)
    warped = warped.point(lambda v: int(v * 0.8)).filter(ImageFilter.GaussianBlur(0.8))
    bg.paste(warped, (200, 100), mask)
    return bg


def test_verification_confirms_the_same_object_and_not_a_lookalike():
    v = Verifier(cache=False)
    astro, coffee, rocket = (skimage_photo(n) for n in ("astronaut", "coffee", "rocket"))
    photo = rephotographed(astro, coffee)
    same = v.verify(v.extract(photo), v.extract(astro))
    other = v.verify(v.extract(photo), v.extract(rocket))
    assert same.confirmed and same.inliers >= 3 * MIN_INLIERS, same.inliers
    assert not other.confirmed, other.inliers
    # the inliers are real correspondences: the astronaut was pasted at x ≥ 200 in the photo
    assert len(same.query_points) >= same.inliers and float(same.query_points[:, 0].min()) > 150
    many = v.verify_many(v.extract(photo), [v.extract(rocket), v.extract(astro)])
    assert [m.inliers for m in many] == [other.inliers, same.inliers]  # batched = one by one


def test_inliers_count_distinct_grid_cells():
    """Verification counts inliers as the distinct cells of a 2-px grid (SIFT puts several keypoints at one spot):
    the rows of np.unique(np.rint(points / 2), axis=0), by definition."""
    from retrieval.match.verify import _distinct

    rng = np.random.default_rng(3)
    for n in (0, 1, 7, 400):
        pts = (rng.random((n, 2)) * 640).astype(np.float32)
        pts = np.concatenate([pts, pts[: n // 2] + 0.3, pts[: n // 3]])  # same spots, once more and nearly
        assert _distinct(pts) == len(np.unique(np.rint(pts / 2), axis=0))
    assert _distinct(np.float32([[0, 0], [0.9, 0.9], [1.1, 0], [0, 3.2], [3.2, 0]])) == 4  # (0,0) twice


def test_rerank_never_drops_a_confirmed_result():
    rng = np.random.default_rng(0)
    for _ in range(500):
        n = int(rng.integers(1, 30))
        k = int(rng.integers(1, n + 1))
        inl = rng.choice([0, 3, 8, 14, 15, 20, 40, 90], size=n)
        vs = [Verification(int(i)) for i in inl]
        out = rerank(list(range(n)), vs, k)
        assert len(out) == k and len(set(out)) == k
        confirmed = [i for i in range(n) if vs[i].confirmed]
        kept_unconfirmed = [i for i in out if not vs[i].confirmed]
        if kept_unconfirmed:  # nothing confirmed was left out while an unconfirmed one was kept
            assert set(confirmed) <= set(out)
        c_out = [i for i in out if vs[i].confirmed]
        assert out[:len(c_out)] == c_out  # confirmed first ...
        assert [inl[i] for i in c_out] == sorted((inl[i] for i in c_out), reverse=True)  # ... most inliers first
        assert kept_unconfirmed == sorted(kept_unconfirmed)  # the rest keep their global order


@pytest.fixture(scope="module")
def clutter(tmp_path_factory):
    """Real photos plus a phone-style photo of the astronaut pasted on the coffee cup (neither the photo nor
    the coffee cup are indexed)."""
    d = tmp_path_factory.mktemp("clutter")
    for name in ("astronaut", "coins", "rocket", "chelsea", "horse", "camera"):
        skimage_photo(name).save(d / f"{name}.jpg", quality=92)
    q = tmp_path_factory.mktemp("queries") / "phone_photo.jpg"
    rephotographed(skimage_photo("astronaut"), skimage_photo("coffee")).save(q, quality=85)
    return d, q


def test_search_verify_confirms_and_reports_inliers(clutter, tmp_path):
    photos, query = clutter
    idx = tmp_path / "idx"
    run("index", photos, "--index", idx)
    plain = run_json("search", query, "--index", idx, "-k", "6")
    assert all("inliers" not in h for h in plain["results"])
    res = run_json("search", query, "--index", idx, "-k", "3", "--verify", "6", "--explain", "--out", tmp_path / "ex")
    top = res["results"][0]
    assert top["path"].endswith("astronaut.jpg") and top["inliers"] >= MIN_INLIERS
    assert all(h["inliers"] < MIN_INLIERS for h in res["results"][1:])
    assert [h["rank"] for h in res["results"]] == [1, 2, 3]
    plain_score = {h["path"]: h["score"] for h in plain["results"]}
    assert top["score"] == pytest.approx(plain_score[top["path"]])  # the score is still the similarity
    assert top["explanation"]["inliers"] == top["inliers"]
    html = (tmp_path / "ex" / "report.html").read_text()
    assert f"{top['inliers']} inliers" in html and "Geometric verification" in html
    part = run_json("search", query, "--index", idx, "-k", "4", "--verify", "2")  # K < k: only the top 2 verified
    assert ["inliers" in h for h in part["results"]] == [True, True, False, False]
    assert [h["path"] for h in part["results"][2:]] == [h["path"] for h in plain["results"][2:4]]
    text = run("search", query, "--index", idx, "-k", "1", "--verify", "6").stdout
    assert "inliers" in text and "astronaut.jpg" in text


def test_explain_pair_with_verification_draws_the_inliers(clutter, tmp_path):
    photos, query = clutter
    doc = run_json("explain", query, photos / "astronaut.jpg", "--verify", "--out", tmp_path / "e")
    assert doc["confirmed"] and doc["inliers"] >= MIN_INLIERS
    assert "Geometric verification" in (tmp_path / "e" / "report.html").read_text()
    with Image.open(tmp_path / "e" / "pair.png") as im:
        assert im.width > 400
    other = run_json("explain", query, photos / "rocket.jpg", "--verify", "--out", tmp_path / "o")
    assert not other["confirmed"] and other["inliers"] < MIN_INLIERS


def test_instance_preset_records_its_settings_and_verifies_by_default(clutter, tmp_path, monkeypatch):
    photos, query = clutter
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))  # no keypoints cached by other tests
    idx = tmp_path / "idx"
    run("index", photos, "--index", idx, "--preset", "instance")
    info = run_json("info", "--index", idx)
    assert (info["input_size"], info["resize"], info["pooling"]) == (448, "long", "gem:3")
    assert info["head"].startswith("pca-whiten") and info["search_defaults"] == {"verify": 8, "words": 25}
    assert "--verify 8" in run("info", "--index", idx).stdout
    import hashlib

    from retrieval.index.store import IndexStore

    with IndexStore.open(idx) as store:  # the indexer extracted every photo's keypoints with the index's own side
        cache = Verifier.for_index(store.settings)  # and budget, so searches find them cached
    for p in photos.iterdir():
        assert cache.cache_file(hashlib.sha256(p.read_bytes()).hexdigest()).is_file(), p
    res = run_json("search", query, "--index", idx, "-k", "2")
    assert res["results"][0]["path"].endswith("astronaut.jpg") and res["results"][0]["inliers"] >= MIN_INLIERS
    off = run_json("search", query, "--index", idx, "-k", "2", "--verify", "0")
    assert all("inliers" not in h for h in off["results"])
    plain = tmp_path / "plain"
    run("index", photos, "--index", plain)
    assert run_json("info", "--index", plain)["search_defaults"] == {}
    assert all("inliers" not in h for h in run_json("search", query, "--index", plain)["results"])
    bad = run("index", photos, "--index", idx, "--preset", "general", ok=False)  # settings are fixed
    assert bad.exit_code != 0 and "fixed when the index is created" in bad.output


# -- database-side augmentation -----------------------------------------------------------------
def test_dba_ranks_by_augmented_vectors_and_reports_true_scores(photos, tmp_path):
    from retrieval.match.search import Searcher
    from retrieval.index.store import IndexStore

    idx = tmp_path / "idx"
    run("index", photos, "--index", idx)
    with IndexStore.open(idx) as store:
        ids, vecs = zip(*store.iter_vectors())
        ids, x = np.concatenate(ids), store.transform(np.concatenate(vecs))
        s = Searcher(store, backbone=None, dba=1)
        aug = np.stack([s.index.reconstruct(int(i)) for i in ids])
        nn = np.argsort(-(x @ x.T), axis=1)[:, :2]  # itself and its nearest neighbour
        expect = x[nn].mean(1)
        np.testing.assert_allclose(aug, expect / np.linalg.norm(expect, axis=1, keepdims=True), atol=1e-5)
        hits = s.search_vectors(np.concatenate(vecs)[:1], 4)[0]
        for h in hits:  # ranked by DBA, scored by the plain cosine with the query
            assert h.score == pytest.approx(float(x[0] @ x[list(ids).index(h.id)]), abs=1e-5)
    res = run_json("search", photos / "chelsea.jpg", "--index", idx, "-k", "3", "--dba", "1")
    assert res["results"][0]["path"].endswith("cat_crop.jpg")
    assert json.dumps(res)  # stable JSON, same keys as a plain search
    assert set(res["results"][0]) == {"rank", "id", "path", "score"}


# -- matching in a learned subspace (retrieval.match.verify.project, retrieval.match.words.fit_projection) -------------
@pytest.fixture(scope="module")
def matched():
    """A phone photo of the astronaut and four real photos, their SIFT, and a 64-d subspace learned on them."""
    from retrieval.match.verify import _root
    from retrieval.match.words import fit_projection

    v = Verifier(cache=False)
    photo = v.extract(rephotographed(skimage_photo("astronaut"), skimage_photo("coffee")))
    others = [v.extract(skimage_photo(n)) for n in ("rocket", "astronaut", "camera", "chelsea")]
    basis = fit_projection(np.concatenate([_root(f.descriptors) for f in [photo] + others]))
    return photo, others, basis


def _matches_by_definition(v: Verifier, q, r) -> set[tuple[int, int]]:
    """Matches that pass the ratio test and are mutual — no query point whose own nearest is another
    candidate point is nearer to the match's candidate point (query points sharing one nearest all keep it) —
    from Euclidean distances computed one by one (float64) between the (projected, renormalised) RootSIFT
    rows: the rule retrieval/match/verify.py states, not its code."""
    from scipy.spatial.distance import cdist

    from retrieval.match.verify import _root, project

    a = project(_root(q.descriptors), v.projection).astype(np.float64)
    b = project(_root(r.descriptors), v.projection).astype(np.float64)
    d = cdist(a, b)
    nearest = d.argmin(1)
    out = set()
    for i in range(len(a)):
        j1, j2 = np.argsort(d[i], kind="stable")[:2]
        others = [i2 for i2 in range(len(a)) if i2 != i and nearest[i2] != j1]
        if d[i, j1] < v.ratio * d[i, j2] and (not others or d[others, j1].min() > d[i, j1]):
            out.add((i, int(j1)))
    return out


@pytest.mark.parametrize("dims", [None, 64])
def test_batched_matching_equals_the_definition_pair_by_pair(matched, dims):
    photo, others, basis = matched
    v = Verifier(cache=False, projection=None if dims is None else basis)
    batched = v.matches(photo, others)  # the four at once (each in blocks of MATCH_ROWS query rows)
    for r, (qi, ri) in zip(others, batched):
        got = set(zip(qi.tolist(), ri.tolist()))
        want = _matches_by_definition(v, photo, r)
        assert len(got) == len(qi)  # each query point once
        assert len(got ^ want) <= max(1, len(want) // 200), (len(got), len(want), len(got ^ want))  # float32
        alone = v.matches(photo, [r])[0]  # the same matches, in the same order, one pair at a time
        assert np.array_equal(alone[0], qi) and np.array_equal(alone[1], ri)
    astro = set(zip(*(x.tolist() for x in batched[1])))
    assert len(astro) > 3 * max(len(batched[0][0]), len(batched[2][0]))  # the same object matches most
    from threadpoolctl import threadpool_limits

    with threadpool_limits(2):  # the pool: one candidate per thread (as on a 2-core machine)
        many = v.verify_many(photo, others)
    chunked = Verifier(cache=False, projection=v.projection, pool=False).verify_many(photo, others)
    assert [m.inliers for m in many] == [m.inliers for m in chunked] == [v.verify(photo, r).inliers for r in others]
    assert all(np.array_equal(m.query_points, c.query_points) for m, c in zip(many, chunked))
    assert many[1].confirmed and not many[0].confirmed and not many[2].confirmed


def test_matching_in_blocks_of_query_rows_equals_one_block(matched, monkeypatch):
    """The similarities are computed MATCH_ROWS query rows at a time; the top two per row and the mutual check's
    column maxima, gathered across the blocks, give the matches of the whole matrix at once."""
    from retrieval.match import verify

    photo, others, basis = matched
    v = Verifier(cache=False, projection=basis)
    monkeypatch.setattr(verify, "MATCH_ROWS", 1 << 30)
    whole = v.matches(photo, others)
    monkeypatch.setattr(verify, "MATCH_ROWS", 37)  # not a divisor: a short last block
    assert len(photo.points) > 10 * 37 and len(photo.points) % 37
    blocks = v.matches(photo, others)
    assert sum(len(qi) for qi, _ in whole) > 50
    for (qa, ra), (qb, rb) in zip(whole, blocks):
        assert np.array_equal(qa, qb) and np.array_equal(ra, rb)


def test_projection_is_the_top_uncentred_subspace_and_keeps_the_verdicts(matched):
    from retrieval.match.verify import _root
    from retrieval.match.words import fit_projection

    photo, others, basis = matched
    assert basis.shape == (128, 64) and np.allclose(basis.T @ basis, np.eye(64), atol=1e-4)  # orthonormal
    x = np.concatenate([_root(f.descriptors) for f in [photo] + others]).astype(np.float64)
    vt = np.linalg.svd(x, full_matrices=False)[2][:64]  # right singular vectors of the uncentred sample
    assert np.allclose(basis @ basis.T, vt.T @ vt, atol=1e-3)  # the same subspace
    assert fit_projection(x[:100]) is None  # too small a sample to learn 64 directions from
    exact = Verifier(cache=False).verify_many(photo, others)
    low = Verifier(cache=False, projection=basis).verify_many(photo, others)
    assert [e.confirmed for e in exact] == [lo.confirmed for lo in low] == [False, True, False, False]
    assert abs(low[1].inliers - exact[1].inliers) <= 0.2 * exact[1].inliers, (low[1].inliers, exact[1].inliers)
