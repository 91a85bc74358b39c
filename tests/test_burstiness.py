"""Burstiness (issue 31): a background behind several photos no longer confirms the wrong product.

retrieval.match.verify.weigh turns each confirmed candidate's inliers into *evidence*: with a confirmed catalogue
image, the other photos count only their inliers on the query keypoints that image matched too. Tested against that definition, then end to end through the CLI
on a made collection, and the words' document frequencies after additions, removals and a killed writer.
"""
from __future__ import annotations

import random

import numpy as np
import pytest

from clitools import run, run_json
from conftest import skimage_photo
from retrieval.index.store import IndexStore
from retrieval.match import words
from retrieval.match.verify import MIN_INLIERS, Verification, Verifier, rerank, weigh
from test_catalogue import phone_photo


def _reference(vs: list[Verification], catalogue: list[bool] | None) -> list[float | None]:
    """weigh's evidence by its definition, one keypoint and one candidate at a time."""
    conf = [i for i, v in enumerate(vs) if v.inliers >= MIN_INLIERS]
    cat = [i for i in conf if catalogue is not None and catalogue[i]]
    grounded = set().union(*(set(vs[i].query_rows.tolist()) for i in cat)) if cat else None
    out: list[float | None] = [None] * len(vs)
    for i in conf:
        if grounded is None or catalogue[i] or not len(vs[i].query_rows):
            out[i] = float(vs[i].inliers)
        else:
            kept = sum(r in grounded for r in vs[i].query_rows.tolist())
            out[i] = vs[i].inliers * kept / len(vs[i].query_rows)
    return out


def test_evidence_matches_its_definition():
    rng = np.random.default_rng(0)
    for trial in range(300):
        n = int(rng.integers(1, 12))
        vs = []
        for _ in range(n):
            k = int(rng.choice([0, 4, 9, 10, 30, 120]))
            vs.append(Verification(k, query_rows=rng.choice(300, size=k, replace=False) if k else np.zeros(0, np.int64)))
        catalogue = None if trial % 3 == 0 else [bool(b) for b in rng.integers(0, 2, n)]
        weigh(vs, catalogue)
        want = _reference(vs, catalogue)
        for v, e in zip(vs, want):
            assert (v.evidence is None) == (e is None) and (e is None or v.evidence == pytest.approx(e)), (v, e)
    # a background of 90 keypoints behind three photos of other products against the product's catalogue shot (50)
    # and one photo of the product (40 inliers, 30 of them on the keypoints the catalogue shot matched)
    bg = [Verification(90, query_rows=np.arange(90)) for _ in range(3)]
    shot = Verification(50, query_rows=np.arange(200, 250))
    photo = Verification(40, query_rows=np.r_[np.arange(220, 250), np.arange(300, 310)])
    vs = bg + [shot, photo]
    assert rerank(list(range(5)), vs, 5)[:3] == [0, 1, 2]  # by inliers: the background photos first
    weigh(vs)  # no catalogue: evidence = inliers
    assert [v.evidence for v in vs] == [90, 90, 90, 50, 40] and rerank(list(range(5)), vs, 5)[0] == 0
    weigh(vs, [False, False, False, True, False])
    assert [v.evidence for v in vs] == [0, 0, 0, 50, 30] and rerank(list(range(5)), vs, 5)[:2] == [3, 4]
    weigh(vs, [False] * 5)  # a catalogue, none of it confirmed: inliers
    assert [v.evidence for v in vs] == [90, 90, 90, 50, 40]


def scene(background, seed: int):
    """``background`` from another spot: a crop of 75-90 % of it."""
    rng = random.Random(seed)
    w, h = background.size
    f = rng.uniform(0.75, 0.9)
    cw, ch = int(w * f), int(h * f)
    x, y = rng.randint(0, w - cw), rng.randint(0, h - ch)
    return background.crop((x, y, x + cw, y + ch))


@pytest.fixture(scope="module")
def shelf(tmp_path_factory):
    """catalogue/: five clean product shots; photos/: six phone photos of four *other* products in front of one
    star-field poster (each from another spot); the query: the astronaut product in front of the same poster (not
    indexed). Background photos share more inliers with the query than the astronaut's own shot does."""
    root = tmp_path_factory.mktemp("shelf")
    cat, photos = root / "catalogue", root / "photos"
    cat.mkdir()
    photos.mkdir()
    for name in ("astronaut", "rocket", "camera", "horse", "coins"):
        skimage_photo(name).save(cat / f"{name}.jpg", quality=92)
    poster = skimage_photo("hubble_deep_field")
    for i, name in enumerate(("rocket", "camera", "horse", "coins", "rocket", "camera")):
        phone_photo(skimage_photo(name), scene(poster, i + 1), seed=i + 2).save(photos / f"{name}{i}.jpg", quality=90)
    query = tmp_path_factory.mktemp("query") / "phone.jpg"
    phone_photo(skimage_photo("astronaut"), scene(poster, 0), seed=1).save(query, quality=90)
    idx = root / "idx"
    run("index", cat, photos, "--index", idx, "--preset", "instance", "--head", "none")
    return root, idx, query


def test_a_background_behind_several_photos_no_longer_outranks_the_product(shelf):
    root, idx, query = shelf
    res = run_json("search", query, "--index", idx, "-k", "3")["results"]  # no catalogue role: ranked by inliers
    assert "/photos/" in res[0]["path"] and res[0]["inliers"] > next(
        h["inliers"] for h in run_json("search", query, "--index", idx, "-k", "12")["results"]
        if h["path"].endswith("astronaut.jpg"))
    run("index", root / "catalogue", "--index", idx, "--catalogue")  # the catalogue role: photos count only the
    res = run_json("search", query, "--index", idx, "-k", "11")["results"]  # keypoints the astronaut's shot matched
    assert res[0]["path"].endswith("catalogue/astronaut.jpg") and res[0]["inliers"] >= MIN_INLIERS, res
    assert any(h["inliers"] > res[0]["inliers"] for h in res[1:] if "/photos/" in h["path"])  # more inliers, ranked
    # after it (their evidence: none of their inliers is on the astronaut)


def _check_frequencies(idx):
    """The stored inverted file's document frequencies and idf are those of the rows' bags, by definition."""
    with IndexStore.open(idx) as store:
        v = Verifier.for_index(store.settings)  # the index's own local features (side, budget)
    wi = words.WordIndex.load(idx, words.signature(v))
    assert wi is not None and wi._ivf is not None  # read from the file, not rebuilt
    with IndexStore.open(idx) as store:
        assert words.file_state(store, v) == "ok"
        assert set(wi.bags) == set(store.row_ids().tolist())
    ids, post_img, _, ptr, idf, df, _ = wi._ivf
    want = np.zeros(wi.vocab.size)
    for _, w, _, _ in wi.bags.values():
        want[np.unique(w)] += 1
    assert np.array_equal(np.diff(ptr), want) and np.array_equal(df, want)
    assert np.allclose(idf, np.log((len(wi.bags) + 1) / (want + 1)))
    for j in np.nonzero(want)[0][:50]:  # each word's postings: exactly the rows whose bags hold it
        rows = {int(ids[r]) for r in post_img[ptr[j]:ptr[j + 1]]}
        assert rows == {i for i, b in wi.bags.items() if j in set(b[1].tolist())}


def test_document_frequencies_follow_additions_removals_and_a_killed_writer(shelf, tmp_path):
    import shutil

    root, idx, _ = shelf
    photos = tmp_path / "photos"
    shutil.copytree(root / "photos", photos)
    own = tmp_path / "idx"
    run("index", photos, "--index", own, "--preset", "instance", "--head", "none")
    _check_frequencies(own)
    (photos / "rocket0.jpg").unlink()
    (photos / "camera1.jpg").unlink()
    phone_photo(skimage_photo("coffee"), scene(skimage_photo("hubble_deep_field"), 9), seed=9).save(photos / "cup.jpg")
    # a writer killed while writing words.npz leaves its temporary file: the next run removes it
    (own / f".{words.WORDS_NAME}.99999.tmp").write_bytes(b"PK\x03\x04 torn")
    run("index", photos, "--index", own)
    assert not list(own.glob(f".{words.WORDS_NAME}.*.tmp"))
    _check_frequencies(own)
    with IndexStore.open(own) as store:
        assert len(store.row_ids()) == 5
