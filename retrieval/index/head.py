"""A linear head fitted on the collection, ``e = P (a − m)``: centring (``P = I``), PCA or PCA-whitening.

It stays linear before the L2 normalisation, so the channel contributions of a score (explain/cis.py) remain an
exact decomposition of it, computed in backbone-channel space through ``G = PᵀP``.

- ``centre`` (the general preset): the cosine of embeddings centred on the collection's mean. It ranks as well as
  the plain cosine on categories and faces and better on faces' mAP, and it gives every collection the same zero:
  unrelated photos score about 0 instead of 0.25-0.75 depending on the collection (bench/results/quality-centring.md).
- ``pca-whiten:D`` (the instance preset): the top-D principal axes, each scaled by ``(λ + s·λ̄)^-1/2`` -- whitening
  with shrinkage ``s`` towards the mean eigenvalue. Fitted on few vectors, whitening amplifies noise: the shrinkage
  grows as the collection shrinks (``s = max(0.1, D/n)``), and below ``MIN_WHITEN`` vectors the head only centres
  (bench/results/quality-sizes.md: at 50-200 images a fixed s = 0.1 lost mAP@10 0.03-0.05 to this rule and gave
  scores near 0 for true matches; at 500 the two agree).
- a ``fixed`` head (the faces preset): a centre given with the preset, never fitted on the collection.

Below ``MIN_CENTRE`` vectors no head is fitted (the plain cosine): a collection's mean from a handful of photos biases
every centred cosine by about ``−1/(n − 1)`` (two photos always score −1).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import numpy as np

MIN_CENTRE = 10  # fewer vectors than this: no head yet (the plain cosine)
MIN_WHITEN = 50  # fewer than this: a PCA head only centres (see the module docstring)
SHRINK = 0.1  # the least shrinkage of the whitening, reached at D/0.1 vectors (1280 for D = 128)
KINDS = ("centre", "pca", "pca-whiten")


@dataclass
class LinearHead:
    mean: np.ndarray  # (C,) float64
    proj: np.ndarray | None = None  # (D, C) float64; None: the identity (centring only)
    fitted_on: int = 0

    @property
    def dim(self) -> int:
        return int(self.mean.shape[0] if self.proj is None else self.proj.shape[0])

    def apply(self, x: np.ndarray) -> np.ndarray:
        """(N, C) raw embeddings → (N, D) head outputs (float32)."""
        x = np.atleast_2d(np.asarray(x, np.float64)) - self.mean
        return (x if self.proj is None else x @ self.proj.T).astype(np.float32)

    def gram_apply(self, x: np.ndarray) -> np.ndarray:
        """``G x`` with ``G = PᵀP`` for rows of ``x`` (the identity for a centring head), without a C×C matrix."""
        x = np.asarray(x, np.float64)
        return x if self.proj is None else (x @ self.proj.T) @ self.proj


def parse_head(spec: str | None) -> dict:
    """``none`` | ``centre`` | ``pca[:D]`` | ``pca-whiten[:D]`` → the recorded head configuration."""
    if not spec or spec == "none":
        return {}
    kind, _, dim = spec.partition(":")
    if kind not in KINDS or (dim and not dim.isdigit()) or (kind == "centre" and dim):
        from retrieval.errors import RetrieveError

        raise RetrieveError(f"unknown head {spec!r} (none, centre, pca, pca:D, pca-whiten or pca-whiten:D)")
    return {"type": kind} if kind == "centre" else {"type": kind, "dim": int(dim) if dim else 256}


def head_text(cfg: dict) -> str:
    """A head configuration as ``--head`` spells it."""
    if not cfg:
        return "none"
    return cfg["type"] + (f":{cfg['dim']}" if "dim" in cfg else "")


def fit_head(chunks: Iterable[np.ndarray], config: dict) -> LinearHead | None:
    """Fit on streamed (N_i, C) chunks: the mean, and for a PCA head the covariance's top-D eigenvectors (see the
    module docstring for the sizes and the shrinkage). None below ``MIN_CENTRE`` vectors, or for a fixed head."""
    if config.get("fixed"):
        return None
    n, total, outer = 0, None, None
    pca = config.get("type") in ("pca", "pca-whiten")
    for x in chunks:
        x = np.asarray(x, np.float64)
        if total is None:
            total = np.zeros(x.shape[1])
            outer = np.zeros((x.shape[1], x.shape[1])) if pca else None
        n += len(x)
        total += x.sum(0)
        if pca:
            outer += x.T @ x
    if n < MIN_CENTRE or total is None:
        return None
    mean = total / n
    if not pca or n < MIN_WHITEN:
        return LinearHead(mean=mean, proj=None, fitted_on=n)
    cov = outer / n - np.outer(mean, mean)
    lam, vec = np.linalg.eigh(cov)
    order = np.argsort(lam)[::-1]
    d = max(1, min(int(config.get("dim", 256)), n - 1, len(lam)))
    lam, vec = np.maximum(lam[order[:d]], 0), vec[:, order[:d]]
    if config.get("type") == "pca-whiten":
        shrink = max(SHRINK, int(config.get("dim", 256)) / n)
        scale = 1.0 / np.sqrt(lam + shrink * lam.mean() + 1e-12)
    else:
        scale = np.ones(d)
    return LinearHead(mean=mean, proj=(vec * scale).T, fitted_on=n)
