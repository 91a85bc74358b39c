"""retrieve's duplicate groups (retrieval/curate/duplicates.py) on a small made set with known answers.

Made here from scikit-image's bundled photos: one edited copy per transform of issue #30 (resize, recompress, crop,
colour, 90° rotation, mirror, text), a byte-for-byte copy, hard negatives (the other photo of the stereo pair: the
same scene from a little to the side; a different region of it in perspective) and a chain of overlapping windows
over a made scene (each window a near-duplicate of its neighbours, the ends not of each other). Originals are
given an older mtime than their copies, so the keeper is known for every group.
"""
from __future__ import annotations

import io
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from clitools import run
from conftest import skimage_photo

from retrieval.curate import pairtest
from PIL import Image, ImageDraw, ImageEnhance, ImageOps

OLD, NEW = 1_500_000_000, 1_700_000_000  # mtimes: originals, copies


def _jpeg(img: Image.Image, quality: int) -> Image.Image:
    b = io.BytesIO()
    img.save(b, "JPEG", quality=quality)
    b.seek(0)
    return Image.open(b).convert("RGB")


def _crop(img: Image.Image, f: float) -> Image.Image:
    w, h = img.size
    cw, ch = int(w * (1 - f)), int(h * (1 - f))
    return img.crop(((w - cw) // 2, (h - ch) // 2, (w - cw) // 2 + cw, (h - ch) // 2 + ch))


def _text(img: Image.Image) -> Image.Image:
    img = img.copy()
    d = ImageDraw.Draw(img)
    w, h = img.size
    d.rectangle((int(w * 0.05), int(h * 0.8), int(w * 0.6), int(h * 0.9)), fill=(255, 255, 255))
    d.text((int(w * 0.07), int(h * 0.82)), "(c) 2026 holiday photos", fill=(0, 0, 0))
    return img


# transform -> (original photo, the copy made from it)
TRANSFORMS = {
    "resize": ("astronaut", lambda im: im.resize((im.width // 2, im.height // 2), Image.LANCZOS)),
    "recompress": ("chelsea", lambda im: _jpeg(im, 25)),
    "crop": ("coffee", lambda im: _crop(im, 0.15)),
    "colour": ("rocket", lambda im: ImageEnhance.Contrast(ImageEnhance.Color(
        ImageEnhance.Brightness(im).enhance(1.3)).enhance(0.3)).enhance(1.4)),
    "rot90": ("camera", lambda im: im.transpose(Image.ROTATE_90)),
    "mirror": ("coins", ImageOps.mirror),
    "text": ("immunohistochemistry", _text),
}


def _scene(w: int = 1000, h: int = 420) -> Image.Image:
    """A made scene full of corners and texture (random shapes over noise), wide enough for a chain of windows."""
    rng = np.random.default_rng(7)
    base = (rng.random((h // 4, w // 4, 3)) * 255).astype(np.uint8)
    img = Image.fromarray(base).resize((w, h), Image.BILINEAR)
    d = ImageDraw.Draw(img)
    for _ in range(260):
        x, y = rng.integers(0, w), rng.integers(0, h)
        s = int(rng.integers(8, 50))
        c = tuple(int(v) for v in rng.integers(0, 256, 3))
        shape = rng.integers(0, 3)
        if shape == 0:
            d.rectangle((x, y, x + s, y + s * 0.6), fill=c)
        elif shape == 1:
            d.ellipse((x, y, x + s, y + s), fill=c, outline=(0, 0, 0))
        else:
            d.polygon([(x, y), (x + s, y + s // 3), (x + s // 4, y + s)], fill=c)
    return img


WINDOW, SHIFT, WINDOWS = 560, 67, 5  # each window 12 % of its width on from the last: neighbours overlap 88 %


def _save(img: Image.Image, path: Path, mtime: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, quality=95)
    os.utime(path, (mtime, mtime))


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    import skimage.data

    d = tmp_path_factory.mktemp("dup_photos")
    for name, (photo, f) in TRANSFORMS.items():
        img = skimage_photo(photo)
        _save(img, d / "originals" / f"{photo}.jpg", OLD)
        # a smaller copy is older: only the resolution makes the original the keeper
        _save(f(img), d / "copies" / f"{photo}-{name}.jpg", OLD - 1000 if name in ("resize", "crop") else NEW)
    # an exact copy: the same bytes under another name (newer mtime: the original keeps)
    _save(skimage_photo("retina").resize((700, 700)), d / "originals" / "retina.jpg", OLD)
    shutil.copyfile(d / "originals" / "retina.jpg", d / "copies" / "retina copy.jpg")
    os.utime(d / "copies" / "retina copy.jpg", (NEW, NEW))
    _save(skimage_photo("retina").resize((350, 350)), d / "copies" / "retina small.jpg", NEW)
    # hard negatives: the stereo pair (the same scene, the camera moved sideways), and another region in perspective
    left, right, _ = skimage.data.stereo_motorcycle()
    _save(Image.fromarray(left), d / "scene" / "left.jpg", OLD)
    _save(Image.fromarray(right), d / "scene" / "right.jpg", OLD)
    import cv2

    w = left.shape[1]
    region = left[:, int(w * 0.3):]
    rh, rw = region.shape[:2]
    src = np.float32([[0, 0], [rw, 0], [rw, rh], [0, rh]])
    dst = np.float32([[rw * 0.06, rh * 0.04], [rw * 0.97, 0], [rw, rh], [0, rh * 0.93]])
    persp = cv2.warpPerspective(region, cv2.getPerspectiveTransform(src, dst), (rw, rh))
    _save(Image.fromarray(persp), d / "scene" / "left-region.jpg", OLD)
    # the chain: windows over a wider made scene
    scene = _scene()
    for i in range(WINDOWS):
        _save(scene.crop((i * SHIFT, 0, i * SHIFT + WINDOW, scene.height)), d / "chain" / f"w{i}.jpg", OLD)
    # unrelated photos
    for photo in ("moon", "clock", "hubble_deep_field"):
        _save(skimage_photo(photo), d / "others" / f"{photo}.jpg", OLD)
    idx = tmp_path_factory.mktemp("dup_index") / "idx"
    run("index", d, "--index", idx)
    return d, idx


@pytest.fixture(scope="module")
def found(made):
    from retrieval.curate.duplicates import find_duplicates
    from retrieval.index.store import IndexStore

    with IndexStore.open(made[1]) as store:
        return find_duplicates(store)


def _names(group) -> list[str]:
    return [Path(m.path).parent.name + "/" + Path(m.path).name for m in group.members]


def _group_of(dups, name: str):
    hits = [g for g in dups.groups if name in _names(g)]
    return hits


def test_exact_copies_are_one_exact_group_with_the_older_file_kept(found):
    exact = [g for g in found.groups if g.tier == "exact"]
    assert [_names(g) for g in exact] == [["originals/retina.jpg", "copies/retina copy.jpg"]]
    g = exact[0]
    assert g.keeper.keeper and not g.members[1].keeper and g.keeper.date_source == "mtime" and g.keeper.date == OLD


def test_a_content_with_exact_copies_stands_in_the_near_tier_by_its_exact_keeper(found):
    """The copy (lower row id: "copies/" sorts first) must not stand for the content: moving the non-keepers of both
    groups then keeps the original and nothing else of this content."""
    near = [_names(g) for g in _group_of(found, "copies/retina small.jpg")]
    assert near == [["originals/retina.jpg", "copies/retina small.jpg"]], near


@pytest.mark.parametrize("transform", list(TRANSFORMS))
def test_each_edited_copy_is_a_near_duplicate_of_its_original_which_is_kept(found, transform):
    photo = TRANSFORMS[transform][0]
    groups = _group_of(found, f"copies/{photo}-{transform}.jpg")
    assert len(groups) == 1, [_names(g) for g in found.groups]
    g = groups[0]
    assert g.tier == "near" and _names(g) == [f"originals/{photo}.jpg", f"copies/{photo}-{transform}.jpg"]
    copy = g.members[1]
    assert (g.keeper.width, g.keeper.height) == skimage_photo(photo).size  # the file's own, not the decoded size
    assert copy.score is not None and 0 <= copy.percentile <= 100 and copy.agreement >= pairtest.MIN_AGREE
    if transform == "crop":  # a crop changes the frame: only feature points align it
        assert copy.inliers >= pairtest.NEAR_INLIERS
    else:  # the frames align as they are (turned or mirrored): no points needed
        assert copy.inliers is None
    assert g.keeper.score is None and g.keeper.keeper


def test_other_views_of_the_same_scene_are_not_near_duplicates(found):
    for name in ("scene/left.jpg", "scene/right.jpg", "scene/left-region.jpg"):
        assert _group_of(found, name) == [], [_names(g) for g in found.groups]
    for name in ("others/moon.jpg", "others/clock.jpg", "others/hubble_deep_field.jpg"):
        assert _group_of(found, name) == []


def test_the_stereo_pair_is_similar_when_asked(made):
    from retrieval.curate.duplicates import find_duplicates
    from retrieval.index.store import IndexStore

    with IndexStore.open(made[1]) as store:
        dups = find_duplicates(store, similar=True)
    sim = [_names(g) for g in dups.groups if g.tier == "similar"]
    assert any({"scene/left.jpg", "scene/right.jpg"} <= set(n) for n in sim), sim
    assert not any(n for n in sim if any(x.startswith("others/") for x in n))


def _chain_groups(dups) -> list[set[str]]:
    return [{n for n in _names(g) if n.startswith("chain/")} for g in dups.groups if g.tier == "near"
            and any(n.startswith("chain/") for n in _names(g))]


def test_the_medoid_guard_keeps_a_chain_of_look_alikes_from_merging(made, found):
    """w0 ~ w1 ~ … ~ w4 (neighbours overlap 88 %), but w0 and w4 share a third of their pixels: without the guard
    the chain is one group (shown here, so the test can fail); with it no group holds both ends, and every member
    passes the pair test against its group's medoid."""
    from retrieval.curate import pairtest
    from retrieval.curate.duplicates import find_duplicates
    from retrieval.index.store import IndexStore

    with IndexStore.open(made[1]) as store:
        unguarded = find_duplicates(store, guard=False)
    assert {f"chain/w{i}.jpg" for i in range(WINDOWS)} in _chain_groups(unguarded)
    groups = _chain_groups(found)
    assert groups and all(not {"chain/w0.jpg", "chain/w4.jpg"} <= g for g in groups), groups
    assert all(len(g) <= 3 for g in groups), groups
    chain = next(g for g in found.groups if any(n.startswith("chain/") for n in _names(g)))
    photos = [pairtest.load_photo(m.path) for m in chain.members]
    near = [[i == j or pairtest.pair_test(a, b).near for j, b in enumerate(photos)] for i, a in enumerate(photos)]
    assert any(all(row) for row in near), near  # a medoid: every member a near-duplicate of it


def test_groups_order_ids_and_json(found, made):
    ids = [g.id for g in found.groups]
    assert ids == list(range(1, len(ids) + 1))
    sizes = [len(g.members) for g in found.groups]
    assert sizes == sorted(sizes, reverse=True)
    d = json.loads(json.dumps(found.to_dict()))
    assert d["photos"] == found.photos and len(d["groups"]) == len(found.groups)
    m = d["groups"][0]["members"][0]
    assert set(m) >= {"row_id", "path", "size", "width", "height", "date", "date_source", "keeper", "score",
                      "percentile", "inliers", "agreement"}
    assert set(d["thresholds"]) >= {"exact", "candidates", "near"}
    for g in found.groups:
        assert g.members[0].keeper and not any(x.keeper for x in g.members[1:])
        assert all(Path(x.path).is_file() and x.size == Path(x.path).stat().st_size for x in g.members)


def test_the_keeper_prefers_resolution_then_the_oldest_date_then_the_shortest_path():
    from retrieval.curate.duplicates import Member, keeper_order

    big = Member(1, "/p/z/long name.jpg", 10, 200, 100, 2.0, "mtime")
    old = Member(2, "/p/old.jpg", 10, 100, 100, 1.0, "exif")
    new = Member(3, "/p/n.jpg", 10, 100, 100, 3.0, "mtime")
    same = Member(4, "/p/longer.jpg", 10, 100, 100, 1.0, "mtime")
    assert [m.row_id for m in sorted([new, same, old, big], key=keeper_order)] == [1, 2, 4, 3]


def test_the_resolution_is_the_files_own_and_the_exif_date_is_read_when_present(tmp_path):
    from retrieval.curate.duplicates import _exif_date, _file_facts

    img = Image.new("RGB", (8, 8))
    exif = Image.Exif()
    exif.get_ifd(0x8769)[0x9003] = "2001:02:03 04:05:06"
    img.save(tmp_path / "a.jpg", exif=exif)
    from datetime import datetime

    assert _exif_date(str(tmp_path / "a.jpg")) == datetime(2001, 2, 3, 4, 5, 6).timestamp()
    img.save(tmp_path / "b.jpg")
    assert _exif_date(str(tmp_path / "b.jpg")) is None
    turned = Image.Exif()
    turned[0x0112] = 6  # shown turned by 90°
    Image.new("RGB", (40, 30)).save(tmp_path / "c.jpg", exif=turned)
    assert _file_facts(str(tmp_path / "c.jpg"))[0] == (30, 40)
    assert _file_facts(str(tmp_path / "gone.jpg")) == (None, None)


def test_a_faces_index_is_refused(tmp_path):
    pytest.importorskip("dlib")
    from retrieval.curate.duplicates import find_duplicates
    from retrieval.errors import RetrieveError
    from retrieval.index.store import IndexStore

    d = tmp_path / "faces"
    d.mkdir()
    skimage_photo("astronaut").save(d / "astronaut.png")
    run("index", d, "--index", tmp_path / "idx", "--preset", "faces")
    with IndexStore.open(tmp_path / "idx") as store, pytest.raises(RetrieveError, match="faces index"):
        find_duplicates(store)


def test_progress_counts_the_pairs_tested(made):
    from retrieval.curate.duplicates import find_duplicates
    from retrieval.index.store import IndexStore

    calls = []
    with IndexStore.open(made[1]) as store:
        dups = find_duplicates(store, progress=lambda done, total: calls.append((done, total)))
    assert calls and calls[-1][0] == calls[-1][1] > 0
    assert [c[0] for c in calls] == sorted(c[0] for c in calls)
    assert 0 < dups.pairs_checked  # pairs that confirmed pairs already connect are not tested (test below)


def test_a_group_of_copies_costs_one_test_per_copy_not_one_per_pair(tmp_path):
    """Five copies of one photo are ten candidate pairs; once four confirmed pairs connect the five, the other six
    are left untested (returned), and a pair of two unrelated photos is still tested."""
    from retrieval.curate.duplicates import _Tester

    img = skimage_photo("astronaut")
    paths = {}
    for i, q in enumerate((95, 85, 75, 65, 55)):
        paths[i] = str(tmp_path / f"copy{i}.jpg")
        img.resize((400 + 20 * i, 400 + 20 * i)).save(paths[i], "JPEG", quality=q)
    paths[9] = str(tmp_path / "other.jpg")
    skimage_photo("coffee").save(paths[9], "JPEG")
    pairs = [(a, b) for a in range(5) for b in range(a + 1, 5)] + [(4, 9)]
    tester = _Tester(paths, 2)
    skipped = tester.test_unconnected(pairs)
    assert len(tester.results) == 5 and len(skipped) == 6, (tester.results, skipped)
    assert sum(r.near for r in tester.results.values()) == 4 and not tester.results[(4, 9)].near


def test_after_three_candidates_without_geometry_a_pair_gets_the_frame_test_alone(tmp_path):
    """Tested best first, a pair whose two photos each had GIVE_UP candidates with no geometry at all is left to the
    frame test: an uncropped copy is still found, a crop (which needs points) is not; asked again in full (the medoid
    guard, the keeper's evidence), the crop is found."""
    from retrieval.curate.duplicates import GIVE_UP, _Tester

    img = skimage_photo("coffee")
    paths = {0: str(tmp_path / "coffee.png"), 4: str(tmp_path / "coffee-small.jpg"), 5: str(tmp_path / "coffee-crop.jpg")}
    img.save(paths[0])
    img.resize((img.width // 2, img.height // 2)).save(paths[4], "JPEG", quality=85)
    w, h = img.size
    img.crop((w // 10, h // 10, w - w // 20, h - h // 20)).save(paths[5], "JPEG", quality=90)
    others = {1: "astronaut", 2: "chelsea", 3: "rocket"}
    for i, name in others.items():
        paths[i] = str(tmp_path / f"{name}.jpg")
        skimage_photo(name).save(paths[i], "JPEG")
    assert GIVE_UP == len(others)
    pairs = [(0, i) for i in others] + [(5, i) for i in others] + [(0, 5), (0, 4)]
    tester = _Tester(paths, 1)
    tester.CHUNK = 1  # each pair's result counted before the next pair is taken
    assert tester.test_unconnected(pairs) == []
    assert not any(tester.results[(min(a, i), max(a, i))].similar for a in (0, 5) for i in others)
    crop, small = tester.results[(0, 5)], tester.results[(0, 4)]
    assert crop.partial and not crop.near
    assert small.near and small.aligned == "frame" and small.inliers == 0
    full = tester.test(0, 5)
    assert full.near and full.aligned == "points" and full.inliers >= 30 and not full.partial


def test_a_large_flat_index_is_searched_through_an_inverted_file_with_the_same_groups(made, monkeypatch):
    from retrieval.curate import duplicates as D
    from retrieval.index.store import IndexStore

    def groups(d):
        return sorted((g.tier, tuple(m.path for m in g.members)) for g in d.groups)

    with IndexStore.open(made[1]) as store:
        flat = D.find_duplicates(store)
        monkeypatch.setattr(D, "IVF_FROM", 2)
        import faiss

        assert isinstance(D._candidate_index(store), faiss.IndexIVFFlat)
        ivf = D.find_duplicates(store)
    assert groups(ivf) == groups(flat) and len(flat.groups) >= 5
