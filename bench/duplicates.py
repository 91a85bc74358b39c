"""Near-duplicate groups (issue #30): retrieve's find_duplicates against imagededup and a fixed cosine threshold.

    python bench/duplicates.py --split both --threads 1                  # quality, both splits
    python bench/duplicates.py --split none --photos 10000 --threads 2   # speed at 10 k (+ imagededup PHash)
    python bench/duplicates.py --split none --grouping 100000 --threads 2  # the grouping stage at 100 k

The set: source photos from Caltech-101 (the photos bench/instance_set.py uses neither as an object nor as a
background), the instance set (its reference and one phone photo per object) and ORL faces, each with one edited
copy per transform (resize 0.5x, JPEG q 40, crop 10-20 % of each side, colour, rot90, mirror, text) and, for one
source in eight, a byte copy; beside them untouched hard negatives: other photos of the same category, the same
object (the instance set's other phone photos of it) or the same person. Two splits with disjoint source photos
(even / odd categories, objects, people) and different seeds: thresholds are chosen on "tuning", reported on both.
A pair is a true near-duplicate when both photos derive from the same source photo. Written once under
bench/.cache/duplicates (ignored by git), indexed with ``retrieve index`` (general preset).

Each part's numbers go to bench/results/raw/duplicates.json (a run replaces only the parts it ran); the table
bench/results/duplicates.md is made from all of them.
"""
from __future__ import annotations

import argparse
import hashlib
import io
import itertools
import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

import _common
import numpy as np
from PIL import Image, ImageDraw, ImageEnhance, ImageFont, ImageOps

VERSION = 1  # bump when the recipe changes: the cache is rebuilt
CACHE = _common.ROOT / "bench" / ".cache" / "duplicates"
RAW = _common.RESULTS / "raw" / "duplicates.json"
TRANSFORMS = ("resize", "recompress", "crop", "colour", "rot90", "mirror", "text")
SEEDS = {"tuning": 1, "heldout": 2}
EXACT_EVERY = 8  # one source in eight also gets a byte copy (the exact tier)
_CLI = "import sys, cli; sys.argv[0] = 'retrieve'; cli.main()"
# Caltech-101 holds a few copies of one picture (the same drawing saved three times, the same photo cropped or
# framed): their pairs are true near-duplicates, not errors. Found by looking, by eye, at the false pairs every method
# reported among untouched photos (other look-alikes there, e.g. two different Snoopy drawings on one background, are
# different pictures and stay hard negatives).
SAME_PICTURE = [{"caltech/garfield/image_0023", "caltech/garfield/image_0024", "caltech/garfield/image_0025"},
                {"caltech/platypus/image_0011", "instance/platypus/ref"},  # ref.jpg: the first platypus photo
                {"caltech/platypus/image_0015", "caltech/platypus/image_0030"}]


# ---------------------------------------------------------------- the set

def _rgb(path: Path) -> Image.Image:
    return ImageOps.exif_transpose(Image.open(path)).convert("RGB")


def _jpeg(img: Image.Image, q: int = 90) -> bytes:
    b = io.BytesIO()
    img.save(b, "JPEG", quality=q)
    return b.getvalue()


def edit(img: Image.Image, transform: str, rng: random.Random) -> tuple[bytes, str]:
    """``img`` edited by ``transform`` (JPEG bytes) and the parameters drawn, in words."""
    w, h = img.size
    if transform == "resize":
        return _jpeg(img.resize((max(1, w // 2), max(1, h // 2)), Image.LANCZOS)), "0.5x"
    if transform == "recompress":
        return _jpeg(img, 40), "q40"
    if transform == "crop":
        fx, fy = rng.uniform(0.10, 0.20), rng.uniform(0.10, 0.20)  # the part of each side cut away
        x0, y0 = int(w * fx * rng.random()), int(h * fy * rng.random())
        box = (x0, y0, x0 + round(w * (1 - fx)), y0 + round(h * (1 - fy)))
        return _jpeg(img.crop(box)), f"{fx:.2f}x{fy:.2f}"
    if transform == "colour":
        b, c, s, hue = rng.uniform(0.7, 1.3), rng.uniform(0.7, 1.3), rng.uniform(0.5, 1.5), rng.choice([-1, 1]) * rng.uniform(0.03, 0.08)
        out = ImageEnhance.Color(ImageEnhance.Contrast(ImageEnhance.Brightness(img).enhance(b)).enhance(c)).enhance(s)
        hsv = np.asarray(out.convert("HSV")).copy()
        hsv[..., 0] = (hsv[..., 0].astype(np.int16) + round(hue * 256)) % 256
        out = Image.fromarray(hsv, "HSV").convert("RGB")
        return _jpeg(out), f"b{b:.2f} c{c:.2f} s{s:.2f} h{hue:+.2f}"
    if transform == "rot90":
        k = rng.choice([90, 270])
        return _jpeg(img.rotate(k, expand=True)), str(k)
    if transform == "mirror":
        return _jpeg(ImageOps.mirror(img)), "horizontal"
    if transform == "text":
        layer = Image.new("RGBA", img.size, (0, 0, 0, 0))  # drawn apart, then blended: alpha is kept
        d = ImageDraw.Draw(layer)
        size = max(8, round(h * rng.uniform(0.07, 0.11)))
        font = ImageFont.load_default(size=size)
        words = rng.choice(["© 2024 Holiday", "Summer at the lake", "DRAFT", "photo: M. Kowalski", "SAMPLE"])
        tw, th = d.textbbox((0, 0), words, font=font)[2:]
        x = rng.randint(0, max(0, w - tw))
        y = rng.choice([rng.randint(0, max(0, h // 5)), rng.randint(max(0, h - th - h // 5), max(0, h - th))])
        d.text((x, y), words, font=font, fill=(255, 255, 255, 230), stroke_width=max(1, size // 12),
               stroke_fill=(0, 0, 0, 230))
        # and a faint watermark across the middle
        wm = ImageFont.load_default(size=max(8, h // 6))
        d.text((w // 8, h // 2 - h // 12), "WATERMARK", font=wm, fill=(255, 255, 255, 90))
        return _jpeg(Image.alpha_composite(img.convert("RGBA"), layer).convert("RGB")), words
    raise ValueError(transform)


def _sources(split: str) -> list[tuple[str, str, list[Path], list[Path]]]:
    """(kind, group, source photos, hard negatives) of ``split``: even categories / objects / people for "tuning",
    odd ones for "heldout"."""
    import instance_set

    parity = 0 if split == "tuning" else 1
    out = []
    cal = _common.shared_dataset("caltech101")
    if cal is not None:
        spare: dict[str, list[Path]] = {}
        for p in instance_set.spare(cal):  # neither an instance object nor a background of its phone photos
            spare.setdefault(p.parent.name, []).append(p)
        for i, cat in enumerate(sorted(spare)):
            if i % 2 == parity:
                ps = spare[cat]
                k = 2 if len(ps) >= 4 else 1
                out.append(("caltech", cat, ps[:k], ps[k:k + 3]))
        inst = instance_set.build(cal, _common.ROOT / "bench" / ".cache" / "instance")
        for i, obj in enumerate(sorted(p for p in inst.iterdir() if p.is_dir())):
            if i % 2 == parity:
                out.append(("instance", obj.name, [obj / "ref.jpg", obj / "view1.jpg"],
                            [obj / f"view{v}.jpg" for v in (2, 3, 4)]))
    orl = _common.shared_dataset("att_faces")
    if orl is not None:
        people = sorted((p for p in orl.iterdir() if p.is_dir()), key=lambda p: int(p.name.lstrip("s")))
        for i, person in enumerate(people):
            if i % 2 == parity:
                out.append(("faces", person.name, [person / "1.pgm", person / "2.pgm"],
                            [person / f"{n}.pgm" for n in (3, 4, 5)]))
    return out


def _original_bytes(path: Path) -> tuple[bytes, str]:
    """The photo as it is (its own bytes), PGM as PNG (lossless) so that every tool reads it."""
    if path.suffix.lower() == ".pgm":
        b = io.BytesIO()
        Image.open(path).save(b, "PNG")
        return b.getvalue(), ".png"
    return path.read_bytes(), path.suffix.lower()


def build_split(split: str) -> tuple[Path, list[dict]]:
    """Write ``split`` under bench/.cache/duplicates unless it is there: (folder, truth). Truth: one dict per file
    (path relative to the folder, source key, transform: "original", one of TRANSFORMS, "exact" or "negative")."""
    root = CACHE / f"v{VERSION}" / split
    stamp = root / "truth.json"
    if not stamp.exists():
        _write_split(split, root, stamp)
    alias = {k: min(g) for g in SAME_PICTURE for k in g}
    truth = json.loads(stamp.read_text())
    for t in truth:  # origin: the photo it was made from; source: the picture (SAME_PICTURE joins a few)
        t["origin"] = t["source"]
        t["source"] = alias.get(t["source"], t["source"])
    return root, truth


def _write_split(split: str, root: Path, stamp: Path) -> None:
    if root.exists():
        shutil.rmtree(root)
    truth, n_src = [], 0
    for kind, group, sources, negatives in _sources(split):
        d = root / kind / group
        d.mkdir(parents=True, exist_ok=True)
        for src in sources:
            key = f"{kind}/{group}/{src.stem}"
            rng = random.Random(f"{SEEDS[split]}:{key}")
            data, ext = _original_bytes(src)
            (d / f"{src.stem}{ext}").write_bytes(data)
            truth.append({"path": f"{kind}/{group}/{src.stem}{ext}", "source": key, "transform": "original"})
            img = _rgb(src)
            for t in TRANSFORMS:
                data_t, params = edit(img, t, rng)
                (d / f"{src.stem}-{t}.jpg").write_bytes(data_t)
                truth.append({"path": f"{kind}/{group}/{src.stem}-{t}.jpg", "source": key, "transform": t,
                              "params": params})
            if n_src % EXACT_EVERY == 0:
                (d / f"{src.stem}-copy{ext}").write_bytes(data)
                truth.append({"path": f"{kind}/{group}/{src.stem}-copy{ext}", "source": key, "transform": "exact"})
            n_src += 1
        for neg in negatives:
            data, ext = _original_bytes(neg)
            (d / f"neg-{neg.stem}{ext}").write_bytes(data)
            truth.append({"path": f"{kind}/{group}/neg-{neg.stem}{ext}", "source": f"{kind}/{group}/{neg.stem}",
                          "transform": "negative"})
    stamp.write_text(json.dumps(truth))


def build_speed(n: int) -> tuple[Path, int]:
    """A folder of ``n`` photos for the timings: every Caltech-101, instance-set and ORL photo, then edited copies
    of them (the transforms in turn, new random parameters per copy) until there are ``n``."""
    root = CACHE / f"v{VERSION}" / f"speed-{n}"
    stamp = root / "done.json"
    if stamp.exists():
        return root, json.loads(stamp.read_text())["photos"]
    if root.exists():
        shutil.rmtree(root)
    cal, orl = _common.shared_dataset("caltech101"), _common.shared_dataset("att_faces")
    import instance_set

    photos = sorted(p for p in cal.rglob("*.jpg")) + sorted(instance_set.build(cal, _common.ROOT / "bench" / ".cache" / "instance").rglob("*.jpg")) \
        + sorted(orl.rglob("*.pgm"))
    photos = photos[:n]
    written = 0
    for i, p in enumerate(photos):
        data, ext = _original_bytes(p)
        (root / f"{i // 1000:03d}").mkdir(parents=True, exist_ok=True)
        (root / f"{i // 1000:03d}" / f"{i:06d}{ext}").write_bytes(data)
        written += 1
    rng = random.Random(3)
    j = 0
    while written < n:
        p = photos[j % len(photos)]
        t = TRANSFORMS[(j // len(photos) + j) % len(TRANSFORMS)]
        data, _ = edit(_rgb(p), t, rng)
        i = written
        (root / f"{i // 1000:03d}").mkdir(parents=True, exist_ok=True)
        (root / f"{i // 1000:03d}" / f"{i:06d}-{j % len(photos):06d}-{t}.jpg").write_bytes(data)
        written += 1
        j += 1
    stamp.write_text(json.dumps({"photos": written}))
    return root, written


# ---------------------------------------------------------------- running the methods

def index(folder: Path, where: Path, threads: int) -> float:
    """``retrieve index FOLDER --index WHERE`` (general preset) through this tree's CLI: seconds (0 when it was
    there already)."""
    if (where / "done").exists():
        return json.loads((where / "done").read_text())["seconds"]
    if where.exists():
        shutil.rmtree(where)
    env = {**os.environ, "PYTHONPATH": str(_common.ROOT), "RETRIEVE_THREADS": str(threads),
           "OMP_NUM_THREADS": str(threads)}
    t = time.perf_counter()
    p = subprocess.run([sys.executable, "-c", _CLI, "--threads", str(threads), "index", str(folder), "--index",
                        str(where), "--json"], cwd=_common.ROOT, env=env, capture_output=True, text=True, check=False)
    secs = time.perf_counter() - t
    if p.returncode:
        raise SystemExit(f"retrieve index {folder}: {p.stderr.strip()[-800:]}")
    (where / "done").write_text(json.dumps({"seconds": secs, "out": p.stdout[-2000:]}))
    return secs


class _OverBudget(Exception):
    pass


def retrieve_groups(where: Path, root: Path, budget: float | None = None) -> tuple[dict, float, dict]:
    """find_duplicates over the index at ``where``: ({tier: [[relative paths]]}, seconds, its thresholds and
    stages). ``budget``: stop the pair tests after this many seconds (then groups is None and the stages say how
    far it got)."""
    from retrieval.curate.duplicates import find_duplicates
    from retrieval.index.store import IndexStore

    seen: dict = {}

    def progress(done: int, total: int) -> None:
        now = time.perf_counter() - t
        seen.setdefault("first", (now, done))
        seen.update(last=(now, done), total=total)
        if budget and now > budget:
            raise _OverBudget

    with IndexStore.open(where) as store:
        t = time.perf_counter()
        try:
            dup = find_duplicates(store, progress=progress)
        except _OverBudget:
            dup = None
        secs = time.perf_counter() - t
    stages = {}
    if seen:
        (t1, d1), (t2, d2) = seen["first"], seen["last"]
        rate = (d2 - d1) / (t2 - t1) if d2 > d1 else None
        stages = {"pairs": seen["total"], "pairs_tested": d2, "pair_tests_per_s": rate,
                  "candidates_s": t1 - d1 / rate if rate else t1}
    if dup is None:
        return None, secs, {"stages": stages}
    groups: dict = {}
    for g in dup.groups:
        groups.setdefault(g.tier, []).append([_rel(m.path, root) for m in g.members])
    return groups, secs, {"thresholds": _plain(dup.thresholds), "pairs_checked": dup.pairs_checked,
                          "photos": dup.photos, "seconds_own": dup.seconds, "stages": stages}


def _plain(x):
    try:
        json.dumps(x)
        return x
    except TypeError:
        return str(x)


def _rel(path: str, root: Path) -> str:
    from retrieval.names import from_db

    p = Path(from_db(path)) if isinstance(path, str) else Path(path)
    try:
        return str(p.resolve().relative_to(root.resolve()))
    except ValueError:
        return str(p)


def imagededup_pairs(root: Path, method: str, threads: int) -> tuple[set, float, str]:
    """imagededup's METHOD with its default threshold over ``root`` (recursive): (pairs, seconds, note)."""
    import logging
    import warnings

    logging.getLogger("imagededup").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    from imagededup import methods

    t = time.perf_counter()
    if method == "CNN":
        try:
            cnn = methods.CNN(verbose=False)
        except Exception as e:  # noqa: BLE001 - recorded, not hidden: its weights come from a download
            return set(), 0.0, f"not run: {type(e).__name__}: {str(e).splitlines()[0][:150]}"
        found = cnn.find_duplicates(image_dir=root, recursive=True, num_enc_workers=0)
    else:
        h = getattr(methods, method)(verbose=False)
        found = h.find_duplicates(image_dir=root, recursive=True, num_enc_workers=threads, num_dist_workers=threads)
    secs = time.perf_counter() - t
    pairs = {frozenset((a, b)) for a, bs in found.items() for b in bs if a != b}
    return pairs, secs, "default threshold (Hamming 10)" if method != "CNN" else "default threshold (cosine 0.9)"


def vectors(where: Path, root: Path) -> tuple[list[str], np.ndarray]:
    """retrieve's own embeddings in the space it ranks by (store.transform: head, L2-normalised)."""
    from retrieval.index.store import IndexStore

    with IndexStore.open(where) as store:
        ids, vecs = [], []
        for i, v in store.iter_vectors():
            ids.append(i)
            vecs.append(v)
        ids = np.concatenate(ids)
        x = store.transform(np.concatenate(vecs))
        paths = store.rows_by_ids(ids.tolist())
        names = [_rel(paths[int(i)].path, root) for i in ids]
    return names, x


def cosine_pairs(names: list[str], x: np.ndarray, threshold: float) -> set:
    s = x @ x.T
    i, j = np.nonzero(np.triu(s >= threshold, 1))
    return {frozenset((names[a], names[b])) for a, b in zip(i, j)}


def best_threshold(names: list[str], x: np.ndarray, source: dict) -> tuple[float, float]:
    """The fixed cosine threshold with the best pairwise F1 (the answers known): (threshold, F1)."""
    s = x @ x.T
    iu = np.triu_indices(len(names), 1)
    scores = s[iu]
    keys = np.array([source[n] for n in names])
    same = keys[iu[0]] == keys[iu[1]]
    order = np.argsort(-scores, kind="stable")
    tp = np.cumsum(same[order])
    k = np.arange(1, len(order) + 1)
    f1 = 2 * tp / (k + same.sum())
    b = int(np.argmax(f1))
    thr = float((scores[order[b]] + scores[order[b + 1]]) / 2) if b + 1 < len(order) else float(scores[order[b]])
    return thr, float(f1[b])


# ---------------------------------------------------------------- scoring

def truth_pairs(truth: list[dict]) -> tuple[set, dict, dict]:
    """(every true pair, {transform: the pairs original ↔ its copy}, {path: source key})."""
    by_src: dict = {}
    for t in truth:
        by_src.setdefault(t["source"], []).append(t)
    every, per = set(), {t: set() for t in (*TRANSFORMS, "exact")}
    for items in by_src.values():
        every |= {frozenset((a["path"], b["path"])) for a, b in itertools.combinations(items, 2)}
        orig = {t["origin"]: t["path"] for t in items if t["transform"] == "original"}
        for t in items:
            if t["origin"] in orig and t["transform"] in per:
                per[t["transform"]].add(frozenset((orig[t["origin"]], t["path"])))
    return every, per, {t["path"]: t["source"] for t in truth}


def score(pred: set, truth: list[dict]) -> dict:
    every, per, source = truth_pairs(truth)
    known = set(source)
    pred = {p for p in pred if p <= known}
    tp = len(pred & every)
    prec = tp / len(pred) if pred else 1.0
    rec = tp / len(every) if every else 0.0
    f1 = 2 * prec * rec / (prec + rec) if prec + rec else 0.0
    kind = {t["path"]: t["path"].split("/")[0] for t in truth}
    fp = {}
    for p in pred - every:
        a, b = sorted(p)
        k = kind[a] if kind[a] == kind[b] else "across"
        fp[k] = fp.get(k, 0) + 1
    by_kind = {}
    for k in sorted(set(kind.values())):
        ev = {p for p in every if kind[next(iter(p))] == k}
        pr = {p for p in pred if all(kind[x] == k for x in p)}
        t = len(pr & ev)
        pk, rk = (t / len(pr) if pr else 1.0), (t / len(ev) if ev else 0.0)
        by_kind[k] = {"precision": pk, "recall": rk, "f1": 2 * pk * rk / (pk + rk) if pk + rk else 0.0,
                      "per_transform": {t: (len(pred & {q for q in ps if kind[next(iter(q))] == k}) /
                                            max(1, len({q for q in ps if kind[next(iter(q))] == k})))
                                        for t, ps in per.items()}}
    return {"precision": prec, "recall": rec, "f1": f1, "pairs": len(pred), "true_pairs": len(every),
            "by_kind": by_kind,
            "per_transform": {t: (len(pred & s) / len(s) if s else None) for t, s in per.items()},
            "false_pairs": fp}


def group_pairs(groups: list[list[str]]) -> set:
    return {frozenset(p) for g in groups for p in itertools.combinations(g, 2)}


def same_picture(groups: list[list[str]]) -> list[list[str]]:
    """The photos find_duplicates says are one picture: its exact and near groups joined where they share a photo.
    Each tier works on the keepers of the tier before (an exact group's keeper stands for its copies in the near
    tier), so a byte copy is the same picture as its keeper's edited copies, though no one group lists both."""
    c = _common.Components()
    for g in groups:
        c.find(g[0])
        for x in g[1:]:
            c.union(x, g[0])
    return c.groups()


# ---------------------------------------------------------------- parts

def _retrieve_row(where: Path, root: Path, truth: list[dict]) -> dict:
    try:
        groups, secs, info = retrieve_groups(where, root)
    except ImportError as e:
        return {"error": f"not available: {e}"}
    pred = group_pairs(same_picture(groups.get("near", []) + groups.get("exact", [])))
    r = score(pred, truth)
    src = {t["path"]: t["source"] for t in truth}
    r["false_examples"] = sorted(sorted(p) for p in pred if len({src.get(x) for x in p}) > 1)[:300]
    _, per, _ = truth_pairs(truth)
    r["missed_examples"] = {t: sorted(sorted(p) for p in ps - pred)[:40] for t, ps in per.items()}
    r.update(seconds=secs, note=f"exact and near groups joined where they share a photo (one picture); {info['pairs_checked']} pairs checked", info=info,
             near_only=score(group_pairs(groups.get("near", [])), truth),
             exact_tier=score(group_pairs(groups.get("exact", [])),
                              [t for t in truth if t["transform"] in ("original", "exact")]))
    return r


def _cosine_rows(where: Path, root: Path, truth: list[dict], tuned: float) -> dict:
    names, x = vectors(where, root)
    t0 = time.perf_counter()
    r = score(cosine_pairs(names, x, tuned), truth)
    r.update(seconds=time.perf_counter() - t0, note=f"cosine ≥ {tuned:.4f} (best F1 on tuning), all pairs")
    thr, _ = best_threshold(names, x, {t["path"]: t["source"] for t in truth})
    o = score(cosine_pairs(names, x, thr), truth)
    o.update(seconds=None, note=f"cosine ≥ {thr:.4f}: best F1 on this split, answers known (oracle)")
    return {"fixed cosine (tuned)": r, "fixed cosine (oracle)": o}


def _imagededup_rows(root: Path, truth: list[dict], threads: int) -> dict:
    out = {}
    for m in ("PHash", "DHash", "WHash", "AHash", "CNN"):
        pred, secs, note = imagededup_pairs(root, m, threads)
        if note.startswith("not run"):
            out[f"imagededup {m}"] = {"error": note}
            continue
        r = score(pred, truth)
        r.update(seconds=secs, note=note)
        out[f"imagededup {m}"] = r
    return out


def run_quality(splits: list[str], threads: int, methods: list[str], old: dict | None = None) -> dict:
    """Each method of ``methods`` ("retrieve", "cosine", "imagededup") on each split; the methods not run keep
    their rows of ``old`` (the last run's)."""
    out = {"splits": {}, "threads": threads}
    data = {s: build_split(s) for s in splits}
    root, truth = data.get("tuning") or build_split("tuning")  # the fixed cosine is always chosen on "tuning"
    where = CACHE / f"v{VERSION}" / "tuning-index"
    index(root, where, threads)
    names, x = vectors(where, root)
    cos_thr, _ = best_threshold(names, x, {t["path"]: t["source"] for t in truth})
    for split in splits:
        root, truth = data[split]
        where = CACHE / f"v{VERSION}" / f"{split}-index"
        idx_s = index(root, where, threads)
        kinds = {}
        for t in truth:
            k = kinds.setdefault(t["path"].split("/")[0], {"photos": 0, "sources": 0, "negatives": 0})
            k["photos"] += 1
            k["sources"] += t["transform"] == "original"
            k["negatives"] += t["transform"] == "negative"
        before = ((old or {}).get("splits", {}).get(split) or {}).get("methods", {})
        got = {}
        if "retrieve" in methods:
            got["retrieve find_duplicates"] = _retrieve_row(where, root, truth)
        if "cosine" in methods:
            got.update(_cosine_rows(where, root, truth, cos_thr))
        if "imagededup" in methods:
            got.update(_imagededup_rows(root, truth, threads))
        order = ["retrieve find_duplicates", "fixed cosine (tuned)", "fixed cosine (oracle)",
                 *[f"imagededup {m}" for m in ("PHash", "DHash", "WHash", "AHash", "CNN")]]
        for r in got.values():
            r["when"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
        merged = {**before, **got}
        res = {"photos": len(truth), "kinds": kinds, "index_seconds": idx_s,
               "methods": {m: merged[m] for m in order if m in merged}}
        out["splits"][split] = res
        print(json.dumps({split: {m: {k: v for k, v in r.items() if k in ("precision", "recall", "f1", "error")}
                                  for m, r in got.items()}}, indent=1), flush=True)
    return out


def run_speed(n: int, threads: int, budget: float) -> dict:
    root, photos = build_speed(n)
    where = CACHE / f"v{VERSION}" / f"speed-{n}-index"
    idx_s = index(root, where, threads)
    out = {"photos": photos, "threads": threads, "index_seconds": idx_s, "load_before": os.getloadavg()}
    groups, secs, info = retrieve_groups(where, root, budget)
    if groups is None:  # stopped at the budget: how far it got
        st = info["stages"]
        out["retrieve"] = {"seconds": secs, "stopped": True, "groups": {}, "grouped": 0,
                           "pairs_checked": f"{st.get('pairs_tested', 0)} of {st.get('pairs', '?')} (stopped)", **info}
    else:
        out["retrieve"] = {"seconds": secs, "groups": {t: len(g) for t, g in groups.items()},
                           "grouped": sum(len(m) for g in groups.values() for m in g), **info}
    pred, secs, _ = imagededup_pairs(root, "PHash", threads)
    out["imagededup PHash"] = {"seconds": secs, "pairs": len(pred)}
    out["load_after"] = os.getloadavg()
    print(json.dumps(out, indent=1), flush=True)
    return out


def grow(base: Path, where: Path, rows: int, seed: int = 0) -> dict:
    """A copy of the index ``base`` grown to ``rows`` through the store API (bench/serve.py's way): each added row
    a hard link to a real row's file under a new path, its vector sampled around that row's (bench/search.py's
    subspace noise), its content hash made unique (so the exact tier does not take it); the calibration re-sampled."""
    from indexer.run import refresh_calibration
    from retrieval.index.schema import ImageRow
    from retrieval.index.store import IndexStore

    stamp = where / "grown.json"
    if stamp.exists():
        return json.loads(stamp.read_text())
    if where.exists():
        shutil.rmtree(where)
    shutil.copytree(base, where)
    links = where / "links"
    links.mkdir()
    t0 = time.perf_counter()
    with IndexStore.open(where, writable=True) as store:
        real_rows = list(store.rows_by_ids(store.row_ids()).values())
        real = np.stack([np.frombuffer(r.vector, np.float32) for r in real_rows])
        n = rows - len(real_rows)
        rng = np.random.default_rng(seed)
        pick = rng.integers(0, len(real_rows), n)
        spread = real.std(0, keepdims=True)
        centred = real - real.mean(0)
        _, sv, vt = np.linalg.svd(centred, full_matrices=False)
        basis = (vt[:64] * (sv[:64, None] / np.sqrt(len(real)))).astype(np.float32)
        del spread, centred
        now = time.time()
        for start in range(0, n, 5000):
            m = min(5000, n - start)
            vecs = np.clip(real[pick[start:start + m]] + 0.5 * rng.standard_normal((m, 64), dtype=np.float32) @ basis,
                           0, None).astype(np.float32)
            batch = []
            for i in range(m):
                r = real_rows[pick[start + i]]
                p = links / f"{(start + i) // 1000:03d}" / f"s{start + i:06d}{Path(r.path).suffix}"
                p.parent.mkdir(exist_ok=True)
                os.link(r.path, p)
                batch.append(ImageRow(path=str(p), size=r.size, mtime_ns=r.mtime_ns,
                                      sha256=hashlib.sha256(f"synthetic {start + i}".encode()).hexdigest(),
                                      width=r.width, height=r.height, vector=vecs[i].tobytes(), indexed_at=now))
            with store.session() as s, s.begin():
                s.add_all(batch)
                s.flush()
                ids = np.array([r.id for r in batch], np.int64)
            store.apply([], ids, vecs)
        store.update_mean()
        store.save_faiss()
        refresh_calibration(store, force=True)
        store.mark_updated()
        count = store.count()
        x = store.transform(real[:2000])
        y = store.transform(np.clip(real[:2000] + 0.5 * rng.standard_normal((2000, 64), dtype=np.float32) @ basis,
                                    0, None))
    info = {"rows": count, "real": len(real_rows), "seconds": time.perf_counter() - t0,
            "copy_cosine_median": float(np.median((x * y).sum(1)))}
    stamp.write_text(json.dumps(info))
    return info


def run_grouping(rows: int, threads: int, base_n: int, budget: float) -> dict:
    base = CACHE / f"v{VERSION}" / f"speed-{base_n}-index"
    if not (base / "done").exists():
        raise SystemExit(f"{base}: build the {base_n} index first (--photos {base_n})")
    root = CACHE / f"v{VERSION}"
    where = root / f"grouping-{rows}-index"
    info = grow(base, where, rows)
    groups, secs, got = retrieve_groups(where, root, budget)
    st = got["stages"]
    what = (f"What was measured: find_duplicates (kNN candidates, gate, pair tests, groups) over an index of "
            f"{info['rows']:,} rows: the {info['real']:,} real rows of the {base_n:,}-photo speed index plus "
            f"{info['rows'] - info['real']:,} rows added through the store API, each a hard link (new path) to a real "
            f"row's file with a vector sampled around that row's (subspace noise; median cosine to its origin "
            f"{info['copy_cosine_median']:.3f} in the ranking space) and a unique content hash. The pair test decodes "
            f"the linked file, so a row near its origin passes as a near-duplicate of it: many more groups than a "
            f"real library of {info['rows']:,} photos would have (a heavy case for the pair tests). Building the "
            f"rows took {info['seconds']:.0f} s (not counted).")
    stage = (f"candidate stage (kNN + gate) ≈ {st.get('candidates_s', 0):.0f} s, {st.get('pairs', 0):,} candidate "
             f"pairs, pair tests at {st.get('pair_tests_per_s') or 0:.1f} pairs/s")
    if groups is None:
        left = (st["pairs"] - st["pairs_tested"]) / st["pair_tests_per_s"] if st.get("pair_tests_per_s") else None
        table = [["retrieve find_duplicates (stopped at the budget)", f"{secs:.1f}",
                  f"{stage}; {st.get('pairs_tested', 0):,} of {st.get('pairs', 0):,} pairs tested when stopped"],
                 ["projected whole run (not measured: the pairs left at the measured rate; grouping not counted)",
                  f"{secs + left:.0f}" if left is not None else "?", ""]]
    else:
        sizes = sorted((len(m) for g in groups.values() for m in g), reverse=True)
        table = [["retrieve find_duplicates", f"{secs:.1f}",
                  f"{stage}; groups {dict((t, len(g)) for t, g in groups.items())}, {sum(sizes)} rows grouped, "
                  f"largest {sizes[:3]}"]]
    return {"rows": info["rows"], "threads": threads, "what": what, "rows_table": table, "budget": budget}


# ---------------------------------------------------------------- the table

def _f(x, d=3):
    return "–" if x is None else f"{x:.{d}f}"


def _stages(st: dict | None) -> str:
    if not st or not st.get("pair_tests_per_s"):
        return ""
    return (f" (candidate stage ≈ {st['candidates_s']:.0f} s, then pair tests at {st['pair_tests_per_s']:.1f} "
            f"pairs/s)")


def render(raw: dict) -> str:
    lines = ["# Near-duplicate groups (issue #30)", "",
             "Made by `bench/duplicates.py` (see its docstring for the set). A pair is a true near-duplicate when both "
             "photos derive from the same source photo; a method's pairs: every pair within one of its groups "
             "(retrieve), every pair it reports (imagededup, fixed cosine). Recall per transform: the pairs "
             "original ↔ its edited copy; precision over every pair the method reports. Targets (issue #30): "
             "F1 ≥ 0.95 with precision ≥ 0.99, above every imagededup method; 10 k photos grouped in ≤ 60 s, "
             "100 k in ≤ 15 min.", ""]
    q = raw.get("quality")
    if q:
        lines += [f"## Quality (last run {q['when']} at {q.get('rev', '?')}: `{q['command']}`, {q['machine']}, load {q['load']}; each row "
                  f"says when it was run: `--methods` re-runs some rows and keeps the others)", ""]
        for split, res in q["splits"].items():
            kinds = ", ".join(f"{k}: {v['photos']} photos ({v['sources']} sources, {v['negatives']} hard negatives)"
                              for k, v in res["kinds"].items())
            lines += [f"### {split} split: {res['photos']} photos — {kinds}", ""]
            kinds_here = list(res["kinds"])
            hdr = ["method", "P", "R", "F1", *[f"F1 {k}" for k in kinds_here], *TRANSFORMS, "false pairs", "s",
                   "note"]
            rows = []
            for m, r in res["methods"].items():
                if "error" in r:
                    rows.append([m, *["–"] * (len(hdr) - 2), r["error"]])
                    continue
                fp = ", ".join(f"{k} {v}" for k, v in sorted(r["false_pairs"].items())) or "0"
                rows.append([m, _f(r["precision"]), _f(r["recall"]), _f(r["f1"]),
                             *[_f(r.get("by_kind", {}).get(k, {}).get("f1")) for k in kinds_here],
                             *[_f(r["per_transform"][t], 2) for t in TRANSFORMS], fp,
                             _f(r["seconds"], 1) if r.get("seconds") is not None else "–",
                             f"{r['note']} (run {r.get('when', '?')})"])
            lines += [_common.table(hdr, rows), ""]
            rd = res["methods"].get("retrieve find_duplicates", {})
            if "exact_tier" in rd:
                e = rd["exact_tier"]
                lines += [f"Exact tier alone (byte copies, pairs original ↔ copy among originals and copies): "
                          f"P {_f(e['precision'])}, R {_f(e['per_transform']['exact'])}. Near tier alone: "
                          f"P {_f(rd['near_only']['precision'])}, R {_f(rd['near_only']['recall'])}, "
                          f"F1 {_f(rd['near_only']['f1'])}. Thresholds: `{json.dumps(rd['info']['thresholds'])}`.", ""]
                if "per_transform" in next(iter(rd["by_kind"].values())):
                    lines += ["find_duplicates by source kind (recall per transform: original ↔ copy):", "",
                              _common.table(["kind", "P", "R", "F1", *TRANSFORMS], [
                                  [k, _f(v["precision"]), _f(v["recall"]), _f(v["f1"]),
                                   *[_f(v["per_transform"][t], 2) for t in TRANSFORMS]]
                                  for k, v in rd["by_kind"].items()]), ""]
    for key in sorted(k for k in raw if k.startswith("speed")):
        s = raw[key]
        lines += [f"## Speed: {s['photos']:,} photos ({s['when']} at {s.get('rev', '?')}, `{s['command']}`, {s['machine']}, "
                  f"RETRIEVE_THREADS={s['threads']}, load before/after {s['load']})", "",
                  _common.table(["what", "seconds", "output"], [
                      ["retrieve index (general preset, not part of the target)", _f(s["index_seconds"], 1), ""],
                      ["retrieve find_duplicates" + (" (stopped at --budget)" if s["retrieve"].get("stopped") else ""),
                       _f(s["retrieve"]["seconds"], 1),
                       f"groups {s['retrieve']['groups']}, {s['retrieve']['grouped']} photos grouped, "
                       f"{s['retrieve']['pairs_checked']} pairs checked" + _stages(s["retrieve"].get("stages"))],
                      *([["projected whole find_duplicates (not measured: the pairs left at the measured rate)",
                          _f(s["retrieve"]["seconds"] + (s["retrieve"]["stages"]["pairs"] - s["retrieve"]["stages"]
                             ["pairs_tested"]) / s["retrieve"]["stages"]["pair_tests_per_s"], 0), ""]]
                        if s["retrieve"].get("stopped") and s["retrieve"]["stages"].get("pair_tests_per_s") else []),
                      ["imagededup PHash (encode + find, default threshold)", _f(s["imagededup PHash"]["seconds"], 1),
                       f"{s['imagededup PHash']['pairs']} pairs"]]), ""]
    g = raw.get("grouping")
    if g:
        lines += [f"## Grouping stage at {g['rows']:,} rows ({g['when']} at {g.get('rev', '?')}, `{g['command']}`, {g['machine']}, "
                  f"RETRIEVE_THREADS={g['threads']}, load {g['load']})", "", g["what"], "",
                  _common.table(["what", "seconds", "output"], g["rows_table"]), ""]
    return "\n".join(lines)


def _machine() -> str:
    try:
        model = next(ln.split(":", 1)[1].strip() for ln in subprocess.run(["lscpu"], capture_output=True, text=True, check=False)
                     .stdout.splitlines() if ln.startswith("Model name"))
    except (StopIteration, OSError):
        model = "?"
    return f"{model}, {os.cpu_count()} cores"


def _stamp(part: dict, argv: list[str], load0) -> dict:
    rev = subprocess.run(["git", "-C", str(_common.ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                         text=True, check=False).stdout.strip()
    part.update(when=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), machine=_machine(), rev=rev,
                command="python bench/duplicates.py " + " ".join(argv),
                load=f"{load0[0]:.1f} → {os.getloadavg()[0]:.1f} (1-min average; 2 cores shared with other work "
                     f"when above ~1)")
    return part


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--split", choices=["tuning", "heldout", "both", "none"], default="both")
    ap.add_argument("--methods", nargs="+", choices=["retrieve", "cosine", "imagededup"],
                    default=["retrieve", "cosine", "imagededup"], help="the quality part's methods (others: last run's)")
    ap.add_argument("--photos", type=int, default=0, help="the speed run's size (0: none)")
    ap.add_argument("--grouping", type=int, default=0, help="the grouping stage at this many rows (0: none)")
    ap.add_argument("--grouping-from", type=int, default=10000, help="the speed index the grouping run grows")
    ap.add_argument("--budget", type=float, default=900,
                    help="stop find_duplicates' pair tests in the speed and grouping runs after this many seconds")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--build-only", action="store_true", help="write the sets and indexes, measure nothing")
    args = ap.parse_args()
    os.environ["RETRIEVE_THREADS"] = str(args.threads)
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    argv = sys.argv[1:]
    raw = json.loads(RAW.read_text()) if RAW.exists() else {}
    splits = {"both": ["tuning", "heldout"], "none": []}.get(args.split, [args.split])
    if args.build_only:
        for s in splits:
            root, truth = build_split(s)
            print(s, len(truth), "photos; index", index(root, CACHE / f"v{VERSION}" / f"{s}-index", args.threads), "s")
        if args.photos:
            root, n = build_speed(args.photos)
            print("speed", n, "photos; index", index(root, CACHE / f"v{VERSION}" / f"speed-{args.photos}-index",
                                                        args.threads), "s")
        return
    if splits:
        load0 = os.getloadavg()
        raw["quality"] = _stamp(run_quality(splits, args.threads, args.methods, raw.get("quality")), argv, load0)
    if args.photos:
        load0 = os.getloadavg()
        raw[f"speed-{args.photos}"] = _stamp(run_speed(args.photos, args.threads, args.budget), argv, load0)
    if args.grouping:
        load0 = os.getloadavg()
        raw["grouping"] = _stamp(run_grouping(args.grouping, args.threads, args.grouping_from, args.budget), argv,
                                 load0)

    RAW.parent.mkdir(parents=True, exist_ok=True)
    RAW.write_text(json.dumps(raw, indent=1))
    _common.RESULTS.joinpath("duplicates.md").write_text(render(raw) + "\n")
    print(render(raw))
    print(f"\nsaved {_common.RESULTS.joinpath('duplicates.md').relative_to(_common.ROOT)}")


if __name__ == "__main__":
    main()
