"""Geometric verification: re-rank the top-K by local features that agree on one homography.

A global embedding says "these look alike"; it cannot say "this is the same object, seen from elsewhere".
Local features can: SIFT keypoints (OpenCV) are matched between the query and each candidate (Lowe's
ratio test, mutual nearest neighbours), and RANSAC (PROSAC) fits a homography to the matches. The number of matches consistent with it —
the *inliers* — counts points that sit where one plane seen from two viewpoints puts them; random
look-alikes rarely give more than a handful. A candidate with at least ``min_inliers`` is *confirmed*.

Re-ranking (:func:`rerank`) puts confirmed candidates first, the most *evidence* first, and keeps the others in
their global order behind them; it never drops a confirmed candidate in favour of an unconfirmed one. Evidence
(:func:`weigh`) is the inliers, except on an index with a catalogue once a catalogue image is confirmed: then a
photo that is not a catalogue image counts only its inliers on query keypoints that catalogue image matched too,
so a background (a book, a table) seen behind several products no longer confirms the wrong one.

Features are extracted once per image content (the file's sha256) and cached on disk under
``~/.cache/retrieve/local`` (``--verify`` on a new collection is slower the first time).
"""
from __future__ import annotations

import hashlib
import os
import threading
import zlib
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from retrieval.models.preprocess import cache_dir
from retrieval.errors import ImageError, RetrieveError
from retrieval.images import decode_image, load_image, read_image_bytes

RANSAC_ITERS = 500  # enough for ≥ 15 % inliers at 99.5 % confidence; caps the cost of hopeless pairs
MATCH_ROWS = 512  # query rows whose similarities to a candidate's are computed at once: the block (~2.6 MB for
                  # ~1300 candidate points) stays in the cache for the passes that follow (the top two per row, the
                  # column maxima); 6.0-6.8 ms a pair against 6.6-8.3 ms for the whole 2000-row matrix at once
                  # (one thread, best and median of 6 rounds over 60 candidates; the same matches)
FEATURE_MEMO = 256  # candidates' features (and their matching matrices) kept in memory by content hash
MAX_SIDE = 640  # local features are extracted from the photo at this long side (an index records its own: local_options)
N_FEATURES = 2000  # keypoints kept per photo at most (likewise)
MIN_INLIERS = 10  # confirmed from here on: 0.03 % of unrelated pairs reach it on the instance set, 88 % of
                  # true pairs do (SIFT 2000 keypoints, RootSIFT, 640 px, mutual ratio-0.85 matches, PROSAC;
                  # bench/results/quality.md)


# np.load parses each member's header with ast.literal_eval, which CPython 3.11 cannot run in several threads at
# once (SystemError "AST constructor recursion depth mismatch", python/cpython#106905): cache files of the first
# format (npz) are read one at a time. The current format (below) has no header to parse and needs no lock.
_NPZ_LOCK = threading.Lock()
_PREPARED_LOCK = threading.Lock()  # a features object's prepared matrices (Verifier.matrices)

# The per-content cache file, format 2 (``<sha256>.lf2``): the magic ``RLF2``, then little-endian uint32 n, int64
# width, int64 height; n × 2 float32 points; n × 128 uint8 descriptors; the CRC-32 of all that (uint32). Read with
# one read and np.frombuffer (no zip, no header parsing, no lock): 130 candidates in 29 ms in two threads against
# 102 ms one by one under the lock for the npz of format 1 (``<sha256>.npz``, still read, then written again in
# format 2; bench/results/catalogue-speed.md). A file of the wrong size or CRC (a torn write, a crash before the
# data reached the disk, a damaged disk) is not used: the features are extracted again and the file rewritten —
# which is why a cache file needs no fsync.
FORMAT_MAGIC = b"RLF2"
_HEADER = np.dtype([("magic", "S4"), ("n", "<u4"), ("w", "<i8"), ("h", "<i8")])


def local_options(settings) -> dict:
    """How an index's local features are extracted: the :class:`Verifier` keywords ``max_side`` and ``n_features``
    from its recorded ``local`` settings ({"side", "budget"}: retrieval/presets.py), else this module's defaults
    (640 px, 2000 keypoints: what every index recorded before it had the setting). Its indexer, its searches and
    its word index extract with these, so that a photo's features -- and their cache entry -- are the same on every
    surface."""
    local = getattr(settings, "local", None) or {}
    return {"max_side": int(local.get("side", MAX_SIDE)), "n_features": int(local.get("budget", N_FEATURES))}


def decode_side(settings) -> int:
    """The size photos are decoded at to embed them for an index (JPEGs are decoded at reduced size when large): the
    network's input side, or the local features' when the index's searches verify (this module), so
    that both come from one decode. The indexer, every search, ``retrieve explain --index`` and the web app embed a
    photo decoded this way, so a photo's embedding -- and its score -- is the same on every surface."""
    size = int(settings.preprocess.get("size") or 224)
    return max(size, local_options(settings)["max_side"]) if (settings.search or {}).get("verify") else size


def _encode(feats: "LocalFeatures") -> bytes:
    n = len(feats.points)
    head = np.array([(FORMAT_MAGIC, n, feats.size[0], feats.size[1])], _HEADER).tobytes()
    body = head + np.ascontiguousarray(feats.points, "<f4").tobytes() + np.ascontiguousarray(feats.descriptors, np.uint8).tobytes()
    return body + np.uint32(zlib.crc32(body)).astype("<u4").tobytes()


def _decode(data: bytes) -> "LocalFeatures":
    """The features in a format-2 file's bytes; ValueError when they are not a whole, undamaged file."""
    if len(data) < _HEADER.itemsize + 4 or data[:4] != FORMAT_MAGIC:
        raise ValueError("not a local-features file (format 2)")
    head = np.frombuffer(data, _HEADER, 1)[0]
    n = int(head["n"])
    end = _HEADER.itemsize + n * (8 + 128)
    if len(data) != end + 4 or zlib.crc32(memoryview(data)[:end]) != int(np.frombuffer(data, "<u4", 1, end)[0]):
        raise ValueError("local-features file truncated or damaged")
    pts = np.frombuffer(data, "<f4", 2 * n, _HEADER.itemsize).reshape(n, 2)
    desc = np.frombuffer(data, np.uint8, 128 * n, _HEADER.itemsize + 8 * n).reshape(n, 128)
    return LocalFeatures(pts, desc, (int(head["w"]), int(head["h"])))


def _read_npz(path: Path) -> "LocalFeatures":
    with _NPZ_LOCK, np.load(path) as z:
        return LocalFeatures(z["points"], z["descriptors"], tuple(int(v) for v in z["size"]))


@dataclass
class LocalFeatures:
    points: np.ndarray  # N×2 float32, (x, y) in the photo's own pixels
    descriptors: np.ndarray  # N×128 uint8 (SIFT)
    size: tuple[int, int]  # the photo's own (width, height)
    # matching matrices (RootSIFT, projected) by projection key: computed once per content and projection
    prepared: dict = field(default_factory=dict, repr=False, compare=False)


@dataclass
class Verification:
    inliers: int  # distinct points (2-px grid at the matching scale) in agreement, the smaller side's count
    query_points: np.ndarray = field(default_factory=lambda: np.zeros((0, 2), np.float32))  # inlier pairs,
    result_points: np.ndarray = field(default_factory=lambda: np.zeros((0, 2), np.float32))  # own pixels
    query_rows: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))  # the inlier pairs' keypoint rows
    result_rows: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    evidence: float | None = None  # the inliers weighed for burstiness (:func:`weigh`); None: not weighed

    @property
    def confirmed(self) -> bool:
        return self.inliers >= MIN_INLIERS


def _cv2():
    try:
        import cv2
    except ImportError as e:  # pragma: no cover - a dependency; only a broken install gets here
        raise RetrieveError(f"geometric verification needs OpenCV (pip install opencv-python-headless): {e}") from None
    return cv2


class Verifier:
    """SIFT at ``max_side`` px, ``n_features`` keypoints, ratio test ``ratio``, RANSAC homography.

    Defaults by measurement on the instance set (re-photographed objects: blur, low contrast): 2000
    keypoints with a contrast threshold of 0.02 (OpenCV's default 0.04) confirm 81 % of true pairs at
    10 inliers against 70 % for 1000 keypoints at 0.04, for about twice the matching cost; matching
    in RootSIFT space raises it to 84 %. Matches are kept when they pass the ratio test at 0.85 *and* are
    mutual nearest neighbours, and RANSAC is PROSAC on the matches sorted by their ratio (the most distinctive
    first): on 100 phone photos × 223 candidates each (bench/results/quality.md, "Photo → catalogue") the own
    catalogue image is confirmed for 94 % of the photos (93 % with ratio 0.8 alone and uniform sampling), the
    other photos of the object for 88 % (84 %), unrelated pairs for 0.03 % (0.04 %). A looser ratio alone
    (0.9) lets in so many clutter matches that RANSAC finds fewer true homographies (86 %), not more."""

    def __init__(self, max_side: int = MAX_SIDE, n_features: int = N_FEATURES, contrast: float = 0.02, ratio: float = 0.85,
                 reproj_px: float = 8.0, cache: bool = True, mutual: bool = True, prosac: bool = True,
                 projection: np.ndarray | None = None, pool: bool = True):
        self.max_side = max_side
        self.decode_side = max_side  # a JPEG is decoded at reduced size down to this short side (for_index: the
                                     # index's decode_side, which the indexer extracts from)
        self.pool = pool  # match candidates in parallel threads (see verify_many)
        self.n_features = n_features
        self.ratio = ratio
        self.mutual = mutual  # keep a match only when each point is the other's nearest (see _match)
        self.prosac = prosac  # RANSAC samples the best matches first (else uniformly: USAC_DEFAULT)
        self.reproj_px = reproj_px  # RANSAC threshold, in pixels of the max_side-scaled image
        self.cache = cache_dir() / "local" / f"sift-{max_side}-{n_features}-{contrast:g}" if cache else None
        # 128 × d: RootSIFT is matched in this d-dimensional subspace (renormalised), learned with the index's
        # vocabulary (retrieval/match/words.py); None: in all 128 dimensions
        self.projection = projection  # (a property: its key names the matrices it made)
        self._memo: OrderedDict[str, LocalFeatures] = OrderedDict()  # sha256 → features (FEATURE_MEMO)
        self._memo_lock = threading.Lock()
        cv2 = _cv2()
        self._sift = cv2.SIFT_create(nfeatures=n_features, contrastThreshold=contrast)

    @classmethod
    def for_index(cls, settings, **kw) -> "Verifier":
        """The verifier of an index with ``settings``: its recorded side and keypoint budget (:func:`local_options`)."""
        v = cls(**local_options(settings), **kw)
        v.decode_side = decode_side(settings)  # a photo decoded as its indexer decodes it: the same features
        return v

    @property
    def projection(self) -> np.ndarray | None:
        return self._projection

    @projection.setter
    def projection(self, p: np.ndarray | None) -> None:
        self._projection = None if p is None else np.ascontiguousarray(p, np.float32)
        self._pkey = None if p is None else hashlib.sha1(self._projection.tobytes()).hexdigest()

    # -- features -------------------------------------------------------------------------------
    def extract(self, img) -> LocalFeatures:
        """Keypoints and descriptors of a PIL image (decoded with ``load_image``)."""
        cv2 = _cv2()
        own = img.info.get("original_size", img.size)
        g = img.convert("L")
        scale = min(1.0, self.max_side / max(g.size))
        if scale < 1.0:
            g = g.resize((max(1, round(g.width * scale)), max(1, round(g.height * scale))), 1)  # bilinear
        kps, desc = self._sift.detectAndCompute(np.asarray(g), None)
        if desc is None or not kps:
            return LocalFeatures(np.zeros((0, 2), np.float32), np.zeros((0, 128), np.uint8), tuple(own))
        pts = np.float32([k.pt for k in kps]) * np.float32([own[0] / g.width, own[1] / g.height])
        return LocalFeatures(pts, np.clip(np.rint(desc), 0, 255).astype(np.uint8), tuple(own))

    def features(self, path: str | os.PathLike, sha256: str | None = None) -> LocalFeatures:
        """Features of the file at ``path``, from the cache when its content was seen before.

        ``sha256``: the content hash the caller knows (an index row's); features cached for it are used. Features
        extracted now are cached under the hash of the very bytes they come from, never under ``sha256``: a photo
        edited in place since it was indexed gets its own entry, and the old content's entry stays that content's
        (the cache is shared by every index)."""
        if self.cache is None:
            return self.extract(load_image(path, min_side=self.decode_side))
        feats = self._known(sha256) if sha256 is not None else None
        if feats is not None:
            return feats
        data = read_image_bytes(path)
        actual = hashlib.sha256(data).hexdigest()
        feats = self._known(actual) if actual != sha256 else None
        if feats is None:
            feats = self.extract(decode_image(data, path, min_side=self.decode_side))
            self.save(actual, feats)
            self._remember(actual, feats)
        return feats

    def _known(self, sha256: str) -> LocalFeatures | None:
        """The features of the content ``sha256`` from memory or the disk cache, or None."""
        with self._memo_lock:
            feats = self._memo.get(sha256)
            if feats is not None:
                self._memo.move_to_end(sha256)
                return feats
        feats = self._read(sha256)
        if feats is not None:
            self._remember(sha256, feats)
        return feats

    def _remember(self, sha256: str, feats: LocalFeatures) -> None:
        with self._memo_lock:
            self._memo[sha256] = feats
            while len(self._memo) > FEATURE_MEMO:
                self._memo.popitem(last=False)

    def cached(self, data: bytes) -> LocalFeatures | None:
        """The cached features of the file content ``data``, or None (not seen before, or no cache)."""
        if self.cache is None:
            return None
        return self._read(hashlib.sha256(data).hexdigest())

    def cache_file(self, sha256: str) -> Path:
        """Where the features of the content ``sha256`` are cached (format 2; see FORMAT_MAGIC)."""
        return self.cache / sha256[:2] / f"{sha256}.lf2"

    def _read(self, sha256: str) -> LocalFeatures | None:
        """The cached features of the content ``sha256``: the format-2 file, else a format-1 npz (then written
        again in format 2); None when neither is there whole (the caller extracts them again)."""
        f = self.cache_file(sha256)
        try:
            return _decode(f.read_bytes())
        except (OSError, ValueError):
            pass
        try:
            feats = _read_npz(f.with_suffix(".npz"))
        except Exception:  # noqa: BLE001 - missing, truncated, damaged (BadZipFile, CRC, zlib, KeyError…)
            return None
        self.save(sha256, feats)
        return feats

    def save(self, sha256: str, feats: LocalFeatures) -> None:
        """Cache ``feats`` for the content ``sha256`` (the indexer extracts while it decodes): written to a
        temporary file and renamed over the old one, so a reader sees the old file or the new, whole."""
        if self.cache is None:
            return
        f = self.cache_file(sha256)
        tmp = f.with_name(f".{f.name}.{os.getpid()}-{threading.get_ident()}.tmp")
        try:
            f.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_bytes(_encode(feats))
            os.replace(tmp, f)
        except OSError:
            tmp.unlink(missing_ok=True)  # a read-only cache only costs time

    # -- matching -------------------------------------------------------------------------------
    def verify(self, q: LocalFeatures, r: LocalFeatures) -> Verification:
        """Ratio-test matches of ``q`` and ``r``, then the inliers of a RANSAC homography."""
        return self.verify_many(q, [r])[0]

    def verify_many(self, q: LocalFeatures, rs: Sequence[LocalFeatures]) -> list[Verification]:
        """:meth:`verify` for many candidates. ``pool`` (default): one candidate at a time per thread,
        each matrix product on one BLAS thread, as many threads as BLAS has (RANSAC runs in parallel too);
        else one candidate after another, each product on all BLAS threads. Both give the same matches
        (tests/test_instance.py)."""
        out = [Verification(0) for _ in rs]
        keep = [i for i, r in enumerate(rs) if len(r.points) >= 4]
        if len(q.points) < 4 or not keep:
            return out
        a = self.matrix(q)
        threads = blas_threads() if self.pool else 1
        if self.pool and threads > 1 and len(keep) > 1:
            from concurrent.futures import ThreadPoolExecutor

            def one(i: int) -> Verification:  # projected in the thread too (one product's rows up to float32
                # rounding; verdicts and the quality table unchanged: bench/results/catalogue-speed.md)
                qi, ri = self._pair(a, self.matrix(rs[i]))
                return self._ransac(q, rs[i], qi, ri)

            with one_blas_thread(), ThreadPoolExecutor(min(threads, len(keep))) as pool:
                for i, v in zip(keep, pool.map(one, keep)):
                    out[i] = v
            return out
        bs = self.matrices([rs[i] for i in keep])  # projected in one product
        for i, b in zip(keep, bs):
            qi, ri = self._pair(a, b)
            out[i] = self._ransac(q, rs[i], qi, ri)
        return out

    def matches(self, q: LocalFeatures, rs: Sequence[LocalFeatures]) -> list[tuple[np.ndarray, np.ndarray]]:
        """The matches :meth:`verify_many` hands to RANSAC: for each of ``rs``, (query rows, candidate rows),
        best first (ratio test, mutual nearest neighbours, in the verifier's projection)."""
        a = self.matrix(q)
        return [self._pair(a, b) for b in self.matrices(rs)]

    def _pair(self, a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The matches of query rows ``a`` and candidate rows ``b`` (unit length: squared distance = 2 − 2·similarity),
        best first; the similarities are computed ``MATCH_ROWS`` query rows at a time."""
        n, m = len(a), len(b)
        if m < 2:
            return np.zeros(0, np.int64), np.zeros(0, np.int64)
        first = np.empty(n, np.int64)
        s1 = np.empty(n, np.float32)
        s2 = np.empty(n, np.float32)
        # each candidate point's highest similarity among the query points whose own nearest is another candidate
        # point (their nearest similarities are set to -inf before the column maxima are taken)
        colmax = np.full(m, -np.inf, np.float32)
        bt = b.T
        for at in range(0, n, MATCH_ROWS):
            seg = a[at:at + MATCH_ROWS] @ bt
            rows = np.arange(len(seg))
            f = seg.argmax(1)
            first[at:at + len(seg)] = f
            s1[at:at + len(seg)] = seg[rows, f]
            seg[rows, f] = -np.inf
            s2[at:at + len(seg)] = seg.max(1)
            if self.mutual:
                np.maximum(colmax, seg.max(0), out=colmax)
        dist1, dist2 = np.sqrt(np.maximum(2 - 2 * s1, 0)), np.sqrt(np.maximum(2 - 2 * s2, 0))
        good = np.nonzero(dist1 < self.ratio * dist2)[0]
        if self.mutual and len(good):  # mutual: no other query point is nearer to the match's candidate point —
            # among the query points whose own nearest is another candidate point. Several query points sharing one
            # nearest candidate point all keep it: measured, making them compete costs faces (att_faces, instance
            # preset, K 60: mAP@10 0.719 → 0.717; no head: 0.831 → 0.821)
            good = good[colmax[first[good]] < s1[good]]
        good = good[np.argsort(dist1[good] / np.maximum(dist2[good], 1e-12), kind="stable")]  # best first
        return good, first[good]

    def matrix(self, f: LocalFeatures) -> np.ndarray:
        """The rows ``f`` is matched with: RootSIFT, projected and renormalised when the verifier has a
        projection; computed once per features object and projection (kept in ``f.prepared``)."""
        return self.matrices([f])[0]

    def matrices(self, fs: Sequence[LocalFeatures]) -> list[np.ndarray]:
        """:meth:`matrix` of each of ``fs``; those not prepared yet are projected in one product."""
        key = self._pkey
        todo = [f for f in fs if key not in f.prepared]
        if todo:  # (threads may prepare one features object at once: both compute the same rows, one is kept)
            m = matching_rows(np.concatenate([f.descriptors for f in todo]), self._projection)
            at = 0
            with _PREPARED_LOCK:
                for f in todo:
                    if key not in f.prepared:
                        f.prepared.clear()  # one projection at a time: a features object is not kept for several
                        f.prepared[key] = m[at:at + len(f.descriptors)]
                    at += len(f.descriptors)
        with _PREPARED_LOCK:
            return [f.prepared[key] for f in fs]

    def _ransac(self, q: LocalFeatures, r: LocalFeatures, qi: np.ndarray, ri: np.ndarray) -> Verification:
        cv2 = _cv2()
        if len(qi) < 4:
            return Verification(0)
        # RANSAC in the coordinates the features were found in, so the threshold means the same for any photo
        sq = self.max_side / max(max(q.size), self.max_side)
        sr = self.max_side / max(max(r.size), self.max_side)
        a, b = q.points[qi], r.points[ri]
        # OpenCV's USAC (its modern RANSAC) is ~100x faster than cv2.RANSAC on hopeless pairs; PROSAC draws
        # its samples from the best-ranked matches first (``qi`` comes sorted by the ratio test's ratio)
        method = getattr(cv2, "USAC_DEFAULT", cv2.RANSAC)
        if self.prosac:
            method = getattr(cv2, "USAC_PROSAC", method)
        h, mask = cv2.findHomography(a * sq, b * sr, method, self.reproj_px, maxIters=RANSAC_ITERS, confidence=0.995)
        if h is None or mask is None:
            return Verification(0)
        keep = mask.ravel().astype(bool)
        # Count distinct points on both sides: SIFT puts several keypoints at one spot (one per orientation)
        # and a degenerate homography can map many query points onto a few result points; without this a
        # look-alike texture reaches 25 "inliers" where only 6 distinct result points agree.
        distinct = min(_distinct(a[keep] * sq), _distinct(b[keep] * sr))
        return Verification(int(distinct), a[keep], b[keep], qi[keep], ri[keep])


def _distinct(pts: np.ndarray) -> int:
    """How many distinct cells of a 2-px grid the points (matching-scale pixels) fall in: the rows of
    np.unique(np.rint(pts / 2), axis=0), counted through one integer key per point (np.unique with an axis
    views each row as a structured item: ~4x slower, a tenth of a pair's verification)."""
    cell = np.rint(pts / 2).astype(np.int64)
    return len(np.unique(cell[:, 0] * (1 << 32) + cell[:, 1]))


def _root(desc: np.ndarray) -> np.ndarray:
    """RootSIFT (Arandjelović & Zisserman, CVPR 2012): L1-normalise, square-root; Euclidean distance
    between the results is the Hellinger distance between the SIFT histograms. Measured on the instance
    set: 84 % of true pairs confirmed against 81 % with plain SIFT, same false rate, same cost."""
    d = desc.astype(np.float32)
    return np.sqrt(d / np.maximum(d.sum(1, keepdims=True), 1e-6))


_CONTROLLER = None


def _controller():
    """threadpoolctl's controller of the loaded thread pools, made once (it inspects every loaded library)."""
    global _CONTROLLER
    if _CONTROLLER is None:
        from threadpoolctl import ThreadpoolController

        _CONTROLLER = ThreadpoolController()
    return _CONTROLLER


def one_blas_thread():
    """A context in which NumPy's BLAS runs on one thread. Small products (projecting a few thousand
    descriptors, quantising them in the vocabulary tree's clusters) lose more to waking and joining BLAS
    threads than they gain; on a loaded machine, 4-6x more (bench/results/catalogue-speed.md). The large
    matching product keeps every thread. Without threadpoolctl: a no-op."""
    try:
        return _controller().limit(limits=1, user_api="blas")
    except Exception:  # noqa: BLE001 - not installed, or an unknown BLAS: the default threads
        import contextlib

        return contextlib.nullcontext()


def blas_threads() -> int:
    """The threads NumPy's BLAS runs on now (1 without threadpoolctl)."""
    try:
        return max([int(i.get("num_threads", 1)) for i in _controller().info() if i.get("user_api") == "blas"] or [1])
    except Exception:  # noqa: BLE001 - not installed: no pool
        return 1


_SQRT8 = np.sqrt(np.arange(256, dtype=np.float32))  # √ of every uint8 value: RootSIFT's square root by lookup


def matching_rows(desc: np.ndarray, projection: np.ndarray | None) -> np.ndarray:
    """The rows SIFT descriptors ``desc`` (uint8) are matched with: ``project(_root(desc), projection)``. With a
    projection, computed as √desc (a table lookup) projected and renormalised: RootSIFT's L1 normalisation only
    scales a row, which the renormalisation undoes (the same rows up to float32 rounding, 3.5× faster:
    1.7 → 0.5 ms for a candidate's ~1300 descriptors)."""
    if projection is None:
        return project(_root(desc), None)
    with one_blas_thread():
        y = np.take(_SQRT8, desc) @ projection
    y *= (1 / np.maximum(np.sqrt(np.einsum("ij,ij->i", y, y)), 1e-12))[:, None]
    return np.ascontiguousarray(y, np.float32)


def project(root: np.ndarray, projection: np.ndarray | None) -> np.ndarray:
    """RootSIFT rows in the subspace of ``projection`` (128 × d), back to unit length (float32, contiguous);
    the rows themselves when None. Matching compares cosines, so the subspace keeps the rows' directions:
    retrieval.match.words.fit_projection takes it from the uncentred second moments."""
    if projection is None:
        return np.ascontiguousarray(root, np.float32)
    with one_blas_thread():  # (measured: no faster on two BLAS threads, even for 130 candidates at once)
        y = root @ projection
    y /= np.maximum(np.linalg.norm(y, axis=1, keepdims=True), 1e-12)
    return np.ascontiguousarray(y, np.float32)


def indexed_hash(row) -> str | None:
    """An index row's content hash while its file is as it was indexed (the same size and mtime), for
    :meth:`Verifier.features`; None when the file changed since (its bytes are then hashed: the features of the
    photo as it is now, cached under their own hash). A file out of reach keeps the row's hash: its cached
    features still serve."""
    if row is None:
        return None
    try:
        st = os.stat(row.path)
    except OSError:
        return row.sha256
    return row.sha256 if (st.st_size, st.st_mtime_ns) == (row.size, row.mtime_ns) else None


def weigh(verifications: Sequence[Verification], catalogue: Sequence[bool] | None = None) -> None:
    """Set each confirmed verification's ``evidence``: its inliers, less those a background explains.

    ``catalogue``: one flag per verification, whether it is a catalogue image (retrieval/index/catalogue.py). When a
    catalogue image is confirmed, the query's product is what it shows: another candidate keeps only its inliers on
    query keypoints that a confirmed catalogue image is matched on too (evidence = inliers × that share). A phone
    photo of another product that shares only the background (a book, a table behind several products) keeps
    none; the product's own photos keep theirs; catalogue images keep all their inliers. Otherwise (no catalogue, or
    none confirmed) evidence = inliers. Not kept: each query keypoint as one vote shared among the candidates it is
    an inlier of (Jégou, Douze & Schmid, "On the burstiness of visual elements", CVPR 2009, inter-image) also
    divides the votes of an object seen in many photos: ORL faces mAP@10 0.800 → 0.789 (bench/results/burstiness.md).
    Unconfirmed verifications keep ``evidence`` None (they are ranked by the global order)."""
    conf = [i for i, v in enumerate(verifications) if v.confirmed]
    for v in verifications:
        v.evidence = None
    grounded = None
    if catalogue is not None and any(catalogue[i] for i in conf):
        size = 1 + max((int(verifications[i].query_rows.max()) for i in conf if len(verifications[i].query_rows)),
                       default=0)
        grounded = np.zeros(size, bool)
        for i in conf:
            if catalogue[i]:
                grounded[verifications[i].query_rows] = True
    for i in conf:
        v = verifications[i]
        share = 1.0
        if grounded is not None and not catalogue[i] and len(v.query_rows):
            share = float(grounded[v.query_rows].mean())
        v.evidence = v.inliers * share


def rerank(candidates: Sequence, verifications: Sequence[Verification], k: int) -> list:
    """The top ``k`` after verification: confirmed first (the most evidence first: :func:`weigh`, else the most
    inliers; ties in global order), then the unconfirmed in their global order. Candidates are in global order;
    a confirmed one is never left out while an unconfirmed one is kept."""
    def key(i: int):
        v = verifications[i]
        if not v.confirmed:
            return (True, 0.0, i)
        return (False, -(v.evidence if v.evidence is not None else float(v.inliers)), i)

    return [candidates[i] for i in sorted(range(len(candidates)), key=key)[:k]]


def verify_hits(verifier: Verifier, query_path: str, hits: Sequence, k: int,
                sha_of: Callable[[int], str | None] = lambda i: None,
                on_error: Callable[[str, str], None] | None = None,
                query_features: LocalFeatures | None = None,
                is_catalogue: Callable[[int], bool] | None = None) -> list:
    """Verify ``hits`` (global order) against the query file; the re-ranked top ``k`` (by evidence, :func:`weigh`,
    over these hits), each hit carrying ``inliers`` and its ``verification`` (inlier point pairs, for the
    explanation report). ``query_features``: the query's, when the caller has them already (decoded once).
    ``is_catalogue``: whether a hit's id is a catalogue image (an index with a catalogue; None: none)."""
    try:
        qf = query_features if query_features is not None else verifier.features(query_path)
    except (ImageError, OSError) as e:
        if on_error:
            on_error(str(query_path), getattr(e, "reason", None) or str(e))
        return list(hits[:k])
    def load(h):
        try:
            return verifier.features(h.path, sha_of(h.id)), None
        except (ImageError, OSError) as e:  # the result's file went away: keep it, unverified
            return LocalFeatures(np.zeros((0, 2), np.float32), np.zeros((0, 128), np.uint8), (1, 1)), e

    # in threads when verification runs in them: the cache's format-2 files are read without a lock (format-1 npz
    # files still take _NPZ_LOCK: np.load's header parsing is not thread-safe in CPython 3.11)
    threads = blas_threads() if verifier.pool else 1
    if threads > 1 and len(hits) > 1:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(min(threads, len(hits))) as pool:
            loaded = list(pool.map(load, hits))
    else:
        loaded = [load(h) for h in hits]
    feats = []
    for h, (f, e) in zip(hits, loaded):  # errors reported in the hits' order
        if e is not None and on_error:
            on_error(h.path, getattr(e, "reason", None) or str(e))
        feats.append(f)
    vs = verifier.verify_many(qf, feats)
    for h, v in zip(hits, vs):
        h.inliers = v.inliers
        h.verification = v
    weigh(vs, None if is_catalogue is None else [is_catalogue(h.id) for h in hits])
    out = rerank(list(hits), vs, k)
    for i, h in enumerate(out):
        h.rank = i + 1
    return out
