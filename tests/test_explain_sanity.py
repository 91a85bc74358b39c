"""Sanity checks of the default map (Adebayo et al., 2018; bench/sanity.py): destroying the backbone's weights
must change the map, and an unchanged copy must not (so that the check can fail)."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

import sanity  # noqa: E402  (bench/sanity.py)

TARGET = 0.5  # issue #29: randomisation drops every SFAM-based map's rank correlation below this (not met yet)
CASCADE_BOUND = 0.85  # every layer re-initialised: measured 0.76 / 0.69 on this pair (bench/results/explain-sanity.md)


@pytest.fixture(scope="module")
def setup(lite0):
    pair = tuple(Image.open(ROOT / "data" / "samples" / n).convert("RGB")
                 for n in ("chelsea.png", "chelsea_crop_flipped.jpg"))
    return lite0.at_size(224), pair


def test_identity_copy_keeps_the_map(setup):
    bb, pair = setup
    same = sanity.variant(bb, "identity", check=pair[0])
    assert min(sanity.rank_correlations(bb, same, "sfam", pair)) > 0.99


def test_fully_randomised_backbone_changes_the_default_map(setup):
    bb, pair = setup
    every = len(sanity._top_down_modules(bb.net))  # the cascade run to the end: every layer re-initialised
    other = sanity.variant(bb, "cascade", seed=0, groups=every, check=pair[0])
    rs = sanity.rank_correlations(bb, other, "sfam", pair)
    assert max(rs) < CASCADE_BOUND, rs


@pytest.mark.xfail(strict=True, reason="issue #29's target is not met: with shuffled weights every photo embeds "
                   "alike (cosine ~1), the default map turns to its whole-frame part and keeps ρ ~0.9 with the "
                   "original (bench/results/explain-sanity.md)")
def test_shuffled_weights_drop_the_default_map_below_the_target(setup):
    bb, pair = setup
    other = sanity.variant(bb, "shuffle", seed=0, check=pair[0])
    assert max(sanity.rank_correlations(bb, other, "sfam", pair)) < TARGET
