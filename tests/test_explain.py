"""SFAM: the math against its definition, maps on real photos, and the explain outputs through the CLI."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from clitools import run, run_json
from conftest import skimage_photo
from explain.cis import channel_rows, decompose
from retrieval.index.head import LinearHead
from retrieval.metric import metric as metric_named
from explain.methods import SFAM, TAP_LAYERS, SFAMPlain, make_explainer, mutual_gate, share_maps, upsample


def cis_cosine(q, r, mu=None):
    """The CIS of the cosine of q − μ and r − μ, by the spec's definition (μ = 0 when None)."""
    m = np.zeros_like(q) if mu is None else mu
    qc, rc = np.asarray(q, np.float64) - m, np.asarray(r, np.float64) - m
    return qc * rc / (np.linalg.norm(qc) * np.linalg.norm(rc))


def _rand(seed, n=1280, relu=True):
    v = np.random.default_rng(seed).normal(size=n)
    return np.maximum(v, 0) if relu else v


@pytest.mark.parametrize("seed", range(5))
def test_cosine_cis_is_its_definition_and_sums_to_the_cosine(seed):
    """explain.cis.decompose against the spec's CIS, for the plain cosine and the cosine centred by a head; the sum
    against the cosine computed without the CIS."""
    q, r = _rand(seed), _rand(seed + 100)
    cos = q @ r / (np.linalg.norm(q) * np.linalg.norm(r))
    (d,) = decompose(q, r[None], metric_named("cosine"))
    np.testing.assert_allclose(d.cis, q * r / (np.linalg.norm(q) * np.linalg.norm(r)), rtol=1e-12)
    assert abs(d.cis.sum() - cos) < 1e-12 and abs(d.score - cos) < 1e-12 and d.exact
    mu = np.abs(_rand(seed + 200)) * 0.3
    qc, rc = q - mu, r - mu
    (d,) = decompose(q, r[None], metric_named("cosine"), LinearHead(mu))
    np.testing.assert_allclose(d.cis, cis_cosine(q, r, mu), rtol=1e-12)
    assert abs(d.score - qc @ rc / (np.linalg.norm(qc) * np.linalg.norm(rc))) < 1e-12


@pytest.mark.parametrize("seed", range(5))
def test_l2_cis_sums_to_half_the_norms_minus_the_distance(seed):
    q, r, mu = _rand(seed), _rand(seed + 1), _rand(seed + 2) * 0.5
    d = ((q - r) ** 2).sum()
    target = 0.5 * (((q - mu) ** 2).sum() + ((r - mu) ** 2).sum() - d)
    (got,) = decompose(q, r[None], metric_named("l2"), None, mu)
    np.testing.assert_allclose(got.cis, (q - mu) * (r - mu), rtol=1e-12)
    assert abs(got.cis.sum() - target) < 1e-9 * max(1, abs(target)) and got.total == pytest.approx(target, rel=1e-9)
    assert got.distance == pytest.approx(d, rel=1e-12) and got.score == pytest.approx(-d, rel=1e-12)
    assert not got.exact  # Σ CIS is the shared part, not the score: the outputs say so
    (plain,) = decompose(q, r[None], metric_named("l2"))
    assert abs(plain.cis.sum() - q @ r) < 1e-9 * abs(q @ r)  # μ = 0 degrades to q·r


def test_channel_rows_are_shares_of_the_evidence_for_the_match():
    cis = np.array([0.1, 0.5, -0.1, 0.3])
    rows, note = channel_rows(cis, 2)
    assert [t["channel"] for t in rows] == [1, 3]
    assert rows[0]["share"] == pytest.approx(0.5 / 0.9) and rows[1]["share"] == pytest.approx(0.3 / 0.9)
    rows, note = channel_rows(np.array([0.1, -0.5, -0.1]), 2)
    assert rows == [{"channel": 0, "cis": 0.1, "share": 1.0}] and "outweigh" in note  # a negative sum: in words


def test_sfam_on_real_photos_cis_matches_embedding_similarity(lite0):
    q, r = skimage_photo("chelsea"), skimage_photo("chelsea").crop((60, 0, 360, 260))
    for cls in (SFAM, SFAMPlain):  # the default map and the paper's literal one explain the same score
        e = cls(lite0).explain(q, r)
        a = lite0.embed(lite0.preprocess.batch([q, r]))[1].double()
        cos = torch.nn.functional.cosine_similarity(a[:1], a[1:]).item()
        assert abs(e.cis.sum() - cos) < 1e-5 and abs(e.score - cos) < 1e-5
    # sfam-plain's map is the ReLU of the CIS-weighted sum of the feature map's channels (the default
    # map, SFAM, is pinned against its own formula in test_default_map_equals_its_formula)
    fq = lite0.features(lite0.preprocess.batch([q]))[0].double()
    expect = torch.relu(torch.einsum("c,chw->hw", torch.as_tensor(e.cis), fq)).numpy()
    np.testing.assert_allclose(e.query_raw, expect, rtol=1e-4, atol=1e-6)


def test_identical_images_give_identical_maps(lite0):
    img = skimage_photo("astronaut")
    for metric in ("cosine", "l2"):
        e = SFAM(lite0, metric=metric, mu=np.zeros(1280)).explain(img, img.copy())
        assert np.array_equal(e.query_map, e.result_map)
        assert np.array_equal(e.query_raw, e.result_raw)


@pytest.mark.parametrize("size", [(333, 127), (127, 333), (1, 1), (4001, 61), (225, 224)])
def test_map_shape_is_the_image_shape(lite0, size):
    img = skimage_photo("coffee").resize(size)
    ex = SFAM(lite0)
    ex.map_max_side = None  # the photo's own size (the default caps the long side at 1024 px)
    e = ex.explain(skimage_photo("coffee"), img)
    assert e.result_map.shape == (size[1], size[0]) and e.result_map.dtype == np.float32
    ex.map_max_side = 1024
    h, w = size[1], size[0]
    f = min(1.0, 1024 / max(h, w))
    assert ex.explain(skimage_photo("coffee"), img).result_map.shape == (max(1, round(h * f)), max(1, round(w * f)))
    assert e.query_map.shape == (400, 600)
    assert 0 <= e.result_map.min() and e.result_map.max() <= 1


def test_upsampling_undoes_the_squash():
    raw = np.zeros((7, 7))
    raw[:, 0] = 1  # the leftmost feature column is hot
    m = upsample(raw, (100, 700))
    assert m.shape == (100, 700) and m.max() == 1
    cols = m.mean(0)
    assert cols[:50].mean() > 0.9 and cols[200:].max() == 0  # 1/7 of the width, bilinear fringe aside


def test_result_map_points_at_the_pasted_object(lite0):
    """A clear-cut composite of real photos: the cat pasted off-centre into a brick wall."""
    cat = skimage_photo("chelsea")
    scene = skimage_photo("brick").resize((224, 224))
    x0, y0 = 120, 20
    scene.paste(cat.resize((88, 88)), (x0, y0))
    e = SFAM(lite0).explain(cat, scene)
    yy, xx = np.unravel_index(np.argmax(e.result_map), e.result_map.shape)
    assert x0 <= xx < x0 + 88 and y0 <= yy < y0 + 88
    inside = e.result_map[y0:y0 + 88, x0:x0 + 88].sum() / e.result_map.sum()
    assert inside > 0.3  # the box is 15 % of the area


def test_random_weights_change_the_maps(lite0):
    from retrieval.models.loading import load_backbone

    q, r = skimage_photo("coffee"), skimage_photo("chelsea")
    a = SFAM(lite0).explain(q, r).result_map
    b = SFAM(load_backbone(random_weights=True, fast="eager")).explain(q, r).result_map
    ra, rb = np.argsort(np.argsort(a.ravel())), np.argsort(np.argsort(b.ravel()))
    assert np.corrcoef(ra, rb)[0, 1] < 0.9


@pytest.mark.parametrize("method", ["gradcam", "occlusion"])
def test_baselines_share_the_interface(lite0, method):
    q, r = skimage_photo("chelsea"), skimage_photo("chelsea").crop((60, 0, 360, 260))
    ex = make_explainer(method, lite0)
    if method == "occlusion":
        ex.patch_fraction, ex.stride_fraction = 1 / 4, 1 / 4  # coarse: keep the test fast
    e = ex.explain(q, r)
    assert e.method == method and e.result_map.shape == (260, 300) and e.query_map.shape == (300, 451)
    assert e.result_map.max() == pytest.approx(1.0) and e.cis is None
    assert e.score == pytest.approx(SFAM(lite0).explain(q, r).score, abs=1e-4)


def test_explain_cli_writes_every_file(tmp_path, lite0):
    a, b = tmp_path / "cat.png", tmp_path / "cat crop.jpg"
    cat = skimage_photo("chelsea")
    cat.save(a)
    cat.crop((50, 10, 351, 287)).save(b, quality=90)  # odd size: 301×277
    out = tmp_path / "out"
    doc = run_json("explain", a, b, "--out", out)
    assert {"query_map.npy", "result_map.npy", "pair.png", "report.html", "explain.json"} <= {p.name for p in out.iterdir()}
    qm, rm = np.load(out / "query_map.npy"), np.load(out / "result_map.npy")
    assert qm.dtype == rm.dtype == np.float16 and qm.shape == (170, 256) and rm.shape == (236, 256)  # ≤ 256 px
    assert 0 <= rm.min() and float(rm.max()) == pytest.approx(1.0, abs=1e-3)
    saved = json.loads((out / "explain.json").read_text())
    assert saved["metric"] == "cosine" and saved["method"] == "sfam" and saved["model"] == "efficientnet_lite0"
    # without an index the score is the model's own cosine at the explain resolution: computed here by its definition
    from retrieval.images import load_image

    bb = lite0.at_size(448)
    v = bb.embed_arrays([bb.preprocess.array(load_image(p, min_side=448)) for p in (a, b)]).astype(np.float64)
    cos = v[0] @ v[1] / (np.linalg.norm(v[0]) * np.linalg.norm(v[1]))
    assert saved["score"] == pytest.approx(cos, abs=1e-5) and saved["cis_sum"] == pytest.approx(cos, abs=1e-5)
    assert len(saved["top_channels"]) == 10 and all(set(c) == {"channel", "cis", "share"} for c in saved["top_channels"])
    assert doc["files"]["report"] == str(out / "report.html")
    with Image.open(out / "pair.png") as im:
        assert im.format == "PNG" and im.width > im.height
    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 2 and "share" in html and "http" not in html.split("<body")[0]


def test_explain_cli_l2_and_errors(tmp_path, lite0):
    a = tmp_path / "a.png"
    skimage_photo("coffee").save(a)
    doc = run_json("explain", a, a, "--metric", "l2", "--out", tmp_path / "o")
    assert doc["metric"] == "l2" and doc["distance"] == pytest.approx(0, abs=1e-6)
    # no index, no μ: the terms add up to ⟨q, r⟩ = ½(‖q‖² + ‖r‖² − d), here ‖v‖², computed from the backbone
    from retrieval.images import load_image

    bb = lite0.at_size(448)
    v = bb.embed_arrays([bb.preprocess.array(load_image(a, min_side=448))])[0].astype(np.float64)
    assert doc["cis_sum"] == pytest.approx(v @ v, rel=1e-5) and doc["cis_target"] == pytest.approx(v @ v, rel=1e-5)
    assert not doc["explained"]["exact"] and "exactly" not in doc["explained"]["text"]  # Σ CIS is not the score
    bad = tmp_path / "bad.jpg"
    bad.write_text("nope")
    r = run("explain", a, bad, ok=False)
    assert r.exit_code == 1 and str(bad) in r.stderr and "Traceback" not in r.stderr


def test_search_explain_outputs(photos, tmp_path):
    idx, out = tmp_path / "idx", tmp_path / "ex"
    run_json("index", photos, "--index", idx)
    res = json.loads(run("search", photos / "chelsea.jpg", "--index", idx, "-k", "3", "--explain", "--out", out,
                         "--json").stdout)
    assert len(res["results"]) == 3
    from explain.methods import map_size

    for h in res["results"]:
        ex = h["explanation"]
        nn = f"{h['rank']:02d}"
        assert ex["query_map"] == str(out / f"{nn}_query_map.npy") and ex["png"] == str(out / f"{nn}.png")
        with Image.open(h["path"]) as im:
            assert np.load(ex["result_map"]).shape == map_size((im.height, im.width), 256)
        assert ex["cis_sum"] == pytest.approx(h["score"], abs=1e-5)
        assert ex["score_is"] == "cosine similarity of the two photos' embeddings"  # 9 photos: too few to centre
    assert (out / "report.html").exists()
    text = run("search", photos / "chelsea.jpg", "--index", idx, "-k", "2", "--explain", "--out", tmp_path / "t").stdout
    assert f"report: {tmp_path / 't' / 'report.html'}" in text


def test_search_explain_with_uncentred_settings_explains_the_search_score(photos, tmp_path):
    from retrieval.index.store import IndexStore

    idx = tmp_path / "idx"
    run_json("index", photos, "--index", idx)
    with IndexStore.open(idx, writable=True) as store:
        assert store.settings.explain == {"method": "sfam", "centre": True, "input_size": 448}
        store.set_value("explain", {"method": "sfam", "centre": False, "input_size": None})
    res = json.loads(run("search", photos / "coffee.png", "--index", idx, "-k", "2", "--explain", "--out",
                         tmp_path / "ex", "--json").stdout)
    for h in res["results"]:  # whatever the explain settings: Σ CIS = the search score
        assert h["explanation"]["score"] == pytest.approx(h["score"], abs=1e-5)
        assert h["explanation"]["cis_sum"] == pytest.approx(h["score"], abs=1e-5)


def test_explain_with_an_index_uses_its_settings(photos, tmp_path):
    idx = tmp_path / "idx"
    run_json("index", photos, "--index", idx, "--metric", "l2")
    doc = run_json("explain", photos / "chelsea.jpg", photos / "more" / "cat_crop.jpg", "--index", idx,
                   "--out", tmp_path / "o")
    assert doc["metric"] == "l2" and doc["input_size"] == 448 and doc["index"] == str(idx)
    # the terms add up to ⟨q − μ, r − μ⟩ (μ: the index's mean), computed here from the stored vectors
    from retrieval.index.store import IndexStore

    with IndexStore.open(idx) as store:
        mu = np.asarray(store.get_value("mean"), np.float64)
        q, r = (np.frombuffer(store.row_by_path(str(p)).vector, np.float32).astype(np.float64)
                for p in (photos / "chelsea.jpg", photos / "more" / "cat_crop.jpg"))
    target = (q - mu) @ (r - mu)
    assert doc["distance"] == pytest.approx(((q - r) ** 2).sum(), rel=1e-3)
    assert doc["cis_sum"] == pytest.approx(target, rel=1e-3) and doc["cis_target"] == pytest.approx(target, rel=1e-3)
    assert not doc["explained"]["exact"]
    r = run("explain", photos / "chelsea.jpg", photos / "coffee.png", "--index", idx, "--metric", "cosine", ok=False)
    assert r.exit_code == 2 and "not both" in r.stderr


def test_large_rotated_jpeg_map_is_at_the_photo_upright_size(tmp_path):
    """Decoded at reduced size for the network (draft mode), explained at the photo's own, upright size."""
    big = skimage_photo("chelsea").resize((2000, 1330))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise for display
    big.save(tmp_path / "big.jpg", quality=85, exif=exif)
    skimage_photo("chelsea").save(tmp_path / "cat.png")
    doc = run_json("explain", tmp_path / "cat.png", tmp_path / "big.jpg", "--out", tmp_path / "o")
    assert np.load(doc["files"]["result_map"]).shape == (256, 170)  # long side capped, upright aspect kept
    assert doc["result_map_scale"] == pytest.approx(170 / 1330, abs=1e-4)
    full = run_json("explain", tmp_path / "cat.png", tmp_path / "big.jpg", "--out", tmp_path / "f", "--full-maps")
    assert np.load(full["files"]["result_map"]).shape == (2000, 1330)
    assert doc["score"] > 0.5  # the rotated cat is still a cat


# -- the default map: D32 · D16 · G16 (explain/methods.py SFAM) --------------------------------------------

def _maps(seed, c=64, hw=(6, 5)):
    g = torch.Generator().manual_seed(seed)
    return torch.relu(torch.randn(c, *hw, generator=g, dtype=torch.float64))


@pytest.mark.parametrize("seed", range(4))
def test_share_map_averages_exactly_to_the_similarity(seed):
    aq, ar = _maps(seed), _maps(seed + 50)
    mu = (_maps(seed + 99).mean((1, 2)) * 0.8)
    q, r = aq.mean((1, 2)), ar.mean((1, 2))
    cis = torch.as_tensor(cis_cosine(q.numpy(), r.numpy(), mu.numpy()))
    z = (q - mu).norm() * (r - mu).norm()
    dq, dr = share_maps((r - mu) / z, (q - mu) / z, aq, ar, mu)
    assert abs(dr.mean().item() - cis.sum().item()) < 1e-12 and abs(dq.mean().item() - cis.sum().item()) < 1e-12
    # its definition: the CIS weights each channel's centred map, normalised to mean 1
    expect = torch.einsum("c,chw->hw", cis, (ar - mu[:, None, None]) / (r - mu)[:, None, None])
    torch.testing.assert_close(dr, expect, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("seed", range(3))
def test_mutual_gate_is_the_mutual_nearest_neighbour_cosine(seed):
    fq, fr = _maps(seed, 16, (4, 5)) - 0.3, _maps(seed + 7, 16, (3, 6)) - 0.3
    m = torch.full((16,), 0.1, dtype=torch.float64)
    gq, gr = mutual_gate(fq, fr, m)
    vq = [(fq[:, y, x] - m) / (fq[:, y, x] - m).norm() for y in range(4) for x in range(5)]
    vr = [(fr[:, y, x] - m) / (fr[:, y, x] - m).norm() for y in range(3) for x in range(6)]
    sim = np.array([[float(a @ b) for b in vq] for a in vr])
    for s in range(len(vr)):
        t = int(sim[s].argmax())
        mutual = int(sim[:, t].argmax()) == s
        assert gr.flatten()[s].item() == pytest.approx(max(sim[s, t], 0) if mutual else 0.0, abs=1e-12)
    for t in range(len(vq)):
        s = int(sim[:, t].argmax())
        mutual = int(sim[s].argmax()) == t
        assert gq.flatten()[t].item() == pytest.approx(max(sim[s, t], 0) if mutual else 0.0, abs=1e-12)
    assert (gr > 0).sum() == (gq > 0).sum()  # mutual pairs are counted once on each side


def test_default_map_equals_its_formula(lite0):
    """raw_maps on random feature maps: the gated product ReLU(D32↑)·ReLU(D16)·G16 (paper=0: without the
    paper's map that the default adds, tested below), and the CIS stays exact."""
    mu, mu16 = _maps(3, 1280, (1, 1)).flatten() * 0.5, torch.randn(112, dtype=torch.float64) * 0.1
    aq, ar = _maps(1, 1280, (4, 3)), _maps(2, 1280, (4, 3))
    tq, tr = torch.randn(112, 8, 6, dtype=torch.float64), torch.randn(112, 8, 6, dtype=torch.float64)
    ex = SFAM(lite0, metric="cosine", mu=mu.numpy(), centre=True, mu_tap=mu16.numpy(), paper=0)
    mq, mr, info = ex.raw_maps(None, None, (aq[None], tq[None]), (ar[None], tr[None]))
    q, r = aq.mean((1, 2)), ar.mean((1, 2))
    cis = cis_cosine(q.numpy(), r.numpy(), mu.numpy())
    assert abs(info["cis"].sum() - info["cis_target"]) < 1e-12 and np.allclose(info["cis"], cis)

    def share(a, v, other, m):  # Σ_k CIS_k (a_k − m_k)/(v_k − m_k)
        c = torch.as_tensor(cis_cosine(v.numpy(), other.numpy(), m.numpy()))
        return torch.einsum("c,chw->hw", c, (a - m[:, None, None]) / (v - m)[:, None, None])

    up = lambda x: torch.nn.functional.interpolate(x[None, None], size=(8, 6), mode="bilinear",  # noqa: E731
                                                   align_corners=False)[0, 0]
    q16, r16 = tq.mean((1, 2)), tr.mean((1, 2))
    gq, gr = mutual_gate(tq, tr, mu16)
    gq, gr = (gq > 0).double(), (gr > 0).double()  # G16: 1 where the local feature has a mutual match
    assert 0 < gr.sum() < gr.numel()
    expect_r = torch.relu(up(torch.relu(share(ar, r, q, mu)))) * torch.relu(share(tr, r16, q16, mu16)) * gr
    expect_q = torch.relu(up(torch.relu(share(aq, q, r, mu)))) * torch.relu(share(tq, q16, r16, mu16)) * gq
    np.testing.assert_allclose(mr, expect_r.numpy(), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(mq, expect_q.numpy(), rtol=1e-9, atol=1e-12)
    assert info["details"]["layers"] == ["final", TAP_LAYERS["efficientnet_lite0"]]


def test_default_map_without_the_gate_or_the_tap(lite0):
    aq, ar = _maps(5, 1280, (4, 4)), _maps(6, 1280, (4, 4))
    tq, tr = torch.randn(112, 8, 8, dtype=torch.float64), torch.randn(112, 8, 8, dtype=torch.float64)
    gated = SFAM(lite0, paper=0).raw_maps(None, None, (aq[None], tq[None]), (ar[None], tr[None]))[1]
    ungated = SFAM(lite0, gate=False, paper=0).raw_maps(None, None, (aq[None], tq[None]), (ar[None], tr[None]))[1]
    gr = mutual_gate(tq, tr, torch.zeros(112, dtype=torch.float64))[1].numpy()
    np.testing.assert_allclose(gated, ungated * (gr > 0), rtol=1e-12, atol=1e-15)
    final_only = SFAM(lite0, tap=None, paper=0).raw_maps(None, None, aq[None], ar[None])[1]
    q, r = aq.mean((1, 2)), ar.mean((1, 2))  # uncentred: D32 = Σ_k q_k A_k / (‖q‖‖r‖)
    expect = torch.relu(torch.einsum("c,chw->hw", q / (q.norm() * r.norm()), ar)).numpy()
    np.testing.assert_allclose(final_only, expect, rtol=1e-9)


def test_default_map_l2_and_head_shares_average_to_their_targets(lite0):
    from types import SimpleNamespace

    aq, ar = _maps(7, 1280, (3, 3)), _maps(8, 1280, (3, 3))
    mu = aq.mean((1, 2)) * 0.3 + ar.mean((1, 2)) * 0.3
    proj = np.random.default_rng(0).normal(size=(16, 1280)) / 30
    head = LinearHead(mu.numpy(), proj)
    for kw in ({"metric": "l2", "mu": mu.numpy()}, {"metric": "cosine", "head": head}, {"metric": "l2", "head": head}):
        ex = SFAM(lite0, tap=None, **kw)
        q, r = aq.mean((1, 2)).numpy(), ar.mean((1, 2)).numpy()
        wq, wr, m = (torch.as_tensor(v) for v in ex._weights(q, r))
        dq, dr = share_maps(wq, wr, aq, ar, m)
        target = ex.similarity(q, r)["cis_target"]
        assert dr.mean().item() == pytest.approx(target, rel=1e-9, abs=1e-12)
        assert dq.mean().item() == pytest.approx(target, rel=1e-9, abs=1e-12)


def test_tap_keeps_the_search_features_bit_identical(lite0):
    bb = lite0.at_size(256)
    x = bb.preprocess.batch([skimage_photo("coffee"), skimage_photo("rocket").resize((600, 400))])
    a, t = bb.features_and_tap(x, TAP_LAYERS["efficientnet_lite0"])
    assert torch.equal(a, bb.features(x))
    assert t.shape == (2, 112, 16, 16) and a.shape == (2, 1280, 8, 8)


def _paste(obj, scene, size, box):
    canvas = scene.resize(size)
    x0, y0, x1, y1 = box
    canvas.paste(obj.resize((x1 - x0, y1 - y0)), (x0, y0))
    return canvas


def test_default_map_finds_a_small_object_pasted_into_another_photo(lite0):
    """Real photos (scikit-image's): an object pasted off-centre into another photo, box 6-8 % of a
    640×480 photo, never over its centre; μ from the photos involved, as an index would give it."""
    bb = lite0.at_size(448)
    cases = [("chelsea", "astronaut", (40, 300, 190, 430)), ("coffee", "rocket", (450, 40, 610, 170)),
             ("astronaut", "coffee", (470, 300, 610, 450)), ("rocket", "chelsea", (30, 30, 150, 220)),
             ("horse", "camera", (420, 330, 610, 450))]
    photos = {n: skimage_photo(n) for n in {c[0] for c in cases} | {c[1] for c in cases}}
    sources = list(photos.values())
    x = [bb.preprocess.batch([im]) for im in sources]
    mu = torch.cat([bb.features(v).mean((2, 3)) for v in x]).double().mean(0).numpy()
    mu16 = torch.cat([bb.features_and_tap(v, TAP_LAYERS[bb.name])[1].mean((2, 3)) for v in x]).double().mean(0).numpy()
    new = SFAM(bb, mu=mu, centre=True, mu_tap=mu16)
    old = SFAMPlain(bb, mu=mu, centre=True)
    energy = {"new": [], "old": []}
    for obj, scene, box in cases:
        x0, y0, x1, y1 = box
        assert 0.05 <= (x1 - x0) * (y1 - y0) / (640 * 480) <= 0.10 and not (x0 <= 320 < x1 and y0 <= 240 < y1)
        comp = _paste(photos[obj], photos[scene], (640, 480), box)
        for key, ex in (("new", new), ("old", old)):
            m = ex.explain(photos[obj], comp).result_map
            assert m.shape == (480, 640)
            energy[key].append(m[y0:y1, x0:x1].sum() / m.sum())
            if key == "new":
                yy, xx = np.unravel_index(np.argmax(m), m.shape)
                assert x0 <= xx < x1 and y0 <= yy < y1, (obj, scene)
    assert np.mean(energy["new"]) > 0.5 and np.mean(energy["new"]) > np.mean(energy["old"]) + 0.1, energy


@pytest.mark.parametrize("lam,gamma", [(0.5, 4.0), (0.2, 1.0)])
def test_default_map_adds_the_papers_map(lite0, lam, gamma):
    """With g = gated/max and s = λ·(up(ReLU(Σ_k CIS_k A_k))/max)^γ (the paper's map with the same CIS):
    map = g + s·(1 − g) = 1 − (1 − g)(1 − s). s fills in the locations the gated product leaves at 0; the CIS (and
    what it sums to) is unchanged."""
    mu, mu16 = _maps(13, 1280, (1, 1)).flatten() * 0.5, torch.randn(112, dtype=torch.float64) * 0.1
    aq, ar = _maps(11, 1280, (4, 3)), _maps(12, 1280, (4, 3))
    tq, tr = torch.randn(112, 8, 6, dtype=torch.float64), torch.randn(112, 8, 6, dtype=torch.float64)
    kw = {"metric": "cosine", "mu": mu.numpy(), "centre": True, "mu_tap": mu16.numpy(), "frame": None}
    feats = (None, None, (aq[None], tq[None]), (ar[None], tr[None]))
    gq, gr, info0 = SFAM(lite0, paper=0, **kw).raw_maps(*feats)
    mq, mr, info = SFAM(lite0, paper=lam, paper_power=gamma, **kw).raw_maps(*feats)
    cis = cis_cosine(aq.mean((1, 2)).numpy(), ar.mean((1, 2)).numpy(), mu.numpy())
    np.testing.assert_allclose(info["cis"], cis, rtol=1e-12)
    assert abs(info["cis"].sum() - info["cis_target"]) < 1e-12 and info["cis_target"] == info0["cis_target"]
    up = lambda x: torch.nn.functional.interpolate(x[None, None], size=(8, 6), mode="bilinear",  # noqa: E731
                                                   align_corners=False)[0, 0].numpy()
    c = torch.as_tensor(cis)
    paper_q = up(torch.relu(torch.einsum("c,chw->hw", c, aq)))
    paper_r = up(torch.relu(torch.einsum("c,chw->hw", c, ar)))
    assert gr.max() > 0 and (gr == 0).any() and paper_r.max() > 0
    for got, gated, paper in ((mr, gr, paper_r), (mq, gq, paper_q)):
        g, sp = gated / gated.max(), lam * (paper / paper.max()) ** gamma
        np.testing.assert_allclose(got, 1 - (1 - g) * (1 - sp), rtol=1e-9, atol=1e-12)
        # the gated map's maximum stays the map's (pointing unchanged), and the map stays in [0, 1]
        assert got.max() == 1.0 and np.all(got[g < 1] < 1) and got.min() >= 0
    assert (mr > 0).sum() > (gr > 0).sum()  # denser: fewer ties for deletion/insertion to order at random
    assert "SFAM_paper" in info["details"]["map"]


def test_default_map_weight_of_the_papers_map(lite0):
    from explain.methods import PAPER_WEIGHT

    from explain.methods import PAPER_POWER

    assert SFAM(lite0).paper == PAPER_WEIGHT == make_explainer("sfam", lite0).paper
    assert SFAM(lite0).paper_power == PAPER_POWER


def _blur_by_definition(m: np.ndarray, sigma: float) -> np.ndarray:
    """Σ_ij k_i k_j m[y+i, x+j], k ∝ exp(−i²/2σ²) on −R…R, R = int(4σ + 0.5), edges repeated."""
    rad = int(4 * sigma + 0.5)
    k = np.exp(-0.5 * (np.arange(-rad, rad + 1) / sigma) ** 2)
    k /= k.sum()
    p = np.pad(m, rad, mode="edge")
    out = np.zeros_like(m)
    for i in range(-rad, rad + 1):
        for j in range(-rad, rad + 1):
            out += k[i + rad] * k[j + rad] * p[rad + i:rad + i + m.shape[0], rad + j:rad + j + m.shape[1]]
    return out


def test_gaussian_blur_and_frame_weight_equal_their_definitions():
    from explain.methods import frame_weight, gaussian_blur

    m = torch.rand(2, 9, 7, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    for sigma in (0.6, 1.0, 1.7):
        got = gaussian_blur(m, sigma).numpy()
        for a, b in zip(got, m.numpy()):
            np.testing.assert_allclose(a, _blur_by_definition(b, sigma), rtol=1e-12, atol=1e-14)
    assert torch.equal(gaussian_blur(m, 0), m)
    kappa = torch.tensor([0.0, 0.25, 0.5, 0.5001, 0.9], dtype=torch.float64)
    np.testing.assert_allclose(frame_weight(kappa, 0.5).numpy(), [0, 0, 0, 1, 1], atol=0)


def test_default_map_is_the_smoothed_papers_map_when_the_match_covers_most_of_the_frame(lite0):
    """The default map = g ⊕ s while κ ≤ the switch (½), and blur(P↑)/max once κ is above it (κ = the share of that
    side's stride-16 cells with a mutual match, G16 > 0; P the paper's map with the same CIS; the blur Gaussian with
    σ = one cell). Each side has its own κ; the CIS is unchanged."""
    from explain.methods import FRAME_BLUR, FRAME_SWITCH

    assert SFAM(lite0).frame == FRAME_SWITCH == 0.5 and SFAM(lite0).frame_blur == FRAME_BLUR == 1.0
    mu, mu16 = _maps(23, 1280, (1, 1)).flatten() * 0.5, torch.randn(112, dtype=torch.float64) * 0.1
    aq, ar = _maps(21, 1280, (4, 3)), _maps(22, 1280, (4, 3))
    tq, tr = torch.randn(112, 8, 6, dtype=torch.float64), torch.randn(112, 8, 6, dtype=torch.float64)
    tr[:, :3] = tq[:, :3] + 0.3 * tr[:, :3]  # part of the result matches: more mutual pairs than chance
    kw = {"metric": "cosine", "mu": mu.numpy(), "centre": True, "mu_tap": mu16.numpy()}
    feats = (None, None, (aq[None], tq[None]), (ar[None], tr[None]))
    gq, gr = mutual_gate(tq, tr, mu16)
    kq, kr = float((gq > 0).double().mean()), float((gr > 0).double().mean())
    assert 0 < kr < 1
    base_q, base_r, _ = SFAM(lite0, frame=None, **kw).raw_maps(*feats)
    cis = cis_cosine(aq.mean((1, 2)).numpy(), ar.mean((1, 2)).numpy(), mu.numpy())
    up = lambda x: torch.nn.functional.interpolate(x[None, None], size=(8, 6), mode="bilinear",  # noqa: E731
                                                   align_corners=False)[0, 0].numpy()
    c = torch.as_tensor(cis)
    switch = kr - 0.01  # the result side's κ is above it: that side is the whole-frame map
    mq, mr, info = SFAM(lite0, frame=switch, frame_blur=1.0, **kw).raw_maps(*feats)
    np.testing.assert_allclose(info["cis"], cis, rtol=1e-12)
    assert info["details"]["gate_coverage"] == pytest.approx([kq, kr]) and info["details"]["frame_weight"][1] == 1
    for got, base, a, kappa in ((mr, base_r, ar, kr), (mq, base_q, aq, kq)):
        if kappa > switch:
            f = _blur_by_definition(up(torch.relu(torch.einsum("c,chw->hw", c, a))), 1.0)
            np.testing.assert_allclose(got, f / f.max(), rtol=1e-9, atol=1e-12)
        else:
            np.testing.assert_allclose(got, base, rtol=1e-12, atol=1e-15)
    assert not np.allclose(mr, base_r)  # the switch changed the map
    at = SFAM(lite0, frame=kr, **kw).raw_maps(*feats)[1]  # κ not above the switch: g ⊕ s unchanged
    np.testing.assert_allclose(at, base_r, rtol=1e-12, atol=1e-15)
