"""--move-to moves exact copies and near-duplicates only: a similar shot (the same scene, another photo) is shown
with --similar but never moved for being like its keeper."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import skimage.data
from PIL import Image

from clitools import run
from conftest import skimage_photo


def test_similar_shots_are_shown_but_never_moved(tmp_path):
    photos = tmp_path / "photos"
    photos.mkdir()
    left, right, _ = skimage.data.stereo_motorcycle()
    Image.fromarray(left).save(photos / "left.jpg", quality=92)
    Image.fromarray(right).save(photos / "right.jpg", quality=92)
    for n in ("rocket", "coins", "moon", "camera"):
        skimage_photo(n).save(photos / f"{n}.jpg", quality=92)
    shutil.copyfile(photos / "rocket.jpg", photos / "rocket copy.jpg")
    idx = tmp_path / "idx"
    run("index", photos, "--index", idx)

    shown = json.loads(run("duplicates", "--index", idx, "--similar", "--json").stdout)
    tiers = {g["tier"]: {Path(m["path"]).name for m in g["members"]} for g in shown["groups"]}
    assert tiers.get("similar") == {"left.jpg", "right.jpg"}, tiers  # the test can fail: a similar group is there
    assert tiers.get("exact") == {"rocket.jpg", "rocket copy.jpg"}, tiers

    dest = tmp_path / "moved"
    d = json.loads(run("duplicates", "--index", idx, "--similar", "--move-to", dest, "--json").stdout)
    assert d["moved"]["moved"] == 1
    assert sorted(p.name for p in dest.rglob("*") if p.is_file()) == ["rocket copy.jpg"]
    assert (photos / "left.jpg").exists() and (photos / "right.jpg").exists()
