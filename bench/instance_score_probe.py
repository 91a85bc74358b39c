"""Issue 27, instance preset: how far today's Σ CIS (and `retrieve explain --index`'s score) is from the score
`retrieve search` prints for the same pair, and which step makes the difference.

    retrieve index PHOTOS --preset instance --index IDX
    retrieve search PHOTOS --index IDX -k 5 --include-self --json > search.json
    python bench/instance_score_probe.py IDX search.json

For every (query, result) of search.json: the search score; explain --index's score (explain.run.index_pair_score);
Σ CIS of the index's explainer on the photos decoded as `retrieve explain` decodes them (min_side = 448); the same
on the photos decoded as the indexer decodes them (min_side = max(448, the verifier's 640)); and the head cosine of
eager PyTorch float64 embeddings (no ONNX Runtime) of the latter. Prints the differences to the search score.
"""
from __future__ import annotations

import json
import sys

import _common  # noqa: F401  (puts the repository on sys.path)
import numpy as np
import torch

from explain.run import index_explainer, index_pair_score
from retrieval.images import load_image
from retrieval.service import backbone_for_settings
from retrieval.store import IndexStore


def main() -> None:
    torch.set_num_threads(1)
    idx, sj = sys.argv[1], sys.argv[2]
    pairs = []
    for line in open(sj):
        d = json.loads(line)
        pairs += [(d["query"], h["path"], h["score"]) for h in d["results"]]
    with IndexStore.open(idx) as store:
        bb = backbone_for_settings(store.settings)
        ex = index_explainer(store, bb)
        head = store.head
        side = max(bb.preprocess.size, 640)  # the indexer's decode (retrieval/search.py: decoded once for both)

        def headcos(a, b):
            ea, eb = head.proj @ (a - head.mean), head.proj @ (b - head.mean)
            return float(ea @ eb / np.linalg.norm(ea) / np.linalg.norm(eb))

        def eager(img):
            with torch.no_grad():
                return bb.pooling.pool(bb.eager_features(bb.preprocess.batch([img])).double())[0].numpy()

        rows = []
        for q, r, s in pairs:
            s_pair = index_pair_score(store, bb, q, r)["score"]
            e448 = ex.explain(load_image(q, min_side=bb.preprocess.size), load_image(r, min_side=bb.preprocess.size))
            qi, ri = load_image(q, min_side=side), load_image(r, min_side=side)
            e_idx = ex.explain(qi, ri)
            rows.append([s, s_pair, float(e448.cis.sum()), float(e_idx.cis.sum()), headcos(eager(qi), eager(ri)), q == r])
    a = np.array([r[:5] for r in rows])
    self_ = np.array([r[5] for r in rows])
    names = ["explain --index score", f"Σ CIS (decoded at min_side {bb.preprocess.size}, as explain does)",
             f"Σ CIS (decoded at min_side {side}, as indexed)", f"eager float64 head cosine (min_side {side})"]
    print(f"{idx}: {len(rows)} pairs ({int(self_.sum())} self-pairs); search scores of the others "
          f"{a[~self_, 0].min():.4f} … {a[~self_, 0].max():.4f}")
    for j, name in enumerate(names, 1):
        d = np.abs(a[:, j] - a[:, 0])
        print(f"  |{name} − search|: mean {d.mean():.2e}, max {d.max():.2e}; sign differs in "
              f"{int(((a[:, j] * a[:, 0]) < 0).sum())} pairs")


if __name__ == "__main__":
    main()
