"""Explaining matches end to end: load the images, run an explainer, write maps, figures and reports."""
from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence


from retrieval.errors import ImageError, RetrieveError
from retrieval.images import load_image

from .methods import Explainer, make_explainer
from .render import ReportItem, pair_figure, save_maps, score_text, write_report


@dataclass
class ExplainSettings:
    """How explanations are made; recorded with the index (``IndexSettings.explain``)."""

    method: str = "sfam"
    centre: bool = True  # cosine: CIS on μ-centred embeddings (see bench/results/explain.md)
    input_size: int | None = None  # None: the index's own input size


def index_explain_settings(store) -> ExplainSettings:
    """The explain settings recorded in an index (the index's own input size, uncentred, if it has none)."""
    d = store.settings.explain or {"centre": False}
    return ExplainSettings(**{k: v for k, v in d.items() if k in ExplainSettings.__dataclass_fields__})


def index_explainer(store, backbone=None, method: str | None = None, input_size: int | None = None) -> Explainer:
    """The explainer an index prescribes (its recorded explain settings), on ``backbone``'s weights if given."""
    from retrieval.service import backbone_for_settings

    ex = index_explain_settings(store)
    size = input_size or ex.input_size or store.settings.preprocess.get("size")
    bb = backbone.at_size(size) if backbone is not None else backbone_for_settings(store.settings, input_size=size)
    return make_explainer(method or ex.method, bb, metric=store.settings.metric, mu=store.mean, centre=ex.centre,
                          head=store.head)


def default_out_dir(query: str | Path, base: Path | None = None) -> Path:
    """``retrieve-explain-<query stem>-<YYYYmmdd-HHMMSS>`` in the current directory (made unique)."""
    stem = re.sub(r"[^\w.-]+", "_", Path(query).stem)[:40] or "query"
    base = base or Path.cwd()
    d = base / f"retrieve-explain-{stem}-{time.strftime('%Y%m%d-%H%M%S')}"
    n = 1
    while d.exists():
        n += 1
        d = base / f"retrieve-explain-{stem}-{time.strftime('%Y%m%d-%H%M%S')}-{n}"
    return d


def _prepare_out(out: Path) -> Path:
    out = Path(out).expanduser()
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise RetrieveError(f"{out}: cannot create the output directory ({e.strerror})") from None
    return out


def explain_pair(a: str | Path, b: str | Path, out: Path, explainer: Explainer, meta: dict,
                 verification=None) -> dict:
    """``retrieve explain A B``: query_map.npy, result_map.npy, pair.png, report.html, explain.json in ``out``.

    ``verification`` (retrieval.verify.Verification): inlier lines in the figure and the report."""
    side = explainer.backbone.preprocess.size
    qa, rb = load_image(a, min_side=side), load_image(b, min_side=side)
    e = explainer.explain(qa, rb)
    out = _prepare_out(out)
    files = save_maps(out, "", e)
    pair_figure(qa, rb, e, f"{Path(a).name} ↔ {Path(b).name}: {score_text(e)} ({e.method})", out / "pair.png",
                verification)
    write_report(out / "report.html", f"Why {Path(b).name} matches {Path(a).name}",
                 [ReportItem("pair", str(a), str(b), qa, rb, e, verification)], meta)
    doc = {"query": str(Path(a).resolve()), "result": str(Path(b).resolve()), **meta, **e.summary(),
           "files": {**files, "pair": str(out / "pair.png"), "report": str(out / "report.html")}}
    if verification is not None:
        doc["inliers"] = verification.inliers
        doc["confirmed"] = verification.confirmed
    if e.metric == "cosine" and e.cis is not None:
        doc["cis_sums_to_score"] = bool(abs(doc["cis_sum"] - e.score) < 1e-5)
    (out / "explain.json").write_text(json.dumps(doc, indent=2))
    doc["files"]["json"] = str(out / "explain.json")
    return doc


def explain_hits(query_path: str, hits: Sequence, out: Path, explainer: Explainer, meta: dict,
                 on_error=None) -> dict[int, dict]:
    """Explain a query's search results: NN_query_map.npy, NN_result_map.npy, NN.png, report.html.

    Returns rank → the ``explanation`` object for the JSON output. A result whose file can no longer be
    read is reported through ``on_error(path, reason)`` and left out of the report.
    """
    side = explainer.backbone.preprocess.size  # decoded as for indexing, so the explained score is the same
    q = load_image(query_path, min_side=side)
    images, kept = [], []
    for h in hits:
        try:
            images.append(load_image(h.path, min_side=side))
            kept.append(h)
        except ImageError as e:
            if on_error:
                on_error(e.path, e.reason)
    out = _prepare_out(out)
    exps = explainer.explain_many(q, images) if images else []
    items, objs = [], {}
    for h, img, e in zip(kept, images, exps):
        nn = f"{h.rank:02d}"
        files = save_maps(out, f"{nn}_", e)
        png = out / f"{nn}.png"
        v = getattr(h, "verification", None)
        pair_figure(q, img, e, f"#{h.rank} {Path(h.path).name}: {score_text(e)} ({e.method})", png, v)
        items.append(ReportItem(f"#{h.rank} {Path(h.path).name}", query_path, h.path, q, img, e, v))
        objs[h.rank] = {**files, "png": str(png), "report": str(out / "report.html"), "method": e.method,
                        "similarity": explainer.describe(), "explained_score": e.score,
                        "cis_sum": float(e.cis.sum()) if e.cis is not None else None, "top_channels": e.channels(5)}
        if v is not None:
            objs[h.rank]["inliers"] = v.inliers
    write_report(out / "report.html", f"Results for {Path(query_path).name}", items, meta)
    return objs
