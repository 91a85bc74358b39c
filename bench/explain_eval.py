"""How good are the explanations? Localisation, faithfulness, sanity and cost, SFAM beside its baselines.

    python bench/explain_eval.py [--sizes 448] [--threads 2] [--quick] [--cost-only] [--ranking]

1. Localisation on composites of real photos: an object photo pasted off-centre into another photo;
   query = the object photo, result = the composite. Energy-in-box (share of the result map's mass in
   the pasted box) and pointing (the map's maximum falls in the box), scored on the result map at the
   photo's own size. Set A: scikit-image's photos (88 px object in a 224 px scene, 15 % of the area, 36
   pairs). With ../shared/data/caltech101: set B, a caltech object pasted into a photo of another category
   (8 % of the area, 20 pairs); set C, the hardest: bench/instance_set.py's 100 objects, each clean
   reference pasted (aspect kept) into a real photo of another category at 640×480 (480×640 for one in
   four), box 5-10 % of the area and never over the photo's centre (100 pairs). Rows: SFAM's default map
   and its ablations, the paper's plain map, this project's Grad-CAM and occlusion (sets A and B), and the
   peer pytorch-grad-cam (the bench extra: GradCAM, GradCAM++, HiResCAM, LayerCAM, EigenCAM with its
   similarity-to-concept target, on the same backbone, weights and input size), a centre prior, a random
   map. μ (and the stride-16 layer's mean) = the mean over the set's source photos at the explain size.
2. Faithfulness on real matched pairs (att_faces: two photos of one person; caltech101: two photos of
   one category): deletion AUC (most salient pixels replaced by a blurred copy first, 5 % steps; lower
   is better) and insertion AUC (from the blurred image, most salient first; higher is better) of the
   plain cosine, rescaled so that the fully blurred result is 0 and the intact one 1 (mean AUC / mean gap
   over the pairs). Pixels of equal saliency (a map's zeros) are taken in a fixed random order.
3. Sanity: randomised backbone weights must change the SFAM maps (Spearman rank correlation).
4. Cost per explanation per method, and SFAM's default and plain maps for a top-10 vs 11 bare forward passes.

Saves bench/results/explain.md. ``--ranking`` (issue 27): only the rows that take the CIS from the ranking
vectors (explain.methods.Ranking) beside today's, saved as bench/results/explain-ranking-cis.md.
"""
from __future__ import annotations

import argparse
import time

import _common
import numpy as np
import torch
from PIL import Image, ImageFilter

from explain.methods import TAP_LAYERS, Ranking, make_explainer, upsample
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
        pairs, sources = instance_composites(data, rng)
        sets[SET_C] = (pairs, sources)
    return sets


SET_C = "C: instance, reference in another object's photo, 5-10 % box"


def paste_off_centre(obj: Image.Image, scene: Image.Image, size: tuple[int, int], rng) -> tuple[Image.Image, tuple]:
    """Paste ``obj`` (its aspect kept) into ``scene`` resized to ``size`` (W, H): the box covers 5-10 % of
    the photo's area and keeps at least 1/20 of the short side away from its centre (never over it)."""
    w, h = size
    canvas = scene.resize((w, h), Image.BILINEAR)
    ar = float(np.clip(obj.width / obj.height, 0.5, 2.0))
    gap = min(w, h) / 20
    while True:
        area = rng.uniform(0.05, 0.10) * w * h
        bw, bh = int(round(np.sqrt(area * ar))), int(round(np.sqrt(area / ar)))
        x0, y0 = int(rng.integers(0, w - bw + 1)), int(rng.integers(0, h - bh + 1))
        # distance from the photo's centre to the box (0 when the box covers it)
        dx = max(x0 - w / 2, w / 2 - (x0 + bw), 0.0)
        dy = max(y0 - h / 2, h / 2 - (y0 + bh), 0.0)
        if max(dx, dy) >= gap:
            break
    canvas.paste(obj.resize((bw, bh), Image.BILINEAR), (x0, y0))
    return canvas, (x0, y0, x0 + bw, y0 + bh)


def instance_composites(data, rng) -> tuple[list, list]:
    """Set C: bench/instance_set.py's 100 objects (each category's first photo, the clean reference). Per
    object: query = the reference; result = a real photo of another category (never another object's
    reference), resized to 640×480 (480×640 for one in four), with the reference pasted off-centre."""
    import instance_set

    cats = sorted(p for p in data.iterdir() if p.is_dir() and not p.name.startswith(("_", ".")))[:100]
    photos = {c: sorted(p for p in c.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png")) for c in cats}
    pairs, sources = [], []
    for i, c in enumerate(cats):
        ref = Image.fromarray(instance_set._load(photos[c][0]))
        j = (i + 1 + int(rng.integers(0, len(cats) - 1))) % len(cats)  # another category
        scene_path = photos[cats[j]][1 + int(rng.integers(0, len(photos[cats[j]]) - 1))]
        scene = Image.open(scene_path).convert("RGB")
        size = instance_set.CANVAS if rng.random() < 0.75 else instance_set.CANVAS[::-1]
        comp, box = paste_off_centre(ref, scene, size, rng)
        pairs.append((ref, comp, box))
        sources += [ref, scene.resize(size, Image.BILINEAR)]
    return pairs, sources


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


def mean_tap(bb, images) -> np.ndarray | None:
    """The mean of the stride-16 layer's pooled maps (SFAM's ``mu_tap``) over ``images``, at bb's size."""
    layer = TAP_LAYERS.get(bb.name)
    if layer is None:
        return None
    return torch.cat([bb.features_and_tap(bb.preprocess.batch([im]), layer)[1].mean((2, 3)) for im in images]
                     ).double().mean(0).numpy()


DEFAULT = ("sfam (default: g ⊕ 0.5·paper map⁴, g = D32·D16·G16, turning to the smoothed paper map as G16 covers "
           "the frame), centred (μ at the explain px)")
GATED = "sfam gated product D32·D16·G16 alone (the default until 2026-11-30)"
NOFRAME = "sfam g ⊕ 0.5·paper map⁴ without the frame turn (the default before it)"
VARIANTS = [  # (label, method, metric, centre, μ: "explain" px | "224" | None, where: L(ocalisation) F(aithfulness)
    #             at 224 px, 4: faithfulness of the map at 448 px, the index default)
    (DEFAULT, "sfam", "cosine", True, "explain", "L4"),
    (GATED, "sfam", "cosine", True, "explain", "L4"),
    (NOFRAME, "sfam", "cosine", True, "explain", "L4"),
    ("sfam default, μ at 224 px (what an index stores today)", "sfam", "cosine", True, "224", "L"),
    ("sfam default, no μ (explain A B without an index)", "sfam", "cosine", False, None, "L"),
    ("sfam default, l2 (μ)", "sfam", "l2", False, "explain", ""),  # localisation: the same map as centred cosine
    ("sfam default without the gate (D32·D16)", "sfam", "cosine", True, "explain", "L"),
    ("sfam default with the gate weighted by the match's cosine (until 2026-11-30)", "sfam", "cosine", True,
     "explain", "L"),
    ("sfam-plain cosine (the paper's map)", "sfam-plain", "cosine", False, None, "LF"),
    ("sfam-plain cosine, centred (μ) (the previous default)", "sfam-plain", "cosine", True, "explain", "L4"),
    ("sfam-plain l2 (μ)", "sfam-plain", "l2", False, "explain", ""),
    ("gradcam cosine (this project's)", "gradcam", "cosine", False, None, "LF"),
    ("occlusion cosine", "occlusion", "cosine", False, None, "L"),
]
SETTINGS = {  # label → the explainer attributes its row sets (after make_explainer)
    GATED: {"paper": 0.0},
    NOFRAME: {"frame": None},
    "sfam default without the gate (D32·D16)": {"gate": False, "paper": 0.0},
    "sfam default with the gate weighted by the match's cosine (until 2026-11-30)": {"gate_kind": "cosine",
                                                                                      "paper": 0.0},
}


def tweak(ex, label: str):
    """Set the attributes that the row ``label`` asks for (SETTINGS) on the explainer ``ex``."""
    for k, v in SETTINGS.get(label, {}).items():
        setattr(ex, k, v)
    return ex


SLOW = ("gradcam", "occlusion")  # eager forward/backward or hundreds of passes per pair: sets A and B only


PEERS = ("GradCAM", "GradCAMPlusPlus", "HiResCAM", "LayerCAM", "EigenCAM")  # pytorch-grad-cam classes
PEER_EXTRA = "pip install -e '.[bench]' (pytorch-grad-cam, PyPI grad-cam>=1.5)"


def grad_cam_package():
    """pytorch-grad-cam, or None with one line naming the extra that brings it."""
    try:
        import pytorch_grad_cam
    except ImportError:
        print(f"skip: pytorch-grad-cam rows need the bench extra: {PEER_EXTRA}")
        return None
    return pytorch_grad_cam


class _Embedding(torch.nn.Module):
    """image batch → the pooled embedding: the backbone's feature map pooled as the index pools it."""

    def __init__(self, bb):
        super().__init__()
        self.features = bb.net  # its output is the feature map A that SFAM weights (the CAM target layer)
        self.pooling = bb.pooling

    def forward(self, x):
        return self.pooling.pool(self.features(x))


class SimilarityToConceptTarget:
    """pytorch-grad-cam's documented target for embedding models ("Pixel Attribution for embeddings"):
    the cosine of the model's output to a concept's embedding, here the query's."""

    def __init__(self, features):
        self.features = features

    def __call__(self, model_output):
        return torch.nn.CosineSimilarity(dim=0)(model_output, self.features)


def peer_maps(gc, bb, pairs, batch: int = 6) -> dict[str, list[np.ndarray]]:
    """Each pytorch-grad-cam method's result map for each (query, result, box), at the result's own size.

    The five CAM objects hook the same target layer of the same model, so one forward and one backward
    pass per batch fill all five (each object's ``activations_and_grads``); each then makes its map with its
    own code (``compute_cam_per_layer`` + ``aggregate_multi_layers``, what ``cam(input_tensor, targets)``
    runs after its backward pass). The query's embedding (the concept) comes from the same model."""
    model = _Embedding(bb).eval()
    pre = bb.preprocess
    cams = {name: getattr(gc, name)(model=model, target_layers=[model.features]) for name in PEERS}
    out: dict[str, list] = {name: [] for name in PEERS}
    try:
        for i in range(0, len(pairs), batch):
            part = pairs[i:i + batch]
            with torch.no_grad():
                concepts = model(pre.batch([q for q, _, _ in part]))
            x = pre.batch([comp for _, comp, _ in part]).requires_grad_(True)  # frozen weights: grad via input
            targets = [SimilarityToConceptTarget(c) for c in concepts]
            for cam in cams.values():
                cam.activations_and_grads.gradients, cam.activations_and_grads.activations = [], []
            outputs = model(x)
            sum(t(o) for t, o in zip(targets, outputs)).backward()
            for name, cam in cams.items():
                maps = cam.aggregate_multi_layers(cam.compute_cam_per_layer(x, targets, False))
                out[name] += [upsample(m, (comp.height, comp.width)) for m, (_, comp, _) in zip(maps, part)]
    finally:
        for cam in cams.values():
            cam.activations_and_grads.release()
    return out


def run_localisation(sizes, rng, quick, peers: bool = True) -> tuple[list, dict]:
    rows, timing = [], {}
    sets = localisation_sets(rng)
    gc = grad_cam_package() if peers else None
    for set_name, (pairs, sources) in sets.items():
        if quick:
            pairs = pairs[::5]
        for size in sizes:
            bb = load_backbone(input_size=size)
            mus = {"explain": (mean_embedding(bb, sources), mean_tap(bb, sources)), None: (None, None)}
            bb224 = load_backbone(input_size=224)
            mus["224"] = (mean_embedding(bb224, sources), mean_tap(bb224, sources))
            for label, method, metric, centre, mu_at, where in VARIANTS:
                if "L" not in where or (method == "occlusion" and size > 224) or (method in SLOW and set_name == SET_C):
                    continue
                if mu_at == "224" and size == 224:
                    continue
                mu, mu_tap = mus[mu_at]
                ex = make_explainer(method, bb, metric=metric, mu=mu, centre=centre, mu_tap=mu_tap)
                tweak(ex, label)
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
            if gc is not None:
                log(f"localisation {set_name} {size}px pytorch-grad-cam {', '.join(PEERS)}")
                t = time.perf_counter()
                peers = peer_maps(gc, bb, pairs)
                timing.setdefault(("pytorch-grad-cam, all five in one pass", size), []).append(
                    (time.perf_counter() - t) / len(pairs))
                for name, maps in peers.items():
                    r = [energy_pointing(m, box) for m, (_, _, box) in zip(maps, pairs)]
                    rows.append([set_name, size, f"pytorch-grad-cam {name} (similarity target)",
                                 round(np.mean([a for a, _ in r]), 3), round(np.mean([b for _, b in r]), 3)])
            r = [energy_pointing(centre_prior(comp.height, comp.width), box) for _, comp, box in pairs]
            rows.append([set_name, size, "centre prior", round(np.mean([a for a, _ in r]), 3),
                         round(np.mean([b for _, b in r]), 3)])
            rr = [energy_pointing(rng.random((comp.height, comp.width)), box) for _, comp, box in pairs]
            rows.append([set_name, size, "random map", round(np.mean([a for a, _ in rr]), 3),
                         round(np.mean([b for _, b in rr]), 3)])
    return rows, timing


def matched_pairs(quick: bool, n: int = 20) -> dict[str, list]:
    """``n`` pairs per dataset (8 with ``quick``): the first n people; every (100 // n)-th category."""
    out = {}
    n = 8 if quick else n
    faces = _common.shared_dataset("att_faces")
    if faces is not None:
        people = sorted(p for p in faces.iterdir() if p.is_dir())[:n]
        out["att_faces"] = [(Image.open(p / "1.pgm").convert("RGB"), Image.open(p / "2.pgm").convert("RGB"))
                            for p in people]
    cal = _common.shared_dataset("caltech101")
    if cal is not None:
        cats = sorted(p for p in cal.iterdir() if p.is_dir())[:: 5 if n <= 20 else max(1, 100 // n)][:n]
        out["caltech101"] = [tuple(Image.open(f).convert("RGB") for f in sorted(c.glob("*.jpg"))[:2]) for c in cats]
    return out


def deletion_insertion(bb, ex, q: Image.Image, r: Image.Image, heat: np.ndarray, steps: int = 20,
                       mu: np.ndarray | None = None) -> tuple:
    """(deletion AUC, insertion AUC, intact − blurred) of the similarity minus the fully blurred one's;
    ``mu`` (cosine): of the cosine of the ``mu``-centred vectors instead of the plain cosine."""
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
        if mu is not None:
            m = torch.as_tensor(mu, dtype=torch.float64)
            qv, pooled = qv - m, pooled - m
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


def run_faithfulness(quick: bool, only: list[str] | None = None, pairs: int = 20) -> list:
    rows = []
    bb = load_backbone()
    pairs_by = matched_pairs(quick, pairs)
    for ds, pairs in pairs_by.items():
        images = [p[0] for p in pairs] + [p[1] for p in pairs]
        mus = {"explain": (mean_embedding(bb, images), mean_tap(bb, images)), None: (None, None)}
        for label, method, metric, centre, mu_at, where in VARIANTS:
            if "F" not in where:
                continue
            ex = make_explainer(method, bb, metric=metric, mu=mus[mu_at][0], centre=centre, mu_tap=mus[mu_at][1])
            tweak(ex, label)
            log(f"faithfulness {ds} {label}")
            res = [deletion_insertion(bb, ex, q, r, ex.explain(q, r).result_raw) for q, r in pairs]
            d, i = pooled_auc(res)
            rows.append([ds, len(pairs), label, round(d, 3), round(i, 3)])
        bb448 = load_backbone(input_size=448)
        mus448 = {"explain": (mean_embedding(bb448, images), mean_tap(bb448, images)), None: (None, None)}
        for label, method, metric, centre, mu_at, where in VARIANTS:  # the maps at 448 px, the index default
            if "4" not in where:
                continue
            ex448 = make_explainer(method, bb448, metric=metric, mu=mus448[mu_at][0], centre=centre,
                                   mu_tap=mus448[mu_at][1])
            tweak(ex448, label)
            log(f"faithfulness {ds} {label}, map at 448 px")
            d, i = pooled_auc([deletion_insertion(bb, ex448, q, r, ex448.explain(q, r).result_raw) for q, r in pairs])
            rows.append([ds, len(pairs), f"{label}, map at 448 px", round(d, 3), round(i, 3)])
        for metric in ("cosine",) if not only else ():
            for label, heat_fn in (("centre prior", lambda: centre_prior(7, 7)),
                                   ("random map", lambda: np.random.default_rng(1).random((7, 7)))):
                ex = make_explainer("sfam", bb, metric=metric)
                d, i = pooled_auc([deletion_insertion(bb, ex, q, r, heat_fn()) for q, r in pairs])
                rows.append([ds, len(pairs), f"{label} ({metric})", round(d, 3), round(i, 3)])
    return rows



# -- issue 27: the CIS from the ranking vectors (--ranking) ------------------------------------------------------
RANK_PX = 224  # the general preset's index: 224 px squashed, GAP, plain cosine
RANKING_ROWS = [  # (label, map px, maps centred on that size's μ, CIS from: None (the explainer's own at map px),
    #              "plain" (the ranking cosine at 224 px), "centred" (the cosine of x − μ224 at 224 px) or "split"
    #              (the plain ranking cosine's CIS; the maps draw their part centred on μ224: Ranking.maps_mu))
    ("A: today, CIS of the 448 px centred cosine", 448, True, None),
    ("B: CIS of the ranking cosine (224 px, plain), 448 px maps uncentred (m = 0)", 448, False, "plain"),
    ("B': as B, the 448 px maps centred on μ448 (m = μ448)", 448, True, "plain"),
    ("C: CIS of cos(x − μ224) at 224 px, 448 px maps centred on μ448", 448, True, "centred"),
    ("B'': CIS of the ranking cosine (224 px, plain); the maps draw its μ224-centred part, 448 px maps centred on "
     "μ448", 448, True, "split"),
    ("D: all from the 224 px ranking pass (7×7 final, 14×14 stride-16), plain CIS, m = 0", 224, False, "plain"),
    ("D': as D, the 224 px maps centred on μ224", 224, True, "plain"),
    ("Dc: CIS of cos(x − μ224), 224 px maps centred on μ224", 224, True, "centred"),
]


def ranking_rows(method: str) -> list:
    """The rows for ``method``: sfam-plain's map ReLU(Σ CIS_k C_k) has no reference point m, so B' = B, D' = D."""
    return [r for r in RANKING_ROWS if method == "sfam" or r[0].split(":")[0] not in ("B'", "D'")]


def rank_vec(bb224, img: Image.Image) -> np.ndarray:
    """The general index's vector of ``img``: 224 px squashed, global average (float64)."""
    return bb224.features(bb224.preprocess.batch([img])).double().mean((2, 3))[0].numpy()


def _cos(q, r, mu=None) -> float:
    q, r = np.asarray(q, np.float64), np.asarray(r, np.float64)
    if mu is not None:
        q, r = q - mu, r - mu
    return float(q @ r / max(np.linalg.norm(q) * np.linalg.norm(r), 1e-12))


def ranked_explainer(method: str, row, bbs: dict, mus: dict):
    """(explainer, CIS source) for a RANKING_ROWS row; ``bbs``/``mus``: px → backbone / (μ, μ_tap) at that px."""
    _, px, centred, cis_from = row
    mu, mu_tap = mus[px]
    ex = make_explainer(method, bbs[px], mu=mu if centred else None, centre=centred, mu_tap=mu_tap)
    return ex, cis_from


def explain_ranked(ex, cis_from, q, r, qv, rv, mu224) -> object:
    """One pair explained with the row's CIS: the explainer's own (None) or from the ranking vectors."""
    if cis_from is None:
        return ex.explain(q, r)
    return ex.explain(q, r, ranking=Ranking(qv, rv[None], mu224 if cis_from == "centred" else None,
                                            maps_mu=mu224 if cis_from == "split" else None))


def run_ranking(quick: bool, pairs_n: int) -> str:
    """Localisation (sets A, B, C) and faithfulness (Caltech, faces) of RANKING_ROWS for sfam and sfam-plain,
    with pytorch-grad-cam's GradCAM at 448 px as the reference; plus how far Σ CIS is from the ranking score."""
    rng = np.random.default_rng(0)
    bbs = {448: load_backbone(input_size=448), RANK_PX: load_backbone(input_size=RANK_PX)}
    gc = grad_cam_package()
    loc = []
    for set_name, (pairs, sources) in localisation_sets(rng).items():
        if quick:
            pairs = pairs[::5]
        mus = {px: (mean_embedding(bb, sources), mean_tap(bb, sources)) for px, bb in bbs.items()}
        vecs = [(rank_vec(bbs[RANK_PX], q), rank_vec(bbs[RANK_PX], c)) for q, c, _ in pairs]
        mu224 = mus[RANK_PX][0]
        for method in ("sfam", "sfam-plain"):
            for row in ranking_rows(method):
                ex, cis_from = ranked_explainer(method, row, bbs, mus)
                log(f"ranking localisation {set_name} {method} {row[0]}")
                es, ps, gap, dgap = [], [], [], []
                for (q, comp, box), (qv, rv) in zip(pairs, vecs):
                    e = explain_ranked(ex, cis_from, q, comp, qv, rv, mu224)
                    a, b = energy_pointing(e.result_map, box)
                    es.append(a)
                    ps.append(b)
                    gap.append(abs(float(e.cis.sum()) - _cos(qv, rv)))
                    if "d32_mean" in e.details:
                        dgap.append(abs(e.details["d32_mean"] - e.details["maps_cis_sum"]))
                loc.append([set_name[0], len(pairs), method, row[0], round(np.mean(es), 3), round(np.mean(ps), 3),
                            round(np.mean(gap), 4), round(np.mean(dgap), 4) if dgap else ""])
        if gc is not None:
            log(f"ranking localisation {set_name} pytorch-grad-cam GradCAM")
            r = [energy_pointing(m, box) for m, (_, _, box) in zip(peer_maps(gc, bbs[448], pairs)["GradCAM"], pairs)]
            loc.append([set_name[0], len(pairs), "pytorch-grad-cam", "GradCAM (= HiResCAM), similarity target, 448 px",
                        round(np.mean([a for a, _ in r]), 3), round(np.mean([b for _, b in r]), 3), "", ""])
    faith = []
    for ds, pairs in matched_pairs(quick, pairs_n).items():
        images = [p[0] for p in pairs] + [p[1] for p in pairs]
        mus = {px: (mean_embedding(bb, images), mean_tap(bb, images)) for px, bb in bbs.items()}
        mu224 = mus[RANK_PX][0]
        vecs = [(rank_vec(bbs[RANK_PX], q), rank_vec(bbs[RANK_PX], r)) for q, r in pairs]
        heats = {}
        for method in ("sfam", "sfam-plain"):
            for row in ranking_rows(method):
                ex, cis_from = ranked_explainer(method, row, bbs, mus)
                log(f"ranking faithfulness {ds} {method} {row[0]}")
                heats[(method, row[0])] = (ex, [explain_ranked(ex, cis_from, q, r, qv, rv, mu224)
                                                for (q, r), (qv, rv) in zip(pairs, vecs)])
        if gc is not None:
            peer = peer_maps(gc, bbs[448], [(q, r, None) for q, r in pairs])["GradCAM"]
            heats[("pytorch-grad-cam", "GradCAM (= HiResCAM), similarity target, 448 px")] = (None, peer)
        for (method, label), (ex, maps) in heats.items():
            log(f"ranking deletion/insertion {ds} {method} {label}")
            ex = ex or make_explainer("sfam", bbs[RANK_PX])
            res = [deletion_insertion(bbs[RANK_PX], ex, q, r, m if isinstance(m, np.ndarray) else m.result_raw)
                   for (q, r), m in zip(pairs, maps)]
            resc = [deletion_insertion(bbs[RANK_PX], ex, q, r, m if isinstance(m, np.ndarray) else m.result_raw,
                                       mu=mu224) for (q, r), m in zip(pairs, maps)]
            d, i = pooled_auc(res)
            dc, ic = pooled_auc(resc)
            gap = [abs(float(m.cis.sum()) - _cos(qv, rv)) for m, (qv, rv) in zip(maps, vecs)
                   if not isinstance(m, np.ndarray)]
            neg = [float(m.cis.sum()) * _cos(qv, rv) < 0 for m, (qv, rv) in zip(maps, vecs)
                   if not isinstance(m, np.ndarray)]
            faith.append([ds, len(pairs), method, label, round(d, 3), round(i, 3), round(dc, 3), round(ic, 3),
                          round(np.mean(gap), 4) if gap else "", f"{int(np.sum(neg))}" if neg else ""])
    text = "## Localisation (result map on the composite, scored at the photo's own size)\n\n"
    text += _common.table(["set", "pairs", "method", "CIS / maps", "energy-in-box", "pointing",
                           "mean |Σ CIS − plain cos224|", "mean |mean D32 − Σ of the CIS the maps draw|"], loc)
    text += ("\n\n## Faithfulness on real matched pairs (maps as in each row; the similarity measured at 224 px: the "
             "plain cosine the general index ranks by, and the cosine centred on μ224, C's ranking score)\n\n")
    text += _common.table(["dataset", "pairs", "method", "CIS / maps", "deletion (plain)", "insertion (plain)",
                           "deletion (centred 224)", "insertion (centred 224)", "mean |Σ CIS − plain cos224|",
                           "pairs where Σ CIS and plain cos224 differ in sign"], faith)
    return text


def ranking_quality() -> list:
    """R@1 / mAP@R ranking by the plain cosine at 224 px (the general index) and by the cosine centred on the
    collection's mean (C's ranking space), on att_faces and caltech101 as bench/quality.py reads them."""
    import quality

    rows = []
    for ds in ("att_faces", "caltech101"):
        folder = _common.shared_dataset(ds)
        if folder is None:
            continue
        vecs, labels, _, _ = quality.labelled_embeddings(folder, dict(input_size=RANK_PX, resize="squash", pooling="gap"))
        for what, x in (("plain cosine (today)", vecs), ("cosine of x − μ (μ = the collection's mean)",
                                                         vecs - vecs.astype(np.float64).mean(0))):
            m = quality.metrics(quality.ranking(np.asarray(x, np.float64), "cosine"), labels, None)
            rows.append([ds, len(labels), what, round(m["R@1"], 3), round(m["mAP@R"], 3), round(m["mAP@10"], 3)])
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


def cost(timing: dict, sizes, rounds: int = 3) -> list:
    q = skimage_photo("chelsea")
    results = [skimage_photo(n) for n in ("coffee", "astronaut", "rocket", "camera", "coins", "horse", "brick",
                                          "grass", "gravel", "moon")]
    rows = []
    for size in sizes:
        bb = load_backbone(input_size=size)
        ex = make_explainer("sfam", bb, mu=np.zeros(bb.feature_dim) + 0.1, centre=True)
        plain = make_explainer("sfam-plain", bb, mu=np.zeros(bb.feature_dim) + 0.1, centre=True)
        gated = tweak(make_explainer("sfam", bb, mu=np.zeros(bb.feature_dim) + 0.1, centre=True), GATED)
        ex.explain_many(q, results)  # warm (the default's two-output graph is exported once)
        plain.explain_many(q, results)
        gated.explain_many(q, results)
        fw, pf, sf, sp, sg = [], [], [], [], []
        for _ in range(rounds):  # interleaved rounds, best of each
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
            t = time.perf_counter()
            plain.explain_many(q, results)
            sp.append(time.perf_counter() - t)
            t = time.perf_counter()
            gated.explain_many(q, results)
            sg.append(time.perf_counter() - t)
        for what, ts in (("SFAM default", sf), ("SFAM gated product alone (the default until 2026-11-30)", sg),
                         ("sfam-plain", sp)):
            rows.append([f"{what} top-10 maps at {size} px (query + 10 results)", round(1000 * min(ts), 1),
                         f"{min(ts) / min(fw):.2f}x the 11 bare forward passes, {min(ts) / min(pf):.2f}x with "
                         "their preprocessing"])
    for size in sizes:
        base = np.mean(timing.get(("sfam", size), [np.nan]))
        for (m, sz), ts in timing.items():
            if sz == size:
                t = np.mean(ts)
                rows.append([f"{m}, one pair at {size} px", round(1000 * t, 1), f"{t / base:.1f}x SFAM default"])
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[448], help="input sizes for localisation (448: the "
                    "explain default; add 224 for the backbone's own size)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="fewer pairs (a smoke run)")
    ap.add_argument("--only", nargs="+", default=None, metavar="TEXT",
                    help="only the SFAM rows whose label contains TEXT (no peers, no slow baselines, no sanity): "
                         "localisation and faithfulness side by side in one run, saved as bench/results/explain-only.md")
    ap.add_argument("--pairs", type=int, default=20, help="matched pairs per dataset for faithfulness (with --only; "
                    "other than 20: localisation skipped, saved as bench/results/explain-only-pairsN.md)")
    ap.add_argument("--cost-only", action="store_true",
                    help="only the top-10 cost rows (5 interleaved rounds), saved as bench/results/explain-cost.md")
    ap.add_argument("--ranking", action="store_true", help="issue 27: the CIS from the ranking vectors (rows A-D, "
                    "sfam and sfam-plain, GradCAM as reference), saved as bench/results/explain-ranking-cis.md")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    if args.ranking:
        t = time.perf_counter()
        text = run_ranking(args.quick, args.pairs)
        q = ranking_quality() if not args.quick else []
        if q:
            text += ("\n\n## Retrieval quality of the ranking spaces (224 px squashed, GAP; every image queries "
                     "the rest, exact search)\n\n")
            text += _common.table(["dataset", "images", "ranking by", "R@1", "mAP@R", "mAP@10"], q)
        cmd = f"python bench/explain_eval.py --ranking --threads {args.threads}" + (" --quick" if args.quick else "")
        if args.pairs != 20:
            cmd += f" --pairs {args.pairs}"
        _common.save("explain-ranking-cis" + ("-quick" if args.quick else ""),
                     f"`{cmd}` ({args.threads} torch thread(s), {time.perf_counter() - t:.0f} s).\n\n" + text)
        return
    if args.cost_only:
        _common.save("explain-cost", f"## Cost ({args.threads} threads)\n\n"
                     + _common.table(["what", "ms", "ratio"], cost({}, args.sizes, rounds=5)))
        return
    if args.only:
        VARIANTS[:] = [v for v in VARIANTS if any(t in v[0] for t in args.only)]
        text = (f"Threads: {args.threads}; rows whose label contains {' or '.join(map(repr, args.only))}, side by side "
                "in one run (`python bench/explain_eval.py --only …`; the peers' rows: bench/results/explain.md).\n\n")
        if args.pairs == 20:
            loc, _ = run_localisation(args.sizes, rng, args.quick, peers=False)
            text += "## Localisation (result map on the composite, scored at the photo's own size)\n\n"
            text += _common.table(["set", "input px", "map", "energy-in-box", "pointing"], loc)
        faith = run_faithfulness(args.quick, only=args.only, pairs=args.pairs)
        text += "\n\n## Faithfulness on real matched pairs (224 px; deletion: lower is better, insertion: higher)\n\n"
        text += _common.table(["dataset", "pairs", "map", "deletion AUC", "insertion AUC"], faith)
        _common.save("explain-only" if args.pairs == 20 else f"explain-only-pairs{args.pairs}", text)
        return
    loc, timing = run_localisation(args.sizes, rng, args.quick)
    text = (f"Threads: {args.threads}; input sizes: {', '.join(map(str, args.sizes))} px (pytorch-grad-cam "
            "rows: the same backbone, weights and input size); faithfulness at 224 px plus the maps at 448 px.\n\n")
    text += "## Localisation (result map on the composite, scored at the photo's own size)\n\n"
    text += _common.table(["set", "input px", "map", "energy-in-box", "pointing"], loc)
    _common.save("explain" if not args.quick else "explain-quick", text + "\n\n(faithfulness, sanity and cost: running)")
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
