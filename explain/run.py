"""Explaining matches end to end: load the images, run an explainer, write maps, figures and reports."""
from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence


from PIL import Image

from retrieval.errors import ImageError, RetrieveError
from retrieval.images import load_image

from .methods import Explainer, Explanation, make_explainer, own_size
from .render import MAP_MAX_SIDE, ReportItem, pair_figure, save_maps, write_report


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
    from retrieval.models.loader import backbone_for_settings

    from retrieval.index.reference import for_explain, tap_layer

    ex = index_explain_settings(store)
    size = int(input_size or ex.input_size or store.settings.preprocess.get("size"))
    bb = backbone.at_size(size) if backbone is not None else backbone_for_settings(store.settings, input_size=size)
    # μ (and the stride-16 layer's μ) at the explain resolution, sampled by the indexer (retrieval/index/reference.py)
    mu, mu_tap = for_explain(store, bb, size, tap_layer(store.settings.model))
    return make_explainer(method or ex.method, bb, metric=store.settings.metric,
                          mu=store.mean if mu is None else mu, centre=ex.centre, head=store.head, mu_tap=mu_tap)


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


# -- what is compared, in words ----------------------------------------------------------------------
def search_score_words(metric: str) -> str:
    return "cosine similarity" if metric == "cosine" else "minus the squared distance"


def explained_words(explainer: Explainer) -> str:
    """The similarity the maps explain, in plain words (no notation)."""
    size = explainer.backbone.preprocess.size
    if explainer.head is not None:
        what = "cosine similarity" if explainer.metric == "cosine" else "closeness (dot product)"
        return (f"{what} of the two photos' embeddings after this index's whitening ({explainer.head.dim} "
                f"dimensions), computed at {size} px")
    if explainer.metric == "cosine":
        if explainer.centre:
            return (f"cosine similarity of the two photos' embeddings measured from this collection's average "
                    f"photo, computed at {size} px")
        return f"cosine similarity of the two photos' embeddings, computed at {size} px"
    return (f"how much closer the two photos are to each other than to "
            f"{'this collection' + chr(39) + 's average photo' if explainer.mu is not None else 'the origin'} "
            f"(from squared distances, computed at {size} px)")


def explained_value(e) -> float:
    """The number the maps explain: what Σ CIS adds up to (the similarity itself for cosine)."""
    return float(e.cis_target) if e.cis_target is not None else float(e.score)


def channel_rows(cis, n: int = 10) -> tuple[list[dict], str]:
    """The top ``n`` channels for the match, each with its share of the evidence *for* it (the sum of the
    positive terms), so shares lie in [0, 1]; and a sentence on what the sum of all terms is."""
    import numpy as np

    if cis is None:
        return [], ""
    cis = np.asarray(cis, np.float64)
    pos = float(cis[cis > 0].sum())
    neg = float(-cis[cis < 0].sum())
    order = [int(k) for k in np.argsort(-cis)[:n] if cis[k] > 0]
    rows = [{"channel": k, "cis": float(cis[k]), "share": float(cis[k] / pos)} for k in order]
    if pos <= neg:
        note = (f"the channels against the match outweigh those for it ({pos:.4f} for, {neg:.4f} against): the "
                "maps show the little the two photos have in common")
    else:
        top = sum(r["share"] for r in rows)
        note = (f"{len(rows)} channels carry {top:.0%} of the evidence for the match; {pos:.4f} for, {neg:.4f} "
                "against")
    return rows, note


def pair_record(explainer: Explainer, e, score: float | None, score_what: str, verdict, corr, map_files: dict,
                distance: float | None = None) -> dict:
    """What every output says about one pair, leading with the score that ranked it (``score``; None: the
    explained similarity is the only score there is)."""
    value = explained_value(e)
    expl = {"similarity": explained_words(explainer), "value": value, "method": e.method}
    lead = value if score is None else float(score)
    same = score is None or abs(value - lead) < 1e-4
    if e.metric == "l2" and score is None:
        lead = float(e.score)
        same = False
    expl["same_as_score"] = bool(same)
    lead_text = f"score {lead:.4f} ({score_what})"
    short = f"score {lead:.4f} ({score_what.split(',')[0].split(';')[0]})"
    if same:
        expl["text"] = f"The heat maps explain this score exactly ({expl['similarity']})."
    else:
        expl["text"] = (f"The heat maps explain a closely related number: {expl['similarity']} = {value:.4f} "
                        f"({e.method.upper() if e.method == 'sfam' else e.method}).")
    rows, note = channel_rows(e.cis)
    rec = {"score": lead, "score_is": score_what, "score_text": lead_text, "score_short": short, "explained": expl,
           "verdict": verdict.to_dict(), "correspondences": [c.to_dict() for c in corr],
           "top_channels": rows, "channels_note": note, **map_files}
    if distance is None and score is None:
        distance = e.distance
    if distance is not None:
        rec["distance"] = distance
    # kept from the first JSON layout, so scripts reading it go on working
    rec.update({"method": e.method, "similarity": expl["similarity"], "explained_score": float(e.score),
                "cis_target": e.cis_target})
    if e.cis is not None:
        rec["cis_sum"] = float(e.cis.sum())
        rec["cis_sum_error"] = abs(float(e.cis.sum()) - value)
    if not corr:
        rec["correspondences_note"] = "No region pair carries a positive part of the explained similarity."
    return rec


def _features(explainer: Explainer, images: Sequence):
    """Feature maps (1×C×h×w each) of images at the explainer's input size, batched by input shape."""
    import torch

    from retrieval.models.preprocess import group_by_shape

    pre = explainer.backbone.preprocess
    xs = [pre.batch([im]) for im in images]
    out = [None] * len(xs)
    for idx in group_by_shape([x[0] for x in xs]):
        feats = explainer.backbone.features(torch.cat([xs[i] for i in idx]))
        for j, i in enumerate(idx):
            out[i] = feats[j:j + 1]
    return out


def _correspondences(explainer: Explainer, aq, ar, query, result, top: int = 5):
    from .correspond import correspondences, pair_terms

    if aq is None or ar is None or explainer.name == "occlusion":
        return []
    s = pair_terms(explainer, aq, ar)
    return correspondences(s, tuple(aq.shape[-2:]), tuple(ar.shape[-2:]), own_size(query), own_size(result), top)


def _explain_all(explainer: Explainer, query, images: Sequence, map_max_side: int | None = MAP_MAX_SIDE):
    """Explanations and region pairs for (query, each image): one forward pass per image (the region pairs
    use the feature maps the explainer kept; gradient and occlusion baselines need their own passes)."""
    explainer.map_max_side = map_max_side
    exps = explainer.explain_many(query, images) if images else []
    corrs = []
    for e, img in zip(exps, images):
        if e.features is None and explainer.name != "occlusion":
            e.features = tuple(_features(explainer, [query, img]))
        corrs.append(_correspondences(explainer, *(e.features or (None, None)), query, img))
    return exps, corrs


def _display(img, max_side: int = 1024):
    """A copy of a photo for figures and reports, at most ``max_side`` px, remembering the photo's own size
    (so boxes and captions stay in its own pixels); the full decode can then be freed."""
    from PIL import Image

    if max(img.size) <= max_side:
        return img
    f = max_side / max(img.size)
    small = img.resize((max(1, round(img.width * f)), max(1, round(img.height * f))), Image.BILINEAR,
                       reducing_gap=2.0)
    small.info["original_size"] = img.info.get("original_size", img.size)
    return small


def index_pair_score(store, backbone, a: str | Path, b: str | Path) -> dict:
    """The score ``retrieve search A`` gives B in this index: A embedded as a query, B's stored embedding when B
    is indexed (else B embedded the same way), in the index's vector space."""
    import os

    import numpy as np

    pre = backbone.preprocess
    vec = []
    for i, p in enumerate((a, b)):
        row = None
        if i == 1:
            for cand in (os.path.realpath(p), os.path.abspath(p)):
                row = store.row_by_path(cand)
                if row is not None:
                    break
        if row is not None:
            vec.append(np.frombuffer(row.vector, np.float32)[None])
        else:
            vec.append(backbone.embed_arrays([pre.array(load_image(p, min_side=pre.size))]))
    x = store.transform(np.concatenate(vec)).astype(np.float64)
    score, distance = store.metric.score(store.metric.raw(x[1:], x[0])[0])
    return {"score": score} if distance is None else {"score": score, "distance": distance}


def explain_pair(a: str | Path, b: str | Path, out: Path, explainer: Explainer, meta: dict,
                 verification=None, search: dict | None = None, calibration=None,
                 map_max_side: int | None = MAP_MAX_SIDE) -> dict:
    """``retrieve explain A B``: query_map.npy, result_map.npy, pair.png, report.html, explain.json in ``out``.

    ``search``: the index's score for the pair (:func:`index_pair_score`), which every output leads with; None
    without an index (the explained similarity is then the score). ``calibration``: the index's score
    distributions for the verdict. ``verification``: SIFT inliers, in the report beside the maps."""
    pair = prepare_pair(a, b, out, explainer, meta, verification, search, calibration, map_max_side)
    pair.draw()
    return pair.doc


@dataclass
class PreparedPair:
    """One pair explained, its maps and explain.json written; ``draw()`` writes pair.png and report.html (the
    costly image encoding, which the web app runs after answering)."""

    doc: dict
    out: Path  # the folder it was written to
    explanation: Explanation
    query_image: Image.Image  # as displayed (at most DISPLAY px)
    result_image: Image.Image
    draw: Callable[[], None]


def prepare_pair(a: str | Path, b: str | Path, out: Path, explainer: Explainer, meta: dict, verification=None,
                 search: dict | None = None, calibration=None, map_max_side: int | None = MAP_MAX_SIDE,
                 names: tuple[str, str] | None = None) -> PreparedPair:
    """:func:`explain_pair` up to its figure and report (see there); ``names``: the photos' names in the titles
    (their file names by default)."""
    from .verdict import make_verdict

    side = explainer.backbone.preprocess.size
    qa, rb = load_image(a, min_side=side), load_image(b, min_side=side)
    (e,), (corr,) = _explain_all(explainer, qa, [rb], map_max_side)
    qa, rb = _display(qa), _display(rb)
    out = _prepare_out(out)
    files = save_maps(out, "", e, (own_size(qa), own_size(rb)), max_side=map_max_side)
    score = search["score"] if search else None
    what = (f"{search_score_words(explainer.metric)}, the score `retrieve search` ranks by in this index" if search
            else f"{explained_words(explainer)}; no index, so nothing to compare it with")
    verdict = make_verdict(score if score is not None else explained_value(e), calibration if search else None,
                           verification)
    rec = pair_record(explainer, e, score, what, verdict, corr, files, (search or {}).get("distance"))
    na, nb = names or (Path(a).name, Path(b).name)
    title = verdict.title(na, nb)

    def draw() -> None:
        pair_figure(qa, rb, e, f"{rec['score_short']} · {title}", out / "pair.png", verdict.text)
        write_report(out / "report.html", title,
                     [ReportItem(f"{na} and {nb}", str(a), str(b), qa, rb, e, rec, verification)], meta)

    return PreparedPair(pair_document(a, b, meta, rec, files, out, e, verification), out, e, qa, rb, draw)


def pair_document(a, b, meta: dict, rec: dict, files: dict, out: Path, e, verification) -> dict:
    """``explain.json`` of one pair (written to ``out``, its path added under ``files``), as returned."""
    doc = {"query": str(Path(a).resolve()), "result": str(Path(b).resolve()), **meta, **rec,
           "files": {**files, "pair": str(out / "pair.png"), "report": str(out / "report.html")}}
    doc["metric"] = e.metric
    if e.metric == "cosine" and e.cis is not None:
        doc["cis_sums_to_score"] = bool(abs(doc["cis_sum"] - e.score) < 1e-5)
    if verification is not None:
        doc["inliers"] = verification.inliers
        doc["confirmed"] = verification.confirmed
    (out / "explain.json").write_text(json.dumps(doc, indent=2))
    doc["files"]["json"] = str(out / "explain.json")
    return doc


def explain_hits(query_path: str, hits: Sequence, out: Path, explainer: Explainer, meta: dict,
                 on_error=None, calibration=None, map_max_side: int | None = MAP_MAX_SIDE) -> dict[int, dict]:
    """Explain a query's search results: NN_query_map.npy, NN_result_map.npy, NN.png, report.html.

    Returns rank → the ``explanation`` object for the JSON output (it leads with the hit's own score). A
    result whose file can no longer be read is reported through ``on_error(path, reason)`` and left out."""
    from .verdict import make_verdict

    side = explainer.backbone.preprocess.size  # decoded as for indexing, so the explained score is the same
    q = load_image(query_path, min_side=side)
    images, kept = [], []
    for h in sorted(hits, key=lambda h: h.rank):
        try:
            images.append(load_image(h.path, min_side=side))
            kept.append(h)
        except ImageError as e:
            if on_error:
                on_error(e.path, e.reason)
    out = _prepare_out(out)
    exps, corrs = _explain_all(explainer, q, images, map_max_side)
    q, images = _display(q), [_display(im) for im in images]
    what = f"{search_score_words(explainer.metric)}, the score that ranked this result"
    items, objs = [], {}
    for h, img, e, corr in zip(kept, images, exps, corrs):
        nn = f"{h.rank:02d}"
        files = save_maps(out, f"{nn}_", e, (own_size(q), own_size(img)), max_side=map_max_side)
        png = out / f"{nn}.png"
        v = getattr(h, "verification", None)
        verdict = make_verdict(h.score, calibration, v)
        rec = pair_record(explainer, e, h.score, what, verdict, corr, files, h.distance)
        name = Path(h.path).name
        pair_figure(q, img, e, f"#{h.rank} · {rec['score_short']} · {name}: {verdict.headline}", png, verdict.text)
        items.append(ReportItem(f"#{h.rank} · {name} — {verdict.headline}", query_path, h.path, q, img, e, rec, v))
        objs[h.rank] = {**rec, "png": str(png), "report": str(out / "report.html")}
        if v is not None:
            objs[h.rank]["inliers"] = v.inliers
    write_report(out / "report.html", f"Results for {Path(query_path).name}", items, meta)
    return objs


def explain_meta(store, explainer) -> dict:
    """What every explanation's JSON says about how it was made (``store``: the index, or None)."""
    return {"model": store.settings.model if store else explainer.backbone.name, "metric": explainer.metric,
            "method": explainer.name, "input_size": explainer.backbone.preprocess.size,
            "centred": explainer.centre, "similarity": explained_words(explainer),
            "precision": getattr(explainer.backbone, "precision", "fp32"),
            "index": str(store.directory) if store else None}
