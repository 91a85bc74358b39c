"""The linear head (centring + PCA-whitening) and query expansion: contracts, not just shapes."""
from __future__ import annotations

import json

import numpy as np
import pytest

from clitools import run, run_json
from explain.cis import decompose
from retrieval.metric import metric as metric_named
from explain.methods import SFAM
from retrieval.index.head import fit_head
from retrieval.index.store import IndexStore


def test_fitted_head_is_linear_and_whitens():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(500, 40)) @ rng.normal(size=(40, 40)) + 3.0
    head = fit_head([x[:250], x[250:]], {"type": "pca-whiten", "dim": 16})
    assert head.dim == 16 and head.fitted_on == 500
    a, b = x[:3], x[3:6]
    np.testing.assert_allclose(head.apply(2 * a - b), 2 * head.apply(a) - head.apply(b) - head.apply(head.mean[None]),
                               rtol=1e-4, atol=1e-4)  # affine: P(a − m)
    e = head.apply(x).astype(np.float64)
    np.testing.assert_allclose(e.mean(0), 0, atol=1e-4)
    lam = np.linalg.eigvalsh(np.cov(e.T))
    assert lam.max() / lam.min() < 20  # whitened (with shrinkage), far from the raw spread
    assert fit_head([x[:9]], {"type": "pca-whiten", "dim": 16}) is None  # too few to fit


def test_head_by_collection_size_against_its_definition():
    """Below MIN_CENTRE vectors no head; below MIN_WHITEN a PCA head only centres; from there the top-D axes scaled by
    (λ + s·λ̄)^-1/2 with the shrinkage s = max(0.1, D/n) (bench/results/quality-sizes.md). Checked against an eigen-
    decomposition of the covariance computed here."""
    from retrieval.index.head import MIN_CENTRE, MIN_WHITEN

    rng = np.random.default_rng(2)
    x = rng.normal(size=(600, 40)) @ rng.normal(size=(40, 40)) + 3.0
    cfg = {"type": "pca-whiten", "dim": 16}
    assert fit_head([x[:MIN_CENTRE - 1]], cfg) is None and fit_head([x[:MIN_CENTRE - 1]], {"type": "centre"}) is None
    for kind in (cfg, {"type": "centre"}):
        h = fit_head([x[:MIN_WHITEN - 1]], kind)
        assert h.proj is None and h.dim == 40 and np.allclose(h.mean, x[:MIN_WHITEN - 1].mean(0))
        np.testing.assert_allclose(h.apply(x[:3]), x[:3] - h.mean, rtol=1e-5, atol=1e-5)
    assert fit_head([x], {"type": "centre"}).proj is None  # centring only, at any size
    for n in (MIN_WHITEN, 600):
        h = fit_head([x[:n]], cfg)
        lam, vec = np.linalg.eigh(np.cov(x[:n].T, bias=True))
        lam, vec = lam[::-1][:16], vec[:, ::-1][:, :16]
        s = max(0.1, 16 / n)
        expect = (vec / np.sqrt(lam + s * lam.mean())).T
        signs = np.sign((h.proj * expect).sum(1))  # eigenvectors are defined up to sign
        np.testing.assert_allclose(h.proj * signs[:, None], expect, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("metric", ["cosine", "l2"])
def test_cis_through_the_head_is_exact(metric):
    rng = np.random.default_rng(1)
    x = np.maximum(rng.normal(size=(300, 64)), 0)
    head = fit_head([x], {"type": "pca-whiten", "dim": 24})
    q, r = x[0], x[1]
    (info,) = decompose(q, r[None], metric_named(metric), head)
    eq, er = head.apply(q)[0].astype(np.float64), head.apply(r)[0].astype(np.float64)
    if metric == "cosine":
        expect = eq @ er / (np.linalg.norm(eq) * np.linalg.norm(er))
        assert info.cis.sum() == pytest.approx(expect, abs=1e-5) and info.score == pytest.approx(expect, abs=1e-5)
    else:
        d = ((eq - er) ** 2).sum()
        assert info.distance == pytest.approx(d, rel=1e-4)
        assert info.cis.sum() == pytest.approx(eq @ er, rel=1e-4)  # ⟨e_q, e_r⟩: the head centres by itself


def test_head_is_stored_refit_and_searched(photos, tmp_path):
    idx = tmp_path / "idx"
    # 9 photos are too few to fit (MIN_CENTRE): the index works without a head until enough exist
    rep = run_json("index", photos, "--index", idx, "--head", "pca-whiten:8")
    assert rep["total"] == 9
    with IndexStore.open(idx) as store:
        assert store.settings.head == {"type": "pca-whiten", "dim": 8} and store.head is None
    # more photos: crops of the collection's own photos
    from PIL import Image

    for p in sorted(photos.glob("*.*g")):
        im = Image.open(p).convert("RGB")
        w, h = im.size
        for i in range(6):  # 57 photos: enough to whiten (MIN_WHITEN)
            im.crop((i * w // 14, i * h // 14, w - i * w // 16, h - (5 - i) * h // 16)).save(photos / f"{p.stem}_{i}.png")
    rep = run_json("index", photos, "--index", idx)
    assert rep["total"] == 9 + 48
    with IndexStore.open(idx) as store:
        head = store.head
        assert head is not None and head.dim == 8 and head.fitted_on == 57
        assert store.faiss_index().d == 8
        raw = np.frombuffer(store.row_by_path(str(photos / "chelsea.jpg")).vector, np.float32)
        t = store.transform(raw[None])[0]
        e = head.apply(raw[None])[0]
        np.testing.assert_allclose(t, e / np.linalg.norm(e), rtol=1e-5, atol=1e-6)
    info = run_json("info", "--index", idx)
    assert info["head"] == "pca-whiten:8 (fitted on 57 images, 8 dims)"
    # search scores are cosines of head outputs, and an explanation with the head decomposes them exactly
    (res,) = [json.loads(l) for l in run("search", photos / "chelsea.jpg", "--index", idx, "--json", "-k", "3")
              .stdout.splitlines()]
    with IndexStore.open(idx) as store:
        rows = {h["path"]: np.frombuffer(store.row_by_path(h["path"]).vector, np.float32) for h in res["results"]}
        for h in res["results"]:
            v = store.transform(rows[h["path"]][None])[0]
            assert h["score"] == pytest.approx(float(v @ t), abs=1e-4)
    # a different head on an existing index is refused; --refit re-fits
    r = run("index", photos, "--index", idx, "--head", "pca:16", ok=False)
    assert r.exit_code == 1 and "head" in r.stderr
    run_json("index", photos, "--index", idx, "--refit")


def test_sfam_with_head_decomposes_the_head_similarity(lite0, photo_dir):
    from PIL import Image

    imgs = [Image.open(p).convert("RGB") for p in sorted(photo_dir.rglob("*.*g"))]
    feats = lite0.embed(lite0.preprocess.batch(imgs))[1].double().numpy()
    head = fit_head([np.repeat(feats, 5, 0) + np.random.default_rng(0).normal(0, 0.01, (len(feats) * 5, 1280))],
                    {"type": "pca-whiten", "dim": 16})
    e = SFAM(lite0, head=head).explain(imgs[0], imgs[1])
    eq, er = head.apply(feats[:1])[0].astype(np.float64), head.apply(feats[1:2])[0].astype(np.float64)
    assert e.cis.sum() == pytest.approx(eq @ er / (np.linalg.norm(eq) * np.linalg.norm(er)), abs=1e-3)
    assert e.cis.sum() == pytest.approx(e.score, abs=1e-9)


def test_query_expansion_is_off_by_default_and_keeps_query_scores(photos, tmp_path):
    idx = tmp_path / "idx"
    run_json("index", photos, "--index", idx)
    plain = json.loads(run("search", photos / "chelsea.jpg", "--index", idx, "--json").stdout)
    default = json.loads(run("search", photos / "chelsea.jpg", "--index", idx, "--json", "--qe", "0").stdout)
    assert plain == default
    qe = json.loads(run("search", photos / "chelsea.jpg", "--index", idx, "--json", "--qe", "1").stdout)
    assert qe["results"][0]["path"] == plain["results"][0]["path"]  # the cat crop stays first
    by_path = {h["path"]: h["score"] for h in plain["results"]}
    for h in qe["results"]:  # scores remain similarities to the query itself
        assert h["score"] == pytest.approx(by_path[h["path"]], abs=1e-4)
    assert [h["rank"] for h in qe["results"]] == list(range(1, len(qe["results"]) + 1))
