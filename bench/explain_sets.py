"""The photo sets of bench/explain_eval.py, each split into a tuning part and a held-out part.

**Tuning** is what the map's defaults were chosen on: sets A, B, C and the matched pairs exactly as they were (seed
0). **Held-out** is made with seed 1 from source photos that no tuning pair uses (every file a tuning pair reads is
recorded, and the held-out parts draw only from the rest), by the same recipes (A′, B′, C′ and the matched pairs),
plus family D, built after the defaults were frozen and never used to choose anything:

- D1: set C's recipe with a smaller paste, 2-4 % of the photo (C: 5-10 %);
- D2: the reference rotated by 15-35° either way and warped in perspective before it is pasted (the box: the warped
  outline's bounding box);
- D3: two pasted objects, the query's reference and another category's photo; the box is the reference's.

A localisation pair is (query, composite, box); the box is (x0, y0, x1, y1) in the composite's pixels.
"""
from __future__ import annotations

from pathlib import Path

import _common
import numpy as np
from PIL import Image

OBJECTS = ("chelsea", "coffee", "astronaut", "rocket", "camera", "coins")
SCENES = ("brick", "grass", "gravel", "hubble_deep_field", "moon", "page")
HELD_OBJECTS = ("clock", "colorwheel", "immunohistochemistry", "logo", "retina", "stereo_motorcycle")
HELD_SCENES = ("cell", "text", "binary_blobs", "checkerboard", "microaneurysms", "horse")

SET_A = "A: skimage, 15 % box"
SET_B = "B: caltech, other photo of the class, 8 % box"
SET_C = "C: instance, reference in another object's photo, 5-10 % box"
SET_D1 = "D1: instance, smaller paste, 2-4 % box"
SET_D2 = "D2: instance, rotated and perspective-warped paste"
SET_D3 = "D3: instance, two pasted objects, one matches"
HELD_ONLY = (SET_D1, SET_D2, SET_D3)
D_PAIRS = 40  # pairs per family-D set


SEEDED = {"binary_blobs": {"rng": 0}}  # scikit-image photos drawn at random unless seeded


def skimage_photo(name: str) -> Image.Image:
    import skimage.data

    a = getattr(skimage.data, name)(**SEEDED.get(name, {}))
    if isinstance(a, tuple):  # stereo_motorcycle: (left, right, disparity)
        a = a[0]
    a = np.asarray(a)
    if a.dtype == bool:
        a = a.astype(np.uint8) * 255
    img = Image.fromarray(a)
    return img.convert("RGB")


def composite(obj: Image.Image, scene: Image.Image, side: int, box_side: int, rng) -> tuple[Image.Image, tuple]:
    """Paste ``obj`` (resized to box_side²) off-centre into ``scene`` (resized to side²); return the box."""
    canvas = scene.resize((side, side), Image.BILINEAR)
    margin = side // 16
    while True:
        x0, y0 = (int(v) for v in rng.integers(margin, side - box_side - margin, 2))
        cx, cy = x0 + box_side / 2, y0 + box_side / 2
        if max(abs(cx - side / 2), abs(cy - side / 2)) > side * 0.18:  # off-centre
            break
    canvas.paste(obj.resize((box_side, box_side), Image.BILINEAR), (x0, y0))
    return canvas, (x0, y0, x0 + box_side, y0 + box_side)


def _clear_of_centre(x0: int, y0: int, bw: int, bh: int, w: int, h: int) -> bool:
    """Whether a bw×bh box at (x0, y0) in a w×h photo keeps at least 1/20 of the short side away from its centre."""
    dx = max(x0 - w / 2, w / 2 - (x0 + bw), 0.0)  # 0 when the box spans the centre's column
    dy = max(y0 - h / 2, h / 2 - (y0 + bh), 0.0)
    return max(dx, dy) >= min(w, h) / 20


def _off_centre_box(bw: int, bh: int, w: int, h: int, rng, avoid: tuple | None = None) -> tuple[int, int]:
    """(x0, y0) of a bw×bh box inside w×h that keeps 1/20 of the short side away from the centre (never over it) and,
    with ``avoid``, does not overlap that box."""
    for _ in range(10_000):
        x0, y0 = int(rng.integers(0, w - bw + 1)), int(rng.integers(0, h - bh + 1))
        if not _clear_of_centre(x0, y0, bw, bh, w, h):
            continue
        if avoid is not None and not (x0 + bw <= avoid[0] or avoid[2] <= x0 or y0 + bh <= avoid[1] or avoid[3] <= y0):
            continue
        return x0, y0
    raise RuntimeError("no place for the paste")


def _box_dims(obj: Image.Image, w: int, h: int, area: tuple[float, float], rng) -> tuple[int, int]:
    ar = float(np.clip(obj.width / obj.height, 0.5, 2.0))
    a = rng.uniform(*area) * w * h
    return int(round(np.sqrt(a * ar))), int(round(np.sqrt(a / ar)))


def paste_off_centre(obj: Image.Image, scene: Image.Image, size: tuple[int, int], rng,
                     area: tuple[float, float] = (0.05, 0.10)) -> tuple[Image.Image, tuple]:
    """Paste ``obj`` (its aspect kept) into ``scene`` resized to ``size`` (W, H): the box covers ``area`` of the
    photo (a share drawn uniformly) and keeps at least 1/20 of the short side away from its centre (never over it)."""
    w, h = size
    canvas = scene.resize((w, h), Image.BILINEAR)
    while True:  # the draw order of set C as it was tuned (area, then place), kept so that its pairs stay the same
        bw, bh = _box_dims(obj, w, h, area, rng)
        x0, y0 = int(rng.integers(0, w - bw + 1)), int(rng.integers(0, h - bh + 1))
        if _clear_of_centre(x0, y0, bw, bh, w, h):
            break
    canvas.paste(obj.resize((bw, bh), Image.BILINEAR), (x0, y0))
    return canvas, (x0, y0, x0 + bw, y0 + bh)


def paste_warped(obj: Image.Image, scene: Image.Image, size: tuple[int, int], rng) -> tuple[Image.Image, tuple]:
    """Family D2: ``obj`` scaled to 5-10 % of the photo, rotated by 15-35° either way and its corners moved by up to
    12 % of its side (a perspective warp), pasted off-centre through its warped outline; the box bounds the outline."""
    import cv2

    w, h = size
    canvas = np.asarray(scene.resize((w, h), Image.BILINEAR)).copy()
    bw, bh = _box_dims(obj, w, h, (0.05, 0.10), rng)
    src = np.float32([[0, 0], [bw, 0], [bw, bh], [0, bh]])
    angle = np.deg2rad(rng.uniform(15, 35) * rng.choice([-1, 1]))
    rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    dst = (src - [bw / 2, bh / 2]) @ rot.T + rng.uniform(-0.12, 0.12, (4, 2)) * [bw, bh]
    dst = (dst - dst.min(0)).astype(np.float32)
    ow, oh = int(np.ceil(dst[:, 0].max())) + 1, int(np.ceil(dst[:, 1].max())) + 1
    m = cv2.getPerspectiveTransform(src, dst)
    warped = cv2.warpPerspective(np.asarray(obj.resize((bw, bh), Image.BILINEAR)), m, (ow, oh),
                                 flags=cv2.INTER_LINEAR)
    mask = cv2.warpPerspective(np.full((bh, bw), 255, np.uint8), m, (ow, oh), flags=cv2.INTER_NEAREST) > 127
    x0, y0 = _off_centre_box(ow, oh, w, h, rng)
    region = canvas[y0:y0 + oh, x0:x0 + ow]
    region[mask] = warped[mask]
    ys, xs = np.nonzero(mask)
    return Image.fromarray(canvas), (x0 + int(xs.min()), y0 + int(ys.min()), x0 + int(xs.max()) + 1,
                                     y0 + int(ys.max()) + 1)


def paste_two(obj: Image.Image, other: Image.Image, scene: Image.Image, size: tuple[int, int],
              rng) -> tuple[Image.Image, tuple]:
    """Family D3: ``obj`` and a distractor ``other`` each at 5-10 % of the photo, both off-centre, not overlapping;
    the box is ``obj``'s."""
    w, h = size
    canvas = scene.resize((w, h), Image.BILINEAR)
    bw, bh = _box_dims(obj, w, h, (0.05, 0.10), rng)
    x0, y0 = _off_centre_box(bw, bh, w, h, rng)
    box = (x0, y0, x0 + bw, y0 + bh)
    ow, oh = _box_dims(other, w, h, (0.05, 0.10), rng)
    u0, v0 = _off_centre_box(ow, oh, w, h, rng, avoid=box)
    canvas.paste(obj.resize((bw, bh), Image.BILINEAR), (x0, y0))
    canvas.paste(other.resize((ow, oh), Image.BILINEAR), (u0, v0))
    return canvas, box


class Photos:
    """Caltech's photos by category, and which of them a pair has used: the held-out parts draw only photos that no
    tuning pair read (and each reference photo once)."""

    def __init__(self, root: Path):
        self.cats = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(("_", ".")))
        self.files = {c: sorted(p for p in c.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
                      for c in self.cats}
        self.tuning: set[Path] = set()
        self.held: set[Path] = set()

    def use(self, path: Path, held: bool) -> Path:
        if held:
            assert path not in self.tuning, f"{path}: a tuning photo in a held-out pair"
            self.held.add(path)
        else:
            self.tuning.add(path)
        return path

    def fresh(self, cat: Path, rng=None) -> Path:
        """A photo of ``cat`` no pair has used yet (the first in order, or a random one with ``rng``)."""
        free = [p for p in self.files[cat] if p not in self.tuning and p not in self.held]
        if not free:
            raise RuntimeError(f"{cat.name}: no photo left for the held-out sets")
        return self.use(free[0] if rng is None else free[int(rng.integers(0, len(free)))], True)

    def free_count(self, cat: Path) -> int:
        return sum(p not in self.tuning and p not in self.held for p in self.files[cat])


def _rgb(path: Path) -> Image.Image:
    return Image.open(path).convert("RGB")


def _instance_ref(path: Path) -> Image.Image:
    import instance_set

    return Image.fromarray(instance_set._load(path))


def _skimage_set(objects, scenes, rng) -> tuple[list, list]:
    """Set A's recipe: each object photo (88 px) pasted off-centre into each scene (224 px), 15 % of the area."""
    pairs = []
    for o in objects:
        for s in scenes:
            comp, box = composite(skimage_photo(o), skimage_photo(s), 224, 88, rng)
            pairs.append((skimage_photo(o), comp, box))
    return pairs, [skimage_photo(n) for n in objects + scenes]


def tuning_localisation(rng, photos: Photos | None) -> dict[str, tuple[list, list]]:
    """Sets A, B, C as the defaults were tuned on them (``rng``: seed 0): name → (pairs, the source photos whose mean
    embedding is μ). Records every Caltech file they read in ``photos``."""
    sets = {SET_A: _skimage_set(OBJECTS, SCENES, rng)}
    if photos is None:
        return sets
    cats = photos.cats
    pick = rng.choice(len(cats), 40, replace=False)
    pairs, sources = [], []
    for i in range(20):
        obj_dir, scene_dir = cats[pick[2 * i]], cats[pick[2 * i + 1]]
        objs, scenes = [p for p in photos.files[obj_dir] if p.suffix == ".jpg"], \
            [p for p in photos.files[scene_dir] if p.suffix == ".jpg"]
        query = _rgb(photos.use(objs[0], False))  # the clean reference photo
        obj = _rgb(photos.use(objs[1], False))  # another photo of the same category is pasted
        scene = _rgb(photos.use(scenes[0], False))
        comp, box = composite(obj, scene, 224, 63, rng)
        pairs.append((query, comp, box))
        sources += [query, scene]
    sets[SET_B] = (pairs, sources)
    sets[SET_C] = _instance_tuning(photos, rng)
    return sets


def _instance_tuning(photos: Photos, rng) -> tuple[list, list]:
    """Set C: bench/instance_set.py's 100 objects (each category's first photo, the clean reference). Per object:
    query = the reference; result = a real photo of another category, resized to 640×480 (480×640 for one in four),
    with the reference pasted off-centre."""
    import instance_set

    cats = photos.cats[:100]
    pairs, sources = [], []
    for i, c in enumerate(cats):
        ref = _instance_ref(photos.use(photos.files[c][0], False))
        j = (i + 1 + int(rng.integers(0, len(cats) - 1))) % len(cats)  # another category
        scene_path = photos.files[cats[j]][1 + int(rng.integers(0, len(photos.files[cats[j]]) - 1))]
        scene = _rgb(photos.use(scene_path, False))
        size = instance_set.CANVAS if rng.random() < 0.75 else instance_set.CANVAS[::-1]
        comp, box = paste_off_centre(ref, scene, size, rng)
        pairs.append((ref, comp, box))
        sources += [ref, scene.resize(size, Image.BILINEAR)]
    return pairs, sources


def matched_pairs(held: bool, photos: Photos | None, n: int = 20) -> dict[str, list]:
    """Faithfulness pairs, two photos of one person / one category. Tuning: the first ``n`` people (photos 1, 2), every
    fifth category's first two photos. Held-out: the next ``n`` people, and for every fifth category from the third
    on, two photos no pair has used."""
    out = {}
    faces = _common.shared_dataset("att_faces")
    if faces is not None:
        people = sorted(p for p in faces.iterdir() if p.is_dir())
        people = people[n:2 * n] if held else people[:n]
        out["att_faces"] = [(_rgb(p / "1.pgm"), _rgb(p / "2.pgm")) for p in people]
    if photos is not None:
        if not held:
            cats = photos.cats[::5][:n]
            out["caltech101"] = [tuple(_rgb(photos.use(f, False)) for f in
                                       [p for p in photos.files[c] if p.suffix == ".jpg"][:2]) for c in cats]
        else:
            cats = photos.cats[2::5][:n]
            out["caltech101"] = [(_rgb(photos.fresh(c)), _rgb(photos.fresh(c))) for c in cats]
    return out


def heldout_localisation(photos: Photos | None, seed: int = 1) -> dict[str, tuple[list, list]]:
    """A′, B′, C′ and family D from photos no tuning pair used (call after the tuning sets and pairs are made)."""
    import instance_set

    rng = np.random.default_rng(seed)
    sets = {SET_A: _skimage_set(HELD_OBJECTS, HELD_SCENES, rng)}
    if photos is None:
        return sets
    # B′: categories that tuning B did not use, each object category's two fresh photos (query; the pasted one)
    cats = [c for c in photos.cats if photos.free_count(c) >= 3]
    order = rng.permutation(len(cats))
    pairs, sources = [], []
    for i in range(20):
        obj_dir, scene_dir = cats[order[2 * i]], cats[order[2 * i + 1]]
        query, obj = _rgb(photos.fresh(obj_dir)), _rgb(photos.fresh(obj_dir))
        scene = _rgb(photos.fresh(scene_dir))
        comp, box = composite(obj, scene, 224, 63, rng)
        pairs.append((query, comp, box))
        sources += [query, scene]
    sets[SET_B] = (pairs, sources)

    def scene_for(i: int, size):  # a fresh photo of another category, at the composite's size
        for k in rng.permutation(len(photos.cats)):  # from categories with photos to spare (references come first)
            if k != i % len(photos.cats) and photos.free_count(photos.cats[k]) >= 3:
                return _rgb(photos.fresh(photos.cats[k], rng)).resize(size, Image.BILINEAR)
        raise RuntimeError("no scene photo left for the held-out sets")

    def canvas():
        return instance_set.CANVAS if rng.random() < 0.75 else instance_set.CANVAS[::-1]

    cats = photos.cats[:100]
    families = {SET_C: [], SET_D1: [], SET_D2: [], SET_D3: []}
    sources: dict[str, list] = {k: [] for k in families}
    for i, c in enumerate(cats):  # C′: one object per category, as set C
        ref = _instance_ref(photos.fresh(c))
        size = canvas()
        scene = scene_for(i, size)
        comp, box = paste_off_centre(ref, scene, size, rng)
        families[SET_C].append((ref, comp, box))
        sources[SET_C] += [ref, scene]
    for name in HELD_ONLY:
        made = 0
        for i in rng.permutation(len(cats)):
            if made == D_PAIRS:
                break
            if not photos.free_count(cats[i]):
                continue
            made += 1
            ref = _instance_ref(photos.fresh(cats[i]))
            size = canvas()
            scene = scene_for(int(i), size)
            if name == SET_D1:
                comp, box = paste_off_centre(ref, scene, size, rng, area=(0.02, 0.04))
            elif name == SET_D2:
                comp, box = paste_warped(ref, scene, size, rng)
            else:
                spare = [k for k in range(len(cats)) if k != i and photos.free_count(cats[k])]
                other = _instance_ref(photos.fresh(cats[spare[int(rng.integers(0, len(spare)))]]))
                comp, box = paste_two(ref, other, scene, size, rng)
                sources[name].append(other)
            families[name].append((ref, comp, box))
            sources[name] += [ref, scene]
    sets.update({k: (families[k], sources[k]) for k in families})
    return sets


def all_sets(quick: bool = False) -> dict:
    """{"tuning": {set: (pairs, sources)}, "held-out": {...}, "pairs": {"tuning": {dataset: pairs}, "held-out":
    ...}}, made in a fixed order so that the tuning parts are those the defaults were chosen on."""
    data = _common.shared_dataset("caltech101")
    photos = Photos(data) if data is not None else None
    tuning = tuning_localisation(np.random.default_rng(0), photos)
    pairs_t = matched_pairs(False, photos)
    pairs_h = matched_pairs(True, photos)
    held = heldout_localisation(photos)
    if photos is not None:
        assert not (photos.tuning & photos.held), "a photo in both parts"
    out = {"tuning": tuning, "held-out": held, "pairs": {"tuning": pairs_t, "held-out": pairs_h}}
    if quick:
        for part in ("tuning", "held-out"):
            out[part] = {k: (p[::5], s) for k, (p, s) in out[part].items()}
        out["pairs"] = {k: {d: p[:8] for d, p in v.items()} for k, v in out["pairs"].items()}
    return out


if __name__ == "__main__":  # a look at the sets: python bench/explain_sets.py [OUT_DIR] (saves a few composites)
    import sys

    sets = all_sets()
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else None
    for part in ("tuning", "held-out"):
        for name, (pairs, sources) in sets[part].items():
            boxes = [(b[2] - b[0]) * (b[3] - b[1]) / (c.width * c.height) for _, c, b in pairs]
            print(f"{part:8s} {name:55s} {len(pairs):3d} pairs, box {np.mean(boxes):.3f} of the photo")
            if out is not None:
                out.mkdir(parents=True, exist_ok=True)
                for k, (q, c, b) in enumerate(pairs[:3]):
                    from PIL import ImageDraw

                    c = c.copy()
                    ImageDraw.Draw(c).rectangle(b, outline=(255, 0, 0), width=2)
                    c.save(out / f"{part}_{name[:2].strip(':')}_{k}.jpg")
    for part, v in sets["pairs"].items():
        print(part, {d: len(p) for d, p in v.items()})
