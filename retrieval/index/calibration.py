"""Where a score stands in one collection: the scores of random pairs and of nearest-neighbour pairs.

A cosine of 0.80 means little by itself: in a collection of faces almost every pair scores that high,
in a product catalogue only near-duplicates do. So when an index is built or updated, retrieve samples

- **random pairs**: two different images drawn at random (up to ``RANDOM_PAIRS`` pairs), and
- **nearest-neighbour pairs**: up to ``NN_QUERIES`` images, each with its nearest *other* image,

scores them exactly as a search does (the index's vector space: head, normalisation, metric), and stores
the quantiles of both with the index. :func:`percentile` then says what share of each distribution a
score is above ("closer than 99.2 % of random pairs here").
"""
from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np

RANDOM_PAIRS = 20_000
NN_QUERIES = 500
QUANTILES = 1001  # stored per distribution: 0.1 % resolution
MIN_IMAGES = 3  # fewer than this: nothing to compare with
KEY = "calibration"


@dataclass
class Calibration:
    """Quantiles (ascending) of the scores of random pairs and nearest-neighbour pairs of one collection."""

    random: np.ndarray  # QUANTILES values, ascending
    nearest: np.ndarray
    images: int  # collection size when sampled
    random_pairs: int  # how many pairs the quantiles summarise
    nn_pairs: int
    space: str = ""  # the vector space sampled (see :func:`space`); another one makes it stale

    def to_dict(self) -> dict:
        return {"random": [float(x) for x in self.random], "nearest": [float(x) for x in self.nearest],
                "images": self.images, "random_pairs": self.random_pairs, "nn_pairs": self.nn_pairs, "space": self.space}

    @classmethod
    def from_dict(cls, d: dict) -> "Calibration":
        return cls(np.asarray(d["random"], np.float64), np.asarray(d["nearest"], np.float64), int(d["images"]),
                   int(d["random_pairs"]), int(d["nn_pairs"]), str(d.get("space", "")))

    def where(self, score: float) -> dict:
        """``{"random_percentile": …, "nn_percentile": …}``: the share (in %) of each distribution below ``score``."""
        return {"random_percentile": float(percentile(self.random, score)),
                "nn_percentile": float(percentile(self.nearest, score)),
                "images": self.images, "random_pairs": self.random_pairs, "nn_pairs": self.nn_pairs}


def quantiles(scores: np.ndarray, n: int = QUANTILES) -> np.ndarray:
    """``n`` evenly spaced quantiles (0 % … 100 %) of ``scores``, ascending."""
    return np.quantile(np.asarray(scores, np.float64), np.linspace(0.0, 1.0, n))


TIE = 1e-5  # relative: scores closer than this are one score (see percentile)


def percentile(q: np.ndarray, score: float) -> float:
    """The share (0–100) of a distribution, given by its evenly spaced quantiles ``q``, that lies below ``score``.

    Piecewise linear between quantiles (the inverse of ``np.quantile``'s interpolation); ties count half;
    0 below the minimum, 100 above the maximum. A tie is a difference under ``TIE`` (relative): the search
    scores a pair in float32 (FAISS) and the sample scored the same pair in float64, so the two differ in
    the 7th digit, and without the tolerance a pair that is one of the sampled ones fell just below its own
    flat stretch of quantiles (in a collection of 11 photos, the closest pair came out at 98.2 % instead of 99.1 %).
    """
    q = np.asarray(q, np.float64)
    n = len(q)
    if n < 2:
        return 50.0
    s = float(score)
    tol = TIE * max(1.0, abs(s))
    if s < q[0] - tol:
        return 0.0
    if s > q[-1] + tol:
        return 100.0
    lo = int(np.searchsorted(q, s - tol, side="left"))
    hi = int(np.searchsorted(q, s + tol, side="right"))
    if hi > lo:  # s equals one or more quantiles: the middle of that flat stretch
        return 100.0 * (lo + hi - 1) / 2 / (n - 1)
    a, b = q[lo - 1], q[lo]
    frac = (s - a) / (b - a) if b > a else 0.5
    return 100.0 * (lo - 1 + frac) / (n - 1)


def pair_scores(a: np.ndarray, b: np.ndarray, metric) -> np.ndarray:
    """Row-wise scores (higher is better) of vectors already in the index's space (``metric``: a
    :class:`retrieval.metric.Metric`): the inner product, or minus the squared L2 distance."""
    if metric.similarity:
        return np.einsum("ij,ij->i", a, b, dtype=np.float64)
    return -((a.astype(np.float64) - b) ** 2).sum(1)


def compute(store, rng: np.random.Generator | None = None) -> Calibration | None:
    """Sample both distributions from an open index (None when it holds fewer than ``MIN_IMAGES`` images)."""
    rng = rng or np.random.default_rng(0)
    n = store.count()
    if n < MIN_IMAGES:
        return None
    metric = store.metric
    # A uniform sample of up to 4000 rows: only their embeddings are read.
    pick_ids = np.sort(rng.choice(store.row_ids(), min(n, 4000), replace=False))
    ids, vecs = zip(*store.vectors_of(pick_ids))
    ids, x = np.concatenate(ids), store.transform(np.concatenate(vecs))
    if len(ids) < 2:
        return None
    i = rng.integers(0, len(ids), RANDOM_PAIRS)
    j = rng.integers(0, len(ids) - 1, RANDOM_PAIRS)
    j = j + (j >= i)  # a different image
    rand = pair_scores(x[i], x[j], metric)
    # Nearest other image of a sample of images, from the index itself (exact for flat indexes).
    pick = rng.choice(len(ids), min(NN_QUERIES, len(ids)), replace=False)
    index = store.faiss_index()
    _, nb = index.search(np.ascontiguousarray(x[pick], np.float32), min(4, index.ntotal))
    # the nearest other image that is still a row (an HNSW graph keeps removed ids until it is compacted),
    # re-scored exactly from the stored embeddings (PQ distances are approximate)
    rows = store.rows_by_ids({int(k) for k in nb.ravel() if k >= 0})
    keep_rows, theirs = [], []
    for row, nbrs in enumerate(nb):
        own = int(ids[pick[row]])
        others = [int(k) for k in nbrs if k >= 0 and int(k) != own and int(k) in rows]
        if others:
            keep_rows.append(row)
            theirs.append(others[0])
    if not keep_rows:
        return None
    other = store.transform(np.stack([np.frombuffer(rows[t].vector, np.float32) for t in theirs]))
    near = pair_scores(x[pick[keep_rows]], other, metric)
    return Calibration(quantiles(rand), quantiles(near), n, len(rand), len(near), space(store))


def space(store) -> str:
    """The vector space scores live in (metric, head, dimension): another one makes a calibration stale."""
    return json.dumps(store.space(), sort_keys=True)


def load(store) -> Calibration | None:
    """The calibration stored with an index, or None."""
    d = store.get_value(KEY)
    try:
        return Calibration.from_dict(d) if d else None
    except (KeyError, TypeError, ValueError):
        return None


def refresh(store, force: bool = False) -> Calibration | None:
    """Re-sample and store when missing or when the collection has changed size by ≥ 10 % since (cheap otherwise)."""
    old = load(store)
    n = store.count()
    if (not force and old is not None and old.space == space(store)
            and abs(n - old.images) < 0.1 * max(old.images, 1)):
        return old
    cal = compute(store)
    store.set_value(KEY, cal.to_dict() if cal is not None else None)
    return cal


def for_search(store) -> Calibration | None:
    """The stored calibration; for an index built before calibrations existed, one sampled now (not stored)."""
    cal = load(store)
    if cal is not None and cal.space != space(store):
        cal = None
    if cal is None and store.count() >= MIN_IMAGES:
        cal = compute(store)
    return cal
