"""A sweep of refinements of SFAM's gated map g = D32·D16·G16 (issue 11: deletion/insertion), each map made
from the same forward pass per pair: localisation on explain_eval's sets A, B, C at 448 px and deletion /
insertion on its matched pairs (att_faces, caltech101; maps at 448 px, similarity at 224 px), with the same
pairs, μ and metric functions as bench/explain_eval.py (its rows for g and the paper's map come out identical).

    python bench/explain_sweep.py L F                 # all variants (about 40 min on 2 loaded cores)
    VARS="default|mix paper^4 l=0.5" python bench/explain_sweep.py L F     # some of them
    (with L and F: faithfulness only for the variants that keep the localisation targets)

Prints the table; bench/results/explain-sweep.md holds the 2026-11-30 runs. A research script: the shipped
map is explain/methods.py SFAM (paper=0.5, paper_power=4, the OR form, and since 12:30 the whole-frame turn
of bench/explain_adaptive.py), measured by explain_eval.py.
"""
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import numpy as np
import torch
import explain_eval as ev
from explain.methods import SFAM, SFAMPlain, upsample, _unit, _mutual, _to
from retrieval.models.loading import load_backbone

torch.set_num_threads(2)
NPAIRS = int(os.environ.get("NPAIRS", "20"))


def components(ex: SFAM, plain: SFAMPlain, q, r):
    bb = ex.backbone
    pre = bb.preprocess
    xq = torch.from_numpy(pre.array(q)[None]); xr = torch.from_numpy(pre.array(r)[None])
    fq = bb.features_and_tap(xq, ex.tap); fr = bb.features_and_tap(xr, ex.tap)
    side = ex._query_side(*fq)
    ar, tr = fr
    a = ar.double()
    pooling = bb.pooling
    rr = pooling.pool(a).numpy()
    q_ = side["q"]; m = side["m"]
    wq, wr, _ = ex._weights(q_, rr)
    wr = torch.from_numpy(np.ascontiguousarray(wr))
    cr = pooling.contributions(a).flatten(2)
    d32 = (torch.bmm(wr[:, None], cr)[:, 0] - (wr @ m)[:, None]).reshape(1, *a.shape[-2:])
    mt, q16 = side["mt"], side["q16"]
    tc = tr.double().flatten(2) - mt[None, :, None]
    r16 = tc.mean(2)
    z = (q16.norm() * r16.norm(dim=1)).clamp_min(1e-12)
    d16 = (torch.einsum("c,ncl->nl", q16, tc) / z[:, None]).reshape(1, *tr.shape[-2:])
    gq, gr = _mutual(side["uq"], _unit(tc.to(tr.dtype)), None)
    g = (gr > 0).double().reshape(d16.shape)
    hw = tuple(tr.shape[-2:])
    # the paper's map with the same (centred) CIS: ReLU(Σ CIS_k A_k)
    info = ex.similarity(q_, rr[0])
    w = torch.as_tensor(info["cis"], dtype=torch.float64)
    plain14 = torch.einsum("c,chw->hw", w, pooling.contributions(a)[0])
    out = {"d32": d32[0], "d32up": _to(torch.relu(d32), hw)[0], "d32up_lin": _to(d32, hw)[0], "d16": d16[0],
           "g": g[0], "plain14": torch.relu(plain14), "plainup": _to(torch.relu(plain14)[None], hw)[0]}
    return {k: v.numpy() for k, v in out.items()}


def nrm(x):
    x = np.maximum(x, 0)
    mx = x.max()
    return x / mx if mx > 0 else x


def blur(x, s):
    from scipy.ndimage import gaussian_filter
    return gaussian_filter(x, s, mode="nearest")


def variants(c):
    R = np.maximum
    d32, d16, g, P = R(c["d32up"], 0), R(c["d16"], 0), c["g"], c["plainup"]
    dflt = d32 * d16 * g
    V = {"default": dflt, "prev (paper map centred, 14x14)": c["plain14"], "ungated D32.D16": d32 * d16}
    for l in (0.05, 0.1, 0.2, 0.3, 0.5):
        V[f"mix paper l={l}"] = nrm(dflt) + l * nrm(P)
    for l in (0.1, 0.3):
        V[f"max(default, l*paper) l={l}"] = np.maximum(nrm(dflt), l * nrm(P))
    for l in (0.05, 0.1, 0.2):
        V[f"mix D32 l={l}"] = nrm(dflt) + l * nrm(d32)
    for l in (0.05, 0.1, 0.2):
        V[f"mix D32.D16 l={l}"] = nrm(dflt) + l * nrm(d32 * d16)
    for e in (0.1, 0.3):
        V[f"gate floor eps={e}"] = d32 * d16 * (g + e * (1 - g))
    V["tie-break by paper 1e-3"] = nrm(dflt) + 1e-3 * nrm(P)
    for s in (0.5, 1.0, 2.0):
        V[f"blur s={s}"] = blur(dflt, s)
    V["blur1 + mix paper 0.1"] = nrm(blur(dflt, 1.0)) + 0.1 * nrm(P)
    V["blur1 + mix paper 0.2"] = nrm(blur(dflt, 1.0)) + 0.2 * nrm(P)
    V["mix paper 0.2, blur1"] = blur(nrm(dflt) + 0.2 * nrm(P), 1.0)
    V["mix paper 0.3, blur1"] = blur(nrm(dflt) + 0.3 * nrm(P), 1.0)
    V["mix paper 0.5, blur1"] = blur(nrm(dflt) + 0.5 * nrm(P), 1.0)
    V["mix paper 0.2, blur1.5"] = blur(nrm(dflt) + 0.2 * nrm(P), 1.5)
    V["mix paper 0.1, blur1"] = blur(nrm(dflt) + 0.1 * nrm(P), 1.0)
    V["mix D32 0.2, blur1"] = blur(nrm(dflt) + 0.2 * nrm(d32), 1.0)
    for l, gm in ((0.3, 2), (0.3, 4), (0.5, 4), (1.0, 4), (1.0, 8), (0.5, 8)):
        V[f"mix paper^{gm} l={l}"] = nrm(dflt) + l * nrm(P) ** gm
    for l, gm in ((0.1, 2), (0.3, 4)):
        V[f"mix paper^{gm} l={l} +blur.5"] = blur(nrm(dflt) + l * nrm(P) ** gm, 0.5)
    V["mix paper l=0.05 +blur.5"] = blur(nrm(dflt) + 0.05 * nrm(P), 0.5)
    only = os.environ.get("VARS")
    if only:
        V = {k: v for k, v in V.items() if k in only.split("|")}
    return V

def explainers(bb, images):
    """The default SFAM and the paper's map for ``bb``, centred on ``images``' means (embedding and stride-16 tap)."""
    mu, mt = ev.mean_embedding(bb, images), ev.mean_tap(bb, images)
    return SFAM(bb, mu=mu, centre=True, mu_tap=mt), SFAMPlain(bb, mu=mu, centre=True)


FMODE = [False]


def main():
    sel = sys.argv[1:]  # "L" "F"
    rng = np.random.default_rng(0)
    out = {}
    if "L" in sel:
        sets = ev.localisation_sets(rng)
        bb = load_backbone(input_size=448)
        for set_name, (pairs, sources) in sets.items():
            ex, pl = explainers(bb, sources)
            acc = {}
            t = time.time()
            for q, comp, box in pairs:
                c = components(ex, pl, q, comp)
                for k, raw in variants(c).items():
                    m = upsample(raw, (comp.height, comp.width))
                    acc.setdefault(k, []).append(ev.energy_pointing(m, box))
            for k, v in acc.items():
                out.setdefault(k, {})[set_name[0] + " E/P"] = (round(float(np.mean([a for a, _ in v])), 3),
                                                              round(float(np.mean([b for _, b in v])), 3))
            print(set_name, f"{time.time() - t:.0f}s", file=sys.stderr, flush=True)
            for k, v in out.items():
                print(f"{k:40s} " + "  ".join(f"{kk}: {vv}" for kk, vv in v.items()), file=sys.stderr, flush=True)
    if "F" in sel:
        FMODE[0] = True
        if "L" in sel:  # only those that keep the localisation targets
            keep = [k for k, v in out.items() if v["A E/P"][0] > 0.886 and v["B E/P"][0] > 0.393 and v["B E/P"][1] > 0.6
                    and v["C E/P"][0] >= 0.6 and v["C E/P"][1] >= 0.9]
            os.environ["VARS"] = "|".join(keep)
            print("F for", keep, file=sys.stderr, flush=True)
        bb = load_backbone()
        bb448 = load_backbone(input_size=448)
        for ds, pairs in ev.matched_pairs(False).items():
            if NPAIRS != 20:
                pairs = matched(ds, NPAIRS)
            images = [p[0] for p in pairs] + [p[1] for p in pairs]
            ex, pl = explainers(bb448, images)
            acc = {}
            t = time.time()
            for q, r in pairs:
                c = components(ex, pl, q, r)
                for k, raw in variants(c).items():
                    acc.setdefault(k, []).append(ev.deletion_insertion(bb, ex, q, r, raw))
            for k, v in acc.items():
                out.setdefault(k, {})[ds + " D/I"] = tuple(round(x, 3) for x in ev.pooled_auc(v))
            print(ds, len(pairs), f"{time.time() - t:.0f}s", file=sys.stderr, flush=True)
            for k, v in acc.items():
                print(k, ds, tuple(round(x, 3) for x in ev.pooled_auc(v)), file=sys.stderr, flush=True)
    print("load", os.getloadavg())
    for k, v in out.items():
        print(f"{k:40s} " + "  ".join(f"{kk}: {vv}" for kk, vv in v.items()))


def matched(ds, n):
    from PIL import Image
    import _common
    if ds == "att_faces":
        faces = _common.shared_dataset("att_faces")
        people = sorted(p for p in faces.iterdir() if p.is_dir())[:n]
        return [(Image.open(p / "1.pgm").convert("RGB"), Image.open(p / "2.pgm").convert("RGB")) for p in people]
    cal = _common.shared_dataset("caltech101")
    cats = sorted(p for p in cal.iterdir() if p.is_dir())
    step = max(1, len(cats) // n)
    cats = cats[::step][:n]
    return [tuple(Image.open(f).convert("RGB") for f in sorted(c.glob("*.jpg"))[:2]) for c in cats]


if __name__ == "__main__":
    main()
