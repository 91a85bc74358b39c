"""A linear head fitted on the collection: centring and PCA-whitening, ``e = P (a − m)``.

It stays linear before the L2 normalisation, so SFAM's CIS remains an exact decomposition of the
similarity (computed in backbone-channel space through ``G = PᵀP``; see explain/cis.py).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import numpy as np

MIN_FIT = 32  # fewer vectors than this: no head yet (identity)


@dataclass
class LinearHead:
    mean: np.ndarray  # (C,) float64
    proj: np.ndarray  # (D, C) float64
    fitted_on: int = 0

    @property
    def dim(self) -> int:
        return int(self.proj.shape[0])

    def apply(self, x: np.ndarray) -> np.ndarray:
        """(N, C) raw embeddings → (N, D) head outputs (float32)."""
        x = np.atleast_2d(np.asarray(x, np.float64))
        return ((x - self.mean) @ self.proj.T).astype(np.float32)

    def gram(self) -> np.ndarray:
        return self.proj.T @ self.proj


def parse_head(spec: str | None) -> dict:
    """``none`` | ``pca-whiten`` | ``pca-whiten:D`` → the recorded head configuration."""
    if not spec or spec == "none":
        return {}
    kind, _, dim = spec.partition(":")
    if kind not in ("pca-whiten", "pca") or (dim and not dim.isdigit()):
        from retrieval.errors import RetrieveError

        raise RetrieveError(f"unknown head {spec!r} (none, pca, pca:D, pca-whiten or pca-whiten:D)")
    return {"type": kind, "dim": int(dim) if dim else 256}


def fit_head(chunks: Iterable[np.ndarray], config: dict, shrink: float = 0.1) -> LinearHead | None:
    """Fit on streamed (N_i, C) chunks: mean, covariance, top-D eigenvectors.

    ``pca-whiten`` scales each component by ``(λ + s·λ̄)^-1/2`` (λ̄ the mean kept eigenvalue, s =
    ``shrink``): whitening with shrinkage, so that near-zero components are not blown up.
    """
    n, total, outer = 0, None, None
    for x in chunks:
        x = np.asarray(x, np.float64)
        if total is None:
            total, outer = np.zeros(x.shape[1]), np.zeros((x.shape[1], x.shape[1]))
        n += len(x)
        total += x.sum(0)
        outer += x.T @ x
    if n < MIN_FIT or total is None:
        return None
    mean = total / n
    cov = outer / n - np.outer(mean, mean)
    lam, vec = np.linalg.eigh(cov)
    order = np.argsort(lam)[::-1]
    d = max(1, min(int(config.get("dim", 256)), n - 1, len(lam)))
    lam, vec = np.maximum(lam[order[:d]], 0), vec[:, order[:d]]
    if config.get("type") == "pca-whiten":
        scale = 1.0 / np.sqrt(lam + shrink * lam.mean() + 1e-12)
    else:
        scale = np.ones(d)
    return LinearHead(mean=mean, proj=(vec * scale).T, fitted_on=n)

