"""An instance-level test set made from real photos: each object photo "re-photographed" in clutter.

    python bench/instance_set.py [--objects 100] [--views 4] [--out bench/.cache/instance]

For each of ``--objects`` Caltech-101 categories, the first photo is the object (think: a product's
clean catalogue image, saved as ``ref.jpg``). Each of ``--views`` synthetic phone photos of it crops
part of it away, scales, rotates and warps it in perspective, changes exposure, contrast and white
balance, blurs it, pastes it onto another real photo (from another category) as clutter, adds sensor
noise and saves it as a JPEG of random quality. Folder = object, so bench/quality.py's protocol applies:
every image queries the other ones; photo→reference R@1 ranks only the references.

Deterministic (seeded); written once under bench/.cache (ignored by git) and reused.
"""
from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import _common
import cv2
import numpy as np
from PIL import Image

CANVAS = (640, 480)  # a phone photo's size, landscape (portrait for one view in four)
VERSION = 2  # bump when the recipe changes, so an old cache is rebuilt (2: every view has its own background)


def _load(path: Path, long_side: int = 640) -> np.ndarray:
    img = Image.open(path).convert("RGB")
    img.thumbnail((long_side, long_side), Image.LANCZOS)
    return np.asarray(img)


def _view(obj: np.ndarray, bg: np.ndarray, rng: random.Random) -> np.ndarray:
    """One synthetic photo of ``obj`` in front of ``bg`` (both RGB uint8)."""
    w, h = CANVAS if rng.random() < 0.75 else CANVAS[::-1]
    canvas = cv2.resize(bg, (w, h), interpolation=cv2.INTER_AREA).astype(np.float32)
    oh, ow = obj.shape[:2]
    # crop: lose up to 15 % on each side (the object is partly out of frame or occluded by the edge)
    x0, x1 = int(ow * rng.uniform(0, 0.15)), int(ow * (1 - rng.uniform(0, 0.15)))
    y0, y1 = int(oh * rng.uniform(0, 0.15)), int(oh * (1 - rng.uniform(0, 0.15)))
    crop = obj[y0:y1, x0:x1].astype(np.float32)
    ch, cw = crop.shape[:2]
    # scale: the object spans 35-75 % of the photo's shorter side
    s = rng.uniform(0.35, 0.75) * min(w, h) / max(ch, cw)
    src = np.float32([[0, 0], [cw, 0], [cw, ch], [0, ch]])
    dst = (src - [cw / 2, ch / 2]) * s
    a = np.deg2rad(rng.uniform(-25, 25))  # in-plane rotation
    dst = dst @ np.float32([[np.cos(a), np.sin(a)], [-np.sin(a), np.cos(a)]])
    jitter = 0.18 * s * max(ch, cw)  # perspective: each corner moves by up to 18 % of the size
    dst = dst + np.float32([[rng.uniform(-jitter, jitter), rng.uniform(-jitter, jitter)] for _ in range(4)])
    lo, hi = dst.min(0), dst.max(0)
    cx = rng.uniform(-lo[0], max(-lo[0], w - hi[0]))
    cy = rng.uniform(-lo[1], max(-lo[1], h - hi[1]))
    dst = (dst + [cx, cy]).astype(np.float32)
    m = cv2.getPerspectiveTransform(src, dst)
    # lighting on the object: exposure, contrast, white balance
    crop = (crop - 128) * rng.uniform(0.7, 1.2) + 128
    crop = crop * rng.uniform(0.6, 1.3) * np.float32([rng.uniform(0.85, 1.15) for _ in range(3)])
    warped = cv2.warpPerspective(np.clip(crop, 0, 255), m, (w, h), flags=cv2.INTER_LINEAR)
    mask = cv2.warpPerspective(np.ones((ch, cw), np.float32), m, (w, h), flags=cv2.INTER_LINEAR)[..., None]
    out = canvas * (1 - mask) + warped * mask
    # a side light across the whole photo, camera blur and sensor noise
    grad = np.linspace(rng.uniform(0.75, 1.0), rng.uniform(1.0, 1.25), w if rng.random() < 0.5 else h, dtype=np.float32)
    out = out * (grad[None, :, None] if len(grad) == w else grad[:, None, None])
    sigma = rng.uniform(0.0, 2.0)
    if sigma > 0.3:
        out = cv2.GaussianBlur(out, (0, 0), sigma)
    out = out + np.random.default_rng(rng.randrange(1 << 30)).normal(0, rng.uniform(1, 6), out.shape)
    return np.clip(out, 0, 255).astype(np.uint8)


def build(source: Path, out: Path, objects: int = 100, views: int = 4, seed: int = 0) -> Path:
    """Write the set under ``out`` (one folder per object: ref.jpg + view1..N.jpg) unless it is there."""
    stamp = out / "recipe.json"
    recipe = {"version": VERSION, "objects": objects, "views": views, "seed": seed, "source": str(source)}
    if stamp.exists() and json.loads(stamp.read_text()) == recipe:
        return out
    rng = random.Random(seed)
    cats = sorted(p for p in source.iterdir() if p.is_dir() and not p.name.startswith(("_", ".")))[:objects]
    photos = {c: sorted(p for p in c.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png")) for c in cats}
    backgrounds = [(c, p) for c in cats for p in photos[c][1:]]
    rng.shuffle(backgrounds)  # each view gets a background of its own: two views sharing one would "match"
    if len(backgrounds) < objects * views:
        raise SystemExit(f"{source}: {len(backgrounds)} background photos for {objects * views} views")
    for c in cats:
        d = out / c.name
        d.mkdir(parents=True, exist_ok=True)
        obj = _load(photos[c][0])
        Image.fromarray(obj).save(d / "ref.jpg", quality=95)
        for v in range(views):
            i = next(i for i, b in enumerate(backgrounds) if b[0] != c)
            _, bp = backgrounds.pop(i)
            img = _view(obj, _load(bp), rng)
            Image.fromarray(img).save(d / f"view{v + 1}.jpg", quality=rng.randint(60, 90))
    stamp.write_text(json.dumps(recipe))
    return out


def spare(source: Path, objects: int = 100, views: int = 4, seed: int = 0) -> list[Path]:
    """The photos of ``source`` that :func:`build` (same arguments) uses neither as an object nor as a
    background: a sample of the same kind of photos, disjoint from the set (500 with the defaults, from
    the same 100 categories). Which backgrounds are used depends only on the seeded shuffle, repeated here."""
    rng = random.Random(seed)
    cats = sorted(p for p in source.iterdir() if p.is_dir() and not p.name.startswith(("_", ".")))[:objects]
    photos = {c: sorted(p for p in c.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png")) for c in cats}
    backgrounds = [(c, p) for c in cats for p in photos[c][1:]]
    rng.shuffle(backgrounds)
    for c in cats:
        for _ in range(views):
            backgrounds.pop(next(i for i, b in enumerate(backgrounds) if b[0] != c))
    return sorted(p for _, p in backgrounds)


def build_shared(source: Path, out: Path, backgrounds: int = 50, objects: int = 100, views: int = 4,
                 seed: int = 0) -> Path:
    """The set with *shared* backgrounds (issue 31's "a book behind several products"): the same objects and
    references as :func:`build`, but each phone photo is pasted onto one of ``backgrounds`` photos (the first of
    :func:`spare`'s, so none of them is an object or a background of the set), each behind about
    ``objects × views / backgrounds`` phone photos of different objects. Written once under ``out``."""
    stamp = out / "recipe.json"
    recipe = {"version": VERSION, "objects": objects, "views": views, "seed": seed, "source": str(source),
              "shared_backgrounds": backgrounds}
    if stamp.exists() and json.loads(stamp.read_text()) == recipe:
        return out
    rng = random.Random(seed + 1)
    cats = sorted(p for p in source.iterdir() if p.is_dir() and not p.name.startswith(("_", ".")))[:objects]
    pool = spare(source, objects, views, seed)
    rng.shuffle(pool)
    pool = pool[:backgrounds]
    loaded = [_load(p) for p in pool]
    turn = [b for _ in range(-(-objects * views // backgrounds)) for b in range(backgrounds)]
    rng.shuffle(turn)
    for c in cats:
        d = out / c.name
        d.mkdir(parents=True, exist_ok=True)
        obj = _load(sorted(p for p in c.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))[0])
        Image.fromarray(obj).save(d / "ref.jpg", quality=95)
        for v in range(views):
            b = next(i for i, b in enumerate(turn) if pool[b].parent.name != c.name)
            img = _view(obj, loaded[turn.pop(b)], rng)
            Image.fromarray(img).save(d / f"view{v + 1}.jpg", quality=rng.randint(60, 90))
    stamp.write_text(json.dumps(recipe))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--objects", type=int, default=100)
    ap.add_argument("--views", type=int, default=4)
    ap.add_argument("--out", type=Path, default=_common.ROOT / "bench" / ".cache" / "instance")
    args = ap.parse_args()
    src = _common.shared_dataset("caltech101")
    if src is None:
        return
    print(build(src, args.out, args.objects, args.views))


if __name__ == "__main__":
    main()
