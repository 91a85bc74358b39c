"""Is one photo an edited copy of another? The near-duplicate pair test behind ``retrieve duplicates``.

Global scores and inlier counts alone cannot tell an edited copy from another photo of the same object: both
score high and both give many inliers. An edited copy differs in a way another photo cannot:

1. **geometry**: ORB matches (on a small grey copy, and against the mirrored copy) fit one *similarity*
   transform (rotation, scale, shift; OpenCV's ``estimateAffinePartial2D`` with RANSAC) with many inliers. ORB, not
   the SIFT of retrieval/match/verify.py: an edited copy is the same pixels, which ORB aligns as well, at about a
   tenth of SIFT's cost per photo;
2. its rotation is a multiple of 90° (a photo turned in an editor, never a camera turned by 7°);
3. the aligned frames overlap over most of each photo (a crop keeps most of the picture);
4. the pixels agree once aligned (the alignment refined on the pixels themselves, ECC, where the feature points'
   alignment alone falls short): gradients, compared cell by cell with a normalised correlation (so a
   colour, brightness or contrast change does not matter), and summarised by a robust statistic (so text or a
   watermark over part of the picture does not either). Another photo of the same scene, even one taken from
   almost the same place, is offset by parallax and movement at the scale of a few pixels, and its gradients do
   not line up.

A pair that passes 1 but not 2-4 is *similar* (the same scene or object), not a near-duplicate.
Features are computed once per photo and kept in memory while the caller needs them (:class:`FeatureCache`).
"""
from __future__ import annotations

import math
import threading
from dataclasses import dataclass, field

import numpy as np

from retrieval.errors import ImageError
from retrieval.images import decode_image, read_image_bytes

SIDE = 384  # long side of the grey copy the test works on (decoded with JPEG draft mode: fast)
N_FEATURES = 1000  # ORB keypoints per photo (400 lost text-marked copies: the text's strokes took the budget)
RATIO = 0.8  # Lowe's ratio test
SCREEN_STEP, SCREEN_MIN = 4, 6  # a pair is dropped early when fewer than SCREEN_MIN of a's every SCREEN_STEP-th point
# match (see _matches): on 500 candidate pairs of a 10k set, every such pair had no geometry at all (not 12 inliers),
# and every near-duplicate matched 14 or more of them; this drops 40-50 % of the other pairs at a quarter of the cost
REPROJ_PX = 3.0  # RANSAC threshold at SIDE
MIN_INLIERS = 12  # geometry confirmed (similar tier) from here on
NEAR_INLIERS = 30  # a near-duplicate needs this many: the same pixels give many (58 and up for every edited copy of
# the Caltech made set), while a mirror-symmetric drawing matched against a turned or mirrored part of itself (a stop
# sign's corners, a butterfly's wings) aligns with 14-24
ANGLE_DEG = 4.0  # rotation within this of a multiple of 90°
MIN_COVER = 0.8  # the aligned overlap covers at least this share of one photo (the cropped one) ...
MIN_COVER_BOTH = 0.55  # ... and this share of the other (a crop of 20 % per side keeps 0.64 of the area)
REFINE = True  # refine the alignment by ECC before comparing pixels (see _refined)
BLUR = 1.5  # Gaussian sigma (px at SIDE) before gradients: what is left of the alignment error
CELL = 24  # pixels of a correlation cell (at SIDE)
MIN_AGREE = 0.8  # pixels agree: the median cell correlation of the aligned gradients (see agreement). Edited copies
# of the made sets (tests/test_duplicates.py, Caltech copies) score 0.82-1.0, the stereo pair of scikit-image (the
# same scene, the camera moved sideways) under 0.55, other prints of one banknote 0.74-0.9
SMALL_SIDE = 150  # a pair with a photo whose long side is under this (a thumbnail) ...
MIN_AGREE_SMALL = 0.93  # ... needs this agreement: at 92x112 px other shots of a face taken seconds apart (ORL) agree
# 0.85-0.98, as much as its edited copies; 0.93 keeps most of those shots out, at the cost of the small copies' recall


@dataclass
class Photo:
    """The small grey copy of one photo and its ORB features, the mirrored copy's made on demand."""

    grey: np.ndarray  # uint8, long side SIDE
    points: np.ndarray  # N×2 float32, at the grey copy's scale
    descriptors: np.ndarray  # N×32 uint8 (ORB, binary)
    size: tuple[int, int]  # the photo's own (width, height), upright
    _mirror: Photo | None = field(default=None, repr=False)

    def mirrored(self) -> Photo:
        if self._mirror is None:
            self._mirror = photo_from_grey(np.ascontiguousarray(self.grey[:, ::-1]), self.size)
        return self._mirror


@dataclass
class PairResult:
    near: bool  # an edited copy (passes every test)
    similar: bool  # geometry confirmed (the same scene or object), whether or not near
    inliers: int
    angle: float = 0.0  # degrees
    mirrored: bool = False
    cover: tuple[float, float] = (0.0, 0.0)  # share of a and of b inside the aligned overlap
    agree: float = 0.0  # median cell correlation of aligned gradients
    why: str = ""  # the first test failed ("" when near)


_local = threading.local()


def _orb():
    import cv2

    o = getattr(_local, "orb", None)
    if o is None:  # one detector per thread: detectAndCompute on a shared one is not documented as thread-safe
        o = _local.orb = cv2.ORB_create(nfeatures=N_FEATURES, fastThreshold=10)
    return o


def photo_from_grey(grey: np.ndarray, size: tuple[int, int]) -> Photo:
    kps, desc = _orb().detectAndCompute(grey, None)
    if desc is None or not kps:
        return Photo(grey, np.zeros((0, 2), np.float32), np.zeros((0, 32), np.uint8), size)
    return Photo(grey, np.float32([k.pt for k in kps]), desc, size)


def load_photo(path: str) -> Photo:
    """The pair test's view of the photo at ``path`` (ImageError when it cannot be read)."""
    import cv2

    img = decode_image(read_image_bytes(path), path, min_side=SIDE * 3 // 4)
    own = tuple(img.info.get("original_size", img.size))
    g = np.asarray(img.convert("L"))
    scale = SIDE / max(g.shape)  # small photos are enlarged: ORB finds too few points in a 100-px thumbnail
    if scale != 1.0:
        g = cv2.resize(g, (max(1, round(g.shape[1] * scale)), max(1, round(g.shape[0] * scale))),
                       interpolation=cv2.INTER_AREA if scale < 1.0 else cv2.INTER_LINEAR)
    return photo_from_grey(np.ascontiguousarray(g), own)


def _matches(a: Photo, b: Photo) -> tuple[np.ndarray, np.ndarray]:
    """Matched points (a's, b's) that pass Lowe's ratio test, the most distinctive first. Every SCREEN_STEP-th of
    a's points is matched first: under SCREEN_MIN of them matching, the pair has no geometry to find (no points
    returned) and the other points are not matched."""
    import cv2

    none = np.zeros((0, 2), np.float32), np.zeros((0, 2), np.float32)
    if len(a.descriptors) < 2 or len(b.descriptors) < 2:
        return none
    bf = cv2.BFMatcher(cv2.NORM_HAMMING)
    order = np.arange(len(a.descriptors))
    order = np.concatenate([order[::SCREEN_STEP], np.delete(order, order[::SCREEN_STEP])])
    first = len(order[::SCREEN_STEP]) if len(a.descriptors) >= SCREEN_STEP * SCREEN_MIN else len(order)

    def good(idx):
        knn = bf.knnMatch(a.descriptors[idx], b.descriptors, 2)
        return [(m[0].distance / max(m[1].distance, 1e-6), int(idx[m[0].queryIdx]), m[0].trainIdx)
                for m in knn if len(m) == 2 and m[0].distance < RATIO * m[1].distance]

    found = good(order[:first])
    if first < len(order):
        if len(found) < SCREEN_MIN:
            return none
        found += good(order[first:])
    if not found:
        return none
    _, qi, ti = zip(*sorted(found))
    return a.points[list(qi)], b.points[list(ti)]


def _grad(g: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    import cv2

    f = cv2.GaussianBlur(g.astype(np.float32), (0, 0), BLUR)
    return cv2.Sobel(f, cv2.CV_32F, 1, 0, ksize=3), cv2.Sobel(f, cv2.CV_32F, 0, 1, ksize=3)


def agreement(ga: np.ndarray, gb: np.ndarray, mask: np.ndarray) -> float:
    """Median over CELL×CELL cells (inside ``mask``, with texture in either photo) of the correlation of the two
    grey images' gradients: 1 for the same picture whatever its colours, ~0 for unrelated pixels."""
    ax, ay = _grad(ga)
    bx, by = _grad(gb)
    h, w = ga.shape
    hc, wc = h // CELL, w // CELL
    if hc == 0 or wc == 0:
        return 0.0

    def cells(x):
        return x[:hc * CELL, :wc * CELL].reshape(hc, CELL, wc, CELL).sum((1, 3))

    m = mask.astype(np.float32)
    inside = cells(m) >= 0.95 * CELL * CELL
    ab = cells((ax * bx + ay * by) * m)
    aa = cells((ax * ax + ay * ay) * m)
    bb = cells((bx * bx + by * by) * m)
    # cells flat in both photos say nothing (sky, walls); a cell textured in one only counts, as disagreement: a
    # sticker over a quarter of a photo makes it another picture (with the smaller of the two energies, a photo
    # used as the background of another one was taken for an edited copy of it)
    energy = np.maximum(aa, bb)
    floor = 0.05 * np.median(energy[inside]) if inside.any() else 0.0
    use = inside & (energy > max(floor, 1.0 * CELL * CELL))
    if use.sum() < max(4, 0.1 * inside.sum()):  # too little texture in common to say the pixels agree
        return 0.0
    corr = ab[use] / np.sqrt(np.maximum(aa[use] * bb[use], 1e-6))
    return float(np.median(corr))


def _refined(ga: np.ndarray, gb: np.ndarray, m: np.ndarray, warped: np.ndarray, mask: np.ndarray):
    """b aligned on a to a fraction of a pixel: the feature points' transform refined on the pixels themselves (ECC,
    affine, which also absorbs a slight shear). An edited copy then agrees at the finest scale; the feature points
    alone leave an error of about a pixel, which blurs the difference between a copy and another print or photo."""
    import cv2

    if not REFINE:
        return warped, mask
    w = cv2.invertAffineTransform(m.astype(np.float32)).astype(np.float32)
    try:
        _, w = cv2.findTransformECC(ga.astype(np.float32), gb.astype(np.float32), w, cv2.MOTION_AFFINE,
                                    (cv2.TERM_CRITERIA_COUNT | cv2.TERM_CRITERIA_EPS, 30, 1e-4), mask.astype(np.uint8), 5)
    except cv2.error:  # did not converge: the feature points' transform stands
        return warped, mask
    ha, wa = ga.shape
    hb, wb = gb.shape
    inv = cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP
    warped = cv2.warpAffine(gb, w, (wa, ha), flags=inv)
    mask = cv2.warpAffine(np.full((hb, wb), 255, np.uint8), w, (wa, ha), flags=cv2.INTER_NEAREST | cv2.WARP_INVERSE_MAP)
    return warped, cv2.erode(mask, np.ones((5, 5), np.uint8)) > 0


def _one_way(a: Photo, b: Photo, mirrored: bool) -> PairResult | None:
    import cv2

    pa, pb = _matches(a, b)
    if len(pa) < MIN_INLIERS:
        return None
    m, inl = cv2.estimateAffinePartial2D(pb, pa, method=cv2.RANSAC, ransacReprojThreshold=REPROJ_PX,
                                         maxIters=2000, confidence=0.995, refineIters=10)
    if m is None or inl is None:
        return None
    n = int(inl.sum())
    if n < MIN_INLIERS:
        return None
    angle = math.degrees(math.atan2(m[1, 0], m[0, 0]))
    r = PairResult(False, True, n, angle, mirrored)
    off = abs((angle + 45) % 90 - 45)
    if n < NEAR_INLIERS:
        r.why = f"{n} inliers"
        return r
    if off > ANGLE_DEG:
        r.why = f"rotated by {angle:.0f}°"
        return r
    ha, wa = a.grey.shape
    hb, wb = b.grey.shape
    warped = cv2.warpAffine(b.grey, m, (wa, ha), flags=cv2.INTER_LINEAR)
    mask = cv2.warpAffine(np.full((hb, wb), 255, np.uint8), m, (wa, ha), flags=cv2.INTER_NEAREST)
    mask = cv2.erode(mask, np.ones((5, 5), np.uint8)) > 0
    scale2 = abs(m[0, 0] * m[1, 1] - m[0, 1] * m[1, 0])
    overlap = float(mask.sum())
    r.cover = (overlap / (wa * ha), min(1.0, overlap / max(scale2 * wb * hb, 1e-6)))
    if max(r.cover) < MIN_COVER or min(r.cover) < MIN_COVER_BOTH:
        r.why = f"overlap {r.cover[0]:.0%} / {r.cover[1]:.0%}"
        return r
    need = MIN_AGREE_SMALL if min(max(a.size), max(b.size)) < SMALL_SIDE else MIN_AGREE
    r.agree = agreement(a.grey, warped, mask)
    if r.agree < need:  # the refinement only improves the alignment: it is run where the points' own falls short
        warped, mask = _refined(a.grey, b.grey, m, warped, mask)
        r.agree = max(r.agree, agreement(a.grey, warped, mask))
    if r.agree < need:
        r.why = f"pixels disagree ({r.agree:.2f})"
        return r
    r.near = True
    return r


def pair_test(a: Photo, b: Photo) -> PairResult:
    """The test of the module docstring, b as it is and mirrored; the better of the two. The mirrored copy is not tried
    when b as it is already fits a with many inliers (another photo of the scene, the right way round)."""
    best = _one_way(a, b, False)
    if best is None or (not best.near and best.inliers < 3 * MIN_INLIERS):
        other = _one_way(a, b.mirrored(), True)
        if other is not None and (best is None or other.near or other.inliers > best.inliers):
            best = other
    return best or PairResult(False, False, 0, why="no geometry")


class FeatureCache:
    """Photos' features by row id, computed once and kept (thread-safe; unreadable files give None); with ``keep``,
    at most that many, the least recently used dropped first (computed again if asked for again)."""

    def __init__(self, keep: int | None = None):
        from collections import OrderedDict

        self._kept: OrderedDict[int, Photo | None] = OrderedDict()
        self._keep = keep
        self._lock = threading.Lock()

    def get(self, row_id: int, path: str) -> Photo | None:
        with self._lock:
            if row_id in self._kept:
                self._kept.move_to_end(row_id)
                return self._kept[row_id]
        try:
            p = load_photo(path)
        except (ImageError, OSError):
            p = None
        with self._lock:
            self._kept[row_id] = p
            while self._keep is not None and len(self._kept) > self._keep:
                self._kept.popitem(last=False)
        return p

    def drop(self, row_id: int) -> None:
        with self._lock:
            self._kept.pop(row_id, None)

    def __contains__(self, row_id: int) -> bool:
        return row_id in self._kept
