"""People: clustering the faces of a faces index into people (retrieval/curate/clustering.py) against dlib's
Chinese whispers and scikit-learn's HDBSCAN, side by side in one run (bench/results/people.md).

Sets (faces found and embedded as the faces preset does: dlib's HOG detector, the 5-point alignment, the face
ResNet port; bench/faces.py's functions): the real set (deepface's tests/unit/dataset, identities from its
labelled pairs as bench/faces.py ``real_identities`` derives them; every face of every photo is clustered, the
largest face of a labelled photo carries its identity, the others count for nothing), ORL (40 people x 10), and
group photos (bench/faces.py ``make_groups``: ORL people s31-s40 pasted into Caltech-101 photos; a detected face
carries the identity of the pasted photo it overlaps).

Methods: dlib's ``chinese_whispers_clustering`` on the raw 128-D descriptors, threshold 0.5 (its usual one, the
peer); HDBSCAN (sklearn) on the index's vectors; and ours on the index's score (the cosine of descriptors centred on
the fixed mean face, threshold ``settings.faces["threshold"]``): Chinese whispers on the same-person links, with
and without the guard against chaining. Constants chosen here (the guard's support share, HDBSCAN's
min_cluster_size) are chosen on the tuning identities (ORL s1-s20, the real set's even-numbered identities) and
reported on the held-out ones too.

Metrics per set and method, over the labelled faces: pairwise precision/recall/F, BCubed precision/recall/F, the
largest number of clusters one person is split into, and the wrong-person merge rate (the share of faces in a
cluster whose majority is another person). Incremental: cluster a seeded half of the faces, assign the other half
to those people (``assign_to_people``), cluster what is left among itself, and compare with clustering all at once.

    RETRIEVE_THREADS=1 python bench/people.py --real /tmp/deepface/tests/unit/dataset [--groups 80] [--seed 0]
"""
from __future__ import annotations

import argparse
import os
import random
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402

CACHE = _common.ROOT / "bench" / ".cache"


# -- descriptors ---------------------------------------------------------------------------------------------
def orl_faces(root: Path, finder, bb, progress) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(raw descriptors, identity, ORL person number) of the first face found in each ORL photo."""
    from PIL import Image

    vecs, labels, person = [], [], []
    people = sorted((p for p in root.iterdir() if p.is_dir()), key=lambda p: int(p.name[1:]))
    for i, p in enumerate(people):
        for f in sorted(p.glob("*.pgm")):
            fs = finder.faces(np.asarray(Image.open(f).convert("RGB")))
            if fs:
                vecs.append(bb.embed_images([Image.fromarray(fs[0].chip)])[0])
                labels.append(i)
                person.append(int(p.name[1:]))
        progress(f"ORL {i + 1}/{len(people)}")
    return np.array(vecs), np.array(labels), np.array(person)


def group_faces(orl_root: Path, bg_root: Path, n: int, seed: int, finder, bb, progress, work: Path):
    """(raw descriptors, identity or -1) of every face detected in ``n`` made group photos."""
    import faces as fb
    from PIL import Image

    from retrieval.faces.search import _iou

    photos, _ = fb.make_groups(orl_root, bg_root, n, random.Random(seed), work)
    vecs, labels = [], []
    for k, (path, placed) in enumerate(photos):
        fs = finder.faces(np.asarray(Image.open(path).convert("RGB")))
        if fs:
            vecs.extend(bb.embed_images([Image.fromarray(f.chip) for f in fs]))
        for f in fs:
            hit = [int(pid[1:]) for pid, b in placed if _iou(f.box, b) > 0.3]
            labels.append(hit[0] if hit else -1)
        progress(f"group photos {k + 1}/{n}")
    return np.array(vecs), np.array(labels)


def real_faces(root: Path, finder, bb, progress):
    """(raw descriptors, identity or -1) of every face of deepface's photos: the largest face of a labelled photo
    carries its identity; other faces, and the distractor photos' faces, are -1."""
    import faces as fb

    r = fb.real(root, finder, bb, fb._NoGeneral(), progress)
    vecs, labels = [], []
    for v, lab in zip(r["vecs"], r["labels"]):
        for j in range(len(v)):
            vecs.append(v[j])
            labels.append(int(lab) if j == 0 else -1)
    return np.array(vecs), np.array(labels)


def descriptors(args, progress) -> dict:
    path = CACHE / f"people-{args.groups}-{args.seed}.npz"
    if path.is_file() and not args.fresh:
        z = np.load(path)
        print(f"descriptors read from {path.relative_to(_common.ROOT)}", file=sys.stderr)
        return {k: z[k] for k in z.files}
    import tempfile

    from retrieval.faces.detect import FaceFinder
    from retrieval.faces.network import load_backbone

    orl_root, bg_root = _common.shared_dataset("att_faces"), _common.shared_dataset("caltech101")
    if orl_root is None or bg_root is None:
        raise SystemExit(1)
    finder, bb = FaceFinder("hog"), load_backbone()
    out: dict = {}
    t0 = time.perf_counter()
    out["orl_x"], out["orl_y"], out["orl_person"] = orl_faces(orl_root, finder, bb, progress)
    with tempfile.TemporaryDirectory() as tmp:
        out["groups_x"], out["groups_y"] = group_faces(orl_root, bg_root, args.groups, args.seed, finder, bb,
                                                       progress, Path(tmp))
    out["real_x"], out["real_y"] = real_faces(args.real, finder, bb, progress)
    out["seconds"] = np.array(time.perf_counter() - t0)
    CACHE.mkdir(parents=True, exist_ok=True)
    np.savez(path, **out)
    return out


# -- metrics -------------------------------------------------------------------------------------------------
def scores(labels: np.ndarray, y: np.ndarray) -> dict:
    """Pairwise and BCubed precision/recall/F, the largest split, the wrong-person merge rate, over faces with
    y >= 0 (the clustering itself ran over every face)."""
    m = y >= 0
    lab, y = np.asarray(labels)[m], y[m]
    same_c, same_y = lab[:, None] == lab[None], y[:, None] == y[None]
    off = ~np.eye(len(y), dtype=bool)
    tp = (same_c & same_y & off).sum()
    pp, pr = tp / max((same_c & off).sum(), 1), tp / max((same_y & off).sum(), 1)
    both = (same_c & same_y).sum(1)
    bp, br = float(np.mean(both / same_c.sum(1))), float(np.mean(both / same_y.sum(1)))
    wrong = 0
    for c in np.unique(lab):
        ys = y[lab == c]
        vals, cnt = np.unique(ys, return_counts=True)
        wrong += int((ys != vals[np.argmax(cnt)]).sum())
    f = lambda p, r: 2 * p * r / (p + r) if p + r else 0.0  # noqa: E731
    return {"pP": pp, "pR": pr, "pF": f(pp, pr), "bP": bp, "bR": br, "bF": f(bp, br),
            "split": max(len(np.unique(lab[y == k])) for k in np.unique(y)), "wrong": wrong / len(y),
            "clusters": len(np.unique(labels))}


# -- methods -------------------------------------------------------------------------------------------------
def index_space(raw: np.ndarray) -> np.ndarray:
    """What ``store.transform`` gives a faces index: centred on the fixed mean face, L2-normalised."""
    from retrieval.faces.network import mean_face

    v = raw - mean_face()[0]
    return (v / np.linalg.norm(v, axis=1, keepdims=True)).astype(np.float32)


def dlib_whispers(raw: np.ndarray, threshold: float = 0.5) -> np.ndarray:
    import dlib

    return np.array(dlib.chinese_whispers_clustering([dlib.vector(v.tolist()) for v in raw], threshold))


def hdbscan(x: np.ndarray, min_cluster_size: int) -> np.ndarray:
    """sklearn's HDBSCAN on the index's vectors (Euclidean on unit vectors: monotone in the score); its noise
    points become people of their own."""
    from sklearn.cluster import HDBSCAN

    lab = HDBSCAN(min_cluster_size=min_cluster_size, copy=True).fit_predict(x)
    return np.where(lab < 0, lab.max() + 1 + np.arange(len(lab)), lab)


def ours(x: np.ndarray, method: str, **kw) -> np.ndarray:
    from retrieval.curate.clustering import cluster_faces
    from retrieval.faces.network import mean_face

    return cluster_faces(x, mean_face()[1], method, **kw)


def incremental(x: np.ndarray, y: np.ndarray, seed: int, raw: np.ndarray) -> tuple[dict, dict, float, dict, dict]:
    """Half the faces clustered, the other half assigned to those people, the rest clustered among itself:
    (its scores, clustering all at once's scores, the pairwise F of the two labellings against each other, the
    first half's own scores, dlib's Chinese whispers' on the first half)."""
    from retrieval.curate.clustering import assign_to_people, centroids, cluster_faces
    from retrieval.faces.network import mean_face

    same = mean_face()[1]
    first = np.random.default_rng(seed).permutation(len(x)) < len(x) // 2
    lab = np.full(len(x), -1)
    lab[first] = cluster_faces(x[first], same)
    to = assign_to_people(x[~first], centroids(x[first], lab[first]), same)
    rest = np.flatnonzero(~first)
    lab[rest] = to
    left = rest[to < 0]
    if len(left):
        lab[left] = cluster_faces(x[left], same) + lab.max() + 1
    full = cluster_faces(x, same)
    agree = scores(lab, full)["pF"]
    return (scores(lab, y), scores(full, y), agree, scores(lab[first], y[first]),
            scores(dlib_whispers(raw[first]), y[first]))


SETS = ("real", "orl", "groups")
MARGINS = (0.0, 0.02, 0.05, 0.08, 0.1, 0.15)
STRANGER_RATE = 1e-3  # the margin: the smallest at which at most this share of the tuning stranger pairs link


def made_faces(k: int, seed: int) -> np.ndarray:
    """k made people (5-14 faces each, around random unit centres in 128-D, each face ≈ 0.85 from another of its
    person's) and k/2 strangers, shuffled: only for timing."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(k, 128))
    y = np.repeat(np.arange(k), rng.integers(5, 15, size=k))
    x = centres[y] / np.linalg.norm(centres[y], axis=1, keepdims=True) + rng.normal(scale=0.04, size=(len(y), 128))
    x = np.vstack([x, rng.normal(size=(k // 2, 128))])
    x = x[rng.permutation(len(x))]
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _same() -> float:
    from retrieval.faces.network import mean_face

    return mean_face()[1]


def tuning_mask(d: dict, name: str) -> np.ndarray:
    """The tuning identities: ORL s1-s20, the real set's even-numbered identities (and the unlabelled faces of
    their photos' set); group photos (ORL s31-s40) are never tuned on."""
    y = d[f"{name}_y"]
    if name == "orl":
        return d["orl_person"] <= 20
    if name == "real":
        return (y % 2 == 0) | (y < 0)
    return np.zeros(len(y), bool)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--real", type=Path, default=None, metavar="DIR", help="deepface's tests/unit/dataset")
    ap.add_argument("--groups", type=int, default=80, help="group photos made (ORL s31-s40 on Caltech-101)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--fresh", action="store_true", help="recompute the descriptors cached under bench/.cache")
    ap.add_argument("--scale", type=lambda t: [int(v) for v in t.split(",") if v], default=[300, 1200, 5000],
                    help="people in the made-faces timing rows (comma-separated; '' for none)")
    args = ap.parse_args()
    if args.real is None:
        import faces as fb

        raise SystemExit(fb.REAL_HINT)
    import torch

    from retrieval.curate import clustering as cl
    from retrieval.models.graphs import inference_threads

    torch.set_num_threads(inference_threads())  # the face network's threads (and the saved table's header)

    tty = sys.stderr.isatty()
    load0 = os.getloadavg()
    d = descriptors(args, (lambda m: print(f"\r{m}   ", end="", file=sys.stderr, flush=True)) if tty else
                    (lambda m: None))
    if tty:
        print(file=sys.stderr)
    X = {s: index_space(d[f"{s}_x"]) for s in SETS}
    # 1. the constants, chosen on the tuning identities. The margin: the smallest at which at most STRANGER_RATE
    # of the stranger pairs link (BCubed F saturates on so few people: merges grow with the number of people, the
    # pair rate does not). The support share and HDBSCAN's min_cluster_size: the best mean BCubed F (ties: the
    # shipped value, stated before measuring: a majority, 0.5). Held-out columns: shown, never used to choose.
    same_t = _same()
    pair_rows, margin_pick = [], None
    for mg in MARGINS:
        rates = []
        for s in ("real", "orl"):
            t = tuning_mask(d, s)
            Xt, yt = X[s][t], d[f"{s}_y"][t]
            S = Xt @ Xt.T
            lab = (yt[:, None] >= 0) & (yt[None] >= 0) & ~np.eye(len(yt), dtype=bool)
            same_id = yt[:, None] == yt[None]
            rates.append(((S[lab & ~same_id] >= same_t + mg).mean(), (S[lab & same_id] < same_t + mg).mean(),
                          (lab & ~same_id).sum()))
        pooled = sum(r[0] * r[2] for r in rates) / sum(r[2] for r in rates)
        pair_rows.append([mg, same_t + mg, f"{100 * rates[1][0]:.3f} %", f"{100 * rates[1][1]:.2f} %",
                          f"{100 * rates[0][0]:.3f} %", f"{100 * rates[0][1]:.2f} %", f"{100 * pooled:.3f} %"])
        if margin_pick is None and pooled <= STRANGER_RATE:
            margin_pick = mg
    tune_rows, best = [], {}
    grid = [("guarded", {"margin": margin_pick, "support": sp}) for sp in (0.3, 0.5, 0.7)]
    grid += [("guarded", {"margin": mg, "support": cl.SUPPORT}) for mg in MARGINS if mg != margin_pick]
    grid += [("whispers", {"margin": mg}) for mg in MARGINS]
    grid += [("hdbscan", {"min_cluster_size": m}) for m in (2, 3, 4, 5)]
    for method, kw in grid:
        fs, held = [], []
        for s in SETS:
            t = tuning_mask(d, s)
            h = ~t | (d[f"{s}_y"] < 0)
            for mask, out in ((t, fs), (h, held)):
                if not mask.any() or (d[f"{s}_y"][mask] < 0).all():
                    continue
                lab = hdbscan(X[s][mask], **kw) if method == "hdbscan" else ours(X[s][mask], method, **kw)
                out.append(scores(lab, d[f"{s}_y"][mask])["bF"])
        tune_rows.append([method, ", ".join(f"{k}={v}" for k, v in kw.items()), *fs, float(np.mean(fs)), *held])
        key = float(np.mean(fs))
        if method == "hdbscan" or kw.get("margin") == margin_pick:
            tie = kw.get("support") == cl.SUPPORT
            if method not in best or key > best[method][1] + 1e-9 or (abs(key - best[method][1]) <= 1e-9 and tie):
                best[method] = (kw, key)
    shipped = {"guarded": {"margin": cl.MARGIN, "support": cl.SUPPORT}, "whispers": {"margin": cl.MARGIN}}
    mcs = best["hdbscan"][0]["min_cluster_size"]
    methods = [("dlib Chinese whispers (raw, 0.5)", lambda s, m: dlib_whispers(d[f"{s}_x"][m])),
               (f"HDBSCAN (min_cluster_size={mcs})", lambda s, m: hdbscan(X[s][m], mcs)),
               ("ours: whispers, no guard", lambda s, m: ours(X[s][m], "whispers")),
               ("ours: whispers + guard (default)", lambda s, m: ours(X[s][m], "guarded"))]
    # 2. every set, every method; then the held-out identities alone
    heads = ["set", "method", "faces (labelled)", "people", "clusters", "pair P", "pair R", "pair F", "BCubed P",
             "BCubed R", "BCubed F", "max split", "wrong merge", "s"]
    rows = {"all": [], "held": []}
    for part in ("all", "held"):
        for s in SETS:
            m = np.ones(len(X[s]), bool) if part == "all" else ~tuning_mask(d, s)
            if part == "held" and s in ("real", "orl"):
                m |= (d[f"{s}_y"] < 0)  # unlabelled faces stay in both parts (they count for nothing)
            y = d[f"{s}_y"][m]
            for name, fn in methods:
                t0 = time.perf_counter()
                lab = fn(s, m)
                sec = time.perf_counter() - t0
                r = scores(lab, y)
                rows[part].append([s, name, f"{len(y)} ({(y >= 0).sum()})", len(np.unique(y[y >= 0])), r["clusters"],
                                   r["pP"], r["pR"], r["pF"], r["bP"], r["bR"], r["bF"], r["split"],
                                   f"{100 * r['wrong']:.1f} %", round(sec, 3)])
    # 3. incremental
    inc_rows = []
    for s in SETS:
        for seed in range(3):
            a, b, agree, h, p = incremental(X[s], d[f"{s}_y"], args.seed + seed, d[f"{s}_x"])
            inc_rows.append([s, seed, a["bF"], b["bF"], a["split"], b["split"], f"{100 * a['wrong']:.1f} %",
                             f"{100 * b['wrong']:.1f} %", agree, f"{100 * h['wrong']:.1f} %",
                             f"{100 * p['wrong']:.1f} %"])
    # 4. time on made faces (people around random centres in 128-D, a third as many strangers), one thread
    scale_rows = []
    for k in args.scale:
        xm = made_faces(k, args.seed)
        t0 = time.perf_counter()
        lab = ours(xm, "guarded")
        scale_rows.append([len(xm), k, len(np.unique(lab)), round(time.perf_counter() - t0, 1)])
    # the targets, on every face: ours (the default) against dlib's Chinese whispers
    res = {(r[0], r[1]): r for r in rows["all"]}
    peer, mine = methods[0][0], methods[-1][0]
    checks = [f"real BCubed F {res[('real', mine)][10]:.4f} (≥ 0.97: {'met' if res[('real', mine)][10] >= 0.97 else 'NOT met'})"]
    for s in SETS:
        a, b = res[(s, mine)][10], res[(s, peer)][10]
        checks.append(f"{s}: {a:.4f} against dlib's {b:.4f} ({'not below' if a >= b - 1e-9 else 'BELOW'})")
    split = max(res[(s, mine)][11] for s in SETS)
    wrong = max(float(res[(s, mine)][12].rstrip(' %')) for s in SETS)
    checks.append(f"max split {split} (≤ 2: {'met' if split <= 2 else 'NOT met'})")
    checks.append(f"wrong merge at most {wrong:.1f} % (≤ 1 %: {'met' if wrong <= 1 else 'NOT met'})")
    load = (load0[0], os.getloadavg()[0])
    chosen = {k: v[0] for k, v in best.items()}
    chosen["whispers"] = {"margin": margin_pick}
    same_note = ("the shipped constants are the tuning's choice" if all(chosen[k] == shipped[k] for k in shipped)
                 else f"NOTE: the tuning chose {chosen}, the code ships {shipped}")
    text = f"""# People: clustering faces into people

`RETRIEVE_THREADS=1 python bench/people.py --real /tmp/deepface/tests/unit/dataset --groups {args.groups} --seed {args.seed}`
(faces: dlib's HOG detector, the faces preset's alignment and network; descriptors {float(d['seconds']):.0f} s when
computed; load average {load[0]:.2f} → {load[1]:.2f}). Real set: deepface's tests/unit/dataset, identities from
its labelled pairs (bench/faces.py `real_identities`), every face of every photo clustered, only the largest face of
a labelled photo scored. ORL: 40 people × 10. Groups: {args.groups} photos of ORL s31–s40 pasted into Caltech-101
photos (bench/faces.py `make_groups`, seed {args.seed}); a detected face is scored when it overlaps a pasted face.
Ours runs on the index's vectors (centred on the fixed mean face μ_f, normalised) with the faces preset's
same-person threshold t = {same_t}: links at t + margin ({cl.MARGIN}), Chinese whispers (seed 0), and the guard (a
face stays in a person while its score with the centroid of the other members passes t + margin and it links to at
least `support` ({cl.SUPPORT}) of them; it moves to the person whose centroid it fits best). dlib's peer: `dlib.chinese_whispers_clustering` on raw descriptors, Euclidean
threshold 0.5. HDBSCAN: `sklearn.cluster.HDBSCAN` on the index's vectors, noise = people of their own.
"Max split": the most clusters one person's faces fall into; "wrong merge": the share of faces in a cluster whose
majority is another person. Targets (issue #30): BCubed F ≥ 0.97 on the real set and never below dlib's Chinese
whispers on any set, max split ≤ 2, wrong merge ≤ 1 %.

Targets on every face, ours (the default): {"; ".join(checks)}.

Notes. (1) The guard's second rule (a face moves to the person whose centroid of the other members it fits
best) was added after a first run of this bench showed Chinese whispers' vote count putting one photo of the real
set's DiCaprio with Matt Damon's five (it links to four of them at 0.59-0.64, to its own three at 0.77-0.78); those
two people fall in different halves of the tuning split, so the held-out table cannot show it: the real set's row
with every face is not a held-out result for that rule. (2) The guard's cost: on ORL it leaves a face or two of
one person apart that plain whispers keeps whole; without it, whispers merges strangers on the group photos.
(3) HDBSCAN on the group photos: each person's 8 pool photos are pasted about twice each, so nearly every face
has a near-twin (score > 0.95) and the density hierarchy keeps those twins as clusters of their own; its
``cluster_selection_epsilon`` (which would merge them) raised a TypeError in scikit-learn 1.9.1 here.
(4) dlib's rule (Euclidean 0.5 on raw descriptors) is stricter than the faces preset's pair verdict (dlib's own
0.6); the margin plays that part here.

## Every face

{_common.table(heads, rows['all'])}

## Held-out identities only (never tuned on: ORL s21–s40, the real set's odd-numbered identities, all group photos)

{_common.table(heads, rows['held'])}

## Constants, chosen on the tuning identities (ORL s1–s20, the real set's even-numbered identities)

The margin: the smallest whose link test (score ≥ t + margin) links at most {100 * STRANGER_RATE:.1f} % of the
tuning identities' stranger pairs (pooled): BCubed F cannot choose it there, every margin up to 0.1 reaches ≈ 1 on so
few people, while wrong merges grow with the number of people in a collection and the pair rate does not.

{_common.table(["margin", "link at", "ORL: strangers linked", "ORL: same person unlinked", "real: strangers linked",
                "real: same person unlinked", "strangers linked (pooled)"], pair_rows)}

Chosen margin: {margin_pick}. Then the guard's support share and HDBSCAN's min_cluster_size by the mean BCubed F
of the two tuning parts (a tie keeps the value the code ships, a majority: 0.5). The held-out columns are shown
for the sensitivity of each setting and were not used to choose ({same_note}).

{_common.table(["method", "constants", "real (tuning) BCubed F", "ORL (tuning) BCubed F", "mean (tuning)",
                "real (held out)", "ORL (held out)", "groups (held out)"], tune_rows)}

## Incremental: half clustered, the other half assigned (`assign_to_people`), the rest clustered

Three seeded halves per set. "agreement": pairwise F of the incremental labelling against clustering all at once.
The last two columns: the wrong-merge rate of the first half clustered alone, ours and dlib's Chinese whispers on
the same faces (a smaller collection can merge two look-alikes that more faces of each keep apart; what the first
run merges, assignment keeps merged).

{_common.table(["set", "half", "BCubed F incremental", "BCubed F all at once", "max split inc.", "max split all",
                "wrong merge inc.", "wrong merge all", "agreement", "first half: wrong merge, ours",
                "first half: wrong merge, dlib"], inc_rows)}

## Time on made faces (one thread)

{_common.table(["faces", "made people", "people found", "s"], scale_rows)}
"""
    _common.save("people", text)


if __name__ == "__main__":
    main()
