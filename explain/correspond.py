"""Which region of A matches which region of B: an exact split of the explained similarity into location pairs.

Every similarity retrieve explains is bilinear in the two (centred) pooled embeddings, and each pooled
embedding is the spatial mean of per-location contributions (``Pooling.contributions``: the feature map
itself for average pooling, each location's share for GeM and R-MAC). So, with ``u_i`` the contribution
of query location ``i`` minus the centre ``m`` and ``v_j`` the same for result location ``j``::

    similarity = Σ_i Σ_j S[i, j],    S[i, j] = u_iᵀ W v_j / (n_q n_r N)

where ``W`` is the identity (cosine, l2) or the head's ``G = PᵀP``, and ``N`` the cosine's norm product
(1 for l2). Summing ``S`` over ``j`` gives each query location's share of the score, over all of it the
score itself (tested to 1e-9). A *region pair* sums ``S`` over a window of cells in A (about a quarter of
each side of the feature map) and a window in B; the strongest pairs whose windows do not overlap those
already chosen, on either side, are "this region of A matches that region of B", each with its share of
the positive part of ``S`` (the evidence for the match; a window pair's sum is at most its positive terms,
so shares lie in [0, 1]). Cells map linearly onto each photo's own pixels (the preprocessing maps the
whole photo onto the network input).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

WINDOW_FRACTION = 0.25  # a region is a window of about a quarter of each side of the feature map


@dataclass
class Correspondence:
    rank: int
    query_box: tuple[int, int, int, int]  # x0, y0, x1, y1 in the query photo's own pixels
    result_box: tuple[int, int, int, int]
    term: float  # S[i, j], this pair's term of the explained similarity
    share: float  # term / the sum of all positive terms, in [0, 1]

    def to_dict(self) -> dict:
        return {"rank": self.rank, "query_box": list(self.query_box), "result_box": list(self.result_box),
                "term": self.term, "share": self.share}


def pair_terms(explainer, aq: torch.Tensor, ar: torch.Tensor, pair=None) -> np.ndarray:
    """``S`` (n_q × n_r, row-major locations of each feature map) for feature maps ``aq``, ``ar`` (1×C×h×w): the
    bilinear form of the pair's score (explain/cis.py: ``G`` and the normaliser of its space) between the two maps'
    per-location contributions, centred on the point the maps are centred on. ``pair``: the index's decomposition
    (None: the explainer's own similarity at its resolution, whose terms add up to it exactly)."""
    pooling = explainer.backbone.pooling
    cq = pooling.contributions(aq.double())[0].reshape(aq.shape[1], -1).numpy()  # C × n_q
    cr = pooling.contributions(ar.double())[0].reshape(ar.shape[1], -1).numpy()
    if pair is None:
        pair = explainer.decompose(cq.mean(1), cr.mean(1)[None])[0]
        m = np.asarray(pair.centre, np.float64)
    else:
        m = explainer._ref(cq.shape[0], [pair]) if hasattr(explainer, "_ref") else np.asarray(pair.centre)
    u, v = cq - m[:, None], cr - m[:, None]
    if pair.head is not None:
        v = pair.head.gram_apply(v.T).T
    return (u.T @ v) / (cq.shape[1] * cr.shape[1] * max(pair.z, 1e-12))


def window(grid: tuple[int, int], fraction: float = WINDOW_FRACTION) -> tuple[int, int]:
    """The region size in cells: about ``fraction`` of each side of the feature map (at least one cell)."""
    return max(1, round(grid[0] * fraction)), max(1, round(grid[1] * fraction))


def _box_sums(x: np.ndarray, axis: int, k: int) -> np.ndarray:
    """Sums of ``k`` consecutive entries along ``axis`` (length n → n − k + 1)."""
    c = np.cumsum(x, axis=axis)
    c = np.concatenate([np.zeros_like(np.take(c, [0], axis=axis)), c], axis=axis)
    n = x.shape[axis]
    return np.take(c, range(k, n + 1), axis=axis) - np.take(c, range(0, n - k + 1), axis=axis)


def region_terms(s: np.ndarray, grid_q: tuple[int, int], grid_r: tuple[int, int], win_q: tuple[int, int],
                 win_r: tuple[int, int]) -> np.ndarray:
    """``R[yq, xq, yr, xr]``: the sum of ``S`` over a ``win_q`` window of query cells at (yq, xq) and a ``win_r``
    window of result cells at (yr, xr) — every window position on both sides."""
    r = np.asarray(s, np.float64).reshape(*grid_q, *grid_r)
    for axis, k in enumerate((*win_q, *win_r)):
        r = _box_sums(r, axis, k)
    return r


def cell_box(y: int, x: int, win: tuple[int, int], grid: tuple[int, int], size: tuple[int, int]) -> tuple[int, int, int, int]:
    """The window of ``win`` cells at cell (y, x) of an h×w ``grid`` as a box in a photo of (H, W) = ``size``."""
    h, w = grid
    hh, ww = size
    return (int(np.floor(x * ww / w)), int(np.floor(y * hh / h)),
            int(min(ww, np.ceil((x + win[1]) * ww / w))), int(min(hh, np.ceil((y + win[0]) * hh / h))))


def _overlaps(a: tuple[int, int], b: tuple[int, int], win: tuple[int, int]) -> bool:
    return abs(a[0] - b[0]) < win[0] and abs(a[1] - b[1]) < win[1]


def correspondences(s: np.ndarray, grid_q: tuple[int, int], grid_r: tuple[int, int], size_q: tuple[int, int],
                    size_r: tuple[int, int], top: int = 5, fraction: float = WINDOW_FRACTION) -> list[Correspondence]:
    """The ``top`` region pairs that carry the most of the explained similarity (see the module doc).

    Regions are windows of about ``fraction`` of each feature-map side; the strongest pair of windows is taken
    first, then the strongest whose windows overlap none already taken on either side, and so on, as long as
    the pair's sum is positive."""
    s = np.asarray(s, np.float64)
    positive = float(s[s > 0].sum())
    if positive <= 0:
        return []
    wq, wr = window(grid_q, fraction), window(grid_r, fraction)
    r = region_terms(s, grid_q, grid_r, wq, wr)
    order = np.argsort(-r, axis=None)
    taken_q: list[tuple[int, int]] = []
    taken_r: list[tuple[int, int]] = []
    out: list[Correspondence] = []
    for flat in order:
        v = float(r.flat[flat])
        if v <= 0 or len(out) >= top:
            break
        yq, xq, yr, xr = np.unravel_index(int(flat), r.shape)
        if any(_overlaps((yq, xq), t, wq) for t in taken_q) or any(_overlaps((yr, xr), t, wr) for t in taken_r):
            continue
        taken_q.append((yq, xq))
        taken_r.append((yr, xr))
        out.append(Correspondence(len(out) + 1, cell_box(yq, xq, wq, grid_q, size_q), cell_box(yr, xr, wr, grid_r, size_r),
                                  v, v / positive))
    return out
