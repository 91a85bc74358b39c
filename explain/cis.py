"""Channel-wise contribution importance scores (CIS) — the heart of SFAM (arXiv:2506.01636).

For pooled embeddings ``q`` and ``r`` (global averages of the feature maps), a CIS vector splits the
pair's similarity into one term per channel, so that the terms add up to it exactly:

- cosine: ``CIS_k = q_k r_k / (‖q‖ ‖r‖)``, ``Σ_k CIS_k = cos(q, r)``; with a reference point μ
  (centred cosine) the same on ``q − μ`` and ``r − μ``.
- l2: ``CIS_k = (q_k − μ_k)(r_k − μ_k)``, ``Σ_k CIS_k = ½(‖q−μ‖² + ‖r−μ‖² − ‖q−r‖²)``: how much closer
  the two are to each other than to a typical image (μ = the collection mean; μ = 0 gives ``q·r``).
  The literal per-channel split of the distance, ``−(q_k − r_k)²``, is never positive and so gives
  empty maps; see the spec.
"""
from __future__ import annotations

import numpy as np


def _vec(x) -> np.ndarray:
    return np.asarray(x, dtype=np.float64).reshape(-1)


def cis_cosine(q, r, mu=None) -> np.ndarray:
    """Per-channel terms of the cosine similarity of ``q − μ`` and ``r − μ`` (μ = 0 when None)."""
    q, r = _vec(q), _vec(r)
    if mu is not None:
        m = _vec(mu)
        q, r = q - m, r - m
    denom = max(np.linalg.norm(q) * np.linalg.norm(r), 1e-12)
    return q * r / denom


def cis_l2(q, r, mu=None) -> np.ndarray:
    """Per-channel terms of the similarity that squared L2 implies relative to μ (see the module doc)."""
    q, r = _vec(q), _vec(r)
    m = _vec(mu) if mu is not None else np.zeros_like(q)
    return (q - m) * (r - m)


def cis_head(q, r, mean, proj, metric: str) -> dict:
    """CIS through a linear head ``e = P(a − m)``, in backbone-channel space (``G = PᵀP``).

    ``CIS_k = (q − m)_k (G (r − m))_k``, divided by ``‖e_q‖‖e_r‖`` for cosine; it sums to ``cos(e_q, e_r)``
    (cosine) or to ``e_q·e_r = ½(‖e_q‖² + ‖e_r‖² − ‖e_q − e_r‖²)`` (l2). Returns the score fields.
    """
    q, r, m, p = _vec(q), _vec(r), _vec(mean), np.asarray(proj, np.float64)
    qc, rc = q - m, r - m
    eq, er = p @ qc, p @ rc
    cis = qc * (p.T @ er)
    if metric == "cosine":
        cis = cis / max(np.linalg.norm(eq) * np.linalg.norm(er), 1e-12)
        return {"score": float(cis.sum()), "cis": cis, "cis_target": float(eq @ er / max(np.linalg.norm(eq) * np.linalg.norm(er), 1e-12))}
    d = float(((eq - er) ** 2).sum())
    return {"score": -d, "distance": d, "cis": cis, "cis_target": float(0.5 * (eq @ eq + er @ er - d))}


def cosine(q, r, mu=None) -> float:
    return float(cis_cosine(q, r, mu).sum())


def l2_target(q, r, mu=None) -> float:
    """``½(‖q−μ‖² + ‖r−μ‖² − ‖q−r‖²)``: what the l2 CIS sums to."""
    q, r = _vec(q), _vec(r)
    m = _vec(mu) if mu is not None else np.zeros_like(q)
    return float(0.5 * (((q - m) ** 2).sum() + ((r - m) ** 2).sum() - ((q - r) ** 2).sum()))


def top_channels(cis: np.ndarray, n: int = 10) -> list[dict]:
    """The channels that carried the match: index, CIS, and share of the total (Σ CIS)."""
    total = float(cis.sum())
    order = np.argsort(-cis)[:n]
    return [{"channel": int(k), "cis": float(cis[k]), "share": float(cis[k] / total) if total else 0.0}
            for k in order]
