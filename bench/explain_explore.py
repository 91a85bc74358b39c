"""Exploring SFAM variants for the default map (issue 11, item 1): layers, fusion, centring, gating.

    python bench/explain_explore.py [--size 448] [--sets A B C] [--subset N] [--threads 2]

Runs the backbone once per image (eager, with hooks on the stride-16 layer) and caches the feature maps
under bench/.cache/explore, then scores every variant's result map (energy-in-box, pointing, at the
photo's own size) on the localisation sets of bench/explain_eval.py. Prints a table; saves nothing else.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import _common
import numpy as np
import torch
import torch.nn.functional as F

from explain_eval import energy_pointing, localisation_sets
from explain.methods import upsample
from retrieval.models.loading import load_backbone

CACHE = _common.ROOT / "bench" / ".cache" / "explore"


def taps(bb, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Feature maps of one batch: s32 (the head, 1280), s16 (block 11's expansion, 672, post-ReLU6),
    s16p (block 10's output, 112, linear)."""
    net = bb.net.net
    out = {}
    h1 = net._blocks[10].register_forward_hook(lambda m, i, o: out.__setitem__("s16p", o))
    h2 = net._blocks[11]._bn0.register_forward_hook(lambda m, i, o: out.__setitem__("s16", F.relu6(o)))
    try:
        with torch.inference_mode():
            out["s32"] = bb.net(x)
    finally:
        h1.remove()
        h2.remove()
    return {k: v.float() for k, v in out.items()}


def extract(set_name: str, pairs, sources, size: int) -> dict:
    key = set_name.split(":")[0]
    path = CACHE / f"{key}-{size}.pt"
    if path.exists():
        return torch.load(path)
    bb = load_backbone(input_size=size, fast="eager")
    pre = bb.preprocess
    t = time.time()
    feats = {"q": [], "r": []}
    for q, comp, box in pairs:
        for side, img in (("q", q), ("r", comp)):
            f = taps(bb, pre.batch([img]))
            feats[side].append({k: v[0].half() for k, v in f.items()})
    pooled = {}
    for img in sources:
        f = taps(bb, pre.batch([img]))
        for k, v in f.items():
            pooled.setdefault(k, []).append(v[0].double().mean((1, 2)))
    mu = {k: torch.stack(v).mean(0) for k, v in pooled.items()}
    # μ at the index's own resolution (224 px), for the mismatch question
    bb224 = load_backbone(input_size=224, fast="eager")
    pooled224 = {}
    for img in sources:
        f = taps(bb224, bb224.preprocess.batch([img]))
        for k, v in f.items():
            pooled224.setdefault(k, []).append(v[0].double().mean((1, 2)))
    mu224 = {k: torch.stack(v).mean(0) for k, v in pooled224.items()}
    doc = {"feats": feats, "mu": mu, "mu224": mu224, "boxes": [b for _, _, b in pairs],
           "sizes": [(c.height, c.width) for _, c, _ in pairs]}
    CACHE.mkdir(parents=True, exist_ok=True)
    torch.save(doc, path)
    print(f"extracted {key} at {size}px in {time.time() - t:.0f}s", flush=True)
    return doc


# -- variants: each returns the raw result map (h×w, ≥ 0 after the upsampling's clamp) -----------------

def _cis(q, r, mu=None):
    if mu is not None:
        q, r = q - mu, r - mu
    return q * r / (q.norm() * r.norm()).clamp_min(1e-12)


def sfam_map(aq, ar, mu, centre=True, side="r"):
    w = _cis(aq.mean((1, 2)), ar.mean((1, 2)), mu if centre else None)
    return torch.relu(torch.einsum("c,chw->hw", w, ar if side == "r" else aq))


def contrastive(aq, ar, mu):
    q, r = aq.mean((1, 2)) - mu, ar.mean((1, 2)) - mu
    qh, rh = q / q.norm(), r / r.norm()
    w = qh - (qh @ rh) * rh
    return torch.relu(torch.einsum("c,chw->hw", w, ar - mu[:, None, None]))


def decomposition(aq, ar, mu):
    q, r = aq.mean((1, 2)) - mu, ar.mean((1, 2)) - mu
    return torch.relu(torch.einsum("c,chw->hw", q / (q.norm() * r.norm()), ar - mu[:, None, None]))


def similarity_matrix(aq, ar, mu):
    """Cosine of every result location's centred feature with every query location's: Nr × Nq."""
    fq = F.normalize((aq - mu[:, None, None]).flatten(1), dim=0)
    fr = F.normalize((ar - mu[:, None, None]).flatten(1), dim=0)
    return fr.T @ fq


def gate(aq, ar, mu, kind="max"):
    s = similarity_matrix(aq, ar, mu)
    h, w = ar.shape[-2:]
    best, nn_r = s.max(1)
    if kind == "max":
        g = best.clamp_min(0)
    else:  # mutual nearest neighbours only
        nn_q = s.argmax(0)
        mutual = nn_q[nn_r] == torch.arange(len(nn_r))
        g = best.clamp_min(0) * mutual
    return g.reshape(h, w)


def resize(m, hw):
    return F.interpolate(m[None, None], size=hw, mode="bilinear", align_corners=False)[0, 0].clamp_min(0)


def prod(a, b):
    hw = max(a.shape, b.shape)
    return resize(a, hw) * resize(b, hw)


def variants(f, mu, mu224):
    q32, r32, q16, r16 = f["q"]["s32"], f["r"]["s32"], f["q"]["s16"], f["r"]["s16"]
    m32, m16 = mu["s32"], mu["s16"]
    s32c = sfam_map(q32, r32, m32)
    s16c = sfam_map(q16, r16, m16)
    out = {
        "s32 uncentred": sfam_map(q32, r32, m32, centre=False),
        "s32 centred, μ224 (shipped)": sfam_map(q32, r32, mu224["s32"]),
        "s32 centred": s32c,
        "s16 centred": s16c,
        "s16p centred": sfam_map(f["q"]["s16p"], f["r"]["s16p"], mu["s16p"]),
        "s32c·s16c": prod(s32c, s16c),
        "sqrt(s32c·s16c)": prod(s32c, s16c).sqrt(),
        "s32 contrastive": contrastive(q32, r32, m32),
        "s16 contrastive": contrastive(q16, r16, m16),
        "contr s32·s16": prod(contrastive(q32, r32, m32), contrastive(q16, r16, m16)),
        "s32 decomposition": decomposition(q32, r32, m32),
    }
    g32 = gate(q32, r32, m32)
    g16 = gate(q16, r16, m16)
    g16m = gate(q16, r16, m16, "mnn")
    g32m = gate(q32, r32, m32, "mnn")
    out.update({
        "s32c × g32max": s32c * g32,
        "s32c × g32mnn": s32c * g32m,
        "s32c × g16max": prod(s32c, g16),
        "s32c × g16mnn": prod(s32c, g16m),
        "s16c × g16max": s16c * g16,
        "s16c × g16mnn": s16c * g16m,
        "s32c·s16c × g16max": prod(s32c, s16c) * g16,
        "sqrt(s32c·s16c) × g16max": prod(s32c, s16c).sqrt() * g16,
        "s32c × g16max²": prod(s32c, g16 ** 2),
        "g16max alone": g16,
        "g16mnn alone": g16m,
    })
    d32, d16 = decomposition(q32, r32, m32), decomposition(q16, r16, m16)
    c32, c16 = contrastive(q32, r32, m32), contrastive(q16, r16, m16)
    out.update({
        "dec16": d16,
        "dec32·dec16": prod(d32, d16),
        "sqrt(dec32·dec16)": prod(d32, d16).sqrt(),
        "dec32 × g16mnn": prod(d32, g16m),
        "dec32 × g32mnn": d32 * g32m,
        "dec32 × g16max": prod(d32, g16),
        "dec32·dec16 × g16mnn": prod(d32, d16) * g16m,
        "c32 × g16mnn": prod(c32, g16m),
        "c32 × g16max": prod(c32, g16),
        "sqrt(c32·c16)": prod(c32, c16).sqrt(),
        "c32·c16 × g16mnn": prod(c32, c16) * g16m,
        "c32·c16 × g16max": prod(c32, c16) * g16,
        "c32 (μ224)": contrastive(q32, r32, mu224["s32"]),
        "c32·c16 (μ224)": prod(contrastive(q32, r32, mu224["s32"]), contrastive(q16, r16, mu224["s16"])),
        "dec32 (μ224)": decomposition(q32, r32, mu224["s32"]),
        "c32 uncentred": contrastive(q32, r32, torch.zeros_like(m32)),
        "s32c·c16": prod(s32c, c16),
        "dec32·c16": prod(d32, c16),
        "c32²": c32 ** 2,
        "dec32²": d32 ** 2,
    })
    d16p = decomposition(f["q"]["s16p"], f["r"]["s16p"], mu["s16p"])
    out.update({
        "dec16p": d16p,
        "dec32·dec16p": prod(d32, d16p),
        "c32·dec16": prod(c32, d16),
        "dec32·dec16 × g16max": prod(d32, d16) * g16,
        "dec32·c16 × g16mnn": prod(d32, c16) * g16m,
        "dec32·c16 × g16max": prod(d32, c16) * g16,
        "dec32·dec16·c32·c16 ^½": (prod(d32, d16) * prod(c32, c16)).sqrt(),
    })
    q16p, r16p, m16p = f["q"]["s16p"], f["r"]["s16p"], mu["s16p"]
    g16pm = gate(q16p, r16p, m16p, "mnn")
    z32, z16, z16p = (torch.zeros_like(m) for m in (m32, m16, m16p))
    out.update({
        "dec32·dec16p × g16mnn": prod(d32, d16p) * g16m,
        "dec32·dec16p × g16pmnn": prod(d32, d16p) * g16pm,
        "dec32 × g16pmnn": prod(d32, g16pm),
        "dec32·dec16 × g16pmnn": prod(d32, d16) * g16pm,
        "dec32³": d32 ** 3,
        "μ=0: dec32": decomposition(q32, r32, z32),
        "μ=0: dec32·dec16": prod(decomposition(q32, r32, z32), decomposition(q16, r16, z16)),
        "μ=0: dec32·dec16p": prod(decomposition(q32, r32, z32), decomposition(q16p, r16p, z16p)),
        "μ=0: dec32·dec16 × g16mnn": prod(decomposition(q32, r32, z32), decomposition(q16, r16, z16)) * gate(q16, r16, z16, "mnn"),
        "μ=0: dec32 × g16mnn": prod(decomposition(q32, r32, z32), gate(q16, r16, z16, "mnn")),
        "dec32·dec16p × g16pmnn^½": prod(d32, d16p) * g16pm.sqrt(),
        "dec32·dec16p × g16pmax": prod(d32, d16p) * gate(q16p, r16p, m16p),
        "dec32·dec16p × (g16pmnn+g16pmax)/2": prod(d32, d16p) * (g16pm + gate(q16p, r16p, m16p)) / 2,
        "μ224: dec32·dec16 × g16mnn": prod(decomposition(q32, r32, mu224["s32"]), decomposition(q16, r16, mu224["s16"])) * gate(q16, r16, mu224["s16"], "mnn"),
    })
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=448)
    ap.add_argument("--sets", nargs="+", default=["C"])
    ap.add_argument("--subset", type=int, default=0, help="every N-th pair only (0: all)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--only", nargs="*", default=None, help="labels to print (all by default)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    sets = localisation_sets(np.random.default_rng(0))
    rows = []
    for name, (pairs, sources) in sets.items():
        if name.split(":")[0] not in args.sets:
            continue
        doc = extract(name, pairs, sources, args.size)
        idx = range(0, len(pairs), args.subset or 1)
        mu = {k: v.float() for k, v in doc["mu"].items()}
        mu224 = {k: v.float() for k, v in doc["mu224"].items()}
        scores: dict[str, list] = {}
        for i in idx:
            f = {s: {k: v.float() for k, v in doc["feats"][s][i].items()} for s in ("q", "r")}
            for label, raw in variants(f, mu, mu224).items():
                scores.setdefault(label, []).append(energy_pointing(upsample(raw, doc["sizes"][i]), doc["boxes"][i]))
        for label, v in scores.items():
            if args.only and label not in args.only:
                continue
            e, p = np.mean(v, 0)
            rows.append([name.split(":")[0], len(v), args.size, label, round(float(p), 3), round(float(e), 3)])
    print(_common.table(["set", "pairs", "px", "map", "pointing", "energy"], rows))


if __name__ == "__main__":
    main()
