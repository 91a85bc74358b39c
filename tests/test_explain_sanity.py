"""Sanity checks of the default map (Adebayo et al., 2018; bench/sanity.py): destroying the backbone's weights
must change the map, and an unchanged copy must not (so that the check can fail). Measured as a user sees it with
an index where it matters: each model's maps centred on that model's own collection means (μ, μ_tap)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

import sanity  # noqa: E402  (bench/sanity.py)

TARGET = 0.5  # issue #29: randomisation drops every SFAM-based map's rank correlation below this
CASCADE_BOUND = 0.85  # every layer re-initialised: measured 0.76 / 0.69 on this pair without an index
SAMPLES = ROOT / "data" / "samples"  # scikit-image's bundled photos (data/samples/CREDITS.md)
COLLECTION = ("astronaut.png", "camera.png", "coffee.png", "coins.png", "horse.png", "hubble_deep_field.jpg",
              "retina.jpg", "rocket.jpg")  # the "index" each model computes its own μ over (not the pair)


@pytest.fixture(scope="module")
def setup(lite0):
    load = lambda n: Image.open(SAMPLES / n).convert("RGB")  # noqa: E731
    bb = lite0.at_size(224)
    collection = [load(n) for n in COLLECTION]
    return bb, (load("chelsea.png"), load("chelsea_crop_flipped.jpg")), collection, sanity.collection_means(bb, collection)


def test_identity_copy_keeps_the_map_with_and_without_an_index(setup):
    bb, pair, collection, means = setup
    same = sanity.variant(bb, "identity", check=pair[0])
    assert min(sanity.rank_correlations(bb, same, "sfam", pair)) > 0.99
    same_means = sanity.collection_means(same, collection)
    assert min(sanity.rank_correlations(bb, same, "sfam", pair, means, same_means)) > 0.99


def test_fully_randomised_backbone_changes_the_default_map(setup):
    bb, pair, _, _ = setup
    every = len(sanity._top_down_modules(bb.net))  # the cascade run to the end: every layer re-initialised
    other = sanity.variant(bb, "cascade", seed=0, groups=every, check=pair[0])
    rs = sanity.rank_correlations(bb, other, "sfam", pair)
    assert max(rs) < CASCADE_BOUND, rs


def test_an_index_mean_of_the_models_own_lowers_the_shuffled_models_correlation(setup):
    """Without an index the shuffled model embeds every photo alike (cosine ≈ 1) and its map keeps much of the
    original's order; its own index's μ removes that common part (measured 0.91 / 0.71 → 0.68 / 0.40 on this
    pair)."""
    bb, pair, collection, means = setup
    other = sanity.variant(bb, "shuffle", seed=0, check=pair[0])
    plain = sanity.rank_correlations(bb, other, "sfam", pair)
    centred = sanity.rank_correlations(bb, other, "sfam", pair, means, sanity.collection_means(other, collection))
    assert all(c < p - 0.15 for p, c in zip(plain, centred)), (plain, centred)


@pytest.mark.xfail(strict=True, reason="issue #29's target is not met on this pair: a crop of the same photo, whose "
                   "maps under the shuffled model still follow the shared content; with each model's own index μ "
                   "(8 skimage photos) ρ is 0.68 / 0.40 (0.91 / 0.71 without). Over the bench's 20 Caltech pairs the "
                   "with-μ mean is 0.16 (0.60 without; bench/results/explain-sanity.md)")
def test_shuffled_weights_drop_the_default_map_below_the_target_with_an_index(setup):
    bb, pair, collection, means = setup
    other = sanity.variant(bb, "shuffle", seed=0, check=pair[0])
    other_means = sanity.collection_means(other, collection)
    assert max(sanity.rank_correlations(bb, other, "sfam", pair, means, other_means)) < TARGET


def test_sfam_variant_spec_builds_that_map(setup):
    bb, pair, _, _ = setup
    label, kw = sanity.parse_variant("gated:paper=0,frame=None,gate=True")
    assert (label, kw) == ("sfam[gated]", {"paper": 0, "frame": None, "gate": True})
    assert sanity.parse_variant("switch:frame=0.3")[1] == {"frame": 0.3}
    ex = sanity.explainer("sfam", bb, None, **kw)
    assert (ex.paper, ex.frame, ex.gate) == (0.0, None, True)
    e, default = ex.explain(*pair), sanity.explainer("sfam", bb).explain(*pair)
    assert "SFAM_paper" not in e.details["map"] and abs(e.query_map - default.query_map).max() > 0.05


def test_bad_sfam_variant_is_refused_in_one_line():
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "sanity.py"), "--sfam-variants", "x:papr=0"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "'papr' is not one of SFAM's keywords (" in r.stderr, r.stderr
    assert "sanity.py: error: sfam variant 'x:papr=0'" in r.stderr
