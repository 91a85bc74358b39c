"""How good are the explanations? Localisation, faithfulness, sanity and cost, SFAM beside its baselines.

    python bench/explain_eval.py [--sizes 448] [--threads 2] [--quick] [--cost-only]

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
from retrieval.models.loading import load_backbone

from explain_sets import SET_A, SET_B, SET_C, all_sets, skimage_photo  # noqa: E402


def log(msg: str) -> None:
    import sys

    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


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
    layer = bb.tap  # the layer the default map fuses
    if layer is None:
        return None
    return torch.cat([bb.features_and_tap(bb.preprocess.batch([im]), layer)[1].mean((2, 3)) for im in images]
                     ).double().mean(0).numpy()


DEFAULT = "sfam (default: g ⊕ 0.5·paper map⁴, g = D32·D16·G16; the smoothed paper map where G16 covers > ½ of the frame)"
GATED = "sfam gated product g = D32·D16·G16 alone"
NOFRAME = "sfam g ⊕ 0.5·paper map⁴ without the whole-frame switch"
PAPER = "sfam-plain cosine (the paper's map)"
PAPER_C = "sfam-plain cosine, centred (μ)"
VARIANTS = [  # (label, method, metric, centre, μ: "explain" (at the explain px) | None, where: L(ocalisation),
    #             F(aithfulness) at 224 px, 4: faithfulness of the map at 448 px, the index default; B: also on the
    #             other backbones)
    (DEFAULT, "sfam", "cosine", True, "explain", "L4B"),
    (GATED, "sfam", "cosine", True, "explain", "L4"),
    (NOFRAME, "sfam", "cosine", True, "explain", "L4"),
    ("sfam default, no μ (explain A B without an index)", "sfam", "cosine", False, None, "L"),
    (PAPER, "sfam-plain", "cosine", False, None, "LFB"),
    (PAPER_C, "sfam-plain", "cosine", True, "explain", "L4B"),
    ("gradcam cosine (this project's)", "gradcam", "cosine", False, None, "LF"),
    ("occlusion cosine", "occlusion", "cosine", False, None, "L"),
]
SETTINGS = {  # label → the explainer attributes its row sets (after make_explainer)
    GATED: {"paper": 0.0},
    NOFRAME: {"frame": None},
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
    """image batch → the pooled embedding: the backbone's feature map pooled as the index pools it. ``target`` (an
    identity on the feature map A that SFAM weights) is the CAM target layer: hooks work on it for any network,
    a TorchScript one included."""

    def __init__(self, bb):
        super().__init__()
        self.features = bb.net
        self.target = torch.nn.Identity()
        self.pooling = bb.pooling

    def forward(self, x):
        return self.pooling.pool(self.target(self.features(x)))


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
    cams = {name: getattr(gc, name)(model=model, target_layers=[model.target]) for name in PEERS}
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


SETS_SLOW = (SET_A, SET_B)  # gradcam and occlusion run here only (eager backward / hundreds of passes a pair)


def run_localisation(parts: dict, size: int, rng, rows_wanted, model: str = "efficientnet_lite0",
                     peers: bool = True) -> tuple[dict, dict]:
    """{(set, map label): {part: (energy, pointing)}} for each part ({part: {set: (pairs, sources)}}) and the rows
    ``rows_wanted`` (VARIANTS entries), plus the peers, a centre prior and a random map; and the timings."""
    out: dict = {}
    timing: dict = {}
    gc = grad_cam_package() if peers else None
    bb = load_backbone(model, input_size=size)
    for part, sets in parts.items():
        for set_name, (pairs, sources) in sets.items():
            mus = {"explain": (mean_embedding(bb, sources), mean_tap(bb, sources)), None: (None, None)}
            for label, method, metric, centre, mu_at, where in rows_wanted:
                if (method == "occlusion" and size > 224) or (method in SLOW and set_name not in SETS_SLOW):
                    continue
                mu, mu_tap = mus[mu_at]
                ex = tweak(make_explainer(method, bb, metric=metric, mu=mu, centre=centre, mu_tap=mu_tap), label)
                log(f"localisation {model} {part} {set_name} {size}px {label}")
                t = time.perf_counter()
                r = [energy_pointing(ex.explain(q, comp).result_map, box) for q, comp, box in pairs]
                timing.setdefault((method, size), []).append((time.perf_counter() - t) / len(pairs))
                out.setdefault((set_name, label), {})[part] = _means(r)
            if gc is not None:
                log(f"localisation {model} {part} {set_name} {size}px pytorch-grad-cam {', '.join(PEERS)}")
                t = time.perf_counter()
                maps = peer_maps(gc, bb, pairs)
                timing.setdefault(("pytorch-grad-cam, all five in one pass", size), []).append(
                    (time.perf_counter() - t) / len(pairs))
                for name, ms in maps.items():
                    out.setdefault((set_name, f"pytorch-grad-cam {name} (similarity target)"), {})[part] = _means(
                        [energy_pointing(m, box) for m, (_, _, box) in zip(ms, pairs)])
            out.setdefault((set_name, "centre prior"), {})[part] = _means(
                [energy_pointing(centre_prior(comp.height, comp.width), box) for _, comp, box in pairs])
            out.setdefault((set_name, "random map"), {})[part] = _means(
                [energy_pointing(rng.random((comp.height, comp.width)), box) for _, comp, box in pairs])
    return out, timing


def _means(r: list[tuple]) -> tuple[float, float]:
    return round(float(np.mean([a for a, _ in r])), 3), round(float(np.mean([b for _, b in r])), 3)


def localisation_table(res: dict, parts) -> tuple[list, list]:
    """Headers and rows: each part's energy and pointing, and (with both parts) the pointing gap tuning − held-out."""
    both = len(parts) == 2
    headers = ["set", "map"] + [f"{p} {m}" for p in parts for m in ("energy", "pointing")]
    headers += ["gap (pointing)"] if both else []
    rows = []
    for (set_name, label), by in res.items():
        row = [set_name, label]
        for p in parts:
            row += list(by[p]) if p in by else ["—", "—"]
        if both:
            row.append(round(by[parts[0]][1] - by[parts[1]][1], 3) if all(p in by for p in parts) else "—")
        rows.append(row)
    return headers, rows


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


def run_faithfulness(pairs_by_part: dict, rows_wanted, model: str = "efficientnet_lite0",
                     priors: bool = True) -> dict:
    """{(dataset, map label): {part: (deletion, insertion, pairs)}}: the 224-px rows (F) and the maps at 448 px (4)
    of ``rows_wanted``, scored by the 224-px network's plain cosine."""
    out: dict = {}
    bb = load_backbone(model)
    bb448 = load_backbone(model, input_size=448)
    for part, pairs_by in pairs_by_part.items():
        for ds, pairs in pairs_by.items():
            images = [p[0] for p in pairs] + [p[1] for p in pairs]
            for net, key, suffix in ((bb, "F", ""), (bb448, "4", ", map at 448 px")):
                mus = {"explain": (mean_embedding(net, images), mean_tap(net, images)), None: (None, None)}
                for label, method, metric, centre, mu_at, where in rows_wanted:
                    if key not in where:
                        continue
                    ex = tweak(make_explainer(method, net, metric=metric, mu=mus[mu_at][0], centre=centre,
                                              mu_tap=mus[mu_at][1]), label)
                    log(f"faithfulness {model} {part} {ds} {label}{suffix}")
                    d, i = pooled_auc([deletion_insertion(bb, ex, q, r, ex.explain(q, r).result_raw) for q, r in pairs])
                    out.setdefault((ds, label + suffix), {})[part] = (round(d, 3), round(i, 3), len(pairs))
            if priors:
                for label, heat_fn in (("centre prior", lambda: centre_prior(7, 7)),
                                       ("random map", lambda: np.random.default_rng(1).random((7, 7)))):
                    ex = make_explainer("sfam", bb)
                    d, i = pooled_auc([deletion_insertion(bb, ex, q, r, heat_fn()) for q, r in pairs])
                    out.setdefault((ds, label), {})[part] = (round(d, 3), round(i, 3), len(pairs))
    return out


def faithfulness_table(res: dict, parts) -> tuple[list, list]:
    headers = ["dataset", "map"] + [f"{p} {m}" for p in parts for m in ("deletion", "insertion")] + ["pairs"]
    rows = []
    for (ds, label), by in res.items():
        row = [ds, label]
        for p in parts:
            row += list(by[p][:2]) if p in by else ["—", "—"]
        row.append(" / ".join(str(by[p][2]) for p in parts if p in by))
        rows.append(row)
    return headers, rows


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    ra = np.argsort(np.argsort(a.ravel())).astype(float)
    rb = np.argsort(np.argsort(b.ravel())).astype(float)
    return float(np.corrcoef(ra, rb)[0, 1])


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
        for what, ts in (("SFAM default", sf), ("SFAM gated product alone", sg),
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


def targets(loc: dict, faith: dict, parts, label: str = DEFAULT) -> list[str]:
    """Issue #29's targets, each met or not, from the tables (the held-out part; the gap where both parts ran)."""
    out = []
    held = "held-out"
    c = loc.get((SET_C, label), {}).get(held)
    if c:
        out.append(f"held-out set C: pointing {c[1]:.2f} (≥ 0.90), energy {c[0]:.2f} (≥ 0.60): "
                   f"**{'met' if c[1] >= 0.9 and c[0] >= 0.6 else 'not met'}**")
    for set_name in dict.fromkeys(k for k, _ in loc):
        ours = loc.get((set_name, label), {}).get(held)
        peers = [v[held] for (sn, lb), v in loc.items() if sn == set_name and lb.startswith("pytorch-grad-cam")
                 and held in v]
        if ours and peers:
            pe, pp = max(p[0] for p in peers), max(p[1] for p in peers)
            ok = ours[0] > pe and ours[1] >= pp
            out.append(f"held-out {set_name[:2].strip(':')}: energy {ours[0]:.3f} vs the best peer's {pe:.3f}, "
                       f"pointing {ours[1]:.2f} vs {pp:.2f}: **{'above' if ok else 'not above'}**")
        both = loc.get((set_name, label), {})
        if len(parts) == 2 and all(p in both for p in parts):
            gap = both[parts[0]][1] - both[parts[1]][1]
            out.append(f"{set_name[:2].strip(':')}: pointing gap tuning − held-out {gap:+.2f} (≤ 0.05): "
                       f"**{'met' if gap <= 0.05 else 'not met'}**")
    for (ds, lb), by in faith.items():
        if lb != f"{label}, map at 448 px":
            continue
        for p in parts:
            bar = faith.get((ds, f"{PAPER_C}, map at 448 px"), {}).get(p)  # the paper's map in the same setting
            plain = faith.get((ds, PAPER), {}).get(p)  # and as the paper makes it (224 px, uncentred)
            if bar and p in by:
                d, i = by[p][:2]
                ok = d <= bar[0] + 0.02 and i >= bar[1] - 0.02
                also = f"; at 224 px uncentred {plain[0]:.3f} / {plain[1]:.3f}" if plain else ""
                out.append(f"{p} {ds}: deletion {d:.3f} / insertion {i:.3f} vs the paper's map centred at 448 px "
                           f"{bar[0]:.3f} / {bar[1]:.3f}{also} (no worse than the same setting, ±0.02 noise): "
                           f"**{'met' if ok else 'not met'}**")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=448, help="input size for localisation (448: the explain default)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--split", choices=("both", "tuning", "held-out"), default="both",
                    help="which parts of the sets (bench/explain_sets.py); choose on tuning, report both")
    ap.add_argument("--quick", action="store_true", help="a fifth of the pairs (a smoke run)")
    ap.add_argument("--only", nargs="+", default=None, metavar="TEXT",
                    help="only the SFAM rows whose label contains TEXT, no peers, sanity or cost: saved as "
                         "bench/results/explain-only.md")
    ap.add_argument("--backbones", nargs="*", default=[], metavar="MODEL",
                    help="other backbones the defaults never saw (a registry name or a TorchScript file): the "
                         "held-out part, the default and the paper's maps beside pytorch-grad-cam")
    ap.add_argument("--skip", nargs="*", default=[], choices=("localisation", "faithfulness", "sanity", "cost"))
    ap.add_argument("--sanity-pairs", type=int, default=20, help="Caltech pairs for bench/sanity.py")
    ap.add_argument("--out", default=None, help="results name (default: explain, explain-only with --only)")
    ap.add_argument("--cost-only", action="store_true",
                    help="only the top-10 cost rows (5 interleaved rounds), saved as bench/results/explain-cost.md")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.time()
    rng = np.random.default_rng(0)
    if args.cost_only:
        _common.save("explain-cost", f"## Cost ({args.threads} threads)\n\n"
                     + _common.table(["what", "ms", "ratio"], cost({}, [args.size], rounds=5)))
        return
    parts = ("tuning", "held-out") if args.split == "both" else (args.split,)
    sets = all_sets(args.quick)
    rows_wanted = [v for v in VARIANTS if not args.only or any(t in v[0] for t in args.only)]
    name = "explain" if not args.only else "explain-only"
    name = args.out or name + ("-quick" if args.quick else "")
    cmd = "python bench/explain_eval.py " + " ".join(a for a in __import__("sys").argv[1:])
    text = (f"`{cmd}` · threads {args.threads} · input {args.size} px (pytorch-grad-cam rows: the same backbone, "
            "weights and input size); faithfulness scored at 224 px, of the maps at 224 and 448 px.\n\n"
            "**Protocol** (bench/explain_sets.py): *tuning* = the sets the defaults were chosen on (seed 0); "
            "*held-out* = the same recipes with seed 1 and source photos no tuning pair uses, plus family D "
            "(D1 a smaller paste, D2 a rotated and perspective-warped paste, D3 two pasted objects of which one "
            "matches), built after the defaults were frozen. Gap = tuning − held-out pointing.\n\n")
    loc, faith, timing = {}, {}, {}
    if "localisation" not in args.skip:
        loc, timing = run_localisation({p: sets[p] for p in parts}, args.size, rng, [v for v in rows_wanted if "L" in v[5]],
                                       peers=not args.only)
        h, r = localisation_table(loc, parts)
        text += ("## Localisation, EfficientNet-Lite0 (result map on the composite, scored at the photo's own size; "
                 "energy-in-box and pointing)\n\n" + _common.table(h, r) + "\n\n")
        _common.save(name, text + "(running)")
    if "faithfulness" not in args.skip:
        faith = run_faithfulness({p: sets["pairs"][p] for p in parts}, rows_wanted, priors=not args.only)
        h, r = faithfulness_table(faith, parts)
        text += ("## Faithfulness on real matched pairs, EfficientNet-Lite0\n\nThe similarity the search reports "
                 "(plain cosine) as pixels of the result are deleted / inserted (a blurred copy), rescaled so the "
                 "fully blurred result is 0 and the intact one 1 (pooled over pairs: mean AUC / mean gap). "
                 "Deletion: lower is better; insertion: higher is better.\n\n" + _common.table(h, r) + "\n\n")
        _common.save(name, text + "(running)")
    for model in args.backbones:
        held = {"held-out": sets["held-out"]}
        wanted = [v for v in VARIANTS if "B" in v[5]]
        bl, _ = run_localisation(held, args.size, rng, wanted, model=model, peers=True)
        h, r = localisation_table(bl, ("held-out",))
        bf = run_faithfulness({"held-out": sets["pairs"]["held-out"]}, wanted, model=model, priors=False)
        hf, rf = faithfulness_table(bf, ("held-out",))
        text += (f"## A backbone the defaults never saw: {model} (held-out part)\n\n" + _common.table(h, r)
                 + "\n\n" + _common.table(hf, rf) + "\n\nTargets on this backbone:\n\n"
                 + "\n".join(f"- {t}" for t in targets(bl, bf, ("held-out",)) if "gap" not in t) + "\n\n")
        _common.save(name, text + "(running)")
    if "sanity" not in args.skip and not args.only:
        text += sanity_section(args)
    if "cost" not in args.skip and not args.only:
        text += f"## Cost ({args.threads} threads)\n\n" + _common.table(["what", "ms", "ratio"],
                                                                          cost(timing, [args.size])) + "\n\n"
    if loc or faith:
        text += "## Targets (issue #29), the default map, EfficientNet-Lite0\n\n" + "\n".join(
            f"- {t}" for t in targets(loc, faith, parts)) + "\n\n"
    text += f"Run time: {time.time() - t0:.0f} s.\n"
    _common.save(name, text)


def sanity_section(args) -> str:
    """Adebayo et al.'s checks, by bench/sanity.py in this run (its table, also saved as explain-sanity.md)."""
    import subprocess
    import sys

    cmd = [sys.executable, str(_common.ROOT / "bench" / "sanity.py"), "--pairs", str(args.sanity_pairs),
           "--occlusion-pairs", "2", "--threads", "1"]
    log("sanity: " + " ".join(cmd[1:]))
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    body = (_common.RESULTS / "explain-sanity.md").read_text().split("\n", 1)[1]  # without its date line
    body = body.replace("\n# ", "\n### ").replace("\n## ", "\n### ").lstrip("# ")
    return "## Sanity checks (bench/sanity.py, in this run)\n\n" + body + "\n\n"


if __name__ == "__main__":
    main()
