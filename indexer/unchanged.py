"""Knowing that a run changed nothing, so that finalising it neither re-reads every embedding (μ) nor rewrites
the vector file (about 5 GB per run at 1 M × 1280).

After the vector file is written, :func:`record` stores in the database what it holds: a digest of the ids
of the FAISS index (sorted), the row count, the vector space, the fingerprint file's content and the vector
file's identity on disk (inode, mtime, size: a rename by any writer makes a new one). At the end of the
next run, :func:`unchanged` recomputes the same from the index in memory (loaded from that file and
reconciled with the rows, then changed by the run, if at all) and from the disk: equal means the same
rows -- ids are never reused, a moved or touched file keeps its id and vector, a re-embedded one gets a
new id -- hence the same μ and the same vector file. Anything else (a rebuild, a head re-fit, removed ids
an HNSW graph still holds, a vector file written by someone else, a store laid out otherwise) counts as a
change: the run finalises in full, as before.
"""
from __future__ import annotations

import hashlib
import os

import numpy as np

KEY = "vector_state"  # in the settings table, beside "mean" and "vector_file"


def state(store) -> dict | None:
    """What the vector file and μ depend on, as it stands now; None when it cannot be said (then: changed)."""
    try:
        import faiss

        from retrieval.index.vectors import FAISS_NAME, read_meta

        vectors = getattr(store, "_vectors", None)
        index = getattr(vectors, "index", None)
        if index is None or not isinstance(index, faiss.IndexIDMap2) or len(getattr(vectors, "removed", ())):
            return None
        ids = np.sort(faiss.vector_to_array(index.id_map)) if index.ntotal else np.zeros(0, np.int64)
        st = os.stat(store.directory / FAISS_NAME)
        return {"ids": hashlib.sha256(np.ascontiguousarray(ids, np.int64).tobytes()).hexdigest(),
                "count": int(index.ntotal), "rows": int(store.count()), "space": store.space(),
                "factory": getattr(vectors, "factory", ""), "meta": read_meta(store.directory),
                "file": [st.st_ino, st.st_mtime_ns, st.st_size]}
    except Exception:  # noqa: BLE001  (no file, another layout: finalise in full)
        return None


def unchanged(store) -> bool:
    """True when the index in memory is what the last finalised run wrote, and μ was computed on it."""
    now = state(store)
    return now is not None and now["meta"] is not None and now == store.get_value(KEY)


def record(store) -> None:
    """Remember the state just written (call it after ``update_mean`` and ``save_faiss``)."""
    now = state(store)
    if now is not None:
        store.set_value(KEY, now)
