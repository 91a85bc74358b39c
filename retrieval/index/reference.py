"""The collection's reference points at the explain resolution, sampled when the index is built or updated.

Explanations centre the similarity they explain on the collection's mean (μ): "what these two share that
a typical photo here does not". Maps are made at a higher resolution than the search embeddings (448 px
for a 224 px index), and an embedding's statistics change with the resolution — centring 448 px
embeddings with the 224 px mean localises far worse (bench/results/explain.md, set C: pointing 0.60 vs
0.93 for one variant). So the indexer also embeds a sample of the collection (up to ``SAMPLE`` photos) at
the explain resolution and stores two means with the index:

- ``mean``: of the pooled final-layer embeddings (the index's pooling), and
- ``mean_tap``: of the spatially averaged stride-16 map (the backbone's ``tap``), which SFAM's default map fuses.

Re-sampled when missing, when the explain size or layer changes, or when the collection has halved or
doubled since (as the linear head is re-fitted): each sample costs up to 128 forward passes.
"""
from __future__ import annotations

import numpy as np


KEY = "explain_reference"
SAMPLE = 128  # photos embedded at the explain resolution when the index is built or updated
SAMPLE_ON_THE_FLY = 32  # for an index built before references were stored (not stored: searches only read)

def compute(store, backbone, size: int, tap: str | None, sample: int = SAMPLE,
            rng: np.random.Generator | None = None) -> dict | None:
    """Means of a sample of the indexed photos at ``size`` px (see the module doc); None when none can be read.

    ``backbone``: a :class:`~retrieval.models.backbone.Backbone` (through its cached graphs where they serve). Photos
    are read
    :data:`CHUNK` at a time (128 preprocessed photos at 448 px would hold 300 MB at once)."""
    from retrieval.errors import ImageError
    from retrieval.images import load_image
    from retrieval.models.preprocess import group_by_shape

    rng = rng or np.random.default_rng(0)
    n = store.count()
    if n == 0:
        return None
    ids = store.row_ids()  # ids only: the embeddings are not needed here
    pick = sorted(int(i) for i in rng.choice(ids, min(sample, len(ids)), replace=False))
    bb = backbone.at_size(size)
    total = np.zeros(bb.feature_dim, np.float64)
    total_tap = None
    k = 0
    for c in range(0, len(pick), CHUNK):
        rows = store.rows_by_ids(pick[c:c + CHUNK])
        arrays = []
        for i in pick[c:c + CHUNK]:
            try:
                arrays.append(bb.preprocess.array(load_image(rows[i].path, min_side=size)))
            except (ImageError, KeyError):
                continue  # moved or unreadable since: the sample is a little smaller
        k += len(arrays)
        for idx in group_by_shape(arrays):
            a, t = _forward(bb, np.stack([arrays[j] for j in idx]), tap)
            if t is not None:
                part = t.astype(np.float64).mean((2, 3)).sum(0)
                total_tap = part if total_tap is None else total_tap + part
            total += a.sum(0)
    if not k:
        return None
    return {"size": int(size), "tap": tap, "mean": (total / k).tolist(),
            "mean_tap": None if total_tap is None else (total_tap / k).tolist(), "sampled": k, "images": n}


CHUNK = 16  # photos read and run at a time


def _forward(bb, x: np.ndarray, tap: str | None) -> tuple[np.ndarray, np.ndarray | None]:
    """(pooled embeddings N×C float64, the tap layer's map or None) of the batch ``x``."""
    a, t = bb.features_and_tap_arrays(x, tap) if tap else (bb.features_arrays(x), None)
    return bb.pool_arrays(a.astype(np.float64)), t


def _fits(ref: dict | None, size: int, tap: str | None) -> bool:
    return bool(ref) and ref.get("size") == size and ref.get("tap") == tap


def refresh(store, backbone, size: int, tap: str | None, force: bool = False) -> dict | None:
    """Re-sample and store when missing, made for another size or layer, or the collection halved or doubled."""
    old = store.get_value(KEY)
    n = store.count()
    if not force and _fits(old, size, tap) and old["images"] / 2 <= n <= 2 * max(old["images"], 1):
        return old  # a mean of up to 128 photos moves little until the collection halves or doubles
    ref = compute(store, backbone, size, tap)
    store.set_value(KEY, ref)
    return ref


def for_explain(store, backbone, size: int, tap: str | None) -> tuple[np.ndarray | None, np.ndarray | None]:
    """(μ, μ_tap) at ``size`` px: the stored ones, else sampled now from a few photos (not stored), else the
    index's own mean when it was computed at that size."""
    ref = store.get_value(KEY)
    if not _fits(ref, size, tap):
        ref = compute(store, backbone, size, tap, sample=SAMPLE_ON_THE_FLY)
    own = store.settings.preprocess.get("size") == size  # the index's mean is exact (every photo) at its size
    if ref is None:
        return (np.asarray(store.mean, np.float64) if own else None), None
    tap_mean = None if ref.get("mean_tap") is None else np.asarray(ref["mean_tap"], np.float64)
    return np.asarray(store.mean if own else ref["mean"], np.float64), tap_mean
