"""What ``retrieve info --json`` and the web app's ``/api/info`` say about an index (one definition for both)."""
from __future__ import annotations

import time


def iso(t: float) -> str:
    """A timestamp as local ISO 8601 with its offset."""
    return time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(t))


def head_text(store) -> str:
    """The linear head in words: ``none``, or its type and size and what it was fitted on."""
    from retrieval.index.head import head_text as spec

    cfg = store.settings.head
    if not cfg:
        return "none"
    h = store.head
    if h is not None and cfg.get("fixed"):
        fitted = f"fixed: {cfg['fixed']}, {h.dim} dims"
    elif h is not None:
        fitted = f"fitted on {h.fitted_on} images, {h.dim} dims" + (", centring only" if h.proj is None and
                                                                      cfg["type"] != "centre" else "")
    else:
        fitted = "not fitted yet"
    return f"{spec(cfg)} ({fitted})"


def index_info(store) -> dict:
    """The index's settings, size and dates, in the order ``retrieve info`` prints them."""
    from retrieval.index.catalogue import folders as catalogue_folders

    st = store.settings
    skipped = store.skipped_count()
    updated = store.get_value("updated_at")
    return {"index": str(store.directory), "database": store.where, "model": st.model, "weights": st.weights_source,
            "input_size": st.preprocess.get("size"), "resize": st.preprocess.get("resize", "squash"),
            "pooling": st.pooling, "precision": st.precision, "search_defaults": st.search,
            **({"local_features": st.local} if st.local else {}), "metric": st.metric,
            "index_type": st.index_type,
            **({"preset": st.preset} if st.preset else {}),
            **({"catalogue": roots} if (roots := catalogue_folders(store)) else {}),
            "faiss_factory": st.faiss_factory, "dim": st.dim, "head": head_text(store),
            "images": store.count(), "skipped_files": skipped,
            **({"sharded_vectors": _sharded(store)} if st.index_type == "sharded" else {}),
            "size_bytes": store.size_on_disk(), "schema_version": st.schema_version,
            "created_at": iso(st.created_at), "updated_at": iso(updated) if updated else None}


def _sharded(store) -> dict:
    from retrieval.index.sharded import info

    return info(store)
