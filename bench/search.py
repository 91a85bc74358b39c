"""Search at scale: build time, memory per vector, query latency and recall@10 per index type.

    python bench/search.py [--sizes 10000 100000] [--queries 500] [--threads 2]

Vectors have the default backbone's size (1280) and are sampled around real embeddings (the sample
photos and, when present, ../shared/data/caltech101), clipped at 0 like the ReLU6 features:
``--noise subspace`` (default) adds noise along the real embeddings' top 64 principal directions with
their own spread (real embeddings have a fast-decaying spectrum); ``--noise isotropic`` adds
independent noise with the real per-channel spread to every channel (every point a blob of
near-equidistant neighbours: a worst case for approximate search; saved as search-isotropic.md). Each type is built with the factory string
and search parameters the product uses (retrieval/index/store.py, retrieval/match/search.py); `ivfpq` re-scores
its candidates exactly, here from an in-memory array standing in for the SQLite rows. Recall@10 is
against exact search. Saves bench/results/search.md.
"""
from __future__ import annotations

import argparse
import time

import _common
import faiss
import numpy as np
import torch

from retrieval.match.search import RERANK_FACTOR, _tune
from retrieval.index.vectors import HNSW_EF_CONSTRUCTION, IVF_TRAIN_PER_LIST, _nlist, factory_for, trainable_factory


def real_embeddings() -> np.ndarray:
    from retrieval.images import load_image
    from retrieval.models.loading import load_backbone

    bb = load_backbone()
    files = sorted((_common.ROOT / "data" / "samples").glob("*.*"))
    data = _common.SHARED_DATA / "caltech101"
    if data.is_dir():
        files += sorted(data.rglob("*.jpg"))[::2]
    imgs = [load_image(f, min_side=224) for f in files if f.suffix.lower() in (".jpg", ".png")]
    out = [bb.embed(bb.preprocess.batch(imgs[i:i + 32]))[1].numpy() for i in range(0, len(imgs), 32)]
    return np.concatenate(out)


def sample_around(real: np.ndarray, n: int, rng, noise: str = "subspace") -> np.ndarray:
    spread = real.std(0, keepdims=True)
    centred = real - real.mean(0)
    _, sv, vt = np.linalg.svd(centred, full_matrices=False)
    basis = (vt[:64] * (sv[:64, None] / np.sqrt(len(real)))).astype(np.float32)  # 64 directions, real spread
    out = np.empty((n, real.shape[1]), np.float32)
    for s in range(0, n, 50_000):
        m = min(50_000, n - s)
        base = real[rng.integers(0, len(real), m)]
        if noise == "isotropic":
            step = 0.5 * spread * rng.standard_normal((m, real.shape[1]), dtype=np.float32)
        else:
            step = 0.5 * rng.standard_normal((m, 64), dtype=np.float32) @ basis
        out[s:s + m] = np.clip(base + step, 0, None)
    return out


def normalise(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def build(kind: str, xb: np.ndarray, ef_construction: int | None = None):
    n, d = xb.shape
    factory = trainable_factory(factory_for(kind, d, n), n)
    index = faiss.IndexIDMap2(faiss.index_factory(d, factory, faiss.METRIC_INNER_PRODUCT))
    inner = faiss.downcast_index(index.index)
    ef_construction = ef_construction or HNSW_EF_CONSTRUCTION  # the product's default
    if hasattr(inner, "hnsw"):
        inner.hnsw.efConstruction = ef_construction
        factory += f" (efConstruction {ef_construction})"
    t = time.perf_counter()
    if not index.is_trained:
        train = xb[np.random.default_rng(1).choice(n, min(n, IVF_TRAIN_PER_LIST * _nlist(factory)), replace=False)]
        index.train(train)
    for s in range(0, n, 100_000):
        index.add_with_ids(xb[s:s + 100_000], np.arange(s, min(n, s + 100_000), dtype=np.int64))
    secs = time.perf_counter() - t
    rerank = _tune(index)
    return index, factory, secs, rerank


def search_one(index, q: np.ndarray, k: int, rerank: bool, xb: np.ndarray) -> np.ndarray:
    kk = k * RERANK_FACTOR if rerank else k
    _, ids = index.search(q[None], kk)
    ids = ids[0][ids[0] >= 0]
    if rerank:
        s = xb[ids] @ q
        ids = ids[np.argsort(-s)[:k]]
    return ids[:k]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    ap.add_argument("--types", nargs="+", default=["flat", "hnsw", "ivfpq"])
    ap.add_argument("--queries", type=int, default=500)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--noise", choices=["subspace", "isotropic"], default="subspace")
    ap.add_argument("--ef", type=int, nargs="+", default=None, help="HNSW efSearch values to measure")
    ap.add_argument("--ef-construction", type=int, default=None,
                    help=f"HNSW efConstruction (default: the product's, {HNSW_EF_CONSTRUCTION}; FAISS's own is 40)")
    ap.add_argument("--name", default=None, help="results file name (default: search / search-isotropic)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    faiss.omp_set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    real = real_embeddings()
    rows = []
    for n in args.sizes:
        xb = normalise(sample_around(real, n, rng, args.noise))
        xq = normalise(sample_around(real, args.queries, rng, args.noise))
        exact = faiss.IndexFlatIP(xb.shape[1])
        exact.add(xb)
        _, gt = exact.search(xq, 10)
        del exact
        for kind in args.types:
            index, factory, secs, rerank = build(kind, xb, args.ef_construction)
            size = faiss.serialize_index(index).nbytes
            inner = faiss.downcast_index(index.index)
            efs = args.ef if (args.ef and hasattr(inner, "hnsw")) else [None]
            for ef in efs:
                if ef is not None:
                    inner.hnsw.efSearch = ef
                lat, rec = [], []
                for q, g in zip(xq, gt):
                    t = time.perf_counter()
                    ids = search_one(index, q, 10, rerank, xb)
                    lat.append(time.perf_counter() - t)
                    rec.append(len(set(ids.tolist()) & set(g.tolist())) / 10)
                label = factory + (" + exact re-rank" if rerank else "") + (f", efSearch {ef}" if ef else "")
                rows.append([n, kind, label, round(secs, 1), round(size / n), round(1000 * np.percentile(lat, 50), 3),
                             round(1000 * np.percentile(lat, 99), 3), round(float(np.mean(rec)), 3)])
                print(rows[-1], flush=True)
            del index
    text = (f"Search at scale: 1280-d vectors sampled around real Lite0 embeddings ({args.noise} noise), cosine, "
            f"k=10, {args.queries} single queries, {args.threads} threads.\n\n")
    text += _common.table(["N", "type", "factory", "build s", "bytes/vector", "p50 ms", "p99 ms", "recall@10"], rows)
    _common.save(args.name or ("search" if args.noise == "subspace" else "search-isotropic"), text)


if __name__ == "__main__":
    main()
