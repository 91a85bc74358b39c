"""Explaining matches end to end: the pair's score as the index ranks it, its verdict, the heat maps, files and reports.

One number: every output leads with the score that ranks the pair (the score of ``retrieve search --json``), and with
SFAM the channel terms the maps draw are that score's (explain/cis.py): they add up to it (checked, and only then does
any output say "exactly"), and the channel table's shares are shares of the evidence for the match. Every output also
says what its maps are (explain/methods.py describe_map): the paper's parts, what the default adds, or a baseline's
saliency. With an index the score comes from the index's own vectors -- a photo decoded and embedded as
the indexer embeds it (retrieval/match/verify.py decode_side), the stored vector of an indexed photo -- and the maps from a
finer forward pass of the same network at the explain resolution (448 px): the ranking vectors' CIS weight that pass's
channels (bench/results/explain-ranking-cis.md, row C). Without an index the score is the explainer's own, at the
explain resolution.
"""
from __future__ import annotations

import json
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from PIL import Image

from retrieval.errors import ImageError, RetrieveError
from retrieval.images import load_image, own_size
from retrieval.names import json_name
from retrieval.verdict import collection_note, verdict as make_verdict

from .cis import SHARE_OF, Decomposition, channel_rows, decompose_in
from .methods import MAP_LABELS, MAP_MAX_SIDE, Explainer, Explanation, describe_map, make_explainer
from .render import ReportItem, pair_figure, save_maps, saved_side, write_report


@dataclass
class ExplainSettings:
    """How explanations are made; recorded with the index (``IndexSettings.explain``)."""

    method: str = "sfam"
    centre: bool = True  # the explainer's own similarity centred on the collection mean at the explain resolution
    input_size: int | None = None  # None: the index's own input size


def index_explain_settings(store) -> ExplainSettings:
    """The explain settings recorded in an index (the index's own input size, uncentred, if it has none)."""
    d = store.settings.explain or {"centre": False}
    return ExplainSettings(**{k: v for k, v in d.items() if k in ExplainSettings.__dataclass_fields__})


def index_explainer(store, backbone=None, method: str | None = None, input_size: int | None = None) -> Explainer:
    """The explainer an index prescribes (its recorded explain settings), on ``backbone``'s weights if given.

    Its maps are centred on the collection's mean at the explain resolution (μ, sampled by the indexer:
    retrieval/index/reference.py); its own similarity (the gradient and occlusion baselines' target) is the index's
    when it explains at the index's own resolution, else the μ-centred cosine at the explain resolution."""
    from retrieval.index.reference import for_explain
    from retrieval.presets import preset_of

    ex = index_explain_settings(store)
    size = int(input_size or ex.input_size or store.settings.preprocess.get("size"))
    bb = backbone.at_size(size) if backbone is not None else preset_of(store.settings).backbone(store.settings, size)
    mu, mu_tap = for_explain(store, bb, size, bb.tap)
    same = size == int(store.settings.preprocess.get("size"))
    return make_explainer(method or ex.method, bb, metric=store.metric, mu=store.mean if mu is None else mu,
                          centre=ex.centre, head=store.head if same else None, mu_tap=mu_tap)


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


# -- the score, as the index ranks it --------------------------------------------------------------------------------
def embed_queries(store, backbone, paths: Sequence[str | Path]) -> np.ndarray:
    """Photos' raw embeddings as a search of ``store`` embeds a query: decoded as the indexer decodes."""
    from retrieval.match.verify import decode_side

    side = decode_side(store.settings)
    return backbone.embed_images([load_image(p, min_side=side) for p in paths])


def ranking_pairs(store, query_raw: np.ndarray, ids: Sequence[int]) -> dict[int, Decomposition]:
    """{id: the decomposition of the score ``retrieve search`` gives row ``id`` against a query with raw embedding
    ``query_raw``} (explain/cis.py, in the index's vector space)."""
    rows = store.rows_by_ids(ids)
    keep = [i for i in ids if i in rows]
    if not keep:
        return {}
    vecs = np.stack([np.frombuffer(rows[i].vector, np.float32) for i in keep])
    return dict(zip(keep, decompose_in(store, query_raw, vecs)))


def index_pair(store, backbone, a: str | Path, b: str | Path) -> Decomposition:
    """The score ``retrieve search A`` gives B in this index, decomposed: A embedded as a query, B's stored embedding
    when B is indexed (else B embedded the same way)."""
    row = None
    for cand in (os.path.realpath(b), os.path.abspath(b)):
        row = store.row_by_path(cand)
        if row is not None:
            break
    if row is not None:
        qa, rb = embed_queries(store, backbone, [a])[0], np.frombuffer(row.vector, np.float32)
    else:
        qa, rb = embed_queries(store, backbone, [a, b])
    return decompose_in(store, qa, rb[None])[0]


# -- what every output says about one pair -------------------------------------------------------------------------
def score_words(store) -> str:
    """What an index's score is, in plain words (its fitted head decides: a head configured but not fitted yet, on a
    collection too small for it, leaves the plain cosine)."""
    if store is None:
        return "cosine similarity of the two photos' embeddings (no index: nothing to compare it with)"
    head = store.head
    if not store.metric.normalised:
        return "minus the squared distance between the two photos' embeddings"
    if head is None:
        return "cosine similarity of the two photos' embeddings"
    if (store.settings.head or {}).get("fixed"):
        return "cosine similarity of the two faces' descriptors, measured from the average face"
    if head.proj is None:
        return "cosine similarity of the two photos' embeddings, measured from this collection's average photo"
    return f"cosine similarity of the two photos' embeddings after this index's whitening ({head.dim} dims)"


def explained_text(e: Explanation) -> str:
    """What the heat maps show about the score, in words (no notation): "exactly" and "decomposes" only where the
    channel terms add up to the score shown (``e.exact``: checked against the score computed by its definition)."""
    if e.cis is None:
        return {"gradcam": "The heat maps are Grad-CAM's gradient saliency of this score (where it is sensitive), not "
                           "a decomposition of it.",
                "occlusion": "The heat maps are an occlusion saliency of this score (how much it drops where a grey "
                             "patch hides the photo), not a decomposition of it."
                }.get(e.method, f"The heat maps are {e.method}'s view of this score, not a decomposition of it.")
    if e.distance is not None:
        return (f"The heat maps show what the two photos share: how much closer they are to each other than to this "
                f"collection's average photo ({e.cis_target:.4f}, the part of the distance they have in common).")
    if not e.exact:
        return (f"The channel terms the heat maps are weighted by add up to {float(e.cis_target):.4f}, not to the "
                "score shown: the maps do not decompose this score.")
    split = f"The score decomposes exactly into {len(e.cis)} channel terms (SFAM's CIS), which add up to it"
    if e.score <= 0:
        return (f"{split}. It is not positive: the two photos have less in common than a typical pair here; the heat "
                "maps show the little they share.")
    if e.method == "sfam-plain":
        return f"{split}; the heat maps are the paper's map: each photo's feature maps weighted by those terms."
    return (f"{split}; the heat maps (the default map, built on SFAM) weight each photo's feature maps by those terms "
            "and add retrieve's refinements (the map's description lists them).")


def pair_record(e: Explanation, score_is: str, verdict, corr, map_files: dict) -> dict:
    """What every output says about one pair, leading with the score that ranked it."""
    rows, note = channel_rows(e.cis)
    rec = {"score": float(e.score), "score_is": score_is, "score_text": f"score {e.score:.4f} ({score_is})",
           "score_short": f"score {e.score:.4f}", "method": e.method,
           "explained": {"method": e.method, "label": MAP_LABELS.get(e.method, e.method), "exact": e.exact,
                         "text": explained_text(e), "map": describe_map(e)},
           "verdict": verdict.to_dict(), "correspondences": [c.to_dict() for c in corr],
           "top_channels": rows, "channels_note": note, **map_files}
    if e.distance is not None:
        rec["distance"] = float(e.distance)
        rec["cis_target"] = float(e.cis_target) if e.cis_target is not None else None
    if e.cis is not None:
        rec["cis_sum"] = float(e.cis.sum())
        rec["channels_share_of"] = SHARE_OF
    if not corr:
        rec["correspondences_note"] = ("No region pair: the score is not positive." if e.score <= 0 else
                                       "No region pair carries a positive part of the score.")
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


def _correspondences(explainer: Explainer, e: Explanation, pair, query, result, top: int = 5):
    from .correspond import correspondences, pair_terms

    aq, ar = e.features or (None, None)
    if aq is None or ar is None or explainer.name == "occlusion" or e.score <= 0:
        return []  # no region shares of a score that is not positive
    s = pair_terms(explainer, aq, ar, pair)
    return correspondences(s, tuple(aq.shape[-2:]), tuple(ar.shape[-2:]), own_size(query), own_size(result), top)


def _explain_all(explainer: Explainer, query, images: Sequence, pairs=None,
                 map_max_side: int | None = MAP_MAX_SIDE):
    """Explanations and region pairs for (query, each image): one forward pass per image (the region pairs use the
    feature maps the explainer kept; gradient and occlusion baselines need their own passes)."""
    explainer.map_max_side = map_max_side
    exps = explainer.explain_many(query, images, pairs=pairs) if images else []
    corrs = []
    for i, (e, img) in enumerate(zip(exps, images)):
        if e.features is None and explainer.name != "occlusion":
            e.features = tuple(_features(explainer, [query, img]))
        corrs.append(_correspondences(explainer, e, None if pairs is None else pairs[i], query, img))
    return exps, corrs


def _display(img, max_side: int = 1024):
    """A copy of a photo for figures and reports, at most ``max_side`` px, remembering the photo's own size (so boxes
    and captions stay in its own pixels); the full decode can then be freed."""
    if max(img.size) <= max_side:
        return img
    f = max_side / max(img.size)
    small = img.resize((max(1, round(img.width * f)), max(1, round(img.height * f))), Image.BILINEAR,
                       reducing_gap=2.0)
    small.info["original_size"] = img.info.get("original_size", img.size)
    return small


def explain_pair(a: str | Path, b: str | Path, out: Path, explainer: Explainer, meta: dict,
                 verification=None, pair: Decomposition | None = None, calibration=None, score_is: str | None = None,
                 map_max_side: int | None = MAP_MAX_SIDE) -> dict:
    """``retrieve explain A B``: query_map.npy, result_map.npy, pair.png, report.html, explain.json in ``out``.

    ``pair``: the index's decomposition of the pair's score (:func:`index_pair`), which every output leads with; None
    without an index (the explainer's own similarity is then the score). ``calibration``: the index's score
    distributions for the verdict. ``verification``: SIFT inliers, in the report beside the maps."""
    prepared = prepare_pair(a, b, out, explainer, meta, verification, pair, calibration, score_is, map_max_side)
    prepared.draw()
    return prepared.doc


@dataclass
class PreparedPair:
    """One pair explained, its maps and explain.json written; ``draw()`` writes pair.png and report.html (the costly
    image encoding, which the web app runs after answering)."""

    doc: dict
    out: Path  # the folder it was written to
    explanation: Explanation
    query_image: Image.Image  # as displayed (at most DISPLAY px)
    result_image: Image.Image
    draw: Callable[[], None]
    verification: object = None


def prepare_pair(a: str | Path, b: str | Path, out: Path, explainer: Explainer, meta: dict, verification=None,
                 pair: Decomposition | None = None, calibration=None, score_is: str | None = None,
                 map_max_side: int | None = MAP_MAX_SIDE, names: tuple[str, str] | None = None) -> PreparedPair:
    """:func:`explain_pair` up to its figure and report (see there); ``names``: the photos' names in the titles
    (their file names by default)."""
    side = explainer.backbone.preprocess.size
    qa, rb = load_image(a, min_side=side), load_image(b, min_side=side)
    (e,), (corr,) = _explain_all(explainer, qa, [rb], None if pair is None else [pair], map_max_side)
    qa, rb = _display(qa), _display(rb)
    out = _prepare_out(out)
    files = save_maps(out, "", e, (own_size(qa), own_size(rb)), max_side=saved_side(map_max_side))
    verdict = make_verdict(e.score, calibration, verification)
    rec = pair_record(e, score_is or score_words(None), verdict, corr, files)
    na, nb = names or (Path(a).name, Path(b).name)
    title = verdict.title(na, nb)
    note = collection_note(calibration)

    def draw() -> None:
        pair_figure(qa, rb, e, f"{rec['score_short']} · {title}", out / "pair.png", verdict.text)
        write_report(out / "report.html", title,
                     [ReportItem(f"{na} and {nb}", str(a), str(b), qa, rb, e, rec, verification)], meta, note)

    return PreparedPair(pair_document(a, b, meta, rec, files, out, e, verification, note), out, e, qa, rb, draw,
                        verification)


def pair_document(a, b, meta: dict, rec: dict, files: dict, out: Path, e, verification, note=None) -> dict:
    """``explain.json`` of one pair (written to ``out``, its path added under ``files``), as returned."""
    doc = {**json_name("query", Path(a).resolve()), **json_name("result", Path(b).resolve()), **meta, **rec,
           "files": {**files, "pair": str(out / "pair.png"), "report": str(out / "report.html")}}
    doc["metric"] = e.metric
    if note:
        doc["collection_note"] = note
    if verification is not None:
        doc["inliers"] = verification.inliers
        doc["confirmed"] = verification.confirmed
    (out / "explain.json").write_text(json.dumps(doc, indent=2))
    doc["files"]["json"] = str(out / "explain.json")
    return doc


def load_readable(items: Sequence, side: int, on_error=None) -> tuple[list, list]:
    """(images, items kept): each item's photo (``item.path``) decoded for a forward pass at ``side``; one that can no
    longer be read goes to ``on_error(path, reason)`` and is left out."""
    images, kept = [], []
    for it in items:
        try:
            images.append(load_image(it.path, min_side=side))
            kept.append(it)
        except ImageError as e:
            if on_error:
                on_error(e.path, e.reason)
    return images, kept


def explain_hits(query_path: str, hits: Sequence, out: Path, explainer: Explainer, meta: dict,
                 on_error=None, calibration=None, map_max_side: int | None = MAP_MAX_SIDE,
                 pairs: dict | None = None, score_is: str | None = None) -> dict[int, dict]:
    """Explain a query's search results: NN_query_map.npy, NN_result_map.npy, NN.png, report.html.

    ``pairs``: {hit id: the index's decomposition of the hit's score} (:func:`ranking_pairs`). Returns rank → the
    ``explanation`` object for the JSON output (it leads with the hit's own score). A result whose file can no longer
    be read is reported through ``on_error(path, reason)`` and left out."""
    side = explainer.backbone.preprocess.size  # the explain resolution: the maps' forward pass
    q = load_image(query_path, min_side=side)
    images, kept = load_readable(sorted(hits, key=lambda h: h.rank), side, on_error)
    out = _prepare_out(out)
    exps, corrs = _explain_all(explainer, q, images, None if pairs is None else [pairs[h.id] for h in kept],
                               map_max_side)
    q, images = _display(q), [_display(im) for im in images]
    items, objs = [], {}
    for h, img, e, corr in zip(kept, images, exps, corrs):
        nn = f"{h.rank:02d}"
        files = save_maps(out, f"{nn}_", e, (own_size(q), own_size(img)), max_side=saved_side(map_max_side))
        png = out / f"{nn}.png"
        v = getattr(h, "verification", None)
        verdict = make_verdict(e.score, calibration, v)
        rec = pair_record(e, score_is or score_words(None), verdict, corr, files)
        name = Path(h.path).name
        pair_figure(q, img, e, f"#{h.rank} · {rec['score_short']} · {name}: {verdict.headline}", png, verdict.text)
        items.append(ReportItem(f"#{h.rank} · {name} — {verdict.headline}", query_path, h.path, q, img, e, rec, v))
        objs[h.rank] = {**rec, "png": str(png), "report": str(out / "report.html")}
        if v is not None:
            objs[h.rank]["inliers"] = v.inliers
    write_report(out / "report.html", f"Results for {Path(query_path).name}", items, meta, collection_note(calibration))
    return objs


def explain_meta(store, explainer) -> dict:
    """What every explanation's JSON says about how it was made (``store``: the index, or None)."""
    return {"model": store.settings.model if store else explainer.backbone.name, "metric": explainer.metric,
            "method": explainer.name, "input_size": explainer.backbone.preprocess.size,
            "score_is": score_words(store), "precision": getattr(explainer.backbone, "precision", "fp32"),
            "index": str(store.directory) if store else None}


def explain_alone(a, b, out: Path, model: str | None = None, weights: str | None = None, metric: str | None = None,
                  method: str | None = None, input_size: int | None = None, verify: bool = False,
                  full_maps: bool = False) -> dict:
    """``retrieve explain A B`` without an index: the model alone compares the two photos at the explain resolution
    (448 px unless ``input_size``); its own similarity is the score, and there is no collection to place it in."""
    from retrieval.index.store import default_explain
    from retrieval.models.loading import load_backbone
    from retrieval.models.registry import DEFAULT_MODEL

    bb = load_backbone(model or DEFAULT_MODEL, weights, input_size=input_size)
    if not input_size:  # maps at the resolution an index explains at
        bb = bb.at_size(default_explain(bb.preprocess.size)["input_size"])
    explainer = make_explainer(method or "sfam", bb, metric=metric or "cosine", mu=None)
    verification = None
    if verify:
        from retrieval.match.verify import Verifier

        v = Verifier()
        verification = v.verify(v.features(a), v.features(b))
    return explain_pair(a, b, out, explainer, explain_meta(None, explainer), verification,
                        map_max_side=None if full_maps else MAP_MAX_SIDE)
