"""Coverage-adaptive refinements of SFAM's default map (issue 11: faces deletion), side by side with the
default, ``g`` alone and the paper's map, on explain_eval's sets and matched pairs (the same pairs, μ and
metric functions as bench/explain_eval.py and bench/explain_sweep.py).

    python bench/explain_adaptive.py cache            # one forward pass per pair: components → /tmp cache
    python bench/explain_adaptive.py L F [VARS=...]   # variants from the cache (F: 42 passes per pair and map)

A research script: prints the table that bench/results/explain-sweep.md records.
"""
import os
import pickle
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import numpy as np
import torch
import explain_eval as ev
import explain_sweep as sw
from explain.methods import SFAM, upsample
from retrieval.models.loading import load_backbone

torch.set_num_threads(int(os.environ.get("THREADS", "2")))
CACHE = os.environ.get("CACHE", "/tmp/audit_components.pkl")
NPAIRS = int(os.environ.get("NPAIRS", "20"))


def build_cache():
    rng = np.random.default_rng(0)
    out = {"L": {}, "F": {}}
    sets = ev.localisation_sets(rng)
    bb = load_backbone(input_size=448)
    for set_name, (pairs, sources) in sets.items():
        ex, pl = sw.explainers(bb, sources)
        t = time.time()
        out["L"][set_name] = [(sw.components(ex, pl, q, comp), (comp.height, comp.width), box)
                              for q, comp, box in pairs]
        print(set_name, f"{time.time() - t:.0f}s", file=sys.stderr, flush=True)
    for ds, pairs in ev.matched_pairs(False, NPAIRS).items():
        images = [p[0] for p in pairs] + [p[1] for p in pairs]
        ex, pl = sw.explainers(bb, images)
        out["F"][ds] = [sw.components(ex, pl, q, r) for q, r in pairs]
        print(ds, len(pairs), file=sys.stderr, flush=True)
    with open(CACHE, "wb") as f:
        pickle.dump(out, f)


nrm = sw.nrm


def parts(c):
    R = np.maximum
    d32, d16, gate, P = R(c["d32up"], 0), R(c["d16"], 0), c["g"], c["plainup"]
    return d32, d16, gate, P, d32 * d16 * gate


def orf(g, s):
    return g + s * (1 - g)


def coverage(c, kind):
    d32, d16, gate, P, g = parts(c)
    if kind == "gate":  # share of the stride-16 locations with a mutual match
        return float(gate.mean())
    if kind == "mass":  # share of the positive D32·D16 mass that the gate keeps
        u = d32 * d16
        return float(u[gate > 0].sum() / max(u.sum(), 1e-12))
    if kind == "pmass":  # share of the paper map's mass that lies where g > 0
        return float(P[g > 0].sum() / max(P.sum(), 1e-12))
    if kind == "d32pos":  # share of locations where D32 > 0
        return float((c["d32up"] > 0).mean())
    if kind == "spread":  # participation ratio of g: (Σg)²/(N Σg²), 1 = flat, 1/N = one cell
        return float(g.sum() ** 2 / max(g.size * (g ** 2).sum(), 1e-12))
    if kind == "pspread":
        return float(P.sum() ** 2 / max(P.size * (P ** 2).sum(), 1e-12))
    raise KeyError(kind)


def variants(c):
    d32, d16, gate, P, g = parts(c)
    V = {"default": orf(nrm(g), 0.5 * nrm(P) ** 4), "g alone": g, "P alone (bar)": P}
    for kind in ("gate", "mass", "pmass", "spread", "pspread", "d32pos"):
        k = coverage(c, kind)
        V[f"cov[{kind}]={k:.2f}"] = None  # a diagnostic row: the coverage itself (mean over pairs)
        # blend: (1 − κ)·default + κ·P/max
        V[f"blend[{kind}]"] = (1 - k) * orf(nrm(g), 0.5 * nrm(P) ** 4) + k * nrm(P)
        # the power of the floor falls with coverage: γ = 4(1 − κ) (κ → 1: P itself)
        V[f"gamma[{kind}]"] = orf((1 - k) * nrm(g), nrm(P) ** (4 * (1 - k) + 1e-6) * (0.5 + 0.5 * k))
    k = coverage(c, "gate")
    dflt = V["default"]
    for a, b in ((0.25, 0.5), (0.2, 0.6), (0.3, 0.5), (0.0, 0.5), (0.15, 0.45), (0.35, 0.55)):
        w = float(np.clip((k - a) / (b - a), 0, 1))
        V[f"ramp{a},{b}"] = (1 - w) * dflt + w * nrm(P)
        V[f"gramp{a},{b}"] = orf((1 - w) * nrm(g), (0.5 + 0.5 * w) * nrm(P) ** (4 * (1 - w) + 1e-6))
    for sg in (1.0, 2.0, 3.0):
        V[f"frame: P blur{sg}"] = sw.blur(P, sg)
    V["frame: D16"] = d16
    V["frame: D32"] = d32
    V["frame: D32.D16"] = d32 * d16
    V["frame: P.D16"] = P * d16
    V["frame: D32.D16 blur1"] = sw.blur(d32 * d16, 1.0)
    V["frame: g blur2"] = sw.blur(g, 2.0)
    V["frame: P+D16"] = nrm(P) + nrm(d16)
    for a, b, sg in ((0.25, 0.5, 1.0), (0.2, 0.5, 1.0), (0.25, 0.5, 1.5), (0.3, 0.6, 1.0)):
        w = float(np.clip((k - a) / (b - a), 0, 1))
        V[f"rblur{a},{b},{sg}"] = (1 - w) * dflt + w * nrm(sw.blur(P, sg))
    V["switch0.5"] = nrm(P) if k > 0.5 else dflt
    V["switch0.4"] = nrm(P) if k > 0.4 else dflt
    only = os.environ.get("VARS")
    if only:
        V = {k: v for k, v in V.items() if any(k.startswith(s) for s in only.split("|"))}
    return V


def main():
    sel = sys.argv[1:]
    if "cache" in sel:
        build_cache()
        return
    with open(CACHE, "rb") as f:
        cache = pickle.load(f)
    out = {}
    covs = {}
    if "L" in sel:
        for set_name, items in cache["L"].items():
            acc = {}
            for c, size, box in items:
                for k, raw in variants(c).items():
                    if raw is None:
                        covs.setdefault(k.split("=")[0] + " " + set_name[0], []).append(float(k.split("=")[1]))
                        continue
                    m = upsample(raw, size)
                    acc.setdefault(k, []).append(ev.energy_pointing(m, box))
            for k, v in acc.items():
                out.setdefault(k, {})[set_name[0] + " E/P"] = (round(float(np.mean([a for a, _ in v])), 3),
                                                              round(float(np.mean([b for _, b in v])), 3))
    if "F" in sel:
        bb = load_backbone()
        pairs_by = ev.matched_pairs(False, NPAIRS)
        for ds, comps in cache["F"].items():
            if "faces" in os.environ.get("SKIP", "") and ds == "att_faces":
                continue
            if "caltech" in os.environ.get("SKIP", "") and ds == "caltech101":
                continue
            ex = SFAM(bb)
            acc = {}
            t = time.time()
            for (q, r), c in zip(pairs_by[ds], comps):
                for k, raw in variants(c).items():
                    if raw is None:
                        covs.setdefault(k.split("=")[0] + " " + ds, []).append(float(k.split("=")[1]))
                        continue
                    acc.setdefault(k, []).append(ev.deletion_insertion(bb, ex, q, r, raw))
            for k, v in acc.items():
                out.setdefault(k, {})[ds[:5] + " D/I"] = tuple(round(x, 3) for x in ev.pooled_auc(v))
            print(ds, f"{time.time() - t:.0f}s", file=sys.stderr, flush=True)
    print("load", os.getloadavg())
    for k, v in covs.items():
        print(f"{k:30s} mean {np.mean(v):.3f} min {np.min(v):.3f} max {np.max(v):.3f}")
    for k, v in out.items():
        print(f"{k:28s} " + "  ".join(f"{kk}: {vv}" for kk, vv in v.items()))


if __name__ == "__main__":
    main()
