"""Cheap first tests for geometric verification: do they keep every pair the full matcher confirms?

    python bench/cascade_probe.py --index INDEX [--queries 100] [--threads 2]

INDEX: a mixed instance index with the catalogue role (bench/results/catalogue-speed.md). For each phone-photo
query (view1), its real candidates (global top 60 + words top 30 + catalogue 20 + 20, bench/catalogue_speed.py)
are verified by the product's matcher (retrieval/match/verify.py, 64-d, ≥ MIN_INLIERS inliers = confirmed) and by each
cheap first test; a cascade (cheap test, then the full matcher on the pairs that pass) is only worth having when
it drops no confirmed pair and passes few of the others. Tests:

- **words**: tentative correspondences = keypoint pairs that share a visual word (the index's vocabulary, one word
  a keypoint; Philbin et al., CVPR 2007), optionally only those whose 64-d cosine is above a threshold (a
  Hamming-embedding-like filter) and one-to-one (each keypoint keeps its most similar partner); gated by their
  number, or by the inliers of a RANSAC homography on them;
- **low-dim / subset**: the product's own matcher (ratio test, mutual, PROSAC) in the first d of the 64 learned
  dimensions and/or on every s-th query keypoint, gated by its inliers;
- **tf-idf**: the inverted file's score of the pair (free: the words stage computes it for every row).

Writes bench/results/cascade-probe.md.
"""
from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np

import _common
from catalogue_speed import _candidates, instance_index

from retrieval.match import words as W
from retrieval.match.verify import MIN_INLIERS, LocalFeatures, Verifier, _root, project


def _shared_words(qw: np.ndarray, cw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Every (query keypoint, candidate keypoint) pair with the same word."""
    o = np.argsort(cw, kind="stable")
    cs = cw[o]
    lo, hi = np.searchsorted(cs, qw, "left"), np.searchsorted(cs, qw, "right")
    n = hi - lo
    qi = np.repeat(np.arange(len(qw)), n)
    ci = o[np.repeat(lo - np.concatenate([[0], np.cumsum(n)[:-1]]), n) + np.arange(n.sum())]
    return qi, ci


def _one_to_one(qi, ci, cos):
    """Each keypoint on either side keeps its most similar partner."""
    for side in (0, 1):
        o = np.argsort(-cos, kind="stable")
        qi, ci, cos = qi[o], ci[o], cos[o]
        _, first = np.unique(qi if side == 0 else ci, return_index=True)
        keep = np.sort(first)
        qi, ci, cos = qi[keep], ci[keep], cos[keep]
    o = np.argsort(-cos, kind="stable")
    return qi[o], ci[o], cos[o]


def _homography_inliers(v: Verifier, q: LocalFeatures, r: LocalFeatures, qi, ci, method) -> int:
    import cv2

    if len(qi) < 4:
        return 0
    sq = v.max_side / max(max(q.size), v.max_side)
    sr = v.max_side / max(max(r.size), v.max_side)
    a, b = q.points[qi] * sq, r.points[ci] * sr
    _, mask = cv2.findHomography(a, b, method, v.reproj_px, maxIters=500, confidence=0.995)
    if mask is None:
        return 0
    m = mask.ravel().astype(bool)
    return min(len(np.unique(np.rint(a[m] / 2), axis=0)), len(np.unique(np.rint(b[m] / 2), axis=0)))


def main() -> None:
    import cv2
    from threadpoolctl import threadpool_limits

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--index", required=True)
    ap.add_argument("--queries", type=int, default=100)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    ids, vecs, paths, is_ref, queries, x = instance_index(args.index, args.queries)
    v = Verifier()
    stored = W.WordIndex.load(Path(args.index), W.signature(v))
    if stored is None or stored.vocab.projection is None:
        raise SystemExit(f"{args.index}: no current words.npz with a projection (run a search with --words first)")
    wi = W.WordIndex(stored.vocab, stored.trained_on, "probe")  # by position, as _candidates wants
    pos = {int(i): j for j, i in enumerate(ids)}
    for i, b in stored.bags.items():
        wi.set(pos[i], *b)
    proj = stored.vocab.projection
    v.projection = proj
    load0 = os.getloadavg()
    feats = [v.features(p) for p in paths]
    with threadpool_limits(args.threads):
        t = time.perf_counter()
        words = [stored.vocab.quantise(_root(f.descriptors)) for f in feats]
        quantise_ms = 1000 * (time.perf_counter() - t) / len(feats)
        unit = [project(_root(f.descriptors), proj) for f in feats]
        pairs, full, tfidf = [], [], []
        t = time.perf_counter()
        for q in queries:
            cands = _candidates(q, x, is_ref, wi, feats)
            scores = dict(wi.search(feats[q].descriptors, len(paths)))
            for c, r in zip(cands, v.verify_many(feats[q], [feats[c] for c in cands])):
                pairs.append((q, c))
                full.append(r.inliers)
                tfidf.append(scores.get(c, 0.0))
        full_ms = 1000 * (time.perf_counter() - t) / len(pairs)
    confirmed = np.array(full) >= MIN_INLIERS
    tests: dict[str, tuple[list, float]] = {}  # name → (one value per pair, ms per pair)

    def run(name, fn):
        t0 = time.perf_counter()
        vals = [fn(q, c) for q, c in pairs]
        tests[name] = (vals, 1000 * (time.perf_counter() - t0) / len(pairs))
        print(name, round(tests[name][1], 2), "ms/pair", flush=True)

    with threadpool_limits(1):
        def words_test(thr, gate):
            def fn(q, c):
                qi, ci = _shared_words(words[q], words[c])
                if thr is not None:
                    cos = np.einsum("ij,ij->i", unit[q][qi], unit[c][ci])
                    k = cos > thr
                    qi, ci, _ = _one_to_one(qi[k], ci[k], cos[k])
                if gate == "count":
                    return min(len(np.unique(qi)), len(np.unique(ci)))
                method = cv2.USAC_DEFAULT if thr is None else cv2.USAC_PROSAC  # (PROSAC: sorted by cosine)
                return _homography_inliers(v, feats[q], feats[c], qi, ci, method)
            return fn

        for thr in (None, 0.8, 0.88, 0.92):
            for gate in ("count", "RANSAC"):
                label = "all" if thr is None else f"64-d cosine > {thr}, one-to-one"
                run(f"shared words ({label}), {gate}", words_test(thr, gate))

        def low_test(d, stride):
            lv = Verifier(cache=False, projection=np.ascontiguousarray(proj[:, :d]))
            sub = {q: LocalFeatures(feats[q].points[::stride], feats[q].descriptors[::stride], feats[q].size)
                   for q in queries}
            mats = {}

            def fn(q, c):
                if c not in mats:
                    mats[c] = LocalFeatures(feats[c].points, feats[c].descriptors, feats[c].size)
                return lv.verify_many(sub[q], [mats[c]])[0].inliers
            return fn

        for d, stride in ((16, 1), (32, 1), (32, 2), (64, 3)):
            run(f"product matcher, {d} dims, every {stride} query keypoint(s), PROSAC inliers", low_test(d, stride))
    tests["tf-idf score of the pair (×100)"] = ([100 * s for s in tfidf], 0.0)
    out = []
    for name, (vals, ms) in tests.items():
        vals = np.asarray(vals, np.float64)
        for gate in (2, 4, 5, 6, 8, 10):
            keep = vals >= gate
            out.append([name, f"≥ {gate}", f"{int((confirmed & ~keep).sum())} of {int(confirmed.sum())}",
                        round(100 * float(keep.mean()), 1), round(ms, 2)])
    load = tuple(round(a, 1) for a in load0 + os.getloadavg())
    text = (f"Cheap first tests against the full matcher, `python bench/cascade_probe.py --index INDEX --queries "
            f"{args.queries}`: {len(pairs)} pairs ({len(queries)} phone-photo queries × their real candidates), "
            f"{int(confirmed.sum())} confirmed (≥ {MIN_INLIERS} inliers) by the product's matcher at "
            f"{full_ms:.2f} ms a pair (2 threads); the tests' ms a pair on one thread; quantising one image's "
            f"keypoints in the vocabulary: {quantise_ms:.1f} ms. Load average {load[:3]} → {load[3:]}.\n\n")
    text += _common.table(["first test", "passes when", "confirmed pairs dropped", "pairs passed %", "ms/pair"], out)
    _common.save("cascade-probe", text)
    print(text)


if __name__ == "__main__":
    main()
