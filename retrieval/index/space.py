"""The vector space of an index: its linear head, the vectors FAISS holds and their factory (retrieval/index/store.py)."""
from __future__ import annotations

import hashlib
from typing import Iterator, Sequence

import numpy as np

from retrieval.index.head import LinearHead
from retrieval.index.vectors import INDEX_TYPES, factory_for


def as_vectors(blobs: Sequence[bytes], dim: int = -1) -> np.ndarray:
    """Stored embedding blobs (float32 bytes, one per row) → an (n, dim) array."""
    return np.frombuffer(b"".join(blobs), np.float32).reshape(len(blobs), dim)


def chunks(seq: Sequence, n: int) -> Iterator[Sequence]:
    for i in range(0, len(seq), n):
        yield seq[i:i + n]


class VectorSpace:
    """The vector space of an index store: its linear head, the vectors FAISS holds and their factory, from the
    store's ``settings``, ``metric``, ``_arrays(names)`` and ``get_value(key)``."""

    @property
    def head(self) -> LinearHead | None:
        """The fitted :class:`LinearHead`, or None (no head configured, or not fitted yet)."""
        if not hasattr(self, "_head"):
            self._head = None
            if self.settings.head:
                arrays = self._arrays(["head_mean", "head_proj"])
                if "head_mean" in arrays:
                    self._head = LinearHead(arrays["head_mean"], arrays.get("head_proj"),
                                            int(self.get_value("head_fitted_on", 0)))
        return self._head

    @property
    def head_id(self) -> str:
        """The fitted head's identity (a hash of its arrays), ``none`` without one."""
        h = self.head
        if h is None:
            return "none"
        d = hashlib.sha256(np.ascontiguousarray(h.mean, np.float64).tobytes())
        if h.proj is not None:
            d.update(np.ascontiguousarray(h.proj, np.float64).tobytes())
        return d.hexdigest()[:16]

    @property
    def vector_dim(self) -> int:
        """The dimension of the vectors FAISS holds (the head's output, else the backbone's)."""
        return self.head.dim if self.head is not None else self.settings.dim

    def space(self) -> dict:
        """What the vectors FAISS holds depend on: the head, the metric and the dimension."""
        return {"head": self.head_id, "metric": self.settings.metric, "dim": self.vector_dim}

    def transform(self, vecs: np.ndarray) -> np.ndarray:
        """Raw pooled embeddings → the vectors FAISS holds (through the head; L2-normalised for cosine)."""
        x = np.ascontiguousarray(vecs, dtype=np.float32)
        if self.head is not None:
            x = self.head.apply(x)
        return self.metric.normalise(x)

    def factory(self, n: int) -> str:
        """The FAISS factory string this index wants at ``n`` vectors (before the training fallback)."""
        st = self.settings
        return factory_for(st.index_type, self.vector_dim, n) if st.index_type in INDEX_TYPES else st.faiss_factory
