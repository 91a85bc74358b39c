"""The instance preset's indexing choices (issue #31): the local features' side and keypoint budget recorded in a new
index and used by everything that extracts for it; int8 chosen at run time only where the CPU has VNNI."""
from __future__ import annotations

import hashlib
from types import SimpleNamespace

import pytest

from clitools import run, run_json
from conftest import skimage_photo
from retrieval.index.store import IndexStore
from retrieval.match.verify import MAX_SIDE, N_FEATURES, Verifier, decode_side, local_options
from retrieval.models import precision
from retrieval.presets import INSTANCE, preset_of


def _settings(local: dict, verify: int = 8):
    return SimpleNamespace(local=local, preprocess={"size": 448}, search={"verify": verify} if verify else {})


def test_an_index_without_the_setting_keeps_the_defaults_it_was_made_with():
    assert local_options(_settings({})) == {"max_side": MAX_SIDE, "n_features": N_FEATURES}
    assert local_options(SimpleNamespace(preprocess={}, search={})) == {"max_side": 640, "n_features": 2000}
    assert decode_side(_settings({})) == 640
    assert local_options(_settings({"side": 480, "budget": 1500})) == {"max_side": 480, "n_features": 1500}
    assert decode_side(_settings({"side": 480, "budget": 1500})) == 480  # one decode serves both
    assert decode_side(_settings({"side": 320, "budget": 1500})) == 448  # the network's side when larger
    assert decode_side(_settings({"side": 480, "budget": 1500}, verify=0)) == 448
    v = Verifier.for_index(_settings({"side": 480, "budget": 1500}), cache=False)
    assert (v.max_side, v.n_features) == (480, 1500)


@pytest.fixture(scope="module")
def instance_index(tmp_path_factory):
    d = tmp_path_factory.mktemp("localphotos")
    for name in ("astronaut", "coins", "rocket", "chelsea", "camera"):  # a quality no other test uses: new contents
        skimage_photo(name).save(d / f"{name}.jpg", quality=89)
    # a photo whose JPEG decodes at half size for a short side of 400 but not of 448 (the network's side)
    skimage_photo("coffee").resize((1000, 800)).save(d / "coffee.jpg", quality=89)
    idx = tmp_path_factory.mktemp("localidx") / "idx"
    run("index", d, "--index", idx, "--preset", "instance")
    return d, idx


def test_the_preset_records_its_local_features_and_every_extraction_uses_them(instance_index):
    from retrieval.match.words import index_verifier, signature

    photos, idx = instance_index
    assert INSTANCE.local and (INSTANCE.local["side"], INSTANCE.local["budget"]) != (MAX_SIDE, N_FEATURES)
    with IndexStore.open(idx) as store:
        st = store.settings
        assert st.local == INSTANCE.local
        v = Verifier.for_index(st)
        assert (v.max_side, v.n_features) == (INSTANCE.local["side"], INSTANCE.local["budget"])
        # the indexer extracted with them: each photo's features are in that setting's cache, not the default's
        for p in photos.iterdir():
            sha = hashlib.sha256(p.read_bytes()).hexdigest()
            assert v.cache_file(sha).is_file(), p
            assert not Verifier().cache_file(sha).is_file(), p
            feats = v._read(sha)
            assert 0 < len(feats.points) <= v.n_features
        # the word index and the searches' verifier are keyed by them too
        assert index_verifier(store).max_side == v.max_side
        import json

        assert json.loads((idx / "words.json").read_text())["features"] == signature(v)
        searcher = preset_of(st).searcher(store, None)
        searcher.words()  # the verifier a search makes
        assert (searcher.verifier.max_side, searcher.verifier.n_features) == (v.max_side, v.n_features)


def test_the_indexer_and_an_extraction_on_demand_give_the_same_features(instance_index):
    """The indexer extracts in its decoding threads, beside the forward pass, from the decode that embeds the photo;
    an extraction on demand (a search's word index, a pair page) decodes the photo alone: the same keypoints."""
    import numpy as np

    photos, idx = instance_index
    with IndexStore.open(idx) as store:
        cached = Verifier.for_index(store.settings)
        fresh = Verifier.for_index(store.settings, cache=False)
    for p in sorted(photos.iterdir()):
        a = cached._read(hashlib.sha256(p.read_bytes()).hexdigest())
        b = fresh.features(p)
        assert a.size == b.size and len(a.points) > 50, p
        np.testing.assert_array_equal(a.points, b.points, err_msg=str(p))
        np.testing.assert_array_equal(a.descriptors, b.descriptors, err_msg=str(p))


def test_a_search_confirms_with_the_recorded_features(instance_index, tmp_path):
    from test_instance import rephotographed

    photos, idx = instance_index
    q = tmp_path / "phone.jpg"
    rephotographed(skimage_photo("astronaut"), skimage_photo("horse")).save(q, quality=85)  # (a background not indexed)
    res = run_json("search", q, "--index", idx, "-k", "2")
    assert res["results"][0]["path"].endswith("astronaut.jpg") and res["results"][0]["inliers"] >= 10


def test_int8_is_chosen_only_where_the_cpu_has_vnni(monkeypatch):
    monkeypatch.setattr(precision, "cpu_flags", lambda: frozenset({"avx2", "fma"}))
    assert precision.auto_precision() == "fp32"
    monkeypatch.setattr(precision, "cpu_flags", lambda: frozenset({"avx2", "avx512f", "avx512_vnni"}))
    assert precision.auto_precision() == "int8"
    monkeypatch.setattr(precision, "cpu_flags", lambda: frozenset({"avx2", "avx_vnni"}))
    assert precision.auto_precision() == "int8"


def test_avx2_kernels_hide_vnni(monkeypatch):
    """RETRIEVE_ISA=avx2 (CI_ISA=avx2 in .ci/run) takes the AVX2-only machine's choice on any CPU."""
    monkeypatch.setenv("RETRIEVE_ISA", "avx2")
    precision.cpu_flags.cache_clear()
    try:
        assert not precision.has_vnni() and precision.auto_precision() == "fp32"
    finally:
        monkeypatch.delenv("RETRIEVE_ISA")
        precision.cpu_flags.cache_clear()


def test_the_instance_index_records_this_machines_choice(instance_index, tmp_path):
    photos, idx = instance_index
    info = run_json("info", "--index", idx)
    assert info["local_features"] == INSTANCE.local
    side = INSTANCE.local["side"]
    assert f"SIFT at {side} px" in run("info", "--index", idx).stdout
    assert info["precision"] == precision.auto_precision()  # int8 with VNNI; fp32 under CI_ISA=avx2 or without
    plain = tmp_path / "plain"
    run("index", photos, "--index", plain)  # the general preset keeps fp32
    assert run_json("info", "--index", plain)["precision"] == "fp32"
    # an index made before the choice (fp32) keeps it: updating it with --preset instance is not refused
    old = tmp_path / "old"
    run("index", photos, "--index", old, "--preset", "instance", "--precision", "fp32")
    run("index", photos, "--index", old, "--preset", "instance")
    assert run_json("info", "--index", old)["precision"] == "fp32"


def test_the_ray_workers_extract_with_the_index_options(instance_index):
    """indexer/ray_engine.py's decode task (run here without a cluster) extracts what the local indexer cached."""
    import io

    pytest.importorskip("ray")

    import numpy as np

    from indexer.ray_engine import decode_batch
    from retrieval.match.verify import local_options
    from retrieval.models.preprocess import Preprocess

    photos, idx = instance_index
    with IndexStore.open(idx) as store:
        st = store.settings
    cached = Verifier.for_index(st)
    paths = sorted(photos.iterdir())
    batch = {"path": np.array([str(p) for p in paths], object), "size": np.zeros(len(paths), np.int64),
             "mtime_ns": np.zeros(len(paths), np.int64)}
    out = decode_batch(batch, np.zeros(0, np.uint64), Preprocess.from_dict(st.preprocess), decode_side(st),
                       local_options(st))
    for p, status, feats in zip(paths, out["status"], out["feats"]):
        assert status == "embed", p
        with np.load(io.BytesIO(feats)) as z:
            a = cached._read(hashlib.sha256(p.read_bytes()).hexdigest())
            np.testing.assert_array_equal(z["descriptors"], a.descriptors, err_msg=str(p))
            np.testing.assert_array_equal(z["points"], a.points, err_msg=str(p))
