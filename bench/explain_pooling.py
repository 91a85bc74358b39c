"""Does SFAM still localise with GeM / R-MAC pooling? The localisation check of explain_eval.py, per pooling.

    python bench/explain_pooling.py [--sizes 448] [--threads 2]

Composites of real photos (an object photo pasted off-centre into another photo; query = the object,
result = the composite): energy-in-box and pointing of SFAM's result map (cosine, μ-centred, the index
default), with the embedding pooled by gap, gem (p = 3) and rmac. (That Σ CIS equals the independently
computed cosine for every pooling is tested in tests/test_instance.py.) Saves bench/results/explain-pooling.md.
"""
from __future__ import annotations

import argparse
import dataclasses

import _common
import numpy as np
import torch
from explain_eval import energy_pointing, localisation_sets

from explain.methods import make_explainer
from retrieval.models.loading import load_backbone
from retrieval.models.pooling import parse_pooling


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[224, 448])
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    sets = localisation_sets(np.random.default_rng(0))
    for set_name, (pairs, sources) in sets.items():
        for size in args.sizes:
            base = load_backbone(input_size=size)
            for pooling in ("gap", "gem", "rmac"):
                bb = dataclasses.replace(base, pooling=parse_pooling(pooling))
                feats = [bb.pooling.pool(bb.features(bb.preprocess.batch([im]))).double()[0] for im in sources]
                mu = torch.stack(feats).mean(0).numpy()
                ex = make_explainer("sfam", bb, metric="cosine", mu=mu, centre=True)
                es, ps = [], []
                for q, comp, box in pairs:
                    e = ex.explain(q, comp)
                    a, b = energy_pointing(e.result_map, box)
                    es.append(a)
                    ps.append(b)
                rows.append([set_name, len(pairs), size, pooling, round(float(np.mean(es)), 3),
                             round(float(np.mean(ps)), 3)])
                print(rows[-1], flush=True)
    text = ("SFAM localisation per pooling (cosine, μ-centred CIS, the index default); composites as in "
            "bench/explain_eval.py.\n\n")
    text += _common.table(["set", "pairs", "input px", "pooling", "energy-in-box", "pointing"], rows)
    _common.save("explain-pooling", text)


if __name__ == "__main__":
    main()
