"""The visual-word lookup as the collection grows to 100 k images: capped vs uncapped, recall, open cost, memory.

    python bench/words_growth.py --index INDEX [--sizes 500 1000 10000 30000 100000] [--queries 100]
                                 [--timed 20] [--budgets 0 250000 500000 1000000 2000000] [--threads 2]

INDEX: an instance index (``retrieve index bench/.cache/instance --preset instance``, bench/instance_set.py; its
local features cached, as after indexing). The index's 500 real rows (their stored bags and vocabulary) plus
synthetic distractor rows up to each size: each distractor's bag has a real row's number of words, drawn from the
real word frequencies. Queries: the phone photos ``view1``, their words from their cached SIFT features; true
images: the other four photos of the same object.

Per size, in one run:

- **lookup ms**, ``WordIndex.search(desc, 30)`` (quantising the query's words, scoring the postings, the top
  30), median over ``--timed`` queries, *before* (the scoring of 977297a: every query word's postings through an
  index array) and *now* (the product: at most ``POSTINGS_BUDGET`` postings, each word's postings one slice),
  interleaved query by query; and the global search (faiss flat, 128-d whitened vectors drawn from the real
  rows' Gaussian) for the whole-query estimate.
- **recall** of the true images in the words top 30 (self excluded) and of the clean reference among the
  catalogue's words top 20, for each budget in ``--budgets`` (0: no cap), over ``--queries`` queries; the share
  of queries the cap bit, the postings read, the scoring ms (budgets interleaved per query).
- **open cost**: ``WordIndex.load`` of the size's ``words.npz`` (written to a temporary folder) with the inverted
  file stored in it (now) and without (before: then built from the bags at the first search, int32 stable
  argsort; now's build: int16 radix), the file's size; memory: the bags' and the inverted file's arrays, and
  the process's peak resident size.

Writes bench/results/words-growth.md.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

import _common
from catalogue import TfIdf

from retrieval.match import words as W
from retrieval.index.store import IndexStore
from retrieval.match.verify import Verifier


class Before(TfIdf):
    """The scoring and inverted file of 977297a: tf-idf bags (bench/catalogue.py TfIdf), every query word's
    postings (stop words aside), the allowed rows' scores masked from the whole collection's."""

    def inverted_before(self):
        self._ivf = None
        return self._inverted()


def grown(wi: W.WordIndex, n: int, seed: int = 0) -> W.WordIndex:
    """``wi``'s rows plus synthetic rows up to ``n`` (bags drawn from the real word frequencies)."""
    rng = np.random.default_rng(seed)
    real = list(wi.bags.values())
    allw = np.concatenate([b[1] for b in real]).astype(np.int64)
    big = W.WordIndex(wi.vocab, n, "synthetic")
    bags = dict(wi.bags)
    first = max(bags) + 1
    for j in range(max(0, n - len(real))):
        nw = np.unique(allw[rng.integers(0, len(allw), len(real[j % len(real)][1]))]).astype(np.int32)
        bags[first + j] = ("", nw, np.ones(len(nw), np.uint16), rng.integers(0, 2**63, len(nw), dtype=np.uint64))
    big.bags = bags
    return big


def _top(scores: np.ndarray, ids: np.ndarray, n: int, exclude: int, allowed: np.ndarray | None = None) -> set[int]:
    s = scores.copy()
    s[ids == exclude] = 0
    if allowed is not None:
        s[~np.isin(ids, allowed)] = 0
    c = np.nonzero(s > 0)[0]
    c = c[np.argsort(-s[c], kind="stable")[:n]]
    return {int(ids[i]) for i in c}


def main() -> None:
    from threadpoolctl import threadpool_limits

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--index", required=True)
    ap.add_argument("--sizes", type=int, nargs="*", default=[500, 1000, 10_000, 30_000, 100_000])
    ap.add_argument("--queries", type=int, default=100)
    ap.add_argument("--timed", type=int, default=20)
    ap.add_argument("--budgets", type=int, nargs="*", default=[0, 1_000_000, 2_000_000, 4_000_000])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--shortlist", type=int, default=W.SHORTLIST)
    args = ap.parse_args()
    import faiss

    faiss.omp_set_num_threads(args.threads)
    load0 = os.getloadavg()
    with IndexStore.open(args.index) as store, threadpool_limits(args.threads):
        sig = json.loads((Path(args.index) / W.META_NAME).read_text())["features"]
        stored = W.WordIndex.load(Path(args.index), sig)
        # the bags with their counts (the file keeps none: tf-idf's √tf needs them), quantised from the features
        wi = W.WordIndex(stored.vocab, stored.trained_on, sig)
        wi.reconcile({i: (p, h) for i, p, h in store.row_paths()}, W._features(Verifier.for_index(store.settings)))
        rows = store.rows_by_ids(sorted(wi.bags))
        ids, vecs = zip(*store.iter_vectors())
        ids, vecs = np.concatenate(ids), np.concatenate(vecs)
    from retrieval.index.head import fit_head, parse_head

    head = fit_head([vecs], parse_head("pca-whiten:128"))
    x = head.apply(vecs.astype(np.float64))
    x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
    by_path = {rows[i].path: i for i in rows}
    folder = {i: str(Path(rows[i].path).parent) for i in rows}
    refs = np.array(sorted(i for i in rows if Path(rows[i].path).stem == "ref"), np.int64)
    queries = [i for i in sorted(rows) if Path(rows[i].path).stem == "view1"][:args.queries]
    v = Verifier()
    desc = {q: v.features(rows[q].path, rows[q].sha256).descriptors for q in queries}
    bag = {q: wi.vocab.bag(desc[q]) for q in queries}
    true = {q: {i for i in rows if folder[i] == folder[q] and i != q} for q in queries}
    ref_of = {q: by_path[str(Path(folder[q]) / "ref.jpg")] for q in queries}
    pos = {int(i): j for j, i in enumerate(ids)}
    main_rows, recall_rows, open_rows = [], [], []
    with threadpool_limits(args.threads):
        for n in args.sizes:
            t = time.perf_counter()
            big = grown(wi, n)
            gen = time.perf_counter() - t
            before = Before(wi.vocab, n, "synthetic")
            before.bags = big.bags
            t = time.perf_counter(); ivf_before = before.inverted_before(); t_before = time.perf_counter() - t
            t = time.perf_counter(); ivf = big._inverted(); t_now = time.perf_counter() - t
            same = all(np.array_equal(ivf[i], ivf_before[i]) for i in (0, 1, 3))  # rows, postings, word pointers
            before._ivf = ivf_before
            del ivf_before
            mem_bags = sum(b[1].nbytes + b[2].nbytes for b in big.bags.values()) / 2**20
            mem_ivf = sum(a.nbytes for a in ivf) / 2**20
            tmp = Path(tempfile.mkdtemp(prefix="words-growth-", dir=os.environ.get("WORDS_GROWTH_TMP")))
            try:  # now: the file holds the postings alone (format 3); before (977297a): the bags alone
                big.save(tmp)
                size = (tmp / W.WORDS_NAME).stat().st_size / 2**20
                t = time.perf_counter(); loaded = W.WordIndex.load(tmp, "synthetic"); t_load = time.perf_counter() - t
                assert loaded is not None and len(loaded.shas) == len(big.shas) and loaded._ivf is not None
                del loaded
                _common.write_format2(tmp, big, postings=False)
                size_before = (tmp / W.WORDS_NAME).stat().st_size / 2**20
                t = time.perf_counter(); loaded = W.WordIndex.load(tmp, "synthetic"); t_load_b = time.perf_counter() - t
                assert loaded is not None and loaded._ivf is None
                del loaded
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
            rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
            open_rows.append([n, round(t_load_b, 2), round(t_before, 2), round(t_load_b + t_before, 1),
                              round(t_load, 2), round(t_load_b + t_now, 1), "yes" if same else "NO",
                              round(size_before), round(size), round(mem_bags), round(mem_ivf), round(rss, 1)])
            print("open", open_rows[-1], f"(generated in {gen:.1f} s)", flush=True)
            # global search, for the whole-query estimate
            import faiss

            rng = np.random.default_rng(1)
            extra = max(0, n - len(x))
            syn = rng.multivariate_normal(x.mean(0), np.cov(x.T), extra).astype(np.float32)
            syn /= np.maximum(np.linalg.norm(syn, axis=1, keepdims=True), 1e-12)
            db = np.ascontiguousarray(np.concatenate([x, syn]))
            index = faiss.IndexFlatIP(db.shape[1])
            index.add(db)
            del syn
            tg, tb, tn = [], [], []
            for q in queries[:args.timed]:  # interleaved: before, now, global (fresh descriptors: no reuse)
                for wx, times in ((before, tb), (big, tn)):  # words top 30, then the catalogue's top 20, as search does
                    d = desc[q].copy()
                    t = time.perf_counter()
                    taken = {i for i, _ in wx.search(d, args.shortlist, exclude=[q])} | {q}
                    wx.search(d, 20, allowed=refs, exclude=taken)
                    times.append(time.perf_counter() - t)
                t = time.perf_counter(); index.search(db[pos[q]:pos[q] + 1], 61); tg.append(time.perf_counter() - t)
            del index, db
            med = lambda xs: round(1000 * statistics.median(xs), 1)  # noqa: E731
            main_rows.append([n, med(tg), med(tb), med(tn), round(statistics.median(tb) / statistics.median(tn), 1)])
            print("lookup", main_rows[-1], flush=True)
            per = {b: {"t": [], "read": [], "bit": 0, "hit": [], "ref": [], "cat": [], "catp": [], "top": []}
                   for b in args.budgets}
            post_ids, ptr = ivf[0], ivf[3]
            part = big._allowed_part(refs, ivf)  # the references' own postings (the product's catalogue lookup)
            ref_postings = sum(len(big.bags[int(i)][1]) for i in refs)
            for q in queries:
                qw, qn, qs = bag[q]
                for b in args.budgets:
                    t = time.perf_counter(); s = big.score_bag(qw, qn, qs, ivf, budget=b); dt = time.perf_counter() - t
                    r = per[b]
                    r["t"].append(dt)
                    unc = qw[ivf[5][qw] <= max(W.STOP_SHARE * n, W.STOP_MIN)]
                    total = int((ptr[unc + 1] - ptr[unc]).sum())
                    r["bit"] += bool(b) and total > b
                    r["read"].append(min(total, b) if b else total)
                    top = _top(s, post_ids, args.shortlist, q) if s is not None else set()
                    r["top"].append(top)
                    r["hit"].append(len(top & true[q]) / len(true[q]))
                    r["ref"].append(ref_of[q] in top)
                    cat = _top(s, post_ids, 20, q, refs) if s is not None else set()
                    r["cat"].append(ref_of[q] in cat)
                    if part is not None and (not b or ref_postings <= b):
                        sp = big.score_bag(qw, qn, qs, ivf, part=part)
                        cat = _top(sp, part[0], 20, q) if sp is not None else set()
                    r["catp"].append(ref_of[q] in cat)
            for b in args.budgets:
                r = per[b]
                same_top = sum(a == c for a, c in zip(r["top"], per[args.budgets[0]]["top"]))
                recall_rows.append([n, b or "none", f"{r['bit']}/{len(queries)}", int(statistics.median(r["read"])),
                                    med(r["t"]), round(float(np.mean(r["hit"])), 3), round(float(np.mean(r["ref"])), 3),
                                    round(float(np.mean(r["cat"])), 3), round(float(np.mean(r["catp"])), 3),
                                    f"{same_top}/{len(queries)}"])
                print("recall", recall_rows[-1], flush=True)
            del big, before, ivf
    load = tuple(round(a, 1) for a in load0 + os.getloadavg())
    text = _text(args, main_rows, recall_rows, open_rows, load)
    _common.save("words-growth", text)


GROWTH = "## Growth with the collection"


def _text(args, main_rows, recall_rows, open_rows, load) -> str:
    cmd = "python bench/words_growth.py --index INDEX" + (f" --sizes {' '.join(map(str, args.sizes))}")
    return (f"{GROWTH}\n\n{time.strftime('%Y-%m-%d %H:%M')}, `{cmd}` (INDEX: the instance set's index, `retrieve index bench/.cache/instance "
            f"--preset instance`); {args.threads} threads; load average {load[:3]} at the start, {load[3:]} at the "
            "end (a shared machine: compare within a table). The 500 real rows plus synthetic distractors up to each size: each distractor's bag of "
            "words has a real row's number of words, drawn from the real word frequencies; global vectors drawn "
            "from a Gaussian with the real rows' mean and covariance (128-d, whitened), searched exactly (faiss "
            f"flat). Median over {args.timed} phone-photo queries, before and now interleaved query by query. "
            "Lookup: `WordIndex.search(descriptors, 30)` then the catalogue's `search(descriptors, 20, "
            "allowed=references, exclude=those 30)`, as `retrieve search` on an index with a catalogue (the query's "
            "words quantised once, the collection's postings scored once); before: every query word's postings (977297a); now: at most `POSTINGS_BUDGET` = "
            f"{W.POSTINGS_BUDGET:,} postings, the query's highest-idf×√tf words first, the catalogue scored on its "
            "own postings.\n\n"
            + _common.table(["images", "global search ms", "lookup ms before", "lookup ms now", "before/now"],
                            main_rows)
            + "\n\n### Recall of the true images in the words shortlist, by budget\n\n"
            f"Over {args.queries} phone-photo queries (`view1` of each object); true images: the object's other "
            "four photos (the clean reference and three phone photos). *bit*: queries whose postings (stop words "
            "aside) exceed the budget; *read*: postings read (median); *ms*: scoring only (budgets interleaved per "
            f"query); *recall@{args.shortlist}*: share of the true images in the words top {args.shortlist} (self "
            f"excluded); *ref@{args.shortlist}*: the clean reference among them; *catalogue ref@20*: the reference "
            "among the catalogue's words top 20 (allowed: the 100 references), *masked* from the collection's "
            "(capped) scores, and *now* as the product scores it: the references' own postings (110 k, within the "
            "budget) all read, so uncapped; *same top*: queries whose words "
            "top 30 is the uncapped one.\n\n"
            + _common.table(["images", "budget", "bit", "read", "ms", f"recall@{args.shortlist}",
                             f"ref@{args.shortlist}", "catalogue ref@20 masked", "catalogue ref@20 now",
                             "same top"], recall_rows)
            + "\n\n### Open cost and memory\n\n"
            "What a process that opens the index pays before its first lookup. Before (977297a): `WordIndex.load` "
            "of a `words.npz` without the inverted file (CRC-checked read, a bag per row), then the inverted file "
            "built from the bags at the first search (int32 stable argsort). Now: the file also holds the inverted "
            "file, read with it (no build); *open s now, old file*: a file written before (without it), its inverted "
            "file built with the int16 radix sort (as an index run that changed rows builds it before writing the "
            "file); *same*: the postings (rows, their order, the word pointers) built now identical to before's (the weights differ: ASMK* against tf-idf). Memory: the bags' arrays, the inverted file's arrays, and this "
            "process's peak resident size so far.\n\n"
            + _common.table(["images", "load s before", "build s before", "open s before", "open s now (load)",
                             "open s now, old file", "same", "words.npz MB before", "MB now", "bags MB",
                             "inverted file MB", "peak RSS GB"], open_rows) + "\n")


if __name__ == "__main__":
    main()
