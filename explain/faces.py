"""Explaining face matches: SFAM on the aligned chips, mapped back onto both photos.

The descriptor of dlib's face ResNet is a linear layer over the global average of the last feature map, so the CIS
of a faces index's score (the cosine of the two descriptors measured from the mean face: explain/cis.py) split it
exactly (retrieval/faces/network.py folds that layer into the map). The maps are computed on the two 150×150 aligned
chips, then carried onto each photo through the inverse of its alignment (the chip → photo similarity transform),
where the face boxes are drawn. Records, verdicts and the report are the photos' own (explain/run.py): one score, one
verdict vocabulary, one report.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from retrieval.errors import RetrieveError
from retrieval.faces.detect import Face, warp_to_photo
from retrieval.faces.network import CHIP_SIZE, TAP, stored_tap_mean
from retrieval.faces.search import _iou

from .methods import MAP_MAX_SIDE, SFAM, map_size
from .render import ReportItem, overlay, pair_figure, save_maps, saved_side, write_report

#: Where the cells of the face ResNet's maps sit on the 150×150 chip, by grid side: (centre of cell 0, stride)
#: in chip pixels. The network pads none of its strided layers (7×7/2 and 3×3/2 convolutions, 3×3/2 max
#: pool, 2×2/2 average-pool shortcuts added at the top-left corner), so its grids do not spread evenly over
#: the chip as a 'same'-padded network's do: the 8×8 grid of ``TAP`` has stride 16 and cell l centred at
#: 16·l + 15 (the mean of the residual path's 16·l + 17 and the shortcut's 16·l + 13), the final 2×2 grid
#: stride 64 and 64·l + 53 (paths at 64·l + 65 and 64·l + 41). Resampling a map with the image-wide
#: convention instead (cell l at (l + ½)·150/n) stretches it by 150/128 towards the chip's margin.
CELLS = {8: (15.0, 16.0), 2: (53.0, 64.0)}


def _cell_weights(n: int, size: int) -> np.ndarray:
    """size × n bilinear weights from a grid of ``n`` cells (``CELLS``) to ``size`` chip pixels; 0 beyond half
    a stride from the outer cells' centres."""
    off, stride = CELLS[n]
    u = (np.arange(size, dtype=np.float64) * (CHIP_SIZE / size) + (CHIP_SIZE / size - 1) / 2 - off) / stride
    inside = (u >= -0.5) & (u <= n - 0.5)
    uc = np.clip(u, 0, n - 1)
    i0 = np.minimum(np.floor(uc).astype(int), n - 1)
    i1 = np.minimum(i0 + 1, n - 1)
    t = uc - i0
    w = np.zeros((size, n))
    rows = np.arange(size)
    np.add.at(w, (rows, i0), 1 - t)
    np.add.at(w, (rows, i1), t)
    w[~inside] = 0
    return w


def chip_map(raw: np.ndarray, size: int = CHIP_SIZE) -> np.ndarray | None:
    """A raw map of the face ResNet (8×8 at ``TAP`` or the final 2×2) on ``size``×``size`` chip pixels, each
    cell at its place on the chip (``CELLS``), max-normalised to [0, 1] like explain.methods.upsample; None
    for a grid of another shape."""
    raw = np.asarray(raw, np.float64)
    n = raw.shape[0]
    if raw.ndim != 2 or raw.shape != (n, n) or n not in CELLS:
        return None
    w = _cell_weights(n, size)
    m = np.clip(w @ raw @ w.T, 0, None)
    top = m.max()
    return (m / top if top > 0 else m).astype(np.float32)


def face_explainer(store, backbone, method: str | None = None):
    """SFAM (the default map: final layer × finer layer centred on the collection's μ_tap × correspondence gate) or
    any other method of explain/methods.py, on chips, in the index's space (its metric, the mean face)."""
    from .methods import make_explainer

    mu = store.mean if store.count() and not store.metric.normalised else None  # an index made before: l2 on μ
    if method in (None, "sfam"):  # the 8×8 layer centred on the collection's μ_tap (stored by the indexer)
        # paper=0: the gated map alone, as measured on faces (bench/results/faces.md: 0.92 of the map in the face
        # box); the general preset's floor of the paper's map was chosen on Lite0 and not measured on face chips
        ex = SFAM(backbone, metric=store.metric, mu=mu, head=store.head, tap=TAP, mu_tap=stored_tap_mean(store),
                  paper=0)
    else:
        ex = make_explainer(method, backbone, metric=store.metric, mu=mu, head=store.head)
    ex.map_max_side = None  # chip-sized maps (150×150)
    return ex


def energy_in_box(heat: np.ndarray, box, scale: float = 1.0) -> float:
    """The share of a map's mass inside ``box`` (x0, y0, x1, y1 in photo pixels; the map ``scale`` of them)."""
    total = float(np.clip(heat, 0, None).sum())
    if total <= 0:
        return 0.0
    x0, y0, x1, y1 = (int(round(v * scale)) for v in box)
    return float(np.clip(heat[y0:y1, x0:x1], 0, None).sum() / total)


def match_face(faces: list[Face], box) -> Face | None:
    """The detected face that is the indexed one (the largest overlap with its stored box)."""
    best = max(faces, key=lambda f: _iou(f.box, box), default=None)
    return best if best is not None and _iou(best.box, box) > 0.3 else None


def _to_photo(chip: np.ndarray, face: Face, own_hw: tuple[int, int], max_side: int | None) -> np.ndarray:
    """A chip map carried onto its photo through the alignment, at the map size of the photo (``max_side``)."""
    h, w = map_size(own_hw, max_side)
    s = w / own_hw[1]
    m = warp_to_photo(chip, np.diag([s, s]) @ face.to_photo, (h, w))
    return m / m.max() if m.max() > 0 else m


def explain_face(explainer, qimg: Image.Image, qface: Face, rimg: Image.Image, rface: Face, pair=None,
                 max_side: int | None = MAP_MAX_SIDE):
    """The explanation of one pair of faces with its maps on both photos (their own aspect, long side at most
    ``max_side``) and, in ``details``, on both chips and the share of each photo map inside its face box."""
    e = explainer.explain(Image.fromarray(qface.chip), Image.fromarray(rface.chip), pair)
    qchip, rchip = e.query_map, e.result_map
    qc, rc = chip_map(e.query_raw, qchip.shape[0]), chip_map(e.result_raw, rchip.shape[0])
    if qc is not None and rc is not None and qchip.shape[0] == qchip.shape[1]:  # each cell at its place (CELLS)
        qchip, rchip = qc, rc
    qo, ro = (qimg.height, qimg.width), (rimg.height, rimg.width)
    e.query_map, e.result_map = _to_photo(qchip, qface, qo, max_side), _to_photo(rchip, rface, ro, max_side)
    e.details["chip_maps"] = (qchip, rchip)
    e.details["energy_in_box"] = {"query": energy_in_box(e.query_map, qface.box, e.query_map.shape[1] / qo[1]),
                                  "result": energy_in_box(e.result_map, rface.box, e.result_map.shape[1] / ro[1])}
    return e


def pick_face(searcher, path: str, n: int | None, option: str) -> tuple[Image.Image, Face, int]:
    """(photo, face, number of faces) of face ``n`` (None: the largest) of the photo at ``path``; a photo without a
    face, or with fewer faces than ``n + 1``, is a one-line error naming it."""
    img, faces = searcher.faces_of(path)
    if not faces:
        raise RetrieveError(f"{path}: no face found (the {searcher.finder.detector_name.upper()} detector of "
                            "this faces index finds none)")
    n = 0 if n is None else n
    if n >= len(faces):
        raise RetrieveError(f"{option} {n}: {path} has {len(faces)} face{'s' if len(faces) != 1 else ''} "
                            f"({option} 0 to {len(faces) - 1}, 0 the largest)")
    return img.convert("RGB"), faces[n], len(faces)


def face_item(label: str, a: str, b: str, qimg, qface, rimg, rface, e, rec) -> ReportItem:
    """A report section for a pair of faces: the photos with their maps and face boxes, the chips with theirs."""
    qchip, rchip = e.details["chip_maps"]
    chips = (overlay(Image.fromarray(qface.chip), qchip), overlay(Image.fromarray(rface.chip), rchip))
    return ReportItem(label, a, b, qimg, rimg, e, rec, face_boxes=(qface.box, rface.box), chips=chips)


def _face_record(out: Path, stem: str, qimg, rimg, e, score_is: str, v, max_side: int | None) -> tuple[dict, dict]:
    """A pair of faces' maps saved (``{stem}_query_map.npy``, ...) and its record (explain/run.py pair_record, with the
    map's share inside each face box); (record, map files)."""
    from .run import pair_record

    files = save_maps(out, f"{stem}_" if stem else "", e, ((qimg.height, qimg.width), (rimg.height, rimg.width)),
                      max_side=saved_side(max_side))
    return {**pair_record(e, score_is, v, [], files), "energy_in_box": e.details["energy_in_box"]}, files


def explain_face_hits(searcher, explainer, res, out: Path, meta: dict, pairs: dict, score_is: str, verdict_of,
                      on_error=None, map_max_side: int | None = MAP_MAX_SIDE) -> dict[int, dict]:
    """For each hit of ``res`` (a faces search's query result): the maps of its face against the query face on both
    photos and chips, one report.html, NN_query_map.npy / NN_result_map.npy / NN.png; {rank: record}.
    ``pairs``: {hit id: the decomposition of its score}; ``verdict_of(score)``: the index's verdict."""
    from .run import _prepare_out

    out = _prepare_out(out)
    qimg, qface = res.query_image.convert("RGB"), res.query_face
    records, items = {}, []
    for h in res.results:
        try:
            rimg, rfaces = searcher.faces_of(h.path)
        except Exception as exc:  # noqa: BLE001  (the photo went away or broke since it was indexed)
            if on_error:
                on_error(h.path, str(exc))
            continue
        rface = match_face(rfaces, h.box)
        if rface is None:
            if on_error:
                on_error(h.path, f"the indexed face at {h.box} is no longer found; re-index")
            continue
        rimg = rimg.convert("RGB")
        e = explain_face(explainer, qimg, qface, rimg, rface, pairs[h.id], map_max_side)
        v = verdict_of(e.score)
        stem, label = f"{h.rank:02d}", f"#{h.rank} · {Path(h.path).name} · face {h.face}"
        rec, _ = _face_record(out, stem, qimg, rimg, e, score_is, v, map_max_side)
        png = out / f"{stem}.png"
        pair_figure(qimg, rimg, e, f"{rec['score_short']} · {label}: {v.headline}", png, v.text)
        records[h.rank] = {**rec, "query_face": qface.index, "query_box": list(qface.box), "face": rface.index,
                           "box": list(rface.box), "png": str(png), "report": str(out / "report.html")}
        items.append(face_item(f"{label} — {v.headline}", res.query, h.path, qimg, qface, rimg, rface, e, rec))
    write_report(out / "report.html", f"Faces like face {res.face} of {Path(res.query).name}", items, meta)
    return records


def explain_face_pair(searcher, explainer, a: str, b: str, out: Path, meta: dict, score_is: str, verdict_of,
                      face_a: int | None = None, face_b: int | None = None,
                      map_max_side: int | None = MAP_MAX_SIDE):
    """``retrieve explain A B --index FACES``: one face of each photo (the largest unless ``face_a``/``face_b``), the
    score exactly as ``retrieve search A`` gives B's face (the same chips, the same network, the same space), the
    index's verdict, the maps on the chips carried back onto both photos. Writes query_map.npy, result_map.npy and
    explain.json under ``out``; returns the prepared pair (explain/run.py PreparedPair: ``draw()`` writes pair.png and
    report.html)."""
    from .cis import decompose_in
    from .run import PreparedPair, _prepare_out, pair_document

    aimg, fa, na = pick_face(searcher, a, face_a, "--face-a")
    bimg, fb, nb = pick_face(searcher, b, face_b, "--face-b")
    va, vb = searcher.backbone.embed_images([Image.fromarray(fa.chip), Image.fromarray(fb.chip)])
    pair = decompose_in(searcher.store, va, vb[None])[0]
    out = _prepare_out(out)
    e = explain_face(explainer, aimg, fa, bimg, fb, pair, map_max_side)
    v = verdict_of(e.score)
    rec, files = _face_record(out, "", aimg, bimg, e, score_is, v, map_max_side)
    label = f"face {fa.index} of {Path(a).name} and face {fb.index} of {Path(b).name}"
    faces = {"face_a": fa.index, "face_b": fb.index, "faces_in_a": na, "faces_in_b": nb, "box_a": list(fa.box),
             "box_b": list(fb.box), "png": str(out / "pair.png"), "report": str(out / "report.html")}
    doc = pair_document(a, b, meta, {**rec, **faces}, files, out, e, None)

    def draw() -> None:
        pair_figure(aimg, bimg, e, f"{rec['score_short']} · {label}: {v.headline}", out / "pair.png", v.text)
        write_report(out / "report.html", f"{label} — {v.headline}",
                     [face_item(f"{label} — {v.headline}", str(a), str(b), aimg, fa, bimg, fb, e, rec)], meta)

    return PreparedPair(doc, out, e, aimg, bimg, draw)
