"""Issue 31: a background behind several products confirms the wrong one. Inliers against evidence, side by side.

    python bench/burstiness.py --threads 1 [--sets original shared50 shared10] [--index SET=DIR …]

Every phone photo of each set queries the mixed collection (its 100 catalogue images + 400 phone photos, the
query itself left out) as the instance preset ranks (bench/catalogue.py: global top 8, words top 25, 3 + 3
catalogue images, the catalogue role recorded), once ranking the confirmed candidates by inliers (before) and
once by evidence (retrieval.match.verify.weigh: with a confirmed catalogue image, other photos count only their
inliers on the query keypoints it matched too). The same verified pairs for both rows. Objects split in two by
name (even: tuning, odd: held-out); weigh has no constant, so the tuning half only checks that nothing was fitted
to it. ``--datasets``: faces and categories (no catalogue: evidence = inliers, so the rows must be equal).

Sets: ``original`` = bench/instance_set.py's set (every phone photo on a background of its own; some Caltech
backgrounds are near-copies of each other); ``sharedN`` = the same objects pasted on N shared backgrounds
(instance_set.build_shared: each behind 400 / N phone photos of different objects: the issue's book behind
several products). Needs ../shared/data/caltech101. Saves bench/results/burstiness.md.
"""
from __future__ import annotations

import argparse
import os
import re
from pathlib import Path

import _common
import numpy as np

import catalogue
from instance_set import build, build_shared
from quality import EMBEDDINGS, PairVerifier, index_vectors, labelled_embeddings

HEADERS = ["set", "queries", "ranked by", "R@1", "mAP@10", "photo→cat R@1 (mixed)", "photo→cat R@1 (within)",
           "photo→cat R@1 (catalogue-only)", "pairs/query"]


def vectors(folder: Path, index: str | None) -> tuple[np.ndarray, list[str]]:
    """Raw embeddings and paths of ``folder``'s images (sorted by path): from ``index`` (an instance index of
    it), else from a temporary index made now."""
    if index:
        vecs, paths = index_vectors(index)
    else:
        vecs, _, paths, _ = labelled_embeddings(folder, EMBEDDINGS["gem-448-long"])
    order = np.argsort(paths)
    return vecs[order], [paths[i] for i in order]


def others(name: str, threads: int) -> list[list]:
    """Faces or categories (folder = class) under the instance preset's candidates (global top 8 + words top 25,
    no catalogue): every image queries the others; R@1 and mAP@10 with the confirmed ranked by inliers and by
    evidence, the same verified pairs."""
    from threadpoolctl import threadpool_limits

    from retrieval.index.head import fit_head, parse_head

    folder = _common.shared_dataset(name)
    if folder is None:
        return []
    vecs, labels, paths, _ = labelled_embeddings(folder, EMBEDDINGS["gem-448-long"])
    out = []
    with threadpool_limits(threads):
        pv = PairVerifier(paths, cold=False)
        wi = catalogue._index(pv.feats, np.arange(len(paths)))
        pv.v.projection = wi.vocab.projection
        x = fit_head([vecs], parse_head("pca-whiten:128")).apply(vecs.astype(np.float64))
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        orders = {False: [], True: []}
        for q in range(len(paths)):
            s = x[q] @ x.T
            s[q] = -np.inf
            order = np.argsort(-s, kind="stable")[:-1]
            wl = [c for c, _ in wi.search(pv.feats[q].descriptors, 25, exclude=[q])]
            for ev in orders:
                orders[ev].append(catalogue.product_order(q, order, pv, 8, wl, [], evidence=ev))
        for ev, got in orders.items():
            r1 = np.mean([labels[o[0]] == labels[q] for q, o in enumerate(got)])
            ap = []
            for q, o in enumerate(got):
                rel = np.array([labels[c] == labels[q] for c in o[:10]], float)
                R = int((labels == labels[q]).sum()) - 1
                ap.append(float((np.cumsum(rel) / np.arange(1, len(rel) + 1) * rel).sum() / min(R, 10)))
            out.append([name, len(paths), "evidence (now)" if ev else "inliers (before)", round(float(r1), 3),
                        round(float(np.mean(ap)), 3), "-", "-", "-", "-"])
            print(" | ".join(map(str, out[-1])), flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sets", nargs="+", default=["original", "shared50", "shared10"])
    ap.add_argument("--index", nargs="*", default=[], metavar="SET=DIR", help="an instance index of the set")
    ap.add_argument("--cache", type=Path, default=_common.ROOT / "bench" / ".cache",
                    help="where the shared-background sets are written")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--datasets", nargs="*", default=["att_faces", "caltech101"],
                    help="faces and categories under the instance preset's candidates, before and after")
    args = ap.parse_args()
    src = _common.shared_dataset("caltech101")
    if src is None:
        return
    from threadpoolctl import threadpool_limits

    given = dict(a.split("=", 1) for a in args.index)
    rows, load = [], os.getloadavg()
    for name in args.sets:
        if name == "original":
            folder = build(src, _common.ROOT / "bench" / ".cache" / "instance")
        else:
            n = int(re.fullmatch(r"shared(\d+)", name).group(1))
            folder = build_shared(src, args.cache / f"instance-shared-{n}", backgrounds=n)
        vecs, paths = vectors(folder, given.get(name))
        with threadpool_limits(args.threads):
            pv = PairVerifier(paths, cold=False)
            pv.v.projection = catalogue._index(pv.feats, np.arange(len(paths))).vocab.projection
            labels = np.array([Path(p).parent.name for p in paths])
            objects = sorted(set(labels))
            for half, keep in (("tuning", set(objects[0::2])), ("held-out", set(objects[1::2]))):
                qs = [i for i, p in enumerate(paths) if Path(p).stem != "ref" and labels[i] in keep]
                got, _ = catalogue.run(folder, paths, vecs, pv, configs=((8, 25, 3),), expand=0,
                                       evidence=(False, True), queries=qs, names=("", ""))
                for r in got:
                    h = catalogue.HEADERS
                    rows.append([f"{name}, {half}", len(qs), "evidence (now)" if "evidence" in r[0] else
                                 "inliers (before)", *(r[h.index(c)] for c in
                                                        ("R@1", "mAP@10", "photo→cat R@1 (mixed)",
                                                         "photo→cat R@1 (within)", "photo→cat R@1 (catalogue-only)",
                                                         "pairs/query (mixed)"))])
                    print(" | ".join(map(str, rows[-1])), flush=True)
    for name in args.datasets:
        rows += others(name, args.threads)
    load = tuple(round(a, 1) for a in load + os.getloadavg())
    text = ("# Burstiness: a background behind several products (issue 31)\n\n"
            f"`python bench/burstiness.py --threads {args.threads}` (sets {', '.join(args.sets)}; "
            f"{args.threads} thread(s) for NumPy and OpenCV's matching); load average {load[:3]} at the start, "
            f"{load[3:]} at the end. "
            "Every phone photo queries the mixed collection of its set (100 catalogue images + 400 phone photos, "
            "itself left out), the instance preset's candidates (global top 8, words top 25, 3 + 3 catalogue "
            "images, the catalogue role recorded); the confirmed ranked by inliers (before) or by evidence "
            "(retrieval.match.verify.weigh, now: with a confirmed catalogue image, other photos count only their "
            "inliers on the query keypoints it matched too), the same verified pairs for both. within: answers from the "
            "catalogue images only; catalogue-only: an index of the 100 catalogue images. Objects split by name: "
            "even = tuning, odd = held-out (weigh has no constant to tune).\n\n")
    text += _common.table(HEADERS, rows)
    _common.save("burstiness", text)


if __name__ == "__main__":
    main()
