"""Verification's descriptor matching restricted to cells, against matching every descriptor (a negative result).

    python bench/cellmatch_probe.py --index INDEX [--queries 100] [--threads 2] [--cells 8:0.85 16:0.85 ...]

INDEX: a mixed instance index with the catalogue role and a current words.npz (bench/results/catalogue-speed.md).
Geometric verification (retrieval/match/verify.py) matches each query descriptor against every candidate descriptor:
2000 × ~1250 similarities a pair (one matrix product in BLAS), most of a query's time. Descriptors that match lie
close together, hence almost always in the same or neighbouring cells of a k-means partition — the inverted-file
idea (faiss IVF; Jégou et al., ECCV 2008) applied to one pair. Here a candidate's descriptors are assigned to their
nearest cell of the index vocabulary's top level (117 cells at 500 images, projected into the 64-d matching space)
and sorted by cell; each query descriptor is compared only with those in its PROBES nearest cells; the ratio test
(at RATIO), the mutual check and the order of the matches are verify.py's, computed on those similarities (with
every cell probed this is verify.py's matching). The loops run in numba (without the GIL, in verification's
thread pool): in NumPy the bookkeeping per cell cost more than the arithmetic saved (2.2 ms a pair at 3 probes).

Writes bench/results/cellmatch-probe.md: bench/catalogue.py's quality protocol for each setting, the verification's
wall time per pair, and how many same-object and other-object pairs each confirms.
"""
from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

import _common
import catalogue
from catalogue_speed import instance_index
from quality import PairVerifier

from retrieval.match import words as W
from retrieval.match.verify import MIN_INLIERS, LocalFeatures, Verification, Verifier, one_blas_thread


def cells_of(vocab_top: np.ndarray, projection: np.ndarray) -> np.ndarray:
    """The vocabulary's top-level centres (RootSIFT) projected like the descriptors, back to unit length."""
    c = np.asarray(vocab_top, np.float32) @ np.asarray(projection, np.float32)
    c /= np.maximum(np.linalg.norm(c, axis=1, keepdims=True), 1e-12)
    return np.ascontiguousarray(c, np.float32)


@dataclass
class Prepared:
    """A candidate's matching rows sorted by cell: ``rows[ptr[c]:ptr[c+1]]`` are those in cell c; ``order``
    maps a sorted row back to the features' own row; ``cell`` is each sorted row's cell."""
    rows: np.ndarray  # n × d float32, unit length, sorted by cell
    order: np.ndarray  # n int64
    ptr: np.ndarray  # C + 1 int64
    cell: np.ndarray  # n int32


@dataclass
class Query:
    """A query's matching rows, the ``probes`` cells of each (``cells``, n × probes), and the inverted lists
    (``members[ptr[c]:ptr[c+1]]``: the query rows that probe cell c)."""
    rows: np.ndarray  # n × d float32
    cells: np.ndarray  # n × probes int32
    members: np.ndarray  # int64
    ptr: np.ndarray  # C + 1 int64


def prepare(rows: np.ndarray, cells: np.ndarray) -> Prepared:
    """A candidate's rows (unit length) sorted by their nearest cell."""
    n, C = len(rows), len(cells)
    cell = (rows @ cells.T).argmax(1).astype(np.int32) if n else np.zeros(0, np.int32)
    order = np.argsort(cell, kind="stable").astype(np.int64)
    ptr = np.zeros(C + 1, np.int64)
    np.cumsum(np.bincount(cell, minlength=C), out=ptr[1:])
    return Prepared(np.ascontiguousarray(rows[order], np.float32), order, ptr, cell[order])


def query(rows: np.ndarray, cells: np.ndarray, probes: int) -> Query:
    """A query's rows with their ``probes`` nearest cells (all of them when ``probes`` ≥ the cells)."""
    C = len(cells)
    p = min(probes, C)
    if p >= C:
        qc = np.broadcast_to(np.arange(C, dtype=np.int32), (len(rows), C))
    else:
        qc = np.argpartition(-(rows @ cells.T), p - 1, axis=1)[:, :p]
    qc = np.ascontiguousarray(qc, np.int32)
    flat = qc.ravel()
    order = np.argsort(flat, kind="stable")
    members = (order // p).astype(np.int64)
    ptr = np.zeros(C + 1, np.int64)
    np.cumsum(np.bincount(flat, minlength=C), out=ptr[1:])
    return Query(np.ascontiguousarray(rows, np.float32), qc, members, ptr)


def match(q: Query, b: Prepared, ratio: float, mutual: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """(query rows, candidate rows) of the matches, best first — retrieval.match.verify.Verifier._pair restricted to
    the probed cells: a query row's nearest candidate row passes the ratio test against its second nearest
    (squared distance 2 − 2·similarity; a row that sees fewer than two candidate rows has no match), and with ``mutual`` no other query row that probes the match's cell
    and whose own nearest is another candidate row is nearer to it; sorted by the ratio, ties by query row."""
    top2, rival = _kernels()
    n = len(q.rows)
    if len(b.rows) < 2 or n == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    s1 = np.empty(n, np.float32)
    s2 = np.empty(n, np.float32)
    j1 = np.empty(n, np.int64)
    top2(q.rows, q.cells, b.rows, b.ptr, s1, s2, j1)
    seen = np.nonzero(s2 > -np.inf)[0]  # (a row that saw fewer than two candidate rows has no ratio to test)
    dist1 = np.sqrt(np.maximum(2 - 2 * s1[seen], 0))
    dist2 = np.sqrt(np.maximum(2 - 2 * s2[seen], 0))
    keep = dist1 < ratio * dist2
    good, dist1, dist2 = seen[keep], dist1[keep], dist2[keep]
    if mutual and len(good):
        o = rival(q.rows, b.rows, j1[good], b.cell, q.ptr, q.members, j1)
        keep = o < s1[good]
        good, dist1, dist2 = good[keep], dist1[keep], dist2[keep]
    o = np.argsort(dist1 / np.maximum(dist2, 1e-12), kind="stable")
    good = good[o]
    return good.astype(np.int64), b.order[j1[good]]


def _top2(a, qcells, b, ptr, s1, s2, j1):
    """For each query row i: the two highest similarities with the candidate rows of its probed cells (s1, s2;
    −inf where none) and the row of the highest (j1; −1 where none). Compiled by numba (_kernels)."""
    n, d = a.shape
    p = qcells.shape[1]
    for i in range(n):
        best, second, at = np.float32(-np.inf), np.float32(-np.inf), -1
        for t in range(p):
            c = qcells[i, t]
            for j in range(ptr[c], ptr[c + 1]):
                s = np.float32(0.0)
                for k in range(d):
                    s += a[i, k] * b[j, k]
                if s > best:
                    second, best, at = best, s, j
                elif s > second:
                    second = s
        s1[i], s2[i], j1[i] = best, second, at


def _rival(a, b, jg, cell, qptr, members, j1):
    """For each matched candidate row jg[g]: the highest similarity with it among the query rows that probe its
    cell and whose own nearest is another row (−inf where none): the mutual check's rival. Compiled by numba."""
    d = a.shape[1]
    out = np.empty(len(jg), np.float32)
    for g in range(len(jg)):
        j = jg[g]
        c = cell[j]
        best = np.float32(-np.inf)
        for m in range(qptr[c], qptr[c + 1]):
            r = members[m]
            if j1[r] == j:
                continue
            s = np.float32(0.0)
            for k in range(d):
                s += a[r, k] * b[j, k]
            if s > best:
                best = s
        out[g] = best
    return out


_KERNELS = None


def _kernels():
    """The loops above compiled by numba on first use (and cached on disk by numba: compiled once per install)."""
    global _KERNELS
    if _KERNELS is None:
        try:
            import numba
        except ImportError:
            raise SystemExit("bench/cellmatch_probe.py needs numba: pip install -e '.[bench]'") from None
        jit = numba.njit(nogil=True, cache=True, fastmath=True, boundscheck=False)
        _KERNELS = (jit(_top2), jit(_rival))
    return _KERNELS


class CellVerifier(Verifier):
    """retrieval.match.verify.Verifier whose matching is restricted to ``cells`` (``probes`` per query descriptor)."""

    def __init__(self, cells: np.ndarray, probes: int, **kw):
        super().__init__(**kw)
        self.cells, self.probes = cells, probes

    def verify_many(self, q: LocalFeatures, rs) -> list[Verification]:
        from concurrent.futures import ThreadPoolExecutor

        from retrieval.match.verify import blas_threads

        out = [Verification(0) for _ in rs]
        keep = [i for i, r in enumerate(rs) if len(r.points) >= 4]
        if len(q.points) < 4 or not keep:
            return out
        qc = query(self.matrix(q), self.cells, self.probes)

        def one(i: int) -> Verification:
            key = ("cells", self.probes)
            prep = rs[i].prepared.get(key)
            if prep is None:
                prep = rs[i].prepared[key] = prepare(self.matrix(rs[i]), self.cells)
            qi, ri = match(qc, prep, self.ratio, self.mutual)
            return self._ransac(q, rs[i], qi, ri)

        with one_blas_thread(), ThreadPoolExecutor(max(1, min(blas_threads(), len(keep)))) as pool:
            for i, v in zip(keep, pool.map(one, keep)):
                out[i] = v
        return out


def _pair_counts(pv: PairVerifier, paths: list[str]) -> tuple[int, int, int, int]:
    """(same-object pairs confirmed, of those verified; other pairs confirmed, of those verified)."""
    same = [Path(paths[q]).parent.name == Path(paths[c]).parent.name for q, c in pv.memo]
    conf = [n >= MIN_INLIERS for n in pv.memo.values()]
    return (sum(s and c for s, c in zip(same, conf)), sum(same), sum(c and not s for s, c in zip(same, conf)),
            len(same) - sum(same))


def main() -> None:
    from threadpoolctl import threadpool_limits

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--index", required=True)
    ap.add_argument("--queries", type=int, default=100)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--cells", nargs="+", default=["8:0.85", "8:0.82", "16:0.85", "24:0.85"], metavar="PROBES:RATIO")
    args = ap.parse_args()
    ids, vecs, paths, is_ref, queries, x = instance_index(args.index, args.queries)
    stored = W.WordIndex.load(Path(args.index), W.signature(Verifier()))
    if stored is None or stored.vocab.projection is None:
        raise SystemExit(f"{args.index}: no current words.npz with a projection (run a search with --words first)")
    proj = stored.vocab.projection
    cells = cells_of(stored.vocab.top, proj)
    _kernels()  # compiled (or read from numba's cache) before any clock starts
    trained, index = {}, catalogue._index  # one vocabulary per set of rows for every setting (as the product)

    def _index(feats, positions):
        key = tuple(int(p) for p in positions)
        if key not in trained:
            trained[key] = index(feats, positions)
        return trained[key]

    catalogue._index = _index
    load0 = os.getloadavg()
    with threadpool_limits(args.threads):
        runs = [("every descriptor, ratio 0.85 (the product)",
                 PairVerifier(paths, cold=False, verifier=Verifier(projection=proj)))]
        for spec in args.cells:
            probes, ratio = spec.split(":")
            v = CellVerifier(cells, int(probes), projection=proj, ratio=float(ratio))
            runs.append((f"{probes} of {len(cells)} cells, ratio {ratio}", PairVerifier(paths, cold=False, verifier=v)))
        rows = []
        for name, pv in runs:
            got, _ = catalogue.run(Path(paths[0]).parent.parent, paths, vecs, pv, args.queries,
                                   configs=((60, 30, 20),), names=("", name))
            ts, tn, fs, fn = _pair_counts(pv, paths)
            rows += [r + [round(pv.ms_per_pair(), 2), f"{ts} of {tn}", f"{fs} of {fn}"] for r in got]
    load = tuple(round(a, 1) for a in load0 + os.getloadavg())
    text = (f"Load average {load[:3]} → {load[3:]}. `python bench/cellmatch_probe.py --index INDEX --cells {' '.join(args.cells)}`: "
            f"bench/catalogue.py's protocol, {args.queries} phone-photo queries, K 60, W 30, C 20, every verification in "
            f"this run. ms/pair: the verification's wall time per verified pair ({args.threads} threads, one candidate "
            "per thread), candidates' features in memory, each projected (and sorted by cell) once for the whole run. "
            f"Pairs confirmed (≥ {MIN_INLIERS} inliers): every (query, candidate) pair the row verified, same object / "
            "other object.\n\n")
    text += _common.table(catalogue.HEADERS + ["ms/pair", "same-object pairs confirmed", "other pairs confirmed"], rows)
    _common.save("cellmatch-probe", text)


if __name__ == "__main__":
    main()
