"""Channel-wise contribution importance scores (CIS) — the heart of SFAM (arXiv:2506.01636) — of the score an index
ranks a pair by. One module: the score, its CIS, the channel table and the weights the heat maps draw with all come
from :func:`decompose`.

The index's vector space (retrieval/index/space.py) maps a raw pooled embedding ``a`` to ``e = P (a − m)`` (a linear
head: centring, PCA or PCA-whitening; none: ``e = a``), L2-normalised for the cosine. For the cosine
``s = ⟨e_q, e_r⟩ / (‖e_q‖‖e_r‖)`` the CIS in backbone-channel space, with ``G = PᵀP``, are

    CIS_k = (q − m)_k · (G (r − m))_k / (‖e_q‖‖e_r‖),        Σ_k CIS_k = s exactly,

and ``Σ_k wr_k (r − m)_k = Σ_k (q − m)_k wq_k = s`` with ``wr = G (q − m)/z``, ``wq = G (r − m)/z``: the weights the heat
maps give each channel's map (explain/methods.py), each map's spatial mean the score (per channel they equal the
CIS when ``G = I``). For ``l2`` (``s = −‖e_q − e_r‖²``) the per-channel split of the
distance is never positive and draws nothing; the CIS then split ``⟨e_q, e_r⟩`` relative to the collection mean,
"how much closer the two are to each other than to a typical photo" (the spec's choice), and the outputs say so.

The score is computed from ``e_q``, ``e_r`` by its definition (the cosine, or the squared distance), not as Σ CIS:
``exact`` then checks that the CIS add up to it (they do through ``G``, a separate path from ``P``), so that "the
terms add up to the score exactly" is a finding, not a definition.

An index made before the general preset centred its embeddings ranks by the plain cosine (``m = 0``): its CIS split
that cosine exactly, and its maps draw the part of each channel's CIS centred on the collection mean (weights
``(q − μ)/z``): with plain weights the maps localise markedly worse (bench/results/explain-ranking-cis.md, rows B and
B″), with these they are the centred cosine's maps.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class Decomposition:
    """One pair's score and its split over the backbone's channels (see the module docstring)."""

    score: float  # what ranks the pair: the cosine, or minus the squared distance (l2)
    distance: float | None  # l2: the squared Euclidean distance
    cis: np.ndarray  # C channel terms
    wq: np.ndarray  # the query map's channel weights
    wr: np.ndarray  # the result map's channel weights
    centre: np.ndarray  # the point the weights' maps are centred on (the space's centre, or the collection mean)
    head: object = None  # the space's LinearHead (G = PᵀP between channels), None: G = I
    z: float = 1.0  # the cosine's normaliser ‖e_q‖‖e_r‖ (1 for l2)

    @property
    def total(self) -> float:
        """Σ CIS: the score itself for the cosine."""
        return float(self.cis.sum())

    @property
    def exact(self) -> bool:
        """Σ CIS equals the score computed by its definition (the cosine; never for l2, whose terms add up to a
        related number)."""
        return self.distance is None and adds_up(self.total, self.score)


EXACT_TOL = 1e-6  # Σ CIS against the score, relative to max(1, |score|): float64 sums of C terms are far closer


def adds_up(total: float, score: float) -> bool:
    """Whether channel terms adding up to ``total`` split ``score`` exactly (to float64 rounding)."""
    return abs(float(total) - float(score)) <= EXACT_TOL * max(1.0, abs(float(score)))


def _rows(x) -> np.ndarray:
    return np.atleast_2d(np.asarray(x, np.float64))


def decompose(q, r, metric, head=None, mean=None) -> list[Decomposition]:
    """The decompositions of query ``q`` (C) against each row of ``r`` (N×C, raw pooled embeddings) in a vector space:
    ``metric`` (a :class:`retrieval.metric.Metric`), ``head`` (a :class:`retrieval.index.head.LinearHead` or None) and
    ``mean`` (the collection's mean embedding: the l2 reference point, and the maps' centre without a head)."""
    q = _rows(q)[0]
    r = _rows(r)
    c = q.shape[0]
    mu = np.zeros(c) if mean is None else np.asarray(mean, np.float64).reshape(-1)
    m = np.asarray(head.mean, np.float64) if head is not None else (mu if not metric.normalised else np.zeros(c))
    qc, rc = q - m, r - m
    gq = head.gram_apply(qc) if head is not None else qc  # G (q − m)
    gr = head.gram_apply(rc) if head is not None else rc  # G (r − m), row-wise
    proj = None if head is None else head.proj
    eq, er = (qc, rc) if proj is None else (qc @ proj.T, rc @ proj.T)  # e = P (a − m), in float64
    out = []
    for i in range(len(r)):
        if metric.normalised:
            z = max(float(np.linalg.norm(eq) * np.linalg.norm(er[i])), 1e-12)
            cis = qc * gr[i] / z
            score, distance = float(eq @ er[i]) / z, None  # the cosine by its definition, not Σ CIS
            if head is None:  # the plain cosine: the maps draw its part centred on the collection mean
                wq, wr, centre = (r[i] - mu) / z, (q - mu) / z, mu
            else:
                wq, wr, centre = gr[i] / z, gq / z, m
        else:
            d = float(((eq - er[i]) ** 2).sum())
            cis = qc * gr[i]
            score, distance, z = -d, d, 1.0
            wq, wr, centre = gr[i], gq, m
        out.append(Decomposition(score, distance, cis, wq, wr, centre, head, z))
    return out


def decompose_in(space, q, r) -> list[Decomposition]:
    """:func:`decompose` in an index's vector space (its metric, fitted head and collection mean)."""
    return decompose(q, r, space.metric, space.head, space.mean)


SHARE_OF = ("each channel's term over the sum of the positive terms (the evidence for the match), so shares lie in "
            "0–100 % whatever the sign of the score")


def channel_rows(cis, n: int = 10) -> tuple[list[dict], str]:
    """The top ``n`` channels for the match, each with its share of the evidence *for* it (``SHARE_OF``: a share of
    the score itself would run to −10 and +12 when the terms nearly cancel or add up to a negative score); and a
    sentence on what the terms add up to."""
    if cis is None:
        return [], ""
    cis = np.asarray(cis, np.float64)
    pos = float(cis[cis > 0].sum())
    neg = abs(float(cis[cis < 0].sum()))  # abs: no "-0.0000 against" when no term is negative
    rows = [{"channel": int(k), "cis": float(cis[k]), "share": float(cis[k] / pos)}
            for k in np.argsort(-cis)[:n] if cis[k] > 0]
    if pos <= neg:
        note = (f"the channels against the match outweigh those for it ({pos:.4f} for, {neg:.4f} against): the maps "
                "show the little the two photos have in common")
    else:
        top = sum(r["share"] for r in rows)
        note = f"{len(rows)} channels carry {top:.0%} of the evidence for the match; {pos:.4f} for, {neg:.4f} against"
    return rows, note
