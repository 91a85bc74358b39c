"""Is one photo an edited copy of another? The near-duplicate pair test behind ``retrieve duplicates``.

Global scores and inlier counts alone cannot tell an edited copy from another photo of the same object: both
score high and both give many inliers. An edited copy differs in a way another photo cannot: once aligned, its
pixels agree with the original's. Gradients are compared cell by cell with a normalised correlation (so a colour,
brightness or contrast change does not matter) and summarised by their median (so text or a watermark over part of
the picture does not matter either); another photo of the same scene, even one taken from almost the same place, is
offset by parallax and movement by a few pixels, and its gradients do not line up. Two ways to align:

1. **the frames** (:func:`_frame`, cheap, tried first): a copy that was not cropped fills the same frame, as it is,
   turned by a multiple of 90° or mirrored. The orientation whose aspect ratio matches and whose tiny thumbnail
   correlates best is compared pixel by pixel; no feature point is needed. Resized, recompressed, colour-adjusted,
   turned, mirrored and text-marked copies pass here.
2. **feature points** (:func:`_one_way`, for crops): ORB matches on a small grey copy fit one *similarity*
   transform (OpenCV's ``estimateAffinePartial2D`` with RANSAC) with many inliers, its rotation a multiple of 90° (a
   photo turned in an editor, never a camera turned by 7°), the aligned frames overlapping over most of each photo
   (a crop keeps most of the picture); then the pixels must agree. ORB, not the SIFT of retrieval/match/verify.py:
   an edited copy is the same pixels, which ORB aligns as well at a tenth of the cost. A pair with the geometry but
   not the rest is *similar* (the same scene or object), not a near-duplicate.

A photo's grey copy is made once and kept while the caller needs it (:class:`FeatureCache`); its ORB points only
when a pair needs them.
"""
from __future__ import annotations

import math
import threading
from dataclasses import dataclass, field

import numpy as np

from retrieval.errors import ImageError
from retrieval.images import decode_image, read_image_bytes

SIDE = 384  # long side of the grey copy the test works on (decoded with JPEG draft mode: fast)
N_FEATURES = 500  # ORB keypoints per photo: the points align crops only (a text-marked copy, whose strokes took 400
# points of a budget that small, aligns by its frame); 1000 matched 4 times the pairs for the same F1 on the tuning split
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
BLUR = 1.5  # Gaussian sigma (px at SIDE) before gradients: what is left of the alignment error
CELL = 24  # pixels of a correlation cell (at SIDE)
MIN_AGREE = 0.8  # pixels agree: the median cell correlation of the aligned gradients (see agreement). Edited copies
# of the made sets (tests/test_duplicates.py, Caltech copies) score 0.82-1.0, the stereo pair of scikit-image (the
# same scene, the camera moved sideways) under 0.55, other prints of one banknote 0.74-0.9
SMALL_SIDE = 150  # a pair with a photo whose long side is under this (a thumbnail) ...
MIN_AGREE_SMALL = 0.93  # ... needs this agreement when aligned by points: at 92x112 px other shots of a face taken
# seconds apart (ORL) agree up to 0.94, as much as its edited copies; 0.93 keeps most of those shots out
THUMB = 24  # side of the square thumbnail that picks the frame test's orientation
FRAME_ASPECT = 0.02  # the frame test tries an orientation whose aspect ratio is a's within this (log ratio)
FRAME_NCC = 0.8  # ... and whose thumbnail correlates with a's over this
FRAME_AGREE_SMALL = 0.88  # a thumbnail's frame-aligned pixels need this agreement: aligned by their frames (not by
# points, which also align a face that moved a little), other shots of one ORL sitting agree 0.87 at most, its edited
# copies 0.90 and up (bench/duplicates.py's tuning split)


@dataclass
class Photo:
    """The small grey copy of one photo, its thumbnail for the frame test, and its ORB features (computed when first
    needed: a pair decided by the frame test needs none)."""

    grey: np.ndarray  # uint8, long side SIDE
    size: tuple[int, int]  # the photo's own (width, height), upright
    _points: tuple[np.ndarray, np.ndarray] | None = field(default=None, repr=False)
    _thumb: np.ndarray | None = field(default=None, repr=False)

    @property
    def points(self) -> np.ndarray:
        """N×2 float32 ORB keypoints, at the grey copy's scale."""
        return self._orb()[0]

    @property
    def descriptors(self) -> np.ndarray:
        """N×32 uint8 ORB descriptors (binary)."""
        return self._orb()[1]

    def _orb(self) -> tuple[np.ndarray, np.ndarray]:
        if self._points is None:  # two threads may both compute it: the same result, no lock needed
            kps, desc = _orb().detectAndCompute(self.grey, None)
            self._points = (np.float32([k.pt for k in kps]).reshape(-1, 2), desc) if desc is not None and kps \
                else (np.zeros((0, 2), np.float32), np.zeros((0, 32), np.uint8))
        return self._points

    @property
    def thumb(self) -> np.ndarray:
        """THUMB×THUMB float32, zero mean, unit norm: the grey copy squeezed to a square, so that turning or mirroring
        it is turning or mirroring the photo (:func:`_frame`)."""
        if self._thumb is None:
            import cv2

            t = cv2.resize(self.grey, (THUMB, THUMB), interpolation=cv2.INTER_AREA).astype(np.float32)
            t -= t.mean()
            self._thumb = t / max(float(np.linalg.norm(t)), 1e-6)
        return self._thumb


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
    aligned: str = "points"  # "frame": the frames aligned as they are (turned or mirrored), no points were matched
    partial: bool = False  # only the frame test was run (pair_test's points=False) and it did not pass


_local = threading.local()


def _orb():
    import cv2

    o = getattr(_local, "orb", None)
    if o is None:  # one detector per thread: detectAndCompute on a shared one is not documented as thread-safe
        o = _local.orb = cv2.ORB_create(nfeatures=N_FEATURES, fastThreshold=10)
    return o


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
    return Photo(np.ascontiguousarray(g), own)


def _knn2(queries: np.ndarray, base) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each query descriptor's nearest and second-nearest Hamming distances in ``base`` (a FAISS binary index) and its
    nearest's position: FAISS's popcount search, about three times as fast as OpenCV's brute-force knnMatch."""
    d, i = base.search(np.ascontiguousarray(queries), 2)
    return d[:, 0].astype(np.float32), d[:, 1].astype(np.float32), i[:, 0]


def _matches(a: Photo, b: Photo) -> tuple[np.ndarray, np.ndarray]:
    """Matched points (a's, b's) that pass Lowe's ratio test, the most distinctive first. Every SCREEN_STEP-th of
    a's points is matched first: under SCREEN_MIN of them matching, the pair has no geometry to find (no points
    returned) and the other points are not matched."""
    import faiss

    none = np.zeros((0, 2), np.float32), np.zeros((0, 2), np.float32)
    da, db = a.descriptors, b.descriptors
    if len(da) < 2 or len(db) < 2:
        return none
    base = faiss.IndexBinaryFlat(db.shape[1] * 8)
    base.add(np.ascontiguousarray(db))
    order = np.arange(len(da))
    order = np.concatenate([order[::SCREEN_STEP], np.delete(order, order[::SCREEN_STEP])])
    first = len(order[::SCREEN_STEP]) if len(da) >= SCREEN_STEP * SCREEN_MIN else len(order)

    def good(idx):
        d1, d2, nn = _knn2(da[idx], base)
        ok = d1 < RATIO * d2
        return d1[ok] / np.maximum(d2[ok], 1e-6), idx[ok], nn[ok]

    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)  # this thread's share only: the callers run pairs in parallel, and FAISS's
    try:  # OpenMP threads on a thousand queries cost more in waiting than they save
        found = [good(order[:first])]
        if first < len(order):
            if len(found[0][0]) < SCREEN_MIN:
                return none
            found.append(good(order[first:]))
    finally:
        faiss.omp_set_num_threads(threads)
    ratio, qi, ti = (np.concatenate(x) for x in zip(*found))
    if not len(ratio):
        return none
    best = np.lexsort((ti, qi, ratio))  # the most distinctive first (ties in a fixed order)
    return a.points[qi[best]], b.points[ti[best]]


def _grad(g: np.ndarray, blur: float = BLUR) -> tuple[np.ndarray, np.ndarray]:
    import cv2

    f = cv2.GaussianBlur(g.astype(np.float32), (0, 0), blur)
    return cv2.Sobel(f, cv2.CV_32F, 1, 0, ksize=3), cv2.Sobel(f, cv2.CV_32F, 0, 1, ksize=3)


def agreement(ga: np.ndarray, gb: np.ndarray, mask: np.ndarray, blur: float = BLUR) -> float:
    """Median over CELL×CELL cells (inside ``mask``, with texture in either photo) of the correlation of the two
    grey images' gradients: 1 for the same picture whatever its colours, ~0 for unrelated pixels."""
    import cv2

    ax, ay = _grad(ga, blur)
    bx, by = _grad(gb, blur)
    h, w = ga.shape
    hc, wc = h // CELL, w // CELL
    if hc == 0 or wc == 0:
        return 0.0

    def cells(x):  # each cell's sum (an area resize by a whole factor averages exact boxes, and fast)
        return cv2.resize(x[:hc * CELL, :wc * CELL], (wc, hc), interpolation=cv2.INTER_AREA) * (CELL * CELL)

    m = mask.astype(np.float32)
    inside = cells(m) >= 0.95 * CELL * CELL
    if mask.all():
        ab, aa, bb = cells(ax * bx + ay * by), cells(ax * ax + ay * ay), cells(bx * bx + by * by)
    else:
        ab, aa, bb = cells((ax * bx + ay * by) * m), cells((ax * ax + ay * ay) * m), cells((bx * bx + by * by) * m)
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
    need = _needed(a, b)
    r.agree = agreement(a.grey, warped, mask)
    if r.agree < need:
        r.why = f"pixels disagree ({r.agree:.2f})"
        return r
    r.near = True
    return r


def _orient(x: np.ndarray, turns: int, mirror: bool) -> np.ndarray:
    """``x`` mirrored (left-right) when asked, then turned by ``turns`` × 90° counter-clockwise."""
    return np.rot90(x[:, ::-1] if mirror else x, turns)


def _frame(a: Photo, b: Photo) -> PairResult | None:
    """The cheap test first: b as it is, turned by k·90° or mirrored, scaled onto a's frame, when that gives a's
    aspect ratio (a copy that was not cropped). Of those orientations, the one whose thumbnail correlates best with
    a's (over FRAME_NCC) is compared pixel by pixel (:func:`agreement`); a pass decides the pair without any feature
    point. None: no orientation fits or the pixels disagree (the point test decides)."""
    import cv2

    (wa, ha), (wb, hb) = a.size, b.size
    ra, rb = math.log(max(wa, 1) / max(ha, 1)), math.log(max(wb, 1) / max(hb, 1))
    best, orient = FRAME_NCC, None
    for mirror in (False, True):
        for turns in range(4):
            if abs(ra - (-rb if turns % 2 else rb)) > FRAME_ASPECT:  # a quarter turn inverts the aspect ratio
                continue
            ncc = float((a.thumb * _orient(b.thumb, turns, mirror)).sum())
            if ncc > best:
                best, orient = ncc, (turns, mirror)
    if orient is None:
        return None
    g = np.ascontiguousarray(_orient(b.grey, *orient))
    h, w = a.grey.shape
    if g.shape != (h, w):
        g = cv2.resize(g, (w, h), interpolation=cv2.INTER_LINEAR)
    small = min(max(a.size), max(b.size))  # blurred to half of the smaller photo's own pixel: a thumbnail enlarged
    agree = agreement(a.grey, g, np.ones((h, w), bool), max(BLUR, 0.5 * SIDE / max(small, 1)))  # to SIDE is blurry
    if agree < (FRAME_AGREE_SMALL if small < SMALL_SIDE else MIN_AGREE):
        return None
    return PairResult(True, True, 0, 90.0 * orient[0], orient[1], (1.0, 1.0), agree, aligned="frame")


def _needed(a: Photo, b: Photo) -> float:
    """The agreement a pair needs: MIN_AGREE, or MIN_AGREE_SMALL when one of the two is a thumbnail."""
    return MIN_AGREE_SMALL if min(max(a.size), max(b.size)) < SMALL_SIDE else MIN_AGREE


def pair_test(a: Photo, b: Photo, points: bool = True) -> PairResult:
    """The test of the module docstring: the frame test (:func:`_frame`), else (``points``) the feature points. Without
    ``points`` a pair the frame test does not pass is left undecided (``partial``): a crop needs the points."""
    best = _frame(a, b)
    if best is not None:
        return best
    if not points:
        return PairResult(False, False, 0, why="frames do not align", partial=True)
    return _one_way(a, b, False) or PairResult(False, False, 0, why="no geometry")


class FeatureCache:
    """Photos' features by row id, computed once and kept (thread-safe; unreadable files give None); with ``keep``
    (bytes), as many as fit, the least recently used dropped first (computed again if asked for again). A photo
    counts its grey copy and room for its ORB points, whether or not they were computed yet."""

    def __init__(self, keep: int | None = None):
        from collections import OrderedDict

        self._kept: OrderedDict[int, tuple[Photo | None, int]] = OrderedDict()
        self._keep = keep
        self._bytes = 0
        self._lock = threading.Lock()

    def get(self, row_id: int, path: str) -> Photo | None:
        with self._lock:
            if row_id in self._kept:
                self._kept.move_to_end(row_id)
                return self._kept[row_id][0]
        try:
            p = load_photo(path)
        except (ImageError, OSError):
            p = None
        size = 0 if p is None else p.grey.nbytes + N_FEATURES * (32 + 8) + THUMB * THUMB * 4
        with self._lock:
            if row_id in self._kept:  # another thread loaded it meanwhile: one Photo per row (its points once)
                return self._kept[row_id][0]
            self._kept[row_id] = (p, size)
            self._bytes += size
            while self._keep is not None and self._bytes > self._keep and len(self._kept) > 1:
                self._bytes -= self._kept.popitem(last=False)[1][1]
        return p

    def drop(self, row_id: int) -> None:
        with self._lock:
            gone = self._kept.pop(row_id, None)
            if gone is not None:
                self._bytes -= gone[1]

    def __contains__(self, row_id: int) -> bool:
        return row_id in self._kept
