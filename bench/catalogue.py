"""Phone photo → catalogue on the instance set: the global shortlist alone against global + visual words.

    python bench/quality.py --catalogue [INDEX] [--queries 100] [--threads 2]   (this module has no command of its own)

The instance set (bench/instance_set.py): 100 objects × (one clean catalogue image ``ref.jpg`` + 4 phone
photos). Queries: one phone photo per object (view1), as the product ranks (retrieval/match/search.py):
global embedding (gem-448-long, pca-whiten:128 fitted on the collection, cosine), the top K verified
(retrieval/match/verify.py), plus, with words W > 0, the top W of the visual-word inverted file
(retrieval/match/words.py) that are not in the top K, plus, with catalogue C > 0 (the index's catalogue
role, ``index --catalogue``), the top C catalogue images by the embedding and the top C by words that are
not among those; a words or catalogue candidate counts only when confirmed.

- mixed: the index holds all 500 images; R@1 (the first result shows the same object), mAP@10 (its 4
  other images), photo→catalogue R@1 (the first catalogue image among the results is its own);
- within: the same index, answers restricted to the catalogue images (``search --within``);
- catalogue-only: an index of the 100 catalogue images alone (head and vocabulary fitted on them).

s/query = ranking + the query's SIFT extraction + pairs × measured ms per verified pair + the inverted
file's lookup (measured). Verification results are memoised per (query, candidate) pair, so the
configurations share their cost. Also: how the inverted-file lookup grows with the collection (synthetic
bags drawn from the real word distribution).
"""
from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np

from retrieval.match import words as W
from retrieval.index.head import fit_head, parse_head
from retrieval.match.search import EXPAND, EXPAND_MIN, whole_budget
from retrieval.match.verify import Verification, rerank, weigh


def _order(x: np.ndarray, q: np.ndarray) -> np.ndarray:
    return np.argsort(-(q @ x.T), axis=1, kind="stable")


class TfIdf(W.WordIndex):
    """The inverted file's scoring before ASMK* (1f020e9): the cosine of tf-idf bags (tf = √count) over the same
    words, every query word's postings read (at 500 images no query comes near the budget), the allowed rows'
    scores masked from the whole collection's."""

    def _inverted(self):
        if self._ivf is None:
            bags = list(self.bags.values())
            ids = np.fromiter(self.bags.keys(), np.int64, len(bags))
            lens = np.fromiter((len(b[1]) for b in bags), np.int64, len(bags))
            words = np.concatenate([b[1] for b in bags]).astype(np.int32)
            tf = np.sqrt(np.concatenate([b[2] for b in bags]).astype(np.float32))
            img = np.repeat(np.arange(len(bags), dtype=np.int32), lens)
            df = np.bincount(words, minlength=self.vocab.size).astype(np.float32)
            idf = np.log((len(bags) + 1) / (df + 1)).astype(np.float32)
            w = tf * idf[words]
            norm = np.sqrt(np.bincount(img, w * w, minlength=len(bags))).astype(np.float32)
            order = np.argsort(words, kind="stable")
            ptr = np.zeros(self.vocab.size + 1, np.int64)
            np.cumsum(np.bincount(words, minlength=self.vocab.size), out=ptr[1:])
            self._ivf = (ids, img[order], (w / np.maximum(norm[img], 1e-12))[order].astype(np.float32), ptr, idf, df,
                         None)
        return self._ivf

    def _allowed_part(self, allowed, ivf):
        return None

    def score_bag(self, qw, qn, qs=None, ivf=None, budget=None, part=None):
        ids, post_img, post_w, ptr, idf, df, _ = self._inverted() if ivf is None else ivf
        qw = np.asarray(qw, np.int64)
        keep = df[qw] <= max(W.STOP_SHARE * len(ids), W.STOP_MIN)
        qw, qn = qw[keep], np.asarray(qn)[keep]
        q = np.sqrt(qn.astype(np.float32)) * idf[qw]
        q /= max(float(np.linalg.norm(q)), 1e-12)
        starts, lens = ptr[qw], ptr[qw + 1] - ptr[qw]
        total = int(lens.sum())
        if not total:
            return None
        at = np.repeat(starts - np.concatenate([[0], np.cumsum(lens)[:-1]]), lens) + np.arange(total)
        return np.bincount(post_img[at], post_w[at] * np.repeat(q, lens), minlength=len(ids))


def _index(feats: list, positions: np.ndarray, cls=W.WordIndex) -> W.WordIndex:
    """A word index over ``positions`` (ids = positions), its vocabulary trained on them."""
    rows = {int(p): ("", str(p)) for p in positions}
    get = lambda path, sha: feats[int(sha)]  # noqa: E731
    vocab = W._train(rows, get)
    wi = cls(vocab, len(rows), "bench")
    wi.reconcile(rows, get)
    return wi


def product_order(q: int, order: np.ndarray, pv, k: int, wl: list[int], pairs: list, early: int = 0,
                  is_cat: np.ndarray | None = None, evidence: bool = True, catalogue: np.ndarray | None = None) -> list[int]:
    """retrieval.match.search.Searcher._verified on a full global order (``order``: candidates best first);
    appends the number of verified pairs to ``pairs``. ``early`` = E > 0 (simulated early exit): the
    candidates are verified 16 at a time, alternately from the global shortlist and the other stages, best
    first, and verification stops after the 16 in which a candidate (with ``is_cat``: a catalogue image)
    reached E inliers; the rest count as not confirmed. ``evidence``: confirmed candidates ranked by evidence
    (retrieval.match.verify.weigh, with ``catalogue``: which images are catalogue images, the index's role), else by
    inliers (before issue 31)."""
    head = [int(c) for c in order[:k]]
    extra = [c for c in wl if c not in set(head)]
    cands = head + extra
    vs = pv.verifications(q, cands)
    inl = np.array([v.inliers for v in vs], np.int64)
    if early and cands:
        pos = {c: j for j, c in enumerate(cands)}
        prio = [c for pair in zip(head + [None] * len(extra), extra + [None] * len(head)) for c in pair
                if c is not None]
        prio = list(dict.fromkeys(prio))
        done = len(prio)
        for at in range(0, len(prio), 16):
            if max((inl[pos[c]] for c in prio[:at + 16] if is_cat is None or is_cat[c]), default=0) >= early:
                done = min(len(prio), at + 16)
                break
        keep = np.zeros(len(cands), bool)
        keep[[pos[c] for c in prio[:done]]] = True
        inl = np.where(keep, inl, 0)
        pairs.append(done)
    else:
        pairs.append(len(cands))
    if early:
        vs = [Verification(int(i)) for i in inl]  # (the rest not confirmed: ranked by inliers)
    if evidence and not early:
        weigh(vs, None if catalogue is None else [bool(catalogue[c]) for c in cands])
    out = rerank(head + extra, vs, len(head) + len(extra))
    conf = {c for c, v in zip(head + extra, vs) if v.confirmed}
    out = [c for c in out if c in head or c in conf]
    taken = set(out)
    return out + [int(c) for c in order[k:] if int(c) not in taken]


def run(folder: Path, paths: list[str], vecs: np.ndarray, pv, n_queries: int = 100,
        configs=((60, 0, 0), (60, 30, 0), (60, 30, 20), (30, 30, 20), (30, 20, 10), (20, 20, 20)),
        before=None, configs_before=((60, 30, 0), (60, 30, 20)),
        names=("before", "now"), expand: int = EXPAND, words_cls=W.WordIndex, evidence=True,
        queries: list[int] | None = None, views: tuple[str, ...] = ("view1",)) -> tuple[list[list], list[list]]:
    """Rows of HEADERS: ``configs`` (K, W, C) with the verifier ``pv``, first ``configs_before`` with ``before``
    (a PairVerifier with the previous verification settings), side by side. ``evidence``: confirmed candidates
    ranked by evidence (retrieval.match.verify.weigh), else by inliers; (False, True): both, a row each. ``queries``: these positions (phone photos)
    instead of the first ``n_queries`` view1 photos."""
    labels = np.array([Path(p).parent.name for p in paths])
    is_ref = np.array([Path(p).stem == "ref" for p in paths])
    if queries is None:  # (default: one per object)
        queries = [i for i, p in enumerate(paths) if Path(p).stem in views][:n_queries]
    refs = np.nonzero(is_ref)[0]
    head = fit_head([vecs], parse_head("pca-whiten:128"))
    x = head.apply(vecs.astype(np.float64)); x /= np.linalg.norm(x, axis=1, keepdims=True)
    hc = fit_head([vecs[refs]], parse_head("pca-whiten:128"))
    xc = hc.apply(vecs.astype(np.float64)); xc /= np.linalg.norm(xc, axis=1, keepdims=True)
    t = time.perf_counter()
    wi_all = _index(pv.feats, np.arange(len(paths)), words_cls)
    wi_cat = _index(pv.feats, refs, words_cls)
    build_s = time.perf_counter() - t
    rows = []
    flags = evidence if isinstance(evidence, (tuple, list)) else (evidence,)
    runs = [(*cfg, before, names[0], ev) for cfg in (configs_before if before is not None else ()) for ev in flags]
    runs += [(*cfg, pv, names[1], ev) for cfg in configs for ev in flags]
    for cfg in runs:
        k, w, c = cfg[:3]
        e = cfg[3] if len(cfg) == 7 else 0  # (K, W, C[, early exit at E inliers])
        pv, which, evidence = cfg[-3], cfg[-2], cfg[-1]
        if len(flags) > 1:
            which = f"{which}{', evidence' if evidence else ', inliers'}"
        res = {"mixed": [], "within": [], "catalogue-only": []}
        pairs = {name: [] for name in res}
        lookup = []
        pairs0 = pv.pairs
        t_rank = 0.0
        for q in queries:
            t = time.perf_counter()
            sims = x[q] @ x.T
            sims[q] = -np.inf
            order = np.argsort(-sims, kind="stable")[:-1]
            t_rank += time.perf_counter() - t
            t = time.perf_counter()
            wl = [c for c, _ in wi_all.search(pv.feats[q].descriptors, w, exclude=[q])] if w else []
            lookup.append(time.perf_counter() - t)
            if c:  # the catalogue role (retrieval/index/catalogue.py): its top C by the embedding and by words
                taken = set(int(i) for i in order[:k]) | set(wl)
                gc = [int(i) for i in order if is_ref[i] and int(i) not in taken][:c]
                taken |= set(gc)
                t = time.perf_counter()
                wc = [i for i, _ in wi_all.search(pv.feats[q].descriptors, c + len(taken), allowed=refs,
                                                  exclude=taken | {q})][:c] if w else []
                lookup[-1] += time.perf_counter() - t
                wl = wl + gc + wc
            if w and expand:  # verified query expansion (retrieval.match.search, EXPAND): the best-confirmed candidate's
                # own top EXPAND by words and by the embedding, verified against the query
                cands = [int(i) for i in order[:k]] + [i for i in wl if i not in set(int(j) for j in order[:k])]
                inl = pv.inliers(q, np.array(cands, np.int64))
                if len(inl) and inl.max() >= EXPAND_MIN:
                    best = cands[int(np.argmax(inl))]
                    taken = set(cands) | {q, best}
                    ew = [i for i, _ in wi_all.search(pv.feats[best].descriptors, expand, exclude=taken)]
                    taken |= set(ew)
                    eg = [int(i) for i in np.argsort(-(x[best] @ x.T), kind="stable") if int(i) not in taken][:expand]
                    wl = wl + ew + eg
            res["mixed"].append(product_order(q, order, pv, k, wl, pairs["mixed"], e, is_ref if c else None,
                                              evidence, is_ref if c else None))
            # with words, a collection within the verification budget is verified whole (retrieval.match.search,
            # whole_budget): here the 100 catalogue images of --within and of the catalogue-only index
            whole = w > 0 and len(refs) <= whole_budget(k, w, c)
            o_within = [c for c in order if is_ref[c]]
            wl_in = [c for c, _ in wi_all.search(pv.feats[q].descriptors, w, allowed=refs, exclude=[q])] if w else []
            res["within"].append(product_order(q, np.array(o_within), pv, len(refs) if whole else k,
                                               [] if whole else wl_in, pairs["within"], e, evidence=evidence,
                                               catalogue=is_ref if c else None))
            oc = refs[np.argsort(-(xc[q] @ xc[refs].T), kind="stable")]
            wl_c = [c for c, _ in wi_cat.search(pv.feats[q].descriptors, w)] if w else []
            res["catalogue-only"].append(product_order(q, oc, pv, len(refs) if whole else k, [] if whole else wl_c,
                                                       pairs["catalogue-only"], e, evidence=evidence))
        n = len(queries)
        mixed = res["mixed"]
        r1 = np.mean([labels[o[0]] == labels[q] for q, o in zip(queries, mixed)])
        ap10 = []
        for q, o in zip(queries, mixed):
            rel = np.array([labels[c] == labels[q] for c in o[:10]], float)
            R = int((labels == labels[q]).sum()) - 1
            ap10.append(float((np.cumsum(rel) / np.arange(1, len(rel) + 1) * rel).sum() / min(R, 10)))
        p2c = np.mean([labels[next(c for c in o if is_ref[c])] == labels[q] for q, o in zip(queries, mixed)])
        within = np.mean([labels[o[0]] == labels[q] for q, o in zip(queries, res["within"])])
        cat = np.mean([labels[o[0]] == labels[q] for q, o in zip(queries, res["catalogue-only"])])
        s_q = {name: t_rank / n + pv.extract_ms / 1000 + float(np.mean(p)) * pv.ms_per_pair() / 1000
               + float(np.mean(lookup)) for name, p in pairs.items()}
        rows.append([which, k, w, c, e or "-", n, round(float(r1), 3), round(float(np.mean(ap10)), 3), round(float(p2c), 3),
                     round(float(within), 3), round(float(cat), 3), round(float(np.mean(pairs["mixed"])), 1),
                     round(1000 * float(np.mean(lookup)), 1), round(s_q["mixed"], 3), round(s_q["within"], 3),
                     round(s_q["catalogue-only"], 3)])
        print(" | ".join(str(c) for c in rows[-1]), flush=True)
    return rows, build_s


def stage_recall(paths: list[str], vecs: np.ndarray, feats: list, n_queries: int = 100, tops=(1, 5, 10, 30)) -> list[list]:
    """Before any verification: how often each candidate stage alone ranks the phone photo's own catalogue image
    within its top n, and what share of the object's 4 other images it holds in its top 10 (the mixed index, the
    query itself left out): the global embedding, tf-idf words (before) and ASMK* words (now), one vocabulary."""
    labels = np.array([Path(p).parent.name for p in paths])
    is_ref = np.array([Path(p).stem == "ref" for p in paths])
    queries = [i for i, p in enumerate(paths) if Path(p).stem in views][:n_queries]  # (default: one per object)
    head = fit_head([vecs], parse_head("pca-whiten:128"))
    x = head.apply(vecs.astype(np.float64))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    asmk = _index(feats, np.arange(len(paths)))
    tfidf = TfIdf(asmk.vocab, asmk.trained_on, "bench")
    tfidf.bags = dict(asmk.bags)
    stages = {"global embedding": lambda q: [int(i) for i in np.argsort(-(x[q] @ x.T), kind="stable") if i != q],
              "tf-idf words (before)": lambda q: [i for i, _ in tfidf.search(feats[q].descriptors, len(paths), exclude=[q])],
              "ASMK* words (now)": lambda q: [i for i, _ in asmk.search(feats[q].descriptors, len(paths), exclude=[q])]}
    rows = []
    for name, ranked in stages.items():
        at = {n: 0 for n in tops}
        share = 0.0
        for q in queries:
            order = ranked(q)
            own = [j for j, c in enumerate(order) if is_ref[c] and labels[c] == labels[q]]
            for n in tops:
                at[n] += bool(own) and own[0] < n
            share += sum(labels[c] == labels[q] for c in order[:10]) / 4
        rows.append([name, len(queries), *[round(at[n] / len(queries), 2) for n in tops], round(share / len(queries), 3)])
        print(" | ".join(map(str, rows[-1])), flush=True)
    return rows


STAGE_HEADERS = ["candidate stage", "queries", "own catalogue image in top 1", "top 5", "top 10", "top 30",
                 "object's other images in top 10"]


HEADERS = ["verification", "verify K", "words W", "catalogue C", "early exit E", "queries", "R@1", "mAP@10", "photo→cat R@1 (mixed)", "photo→cat R@1 (within)",
           "photo→cat R@1 (catalogue-only)", "pairs/query (mixed)", "words lookup ms", "s/query mixed",
           "s/query within", "s/query catalogue-only"]


def growth(wi: W.WordIndex, feats: list, sizes=(1_000, 10_000, 30_000), queries: int = 20, seed: int = 0) -> list[list]:
    """Inverted-file lookup time against collections of synthetic bags: each a real image's bag with
    its words redrawn from the real word frequencies (so the postings are as skewed as real ones)."""
    rng = np.random.default_rng(seed)
    real = list(wi.bags.values())
    allw = np.concatenate([b[1] for b in real]).astype(np.int64)
    out = []
    for n in sizes:
        big = W.WordIndex(wi.vocab, n, "synthetic")
        for i in range(n):
            w = real[i % len(real)][1]
            nw = np.unique(allw[rng.integers(0, len(allw), len(w))]).astype(np.int32)
            big.set(i, "", nw, np.ones(len(nw), np.uint16), rng.integers(0, 2**63, len(nw), dtype=np.uint64))
        t = time.perf_counter()
        big._inverted()
        build = time.perf_counter() - t
        t = time.perf_counter()
        for q in range(queries):
            big.search(feats[q].descriptors, 30)
        out.append([n, round(build, 2), round(1000 * (time.perf_counter() - t) / queries, 1)])
        print(" | ".join(str(c) for c in out[-1]), flush=True)
    return out
