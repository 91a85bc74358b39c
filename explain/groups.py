"""``retrieve duplicates --explain``: one report in which each group reads as a search, its keeper the query and its
other members the results, each member's maps drawn against the keeper.

The score each pair leads with is the index's, from the two stored embeddings (the keeper's stored vector as the
query, as :func:`explain.run.ranking_pairs` decomposes a search's hits), so the report's numbers are the ones the
groups were built on; the maps, region pairs and verdicts are made exactly as ``retrieve search --explain`` makes
them (explain/run.py, explain/render.py).
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from retrieval.errors import ImageError
from retrieval.images import load_image, own_size
from retrieval.verdict import collection_note

from .methods import MAP_MAX_SIDE
from .render import ReportItem, pair_figure, save_maps, saved_side, write_report
from .run import _display, _explain_all, _prepare_out, load_readable, pair_record, ranking_pairs

MAX_PAIRS = 200  # member-against-keeper pairs drawn in one report (each holds two photos in memory until written)


def explain_groups(collection, groups: Sequence, out: Path, method: str | None = None, full_maps: bool = False,
                   on_error=None) -> dict:
    """Write ``out/report.html`` (and per pair ``gNNN_MM.png`` and its .npy maps) for ``groups``
    (retrieval/curate/duplicates.py Group, keeper first). Returns {"report", "pairs": [{group, keeper, path, png,
    score, verdict}], "left_out": pairs beyond :data:`MAX_PAIRS`}. An unreadable photo goes to ``on_error(path,
    reason)`` and is left out."""
    store = collection.store
    explainer = collection.explainer(method)
    meta = collection.meta(explainer)
    side = explainer.backbone.preprocess.size
    max_side = None if full_maps else MAP_MAX_SIDE
    out = _prepare_out(out)
    items, pairs, budget, left_out = [], [], MAX_PAIRS, 0
    for g in groups:
        members = [m for m in g.members if not m.keeper]
        if budget <= 0:
            left_out += len(members)
            continue
        left_out += max(0, len(members) - budget)
        members = members[:budget]
        try:
            q = load_image(g.keeper.path, min_side=side)
        except ImageError as e:
            if on_error:
                on_error(e.path, e.reason)
            continue
        images, kept = load_readable(members, side, on_error)
        if not kept:
            continue
        budget -= len(kept)
        keeper_row = store.rows_by_ids([g.keeper.row_id]).get(g.keeper.row_id)
        decomposed = None
        if keeper_row is not None:
            found = ranking_pairs(store, np.frombuffer(keeper_row.vector, np.float32), [m.row_id for m in kept])
            if len(found) == len(kept):
                decomposed = [found[m.row_id] for m in kept]
        exps, corrs = _explain_all(explainer, q, images, decomposed, max_side)
        q, images = _display(q), [_display(im) for im in images]
        keeper_name = Path(g.keeper.path).name
        for j, (m, img, e, corr) in enumerate(zip(kept, images, exps, corrs), 1):
            nn = f"g{g.id:03d}_{j:02d}"
            files = save_maps(out, f"{nn}_", e, (own_size(q), own_size(img)), max_side=saved_side(max_side))
            verdict = collection.verdict(e.score)
            rec = pair_record(e, collection.score_is, verdict, corr, files)
            name = Path(m.path).name
            png = out / f"{nn}.png"
            pair_figure(q, img, e, f"group {g.id} · {rec['score_short']} · {name} against its keeper {keeper_name}",
                        png, verdict.text)
            items.append(ReportItem(f"group {g.id} ({g.tier}): {name} against its keeper {keeper_name} — "
                                    f"{verdict.headline}", g.keeper.path, m.path, q, img, e, rec))
            pairs.append({"group": g.id, "tier": g.tier, "keeper": g.keeper.path, "path": m.path, "png": str(png),
                          "score": rec["score"], "verdict": rec["verdict"]})
    report = out / "report.html"
    note = "in each pair below, the query is the group's keeper and the result is the other photo"
    small = collection_note(collection.calibration)  # a collection too small to place scores in, said once
    if small:
        note += f"; {small}"
    if left_out:
        note += (f"; {left_out} more member{'s' if left_out != 1 else ''} of these groups are not drawn here (at most "
                 f"{MAX_PAIRS} pairs in one report)")
    write_report(report, f"Duplicate groups: each photo against its keeper ({len(pairs)} pairs)", items, meta, note)
    return {"report": str(report), "out": str(out), "pairs": pairs, "left_out": left_out}
