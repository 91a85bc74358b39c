"""Phone photo → catalogue: where a query's time goes, matching in 64 vs 128 dimensions, and growth to 100 k.

    python bench/catalogue_speed.py --index INDEX [--queries 100] [--threads 2] [--sizes 1000 10000 100000]
    python bench/catalogue_speed.py --index INDEX --top   # stages and quality before/now, prepended to the results

INDEX: ``retrieve index bench/.cache/instance --preset instance --index INDEX`` (bench/instance_set.py).
Writes bench/results/catalogue-speed.md with three tables:

1. **Stages of one query** (median over ``--profile`` phone photos, each against its real candidates:
   global top 60 + words top 30 + catalogue 20 + 20): decoding, SIFT, global search, words lookup, loading
   the candidates' keypoints (cached per content, on disk), descriptor matching (one matrix product per 16
   candidates, then the top two and the mutual check), PROSAC. The network's forward pass is left out
   (the same for every preset with this backbone; bench/results/quality.md).
2. **Quality side by side**: bench/catalogue.py's protocol (R@1, mAP@10, photo→catalogue mixed / within /
   catalogue-only) with verification matching RootSIFT in all 128 dimensions (before) and in the 64-d
   subspace learned with the index's vocabulary (now, retrieval/match/words.py ``fit_projection``), in one run.
3. **Growth**: the index's real rows plus synthetic distractors up to ``--sizes`` (global vectors drawn
   from a Gaussian with the real rows' mean and covariance, renormalised; visual-word bags drawn from the
   real word frequencies), each stage timed per query.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import numpy as np

import _common
import catalogue
from quality import PairVerifier

from retrieval.match import words as W
from retrieval.index.store import IndexStore
from retrieval.match.verify import Verifier


def _candidates(q: int, x: np.ndarray, is_ref: np.ndarray, wi: W.WordIndex, feats, k=60, w=30, c=20) -> list[int]:
    """The product's candidates for query ``q``: global top k, words top w, catalogue top c + c."""
    sims = x[q] @ x.T
    sims[q] = -np.inf
    order = np.argsort(-sims, kind="stable")[:-1]
    head = [int(i) for i in order[:k]]
    taken = set(head) | {q}
    wl = [i for i, _ in wi.search(feats[q].descriptors, w, exclude=taken)]
    taken |= set(wl)
    gc = [int(i) for i in order if is_ref[i] and int(i) not in taken][:c]
    taken |= set(gc)
    refs = np.nonzero(is_ref)[0]
    wc = [i for i, _ in wi.search(feats[q].descriptors, c, allowed=refs, exclude=taken)]
    return head + wl + gc + wc


def profile(paths: list[str], x: np.ndarray, is_ref: np.ndarray, wi: W.WordIndex, queries: list[int],
            projection, variants=None) -> list[list]:
    """Per-stage milliseconds of one query (median over ``queries``) for each of ``variants`` (label, projection,
    pool, cache format), the variants interleaved query by query (A, B, A, B ...) so that the load is shared."""
    from concurrent.futures import ThreadPoolExecutor

    from retrieval.images import load_image
    from retrieval.match.verify import _decode, _read_npz, blas_threads

    variants = variants or (("64-d, pool, npz cache, one by one (before)", projection, True, "npz"),
                            ("64-d, pool, raw cache, in threads (now)", projection, True, "raw"))
    vs = [Verifier(projection=proj, pool=pool) for _, proj, pool, _ in variants]
    for v, var in zip(vs, variants):
        for p in paths:  # both formats on disk (and warm in the page cache): each variant reads its own
            sha = _sha(p)
            if not v.cache_file(sha).with_suffix(".npz").is_file():
                f = v.features(p, sha)
                np.savez(v.cache_file(sha).with_suffix(".npz"), points=f.points, descriptors=f.descriptors,
                         size=np.int64(f.size))
            if not v.cache_file(sha).is_file():
                v.features(p, sha)
    feats = [vs[0].features(p) for p in paths]
    t_stage: list[dict[str, list[float]]] = [{} for _ in variants]

    for q in queries:
        cands = _candidates(q, x, is_ref, wi, feats)
        for (label, proj, pool, fmt), v, ts in zip(variants, vs, t_stage):
            def add(name, t0):
                ts.setdefault(name, []).append(1000 * (time.perf_counter() - t0))

            t = time.perf_counter(); img = load_image(paths[q], min_side=v.max_side); add("decode query", t)
            t = time.perf_counter(); qf = v.extract(img); add("query SIFT", t)
            t = time.perf_counter(); sims = x[q] @ x.T; np.argsort(-sims)[:61]; add("global search", t)
            wi._last_bag = None  # (the query's word scores are kept for its next lookup: score it afresh)
            t = time.perf_counter(); _candidates(q, x, is_ref, wi, feats); add("words + catalogue lookup", t)
            files = [v.cache_file(_sha(paths[c])) for c in cands]
            t = time.perf_counter()
            if fmt == "npz":  # as the product read them: one by one, np.load under its lock
                loaded = [_read_npz(f.with_suffix(".npz")) for f in files]
            else:  # format 2, in the verifier's threads, no lock
                with ThreadPoolExecutor(blas_threads()) as pool:
                    loaded = list(pool.map(lambda f: _decode(f.read_bytes()), files))
            add("load candidates' keypoints", t)
            timed_calls: dict[str, list[float]] = {"PROSAC": [], "RootSIFT + projection": []}
            orig_r, orig_m = v._ransac, v.matrices

            def wrap(fn, name):
                def timed(*a, **k):
                    t0 = time.perf_counter()
                    r = fn(*a, **k)
                    timed_calls[name].append(time.perf_counter() - t0)
                    return r
                return timed

            v._ransac, v.matrices = wrap(orig_r, "PROSAC"), wrap(orig_m, "RootSIFT + projection")
            t = time.perf_counter()
            if fmt == "npz":  # as before: every candidate projected in one product before the threads start
                v.matrices([f for f in loaded if len(f.points) >= 4])
            v.verify_many(qf, loaded)
            total = 1000 * (time.perf_counter() - t)
            v._ransac, v.matrices = orig_r, orig_m
            summed = {k: 1000 * sum(c) for k, c in timed_calls.items()}
            ts.setdefault("RootSIFT + projection", []).append(summed["RootSIFT + projection"])
            ts.setdefault("descriptor matching", []).append(total - sum(summed.values()))
            ts.setdefault("PROSAC", []).append(summed["PROSAC"])
            ts.setdefault("(verification wall time)", []).append(total)
            ts.setdefault("pairs", []).append(len(cands))
    rows = []
    for (label, *_), ts in zip(variants, t_stage):
        med = {k: statistics.median(v) for k, v in ts.items()}
        pairs = med.pop("pairs")
        wall = med.pop("(verification wall time)")
        for k, ms in med.items():
            rows.append([label, k, round(ms, 1), round(ms / pairs, 2) if k in PER_PAIR else "-"])
        rows.append([label, "verification (wall: projection + matching + PROSAC)", round(wall, 1),
                     round(wall / pairs, 2)])
        rows.append([label, f"**total** ({pairs:.0f} pairs)", round(sum(med.values()), 1), "-"])
    return rows


PER_PAIR = {"load candidates' keypoints", "RootSIFT + projection", "descriptor matching", "PROSAC"}
_SHAS: dict[str, str] = {}


def _sha(path: str) -> str:
    import hashlib

    if path not in _SHAS:
        _SHAS[path] = hashlib.sha256(Path(path).read_bytes()).hexdigest()
    return _SHAS[path]


def growth(x: np.ndarray, wi: W.WordIndex, feats, sizes, queries: list[int], k=60, w=30, seed=0) -> list[list]:
    """Global search (exact, flat inner product in faiss, as the instance preset) and the words lookup
    against the real rows plus synthetic distractors, per query."""
    import faiss

    rng = np.random.default_rng(seed)
    mu, cov = x.mean(0), np.cov(x.T)
    real = list(wi.bags.values())
    allw = np.concatenate([b[1] for b in real]).astype(np.int64)
    out = []
    for n in sizes:
        extra = max(0, n - len(x))
        syn = rng.multivariate_normal(mu, cov, extra).astype(np.float32) if extra else np.zeros((0, x.shape[1]), np.float32)
        syn /= np.maximum(np.linalg.norm(syn, axis=1, keepdims=True), 1e-12)
        db = np.ascontiguousarray(np.concatenate([x.astype(np.float32), syn]))
        index = faiss.IndexFlatIP(db.shape[1])
        index.add(db)
        big = W.WordIndex(wi.vocab, n, "synthetic")
        for i, b in wi.bags.items():
            big.set(i, *b)
        for i in range(len(x), n):
            ws = real[i % len(real)][1]
            nw = np.unique(allw[rng.integers(0, len(allw), len(ws))]).astype(np.int32)
            big.set(i, "", nw, np.ones(len(nw), np.uint16), rng.integers(0, 2**63, len(nw), dtype=np.uint64))
        t = time.perf_counter()
        big._inverted()
        build = time.perf_counter() - t
        tg, tw = [], []
        for q in queries:
            t = time.perf_counter(); index.search(db[q:q + 1], k + 1); tg.append(time.perf_counter() - t)
            t = time.perf_counter(); big.search(feats[q].descriptors, w); tw.append(time.perf_counter() - t)
        out.append([n, round(1000 * statistics.median(tg), 2), round(1000 * statistics.median(tw), 1), round(build, 1)])
        print(" | ".join(str(c) for c in out[-1]), flush=True)
        del big, index, db, syn
    return out


def instance_index(index: str, n_queries: int):
    """An index of the instance set: its row ids and raw vectors, paths, which rows are catalogue images (``ref``), the first
    ``n_queries`` phone photos (``view1``) as queries, and the vectors in the preset's space (pca-whiten:128 fitted
    on them, unit length)."""
    from retrieval.index.head import fit_head, parse_head

    with IndexStore.open(index) as store:
        ids, vecs = zip(*store.iter_vectors())
        ids, vecs = np.concatenate(ids), np.concatenate(vecs)
        rows = store.rows_by_ids(ids.tolist())
    paths = [rows[int(i)].path for i in ids]
    is_ref = np.array([Path(p).stem == "ref" for p in paths])
    queries = [i for i, p in enumerate(paths) if Path(p).stem == "view1"][:n_queries]
    x = fit_head([vecs], parse_head("pca-whiten:128")).apply(vecs.astype(np.float64))
    x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
    return ids, vecs, paths, is_ref, queries, x


def main() -> None:
    from threadpoolctl import threadpool_limits

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--index", required=True, help="an index of bench/.cache/instance, --preset instance")
    ap.add_argument("--queries", type=int, default=100)
    ap.add_argument("--profile", type=int, default=10, help="phone photos profiled stage by stage")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--sizes", type=int, nargs="*", default=[1000, 10_000, 100_000])
    ap.add_argument("--skip-quality", action="store_true", help="only the stages and the growth tables")
    ap.add_argument("--now-only", action="store_true", help="the quality table without the 128-d rows")
    ap.add_argument("--growth-only", action="store_true",
                    help="only the growth table, replacing the one in bench/results/catalogue-speed.md")
    ap.add_argument("--top", action="store_true",
                    help="only the stage profile (before vs now, interleaved) and the default configuration's quality "
                         "(before vs now), as a new section at the top of bench/results/catalogue-speed.md")
    args = ap.parse_args()
    ids, vecs, paths, is_ref, queries, x = instance_index(args.index, args.queries)
    load0 = os.getloadavg()
    with threadpool_limits(args.threads):
        import faiss

        faiss.omp_set_num_threads(args.threads)
        exact = PairVerifier(paths, cold=False)  # (the pool: the same matches as before, sooner)
        wi = catalogue._index(exact.feats, np.arange(len(paths)))  # vocabulary + projection, as the product
        proj = wi.vocab.projection
        if args.growth_only:
            grow = growth(x, wi, exact.feats, args.sizes, queries[:20])
            load = tuple(round(a, 1) for a in load0 + os.getloadavg())
            path = _common.RESULTS / "catalogue-speed.md"
            text = path.read_text()
            at = text.index(GROWTH)
            path.write_text(text[:at] + _growth_text(grow, load) + "\n")
            return
        if args.top:
            return _top(args, paths, vecs, x, is_ref, wi, queries, proj, load0)
        stages = profile(paths, x, is_ref, wi, queries[:args.profile], proj)
        print(stages, flush=True)
        quality = []
        if not args.skip_quality:
            now = PairVerifier(paths, cold=False, verifier=Verifier(projection=proj))
            quality, _ = catalogue.run(Path(paths[0]).parent.parent, paths, vecs, now, args.queries,
                                       configs=((60, 30, 20), (60, 30, 20, 30), (60, 30, 20, 60),
                                                (60, 30, 20, 100), (60, 30, 0), (30, 30, 20)),
                                       before=None if args.now_only else exact,
                                       configs_before=((60, 30, 20), (60, 30, 0)),
                                       names=("128-d (before)", "64-d (now)"))
            for r in quality:  # the measured ms per verified pair of each
                r.append(round((exact if r[0].startswith("128") else now).ms_per_pair(), 2))
        grow = growth(x, wi, exact.feats, args.sizes, queries[:20])
    load = tuple(round(a, 1) for a in load0 + os.getloadavg())
    text = (f"Phone photo → catalogue on the instance set (bench/instance_set.py, 500 images), `python "
            f"bench/catalogue_speed.py --index INDEX` (INDEX: `retrieve index bench/.cache/instance --preset "
            f"instance`); {args.threads} threads; load average {load[:3]} at the start, {load[3:]} at the end "
            f"(the machine is shared: absolute times are inflated by the load, compare rows of one table).\n\n")
    text += ("## Stages of one query\n\nMedian over the first " f"{args.profile} phone-photo queries, each against "
             "its real candidates (global top 60 + words top 30 + catalogue 20 + 20, as `search` on an index "
             "with a catalogue). The network's forward pass for the query embedding is not included.\n\n")
    text += _common.table(["matching", "stage", "ms/query", "ms/pair"], stages)
    if quality:
        text += ("\n## Quality and cost: matching in 128 vs 64 dimensions\n\nbench/catalogue.py's protocol "
                 "(bench/results/quality.md, \"Photo → catalogue\"), both in this run; the 64-d subspace is learned "
                 "with the mixed index's vocabulary (also used for the catalogue-only rows). ms/pair: measured cost "
                 "of one verified pair (features in memory).\n\n")
        text += _common.table(catalogue.HEADERS + ["ms/pair"], quality)
    text += "\n" + _growth_text(grow, load)
    _common.save("catalogue-speed", text)


class _ProjectedFirst(Verifier):
    """The verification before format 2 and threaded loading: every candidate projected in one product on the
    calling thread, then the pool (the same matching otherwise)."""

    def verify_many(self, q, rs):
        self.matrices([r for r in rs if len(r.points) >= 4])
        return super().verify_many(q, rs)


def _ratios(stages: list[list]) -> list[list]:
    """Rows (stage, before ms, now ms, before / now) from the profile's rows of its two variants."""
    labels = list(dict.fromkeys(r[0] for r in stages))
    by = [{r[1]: r[2] for r in stages if r[0] == lab} for lab in labels[:2]]
    return [[k, by[0][k], by[1][k], round(by[0][k] / by[1][k], 2) if by[1][k] else "-"] for k in by[0] if k in by[1]]


def _top(args, paths, vecs, x, is_ref, wi, queries, proj, load0) -> None:
    """``--top``: stages before/now interleaved, the default configuration's quality before/now, prepended."""
    import datetime
    import platform

    stages = profile(paths, x, is_ref, wi, queries[:args.profile], proj)
    print(stages, flush=True)
    before = PairVerifier(paths, cold=False, verifier=_ProjectedFirst(projection=proj))
    now = PairVerifier(paths, cold=False, verifier=Verifier(projection=proj))
    quality = []
    for pv, name in ((before, "before: projected in one product, npz cache"), (now, "now: raw cache, in threads")):
        rows, _ = catalogue.run(Path(paths[0]).parent.parent, paths, vecs, pv, args.queries, configs=((60, 30, 20),),
                                names=("", name))
        quality += [r + [round(pv.ms_per_pair(), 2)] for r in rows]
    load = tuple(round(a, 1) for a in load0 + os.getloadavg())
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M")
    text = (f"<!-- {stamp} UTC · {platform.machine()} · {os.cpu_count()} cores · threads {args.threads} · load average "
            f"{load[:3]} → {load[3:]} -->\n## Cache format 2 and loading in threads (`python bench/catalogue_speed.py "
            f"--index INDEX --top`)\n\nStages of one query, median over {args.profile} phone-photo queries, each "
            "against its real candidates; the two verifications interleaved query by query (before, now, before, "
            "now ...). \"RootSIFT + projection\" and \"PROSAC\" are the sums of their calls (in the verifier's two "
            "threads they overlap), \"descriptor matching\" the verification's wall time minus those sums; the "
            "verification's wall time is its own row. The query's SIFT is timed alone here; `retrieve search` now "
            "runs it while the network embeds the query.\n\n")
    text += _common.table(["verification", "stage", "ms/query", "ms/pair"], stages)
    text += "\n\nThe same, side by side:\n\n" + _common.table(["stage", "before ms", "now ms", "before / now"],
                                                              _ratios(stages))
    text += ("\n\nQuality, bench/catalogue.py's protocol, K 60, W 30, C 20 (the default), both in this run (ms/pair: "
             "the measured cost of one verified pair, features in memory):\n\n")
    text += _common.table(catalogue.HEADERS + ["ms/pair"], quality)
    path = _common.RESULTS / "catalogue-speed.md"
    path.write_text(text + "\n\n" + path.read_text())


GROWTH = "## Growth with the collection"


def _growth_text(grow, load) -> str:
    return (f"{GROWTH}\n\nThe 500 real rows plus synthetic distractors: global vectors "
            "drawn from a Gaussian with the real rows' mean and covariance (128-d, whitened, renormalised), "
            "searched exactly (faiss flat, inner product); visual-word bags drawn from the real word frequencies. "
            "Median over 20 queries (words lookup: the query's words quantised, then the postings scored). The "
            "verification's cost does not grow: it verifies a fixed number of pairs (K + W + 2C), each read from "
            f"the per-content cache. Load average {load[:3]} → {load[3:]}.\n\n"
            + _common.table(["images", "global search ms", "words lookup ms", "inverted file built s"], grow))


if __name__ == "__main__":
    main()
