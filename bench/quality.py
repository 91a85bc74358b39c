"""Retrieval quality of every option, side by side, on faces, categories and an instance-level set.

    python bench/quality.py [--datasets att_faces caltech101 instance] [--threads 2] [--quick]
    python bench/quality.py --centring --threads 1   # the general preset's ranking space: quality-centring.md
    python bench/quality.py --sizes 10 20 35 50 100 200 500 --threads 1   # instance head vs size: quality-sizes.md
    python bench/quality.py --presets [--before 5531893] --threads 1   # each preset through the CLI, before and
                                                                        # after: quality-presets.md

Datasets (folder = class; every image queries all the others, exact search):
- att_faces: ORL faces, 40 people × 10 photos (../shared/data/att_faces);
- caltech101: 100 categories × 10 photos (../shared/data/caltech101);
- instance: 100 objects × (1 clean reference + 4 synthetic phone photos in clutter), made from real
  photos by bench/instance_set.py; "photo→ref R@1" asks whether the first reference among a photo's
  results is its own object's.

Each embedding configuration (input size, squash/aspect-kept, GAP/GeM) indexes every dataset through
the real indexing path; on its embeddings, every search option is ranked as the product ranks: linear
head (fitted on the collection), query expansion (QE), database-side augmentation (DBA) and geometric
verification of the top K (SIFT + RANSAC homography, retrieval/match/verify.py). Reports R@1, mAP@R
(R = class size − 1), mAP@10, index ms per image and search ms per query; saves bench/results/quality.md.
Needs ../shared/data (skips with a one-line message when absent).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import _common
import numpy as np
import torch

from indexer import index_paths
from retrieval.index.catalogue import DEPTH
from retrieval.index.head import fit_head, parse_head
from retrieval.presets import PRESETS
from retrieval.index.store import IndexStore

EMBEDDINGS = {  # name → index_paths settings
    "gap-224-squash": dict(input_size=224, resize="squash", pooling="gap"),
    "gem-224-squash": dict(input_size=224, resize="squash", pooling="gem"),
    "gap-448-long": dict(input_size=448, resize="long", pooling="gap"),
    "gem-448-long": dict(input_size=448, resize="long", pooling="gem"),
    "rmac-448-long": dict(input_size=448, resize="long", pooling="rmac"),
    "gem-320-long": dict(input_size=320, resize="long", pooling="gem"),
}
DEEP = ("gap-224-squash", "gem-448-long")  # the two presets' embeddings: verify K = 60, 100 on the instance set
MULTISCALE = {"gem-448+320-long": ("gem-448-long", "gem-320-long")}  # mean of the raw embeddings
EXPLAIN_448 = dict(input_size=448, resize="squash", pooling="gap")  # the general preset's explain resolution
SIZES_VARIANTS = ("(i) pca-whiten:128 shrink 0.1, none below 32 vectors (before: 5531893)",
                  "(i') the same, fitted below 32 too", "(ii) no head", "(iii) centring on the collection's mean",
                  "(iv) pca-whiten:128 shrink 1.0", "(iv') pca-whiten:128 shrink max(0.1, 128/n)",
                  "(v) pca-whiten:128 shrink 0.1 fitted on 500 spare Caltech photos",
                  "(vi) centring on the spare photos' mean",
                  "(s) shipped: retrieval.index.head (none below 10, centring below 50, then (iv'))")
BEFORE_MIN_FIT = 32  # 5531893's retrieval/head.py MIN_FIT: fewer vectors, no head


def warm_exports(folder: Path, settings: dict) -> None:
    """Export the ONNX graphs for every input shape in ``folder`` first (a one-time cost per machine,
    cached on disk), so that index timings measure indexing."""
    from PIL import Image

    from retrieval.models.loading import load_backbone

    bb = load_backbone(input_size=settings["input_size"], resize=settings["resize"], pooling=settings["pooling"])
    shapes = set()
    for p in folder.rglob("*"):
        if p.suffix.lower() in (".jpg", ".jpeg", ".png", ".pgm"):
            with Image.open(p) as im:
                shapes.add(bb.preprocess.shape_for(*im.size))
    for hw in shapes:
        bb._runner(hw)


def index_vectors(index) -> tuple[np.ndarray, list[str]]:
    """Raw embeddings and paths of an index's rows, in id order."""
    with IndexStore.open(index) as store:
        ids, vecs = zip(*store.iter_vectors())
        ids, vecs = np.concatenate(ids), np.concatenate(vecs)
        rows = store.rows_by_ids(ids.tolist())
    return vecs, [rows[int(i)].path for i in ids]


def labelled_embeddings(folder: Path, settings: dict) -> tuple[np.ndarray, np.ndarray, list[str], float]:
    """Index ``folder`` into a temporary index; return (raw embeddings, labels, paths, seconds)."""
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        rep = index_paths([folder], Path(tmp) / "idx", **settings)  # settings may name the decode workers
        secs = time.perf_counter() - t
        with IndexStore.open(Path(tmp) / "idx") as store:
            ids, vecs = zip(*store.iter_vectors())
            ids, vecs = np.concatenate(ids), np.concatenate(vecs)
            rows = store.rows_by_ids(ids.tolist())
    paths = [rows[int(i)].path for i in ids]
    labels = np.array([Path(p).parent.name for p in paths])
    assert rep.skipped == 0, rep.skipped_files
    return vecs, labels, paths, secs


def _sim(xq: np.ndarray, xd: np.ndarray, metric: str) -> np.ndarray:
    if metric == "cosine":
        return xq @ xd.T
    return -((xq ** 2).sum(1)[:, None] + (xd ** 2).sum(1)[None, :] - 2 * xq @ xd.T)


def _norm(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def ranking(vecs: np.ndarray, metric: str, head=None, qe: int = 0, dba: int = 0) -> np.ndarray:
    """Every item's ranking of all the others (N×(N−1) indices, best first), as the product ranks:
    through the linear head, L2-normalised for cosine, with DBA on the database side and average QE
    on the query side (retrieval/match/search.py)."""
    x = vecs.astype(np.float64)
    if head is not None:
        x = head.apply(x).astype(np.float64)
    if metric == "cosine":
        x = _norm(x)
    db = x
    if dba:
        s = _sim(x, x, metric)
        nb = np.argsort(-s, axis=1, kind="stable")[:, :dba + 1]  # itself and its dba nearest
        db = x[nb].mean(1)
        db = _norm(db) if metric == "cosine" else db
    sim = _sim(x, db, metric)
    np.fill_diagonal(sim, -np.inf)
    if qe:
        top = np.argsort(-sim, axis=1, kind="stable")[:, :qe]
        xq = (x + x[top].sum(1)) / (qe + 1)
        xq = _norm(xq) if metric == "cosine" else xq
        sim = _sim(xq, db, metric)
        np.fill_diagonal(sim, -np.inf)
    return np.argsort(-sim, axis=1, kind="stable")[:, :-1]


class PairVerifier:
    """Geometric verification of (query, candidate) pairs with a memo, and the time it really took."""

    def __init__(self, paths: list[str], cold: bool = True, verifier=None):
        from retrieval.images import load_image
        from retrieval.match.verify import Verifier

        old = os.environ.get("XDG_CACHE_HOME")
        if cold:
            os.environ["XDG_CACHE_HOME"] = tempfile.mkdtemp(prefix="retrieve-bench-")  # measure extraction cold
        self.v = verifier or Verifier()
        os.environ["XDG_CACHE_HOME"] = old or os.path.expanduser("~/.cache")
        self.paths = paths
        t = time.perf_counter()
        self.feats = [self.v.features(p) for p in paths]
        self.extract_ms = 1000 * (time.perf_counter() - t) / len(paths)
        if not cold:  # features from the shared cache: time the extraction itself on a few
            t = time.perf_counter()
            for p in paths[:20]:
                self.v.extract(load_image(p, min_side=self.v.max_side))
            self.extract_ms = 1000 * (time.perf_counter() - t) / len(paths[:20])
        self.memo: dict[tuple[int, int], object] = {}  # (query, candidate) → its Verification
        self.seconds = 0.0
        self.pairs = 0

    def verifications(self, q: int, cands) -> list:
        """Each candidate's Verification against query ``q`` (fresh copies: retrieval.match.verify.weigh sets their
        evidence for one candidate list)."""
        import dataclasses

        todo = [int(c) for c in cands if (q, int(c)) not in self.memo]
        if todo:
            t = time.perf_counter()
            res = self.v.verify_many(self.feats[q], [self.feats[c] for c in todo])
            self.seconds += time.perf_counter() - t
            self.pairs += len(todo)
            for c, r in zip(todo, res):
                self.memo[(q, c)] = dataclasses.replace(r, query_points=r.query_points[:0], result_points=r.result_points[:0])
        return [dataclasses.replace(self.memo[(q, int(c))]) for c in cands]

    def inliers(self, q: int, cands: np.ndarray) -> np.ndarray:
        return np.array([v.inliers for v in self.verifications(q, cands)], dtype=np.int64)

    def ms_per_pair(self) -> float:
        return 1000 * self.seconds / max(self.pairs, 1)


def verified(order: np.ndarray, pv: PairVerifier, k: int) -> np.ndarray:
    """Re-rank each row's top ``k`` with the product's own rule (retrieval.match.verify.rerank)."""
    from retrieval.match.verify import rerank, weigh

    out = order.copy()
    for q in range(len(order)):
        vs = pv.verifications(q, order[q, :k])
        weigh(vs)
        out[q, :k] = rerank(list(order[q, :k]), vs, k)
    return out


def per_query(order: np.ndarray, labels: np.ndarray, is_ref: np.ndarray | None) -> dict[str, np.ndarray]:
    """Each query's R@1, AP@R and AP@10 (NaN where it has no relevant item) and, on the instance set, its
    photo→reference hit (NaN for the references themselves)."""
    rel = labels[order] == labels[:, None]
    aps, ap10 = np.full(len(order), np.nan), np.full(len(order), np.nan)
    for i in range(len(order)):
        R = int((labels == labels[i]).sum()) - 1
        if R == 0:
            continue
        hits = rel[i, :R]
        aps[i] = (np.cumsum(hits) / np.arange(1, R + 1) * hits).sum() / R
        h10 = rel[i, :10]
        ap10[i] = (np.cumsum(h10) / np.arange(1, len(h10) + 1) * h10).sum() / min(R, 10)
    out = {"R@1": rel[:, 0].astype(float), "mAP@R": aps, "mAP@10": ap10}
    if is_ref is not None:  # photo → reference: the first reference in a photo's results is its own
        out["photo→ref R@1"] = np.array([np.nan if is_ref[i] else float(labels[order[i][is_ref[order[i]]][0]] == labels[i])
                                         for i in range(len(order))])
    return out


def metrics(order: np.ndarray, labels: np.ndarray, is_ref: np.ndarray | None) -> dict:
    return {k: float(np.nanmean(v)) for k, v in per_query(order, labels, is_ref).items()}


def cluster_bootstrap(values: np.ndarray, labels: np.ndarray, draws: int = 2000, seed: int = 0) -> np.ndarray:
    """Means of per-query ``values`` (NaN: left out) over ``draws`` resamplings of the classes with replacement
    (queries of one class are not independent: they share their relevant items)."""
    ok = ~np.isnan(values)
    cls, inv = np.unique(labels[ok], return_inverse=True)
    sums, counts = np.bincount(inv, values[ok], len(cls)), np.bincount(inv, minlength=len(cls))
    pick = np.random.default_rng(seed).integers(0, len(cls), (draws, len(cls)))
    return sums[pick].sum(1) / counts[pick].sum(1)


def cosine_scores(x: np.ndarray) -> np.ndarray:
    """All pairs' cosine similarities (the diagonal −inf)."""
    x = _norm(np.asarray(x, np.float64))
    s = x @ x.T
    np.fill_diagonal(s, -np.inf)
    return s


def score_stats(sim: np.ndarray, labels: np.ndarray) -> dict:
    """Readability of the scores: each query's top-1 score, its best relevant item's score ("true match"),
    all pairs of distinct images and the pairs of different classes ("unrelated")."""
    off = ~np.eye(len(sim), dtype=bool)
    same = labels[:, None] == labels[None, :]
    true = np.where(same & off, sim, -np.inf).max(1)
    return {"top1": sim.max(1), "true": true[np.isfinite(true)], "pairs": sim[off], "unrelated": sim[~same]}


def pct(v: np.ndarray) -> str:
    """mean [5th, 95th percentile]"""
    return f"{np.mean(v):.3f} [{np.percentile(v, 5):.3f}, {np.percentile(v, 95):.3f}]"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--datasets", nargs="+", default=["att_faces", "caltech101", "instance"])
    ap.add_argument("--embeddings", nargs="+", default=list(EMBEDDINGS) + list(MULTISCALE),
                    choices=list(EMBEDDINGS) + list(MULTISCALE))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--verify", type=int, nargs="+", default=[20, 60, 100], help="re-ranking depths K to measure")
    ap.add_argument("--deep-everywhere", action="store_true", help="deeper K on every dataset, not only instance")
    ap.add_argument("--name", default="quality", help="results file name (bench/results/NAME.md)")
    ap.add_argument("--from-log", type=Path, nargs="+", default=None,
                    help="re-make the report from runs' printed rows (a run prints one row per line)")
    ap.add_argument("--catalogue", nargs="?", const="", default=None, metavar="INDEX",
                    help="only the photo→catalogue section (bench/catalogue.py), added to bench/results/NAME.md; "
                         "INDEX: an index of the instance set made with --preset instance, to reuse its vectors")
    ap.add_argument("--queries", type=int, default=100, help="with --catalogue: phone photos queried (one per object)")
    ap.add_argument("--centring", action="store_true",
                    help="only the general preset's ranking space: plain cosine against cosine of x − μ, at 224 and "
                         "at the explain resolution (448 squashed); saves bench/results/quality-centring.md")
    ap.add_argument("--sizes", type=int, nargs="+", default=None, metavar="N",
                    help="only the instance head against the collection size: subsets of N images of the instance "
                         "set (whole objects); saves bench/results/quality-sizes.md")
    ap.add_argument("--draws", type=int, default=10, help="with --sizes: random subsets per size (one at the full set)")
    ap.add_argument("--presets", action="store_true",
                    help="only the presets as a user gets them: `retrieve index --preset P` and `retrieve search` of "
                         "every image with the preset's default options, by this tree's CLI and by REV's (--before), "
                         "R@1 and mAP@R side by side; saves bench/results/quality-presets.md")
    ap.add_argument("--before", metavar="REV", default="5531893",
                    help="with --presets: the revision to compare with (its own checkout and CLI) [default: 5531893, "
                         "before issue 27's scores]")
    ap.add_argument("--only-presets", nargs="+", default=None, metavar="PRESET",
                    help="with --presets: only these presets' rows")
    ap.add_argument("--no-verify-on", nargs="*", default=[], metavar="DATASET",
                    help="with --presets: search the instance preset's indexes of these datasets with --verify 0 "
                         "(said in the table), where its default verification would take too long")
    ap.add_argument("--local", nargs="+", default=None, metavar="SIDE:BUDGET",
                    help="only the instance preset's local features at each long side and keypoint budget (e.g. "
                         "640:2000 480:1500): photo→catalogue on the two halves of the instance set (objects in "
                         "sorted order; choose on tune, report held), every phone photo a query; saves "
                         "bench/results/quality-local.md")
    ap.add_argument("--halves", type=Path, default=_common.ROOT / "bench" / ".cache" / "instance-halves",
                    help="with --local: where the two halves are copied (made once)")
    args = ap.parse_args()
    if args.local:
        os.environ["RETRIEVE_THREADS"] = str(args.threads)
        torch.set_num_threads(args.threads)
        return local_section(args)
    if args.presets:
        return presets_section(args)
    if args.centring or args.sizes:
        os.environ["RETRIEVE_THREADS"] = str(args.threads)  # the indexer's ONNX Runtime path reads it
        torch.set_num_threads(args.threads)
        return centring_section(args) if args.centring else sizes_section(args)
    if args.catalogue is not None:
        torch.set_num_threads(args.threads)
        return catalogue_section(args)
    if args.from_log:
        return report([r for p in args.from_log for r in rows_from_log(p)], args.threads, args.name)
    torch.set_num_threads(args.threads)
    folders = dataset_folders(args.datasets)
    if not folders:
        return
    rows = []
    for name, folder in folders.items():
        pv = None
        done = {}
        for ename in args.embeddings:
            if ename in MULTISCALE:
                parts = [done.get(p) or labelled_embeddings(folder, EMBEDDINGS[p]) for p in MULTISCALE[ename]]
                vecs = np.mean([p[0] for p in parts], axis=0)
                labels, paths, secs = parts[0][1], parts[0][2], sum(p[3] for p in parts)
            else:
                warm_exports(folder, EMBEDDINGS[ename])
                done[ename] = labelled_embeddings(folder, EMBEDDINGS[ename])
                vecs, labels, paths, secs = done[ename]
            is_ref = np.array([Path(p).stem == "ref" for p in paths]) if name == "instance" else None
            index_ms = 1000 * secs / len(labels)
            if pv is None:
                pv = PairVerifier(paths)
            assert pv.paths == paths
            heads = {"none": None, "pca-whiten:128": fit_head([vecs], parse_head("pca-whiten:128"))}
            options = [("cosine", "none", 0, 0), ("cosine", "none", 2, 0), ("cosine", "none", 0, 2),
                       ("cosine", "none", 2, 2), ("cosine", "pca-whiten:128", 0, 0),
                       ("cosine", "pca-whiten:128", 2, 0)]
            if ename == "gap-224-squash":
                options.append(("l2", "none", 0, 0))
            for metric, hname, qe, dba in options:
                t = time.perf_counter()
                order = ranking(vecs, metric, heads[hname], qe, dba)
                rank_ms = 1000 * (time.perf_counter() - t) / len(labels)
                ks = [0] + ([k for k in args.verify if k < len(labels)] if metric == "cosine" else [])
                for k in ks:
                    deep = ename in DEEP and (name == "instance" or args.deep_everywhere)
                    if k and k != min(args.verify) and (qe or dba or not deep):
                        continue  # deeper K only where it is informative (verification is costly)
                    o = verified(order, pv, k) if k else order
                    m = metrics(o, labels, is_ref)
                    q_ms = rank_ms + (pv.extract_ms + k * pv.ms_per_pair() if k else 0.0)
                    rows.append([name, ename, metric, hname, qe, dba, k, round(m["R@1"], 3), round(m["mAP@R"], 3),
                                 round(m["mAP@10"], 3), round(m["photo→ref R@1"], 3) if "photo→ref R@1" in m else "-",
                                 round(index_ms + (pv.extract_ms if k else 0), 1), round(q_ms, 1)])
                    print(" | ".join(str(c) for c in rows[-1]), flush=True)
    report(rows, args.threads, args.name)


def dataset_folders(names: list[str]) -> dict[str, Path]:
    folders = {}
    for name in names:
        if name == "instance":
            from instance_set import build

            src = _common.shared_dataset("caltech101")
            if src is not None:
                folders[name] = build(src, _common.ROOT / "bench" / ".cache" / "instance")
        elif (f := _common.shared_dataset(name)) is not None:
            folders[name] = f
    return folders


def _command(args, extra: str) -> str:
    ds = "" if args.datasets == ["att_faces", "caltech101", "instance"] else " --datasets " + " ".join(args.datasets)
    return f"python bench/quality.py {extra}{ds} --threads {args.threads}"


def centring_section(args) -> None:
    """The general preset's ranking space (issue 27, "one number"): today it ranks by the plain cosine of
    224 px GAP embeddings, while its maps decompose the cosine of x − μ at 448 px (squashed, μ the
    collection's mean there). R@1, mAP@R, mAP@10 (photo→ref R@1 on the instance set), the scores' spread,
    and the embedding time per image at each size, through the real indexing path."""
    folders = dataset_folders(args.datasets)
    if not folders:
        return
    embs = {"gap-224-squash": EMBEDDINGS["gap-224-squash"], "gap-448-squash": EXPLAIN_448}
    configs = [("(a) plain cosine, 224 (today)", "gap-224-squash", None),
               ("(b) cosine of x − μ, 224", "gap-224-squash", "all"),
               ("(b') cosine of x − μ, 224, μ of 128 sampled photos", "gap-224-squash", "sample"),
               ("(c) cosine of x − μ, 448 (what the maps decompose)", "gap-448-squash", "all"),
               ("(d) plain cosine, 448", "gap-448-squash", None)]
    rows, srows, trows, sizes = [], [], [], {}
    load0 = os.getloadavg()
    for name, folder in folders.items():
        got, cpu = {}, {}
        for e, st in embs.items():
            warm_exports(folder, st)
            c = time.process_time()
            got[e] = labelled_embeddings(folder, dict(st, workers=args.threads))
            cpu[e] = time.process_time() - c
        labels, paths = got["gap-224-squash"][1], got["gap-224-squash"][2]
        assert got["gap-448-squash"][2] == paths
        sizes[name] = (len(labels), len(set(labels)))
        is_ref = np.array([Path(p).stem == "ref" for p in paths]) if name == "instance" else None
        trows.append([name, len(labels)] + [round(1000 * got[e][3] / len(labels), 1) for e in embs]
                     + [round(1000 * cpu[e] / len(labels), 1) for e in embs]
                     + [round(cpu["gap-448-squash"] / cpu["gap-224-squash"], 2)])
        base = None
        for cname, e, centre in configs:
            x = got[e][0].astype(np.float64)
            if centre == "all":
                x = x - x.mean(0)
            elif centre == "sample":  # as the index stores it (retrieval/reference.py: up to 128 photos)
                x = x - x[np.random.default_rng(0).choice(len(x), min(128, len(x)), replace=False)].mean(0)
            q = per_query(ranking(x, "cosine"), labels, is_ref)
            base = base or q
            row = [name, cname] + [round(float(np.nanmean(q[k])), 3) for k in ("R@1", "mAP@R", "mAP@10")]
            row.append(round(float(np.nanmean(q["photo→ref R@1"])), 3) if is_ref is not None else "-")
            for k in ("R@1", "mAP@R"):  # paired against (a), the classes resampled: 95 % interval
                d = q[k] - base[k]
                lo, hi = np.percentile(cluster_bootstrap(d, labels), [2.5, 97.5])
                row.append("-" if q is base else f"{np.nanmean(d):+.3f} [{lo:+.3f}, {hi:+.3f}]")
            rows.append(row)
            st = score_stats(cosine_scores(x), labels)
            srows.append([name, cname, pct(st["top1"]), pct(st["true"]), pct(st["pairs"]),
                          round(float(np.mean(st["top1"]) - np.mean(st["pairs"])), 3)])
            print(" | ".join(str(c) for c in rows[-1]), "|", " | ".join(str(c) for c in srows[-1][2:]), flush=True)
    load = tuple(round(a, 1) for a in load0[:1] + os.getloadavg()[:1])
    text = ("# The general preset's ranking space: plain cosine or centred, 224 or 448 px\n\n"
            f"`{_command(args, '--centring')}` · efficientnet_lite0, GAP, squashed; {args.threads} thread(s) "
            f"(torch, ONNX Runtime, decoding) · load average {load[0]} → {load[1]} (2 cores, shared machine) · "
            "datasets: " + ", ".join(f"{k} {n} images / {c} classes" for k, (n, c) in sizes.items())
            + ". Every image queries all the others, exact search (bench/quality.py `ranking`).\n\n"
            "μ: the mean of the collection's own raw embeddings at that size (the whole collection; (b') μ of "
            "128 photos drawn at random, as retrieval/reference.py samples the explain reference). Δ vs (a): the "
            "paired difference over the queries, with a 95 % interval from resampling the classes (2000 draws; "
            "a class's queries share their relevant items, so the class is the unit).\n\n")
    text += _common.table(["dataset", "ranking", "R@1", "mAP@R", "mAP@10", "photo→ref R@1", "ΔR@1 vs (a)",
                           "ΔmAP@R vs (a)"], rows)
    text += ("\n\n## Scores: are they readable?\n\nmean [5th, 95th percentile] over the queries of the top-1 "
             "score (the rank-1 result's cosine, whatever it is) and of the best relevant item's score (the "
             "true match), and over all pairs of distinct images (random pairs). gap = mean top-1 − mean "
             "random pair.\n\n")
    text += _common.table(["dataset", "ranking", "top-1 score", "true match score", "random pairs", "gap"], srows)
    text += ("\n\n## Embedding time\n\nms per image through the real indexing path (decode, preprocess, "
             f"network, store), {args.threads} thread(s), ONNX graphs exported beforehand: wall clock (which the "
             "shared machine's load inflates) and this process's CPU time.\n\n")
    text += _common.table(["dataset", "images", "224 wall ms/img", "448 wall ms/img", "224 CPU ms/img",
                           "448 CPU ms/img", "448 / 224 (CPU)"], trows)
    _common.save(args.name if args.name != "quality" else "quality-centring", text)


def _whiten(x: np.ndarray, dim: int, shrink: float):
    """PCA-whitening to ``dim`` fitted on ``x`` at any size, scaled by ``(λ + shrink·λ̄)^-1/2``: the pca-whiten head as
    5531893's retrieval/head.py fitted it with a given shrinkage (today's fit_head picks its shrinkage and its kind
    from the collection's size, which these variants hold fixed)."""
    from retrieval.index.head import LinearHead

    x = np.asarray(x, np.float64)
    mean = x.mean(0)
    cov = x.T @ x / len(x) - np.outer(mean, mean)
    lam, vec = np.linalg.eigh(cov)
    order = np.argsort(lam)[::-1]
    d = max(1, min(dim, len(x) - 1, len(lam)))
    lam, vec = np.maximum(lam[order[:d]], 0), vec[:, order[:d]]
    return LinearHead(mean=mean, proj=(vec / np.sqrt(lam + shrink * lam.mean() + 1e-12)).T, fitted_on=len(x))


def sizes_section(args) -> None:
    """The instance preset's head against the collection's size (issue 27, "small collections"): subsets of
    whole objects of the instance set, global embedding only (no verification)."""
    import shutil

    from instance_set import build, spare

    from retrieval.index import head as head_module

    src = _common.shared_dataset("caltech101")
    if src is None:
        return
    folder = build(src, _common.ROOT / "bench" / ".cache" / "instance")
    ext_dir = _common.ROOT / "bench" / ".cache" / "spare"
    photos = spare(src)
    if not ext_dir.is_dir() or sum(1 for _ in ext_dir.rglob("*.jpg")) != len(photos):
        shutil.rmtree(ext_dir, ignore_errors=True)
        for p in photos:
            (ext_dir / p.parent.name).mkdir(parents=True, exist_ok=True)
            shutil.copyfile(p, ext_dir / p.parent.name / p.name)
    st = dict(EMBEDDINGS["gem-448-long"], workers=args.threads)
    load0 = os.getloadavg()
    warm_exports(folder, st)
    vecs, labels, paths, _ = labelled_embeddings(folder, st)
    warm_exports(ext_dir, st)
    ext = labelled_embeddings(ext_dir, st)[0]
    is_ref = np.array([Path(p).stem == "ref" for p in paths])
    cfg = parse_head("pca-whiten:128")
    dim = cfg["dim"]
    ext_head, ext_mean = _whiten(ext, dim, 0.1), ext.astype(np.float64).mean(0)
    objects = np.unique(labels)
    per = len(labels) // len(objects)
    res: dict = {}  # (n, variant) → list of per-draw dicts
    for n in args.sizes:
        k = max(1, n // per)
        full = k >= len(objects)
        rng = np.random.default_rng(n)
        for _ in range(1 if full else args.draws):
            pick = objects if full else rng.choice(objects, k, replace=False)
            m = np.isin(labels, pick)
            x, lab, ref = vecs[m].astype(np.float64), labels[m], is_ref[m]
            small = len(x) < BEFORE_MIN_FIT  # 5531893 fitted no head there
            variants = {SIZES_VARIANTS[0]: None if small else _whiten(x, dim, 0.1),
                        SIZES_VARIANTS[1]: _whiten(x, dim, 0.1) if small else None,
                        SIZES_VARIANTS[8]: fit_head([x], cfg),  # the product's own rule, as an index fits it
                        SIZES_VARIANTS[2]: None, SIZES_VARIANTS[3]: x.mean(0),
                        SIZES_VARIANTS[4]: None if small else _whiten(x, dim, 1.0),
                        SIZES_VARIANTS[5]: None if small else _whiten(x, dim, max(0.1, dim / len(x))),
                        SIZES_VARIANTS[6]: ext_head, SIZES_VARIANTS[7]: ext_mean}
            for vname, h in variants.items():
                if vname == SIZES_VARIANTS[1] and not small:
                    continue
                z = x - h if isinstance(h, np.ndarray) else (h.apply(x) if h is not None else x)
                q = per_query(ranking(z, "cosine"), lab, ref)
                sc = score_stats(cosine_scores(z), lab)
                res.setdefault((len(x), vname), []).append(dict(
                    {k2: float(np.nanmean(v)) for k2, v in q.items()}, q=q, labels=lab,
                    dims=("-" if h is None or isinstance(h, np.ndarray) else "centre" if h.proj is None else h.dim),
                    top1=float(np.median(sc["top1"])), true=float(np.median(sc["true"])),
                    unrelated=float(np.median(sc["unrelated"])), neg=float(np.mean(sc["top1"] <= 0))))
            print(f"n {len(x)}: draw {len(res[(len(x), SIZES_VARIANTS[2])])}", flush=True)

    def ms(vals: list[float], boot=None) -> str:
        if len(vals) > 1:
            return f"{np.mean(vals):.3f} ± {np.std(vals, ddof=1):.3f}"
        return f"{vals[0]:.3f}" + (f" ± {np.std(boot):.3f}" if boot is not None else "")

    rows, drows = [], []
    for (n, vname), ds in res.items():
        one = ds if len(ds) > 1 else None
        cells = []
        for key in ("R@1", "mAP@10", "photo→ref R@1"):
            boot = None if one else cluster_bootstrap(ds[0]["q"][key], ds[0]["labels"])
            cells.append(ms([d[key] for d in ds], boot))
        rows.append([n, len(ds), vname, ds[0]["dims"] if len({str(d["dims"]) for d in ds}) == 1 else "varies"] + cells
                    + [f"{np.mean([d[k] for d in ds]):+.3f}" for k in ("top1", "true", "unrelated")]
                    + [f"{np.mean([d['neg'] for d in ds]):.2f}"])
        cells = []
        for key in ("R@1", "mAP@10"):
            for ref_v in (SIZES_VARIANTS[0], SIZES_VARIANTS[8], SIZES_VARIANTS[2], SIZES_VARIANTS[3]):
                base = res[(n, ref_v)]
                diffs = [d[key] - b[key] for d, b in zip(ds, base)]
                if vname == ref_v:
                    cells.append("-")
                elif len(diffs) > 1:
                    cells.append(f"{np.mean(diffs):+.3f} ± {np.std(diffs, ddof=1) / np.sqrt(len(diffs)):.3f}")
                else:
                    boot = cluster_bootstrap(ds[0]["q"][key] - base[0]["q"][key], ds[0]["labels"])
                    cells.append(f"{diffs[0]:+.3f} ± {np.std(boot):.3f}")
        drows.append([n, vname.split(")")[0] + ")"] + cells)
    load = tuple(round(a, 1) for a in load0[:1] + os.getloadavg()[:1])
    text = ("# The instance head against the collection's size\n\n"
            f"`python bench/quality.py --sizes {' '.join(map(str, args.sizes))} --draws {args.draws} --threads "
            f"{args.threads}` · efficientnet_lite0, 448 px long side, GeM p = 3 (the instance preset's embedding), "
            f"{args.threads} thread(s) · load average {load[0]} → {load[1]} · instance set {len(labels)} images "
            f"({len(objects)} objects × {per}: 1 reference + {per - 1} synthetic phone photos); spare sample "
            f"{len(ext)} Caltech-101 photos of the same 100 categories used neither as an object nor as a "
            "background (bench/instance_set.py `spare`). Global embedding only, no geometric verification.\n\n"
            f"Each size n: n / {per} objects drawn at random (whole objects), {args.draws} draws (1 at the full set); "
            "every image queries the other n − 1. Cells: mean ± sd over the draws (at the full set: ± the sd from "
            "resampling its objects, 2000 draws). Head dims: min(128, n − 1); '-' = no head; centre = centring "
            f"only. (i) is what `--preset instance` did before issue 27 (5531893): below {BEFORE_MIN_FIT} vectors no "
            "head (= (ii)), above whitening with shrinkage 0.1; (i') fits there anyway, to show the trend. (s) is "
            "what it does now, fitted by the product's own code (retrieval.index.head.fit_head on the subset): "
            f"below MIN_CENTRE = {head_module.MIN_CENTRE} vectors no head, below MIN_WHITEN = "
            f"{head_module.MIN_WHITEN} centring only (= (iii)), from there whitening with shrinkage max("
            f"{head_module.SHRINK}, 128/n) (= (iv')). (i'), (iv), (iv') and (v) are fitted here as 5531893 fitted "
            "its head (bench/quality.py `_whiten`). Scores: the mean over the draws "
            "of the median rank-1 score (top-1), of the median score of each query's best relevant item (true "
            "match) and of the median score of pairs of different objects (unrelated); top-1 ≤ 0: the share "
            "of queries whose rank-1 score is zero or negative.\n\n")
    text += _common.table(["n", "draws", "ranking", "head dims", "R@1", "mAP@10", "photo→ref R@1", "top-1 score",
                           "true match", "unrelated", "top-1 ≤ 0"], rows)
    text += ("\n\n## Paired differences\n\nThe same subsets ranked two ways: mean difference ± its standard error "
             "over the draws (at the full set: ± the sd from resampling the objects).\n\n")
    text += _common.table(["n", "ranking", "ΔR@1 vs (i)", "ΔR@1 vs (s)", "ΔR@1 vs (ii)", "ΔR@1 vs (iii)",
                           "ΔmAP@10 vs (i)", "ΔmAP@10 vs (s)", "ΔmAP@10 vs (ii)", "ΔmAP@10 vs (iii)"], drows)
    _common.save(args.name if args.name != "quality" else "quality-sizes", text)



# -- the presets as a user gets them, this tree against another revision (--presets) -----------------------------
PRESET_SETS = {"general": ("att_faces", "caltech101", "instance"), "instance": ("att_faces", "caltech101", "instance"),
               "faces": ("att_faces",)}
FACES_SKIPPED = ("the faces preset runs on att_faces only: caltech101 and the instance set are photos of objects and "
                 "categories, not of people (the faces HOG finds in Caltech's Faces category are no identity test: "
                 "the category's photos show different people)")
_CLI = ("import sys, retrieval, cli; sys.stderr.write('quality.py: retrieval from ' + retrieval.__file__ + '\\n'); "
        "sys.argv[0] = 'retrieve'; cli.main()")


def _cli(root: Path, cache: Path, threads: int, *args: str) -> tuple[str, str, float]:
    """``retrieve ARGS`` by the checkout at ``root`` (its own ``cli.main``, ``retrieval`` imported from ``root``:
    checked in the same process, which writes where it imported ``retrieval`` from), with its own XDG cache:
    (stdout, that path, seconds). A non-zero exit is an error unless stdout holds JSON lines (a faces search says
    which photos had no face and exits 1)."""
    env = {**os.environ, "PYTHONPATH": str(root), "XDG_CACHE_HOME": str(cache), "RETRIEVE_THREADS": str(threads),
           "OMP_NUM_THREADS": str(threads)}
    t = time.perf_counter()
    p = subprocess.run([sys.executable, "-c", _CLI, "--threads", str(threads), *args], cwd=root, env=env,
                       capture_output=True, text=True, check=False)
    secs = time.perf_counter() - t
    where = next((ln.split("retrieval from ", 1)[1] for ln in p.stderr.splitlines()
                  if ln.startswith("quality.py: retrieval from ")), "")
    if not Path(where).resolve().is_relative_to(Path(root).resolve()):
        raise SystemExit(f"retrieve {args[0]} ({root}) imported retrieval from {where or '?'}, not from its checkout")
    if p.returncode and not (p.stdout.strip() and args[0] == "search"):
        raise SystemExit(f"retrieve {' '.join(args[:2])} ({root}): {p.stderr.strip()[-800:]}")
    return p.stdout, where, secs


def cli_answers(out: str) -> dict[str, dict]:
    """``retrieve search --json`` lines → {query path: {"label", "hits" (result paths, each photo once, the query's
    own photo left out), "error", "verified"}}."""
    got = {}
    for line in out.splitlines():
        r = json.loads(line)
        q = os.path.realpath(r["query"])
        hits = []
        for h in r.get("results") or []:
            hp = os.path.realpath(h["path"])
            if hp != q and hp not in hits:
                hits.append(hp)
        got[q] = {"label": Path(q).parent.name, "hits": hits, "error": r.get("error"),
                  "verified": any("inliers" in h for h in r.get("results") or [])}
    return got


def cli_per_query(got: dict[str, dict], queries: list[str]) -> dict[str, np.ndarray]:
    """R@1 and AP@R of each query (as :func:`per_query` defines them: R = the query's class size − 1 among the
    queries, every image of the set being one; a query with no answer, e.g. no face found, scores 0)."""
    labels = np.array([got[q]["label"] for q in queries])
    size = {lab: int(c) for lab, c in zip(*np.unique(labels, return_counts=True))}
    r1, aps, ap10 = np.zeros(len(queries)), np.full(len(queries), np.nan), np.full(len(queries), np.nan)
    for i, q in enumerate(queries):
        R = size[labels[i]] - 1
        rel = np.array([Path(h).parent.name == labels[i] for h in got[q]["hits"]], bool)
        r1[i] = float(rel[:1].any())
        if R:
            hits = rel[:R]
            aps[i] = float((np.cumsum(hits) / np.arange(1, len(hits) + 1) * hits).sum() / R) if len(hits) else 0.0
            h10 = rel[:10]
            ap10[i] = float((np.cumsum(h10) / np.arange(1, len(h10) + 1) * h10).sum() / min(R, 10)) if len(h10) else 0.0
    return {"R@1": r1, "mAP@R": aps, "mAP@10": ap10, "labels": labels}


def presets_section(args) -> None:
    """Each preset (retrieval.presets) on each set it has, as a user gets it: `retrieve index DIR --preset P` and
    `retrieve search DIR --json` (every image a query, its own row excluded, the preset's default search options)
    by this tree's CLI and by REV's (a git worktree, its own CLI), one after the other per row; R@1 and mAP@R
    before | after | Δ (95 % interval, the classes resampled), and how many queries' top-1 changed."""
    import contextlib
    import shlex
    import shutil

    folders = dataset_folders(args.datasets)
    if not folders:
        return
    load0 = os.getloadavg()
    t_all = time.perf_counter()
    rows, seen = [], {}
    with tempfile.TemporaryDirectory(prefix="retrieve-presets-") as tmp, contextlib.ExitStack() as stack:
        tmp = Path(tmp)
        before_root = stack.enter_context(_common.worktree(args.before, tmp / "before"))
        trees = {"before": before_root, "now": _common.ROOT}
        revs = {k: subprocess.run(["git", "-C", str(r), "rev-parse", "--short", "HEAD"], capture_output=True,
                                  text=True, check=True).stdout.strip() for k, r in trees.items()}
        dirty = [ln[3:] for ln in subprocess.run(["git", "-C", str(_common.ROOT), "status", "--porcelain",
                                                  "--untracked-files=no"], capture_output=True, text=True,
                                                 check=True).stdout.splitlines()]
        caches = {}
        for k in trees:  # each tree its own cache (local features are not shared), seeded with the ONNX graphs
            caches[k] = tmp / f"cache-{k}"
            graphs = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "retrieve" / "onnx"
            if graphs.is_dir():
                shutil.copytree(graphs, caches[k] / "retrieve" / "onnx")
        for preset, sets in PRESET_SETS.items():
            if args.only_presets and preset not in args.only_presets:
                continue
            for name in sets:
                if name not in folders:
                    continue
                folder = folders[name]
                search_args = ["--verify", "0"] if preset == "instance" and name in args.no_verify_on else []
                res, secs = {}, {}
                for k, root in trees.items():
                    idx = tmp / f"{preset}-{name}-{k}"
                    _, where, s_index = _cli(root, caches[k], args.threads, "index", str(folder), "--preset", preset,
                                             "--index", str(idx), "--json")
                    seen.setdefault(k, set()).add(where)
                    out, where, s_search = _cli(root, caches[k], args.threads, "search", str(folder), "--index",
                                                str(idx), "--json", *search_args)
                    seen[k].add(where)
                    res[k], secs[k] = cli_answers(out), (s_index, s_search)
                    shutil.rmtree(idx, ignore_errors=True)
                queries = sorted(res["now"])
                assert sorted(res["before"]) == queries, "the two trees answered different queries"
                q = {k: cli_per_query(res[k], queries) for k in trees}
                labels = q["now"]["labels"]
                row = [preset, name, len(queries)]
                for key in ("R@1", "mAP@R", "mAP@10"):
                    d = q["now"][key] - q["before"][key]
                    lo, hi = np.percentile(cluster_bootstrap(d, labels), [2.5, 97.5])
                    row += [f"{np.nanmean(q['before'][key]):.3f}", f"{np.nanmean(q['now'][key]):.3f}",
                            f"{np.nanmean(d):+.4f} [{lo:+.3f}, {hi:+.3f}]"]
                top = {k: [(res[k][p]["hits"] or [None])[0] for p in queries] for k in trees}
                changed = [i for i in range(len(queries)) if top["before"][i] != top["now"][i]]
                right = sum(1 for i in changed if q["now"]["R@1"][i] > q["before"]["R@1"][i])
                wrong = sum(1 for i in changed if q["now"]["R@1"][i] < q["before"]["R@1"][i])
                row.append(f"{len(changed)} ({right} / {wrong})")
                unanswered = [sum(1 for p in queries if not res[k][p]["hits"]) for k in trees]
                verified = [sum(1 for p in queries if res[k][p]["verified"]) for k in trees]
                row.append(" / ".join(map(str, unanswered)))
                row.append("--verify 0" if search_args else
                           ("defaults (verified: " + " / ".join(map(str, verified)) + ")") if any(verified)
                           else "defaults")
                row.append(" / ".join(f"{secs[k][0]:.0f} + {secs[k][1]:.0f}" for k in trees))
                row.append(f"{os.getloadavg()[0]:.1f}")
                rows.append(row)
                print(" | ".join(map(str, row)), flush=True)
    if not rows:
        return
    load = tuple(round(a, 1) for a in load0[:1] + os.getloadavg()[:1])
    minutes = (time.perf_counter() - t_all) / 60
    issue27 = args.name == "quality"  # the saved quality-presets.md: issue 27's change (a --name of one's own: another)
    cmd = "python bench/quality.py --presets --before " + shlex.quote(args.before)
    if args.datasets != ["att_faces", "caltech101", "instance"]:
        cmd += " --datasets " + " ".join(args.datasets)
    if args.no_verify_on:
        cmd += " --no-verify-on " + " ".join(args.no_verify_on)
    if args.only_presets:
        cmd += " --only-presets " + " ".join(args.only_presets)
    if not issue27:
        cmd += " --name " + args.name
    cmd += f" --threads {args.threads}"
    where = "; ".join(f"{k} ({revs[k]}{', uncommitted: ' + ', '.join(dirty) if k == 'now' and dirty else ''}): "
                      + ", ".join(sorted(str(w) for w in seen.get(k, ()))) for k in trees)
    text = ((f"# The presets before and after issue 27's scores, as a user gets them\n\n" if issue27 else
             f"# The presets before ({args.before}) and now, as a user gets them\n\n") +
            f"`{cmd}` · {args.threads} thread(s) (`--threads`, RETRIEVE_THREADS, OMP_NUM_THREADS) · load average "
            f"{load[0]} → {load[1]} (2 cores, shared with a test run) · {minutes:.0f} min in all.\n\n"
            "Each row: `retrieve index DIR --preset P --index TMP --json`, then `retrieve search DIR --index TMP "
            "--json` (every image of the set a query, its own row excluded, 10 results, the preset's default search "
            "options: the instance preset verifies the global top 8 and the visual words' top 25 at both "
            "revisions), run by the revision's own CLI from its own checkout (a git worktree, PYTHONPATH and the "
            "working directory set to it, its own XDG cache seeded with the ONNX graphs); each CLI process wrote "
            f"where it imported `retrieval` from — {where}. Before and after of a row ran one after the other.\n\n"
            "R@1: the first result is of the query's class (person, category, object); mAP@R: AP over the top R "
            "results, R = the class's size − 1 (9 on att_faces and caltech101, 4 on the instance set), as "
            "bench/quality.py `per_query` defines them (a photo counted once; a query with no answer — no face "
            "found — scores 0). Δ: after − before, the mean of the paired per-query differences, with a 95 % "
            "interval from resampling the classes (2000 draws); one query of 400 is 0.0025 of R@1, of 1000 "
            "0.001, of 500 0.002. top-1 changed: queries whose first result is another photo after the change "
            "(of them: now right where it was wrong / now wrong where it was right; the rest changed from a right "
            "photo to another right one or from wrong to wrong). no answer: queries without results, before / "
            "after. s: seconds of `index` + `search` before / after (wall clock on a shared machine; secondary).\n\n")
    text += ("What changed (issue 27): general ranked by the plain cosine of 224 px GAP embeddings (no head) and now "
            "by the cosine of embeddings centred on the collection's mean (a `centre` head, fitted at 10 images or "
            "more); instance had PCA-whitening to 128 with shrinkage 0.1 fitted at 32 vectors or more, and now "
            "only centres below 50 vectors and shrinks by max(0.1, D/n); faces ranked by the L2 distance of dlib's "
            "descriptors and now by the cosine of descriptors centred on a fixed mean face "
            "(retrieval/faces/mean_face.json; same-person threshold 0.50). At these sizes (400–1000 images) the "
            "instance head is the shrunk whitening: s = 0.32 at 400, 0.256 at 500, 0.128 at 1000 (0.1 before).\n\n"
             if issue27 else "")
    text += _common.table(["preset", "set", "queries", "R@1 before", "R@1 after", "ΔR@1 [95 %]", "mAP@R before",
                           "mAP@R after", "ΔmAP@R [95 %]", "mAP@10 before", "mAP@10 after", "ΔmAP@10 [95 %]",
                           "top-1 changed (now right / now wrong)",
                           "no answer (before / after)", "search options (verified queries before / after)",
                           "s index + search (before / after)", "load"], rows)
    text += f"\n\nNot measured: {FACES_SKIPPED}.\n"
    _common.save("quality-presets" if issue27 else args.name, text)


HEADERS = ["dataset", "embedding", "metric", "head", "QE", "DBA", "verify K", "R@1", "mAP@R", "mAP@10",
           "photo→ref R@1", "index ms/img", "search ms/query"]


def preset_rows(rows: list[list]) -> list[list]:
    """The rows of each preset (retrieval.presets.PRESETS): the defaults, as they measure."""
    out = []
    for name, p in PRESETS.items():
        if p.per_face:  # its own pipeline: bench/faces.py
            continue
        size = p.input_size or 224
        emb = f"{p.pooling}-{size}-{p.resize}"
        want = (emb, "cosine", p.head or "none", 0, 0, p.search.get("verify", 0))
        out += [[name] + r for r in rows if tuple(str(c) for c in r[1:7]) == tuple(str(c) for c in want)]
    return out


def report(rows: list[list], threads: int, name: str = "quality") -> None:
    text = (f"Retrieval quality of every option, efficientnet_lite0, {threads} threads; every image queries "
            "the rest, exact search.\n\n## The presets (`retrieve index --preset`), as measured below\n\n")
    text += _common.table(["preset"] + HEADERS, preset_rows(rows))
    text += "\n\n## Every option\n\n" + _common.table(HEADERS, rows)
    text += ("\n\nembedding: pooling (gap = average, gem = generalised mean p = 3, rmac = regional max), input "
             "side, squash (square) or long (aspect kept, long side = size); gem-448+320-long = the mean of the "
             "raw 448 and 320 embeddings (multi-scale). head: linear head fitted on the collection (`--head`). "
             "QE: average query expansion with the top N (`search --qe N`). DBA: database-side augmentation "
             "with N neighbours (`search --dba N`). verify K: SIFT + RANSAC re-ranking of the top K (`search "
             "--verify K`; confirmed = at least retrieval.match.verify.MIN_INLIERS distinct inliers); K = 60 and 100 "
             "on the instance set for the presets' embeddings, K = 60 on faces and Caltech for gem-448-long "
             "(a second run: `--datasets caltech101 att_faces --embeddings gem-448-long --verify 20 60 "
             "--deep-everywhere`; the rows of both runs are in bench/results/raw/quality-rows.txt). index ms/img: indexing through the product (decode, "
             "preprocess, network), plus SIFT extraction (cold) when K > 0 — extracted once per image and "
             "cached. search ms/query: ranking in numpy, plus (K > 0) the query's SIFT extraction and K × the "
             "measured cost of verifying one pair with cached features; the query's own embedding (about "
             "index ms/img) is not included. mAP@10: AP of the top 10 over min(R, 10). photo→ref R@1 "
             "(instance): the first reference in a photo's results is its own object's.")
    _common.save(name, text)


def catalogue_section(args) -> None:
    """Photo → catalogue (bench/catalogue.py), as a section of bench/results/NAME.md (other sections kept)."""
    import catalogue
    from threadpoolctl import threadpool_limits

    from instance_set import build

    src = _common.shared_dataset("caltech101")
    if src is None:
        return
    folder = build(src, _common.ROOT / "bench" / ".cache" / "instance")
    if args.catalogue:
        vecs, paths = index_vectors(args.catalogue)
    else:
        vecs, _, paths, _ = labelled_embeddings(folder, EMBEDDINGS["gem-448-long"])
    load = os.getloadavg()
    with threadpool_limits(args.threads):

        pv = PairVerifier(paths, cold=False)
        # verified as `retrieve search` verifies: RootSIFT in the 64-d subspace learned with the vocabulary (the same
        # seeded training as catalogue.run's, so the same subspace)
        wi = catalogue._index(pv.feats, np.arange(len(paths)))
        pv.v.projection = wi.vocab.projection
        # the inverted file's scoring before (tf-idf bags, 1f020e9) and now (ASMK*), the same pairs memoised
        rows, build_s = catalogue.run(folder, paths, vecs, pv, args.queries, configs=((60, 0, 0), (60, 30, 20)),
                                      names=("", "tf-idf words, no expansion"), expand=0, words_cls=catalogue.TfIdf)
        rows += catalogue.run(folder, paths, vecs, pv, args.queries, configs=((60, 30, 20),),
                              names=("", f"tf-idf words, expansion {catalogue.EXPAND} (before)"),
                              words_cls=catalogue.TfIdf)[0]
        rows += catalogue.run(folder, paths, vecs, pv, args.queries,
                              configs=((60, 30, 20), (10, 30, 5), (10, 25, 3), (8, 25, 3), (5, 25, 3), (8, 20, 3)),
                              names=("", "ASMK* words, no expansion"), expand=0)[0]
        rows += catalogue.run(folder, paths, vecs, pv, args.queries, configs=((60, 30, 20), (10, 30, 5), (8, 25, 3)),
                              names=("", f"ASMK* words, expansion {catalogue.EXPAND}"))[0]
        stages = catalogue.stage_recall(paths, vecs, pv.feats, args.queries)
        grow = catalogue.growth(wi, pv.feats)
    load = tuple(round(a, 1) for a in load + os.getloadavg())
    text = ("## Photo → catalogue (instance set, `--preset instance`)\n\n"
            f"bench/catalogue.py via `python bench/quality.py --catalogue`: {len(paths)} images (100 catalogue "
            f"images + 400 phone photos), {rows[0][catalogue.HEADERS.index('queries')]} phone-photo queries (view1 of each object), {args.threads} "
            f"threads, load average {load[:3]} at the start, {load[3:]} at the end; {pv.ms_per_pair():.1f} ms "
            f"per verified pair, {pv.extract_ms:.0f} ms per query extraction; vocabularies trained in "
            f"{build_s:.0f} s (both). verify K: global shortlist verified; words W: the inverted file's top W "
            "added (confirmed ones only count); catalogue C: the catalogue role (`index --catalogue`, "
            "`search --catalogue C`): the top C catalogue images by the embedding and the top C by words added "
            "(confirmed ones only count). mixed: one index of all 500; within: the same, answers from "
            "the catalogue folder only (`search --within`); catalogue-only: an index of the 100 catalogue "
            "images; with words (W > 0) the 100 catalogue images of within and catalogue-only are within the "
            f"verified whole when they fit the verification budget (K + W + 2 × max(C, {DEPTH}), "
            "retrieval.match.search.whole_budget), as `retrieve search` does; expansion E: the best-confirmed candidate (≥ 20 inliers) "
            "brings its own top E by words and by the embedding, verified against the query (retrieval.match.search "
            "EXPAND; the confirmed count). Words: *tf-idf* = the cosine of tf-idf bags (the inverted file's scoring "
            "before, bench/catalogue.py TfIdf); *ASMK\\** = the selective match kernel on per-word residual "
            "signatures (retrieval/match/words.py). The same vocabulary and the same verified pairs for both. s/query: "
            "ranking + query SIFT + pairs × ms/pair + lookup (not the query's embedding). Verification matches "
            f"RootSIFT in the {pv.v.projection.shape[1]}-d subspace learned with the vocabulary, as "
            "`retrieve search` does.\n\n")
    text += _common.table(catalogue.HEADERS, rows)
    preset = PRESETS["instance"]["search"]
    text += ("\n\nEach candidate stage alone, before verification (bench/catalogue.py stage_recall; the instance "
             f"preset's search verifies the global top {preset['verify']} and the words' top {preset['words']}):\n\n")
    text += _common.table(catalogue.STAGE_HEADERS, stages)
    path = _common.RESULTS / f"{args.name}.md"
    old = path.read_text() if path.exists() else ""
    kept = "(Measured with"  # a hand-written analysis of an earlier run, kept below the new table
    if kept in old and "Inverted-file lookup as the collection grows" in old:
        at = old.index(kept)
        text += "\n\n" + old[at:old.index("Inverted-file lookup as the collection grows", at)].rstrip()
    text += ("\n\nInverted-file lookup as the collection grows (synthetic bags drawn from the real word "
             "frequencies; 2000 SIFT keypoints per image):\n\n")
    text += _common.table(["images", "inverted file built s", "lookup ms/query"], grow)
    marker = "## Photo → catalogue"
    if marker in old:
        old = old[:old.index(marker)].rstrip() + "\n"
    path.write_text(old.rstrip() + "\n\n" + text + "\n")
    print(text)
    print(f"\nsaved {path.relative_to(_common.ROOT)}")


def instance_halves(folder: Path, dest: Path) -> dict[str, Path]:
    """The instance set's objects (sorted) split in two, copied once into ``dest``: ``tune`` (the first half, where
    settings are chosen) and ``held`` (the second, where the choice is reported)."""
    import shutil

    objects = sorted(p for p in folder.iterdir() if p.is_dir())
    out = {"tune": dest / "tune", "held": dest / "held"}
    if not out["held"].is_dir():
        for i, d in enumerate(objects):
            shutil.copytree(d, out["tune" if i < len(objects) // 2 else "held"] / d.name)
    return out


def local_section(args) -> None:
    """The instance preset's search (verify K 8, words W 25, catalogue C 3: bench/catalogue.py) with local features
    extracted at each ``--local`` SIDE:BUDGET, on each half of the instance set: R@1, mAP@10, photo → catalogue,
    --within, catalogue-only, every phone photo (views 1-4) a query; extraction CPU ms per photo (one thread)."""
    import resource

    import catalogue
    from threadpoolctl import threadpool_limits

    from instance_set import build
    from retrieval.match.verify import Verifier

    src = _common.shared_dataset("caltech101")
    if src is None:
        return
    halves = instance_halves(build(src, _common.ROOT / "bench" / ".cache" / "instance"), args.halves)
    specs = [tuple(int(v) for v in s.split(":")) for s in args.local]
    load0 = os.getloadavg()[0]
    rows = []
    with threadpool_limits(args.threads):
        for half, folder in halves.items():
            vecs, _, paths, _ = labelled_embeddings(folder, EMBEDDINGS["gem-448-long"])
            for side, budget in specs:
                cpu = lambda: sum(resource.getrusage(resource.RUSAGE_SELF)[:2])  # noqa: E731
                c0 = cpu()
                pv = PairVerifier(paths, cold=True, verifier=Verifier(max_side=side, n_features=budget, cache=False))
                ext_ms = 1000 * (cpu() - c0) / len(paths)
                pv.v.projection = catalogue._index(pv.feats, np.arange(len(paths))).vocab.projection
                got, _ = catalogue.run(folder, paths, vecs, pv, 10 ** 6, configs=((8, 25, 3),), names=("", ""),
                                       views=("view1", "view2", "view3", "view4"))
                r = got[0]
                H = catalogue.HEADERS
                kp = np.mean([len(f.points) for f in pv.feats])
                rows.append([half, side, budget, round(ext_ms, 1), round(float(kp)), r[H.index("queries")]]
                            + [r[H.index(h)] for h in H[6:11]] + [round(pv.ms_per_pair(), 2)])
                print(" | ".join(map(str, rows[-1])), flush=True)
    text = ("# Local features of the instance preset: long side and keypoint budget\n\n"
            f"`python bench/quality.py --local {' '.join(args.local)} --threads {args.threads}` · load average "
            f"{load0:.1f} → {os.getloadavg()[0]:.1f} · the instance set's objects in sorted order split in two "
            "halves of 50 (tune: where the setting is chosen; held: reported), each half its own collection "
            "(50 catalogue images + 200 phone photos), every phone photo a query (200 per half). Search as the "
            "instance preset's defaults (bench/catalogue.py run: verify K 8, words W 25, catalogue C 3, verified "
            "expansion), the vocabulary and matching subspace trained on each setting's own features. extract CPU "
            "ms: process CPU time of the extraction (decode at the side, SIFT) per image, OpenCV's threads "
            "included.\n\n")
    text += _common.table(["half", "side", "budget", "extract CPU ms/img", "keypoints/img", "queries"]
                          + catalogue.HEADERS[6:11] + ["ms/pair"], rows)
    _common.save(args.name if args.name != "quality" else "quality-local", text)


def rows_from_log(path: Path) -> list[list]:
    """Rows as printed while running (``a | b | …``), to re-make the report without re-running."""
    out = []
    for line in Path(path).read_text().splitlines():
        cells = [c.strip() for c in line.split(" | ")]
        if len(cells) == len(HEADERS) and not line.startswith("|"):
            out.append([int(c) if c.isdigit() else (float(c) if c.replace(".", "", 1).isdigit() else c)
                        for c in cells])
    return out


if __name__ == "__main__":
    main()
