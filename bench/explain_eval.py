"""How good are the explanations? Localisation, faithfulness, sanity and cost, SFAM beside its baselines.

    python bench/explain_eval.py [--sizes 224 448] [--threads 2] [--quick]

1. Localisation on composites of real photos: an object photo pasted off-centre into another photo;
   query = the object photo, result = the composite. Energy-in-box (share of the result map's mass in
   the pasted box) and pointing (the map's maximum falls in the box), for sfam / gradcam / occlusion /
   a centre prior / a random map, cosine and l2. Set A: scikit-image's photos (88 px object in a 224 px
   scene, 15 % of the area, 36 pairs). Set B (when ../shared/data/caltech101 is present): a caltech
   object pasted into a photo of another category (8 % of the area, 20 pairs).
2. Faithfulness on real matched pairs (att_faces: two photos of one person; caltech101: two photos of
   one category): deletion AUC (most salient pixels replaced by a blurred copy first, 5 % steps; lower
   is better) and insertion AUC (from the blurred image, most salient first; higher is better), as the
   similarity normalised by the unmodified pair's.
3. Sanity: randomised backbone weights must change the SFAM maps (Spearman rank correlation).
4. Cost per explanation per method, as a ratio to SFAM, and SFAM for a top-10 vs 11 bare forward passes.

Saves bench/results/explain.md.
"""
from __future__ import annotations

import argparse
import time

import _common
import numpy as np
import torch
from PIL import Image, ImageFilter

from explain.methods import make_explainer, upsample
from retrieval.models import load_backbone

OBJECTS = ("chelsea", "coffee", "astronaut", "rocket", "camera", "coins")
SCENES = ("brick", "grass", "gravel", "hubble_deep_field", "moon", "page")


def log(msg: str) -> None:
    import sys

    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def skimage_photo(name: str) -> Image.Image:
    import skimage.data

    return Image.fromarray(getattr(skimage.data, name)()).convert("RGB")


def composite(obj: Image.Image, scene: Image.Image, side: int, box_side: int, rng) -> tuple[Image.Image, tuple]:
    """Paste ``obj`` (resized to box_side²) off-centre into ``scene`` (resized to side²); return the box."""
    canvas = scene.resize((side, side), Image.BILINEAR)
    margin = side // 16
    while True:
        x0, y0 = (int(v) for v in rng.integers(margin, side - box_side - margin, 2))
        cx, cy = x0 + box_side / 2, y0 + box_side / 2
        if max(abs(cx - side / 2), abs(cy - side / 2)) > side * 0.18:  # off-centre
            break
    canvas.paste(obj.resize((box_side, box_side), Image.BILINEAR), (x0, y0))
    return canvas, (x0, y0, x0 + box_side, y0 + box_side)


def localisation_sets(rng) -> dict[str, tuple[list, list]]:
    """name → (pairs (query, composite, box), the source photos whose mean embedding is μ)."""
    pairs = []
    for o in OBJECTS:
        for s in SCENES:
            comp, box = composite(skimage_photo(o), skimage_photo(s), 224, 88, rng)
            pairs.append((skimage_photo(o), comp, box))
    sets = {"A: skimage, 15 % box": (pairs, [skimage_photo(n) for n in OBJECTS + SCENES])}
    data = _common.shared_dataset("caltech101")
    if data is not None:
        cats = sorted(p for p in data.iterdir() if p.is_dir())
        pick = rng.choice(len(cats), 40, replace=False)
        pairs, sources = [], []
        for i in range(20):
            obj_dir, scene_dir = cats[pick[2 * i]], cats[pick[2 * i + 1]]
            objs, scenes = sorted(obj_dir.glob("*.jpg")), sorted(scene_dir.glob("*.jpg"))
            query = Image.open(objs[0]).convert("RGB")  # the clean reference photo
            obj = Image.open(objs[1]).convert("RGB")  # another photo of the same category is pasted
            scene = Image.open(scenes[0]).convert("RGB")
            comp, box = composite(obj, scene, 224, 63, rng)
            pairs.append((query, comp, box))
            sources += [query, scene]
        sets["B: caltech, other photo of the class, 8 % box"] = (pairs, sources)
    return sets


def energy_pointing(m: np.ndarray, box: tuple) -> tuple[float, float]:
    x0, y0, x1, y1 = box
    total = float(m.sum())
    e = float(m[y0:y1, x0:x1].sum() / total) if total > 0 else 0.0
    yy, xx = np.unravel_index(int(np.argmax(m)), m.shape)
    return e, float(x0 <= xx < x1 and y0 <= yy < y1)


def centre_prior(h: int, w: int) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w]
    return np.exp(-(((yy - h / 2) / (h / 4)) ** 2 + ((xx - w / 2) / (w / 4)) ** 2) / 2).astype(np.float32)


def mean_embedding(bb, images) -> np.ndarray:
    feats = torch.cat([bb.features(bb.preprocess.batch(images[i:i + 16])).mean((2, 3)) for i in range(0, len(images), 16)])
    return feats.double().mean(0).numpy()


VARIANTS = [  # (label, method, metric, centre)
    ("sfam cosine", "sfam", "cosine", False),
    ("sfam cosine, centred (μ)", "sfam", "cosine", True),
    ("sfam l2 (μ)", "sfam", "l2", False),
    ("gradcam cosine", "gradcam", "cosine", False),
    ("gradcam l2", "gradcam", "l2", False),
    ("occlusion cosine", "occlusion", "cosine", False),
]


def run_localisation(sizes, rng, quick) -> tuple[list, dict]:
    rows, timing = [], {}
    sets = localisation_sets(rng)
    for set_name, (pairs, sources) in sets.items():
        if quick:
            pairs = pairs[::5]
        for size in sizes:
            bb = load_backbone(input_size=size)
            mu = mean_embedding(bb, sources)
            for label, method, metric, centre in VARIANTS:
                if method == "occlusion" and size > 224:
                    continue  # hundreds of forward passes per image: measured at 224 only
                ex = make_explainer(method, bb, metric=metric, mu=mu, centre=centre)
                log(f"localisation {set_name} {size}px {label}")
                es, ps = [], []
                t = time.perf_counter()
                for q, comp, box in pairs:
                    e = ex.explain(q, comp)
                    a, b = energy_pointing(e.result_map, box)
                    es.append(a)
                    ps.append(b)
                timing.setdefault((method, size), []).append((time.perf_counter() - t) / len(pairs))
                rows.append([set_name, size, label, round(np.mean(es), 3), round(np.mean(ps), 3)])
            cp = centre_prior(224, 224)
            r = [energy_pointing(cp, box) for _, _, box in pairs]
            rows.append([set_name, size, "centre prior", round(np.mean([a for a, _ in r]), 3),
                         round(np.mean([b for _, b in r]), 3)])
            rr = [energy_pointing(rng.random((224, 224)), box) for _, _, box in pairs]
            rows.append([set_name, size, "random map", round(np.mean([a for a, _ in rr]), 3),
                         round(np.mean([b for _, b in rr]), 3)])
    return rows, timing


def matched_pairs(quick: bool) -> dict[str, list]:
    out = {}
    faces = _common.shared_dataset("att_faces")
    if faces is not None:
        people = sorted(p for p in faces.iterdir() if p.is_dir())[: 8 if quick else 20]
        out["att_faces"] = [(Image.open(p / "1.pgm").convert("RGB"), Image.open(p / "2.pgm").convert("RGB"))
                            for p in people]
    cal = _common.shared_dataset("caltech101")
    if cal is not None:
        cats = sorted(p for p in cal.iterdir() if p.is_dir())[:: 5][: 8 if quick else 20]
        out["caltech101"] = [tuple(Image.open(f).convert("RGB") for f in sorted(c.glob("*.jpg"))[:2]) for c in cats]
    return out


def deletion_insertion(bb, ex, q: Image.Image, r: Image.Image, heat: np.ndarray, steps: int = 20) -> tuple:
    """(deletion AUC, insertion AUC, intact − blurred) of the similarity minus the fully blurred one's."""
    pre = bb.preprocess
    qv = bb.features(pre.batch([q])).mean((2, 3)).double()
    rv = np.asarray(r.resize((pre.size, pre.size), Image.BILINEAR), np.float32)
    blur = np.asarray(r.resize((pre.size, pre.size), Image.BILINEAR).filter(ImageFilter.GaussianBlur(pre.size / 16)),
                      np.float32)
    h = upsample(heat, (pre.size, pre.size)).ravel()
    order = np.argsort(-h + 1e-9 * np.random.default_rng(0).random(h.size), kind="stable")
    n = h.size
    dels, ins = [], []
    for i in range(steps + 1):
        mask = np.zeros(n, bool)
        mask[order[: int(round(n * i / steps))]] = True
        mask = mask.reshape(pre.size, pre.size)[..., None]
        dels.append(np.where(mask, blur, rv))
        ins.append(np.where(mask, rv, blur))
    imgs = [Image.fromarray(a.astype(np.uint8)) for a in dels + ins]
    pooled = torch.cat([bb.features(pre.batch(imgs[i:i + 21])).mean((2, 3)) for i in range(0, len(imgs), 21)]).double()
    # The similarity the search reports (plain cosine, or −d), whatever the map was made from, rescaled so
    # that the fully blurred image is 0 and the intact one 1: comparable across pairs, maps and metrics.
    if ex.metric == "cosine":
        s = torch.nn.functional.cosine_similarity(qv.expand_as(pooled), pooled, dim=-1).numpy()
    else:
        s = -((qv - pooled) ** 2).sum(-1).numpy()
    intact, blurred = s[0], s[steps]
    s = s - blurred
    d, i_ = s[: steps + 1], s[steps + 1:]
    auc = lambda y: float(np.trapezoid(y, dx=1 / steps)) if hasattr(np, "trapezoid") else float(np.trapz(y, dx=1 / steps))
    return auc(d), auc(i_), float(intact - blurred)


def pooled_auc(res: list[tuple]) -> tuple[float, float]:
    """Mean AUCs divided by the mean (intact − blurred) gap: 0 = blurred, 1 = intact; stable per pair."""
    gap = np.mean([g for _, _, g in res])
    return float(np.mean([d for d, _, _ in res]) / gap), float(np.mean([i for _, i, _ in res]) / gap)


def run_faithfulness(quick: bool) -> list:
    rows = []
    bb = load_backbone()
    pairs_by = matched_pairs(quick)
    for ds, pairs in pairs_by.items():
        mu = mean_embedding(bb, [p[0] for p in pairs] + [p[1] for p in pairs])
        for label, method, metric, centre in VARIANTS:
            ex = make_explainer(method, bb, metric=metric, mu=mu, centre=centre)
            log(f"faithfulness {ds} {label}")
            res = [deletion_insertion(bb, ex, q, r, ex.explain(q, r).result_raw) for q, r in pairs]
            d, i = pooled_auc(res)
            rows.append([ds, len(pairs), label, round(d, 3), round(i, 3)])
        bb448 = load_backbone(input_size=448)
        mu448 = mean_embedding(bb448, [p[0] for p in pairs] + [p[1] for p in pairs])
        ex448 = make_explainer("sfam", bb448, metric="cosine", mu=mu448, centre=True)
        log(f"faithfulness {ds} sfam centred 448")
        d, i = pooled_auc([deletion_insertion(bb, make_explainer("sfam", bb), q, r, ex448.explain(q, r).result_raw)
                           for q, r in pairs])
        rows.append([ds, len(pairs), "sfam cosine, centred (μ), map at 448 px", round(d, 3), round(i, 3)])
        for metric in ("cosine", "l2"):
            for label, heat_fn in (("centre prior", lambda: centre_prior(7, 7)),
                                   ("random map", lambda: np.random.default_rng(1).random((7, 7)))):
                ex = make_explainer("sfam", bb, metric=metric)
                d, i = pooled_auc([deletion_insertion(bb, ex, q, r, heat_fn()) for q, r in pairs])
                rows.append([ds, len(pairs), f"{label} ({metric})", round(d, 3), round(i, 3)])
    return rows



def spearman(a: np.ndarray, b: np.ndarray) -> float:
    ra = np.argsort(np.argsort(a.ravel())).astype(float)
    rb = np.argsort(np.argsort(b.ravel())).astype(float)
    return float(np.corrcoef(ra, rb)[0, 1])


def sanity(rng) -> tuple[float, float]:
    """(mean Spearman between trained and randomised-weights SFAM maps, identical-image map difference)."""
    trained, rand = load_backbone(), load_backbone(random_weights=True)
    pairs = [(skimage_photo(o), skimage_photo(s)) for o, s in zip(OBJECTS, SCENES)]
    corr = []
    for q, r in pairs:
        a = make_explainer("sfam", trained).explain(q, r).result_map
        b = make_explainer("sfam", rand).explain(q, r).result_map
        corr.append(spearman(a, b))
    same = make_explainer("sfam", trained).explain(pairs[0][0], pairs[0][0])
    return float(np.mean(corr)), float(np.abs(same.query_map - same.result_map).max())


def cost(timing: dict, sizes) -> list:
    q = skimage_photo("chelsea")
    results = [skimage_photo(n) for n in ("coffee", "astronaut", "rocket", "camera", "coins", "horse", "brick",
                                          "grass", "gravel", "moon")]
    rows = []
    for size in sizes:
        bb = load_backbone(input_size=size)
        ex = make_explainer("sfam", bb, mu=np.zeros(bb.feature_dim) + 0.1, centre=True)
        ex.explain_many(q, results)  # warm
        fw, pf, sf = [], [], []
        for _ in range(3):  # interleaved rounds, best of each
            t = time.perf_counter()
            xq, xr = bb.preprocess.batch([q]), bb.preprocess.batch(results)
            t1 = time.perf_counter()
            bb.features(xq)
            bb.features(xr)
            t2 = time.perf_counter()
            fw.append(t2 - t1)
            pf.append(t2 - t)
            t = time.perf_counter()
            ex.explain_many(q, results)
            sf.append(time.perf_counter() - t)
        rows.append([f"SFAM top-10 maps at {size} px (query + 10 results)", round(1000 * min(sf), 1),
                     f"{min(sf) / min(fw):.2f}x the 11 bare forward passes, {min(sf) / min(pf):.2f}x with "
                     "their preprocessing"])
    base = np.mean(timing.get(("sfam", 224), [np.nan]))
    for m in ("sfam", "gradcam", "occlusion"):
        t = np.mean(timing.get((m, 224), [np.nan]))
        rows.append([f"{m}, one pair at 224 px", round(1000 * t, 1), f"{t / base:.1f}x SFAM"])
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[224, 448])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="fewer pairs (a smoke run)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    loc, timing = run_localisation(args.sizes, rng, args.quick)
    text = "## Localisation (result map on the composite)\n\n"
    text += _common.table(["set", "input px", "map", "energy-in-box", "pointing"], loc)
    faith = run_faithfulness(args.quick)
    if faith:
        text += ("\n\n## Faithfulness on real matched pairs (224 px)\n\nThe similarity the search reports (plain "
                 "cosine, or −d for l2) as pixels of the result are deleted / inserted, rescaled so the fully "
                 "blurred result is 0 and the intact one 1 (pooled over pairs: mean AUC / mean gap). Deletion AUC: lower is better; insertion AUC: higher "
                 "is better.\n\n")
        text += _common.table(["dataset", "pairs", "map", "deletion AUC", "insertion AUC"], faith)
    corr, same = sanity(rng)
    text += (f"\n\n## Sanity\n\nSFAM maps, trained vs randomised weights: mean Spearman rank correlation {corr:.3f} "
             f"(low = the maps depend on what the network learned). Identical images: max |query map − result map| "
             f"= {same:.2e}.\n\n## Cost ({args.threads} threads)\n\n")
    text += _common.table(["what", "ms", "ratio"], cost(timing, args.sizes))
    _common.save("explain" if not args.quick else "explain-quick", text)


if __name__ == "__main__":
    main()
