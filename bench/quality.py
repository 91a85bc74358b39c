"""Retrieval quality on labelled folders (folder = class): every image queries all the others.

    python bench/quality.py [--datasets att_faces caltech101] [--model efficientnet_lite0] [--threads 2]

Reports Recall@1 and mAP@R (R = class size − 1) for cosine and l2, through the real indexing path
(decode, preprocess, fast backbone), and saves the table to bench/results/quality.md. Needs
../shared/data (skips with a one-line message when absent).
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import _common
import numpy as np
import torch

from indexer import index_paths
from retrieval.head import fit_head, parse_head
from retrieval.store import IndexStore


def labelled_embeddings(folder: Path, model: str, input_size: int | None) -> tuple[np.ndarray, np.ndarray, float]:
    """Index ``folder`` into a temporary index; return (raw embeddings, labels, seconds)."""
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        rep = index_paths([folder], Path(tmp) / "idx", model=model, input_size=input_size)
        secs = time.perf_counter() - t
        with IndexStore.open(Path(tmp) / "idx") as store:
            ids, vecs = zip(*store.iter_vectors())
            ids, vecs = np.concatenate(ids), np.concatenate(vecs)
            rows = store.rows_by_ids(ids.tolist())
    labels = np.array([Path(rows[int(i)].path).parent.name for i in ids])
    assert rep.skipped == 0, rep.skipped_files
    return vecs, labels, secs


def _similarities(x: np.ndarray, metric: str) -> np.ndarray:
    if metric == "cosine":
        return x @ x.T
    sq = (x ** 2).sum(1)
    return -(sq[:, None] + sq[None, :] - 2 * x @ x.T)


def retrieval_metrics(vecs: np.ndarray, labels: np.ndarray, metric: str, head=None, qe: int = 0) -> tuple[float, float]:
    """(Recall@1, mAP@R) with every item querying all the others (exact search), as the product ranks:
    through the linear head, L2-normalised for cosine, optionally with average query expansion."""
    x = vecs.astype(np.float64)
    if head is not None:
        x = head.apply(x).astype(np.float64)
    if metric == "cosine":
        x = x / np.linalg.norm(x, axis=1, keepdims=True)
    sim = _similarities(x, metric)
    np.fill_diagonal(sim, -np.inf)
    if qe:
        top = np.argsort(-sim, axis=1)[:, :qe]
        xq = (x + x[top].sum(1)) / (qe + 1)
        if metric == "cosine":
            xq = xq / np.linalg.norm(xq, axis=1, keepdims=True)
            sim = xq @ x.T
        else:
            sim = -(((xq ** 2).sum(1))[:, None] + ((x ** 2).sum(1))[None, :] - 2 * xq @ x.T)
        np.fill_diagonal(sim, -np.inf)
    order = np.argsort(-sim, axis=1, kind="stable")
    rel = labels[order] == labels[:, None]
    r1 = float(rel[:, 0].mean())
    aps = []
    for i in range(len(x)):
        R = int((labels == labels[i]).sum()) - 1
        if R == 0:
            continue
        hits = rel[i, :R]
        prec = np.cumsum(hits) / np.arange(1, R + 1)
        aps.append(float((prec * hits).sum() / R))
    return r1, float(np.mean(aps))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--datasets", nargs="+", default=["att_faces", "caltech101"])
    ap.add_argument("--model", default="efficientnet_lite0")
    ap.add_argument("--input-size", type=int, default=None)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for name in args.datasets:
        folder = _common.shared_dataset(name)
        if folder is None:
            continue
        vecs, labels, secs = labelled_embeddings(folder, args.model, args.input_size)
        heads = {"none": None}
        for spec in ("pca:256", "pca-whiten:64", "pca-whiten:128", "pca-whiten:256"):
            heads[spec] = fit_head([vecs], parse_head(spec))  # fitted on the collection itself, as at index time
        for metric in ("cosine", "l2"):
            for hname, head in heads.items():
                for qe in (0, 1, 2):
                    if metric == "l2" and (qe or hname not in ("none", "pca-whiten:128")):
                        continue
                    t = time.perf_counter()
                    r1, mapr = retrieval_metrics(vecs, labels, metric, head, qe)
                    per_query = 1000 * (time.perf_counter() - t) / len(labels)
                    rows.append([name, len(labels), metric, hname, qe, round(r1, 3), round(mapr, 3),
                                 round(1000 * secs / len(labels), 1), round(per_query, 3)])
    if not rows:
        return
    text = (f"Retrieval quality, {args.model} (global average pooling, {args.input_size or 'default'} px), "
            f"{args.threads} threads; every image queries the rest, exact search.\n\n")
    text += _common.table(["dataset", "images", "metric", "head", "QE", "R@1", "mAP@R", "index ms/img",
                           "ranking ms/query"], rows)
    text += ("\n\nhead: linear head fitted on the collection at index time (`--head`); QE: average query "
             "expansion with the top N (`search --qe N`). ranking ms/query: exact ranking of all items in "
             "numpy, the cost the option adds on top of embedding the query.")
    _common.save("quality", text)


if __name__ == "__main__":
    main()
