"""The similarity an index ranks by, in one object: its vector space, its FAISS metric and its scores.

- ``cosine``: vectors are L2-normalised, FAISS ranks by inner product, the score is the cosine (higher is
  better).
- ``l2``: vectors are used as they are, FAISS ranks by squared Euclidean distance, the score is
  ``-distance`` (so higher is better for both) and hits also carry the distance.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Metric:
    name: str  # "cosine" | "l2"
    normalised: bool  # vectors live on the unit sphere
    similarity: bool  # FAISS's raw value grows with similarity (inner product) rather than shrinking (distance)

    @property
    def faiss(self) -> int:
        """The FAISS metric constant."""
        import faiss

        return faiss.METRIC_INNER_PRODUCT if self.similarity else faiss.METRIC_L2

    def normalise(self, x: np.ndarray) -> np.ndarray:
        """Rows of ``x`` (or one vector) in this metric's space: unit length for cosine, unchanged for l2."""
        x = np.asarray(x, np.float32)
        if not self.normalised:
            return x
        return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)

    def raw(self, vectors: np.ndarray, q: np.ndarray) -> np.ndarray:
        """FAISS's value for each row of ``vectors`` against the query ``q``: inner product or squared distance."""
        if self.similarity:
            return vectors @ q
        return ((vectors - q) ** 2).sum(-1)

    def best_first(self, raw: np.ndarray) -> np.ndarray:
        """Indices that order raw values best first (stable)."""
        return np.argsort(-raw if self.similarity else raw, kind="stable")

    @property
    def worst(self) -> float:
        """A raw value worse than any real one."""
        return -np.inf if self.similarity else np.inf

    def score(self, raw: float) -> tuple[float, float | None]:
        """(score, distance) of a raw value: the score is higher-is-better; distance is None for cosine."""
        raw = float(raw)
        return (raw, None) if self.similarity else (-raw, raw)


METRICS = {
    "cosine": Metric("cosine", normalised=True, similarity=True),
    "l2": Metric("l2", normalised=False, similarity=False),
}


def metric(name: str) -> Metric:
    """The :class:`Metric` called ``name`` (``cosine`` or ``l2``)."""
    try:
        return METRICS[name]
    except KeyError:
        from retrieval.errors import RetrieveError

        raise RetrieveError(f"unknown metric {name!r} ({' or '.join(METRICS)})") from None
