"""Faces: the face preset (detect, align, dlib's face ResNet through the port) against the general preset.

Side by side in one run (bench/results/faces.md):

1. ORL (../shared/data/att_faces, 40 people × 10): leave-one-out retrieval, R@1 and mAP over photos. A photo
   in which no face is found is a miss as a query and absent from the gallery (counted in the table).
2. Group photos made here: the ORL photos of held-out identities (s31–s40; never seen by either preset's
   choice of settings) pasted 1–4 per photo at random scale (face 92–200 px wide) and position into real
   photos (Caltech-101 backgrounds). Query: one other ORL photo of a person; task: "find every photo with
   this person". The face preset ranks a photo by its nearest face; the general preset by the whole photo.
3. Real photos (``--real DIR``: deepface's ``tests/unit/dataset``, MIT licence, public figures in varied pose,
   light and resolution; ``git clone https://github.com/serengil/deepface``): identities from its labelled
   pairs, leave-one-out over the labelled photos, its two group photos as distractors.
4. Where the maps fall: for each query's best-ranked photo of the same person, the share of the map's mass
   in the detector's face box (and, on group photos, in the pasted face photo), in the result photo's own
   pixels after the inverse alignment, and on the eyes/nose/mouth region from the 5 landmarks: SFAM against
   the project's Grad-CAM and pytorch-grad-cam's five methods (the bench extra) on the same network and
   chips, for two scores: the faces preset's (the cosine of descriptors centred on the mean face μ_f, with
   the explainers explain/faces.py ``face_explainer`` builds for a faces index) and, as "before", the L2
   similarity it ranked by until then. And the indexing speed with HOG detection (faces/s, whole pipeline).

    python bench/faces.py [--groups 60] [--seed 0] [--real deepface/tests/unit/dataset] [--sets orl,groups,real]
    python bench/faces.py --maps-only [--real DIR] --threads 1   # part 4 alone (no general preset): faces-maps.md
    python bench/faces.py --metric [--real DIR] --threads 1   # L2 / cosine / centred cosine: faces-metric.md
    python bench/faces.py --metric --fixed-mean --real DIR --threads 1   # + a fixed mean μ_f, cross-set (same file)
"""
from __future__ import annotations

import argparse
import os
import random
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402


def ranks_metrics(dist_rows: list[np.ndarray], relevant_rows: list[np.ndarray]) -> tuple[float, float]:
    """R@1 and mAP from per-query distances (lower = better) and boolean relevance over the gallery."""
    r1, aps = [], []
    for d, rel in zip(dist_rows, relevant_rows):
        if d is None:
            r1.append(0.0)
            aps.append(0.0)
            continue
        order = np.argsort(d, kind="stable")
        hits = rel[order]
        r1.append(float(hits[0]))
        if hits.sum() == 0:
            aps.append(0.0)
            continue
        prec = np.cumsum(hits) / np.arange(1, len(hits) + 1)
        aps.append(float((prec * hits).sum() / hits.sum()))
    return float(np.mean(r1)), float(np.mean(aps))


def general_backbone():
    from retrieval.models.loading import load_backbone

    return load_backbone()  # the general preset: efficientnet_lite0, 224 squash, GAP, cosine


def cosine_dist(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return 1 - a @ b.T


def orl(root: Path, finder, face_bb, gen_bb, progress) -> dict:
    people = sorted(p for p in root.iterdir() if p.is_dir())
    paths, labels = [], []
    for i, p in enumerate(people):
        for f in sorted(p.glob("*.pgm")):
            paths.append(f)
            labels.append(i)
    labels = np.array(labels)
    imgs = [Image.open(p).convert("RGB") for p in paths]
    t0 = time.perf_counter()
    vecs, ok = [], []
    for k, im in enumerate(imgs):
        faces = finder.faces(np.asarray(im))
        if faces:
            vecs.append(face_bb.embed_images([Image.fromarray(faces[0].chip)])[0])
            ok.append(k)
        progress(f"ORL faces {k + 1}/{len(imgs)}")
    face_s = time.perf_counter() - t0
    ok = np.array(ok)
    fv = np.array(vecs)
    fd = np.full((len(imgs), len(imgs)), np.inf)
    fd[np.ix_(ok, ok)] = np.linalg.norm(fv[:, None] - fv[None], axis=-1)
    t0 = time.perf_counter()
    gv = gen_bb.embed_images(imgs)
    gen_s = time.perf_counter() - t0
    gd = cosine_dist(gv, gv)
    out = {"n": len(imgs), "no_face": len(imgs) - len(ok), "face_s": face_s, "gen_s": gen_s, "labels": labels,
           "vecs": [fv[list(ok).index(k)][None] if k in ok else np.zeros((0, fv.shape[1])) for k in range(len(imgs))]}
    for name, d, valid in (("faces", fd, set(ok.tolist())), ("general", gd, set(range(len(imgs))))):
        rows, rels = [], []
        for q in range(len(imgs)):
            mask = np.ones(len(imgs), bool)
            mask[q] = False
            if q not in valid:
                rows.append(None)
                rels.append(None)
                continue
            rows.append(d[q][mask])
            rels.append((labels == labels[q])[mask])
        out[name] = ranks_metrics(rows, rels)
    return out


def make_groups(orl_root: Path, bg_root: Path, n: int, rng: random.Random, out: Path):
    """``n`` group photos; returns (photos: [(path, [(identity, box)])], queries: [(identity, path)])."""
    ids = [f"s{i}" for i in range(31, 41)]
    pool = [(pid, orl_root / pid / f"{j}.pgm") for pid in ids for j in range(3, 11)]
    queries = [(pid, orl_root / pid / f"{j}.pgm") for pid in ids for j in (1, 2)]
    bgs = sorted(p for p in bg_root.rglob("*.jpg") if "face" not in p.parent.name.lower())  # no faces behind
    out.mkdir(parents=True, exist_ok=True)
    photos = []
    for g in range(n):
        bg = Image.open(rng.choice(bgs)).convert("RGB")
        s = 720 / max(bg.size)
        bg = bg.resize((max(1, round(bg.width * s)), max(1, round(bg.height * s))))
        if min(bg.size) < 420:  # room for up to four faces
            bg = bg.resize((max(bg.width, 560), max(bg.height, 420)))
        placed = []
        for pid, fp in rng.sample(pool, rng.randint(1, 4)):
            if any(p[0] == pid for p in placed):
                continue
            face = Image.open(fp).convert("RGB")
            sc = rng.uniform(1.0, 2.2)
            face = face.resize((round(92 * sc), round(112 * sc)))
            for _ in range(60):
                x, y = rng.randint(0, bg.width - face.width), rng.randint(0, bg.height - face.height)
                box = (x, y, x + face.width, y + face.height)
                if all(box[2] <= b[0] or b[2] <= box[0] or box[3] <= b[1] or b[3] <= box[1] for _, b in placed):
                    bg.paste(face, (x, y))
                    placed.append((pid, box))
                    break
        path = out / f"group_{g:03d}.jpg"
        bg.save(path, quality=92)
        photos.append((path, placed))
    return photos, queries


def groups(orl_root, bg_root, n, seed, finder, face_bb, gen_bb, progress, work: Path) -> dict:
    from retrieval.faces.search import _iou

    photos, queries = make_groups(orl_root, bg_root, n, random.Random(seed), work)
    t0, c0 = time.perf_counter(), time.process_time()
    n_faces = 0
    gallery = []  # per photo: (faces, vectors)
    for k, (path, placed) in enumerate(photos):
        img = Image.open(path).convert("RGB")
        faces = finder.faces(np.asarray(img))
        vecs = face_bb.embed_images([Image.fromarray(f.chip) for f in faces]) if faces else np.zeros((0, 128))
        n_faces += len(faces)
        gallery.append((img, faces, vecs))
        progress(f"group photos {k + 1}/{len(photos)}")
    index_s, index_cpu = time.perf_counter() - t0, time.process_time() - c0
    true_faces = sum(len(p) for _, p in photos)
    found = sum(1 for (path, placed), (_, faces, _) in zip(photos, gallery)
                for _, b in placed if any(_iou(f.box, b) > 0.3 for f in faces))
    gen_gallery = gen_bb.embed_images([g[0] for g in gallery]) if gen_bb is not None else None
    fd_rows, gd_rows, rels = [], [], []
    qinfo = []
    for pid, qp in queries:
        qimg = Image.open(qp).convert("RGB")
        qf = finder.faces(np.asarray(qimg))
        rel = np.array([any(p == pid for p, _ in placed) for _, placed in photos])
        rels.append(rel)
        if gen_bb is not None:
            gd_rows.append(cosine_dist(gen_bb.embed_images([qimg]), gen_gallery)[0])
        if not qf:
            fd_rows.append(None)
            qinfo.append(None)
            continue
        qv = face_bb.embed_images([Image.fromarray(qf[0].chip)])[0]
        d = np.array([np.linalg.norm(v - qv, axis=1).min() if len(v) else np.inf for _, _, v in gallery])
        fd_rows.append(d)
        qinfo.append((qimg, qf[0], qv))
    face_m = ranks_metrics(fd_rows, rels)
    gen_m = ranks_metrics(gd_rows, rels) if gen_bb is not None else None
    chance = float(np.mean([r.mean() for r in rels]))
    # where the maps fall: each query's best same-person photo (true face box of that person)
    # (ranked by L2, as measured before the centred cosine; ``same_by_cosine``: how many of those photos the
    # faces preset's score, cos(q − μ_f, r − μ_f) of the nearest face, ranks first among the person's photos too)
    from retrieval.faces.network import mean_face

    mu_f = mean_face()[0]
    pairs, same_by_cosine = [], 0
    for (pid, _), info, rel, d in zip(queries, qinfo, rels, fd_rows):
        if info is None:
            continue
        qimg, qface, qv = info
        cos = np.array([(((v - mu_f) @ (qv - mu_f)) / (np.linalg.norm(v - mu_f, axis=1)
                                                      * np.linalg.norm(qv - mu_f))).max() if len(v) else -np.inf
                        for _, _, v in gallery])
        for gi in np.argsort(d):
            if not rel[gi]:
                continue
            img, faces, vecs = gallery[gi]
            box = next(b for p, b in photos[gi][1] if p == pid)
            cand = [f for f in faces if _iou(f.box, box) > 0.3]
            if cand:
                pairs.append((qimg, qface, img, cand[0], box))
                same_by_cosine += int(gi == next(j for j in np.argsort(-cos, kind="stable") if rel[j]))
            break
    mu = np.mean(np.concatenate([v for _, _, v in gallery if len(v)]), 0)
    return {"photos": len(photos), "true_faces": true_faces, "found": found, "detected": n_faces,
            "index_s": index_s, "index_cpu": index_cpu, "faces": face_m, "general": gen_m, "chance": chance, "queries": len(queries),
            "pairs": pairs, "mu": mu, "same_by_cosine": same_by_cosine}


# -- a real varied face set: deepface's test photos ---------------------------------------------------
REAL_HINT = ("skip: the real face set row needs deepface's test photos (MIT licence): "
             "git clone https://github.com/serengil/deepface and pass --real deepface/tests/unit/dataset")
LABEL_FILES = ("master.csv", "face-recognition-pivot.csv")  # pairs of photos, "Yes" = the same person
DISTRACTORS = ("couple.jpg", "selfie-many-people.jpg")  # unlabelled group photos: in the gallery, never relevant


def real_identities(root: Path) -> tuple[dict[str, int], list[str], dict]:
    """({photo: identity}, distractors, notes) of deepface's tests/unit/dataset: identities are the connected
    components of the pairs marked "Yes" in its label files; a "No" pair inside a component is an error."""
    import csv

    pairs = []
    for name in LABEL_FILES:
        if (root / name).is_file():
            with open(root / name, newline="") as fh:
                for r in csv.DictReader(fh):
                    d = (r.get("Decision") or r.get("decision") or "").strip()
                    pairs.append((Path(r["file_x"]).name, Path(r["file_y"]).name, d, name))
    if not pairs:
        raise SystemExit(f"{root}: no master.csv of labelled pairs (is it deepface's tests/unit/dataset?)")
    c = _common.Components()
    find = c.find
    for a, b, d, _ in pairs:
        find(a), find(b)
        if d == "Yes":
            c.union(a, b)
    clash = [(a, b) for a, b, d, _ in pairs if d == "No" and find(a) == find(b)]
    if clash:
        raise SystemExit(f"{root}: 'No' pairs inside one identity, e.g. {clash[:3]}")
    roots = sorted({find(x) for x in c.parent})
    ident = {x: roots.index(find(x)) for x in sorted(c.parent) if (root / x).is_file()}
    distractors = [d for d in DISTRACTORS if (root / d).is_file() and d not in ident]
    unlabelled = sorted(p.name for p in root.glob("*.jpg") if p.name not in ident and p.name not in distractors)
    counts = {name: sum(1 for *_, n in pairs if n == name) for name in LABEL_FILES}
    return ident, distractors, {"pairs": counts, "yes": sum(1 for _, _, d, _ in pairs if d == "Yes"),
                                "no": sum(1 for _, _, d, _ in pairs if d == "No"), "unlabelled": unlabelled}


def real(root: Path, finder, face_bb, gen_bb, progress) -> dict:
    """Leave-one-out over the labelled photos whose identity has ≥ 2 photos; the gallery is every other photo
    (labelled ones and the group-photo distractors). Face preset: the query photo's largest face against each
    photo's nearest face; general preset: whole photos, cosine."""
    from retrieval.images import load_image

    ident, distractors, notes = real_identities(root)
    files = sorted(ident) + distractors
    labels = np.array([ident.get(f, -1) for f in files])
    sizes = np.bincount(labels[labels >= 0])
    faces, vecs, gvecs, dims = [], [], [], []
    face_s = gen_s = 0.0
    for k, f in enumerate(files):
        img = load_image(str(root / f)).convert("RGB")
        dims.append(img.size)
        t0 = time.perf_counter()
        fs = finder.faces(np.asarray(img))
        vecs.append(face_bb.embed_images([Image.fromarray(x.chip) for x in fs]) if fs else np.zeros((0, 128)))
        face_s += time.perf_counter() - t0
        if gen_bb is not None:
            t0 = time.perf_counter()
            gvecs.append(gen_bb.embed_images([img])[0])
            gen_s += time.perf_counter() - t0
        faces.append(fs)
        progress(f"real faces {k + 1}/{len(files)}")
    gd = cosine_dist(np.array(gvecs), np.array(gvecs)) if gvecs else None
    queries = [q for q in range(len(files)) if labels[q] >= 0 and sizes[labels[q]] >= 2]
    fd_rows, gd_rows, rels, pairs = [], [], [], []
    from retrieval.faces.network import mean_face

    mu_f, same_by_cosine = mean_face()[0], 0  # pairs whose photo the faces preset's score ranks first too
    for q in queries:
        mask = np.arange(len(files)) != q
        rel = (labels == labels[q])[mask]
        rels.append(rel)
        if gd is not None:
            gd_rows.append(gd[q][mask])
        if not faces[q]:
            fd_rows.append(None)
            continue
        qv = vecs[q][0]
        d = np.array([np.linalg.norm(v - qv, axis=1).min() if len(v) else np.inf for v in vecs])
        fd_rows.append(d[mask])
        # the pair whose maps are measured: the best-ranked photo of the same person, its nearest face
        others = [g for g in np.argsort(d, kind="stable") if g != q and labels[g] == labels[q] and len(vecs[g])]
        if others:
            g = others[0]
            pairs.append((root / files[q], faces[q][0], root / files[g],
                          faces[g][int(np.argmin(np.linalg.norm(vecs[g] - qv, axis=1)))], None))
            cos = [(((vecs[j] - mu_f) @ (qv - mu_f)) / (np.linalg.norm(vecs[j] - mu_f, axis=1)
                                                         * np.linalg.norm(qv - mu_f))).max() for j in others]
            same_by_cosine += int(others[int(np.argmax(cos))] == g)
    return {"files": len(files), "identities": int((sizes > 0).sum()), "labelled": len(ident),
            "distractors": distractors, "queries": len(queries), "sizes": (int(sizes[sizes > 0].min()),
                                                                         int(sizes.max())),
            "no_face": sum(1 for f in faces if not f), "faces": sum(len(f) for f in faces),
            "multi": sum(1 for f in faces if len(f) > 1), "notes": notes,
            "min_side": min(min(d) for d in dims), "max_side": max(max(d) for d in dims),
            "chance": float(np.mean([r.mean() for r in rels])), "face_s": face_s, "gen_s": gen_s,
            "vecs": vecs, "labels": labels, "query_ids": queries,
            "faces_m": ranks_metrics(fd_rows, rels), "general": ranks_metrics(gd_rows, rels) if gd is not None else None, "pairs": pairs,
            "same_by_cosine": same_by_cosine}


# -- the faces preset's metric: L2 against cosine, plain or centred ----------------------------------------
METRICS = ("L2 (today)", "cosine", "cosine of x − μ")


def photo_distances(vecs: list[np.ndarray], q: int, metric: str, mu: np.ndarray) -> np.ndarray:
    """Distance (lower = better) from photo ``q``'s first face to every photo's nearest face (inf: no face)."""
    qv = vecs[q][0]
    out = np.full(len(vecs), np.inf)
    for i, v in enumerate(vecs):
        if not len(v):
            continue
        if metric == METRICS[0]:
            out[i] = np.linalg.norm(v - qv, axis=1).min()
        else:
            a, b = (v - mu, qv - mu) if metric == METRICS[2] else (v, qv)
            out[i] = 1 - (a @ b / (np.linalg.norm(a, axis=1) * np.linalg.norm(b))).max()
    return out


def pair_auc(dist: np.ndarray, same: np.ndarray) -> float:
    """Probability that a same-person pair is closer than a different-person pair (ties count half)."""
    from scipy.stats import rankdata

    r = rankdata(-dist)
    n1, n0 = same.sum(), (~same).sum()
    return float((r[same].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))


def metric_rows(set_name: str, vecs: list[np.ndarray], labels: np.ndarray, queries: list[int]) -> tuple[list, list]:
    """R@1, mAP, pair AUC per metric, and how far each one's rankings are from L2's, leave-one-out over
    ``queries`` (a photo without a face: a miss, as ranks_metrics counts it)."""
    allv = np.concatenate([v for v in vecs if len(v)])
    mu = allv.mean(0)
    orders, rows = {}, []
    for metric in METRICS:
        d_rows, rels, order, dists, sames = [], [], {}, [], []
        for q in queries:
            mask = np.arange(len(vecs)) != q
            rel = (labels == labels[q])[mask]
            rels.append(rel)
            if not len(vecs[q]):
                d_rows.append(None)
                continue
            d = photo_distances(vecs, q, metric, mu)[mask]
            d_rows.append(d)
            order[q] = np.argsort(d, kind="stable")
            fin = np.isfinite(d)
            dists.append(d[fin])
            sames.append(rel[fin])
        orders[metric] = order
        r1, mean_ap = ranks_metrics(d_rows, rels)
        dd, ss = np.concatenate(dists), np.concatenate(sames)
        sim = (lambda d: d) if metric == METRICS[0] else (lambda d: 1 - d)  # cosines shown as similarities
        row = [set_name, metric, f"{r1:.4f}", f"{mean_ap:.4f}", f"{pair_auc(dd, ss):.4f}",
               f"{np.median(sim(dd[ss])):.3f} / {np.median(sim(dd[~ss])):.3f}",
               f"{(dd[ss] < 0.6).mean():.3f} / {(dd[~ss] >= 0.6).mean():.3f}" if metric == METRICS[0] else "-"]
        if metric != METRICS[0]:
            base = orders[METRICS[0]]
            top1 = [q for q in order if order[q][0] != base[q][0]]
            rel_of = {q: (labels == labels[q])[np.arange(len(vecs)) != q] for q in order}
            fixed = sum(1 for q in top1 if rel_of[q][order[q][0]] and not rel_of[q][base[q][0]])
            broke = sum(1 for q in top1 if not rel_of[q][order[q][0]] and rel_of[q][base[q][0]])
            top10 = sum(1 for q in order if set(order[q][:10]) != set(base[q][:10]))
            same = sum(1 for q in order if np.array_equal(order[q], base[q]))
            row += [f"{len(top1)} ({fixed} now right, {broke} now wrong)", top10, f"{same}/{len(order)}"]
        else:
            row += ["-", "-", "-"]
        rows.append(row)
    norms = np.linalg.norm(allv, axis=1)
    centred = np.linalg.norm(allv - mu, axis=1)
    nrows = [[set_name, len(allv), f"{norms.mean():.3f}", f"{norms.min():.3f}", f"{norms.max():.3f}",
              f"{norms.std() / norms.mean():.3f}", f"{np.linalg.norm(mu):.3f}", f"{centred.mean():.3f}"]]
    return rows, nrows


def metric_report(args, o: dict | None, rl: dict | None, load: tuple, save: bool = True) -> str:
    rows, nrows = [], []
    if o:
        r, n = metric_rows("ORL (400 photos, 40 people, leave-one-out)", o["vecs"], o["labels"], list(range(o["n"])))
        rows, nrows = rows + r, nrows + n
    if rl:
        r, n = metric_rows(f"real photos: deepface's test set ({rl['files']} photos, {rl['queries']} queries)",
                           rl["vecs"], rl["labels"], rl["query_ids"])
        rows, nrows = rows + r, nrows + n
    cmd = ("python bench/faces.py --metric" + (" --fixed-mean" if getattr(args, "fixed_mean", False) else "")
           + (" --real DIR" if args.real else "") + f" --threads {args.threads}")
    text = ("# The faces preset's metric: L2 (today), cosine, or cosine of descriptors centred on the collection\n\n"
            f"`{cmd}` · torch threads {args.threads} · load average {load[0]:.1f} → {load[1]:.1f} (2 cores, shared "
            "machine) · dlib HOG detection, 5-point alignment, dlib's face ResNet through the PyTorch port "
            "(the faces preset's pipeline as bench/faces.py runs it); a photo ranks by its nearest face; the "
            "query is the photo's first face. μ: the mean of every face descriptor of that collection. Sets as in "
            "bench/results/faces.md (ORL: every photo queries the other 399; real photos: every labelled photo "
            "queries the rest, 2 group photos as distractors; DIR: `tests/unit/dataset` of serengil/deepface).\n\n"
            "median same / different person: the median L2 distance (L2) or cosine (the others) of the same-person and "
            "the different-person pairs. pair AUC: over every (query, gallery photo) pair, the probability that a same-person pair is closer "
            "than a different-person pair (how well one threshold could separate them). Top-1 changed: queries "
            "whose rank-1 photo differs from L2's. Top-10 changed: queries whose top-10 set differs. Ranking "
            "identical: queries whose whole ranking equals L2's. At dlib's 0.6 (the preset's same-person "
            "threshold, retrieval/faces/search.py): the share of same-person pairs closer than 0.6 and of "
            "different-person pairs at 0.6 or more (L2 only: the cosines have no documented threshold). L2 "
            "distances are the same for x and x − μ: L2 is already centred.\n\n")
    text += _common.table(["set", "metric", "R@1", "mAP", "pair AUC", "median same / different person",
                           "at dlib's 0.6: same < / different ≥",
                           "top-1 changed vs L2", "top-10 changed", "ranking identical"], rows)
    text += ("\n\n## Descriptor norms\n\n‖x‖ of every face descriptor: mean, min, max, coefficient of variation "
             "(sd / mean); ‖μ‖; mean ‖x − μ‖. For unit-norm descriptors L2 and cosine rank identically "
             "(‖a − b‖² = 2 − 2 cos); the spread of the norms is what can make them differ.\n\n")
    text += _common.table(["set", "faces", "mean ‖x‖", "min", "max", "sd/mean", "‖μ‖", "mean ‖x − μ‖"], nrows)
    if save:
        _common.save("faces-metric", text)
    return text


class _NoGeneral:
    """Stands in for the general preset's backbone where only face descriptors are wanted (--metric,
    --fixed-mean): orl() and real() embed the whole photos too, for a column those reports do not show."""

    def embed_images(self, imgs) -> np.ndarray:
        return np.ones((len(imgs), 1), np.float32)


def descriptor_sets(args, sets: set, orl_root: Path, finder, progress) -> tuple[dict | None, dict | None]:
    """The face descriptors of ORL and of the real photos (what metric_report and fixed_mean_report read),
    computed by orl()/real() or read back from ``--descriptors FILE.npz`` (written there when absent)."""
    cache = args.descriptors
    if cache is not None and cache.is_file():
        z = np.load(cache, allow_pickle=False)

        def unpack(tag: str) -> list[np.ndarray]:
            flat, counts = z[f"{tag}_vecs"], z[f"{tag}_counts"]
            return np.split(flat, np.cumsum(counts)[:-1])

        o = rl = None
        if "orl" in sets and "orl_vecs" in z:
            o = {"n": int(len(z["orl_counts"])), "vecs": unpack("orl"), "labels": z["orl_labels"]}
        if "real" in sets and "real_vecs" in z:
            rl = {"files": int(len(z["real_counts"])), "vecs": unpack("real"), "labels": z["real_labels"],
                  "query_ids": [int(q) for q in z["real_queries"]]}
            rl["queries"] = len(rl["query_ids"])
        print(f"descriptors read from {cache}", file=sys.stderr)
        return o, rl
    from retrieval.faces.network import load_backbone

    face_bb, gen = load_backbone(), _NoGeneral()
    o = orl(orl_root, finder, face_bb, gen, progress) if "orl" in sets else None
    rl = real(args.real, finder, face_bb, gen, progress) if "real" in sets and args.real else None
    if cache is not None:
        out = {}
        for tag, d in (("orl", o), ("real", rl)):
            if d is None:
                continue
            out[f"{tag}_vecs"] = np.concatenate([v.reshape(-1, 128) for v in d["vecs"]])
            out[f"{tag}_counts"] = np.array([len(v) for v in d["vecs"]])
            out[f"{tag}_labels"] = np.asarray(d["labels"])
            if tag == "real":
                out["real_queries"] = np.array(d["query_ids"])
        np.savez(cache, **out)
    return o, rl


# -- a fixed population mean μ_f, cross-set (--fixed-mean) ---------------------------------------------------
# Cosine of descriptors centred on a reference μ decomposes exactly into channel terms (SFAM's CIS):
# CIS_k = (q−μ)_k (r−μ)_k / (‖q−μ‖‖r−μ‖). The question: which μ. A collection's own mean moves with the collection
# (two faces: −1 for every pair); a fixed μ_f shipped with the preset does not. Each set's μ is applied to the other
# set, and thresholds are chosen on one set and reported on the other: nothing is tuned on what it reports.
BOOT = 2000  # identity-bootstrap draws for the intervals


class FaceSet:
    """One set's descriptors: ``vecs`` per photo (k × 128, k ≥ 0 faces, the first the largest), identity labels
    (−1: a distractor, never relevant), the query photos."""

    def __init__(self, name: str, short: str, vecs: list[np.ndarray], labels, queries: list[int]):
        self.name, self.short = name, short
        self.vecs = [np.asarray(v, np.float64).reshape(-1, 128) for v in vecs]
        self.labels = np.asarray(labels)
        self.queries = list(queries)
        self.n = len(self.vecs)
        self.F = np.concatenate([v for v in self.vecs if len(v)])
        self.owner = np.concatenate([np.full(len(v), i) for i, v in enumerate(self.vecs)]).astype(int)
        self.mu = self.F.mean(0)
        # verification pairs: the first face of every labelled photo, every unordered pair of two of them
        self.vidx = [i for i in range(self.n) if self.labels[i] >= 0 and len(self.vecs[i])]
        self.X = np.array([self.vecs[i][0] for i in self.vidx])
        self.xl = self.labels[self.vidx]
        self.iu = np.triu_indices(len(self.vidx), 1)
        self.same = (self.xl[:, None] == self.xl[None])[self.iu]


def face_sim(qv: np.ndarray, F: np.ndarray, kind: str, mu) -> np.ndarray:
    """Similarity (higher = closer) of ``qv`` to each row of ``F``: ``l2`` −‖q − r‖; ``cos`` cosine of q − μ and
    r − μ (μ None: plain cosine); ``dot`` (q − μ)·(r − μ) = ½(‖q−μ‖² + ‖r−μ‖² − ‖q−r‖²), the L2-implied similarity
    SFAM's spec decomposes for an L2 model (what the faces maps explain today, μ the index's mean)."""
    if kind == "l2":
        return -np.linalg.norm(F - qv, axis=1)
    a, b = (F, qv) if mu is None else (F - mu, qv - mu)
    if kind == "dot":
        return a @ b
    return a @ b / (np.linalg.norm(a, axis=1) * np.linalg.norm(b))


def photo_sims(S: FaceSet, q: int, kind: str, mu) -> np.ndarray:
    """Every photo's similarity to photo ``q``'s first face: its closest face's (−inf: no face)."""
    out = np.full(S.n, -np.inf)
    np.maximum.at(out, S.owner, face_sim(S.vecs[q][0], S.F, kind, mu))
    return out


def pair_sims(X: np.ndarray, iu, kind: str, mu) -> np.ndarray:
    """Similarity of every unordered pair (``iu``) of the rows of ``X``."""
    if kind == "l2":
        return -np.linalg.norm(X[:, None] - X[None], axis=-1)[iu]
    a = X if mu is None else X - mu
    g = a @ a.T
    if kind == "cos":
        n = np.sqrt(np.diag(g))
        g = g / np.outer(n, n)
    return g[iu]


def per_query(S: FaceSet, kind: str, mu) -> dict:
    """Leave-one-out over S.queries: per query its ranking (photo indices of the others, best first), relevance
    in that order, rank-1 hit, average precision; a query photo without a face: a miss (R@1 0, AP 0)."""
    out = {"r1": [], "ap": [], "order": [], "hits": [], "sims": []}
    for q in S.queries:
        others = np.flatnonzero(np.arange(S.n) != q)
        rel = S.labels[others] == S.labels[q]
        if not len(S.vecs[q]):
            out["r1"].append(0.0), out["ap"].append(0.0), out["order"].append(None)
            out["hits"].append(None), out["sims"].append(None)
            continue
        sim = photo_sims(S, q, kind, mu)[others]
        order = np.argsort(-sim, kind="stable")
        hits = rel[order]
        prec = np.cumsum(hits) / np.arange(1, len(hits) + 1)
        out["r1"].append(float(hits[0]))
        out["ap"].append(float((prec * hits).sum() / max(hits.sum(), 1)))
        out["order"].append(others[order])
        out["hits"].append(hits)
        out["sims"].append(sim[order])
    out["r1"], out["ap"] = np.array(out["r1"]), np.array(out["ap"])
    return out


def boot_diff(S: FaceSet, diff: np.ndarray, rng: np.random.Generator) -> tuple[float, float]:
    """95 % interval of the mean of a per-query difference, resampling identities (a person's queries together)."""
    ids = S.labels[S.queries]
    uniq = np.unique(ids)
    pos = {u: i for i, u in enumerate(uniq)}
    col = np.array([pos[i] for i in ids])
    means = []
    for _ in range(BOOT):
        w = np.bincount(rng.integers(0, len(uniq), len(uniq)), minlength=len(uniq))[col]
        means.append((w * diff).sum() / w.sum())
    lo, hi = np.percentile(means, [2.5, 97.5])
    return float(lo), float(hi)


def fm_ranking(B: FaceSet, A: FaceSet, mu_pool: np.ndarray, rng) -> list[list]:
    """Ranking quality on B, each μ named by where it comes from."""
    specs = [("L2 (today)", "l2", None),
             ("cosine (plain, μ = 0)", "cos", None),
             ("cosine centred on B's own mean", "cos", B.mu),
             (f"cosine centred on μ_f = {A.short}'s mean (cross-set)", "cos", A.mu),
             ("cosine centred on μ_pool = both sets' means averaged (includes B)", "cos", mu_pool),
             ("centred dot (q−μ)·(r−μ), μ = B's own mean (the maps' number today)", "dot", B.mu),
             (f"centred dot (q−μ)·(r−μ), μ = {A.short}'s mean", "dot", A.mu)]
    base = per_query(B, "l2", None)
    rows = []
    for label, kind, mu in specs:
        m = base if kind == "l2" else per_query(B, kind, mu)
        if kind == "l2":
            d_r1 = d_ap = top1 = "-"
        else:
            lo, hi = boot_diff(B, m["r1"] - base["r1"], rng)
            d_r1 = f"{(m['r1'] - base['r1']).mean():+.4f} [{lo:+.4f}, {hi:+.4f}]"
            lo, hi = boot_diff(B, m["ap"] - base["ap"], rng)
            d_ap = f"{(m['ap'] - base['ap']).mean():+.4f} [{lo:+.4f}, {hi:+.4f}]"
            ch = [i for i, (a, b) in enumerate(zip(m["order"], base["order"])) if a is not None and a[0] != b[0]]
            top1 = (f"{len(ch)} ({sum(1 for i in ch if m['r1'][i] > base['r1'][i])} now right, "
                    f"{sum(1 for i in ch if m['r1'][i] < base['r1'][i])} now wrong)")
        rows.append([B.name, label.replace("B's", f"{B.short}'s").replace("(includes B)", f"(includes {B.short})"),
                     f"{m['r1'].mean():.4f}", f"{m['ap'].mean():.4f}", d_r1, d_ap, top1])
    return rows


def fm_stability(O: FaceSet, R: FaceSet, rng) -> tuple[list[list], list[list]]:
    """How far apart the two sets' means are, against how far faces lie from a mean; and how far a mean of n
    faces drawn from a set lies from that set's full mean (the own-mean of a collection of n faces)."""
    d = O.mu - R.mu
    cos = float(O.mu @ R.mu / (np.linalg.norm(O.mu) * np.linalg.norm(R.mu)))
    rows = [["cosine between the two means", f"{cos:.4f}"],
            [f"‖μ_{O.short}‖ / ‖μ_{R.short}‖", f"{np.linalg.norm(O.mu):.3f} / {np.linalg.norm(R.mu):.3f}"],
            [f"‖μ_{O.short} − μ_{R.short}‖", f"{np.linalg.norm(d):.3f}"]]
    for S, T in ((O, R), (R, O)):
        own = np.linalg.norm(S.F - S.mu, axis=1)
        other = np.linalg.norm(S.F - T.mu, axis=1)
        turn = np.einsum("ij,ij->i", S.F - S.mu, S.F - T.mu) / (own * other)
        rows += [[f"{S.short}: mean ‖x − μ_own‖ / mean ‖x − μ_{T.short}‖", f"{own.mean():.3f} / {other.mean():.3f}"],
                 [f"{S.short}: ‖μ_{O.short} − μ_{R.short}‖ / mean ‖x − μ_own‖", f"{np.linalg.norm(d) / own.mean():.2f}"],
                 [f"{S.short}: cosine of x − μ_own and x − μ_{T.short}, median [min]",
                  f"{np.median(turn):.3f} [{turn.min():.3f}]"]]
    srows = []
    for n in (2, 5, 10, 20, 50, 100):
        row = [n]
        for S in (O, R):
            if n >= len(S.F):
                row.append("-")
                continue
            dist = [np.linalg.norm(S.F[rng.choice(len(S.F), n, replace=False)].mean(0) - S.mu) for _ in range(500)]
            row.append(f"{np.mean(dist):.3f}")
        srows.append(row)
    return rows, srows


def threshold_at(sim_same, sim_diff, far=None, frr=None) -> float:
    """A threshold t (same person iff similarity ≥ t) giving the nearest achievable false-accept rate ``far``
    (share of different-person pairs ≥ t) or false-reject rate ``frr`` (same-person pairs < t), or, with neither,
    the equal-error point (|FAR − FRR| smallest, then FAR + FRR); t halfway between two neighbouring scores."""
    if far is not None:
        v = np.sort(sim_diff)[::-1]
        k = int(round(far * len(v)))
        return float(v[0] + 1e-9) if k == 0 else float((v[k - 1] + v[k]) / 2) if k < len(v) else float(v[-1])
    if frr is not None:
        v = np.sort(sim_same)
        k = int(round(frr * len(v)))
        return float(v[0]) if k == 0 else float((v[k - 1] + v[k]) / 2) if k < len(v) else float(v[-1] + 1e-9)
    cand = np.unique(np.concatenate([sim_same, sim_diff]))
    cand = np.concatenate([[cand[0] - 1e-9], (cand[1:] + cand[:-1]) / 2, [cand[-1] + 1e-9]])
    fa = np.array([(sim_diff >= t).mean() for t in cand])
    fr = np.array([(sim_same < t).mean() for t in cand])
    best = np.lexsort((fa + fr, np.abs(fa - fr)))[0]
    return float(cand[best])


def rates(sims: np.ndarray, same: np.ndarray, t: float) -> tuple[str, str]:
    """FAR and FRR at t as 'share (count/of)'."""
    fa, nd = int((sims[~same] >= t).sum()), int((~same).sum())
    fr, ns = int((sims[same] < t).sum()), int(same.sum())
    return f"{fa / nd:.4f} ({fa}/{nd})", f"{fr / ns:.4f} ({fr}/{ns})"


def fm_thresholds(A: FaceSet, B: FaceSet, mu_pool: np.ndarray) -> tuple[list[list], dict]:
    """Thresholds chosen on A and reported on B. Strict: μ = A's mean on both (nothing of B used). Pooled: μ = the
    average of both sets' means on both (B's descriptors enter μ, B's labels nothing)."""
    l2a, l2b = pair_sims(A.X, A.iu, "l2", None), pair_sims(B.X, B.iu, "l2", None)
    far_a = float((l2a[~A.same] >= -0.6).mean())
    frr_a = float((l2a[A.same] < -0.6).mean())
    l2_eer = threshold_at(l2a[A.same], l2a[~A.same])
    what = f"chosen on {A.short} → reported on {B.short}"
    rows = [[what, "-", "L2 < 0.6 (dlib's, chosen on neither)", "0.6", *rates(l2a, A.same, -0.6),
             *rates(l2b, B.same, -0.6)],
            [what, "-", f"L2 at {A.short}'s equal-error point", f"{-l2_eer:.3f}", *rates(l2a, A.same, l2_eer),
             *rates(l2b, B.same, l2_eer)]]
    chosen = {}
    for tag, mu, mu_label in (("strict", A.mu, f"μ_{A.short} (strict)"),
                              ("pooled", mu_pool, f"μ_pool (includes {B.short}'s descriptors)")):
        ca, cb = pair_sims(A.X, A.iu, "cos", mu), pair_sims(B.X, B.iu, "cos", mu)
        chosen[tag] = {"far": threshold_at(ca[A.same], ca[~A.same], far=far_a),
                       "frr": threshold_at(ca[A.same], ca[~A.same], frr=frr_a),
                       "eer": threshold_at(ca[A.same], ca[~A.same])}
        for key, label in (("far", "FAR of L2 < 0.6"), ("frr", "FRR of L2 < 0.6"), ("eer", "equal error")):
            t = chosen[tag][key]
            rows.append([what, mu_label, f"centred cosine ≥ t, t matching {A.short}'s {label}", f"{t:.3f}",
                         *rates(ca, A.same, t), *rates(cb, B.same, t)])
    return rows, chosen


def fm_sweep(B: FaceSet, A: FaceSet, t: float) -> list[list]:
    """On B, μ moved from B's own mean towards (and past) A's: μ = μ_B + α(μ_A − μ_B). How the scores, the best
    threshold and the fixed threshold ``t``'s error rates move with ‖μ − μ_B‖ (α = 1.5: extrapolated, no real set)."""
    gap = np.linalg.norm(A.mu - B.mu)
    rows = []
    for alpha in (0.0, 0.25, 0.5, 0.75, 1.0, 1.5):
        mu = B.mu + alpha * (A.mu - B.mu)
        c = pair_sims(B.X, B.iu, "cos", mu)
        te = threshold_at(c[B.same], c[~B.same])
        fa, fr = rates(c, B.same, t)
        rows.append([B.short, f"{alpha:g}" + (" (μ_pool)" if alpha == 0.5 else f" (μ_{A.short})" if alpha == 1 else
                                              " (own mean)" if alpha == 0 else " (extrapolated)" if alpha > 1 else ""),
                     f"{alpha * gap:.2f}", f"{np.median(c[B.same]):.3f}", f"{np.median(c[~B.same]):.3f}",
                     f"{te:.3f}", fa, fr])
    l2 = pair_sims(B.X, B.iu, "l2", None)
    rows.append([B.short, "L2 < 0.6 (no μ)", "any", "-", "-", "-", *rates(l2, B.same, -0.6)])
    return rows


def inversions(words: np.ndarray, k: int) -> tuple[bool, bool, int]:
    """In the first k of a ranking whose words are ``words`` (True = "same person"): rank 1 "different" with a
    "same" below it; any "different" above a "same"; how many such (i < j) pairs."""
    v = np.asarray(words[:k], bool)
    below_same = np.cumsum(v[::-1])[::-1]  # "same" words at or below each rank
    n_inv = int(below_same[~v].sum())
    return bool(not v[0] and v.any()), n_inv > 0, n_inv


def fm_consistency(B: FaceSet, mu: np.ndarray, t: float, k: int = 10) -> tuple[list[list], list[list]]:
    """Rank by one number and word the verdict by another: how often the words contradict the order (a
    "different" above a "same" within the first k), and how often the two verdicts disagree on a pair."""
    spec = {"L2": ("l2", None, -0.6), "centred cosine": ("cos", mu, t)}
    rankings = {name: per_query(B, kind, m) for name, (kind, m, _) in spec.items()}
    rows = []
    for rank_by, verdict_by in (("L2", "L2"), ("centred cosine", "centred cosine"), ("centred cosine", "L2"),
                                ("L2", "centred cosine")):
        kind, m, thr = spec[verdict_by]
        r1_diff = anyinv = total = n = 0
        for q, order in zip(B.queries, rankings[rank_by]["order"]):
            if order is None:
                continue
            n += 1
            a, b, c = inversions(photo_sims(B, q, kind, m)[order] >= thr, k)
            r1_diff, anyinv, total = r1_diff + a, anyinv + b, total + c
        rows.append([f"rank by {rank_by}, words by {verdict_by}", f"{r1_diff}/{n}", f"{anyinv}/{n}", total])
    both = l2_only = cos_only = tot = 0  # every (query, other photo with a face) pair
    has_face = np.array([len(v) > 0 for v in B.vecs])
    for q in B.queries:
        if not len(B.vecs[q]):
            continue
        mask = (np.arange(B.n) != q) & has_face
        sl = photo_sims(B, q, "l2", None)[mask] >= -0.6
        sc = photo_sims(B, q, "cos", mu)[mask] >= t
        tot += len(sl)
        both += int((sl & sc).sum())
        l2_only += int((sl & ~sc).sum())
        cos_only += int((~sl & sc).sum())
    return rows, [tot, both, l2_only, cos_only, f"{(l2_only + cos_only) / tot:.4f}"]


def fm_small(B: FaceSet, scores: list[tuple], rng, draws: int = 1000) -> list[list]:
    """Collections of 2 and 5 faces drawn from B (first faces of labelled photos). "with a true pair": the query,
    one other photo of the same person, and (5 faces) 3 photos of 3 other people; "no true pair": 2 or 5 different
    people. The query is one of the collection's faces (an indexed photo searched against the rest). ``scores``:
    (label, kind, μ or "own", same-person threshold); L2's threshold is a distance."""
    X, lab = B.X, B.xl
    by = {u: np.flatnonzero(lab == u) for u in np.unique(lab)}
    multi = [u for u, ix in by.items() if len(ix) >= 2]
    people = list(by)
    rows = []
    for size in (2, 5):
        colls = {"true": [], "none": []}
        for _ in range(draws):
            u = multi[rng.integers(len(multi))]
            qi, ti = rng.choice(by[u], 2, replace=False)
            others = rng.choice([p for p in people if p != u], size - 2, replace=False)
            colls["true"].append([qi, ti] + [rng.choice(by[p]) for p in others])
            colls["none"].append([rng.choice(by[p]) for p in rng.choice(people, size, replace=False)])
        for label, kind, mu, thr in scores:
            true, diff, r1, wrong_t, wrong_n = [], [], [], [], []
            for case, cl in colls.items():
                for coll in cl:
                    C = X[coll]
                    s = face_sim(C[0], C[1:], kind, C.mean(0) if isinstance(mu, str) else mu)
                    same = (-s < thr) if kind == "l2" else (s >= thr)
                    if case == "true":
                        true.append(s[0])
                        diff += list(s[1:])
                        r1.append(float(np.argmax(s) == 0))
                        wrong_t.append(float(not same[0] or same[1:].any()))
                    else:
                        diff += list(s)
                        wrong_n.append(float(same.any()))
            sign = -1 if kind == "l2" else 1

            def dist(x):
                x = sign * np.asarray(x)
                return f"{np.median(x):.3f} [{np.percentile(x, 5):.3f}, {np.percentile(x, 95):.3f}]"

            rows.append([B.short, size, label, dist(true), dist(diff), f"{np.mean(r1):.3f}" if size > 2 else "-",
                         f"{np.mean(wrong_t):.3f}", f"{np.mean(wrong_n):.3f}"])
    return rows


def fm_candidate(O: FaceSet, R: FaceSet, t: float, chosen: dict, path: Path, cmd: str) -> np.ndarray:
    """μ_f to ship: the two sets' means averaged (each set weighs the same; ORL alone has 400 of the 468 faces)."""
    import json

    mu = (O.mu + R.mu) / 2
    path.write_text(json.dumps({
        "what": "candidate fixed reference mean μ_f for the faces preset's score: the centred cosine "
                "cos(q − μ_f, r − μ_f) of two dlib face descriptors (128-d); same person iff ≥ threshold",
        "how": f"the average of two set means, each the mean of every face descriptor of that set: ORL "
               f"({len(O.F)} faces, 40 people, grayscale 92×112 studio photos) and deepface's tests/unit/dataset "
               f"({len(R.F)} faces in {R.n} photos, 13 public figures + 2 group photos); dlib HOG detection, "
               f"5-point alignment, 150 px chip with 0.25 padding, dlib_face_recognition_resnet_model_v1 through "
               f"the project's PyTorch port (retrieval/faces/network.py); float64 mean, rounded to 7 decimals",
        "command": cmd,
        "results": "bench/results/faces-metric.md (section: A fixed reference mean μ_f)",
        "threshold": t,
        "threshold_how": "the mean of the two equal-error thresholds chosen with this μ_f on one set each "
                         "(ORL {:.3f}, real {:.3f}), rounded to 0.01".format(chosen["on ORL"]["pooled"]["eer"],
                                                                           chosen["on real"]["pooled"]["eer"]),
        "norm": round(float(np.linalg.norm(mu)), 6),
        "set_means_cosine": round(float(O.mu @ R.mu / np.linalg.norm(O.mu) / np.linalg.norm(R.mu)), 6),
        "set_means_distance": round(float(np.linalg.norm(O.mu - R.mu)), 6),
        "mu": [round(float(x), 7) for x in mu],
    }, indent=1, ensure_ascii=False) + "\n")
    return mu


def fixed_mean_report(args, o: dict, rl: dict, load: tuple, head: str) -> None:
    rng = np.random.default_rng(args.seed)
    O = FaceSet("ORL (400 photos, 40 people, leave-one-out)", "ORL", o["vecs"], o["labels"], list(range(o["n"])))
    R = FaceSet(f"real photos: deepface's test set ({rl['files']} photos, {rl['queries']} queries)", "real",
                rl["vecs"], rl["labels"], rl["query_ids"])
    mu_pool = (O.mu + R.mu) / 2
    rank_rows = fm_ranking(O, R, mu_pool, rng) + fm_ranking(R, O, mu_pool, rng)
    stab, sub = fm_stability(O, R, rng)
    t_rows, chosen = [], {}
    for A, B in ((O, R), (R, O)):
        rows, c = fm_thresholds(A, B, mu_pool)
        t_rows += rows
        chosen[f"on {A.short}"] = c
    t_cand = round((chosen["on ORL"]["pooled"]["eer"] + chosen["on real"]["pooled"]["eer"]) / 2, 2)
    cand_rows = []
    for S in (O, R):
        c = pair_sims(S.X, S.iu, "cos", mu_pool)
        cand_rows.append([S.short, f"centred cosine (μ_pool) ≥ {t_cand:.2f}", *rates(c, S.same, t_cand)])
        cand_rows.append([S.short, "L2 < 0.6 (today)", *rates(pair_sims(S.X, S.iu, "l2", None), S.same, -0.6)])
    sweep = fm_sweep(O, R, t_cand) + fm_sweep(R, O, t_cand)
    cons, prows, small = [], [], []
    for A, B in ((R, O), (O, R)):  # reported on B
        t_strict = chosen[f"on {A.short}"]["strict"]["eer"]
        for cfg, mu, t in ((f"strict: μ_{A.short}, t = {t_strict:.3f} ({A.short}'s equal error)", A.mu, t_strict),
                           (f"candidate: μ_pool, t = {t_cand:.2f}", mu_pool, t_cand)):
            c, p = fm_consistency(B, mu, t)
            cons += [[B.short, cfg, *r] for r in c]
            prows.append([B.short, cfg, *p])
        small += fm_small(B, [(f"centred cosine, μ_{A.short} fixed (strict), ≥ {t_strict:.3f}", "cos", A.mu, t_strict),
                              (f"centred cosine, μ_pool fixed (candidate), ≥ {t_cand:.2f}", "cos", mu_pool, t_cand),
                              (f"centred cosine, the collection's own mean, ≥ {t_cand:.2f}", "cos", "own", t_cand),
                              ("L2 distance, < 0.6 (today)", "l2", None, 0.6)], rng)
    cmd = f"python bench/faces.py --metric --fixed-mean --real DIR --threads {args.threads} --seed {args.seed}"
    fm_candidate(O, R, t_cand, chosen, _common.RESULTS / "faces-mu.json", cmd)
    text = head + "\n\n" + FM_TEXT.format(cmd=cmd, boot=BOOT, no=len(O.F), nr=len(R.F), so=int(O.same.sum()),
                                           do=int((~O.same).sum()), sr=int(R.same.sum()), dr=int((~R.same).sum()),
                                           vr=len(R.vidx), l0=load[0], l1=load[1])
    text += "\n\n### 1. Ranking\n\n" + FM_RANK + "\n\n" + _common.table(
        ["set", "ranked by", "R@1", "mAP", "ΔR@1 vs L2 [95 %]", "ΔmAP vs L2 [95 %]", "top-1 changed vs L2"], rank_rows)
    text += "\n\n### How stable is μ_f\n\n" + FM_STAB + "\n\n" + _common.table(["what", "value"], stab)
    text += "\n\n" + FM_SUB + "\n\n" + _common.table(
        ["faces in the collection", "ORL: mean ‖μ_n − μ_ORL‖", "real: mean ‖μ_n − μ_real‖"], sub)
    text += "\n\n### 2. A same-person threshold for the centred cosine\n\n" + FM_THR + "\n\n" + _common.table(
        ["protocol", "μ", "verdict", "threshold", "FAR where chosen", "FRR where chosen", "FAR where reported",
         "FRR where reported"], t_rows)
    text += "\n\n" + FM_SWEEP.format(t=t_cand) + "\n\n" + _common.table(
        ["set", "α", "‖μ − μ_own‖", "median same", "median different", "equal-error t there",
         f"FAR at t = {t_cand:.2f}", f"FRR at t = {t_cand:.2f}"], sweep)
    text += "\n\n" + FM_CAND_T.format(t=t_cand, to=chosen["on ORL"]["pooled"]["eer"],
                                      tr=chosen["on real"]["pooled"]["eer"]) + "\n\n" + _common.table(
        ["set", "verdict", "FAR", "FRR"], cand_rows)
    text += "\n\n" + FM_CONS + "\n\n" + _common.table(
        ["set", "μ and t", "ranking / words", "rank 1 \"different\", a \"same\" below it (top 10)",
         "queries with any \"different\" above a \"same\" (top 10)", "such (i < j) pairs"], cons)
    text += "\n\n" + FM_PAIRS + "\n\n" + _common.table(
        ["set", "μ and t", "(query, photo) pairs", "same by both", "same by L2 only", "same by cosine only",
         "verdicts differ"], prows)
    text += "\n\n### 3. Small collections\n\n" + FM_SMALL + "\n\n" + _common.table(
        ["set", "faces", "score", "true pair: median [5 %, 95 %]", "different pairs: median [5 %, 95 %]", "R@1",
         "wrong word, with a true pair", "wrong word, no true pair"], small)
    text += "\n\n" + FM_CAND
    _common.save("faces-metric", text)


FM_TEXT = """## A fixed reference mean μ_f (cross-set)

`{cmd}` · torch threads 1 (RETRIEVE_THREADS=1 OMP_NUM_THREADS=1) · load average {l0:.1f} → {l1:.1f} · the same
descriptors as the tables above (ORL: {no} faces; real photos: {nr} faces). Cosine of descriptors centred on a
reference μ decomposes exactly into per-channel terms, CIS_k = (q−μ)_k (r−μ)_k / (‖q−μ‖ ‖r−μ‖), Σ_k CIS_k = the
score; L2 (and d²) decomposes only into terms −(q_k − r_k)² ≤ 0. Which μ: the collection's own mean moves with the
collection; a fixed μ_f would ship with the preset. Protocol: each set's mean is applied to the other set, and
thresholds are chosen on one set and reported on the other. Rows that do not follow it say so: the own-mean rows,
and μ_pool (the average of both sets' means: the reported set's descriptors enter it, its labels never), given
because a shipped μ_f would sit between populations, not on one. Intervals: 95 % bootstrap over identities
({boot} draws; a person's queries resampled together), paired against L2 on the same queries. Verification pairs
(§2, §3): the first (largest) face of every labelled photo with a face, every unordered pair of two of them (ORL:
{so} same-person / {do} different-person pairs; real photos: {vr} faces, {sr} / {dr}; the 2 group photos are left
out there, their people unknown)."""

FM_RANK = """Leave-one-out as in the first table (a photo ranks by its closest face to the query's first face).
Rows: L2 (today); plain cosine; cosine centred on the set's own mean (the collection's, as in the first table);
centred on μ_f = the other set's mean (the strict cross-set number); centred on μ_pool (the candidate saved in
faces-mu.json; includes the reported set's descriptors); and the centred dot product (q−μ)·(r−μ) =
½(‖q−μ‖² + ‖r−μ‖² − d²), the number the faces maps decompose today (SFAM spec, metric l2, μ the index's mean),
ranked by directly. One query of 400 is 0.0025 of R@1 on ORL, one of 61 is 0.0164 on the real photos."""

FM_STAB = """The two sets are as different as face photos get here (ORL: 40 mostly young people, grayscale 92×112
studio photos; real: colour photos of 13 public figures, 7 to 1000+ px, varied pose and light). "cosine of
x − μ_own and x − μ_other": for every face, how far its centred direction turns when centred on the other set's
mean instead of its own (1 = not at all)."""

FM_SUB = """A collection's own mean from n faces (drawn at random from one set, 500 draws): its mean distance from
that set's full mean. Compare with ‖μ_ORL − μ_real‖ above (and with 0.16, μ_pool's distance from each set's mean):
below the size where these rows fall under it, a collection's own mean is a worse estimate of its population's
mean than the fixed one."""

FM_THR = """Same person iff similarity ≥ t (L2: iff d < t). Chosen on one set, then applied unchanged, with the same
μ, to the other. μ strict: the choosing set's own mean (nothing of the reported set used); μ_pool: both means
averaged. "FAR of L2 < 0.6": t such that the centred cosine falsely accepts as many different-person pairs of the
choosing set as dlib's 0.6 does there; "FRR": as many same-person pairs rejected; "equal error": FAR = FRR on the
choosing set. For comparison: dlib's 0.6 (chosen on LFW, on neither set) and L2 at the choosing set's own
equal-error point, transferred the same way."""

FM_SWEEP = """Why the strict rows fail: a centred cosine's scale depends on where μ sits. If μ is off the collection's
own mean by δ, every centred vector gains the common part −δ, and different people's cosine rises from about 0
towards ‖δ‖² / (‖x − μ_own‖² + ‖δ‖²). Below: on each set, μ moved from its own mean (α = 0) through μ_pool
(α = 0.5) to the other set's mean (α = 1) and beyond (α = 1.5, extrapolated: no real set behind it); the fixed
t = {t:.2f} (the candidate below) against the threshold that set itself would want. L2 < 0.6 has no μ."""

FM_CAND_T = """The candidate: μ_f = μ_pool, t = {t:.2f} = the mean of the two μ_pool equal-error thresholds (chosen on
ORL {to:.3f}, on the real photos {tr:.3f}; each one's transfer to the other set is in the μ_pool rows above). Its
error rates on both sets — not held out (μ_pool and t saw both), for the reading beside today's rule:"""

FM_CONS = """Words and order. Each query's ranking (leave-one-out, photos), the first 10 results, each worded "same
person" or "different" by a verdict rule. When the ranking and the words come from the same number, a "different"
can never sit above a "same" (0 by construction: the first two rows of each block check it); mixed, they can."""

FM_PAIRS = """Every (query, other photo) pair of the leave-one-out: how often the two verdicts (L2 < 0.6;
centred cosine ≥ t) disagree."""

FM_SMALL = """Random collections of first faces of labelled photos (1000 draws of each kind and size): "with a true
pair" = the query, one other photo of the same person and (5 faces) photos of 3 other people; "no true pair" = 2 or
5 different people. The query is one of the collection's faces (an indexed photo searched against the rest); the
scores are the query's against the others. Scores as similarities for the cosines, as distances for L2. A fixed μ
makes a pair's score independent of the collection; the collection's own mean does not (2 faces: the two centred
vectors are opposite, −1 for every pair). "Wrong word": a collection where some pair is worded wrongly (a
different person called "same", or the true pair "different"); the own-mean rows use the candidate's t, to show
that a threshold does not carry over between μ's. R@1: the true pair ranked first (5 faces)."""

FM_CAND = """### The candidate μ_f

`bench/results/faces-mu.json`: 128 floats (μ_pool, the average of the two sets' means: each set weighs the same;
ORL alone holds 400 of the 468 faces), the threshold t above, and how both were computed. A candidate, not product
code: nothing in retrieval/ reads it."""


# -- where the maps fall: face box, eyes/nose/mouth ------------------------------------------------------
def parts_rect(face) -> tuple[float, float, float, float]:
    """The eyes/nose/mouth region in the aligned chip's pixels (eyes level there), from the 5 landmarks (four
    eye corners, the base of the nose): across the outer eye corners, from half the eye-to-nose distance ``d``
    above the eyes' line (the brows) to ``d`` below the base of the nose (the mouth; not the chin)."""
    from retrieval.faces.detect import invert

    inv = invert(face.to_photo)
    p = (inv @ np.c_[face.landmarks, np.ones(len(face.landmarks))].T).T
    eyes, nose = p[:4], p[4]
    ye = eyes[:, 1].mean()
    d = nose[1] - ye
    return float(eyes[:, 0].min()), float(ye - 0.5 * d), float(eyes[:, 0].max()), float(nose[1] + d)


def energy_in_rect(heat: np.ndarray, rect) -> float:
    """Share of a map's mass on the pixels whose centres lie inside ``rect`` (x0, y0, x1, y1, fractional)."""
    h = np.clip(np.asarray(heat, np.float64), 0, None)
    total = h.sum()
    if total <= 0:
        return 0.0
    x0, y0, x1, y1 = rect
    ys, xs = np.arange(h.shape[0]), np.arange(h.shape[1])
    return float(h[np.ix_((ys >= y0) & (ys <= y1), (xs >= x0) & (xs <= x1))].sum() / total)


class _L2Target:
    """pytorch-grad-cam target for an L2 face model: −‖descriptor − the query's‖², the similarity the index
    ranked by before the centred cosine (what explain/methods.py's Grad-CAM differentiates for metric l2)."""

    def __init__(self, concept):
        self.concept = concept

    def __call__(self, model_output):
        return -((model_output - self.concept) ** 2).sum()


class _CentredCosineTarget:
    """pytorch-grad-cam target for the faces preset's score: cos(descriptor − μ_f, the query's − μ_f), what a
    faces index ranks by and explain/methods.py's Grad-CAM differentiates with the index's fixed head."""

    def __init__(self, concept, centre):
        self.concept, self.centre = concept, centre

    def __call__(self, model_output):
        import torch.nn.functional as F

        return F.cosine_similarity(model_output - self.centre, self.concept - self.centre, dim=-1)


def peer_chip_maps(gc, bb, pairs, layer: str, batch: int = 8, placed: dict | None = None,
                   centre: np.ndarray | None = None) -> dict[str, list[np.ndarray]]:
    """pytorch-grad-cam's five methods on the same ported dlib ResNet (bench/explain_eval.py's wrapper: one
    forward and one backward pass fill all five CAM objects' hooks), the target the pair's similarity to the
    query's descriptor: the faces preset's cos(· − ``centre``, query − ``centre``), or with ``centre`` None the
    L2 similarity ranked by before; ``layer``: "final" (the 2×2 map whose average is the descriptor) or a module
    of the network (e.g. ``net.units.9``, SFAM's finer layer). Maps over the result chips, 150×150, resized by
    the package; ``placed``, when given, receives each method's same map (ReLU, min–max as the package does)
    put on the chip with each cell at its place (explain/faces.py ``chip_map``) instead."""
    import torch

    from explain.faces import chip_map
    from explain_eval import PEERS, _Embedding

    model = _Embedding(bb).eval()
    target = model.features if layer == "final" else model.features.get_submodule(layer)
    cams = {name: getattr(gc, name)(model=model, target_layers=[target]) for name in PEERS}
    out: dict[str, list] = {name: [] for name in PEERS}
    pre = bb.preprocess
    m = None if centre is None else torch.as_tensor(np.asarray(centre), dtype=torch.float32)
    try:
        for i in range(0, len(pairs), batch):
            part = pairs[i:i + batch]
            with torch.no_grad():
                concepts = model(pre.batch([Image.fromarray(q.chip) for _, q, _, _, _ in part]))
            x = pre.batch([Image.fromarray(r.chip) for _, _, _, r, _ in part]).requires_grad_(True)
            targets = [_L2Target(c) if m is None else _CentredCosineTarget(c, m) for c in concepts]
            for cam in cams.values():
                cam.activations_and_grads.gradients, cam.activations_and_grads.activations = [], []
            outputs = model(x)
            sum(t(o) for t, o in zip(targets, outputs)).backward()
            for name, cam in cams.items():
                out[name] += list(cam.aggregate_multi_layers(cam.compute_cam_per_layer(x, targets, False)))
                if placed is not None:  # the package's own map on the cell grid, each cell at its place
                    acts = cam.activations_and_grads.activations[0].cpu().numpy()
                    grads = cam.activations_and_grads.gradients[0].cpu().numpy()
                    raw = np.maximum(cam.get_cam_image(x, target, targets, acts, grads, False), 0)
                    for r in raw:
                        r = r - r.min()
                        placed.setdefault(name, []).append(chip_map(r / max(r.max(), 1e-7)))
    finally:
        for cam in cams.values():
            cam.activations_and_grads.release()
    return out


class _FacesIndex:
    """What explain/faces.py ``face_explainer`` reads of a new faces index (its metric, its fixed head centred on
    the mean face μ_f, no collection mean, μ_tap under ``REFERENCE_KEY``), without an index on disk: the bench
    builds its explainers through the product's own function. ``mean_tap`` None: an index without μ_tap."""

    def __init__(self, n: int, mean_tap: np.ndarray | None):
        from retrieval.faces.network import TAP
        from retrieval.metric import metric
        from retrieval.presets import FACES

        self.n, self.metric, self.head, self.mean = n, metric(FACES.metric), FACES.fixed_head(), None
        self._ref = None if mean_tap is None else {"tap": TAP, "mean_tap": list(map(float, mean_tap)),
                                                   "sampled": n, "images": n}

    def count(self) -> int:
        return self.n

    def get_value(self, key):
        from retrieval.faces.network import REFERENCE_KEY

        return self._ref if key == REFERENCE_KEY else None


#: The score sections of the maps table: the faces preset's score, and the one it replaced.
SHIPPED = "the shipped score: cos(q − μ_f, r − μ_f)"
BEFORE = "before: L2 / centred dot"


def chip_result_map(ex, qimg, qf, rimg, rf, pair=None, cells: bool = True) -> np.ndarray:
    """The result chip's 150×150 map of one pair: explain/faces.py ``explain_face`` (each cell at its place on the
    chip, as the product draws it), or with ``cells=False`` the explainer's map spread evenly over the chip (the
    geometry before ``CELLS``)."""
    from explain.faces import explain_face

    if cells:
        return explain_face(ex, qimg, qf, rimg, rf, pair, max_side=None).details["chip_maps"][1]
    return ex.explain(Image.fromarray(qf.chip), Image.fromarray(rf.chip), pair).result_map


def localisation(pairs, face_bb, mu, gc, progress) -> dict:
    """{SHIPPED: rows, BEFORE: rows, "check": {...}}: rows (method, face box share, pasted-photo share or "-",
    eyes/nose/mouth share, pairs) for ``pairs`` of (query photo, query face, result photo, result face, true box
    or None). Shares of the result's map: on the result photo's pixels for the boxes (the chip map carried back
    through the alignment), on the chip for the eyes/nose/mouth region (``parts_rect``).

    SHIPPED: the explainers as explain/faces.py ``face_explainer`` builds them for a new faces index (metric
    cosine, the fixed head centred on μ_f, SFAM with ``paper=0``), each pair explained with its decomposition in
    that space (explain/cis.py, as a search hands it over); μ_tap, which an index samples from up to 128 of its
    faces, is here the mean over these pairs' chips. BEFORE: metric l2 with ``mu`` (the gallery's mean
    descriptor) the CIS's reference point, the explainer's own similarity, as measured before the cosine."""
    from explain.cis import decompose_in
    from explain.faces import energy_in_box, face_explainer
    from explain.methods import SFAM, make_explainer
    from retrieval.faces.detect import warp_to_photo
    from retrieval.faces.network import TAP

    x = face_bb.preprocess.batch([Image.fromarray(f.chip) for _, qf, _, rf, _ in pairs for f in (qf, rf)])
    mu_tap = face_bb.features_and_tap(x, TAP)[1].double().mean((2, 3)).mean(0).numpy()
    index, bare = _FacesIndex(len(pairs), mu_tap), _FacesIndex(len(pairs), None)
    shipped = face_explainer(index, face_bb)  # the default map: cells at their place, 8×8 layer centred on μ_tap
    uncentred = face_explainer(bare, face_bb)  # an index without μ_tap
    gcam = face_explainer(index, face_bb, "gradcam")
    vecs = face_bb.embed_images([Image.fromarray(f.chip) for _, qf, _, rf, _ in pairs for f in (qf, rf)])
    decs = [decompose_in(index, vecs[2 * k], vecs[2 * k + 1][None])[0] for k in range(len(pairs))]

    def l2(cls_or_method, **kw):
        ex = (SFAM(face_bb, metric="l2", mu=mu, tap=TAP, paper=0, **kw) if cls_or_method == "sfam"
              else make_explainer(cls_or_method, face_bb, metric="l2", mu=mu))
        ex.map_max_side = None
        return ex

    # (section, key, label, explainer, the index's decomposition?, cells at their place?)
    runs = [(SHIPPED, "sfam_centred", ("SFAM, the default map (face_explainer): cells at their place, 8×8 layer "
                                       "centred on μ_tap"), shipped, True, True),
            (SHIPPED, "sfam", "SFAM, cells at their place, 8×8 layer uncentred", uncentred, True, True),
            (SHIPPED, "sfam_old", "SFAM, cells spread evenly, uncentred", uncentred, True, False),
            (SHIPPED, "gradcam", "Grad-CAM (explain/methods.py; cells at their place)", gcam, True, True),
            (SHIPPED, "gradcam_old", "Grad-CAM (explain/methods.py; spread evenly)", gcam, True, False),
            (BEFORE, "sfam", "SFAM, cells at their place, 8×8 layer uncentred", l2("sfam"), False, True),
            (BEFORE, "sfam_old", "SFAM, cells spread evenly, uncentred (before)", l2("sfam"), False, False),
            (BEFORE, "sfam_centred", "SFAM, the default map: cells at their place, 8×8 layer centred on μ_tap",
             l2("sfam", mu_tap=mu_tap), False, True),
            (BEFORE, "gradcam", "Grad-CAM (explain/methods.py; cells at their place)", l2("gradcam"), False, True),
            (BEFORE, "gradcam_old", "Grad-CAM (explain/methods.py; spread evenly, before)", l2("gradcam"), False,
             False)]

    def photo(p):
        if not isinstance(p, (str, Path)):
            return p
        from retrieval.images import load_image

        return load_image(str(p)).convert("RGB")

    chip_maps: dict[tuple, list] = {}
    labels: dict[tuple, str] = {}
    sizes, gaps = [], []
    for k, (qp, qf, rp, rf, _) in enumerate(pairs):
        qimg, rimg = photo(qp), photo(rp)
        sizes.append((rimg.height, rimg.width))
        for section, key, label, ex, indexed, cells in runs:
            labels[section, key] = label
            chip_maps.setdefault((section, key), []).append(
                chip_result_map(ex, qimg, qf, rimg, rf, decs[k] if indexed else None, cells))
        e = shipped.explain(Image.fromarray(qf.chip), Image.fromarray(rf.chip))  # its own similarity, no index
        a, b = vecs[2 * k] - index.head.mean, vecs[2 * k + 1] - index.head.mean
        cos = float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))
        gaps.append((abs(float(decs[k].cis.sum()) - cos), abs(float(np.sum(e.cis)) - cos), abs(e.score - cos)))
        progress(f"maps {k + 1}/{len(pairs)}")
    if gc is not None:
        for section, centre, what in ((SHIPPED, index.head.mean, "cosine target"), (BEFORE, None, "L2 target")):
            placed: dict = {}
            for layer, where in (("final", "final 2×2 layer"), (TAP, "SFAM's 8×8 layer")):
                for name, maps in peer_chip_maps(gc, face_bb, pairs, layer, placed=placed if layer == TAP else None,
                                                 centre=centre).items():
                    labels[section, f"peer {name} {layer}"] = (f"pytorch-grad-cam {name} ({where}, {what}; resized "
                                                               "by the package)")
                    chip_maps[section, f"peer {name} {layer}"] = maps
            for name, maps in placed.items():
                labels[section, f"placed {name}"] = (f"pytorch-grad-cam {name} (SFAM's 8×8 layer, {what}; cells at "
                                                     "their place)")
                chip_maps[section, f"placed {name}"] = maps
    from explain.faces import chip_map

    chip_maps[SHIPPED, "uniform"] = [np.ones((150, 150), np.float32)] * len(pairs)
    labels[SHIPPED, "uniform"] = "uniform over the chip (baseline; no score)"
    chip_maps[SHIPPED, "uniform cells"] = [chip_map(np.ones((8, 8)))] * len(pairs)
    labels[SHIPPED, "uniform cells"] = "uniform over the 8×8 cells' footprint on the chip (baseline; no score)"
    out: dict = {SHIPPED: [], BEFORE: []}
    for (section, key), maps in chip_maps.items():
        box, true, parts = [], [], []
        for m, (_, _, _, rf, tb), hw in zip(maps, pairs, sizes):
            pm = warp_to_photo(np.asarray(m, np.float32), rf.to_photo, hw)
            box.append(energy_in_box(pm, rf.box))
            if tb is not None:
                true.append(energy_in_box(pm, tb))
            parts.append(energy_in_rect(m, parts_rect(rf)))
        out[section].append([labels[section, key], f"{np.mean(box):.3f}", f"{np.mean(true):.3f}" if true else "-",
                             f"{np.mean(parts):.3f}", len(maps)])
    g = np.array(gaps)
    out["check"] = {"pairs": len(pairs), "index_cis": float(g[:, 0].max()), "own_cis": float(g[:, 1].max()),
                    "own_score": float(g[:, 2].max()),
                    "scores": (float(min(d.score for d in decs)), float(max(d.score for d in decs)))}
    return out


MAPS_HEAD = ["method", "share in the detector's face box", "share in the pasted face photo (92×112 frame, scaled)",
             "share on eyes/nose/mouth", "pairs"]

MAPS_INTRO = """For each query, its best-ranked photo of the same person (ranked by L2 nearest face, as the rows before
were measured; see the pairs note below): shares of the map's mass over the result face (the query's face against
it; same model, same chips, same similarity for every method of a table). Face box: the detector's box in the
result photo's own pixels, the chip map carried back through the inverse alignment. Eyes/nose/mouth: a rectangle in
the aligned chip's pixels (eyes level there) from the 5 landmarks — across the outer eye corners, from half the
eye-to-nose distance d above the eyes' line (the brows) to d below the base of the nose (the mouth, not the chin).

Two scores, one table each. **The shipped score**: what a faces index ranks by and explains, the cosine of the two
descriptors centred on the fixed mean face μ_f (retrieval/faces/mean_face.json); the explainers are the product's,
built by explain/faces.py `face_explainer` for a new faces index (metric cosine, the fixed `centre` head on μ_f,
SFAM with `paper=0`), each pair explained with its decomposition in that space (explain/cis.py) through
`explain_face`, so SFAM's CIS sum exactly to the score. **Before: L2 / centred dot**: the score the faces preset
ranked by until the cosine (metric l2; SFAM's CIS split the dot product centred on μ, the gallery's mean
descriptor), the rows measured before, recomputed here. pytorch-grad-cam (the bench extra) runs on the same ported
network with the target of each table's score against the query's descriptor (cos(d − μ_f, d_q − μ_f), or
−‖d − d_q‖²), at the final 2×2 map (whose average is the descriptor) and at SFAM's finer 8×8 layer; "resized by the
package": its maps resized over the chip by the package itself."""

MAPS_NOTES = """"Cells at their place": the face ResNet pads none of its strided layers, so the cells of its 8×8 (and 2×2)
maps sit on a grid of stride 16 (64) starting 15 (53) px into the chip, not spread evenly over the 150 px
(explain/faces.py `CELLS`); the maps are resampled that way before they are carried onto the photo (what
`explain_face` draws); "spread evenly": the explainer's map resized over the whole chip. μ_tap: the mean of the 8×8
layer's spatially averaged map, which SFAM centres that layer on (as the general preset centres its stride-16
layer); an index stores it over up to 128 of its faces, here it is the mean over the measured pairs' chips (the same
μ_tap for both tables). Mass outside the box is on the chip's margin (hair, ears, chin): the chip reaches 25 %
beyond the landmarks on each side (dlib's padding), never elsewhere in the photo."""


def maps_text(loc: dict, pairs_note: str = "", pasted: bool = True) -> str:
    """One set's two maps tables (the shipped score, then before) and the exactness check."""
    head = MAPS_HEAD if pasted else [h for h in MAPS_HEAD if "pasted" not in h]

    def rows(rs):
        return rs if pasted else [[r[0], r[1], r[3], r[4]] for r in rs]

    c = loc["check"]
    text = (f"**{SHIPPED}**\n\n" + _common.table(head, rows(loc[SHIPPED])) + "\n\n"
            f"Σ CIS of the shipped SFAM: the index's decomposition of each pair (explain/cis.py `decompose`, metric "
            f"cosine, head centred on μ_f) sums to cos(q − μ_f, r − μ_f) within {c['index_cis']:.1e} on all "
            f"{c['pairs']} pairs (scores {c['scores'][0]:.3f} to {c['scores'][1]:.3f}); explained without the "
            f"index's decomposition (the explainer's own similarity, float32 features), its score within "
            f"{c['own_score']:.1e} and its Σ CIS within {c['own_cis']:.1e}.\n\n")
    if pairs_note:
        text += pairs_note + "\n\n"
    return text + f"**{BEFORE}** (metric l2, μ the gallery's mean descriptor)\n\n" + _common.table(
        head, rows(loc[BEFORE])) + "\n\n"


def pairs_note(res: dict) -> str:
    """How many of the measured pairs' result photos the shipped score ranks first among the person's too."""
    n = len(res["pairs"])
    return (f"Pairs: the faces preset's score (cos(q − μ_f, r − μ_f), nearest face) ranks the same photo of the "
            f"person first for {res['same_by_cosine']} of these {n} pairs.")


def maps_report(args, g, rl, loc_g, loc_r, load, wall_s: float, maps_s: float) -> None:
    """``--maps-only``: the maps tables alone, in bench/results/faces-maps.md (faces.md keeps the full run's
    retrieval tables: a run of this part alone does not overwrite them)."""
    import torch

    cmd = f"python bench/faces.py --maps-only --groups {args.groups} --seed {args.seed}" + (
        " --real DIR" if args.real else "") + f" --threads {args.threads}"
    text = ("# Faces: where the maps fall\n\n"
            f"`{cmd}` · torch threads {torch.get_num_threads()} · load average {load[0]:.1f} → {load[1]:.1f} "
            f"(2 cores, shared machine) · {wall_s:.0f} s wall ({maps_s:.0f} s of it the maps)\n\n"
            "The localisation part of bench/faces.py alone, with the same pairs, chips and protocol as the full "
            "run (bench/results/faces.md, whose retrieval and indexing-speed tables this run does not touch; its "
            "maps tables there are the L2 ones, measured before the faces preset scored by the centred cosine)."
            + ("" if args.real else " No real-photo rows: deepface's test set was not given (`--real DIR`).")
            + "\n\n" + MAPS_INTRO + "\n\n")
    if loc_g:
        text += (f"## Group photos ({g['photos']} photos, {g['true_faces']} faces of 10 held-out people; "
                 f"{g['queries']} queries)\n\n" + maps_text(loc_g, pairs_note(g)))
    if loc_r:
        text += "## Real photos (deepface's test set)\n\n" + maps_text(loc_r, pairs_note(rl), pasted=False)
    _common.save("faces-maps", text + MAPS_NOTES)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--groups", type=int, default=60)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--real", type=Path, default=None, metavar="DIR",
                    help="deepface's tests/unit/dataset (git clone https://github.com/serengil/deepface): the real "
                         "varied face set row")
    ap.add_argument("--sets", default="orl,groups,real",
                    help="which sets to run (comma-separated; anything short of all three saves faces-partial.md)")
    ap.add_argument("--metric", action="store_true",
                    help="only the metric table (L2, cosine, centred cosine) on ORL (and --real): "
                         "bench/results/faces-metric.md")
    ap.add_argument("--fixed-mean", action="store_true",
                    help="the metric table and, after it, the cross-set study of a fixed population mean μ_f "
                         "(ranking, same-person threshold, small collections) on ORL and --real: "
                         "bench/results/faces-metric.md and faces-mu.json")
    ap.add_argument("--maps-only", action="store_true",
                    help="only where the maps fall (group photos, and --real): the pairs of the full run, no general "
                         "preset, no ORL table: bench/results/faces-maps.md")
    ap.add_argument("--descriptors", type=Path, default=None, metavar="FILE.npz",
                    help="with --metric/--fixed-mean: reuse the face descriptors saved in FILE (computed and "
                         "saved there when absent); only the descriptors are kept, every number is recomputed")
    args = ap.parse_args()
    import tempfile

    import torch

    torch.set_num_threads(args.threads)
    sets = {x.strip() for x in args.sets.split(",") if x.strip()}
    orl_root = _common.shared_dataset("att_faces")
    bg_root = _common.shared_dataset("caltech101")
    if orl_root is None or bg_root is None:
        return
    if "real" in sets and args.real is None:
        print(REAL_HINT)
        sets.discard("real")
    if not sets:
        return
    from retrieval.faces.network import load_backbone
    from retrieval.faces.detect import FaceFinder

    from explain_eval import grad_cam_package

    tty = sys.stderr.isatty()

    def progress(msg: str) -> None:
        if tty:
            print(f"\r{msg}   ", end="", file=sys.stderr, flush=True)

    finder = FaceFinder("hog")
    if args.metric or args.fixed_mean:
        load0 = os.getloadavg()
        o, rl = descriptor_sets(args, sets, orl_root, finder, progress)
        if tty:
            print(file=sys.stderr)
        load = (load0[0], os.getloadavg()[0])
        text = metric_report(args, o, rl, load, save=not args.fixed_mean)
        if args.fixed_mean:
            if o is None or rl is None:
                raise SystemExit("--fixed-mean needs both sets (ORL and --real DIR): each one's mean is applied "
                                 "to the other")
            fixed_mean_report(args, o, rl, load, text)
        return
    if args.maps_only:
        sets.discard("orl")
    face_bb = load_backbone()
    gen_bb = None if args.maps_only else general_backbone()
    gc = grad_cam_package()
    load0 = os.getloadavg()
    t_start = time.perf_counter()
    o = orl(orl_root, finder, face_bb, gen_bb, progress) if "orl" in sets else None
    g = rl = None
    loc_g = loc_r = None
    t_maps = 0.0
    with tempfile.TemporaryDirectory() as tmp:
        if "groups" in sets:
            g = groups(orl_root, bg_root, args.groups, args.seed, finder, face_bb, gen_bb, progress, Path(tmp))
            t0 = time.perf_counter()
            loc_g = localisation(g["pairs"], face_bb, g["mu"], gc, progress)
            t_maps += time.perf_counter() - t0
    if "real" in sets:
        rl = real(args.real, finder, face_bb, gen_bb, progress)
        mu = np.mean([f for f in face_bb.embed_images([Image.fromarray(p[1].chip) for p in rl["pairs"]])], 0)
        t0 = time.perf_counter()
        loc_r = localisation(rl["pairs"], face_bb, mu, gc, progress)
        t_maps += time.perf_counter() - t0
    load1 = os.getloadavg()
    if tty:
        print(file=sys.stderr)
    if args.maps_only:
        maps_report(args, g, rl, loc_g, loc_r, (load0[0], load1[0]), time.perf_counter() - t_start, t_maps)
        return
    rows = []
    if o:
        rows.append(["ORL (40 people × 10, leave-one-out)", f"{o['faces'][0]:.4f}", f"{o['general'][0]:.4f}",
                     f"{o['faces'][1]:.4f}", f"{o['general'][1]:.4f}",
                     f"{o['no_face']} of {o['n']} photos without a face found"])
    if g:
        rows.append([f"group photos ({g['photos']} photos, {g['true_faces']} faces of 10 held-out people; "
                     f"{g['queries']} queries)", f"{g['faces'][0]:.4f}", f"{g['general'][0]:.4f}",
                     f"{g['faces'][1]:.4f}", f"{g['general'][1]:.4f}",
                     f"chance (share of relevant photos) {g['chance']:.3f}; {g['found']}/{g['true_faces']} pasted "
                     "faces detected"])
    if rl:
        rows.append([f"real photos: deepface's test set ({rl['labelled']} photos of {rl['identities']} public "
                     f"figures, {rl['sizes'][0]}–{rl['sizes'][1]} each, + {len(rl['distractors'])} group photos "
                     f"as distractors; {rl['queries']} queries, leave-one-out)",
                     f"{rl['faces_m'][0]:.4f}", f"{rl['general'][0]:.4f}", f"{rl['faces_m'][1]:.4f}",
                     f"{rl['general'][1]:.4f}",
                     f"chance {rl['chance']:.3f}; {rl['no_face']} photos without a face found, {rl['multi']} with "
                     f"several ({rl['faces']} faces); photos {rl['min_side']}–{rl['max_side']} px"])
    cmd = f"python bench/faces.py --groups {args.groups} --seed {args.seed}" + (
        " --real DIR" if args.real else "") + (f" --sets {args.sets}" if sets != {"orl", "groups", "real"} else "")
    text = ("# Faces: the face preset against the general preset\n\n"
            f"`{cmd}` · torch threads {args.threads} · "
            f"load average {load0[0]:.1f} → {load1[0]:.1f} (2 cores, shared machine)\n\n"
            "Face preset: dlib HOG detection (+1 upsampling step below 320 px, the CNN detector where HOG finds "
            "nothing in such a small photo), 5-point alignment, dlib's face "
            "ResNet through the PyTorch port, L2; a photo ranks by its nearest face. General preset: "
            "efficientnet_lite0, 224 px squashed, GAP, cosine, the whole photo.\n\n")
    text += _common.table(["set", "R@1 faces", "R@1 general", "mAP faces", "mAP general", "notes"], rows)
    if rl:
        n = rl["notes"]
        text += ("\n\nReal photos: `tests/unit/dataset` of [serengil/deepface](https://github.com/serengil/deepface) "
                 "(MIT licence; photos of public figures, varied pose, light and resolution). Identities: the "
                 f"connected components of the {n['yes']} pairs marked \"Yes\" in its `master.csv` and "
                 f"`face-recognition-pivot.csv` ({', '.join(f'{k} {v}' for k, v in n['pairs'].items())} pairs); none "
                 f"of the {n['no']} \"No\" pairs falls inside one. Left out (no label): "
                 f"{', '.join(n['unlabelled']) or 'none'}; in the gallery as distractors, never relevant: "
                 f"{', '.join(rl['distractors'])}. Every labelled photo is a query (each identity has ≥ 2).")
    text += "\n\n## Where the maps fall\n\n" + MAPS_INTRO + "\n\n"
    if loc_g:
        text += "### Group photos\n\n" + maps_text(loc_g, pairs_note(g))
    if loc_r:
        text += "### Real photos (deepface's test set)\n\n" + maps_text(loc_r, pairs_note(rl), pasted=False)
    text += MAPS_NOTES + "\n\n"
    if g or o:
        text += "## Indexing speed (HOG)\n\n"
        srows = []
        if g:
            srows += [["group photos: detect + align + embed", f"{g['detected'] / g['index_s']:.1f} faces/s "
                       f"({g['detected']} faces in {g['photos']} photos, {g['index_s']:.1f} s)"],
                      ["group photos: CPU time (all threads) per face",
                       f"{g['index_cpu'] / max(g['detected'], 1) * 1000:.0f} ms (= {g['detected'] / g['index_cpu']:.1f} "
                       "faces per CPU-second)"]]
        if o:
            srows += [["ORL: detect + align + embed", f"{(o['n'] - o['no_face']) / o['face_s']:.1f} faces/s "
                       f"({o['face_s']:.1f} s)"],
                      ["ORL: general preset embedding", f"{o['n'] / o['gen_s']:.1f} photos/s ({o['gen_s']:.1f} s)"]]
        if rl:
            srows += [[f"real photos ({rl['min_side']}–{rl['max_side']} px): detect + align + embed",
                       f"{rl['faces'] / rl['face_s']:.1f} faces/s ({rl['faces']} faces, {rl['face_s']:.1f} s)"]]
        text += _common.table(["what", "value"], srows) + "\n"
    _common.save("faces" if sets == {"orl", "groups", "real"} else "faces-partial", text)


if __name__ == "__main__":
    main()
