"""Phone photo → catalogue: the visual-word inverted file (retrieval/match/words.py) and ``search --within``."""
from __future__ import annotations

import io
from pathlib import Path
import random

import numpy as np
import pytest
from PIL import Image, ImageEnhance, ImageFilter, ImageOps

from clitools import run, run_json, run_process, run_watching_imports
from conftest import skimage_photo
from retrieval.match import words
from retrieval.index.store import IndexStore
from retrieval.match.verify import MIN_INLIERS, Verifier

CATALOGUE = ("astronaut", "rocket", "camera", "coins", "horse")


def _jpeg(img: Image.Image, quality: int) -> Image.Image:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality)
    return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")


def phone_photo(obj: Image.Image, background: Image.Image, seed: int = 0) -> Image.Image:
    """``obj`` re-photographed: cropped, warped in perspective, re-lit, blurred, small in a cluttered scene
    (``background``), JPEG'd."""
    rng = random.Random(seed)
    bg = background.resize((640, 480))
    w0, h0 = obj.size
    obj = obj.crop((int(0.06 * w0), int(0.04 * h0), int(0.95 * w0), int(0.97 * h0)))  # partly out of frame
    obj = obj.resize((250, round(250 * obj.height / obj.width)))
    w, h = obj.size
    jit = [rng.uniform(-0.12, 0.12) * w for _ in range(8)]
    quad = (jit[0], jit[1], jit[2], h + jit[3], w + jit[4], h + jit[5], w + jit[6], jit[7])
    warped = obj.transform((w, h), Image.QUAD, quad, Image.BILINEAR)
    mask = Image.new("L", (w, h), 255).transform((w, h), Image.QUAD, quad, Image.BILINEAR)
    warped = ImageEnhance.Brightness(ImageEnhance.Contrast(warped).enhance(0.8)).enhance(0.85)
    warped = warped.filter(ImageFilter.GaussianBlur(0.7))
    bg.paste(warped, (360, 200), mask)
    return _jpeg(bg, 80)


def lookalike(photo: Image.Image, seed: int) -> Image.Image:
    """``photo`` mirrored, re-framed and re-exposed: the same picture to a global embedding (nearly
    mirror-invariant), other local descriptors (SIFT is not): a look-alike that verification rejects."""
    rng = np.random.default_rng(seed)
    img = ImageOps.mirror(photo.resize((320, 240)))
    dx, dy = (int(v) for v in rng.integers(0, 20, 2))
    img = img.crop((dx, dy, dx + 300, dy + 225)).resize((320, 240))  # small: cheap to index
    img = ImageEnhance.Brightness(img).enhance(float(rng.uniform(0.9, 1.1)))
    arr = np.asarray(img, np.float32) + rng.normal(0, 3, (240, 320, 3))
    return _jpeg(Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)), 85)


@pytest.fixture(scope="module")
def shop(tmp_path_factory):
    """catalogue/: clean product shots; photos/: 66 mirrored look-alikes of the query; query: the astronaut
    product photographed in a cluttered scene (not indexed). Globally the look-alikes are the query, so the
    catalogue image ranks behind all 66 (no whitening head here: it would be fitted on 66 near-copies);
    locally only the catalogue image is the astronaut."""
    root = tmp_path_factory.mktemp("shop")
    cat, photos = root / "catalogue", root / "photos"
    cat.mkdir()
    photos.mkdir()
    for name in CATALOGUE:
        skimage_photo(name).save(cat / f"{name}.jpg", quality=92)
    photo = phone_photo(skimage_photo("astronaut"), skimage_photo("coffee"))
    for i in range(66):
        lookalike(photo, i).save(photos / f"shot{i:02d}.jpg")
    query = tmp_path_factory.mktemp("query") / "phone.jpg"
    photo.save(query, quality=85)
    idx = root / "idx"
    run("index", cat, photos, "--index", idx, "--preset", "instance", "--head", "none")
    return root, idx, query


def _rank(res: dict, name: str):
    return next((h["rank"] for h in res["results"] if h["path"].endswith(name)), None)


def test_photo_beyond_the_global_shortlist_is_found_through_the_inverted_file(shop):
    root, idx, query = shop
    base = run_json("search", query, "--index", idx, "-k", "80", "--words", "0", "--verify", "60")
    rank = _rank(base, "astronaut.jpg")
    assert rank is not None and rank > 60, rank  # the global embedding puts it beyond a verified top 60
    assert next(h for h in base["results"] if h["rank"] == rank).get("inliers") is None  # never verified
    res = run_json("search", query, "--index", idx, "-k", "5")  # the preset's verify 8, words 25
    top = res["results"][0]
    assert top["path"].endswith("astronaut.jpg") and top["inliers"] >= MIN_INLIERS, res["results"]


def test_within_answers_from_the_catalogue_only(shop):
    root, idx, query = shop
    res = run_json("search", query, "--index", idx, "-k", "3", "--within", root / "catalogue")
    assert len(res["results"]) == 3 and all("/catalogue/" in h["path"] for h in res["results"])
    assert res["results"][0]["path"].endswith("astronaut.jpg") and res["results"][0]["inliers"] >= MIN_INLIERS
    plain = run_json("search", query, "--index", idx, "-k", "3", "--within", root / "photos", "--verify", "0")
    assert all("/photos/" in h["path"] for h in plain["results"])
    empty = root / "empty"
    empty.mkdir(exist_ok=True)
    p = run_process("search", query, "--index", idx, "--within", empty)
    assert p.returncode != 0 and "--within" in p.stderr and "none of the images" in p.stderr, p.stderr
    assert len(p.stderr.strip().splitlines()) == 1


def test_inverted_file_follows_additions_removals_and_damage(tmp_path, monkeypatch):
    photos = tmp_path / "p"
    photos.mkdir()
    scene = skimage_photo("chelsea")
    for name in CATALOGUE[:3]:
        skimage_photo(name).save(photos / f"{name}.jpg", quality=92)
    for i in range(4):
        lookalike(scene, i).save(photos / f"s{i}.jpg")  # (mirrored cats)
    idx = tmp_path / "idx"
    run("index", photos, "--index", idx, "--preset", "instance")
    with IndexStore.open(idx) as store:
        v = Verifier.for_index(store.settings)  # the index's own side and budget

    def state():
        with IndexStore.open(idx) as store:
            ids = set(store.row_ids().tolist())
            return words.file_state(store, v), ids, set(words.WordIndex.load(idx, words.signature(v)).bags)

    st, ids, bags = state()
    assert st == "ok" and ids == bags and len(ids) == 7
    vocab = words.WordIndex.load(idx, words.signature(v)).vocab.top.copy()
    skimage_photo("coins").save(photos / "coins.jpg", quality=92)  # added
    (photos / "s0.jpg").unlink()  # removed
    run("index", photos, "--index", idx)
    st, ids2, bags2 = state()
    assert st == "ok" and ids2 == bags2 and len(ids2) == 7 and ids2 != ids
    assert np.array_equal(words.WordIndex.load(idx, words.signature(v)).vocab.top, vocab)  # incremental
    query = tmp_path / "q.jpg"
    phone_photo(skimage_photo("astronaut"), scene, seed=3).save(query)
    good = run_json("search", query, "--index", idx, "-k", "1")["results"][0]
    assert good["path"].endswith("astronaut.jpg") and good["inliers"] >= MIN_INLIERS
    # damaged in place (same size, bytes flipped): detected, never searched, rebuilt from the stored data
    f = idx / words.WORDS_NAME
    data = bytearray(f.read_bytes())
    for at in range(len(data) // 3, len(data) // 3 + 64):
        data[at] ^= 0xFF
    f.write_bytes(bytes(data))
    assert words.WordIndex.load(idx, words.signature(v)) is None
    with IndexStore.open(idx) as store:
        assert words.file_state(store, v) == "damaged"
    again = run_json("search", query, "--index", idx, "-k", "1")["results"][0]
    assert again["path"] == good["path"] and again["inliers"] == good["inliers"]
    # damaged where a search maps the file (the postings' signatures) and does not read it whole: the words it
    # reads fail their checksums, the file is read whole, fails, and is made again; the search's answer is unchanged.
    # (Seven images are verified whole, reading no postings: the stages of a larger collection are forced.)
    from retrieval.match import search as search_module

    monkeypatch.setattr(search_module, "whole_budget", lambda *a: 0)
    good = run_json("search", query, "--index", idx, "-k", "1")["results"][0]
    assert good["path"].endswith("astronaut.jpg") and good["inliers"] >= MIN_INLIERS
    post_sig = words._members(f, ("post_sig",))["post_sig"]
    start, end = post_sig.base.offset, post_sig.base.offset + post_sig.nbytes
    del post_sig
    data = bytearray(f.read_bytes())
    data[start:end] = bytes(b ^ 0x5A for b in data[start:end])
    f.write_bytes(bytes(data))
    assert words.WordIndex.load(idx, words.signature(v), mapped=True) is not None  # (its structure is whole)
    with IndexStore.open(idx) as store:
        assert words.file_state(store, v) == "damaged"
    real, wholes = words.sync, []
    monkeypatch.setattr(words, "sync", lambda *a, **kw: wholes.append(kw.get("whole")) or real(*a, **kw))
    again = run_json("search", query, "--index", idx, "-k", "1")["results"][0]
    assert again["path"] == good["path"] and again["inliers"] == good["inliers"]
    assert wholes == [False, True]  # mapped, found damaged as read, read whole
    with IndexStore.open(idx) as store:
        assert words.file_state(store, v) == "ok"  # written again by the search, as the index's writer
    # `retrieve check` reads it whole: damage is reported (exit 1), and --repair makes the file again
    assert run_json("check", "--index", idx)["words_file"] == "ok"
    data = bytearray(f.read_bytes())
    data[start + 8] ^= 1
    f.write_bytes(bytes(data))
    r = run("check", "--index", idx, ok=False)
    assert r.exit_code == 1 and "visual-words file damaged" in r.stdout and "NOT consistent" in r.stdout
    r = run("check", "--repair", "--index", idx)
    assert "repaired: made the visual-words file again" in r.stdout and r.stdout.rstrip().endswith("consistent")
    assert "vector file" not in r.stdout  # (only what was damaged is made again)
    assert run_json("check", "--index", idx)["words_file"] == "ok"
    assert state()[0] == "ok"  # the search wrote the rebuilt file back
    # truncated, or its fingerprint gone: rebuilt as well
    f.write_bytes(f.read_bytes()[:1000])
    (idx / words.META_NAME).unlink()
    assert run_json("search", query, "--index", idx, "-k", "1")["results"][0]["path"] == good["path"]
    assert state()[0] == "ok"


def test_asmk_signatures_and_scores_match_their_definition():
    """Vocabulary.bag: each descriptor's word is its nearest top centre's nearest sub-centre (RootSIFT), and a
    word's signature bit j is set when the sum of its descriptors' residuals, projected on axis j, is positive
    (bit 63 − j: the first axis is the high bit). search: ASMK*, written out image by image."""
    rng = np.random.default_rng(0)

    def root(d):
        return np.sqrt(d / np.maximum(d.sum(1, keepdims=True), 1e-6))

    protos = rng.integers(0, 256, (8, 128)).astype(np.float64)  # 8 × 8 words around 64 SIFT-like prototypes
    near = np.clip(protos[:, None, :] + rng.integers(-80, 81, (8, 8, 128)), 0, 255)
    top, sub = root(protos).astype(np.float32), root(near.reshape(64, 128)).reshape(8, 8, 128).astype(np.float32)
    basis = np.linalg.qr(rng.standard_normal((128, 128)))[0][:, :64].astype(np.float32)
    vocab = words.Vocabulary(top, sub, basis)
    wi = words.WordIndex(vocab, 6, "t")

    def bag_by_definition(desc):
        root_ = root(desc)
        t = ((root_[:, None, :] - top[None]) ** 2).sum(2).argmin(1)
        w = np.array([t[i] * 8 + ((root_[i] - sub[t[i]]) ** 2).sum(1).argmin() for i in range(len(root_))])
        out = {}
        for word in np.unique(w):
            res = (root_[w == word] - sub.reshape(64, 128)[word]).sum(0) @ basis
            out[int(word)] = (int((w == word).sum()), sum(1 << (63 - j) for j in range(64) if res[j] > 0))
        return out

    bags, seen = {}, []
    for i in range(6):
        pick = rng.integers(0, 64, int(rng.integers(8, 20)))
        desc = np.clip(near.reshape(64, 128)[pick] + rng.integers(-30, 31, (len(pick), 128)), 0, 255)
        w, n, sig = vocab.bag(desc.astype(np.uint8))
        want = bag_by_definition(desc)
        assert w.tolist() == sorted(want) and n.tolist() == [want[x][0] for x in sorted(want)]
        assert [int(x) for x in sig] == [want[x][1] for x in sorted(want)]
        wi.set(10 + i, f"sha{i}", w, n, sig)
        bags[10 + i] = {x: want[x][1] for x in want}
        seen.append(desc)
    # the query: some descriptors of three of the images, a little changed, and others
    desc = np.concatenate([seen[0][:6], seen[2][:4], seen[3][:8], near.reshape(64, 128)[rng.integers(0, 64, 10)]])
    desc = np.clip(desc + rng.integers(-6, 7, desc.shape), 0, 255).astype(np.uint8)
    query = bag_by_definition(desc.astype(np.float64))
    N = len(bags)
    df = np.zeros(64)
    for b in bags.values():
        for x in b:
            df[x] += 1
    idf = np.log((N + 1) / (df + 1))
    query = {x: v[1] for x, v in query.items() if df[x] <= max(words.STOP_SHARE * N, words.STOP_MIN)}

    def asmk(b):
        total = 0.0
        for x, sig in b.items():
            if x in query:
                u = 1 - 2 * bin(sig ^ query[x]).count("1") / 64
                total += idf[x] * (u ** 3 if u > 0 else 0.0)
        return total / max(np.sqrt(sum(idf[x] for x in b)), 1e-12) / max(np.sqrt(sum(idf[x] for x in query)), 1e-12)

    expect = {i: asmk(b) for i, b in bags.items()}
    got = dict(wi.search(desc, 6))
    assert set(got) == {i for i, s in expect.items() if s > 0} and len(got) >= 3
    for i, s in got.items():
        assert s == pytest.approx(expect[i], rel=1e-5)
    assert list(got) == sorted(got, key=lambda i: -got[i])  # best first
    allowed = np.array([11, 12])
    assert set(dict(wi.search(desc, 6, allowed))) <= {11, 12}
    assert 13 not in dict(wi.search(desc, 6, exclude=[13]))


@pytest.fixture(scope="module")
def shop_with_role(shop, tmp_path_factory):
    """A copy of ``shop``'s index whose catalogue/ folder is recorded as its catalogue (index --catalogue)."""
    import shutil

    root, idx, query = shop
    idx2 = tmp_path_factory.mktemp("role") / "idx"
    shutil.copytree(idx, idx2)
    p = run_process("index", root / "catalogue", "--index", idx2, "--catalogue")
    assert p.returncode == 0, p.stderr
    assert f"catalogue: {(root / 'catalogue').resolve()}" in p.stdout
    return root, idx2, query


def test_a_catalogue_of_many_files_is_one_short_line_and_json_lists_all(shop, tmp_path):
    """Catalogue images given one by one (a shell glob) are recorded each; the text output names the count and
    the first three instead of a line as long as the catalogue; ``--json`` keeps every path."""
    import shutil

    root, idx, _ = shop
    idx2 = tmp_path / "idx"
    shutil.copytree(idx, idx2)
    files = sorted(str(p.resolve()) for p in (root / "catalogue").iterdir())
    assert len(files) == 5
    out = run("index", *files, "--index", idx2, "--catalogue").stdout
    want = f"catalogue: 5 paths: {', '.join(files[:3])} and 2 more (--json lists all)"
    assert want in out.splitlines()
    line = next(ln for ln in run("info", "--index", idx2).stdout.splitlines() if ln.startswith("catalogue"))
    assert line.split(None, 1)[1] == want.split(": ", 1)[1]
    assert run_json("info", "--index", idx2)["catalogue"] == files


def test_catalogue_role_verifies_its_images_beyond_the_global_shortlist(shop, shop_with_role):
    root, idx, query = shop_with_role
    info = run_json("info", "--index", idx)
    assert info["catalogue"] == [str((root / "catalogue").resolve())]
    # without words, the global top 30 (all look-alikes) alone never reaches the catalogue image (rank > 60) ...
    off = run_json("search", query, "--index", idx, "-k", "5", "--verify", "30", "--words", "0", "--catalogue", "0")
    assert all(not h["path"].endswith("astronaut.jpg") for h in off["results"]), off["results"]
    # ... the role's catalogue stage does: the top 20 catalogue images by the embedding are verified too (the
    # global ranks 31-50 after the top 30 are look-alikes, so only a stage restricted to the catalogue finds it)
    res = run_json("search", query, "--index", idx, "-k", "5", "--verify", "30", "--words", "0")
    top = res["results"][0]
    assert top["path"].endswith("astronaut.jpg") and top["inliers"] >= MIN_INLIERS, res["results"]
    # the unconfirmed catalogue candidates are not answers: only the confirmed one joined the results
    assert sum("/catalogue/" in h["path"] for h in res["results"]) == 1, res["results"]
    # an index without the role is unchanged (the shop fixture's own index)
    plain = run_json("search", shop[2], "--index", shop[1], "-k", "5", "--verify", "30", "--words", "0")
    assert all(not h["path"].endswith("astronaut.jpg") for h in plain["results"])


def test_the_web_app_searches_an_index_with_a_catalogue_as_the_cli_does(shop_with_role, tmp_path):
    """`retrieve serve`'s search uses the index's words and catalogue stage, as `retrieve search` does without
    options (it passed neither before, so the catalogue image beyond the global shortlist was missing)."""
    from web.service import Service

    root, idx, query = shop_with_role
    cli = run_json("search", query, "--index", idx, "-k", "5", "--verify", "30")
    c = Service(idx, cache_dir=tmp_path / "cache")
    try:
        token = c.add_upload(Path(query).read_bytes(), Path(query).name)["token"]
        web = c.search(f"upload:{token}", k=5, verify=30)
    finally:
        c.close()  # its uploads' temporary folder goes with it
    assert [h["path"] for h in web["results"]] == [h["path"] for h in cli["results"]], (web["results"], cli)
    assert web["results"][0]["path"].endswith("astronaut.jpg")


def test_a_verified_search_reads_the_index_without_sqlalchemy(shop_with_role):
    """Verification, visual words, the catalogue role and ``--within`` read a plain SQLite index through sqlite3
    (retrieval/index/store.py's light path): the same hits, scores and inliers as through SQLAlchemy with the same
    network; and
    ``retrieve search`` with the index's defaults (verify, words, catalogue) imports neither SQLAlchemy nor torch."""
    import json

    from retrieval.index import catalogue
    from retrieval.match.search import Searcher
    from retrieval.models.loader import backbone_for_settings

    root, idx, query = shop_with_role
    lite = IndexStore.open(idx)
    assert lite._sqlite is not None  # read through sqlite3
    with lite, IndexStore(idx.resolve()) as full:  # the same rows through SQLAlchemy
        assert sorted(lite.row_paths()) == sorted(full.row_paths()) and len(lite.row_paths()) == 71
        backbone = backbone_for_settings(full.settings)
        for within in (None, root / "catalogue"):
            def hits(store):
                res = next(Searcher(store, backbone, within=within).search_paths(
                    [str(query)], 5, verify=8, words=25, catalogue=catalogue.DEPTH if within is None else 0))
                return [(h.id, h.path, h.score, h.inliers) for h in res.results]

            got = hits(lite)
            assert got == hits(full) and got[0][1].endswith("astronaut.jpg") and got[0][3] >= MIN_INLIERS, got
    p = run_watching_imports("--threads", "1", "search", query, "--index", idx, "-k", "5", "--json")  # (--threads too)
    assert p.returncode == 0, p.stderr
    assert p.stderr.strip().splitlines()[-1] == "False False", p.stderr
    top = json.loads(p.stdout)["results"][0]
    assert top["path"].endswith("astronaut.jpg") and top["inliers"] >= MIN_INLIERS


def test_catalogue_role_refusals(shop, tmp_path):
    root, idx, query = shop
    p = run_process("search", query, "--index", idx, "--catalogue", "5")
    assert p.returncode != 0 and len(p.stderr.strip().splitlines()) == 1, p.stderr
    assert "--catalogue" in p.stderr and "has no catalogue" in p.stderr and "--catalogue`" in p.stderr
    p = run_process("search", query, "--index", idx, "--catalogue", "5", "--verify", "0")
    assert p.returncode != 0 and "--catalogue N goes with --verify" in p.stderr, p.stderr
    p = run_process("index", root / "catalogue", "--index", tmp_path / "faces", "--preset", "faces", "--catalogue")
    assert p.returncode != 0 and "--catalogue does not apply to a faces index" in p.stderr, p.stderr
    assert not (tmp_path / "faces").exists()  # refused before anything was created
    p = run_process("index", tmp_path / "nowhere", "--index", idx, "--catalogue")
    assert p.returncode != 0 and "does not exist" in p.stderr and "nowhere" in p.stderr, p.stderr


def test_word_file_stores_the_projection_and_an_old_file_gets_one(shop, tmp_path):
    """The 64-d subspace verification matches in is learned with the vocabulary, stored in words.npz, and set
    on the searcher's verifier; a words.npz written before it (no projection) is still searched, and is
    given one, learned from the same seeded sample."""
    import shutil

    from retrieval.match.search import Searcher

    root, idx, query = shop
    old = tmp_path / "old"
    shutil.copytree(idx, old)
    with IndexStore.open(old) as store:
        v = Verifier.for_index(store.settings)  # the index's own side and budget
    wi = words.WordIndex.load(old, words.signature(v))
    basis = wi.vocab.projection
    assert basis is not None and basis.shape == (128, words.PROJECTION_DIMS)
    with IndexStore.open(old) as store:  # the searcher's verifier gets it with the word index
        s = Searcher.__new__(Searcher)  # (only what words() uses)
        s._words, s.verifier, s.store = None, Verifier.for_index(store.settings), store
        assert s.words() is not None and np.array_equal(s.verifier.projection, basis)
    wi.vocab.projection = None  # as written before projections
    wi.save(old)
    with np.load(old / words.WORDS_NAME) as z:
        assert "projection" not in z.files
    assert words.WordIndex.load(old, words.signature(v)).vocab.projection is None
    res = run_json("search", query, "--index", old, "-k", "3")
    top = res["results"][0]
    assert top["path"].endswith("astronaut.jpg") and top["inliers"] >= MIN_INLIERS, res["results"]
    again = words.WordIndex.load(old, words.signature(v))
    assert again.vocab.projection is not None and np.allclose(again.vocab.projection, basis, atol=1e-5)
    assert np.array_equal(again.vocab.top, wi.vocab.top)  # the vocabulary itself was kept


def test_explain_and_the_web_pair_page_count_the_inliers_the_search_reported(shop, tmp_path):
    """A search with visual words verifies in the subspace stored with them; `retrieve explain --index --verify`
    and the web app's pair page verify the same pair the same way, so the report shows the search's inliers
    (they counted in all 128 dimensions before: another number for the same pair)."""
    from web.service import Service

    root, idx, query = shop
    res = run_json("search", query, "--index", idx, "-k", "3")  # the preset's words 25
    top = res["results"][0]
    assert top["path"].endswith("astronaut.jpg") and top["inliers"] >= MIN_INLIERS
    doc = run_json("explain", query, top["path"], "--index", idx, "--verify", "--out", tmp_path / "x")
    assert doc["inliers"] == top["inliers"], (doc["inliers"], top["inliers"])
    full = Verifier()  # all 128 dimensions, as without an index: here another count for the same pair
    assert full.verify(full.features(str(query)), full.features(top["path"])).inliers != top["inliers"]
    c = Service(idx, cache_dir=tmp_path / "cache")
    try:
        token = c.add_upload(Path(query).read_bytes(), Path(query).name)["token"]
        row = c.search(f"upload:{token}", k=1)["results"][0]
        page = c.explain(f"upload:{token}", row["id"], verify=True)
    finally:
        c.close()
    assert row["inliers"] == page["inliers"] == top["inliers"], (row["inliers"], page["inliers"])
    with IndexStore.open(idx) as store:  # the rule: the stored subspace when the index's searches use words
        v = words.index_verifier(store)
        assert np.array_equal(v.projection, words.WordIndex.load(idx, words.signature(v)).vocab.projection)
        store.settings.search["words"] = 0  # (in memory only) an index that searches without words: 128-d
        assert words.index_verifier(store).projection is None
    assert words.stored_projection(tmp_path, words.signature(v)) is None  # no words.npz there


def test_a_collection_within_the_verification_budget_is_verified_whole(shop):
    """With visual words, a collection no larger than the pairs a query would verify anyway (K + W + 2 × the
    catalogue depth: 39 at the instance preset, 96 at K 60, W 30) is verified whole: every result has been
    verified, not only the global top K and what the stages ranked; with a smaller budget, or without words, it
    is not."""
    from retrieval.match.search import whole_budget

    root, idx, query = shop
    n = len(list((root / "catalogue").iterdir())) + len(list((root / "photos").iterdir()))
    assert n == 71 and whole_budget(60, 30, 0) == 96 and whole_budget(8, 25, 0) == 39 < n
    res = run_json("search", query, "--index", idx, "-k", "100", "--verify", "60", "--words", "30")
    assert len(res["results"]) == n and all(h.get("inliers") is not None for h in res["results"])
    confirmed = [h["inliers"] >= MIN_INLIERS for h in res["results"]]
    assert confirmed[0] and confirmed == sorted(confirmed, reverse=True)  # the confirmed first
    small = run_json("search", query, "--index", idx, "-k", "100")  # the preset's: 39 < 71
    assert sum(h.get("inliers") is None for h in small["results"]) >= n - 8 - 25
    off = run_json("search", query, "--index", idx, "-k", "100", "--verify", "60", "--words", "0")
    assert sum(h.get("inliers") is None for h in off["results"]) == n - 60


@pytest.fixture(scope="module")
def shop_with_photos(shop, tmp_path_factory):
    """A copy of ``shop``'s index with two more phone photos of the astronaut product (other scenes)."""
    import shutil

    root, idx, query = shop
    idx2 = tmp_path_factory.mktemp("more") / "idx"
    shutil.copytree(idx, idx2)
    more = tmp_path_factory.mktemp("field")
    for i, bg in enumerate(("rocket", "chelsea")):
        phone_photo(skimage_photo("astronaut"), skimage_photo(bg), seed=10 + i).save(more / f"astro{i}.jpg", quality=85)
    run("index", more, "--index", idx2)
    return root, idx2, query


def test_verified_expansion_finds_the_objects_other_photos_through_its_best_match(shop_with_photos, tmp_path):
    """The result confirmed with the most inliers brings its own neighbours (by visual words and by the
    embedding), each verified against the query; confirmed ones join, the others do not (Chum et al. 2007)."""
    from retrieval.match.search import EXPAND_MIN, Searcher
    from retrieval.models.loader import backbone_for_settings

    root, idx, query = shop_with_photos
    astro = ("astronaut.jpg", "astro0.jpg", "astro1.jpg")
    # a budget too small to verify the 73 images whole (1 + 1 + 2 × 5 < 73): the global top 1 and the words' top 1
    off = run_json("search", query, "--index", idx, "-k", "10", "--verify", "1", "--words", "1")  # default: off
    on = run_json("search", query, "--index", idx, "-k", "10", "--verify", "1", "--words", "1", "--expand", "10")
    conf = lambda res: [h for h in res["results"] if (h.get("inliers") or 0) >= MIN_INLIERS]  # noqa: E731
    assert len(conf(off)) == 1 and conf(off)[0]["path"].endswith(astro), off["results"]
    assert conf(off)[0]["inliers"] >= EXPAND_MIN
    assert sorted(Path(h["path"]).name for h in conf(on)) == sorted(astro), on["results"]  # all three now
    assert [h["inliers"] for h in conf(on)] == sorted((h["inliers"] for h in conf(on)), reverse=True)
    assert [h["path"] for h in on["results"][:len(conf(on))]] == [h["path"] for h in conf(on)]  # confirmed first
    assert len(on["results"]) == 10 and all(h["score"] <= 1 for h in on["results"])
    # the unconfirmed expansion candidates are not answers, and the scores stay the query's own similarity
    with IndexStore.open(idx) as store:
        s = Searcher(store, backbone_for_settings(store.settings))
        (res,) = s.search_paths([str(query)], 10, verify=1, words=1, expand=10)
        plain = {h.id: h.score for h in next(iter(s.search_paths([str(query)], 80, verify=0))).results}
    assert {h.path for h in res.results} == {h["path"] for h in on["results"]}
    assert all(abs(h.score - plain[h.id]) < 1e-5 for h in res.results)
