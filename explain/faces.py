"""Explaining face matches: SFAM on the aligned chips, mapped back onto both photos.

The descriptor of dlib's face ResNet is a linear layer over the global average of the last feature map,
so SFAM's CIS decomposes the explained similarity exactly (retrieval/faces/network.py folds that layer into
the map). The maps are computed on the two 150×150 aligned chips, then carried onto each photo through the
inverse of its alignment (the chip → photo similarity transform), where the face boxes are drawn.
"""
from __future__ import annotations

import html
import json
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from retrieval.faces.network import CHIP_SIZE
from retrieval.faces.search import FaceQuery, FaceSearcher, _iou
from retrieval.faces.detect import Face, warp_to_photo

from .methods import SFAM
from .render import REPORT_CSS, _heat_uri, _jpeg_uri, _legend_css, overlay

from retrieval.faces.network import TAP, stored_tap_mean  # noqa: E402  (TAP: 8×8 on a chip, fused with the last map)

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


def face_explainer(searcher: FaceSearcher, method: str | None = None):
    """SFAM (the default map: final layer × finer layer centred on the collection's μ_tap × correspondence
    gate) or any other method of explain/methods.py, on chips, for the index's L2 metric, CIS relative to the
    collection's mean face."""
    from .methods import make_explainer

    mu = searcher.store.mean if searcher.store.count() else None
    if method in (None, "sfam"):  # the 8×8 layer centred on the collection's μ_tap (stored by the indexer)
        # paper=0: the gated map alone, as measured on faces (bench/results/faces.md: 0.92 of the map in the face
        # box); the general preset's floor of the paper's map was chosen on Lite0 and not measured on face chips
        ex = SFAM(searcher.backbone, metric="l2", mu=mu, tap=TAP, mu_tap=stored_tap_mean(searcher.store), paper=0)
    else:
        ex = make_explainer(method, searcher.backbone, metric="l2", mu=mu)
    ex.map_max_side = None  # chip-sized maps (150×150)
    return ex


def energy_in_box(heat: np.ndarray, box) -> float:
    """The share of a map's mass inside ``box`` (x0, y0, x1, y1)."""
    total = float(np.clip(heat, 0, None).sum())
    if total <= 0:
        return 0.0
    x0, y0, x1, y1 = box
    return float(np.clip(heat[y0:y1, x0:x1], 0, None).sum() / total)


def match_face(faces: list[Face], box) -> Face | None:
    """The detected face that is the indexed one (the largest overlap with its stored box)."""
    best = max(faces, key=lambda f: _iou(f.box, box), default=None)
    return best if best is not None and _iou(best.box, box) > 0.3 else None


def explain_pair(explainer, qimg: Image.Image, qface: Face, rimg: Image.Image, rface: Face) -> dict:
    """Maps on both chips and on both photos (each photo's own pixels), and the SFAM explanation."""
    e = explainer.explain(Image.fromarray(qface.chip), Image.fromarray(rface.chip))
    qh, qw = qimg.height, qimg.width
    rh, rw = rimg.height, rimg.width
    qchip, rchip = e.query_map, e.result_map
    if getattr(explainer, "cell_geometry", True):  # each cell at its place on the chip (CELLS)
        qc, rc = chip_map(e.query_raw, qchip.shape[0]), chip_map(e.result_raw, rchip.shape[0])
        if qc is not None and rc is not None and qchip.shape[0] == qchip.shape[1]:
            qchip, rchip = qc, rc
    qmap = warp_to_photo(qchip, qface.to_photo, (qh, qw))
    rmap = warp_to_photo(rchip, rface.to_photo, (rh, rw))
    for m in (qmap, rmap):
        if m.max() > 0:
            m /= m.max()
    return {"explanation": e, "query_chip_map": qchip, "result_chip_map": rchip, "query_photo_map": qmap,
            "result_photo_map": rmap,
            "energy_in_box": {"query": energy_in_box(qmap, qface.box), "result": energy_in_box(rmap, rface.box)}}


def _save_pair(out: Path, p: dict, query: tuple, result: tuple) -> None:
    """Write one pair's pictures and maps: per side (image, face, overlay name, chip name, map name), the photo
    with its map and face box, the chip with its map, and the photo-sized map (.npy, float32)."""
    for (img, face, over, chip, npy), side in ((query, "query"), (result, "result")):
        _boxed(img, p[f"{side}_photo_map"], face.box).save(out / over)
        overlay(Image.fromarray(face.chip), p[f"{side}_chip_map"]).save(out / chip)
        np.save(out / npy, p[f"{side}_photo_map"].astype(np.float32))


def _boxed(img: Image.Image, heat: np.ndarray, box, colour=(0, 229, 255)) -> Image.Image:
    out = overlay(img.convert("RGB"), heat)
    d = ImageDraw.Draw(out)
    w = max(2, round(max(img.size) / 250))
    d.rectangle([box[0], box[1], box[2] - 1, box[3] - 1], outline=colour, width=w)
    return out


def _face_box_svg(size, box, label: str) -> str:
    w, h = size
    sw = max(w, h) / 250
    return (f"<svg class='marks' viewBox='0 0 {w} {h}' preserveAspectRatio='none'><rect x='{box[0]}' y='{box[1]}' "
            f"width='{box[2] - box[0]}' height='{box[3] - box[1]}' fill='none' stroke='#00e5ff' "
            f"stroke-width='{sw:.2f}'/></svg>")


def _panel(label: str, path: str, img: Image.Image, heat: np.ndarray, box) -> str:
    E = html.escape
    return (f"<figure><div class='stack'><img class='photo' alt='{E(label)} photo' src='{_jpeg_uri(img)}'>"
            f"<img class='heat' alt='{E(label)} heat map' src='{_heat_uri(heat)}' style='opacity:.6'>"
            f"{_face_box_svg(img.size, box, label)}</div><figcaption>{E(label)}: <code>{E(path)}</code> "
            f"({img.width}×{img.height}), face box {box[0]},{box[1]}–{box[2]},{box[3]}</figcaption></figure>")


def explain_face_hits(searcher: FaceSearcher, res: FaceQuery, out: Path, method: str | None = None,
                      on_error=None) -> dict[int, dict]:
    """For each hit of ``res``: overlay PNGs (both photos with the face boxes, both chips), .npy maps in
    each photo's pixels, and one report.html. Returns {rank: record}."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    explainer = face_explainer(searcher, method)
    qimg, qface = res.query_image.convert("RGB"), res.query_face
    records: dict[int, dict] = {}
    sections = []
    for h in res.results:
        try:
            rimg, rfaces = searcher.faces_of(h.path)
        except Exception as e:  # the photo went away or broke since it was indexed
            if on_error:
                on_error(h.path, str(e))
            continue
        rface = match_face(rfaces, h.box)
        if rface is None:
            if on_error:
                on_error(h.path, f"the indexed face at {h.box} is no longer found; re-index")
            continue
        rimg = rimg.convert("RGB")
        p = explain_pair(explainer, qimg, qface, rimg, rface)
        e = p["explanation"]
        stem = f"{h.rank:02d}"
        files = {"query_overlay": f"{stem}_query.png", "result_overlay": f"{stem}_result.png",
                 "query_chip": f"{stem}_query_chip.png", "result_chip": f"{stem}_result_chip.png",
                 "query_map": f"{stem}_query_map.npy", "result_map": f"{stem}_result_map.npy"}
        _save_pair(out, p, (qimg, qface, files["query_overlay"], files["query_chip"], files["query_map"]),
                   (rimg, rface, files["result_overlay"], files["result_chip"], files["result_map"]))
        rec = {**h.to_dict(), "explained": e.similarity, "cis_sum": float(e.cis.sum()) if e.cis is not None else None,
               "cis_target": e.cis_target, "energy_in_box": p["energy_in_box"], "files": files,
               "report": str(out / "report.html")}
        records[h.rank] = rec
        E = html.escape
        sections.append(
            f"<section><h2>#{h.rank} · {E(Path(h.path).name)} · face {h.face}</h2>"
            f"<p class='verdict lead'><b>{E(h.verdict)}</b></p>"
            f"<p class='muted'>Distance between the two 128-d face descriptors (dlib's face ResNet); dlib's "
            f"documented threshold: under {searcher.threshold:g} is the same person. Maps: SFAM on the aligned "
            f"chips (explained: {E(e.similarity)}; Σ CIS = {rec['cis_sum']:.4f}, target {e.cis_target:.4f}), "
            f"carried onto each photo through the inverse of its alignment. Share of the map inside the face "
            f"box: query {p['energy_in_box']['query']:.0%}, result {p['energy_in_box']['result']:.0%}.</p>"
            "<div class='pair'>" + _panel("query", res.query, qimg, p["query_photo_map"], qface.box)
            + _panel("result", h.path, rimg, p["result_photo_map"], rface.box) + "</div>"
            f"<p class='muted'>Aligned chips (150×150) with their maps:</p><div class='pair'>"
            f"<figure><img class='photo' alt='query chip' src='{_jpeg_uri(Image.open(out / files['query_chip']))}'>"
            f"<figcaption>query chip</figcaption></figure><figure><img class='photo' alt='result chip' "
            f"src='{_jpeg_uri(Image.open(out / files['result_chip']))}'><figcaption>result chip</figcaption>"
            "</figure></div></section>")
    title = f"Faces like face {res.face} of {Path(res.query).name}"
    page = [f"<!doctype html><html lang='en'><meta charset='utf-8'><title>{html.escape(title)}</title>",
            f"<style>{REPORT_CSS}.pair figure img.photo{{max-width:100%}}</style>",
            f"<h1>{html.escape(title)}</h1>",
            f"<p class='muted'>query: <code>{html.escape(res.query)}</code> · face {res.face} of "
            f"{res.faces_in_query} · box {res.box} · model: dlib face ResNet (PyTorch port) · metric: L2</p>",
            "<div class='legend'><span>heat map:</span><span>low</span>"
            f"<span class='bar' style='background:{_legend_css()}'></span><span>high</span></div>"]
    page += sections
    page.append("</html>")
    (out / "report.html").write_text("\n".join(page), encoding="utf-8")
    (out / "results.json").write_text(json.dumps({**res.to_dict(), "explained": records}, indent=1))
    return records


def pick_face(searcher: FaceSearcher, path: str, n: int | None, option: str) -> tuple[Image.Image, Face, int]:
    """(photo, face, number of faces) of face ``n`` (None: the largest) of the photo at ``path``; a photo
    without a face, or with fewer faces than ``n + 1``, is a one-line error naming it."""
    from retrieval.errors import RetrieveError

    img, faces = searcher.faces_of(path)
    if not faces:
        raise RetrieveError(f"{path}: no face found (the {searcher.finder.detector_name.upper()} detector of "
                            "this faces index finds none)")
    n = 0 if n is None else n
    if n >= len(faces):
        raise RetrieveError(f"{option} {n}: {path} has {len(faces)} face{'s' if len(faces) != 1 else ''} "
                            f"({option} 0 to {len(faces) - 1}, 0 the largest)")
    return img.convert("RGB"), faces[n], len(faces)


def explain_face_pair(searcher: FaceSearcher, a: str, b: str, out: Path, face_a: int | None = None,
                      face_b: int | None = None, method: str | None = None) -> dict:
    """``retrieve explain A B --index FACES``: one face of each photo (the largest unless ``face_a``/``face_b``),
    the distance and dlib's verdict exactly as ``retrieve search A`` reports B's face (the same chips, the same
    network), SFAM on the two chips carried back onto both photos with the face boxes. Writes overlays, chips,
    .npy maps in photo pixels, explain.json and report.html under ``out``; returns explain.json's document."""
    from retrieval.faces.search import verdict

    aimg, fa, na = pick_face(searcher, a, face_a, "--face-a")
    bimg, fb, nb = pick_face(searcher, b, face_b, "--face-b")
    va, vb = searcher.backbone.embed_images([Image.fromarray(fa.chip), Image.fromarray(fb.chip)])
    d = float(np.linalg.norm(va.astype(np.float64) - vb.astype(np.float64)))
    thr = searcher.threshold
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    p = explain_pair(face_explainer(searcher, method), aimg, fa, bimg, fb)
    e = p["explanation"]
    files = {"a_overlay": "a.png", "b_overlay": "b.png", "a_chip": "a_chip.png", "b_chip": "b_chip.png",
             "a_map": "a_map.npy", "b_map": "b_map.npy", "report": "report.html", "json": "explain.json"}
    _save_pair(out, p, (aimg, fa, files["a_overlay"], files["a_chip"], files["a_map"]),
               (bimg, fb, files["b_overlay"], files["b_chip"], files["b_map"]))
    cis_sum = float(e.cis.sum()) if e.cis is not None else None
    doc = {"a": str(a), "b": str(b), "face_a": fa.index, "face_b": fb.index, "faces_in_a": na, "faces_in_b": nb,
           "box_a": list(fa.box), "box_b": list(fb.box), "metric": "l2", "distance": round(d, 6),
           "threshold": thr, "same_person": d < thr, "verdict": verdict(d, thr), "method": e.method,
           "explained": e.similarity, "cis_sum": cis_sum, "cis_target": e.cis_target,
           "energy_in_box": {"a": p["energy_in_box"]["query"], "b": p["energy_in_box"]["result"]},
           "files": {k: str(out / v) for k, v in files.items()}}
    E = html.escape
    cis = (f"; Σ CIS = {cis_sum:.4f}, target {e.cis_target:.4f}" if cis_sum is not None else "")
    page = [f"<!doctype html><html lang='en'><meta charset='utf-8'><title>{E(Path(a).name)} ↔ {E(Path(b).name)}</title>",
            f"<style>{REPORT_CSS}.pair figure img.photo{{max-width:100%}}</style>",
            f"<h1>Face {fa.index} of {E(Path(a).name)} ↔ face {fb.index} of {E(Path(b).name)}</h1>",
            f"<p class='verdict lead'><b>{E(doc['verdict'])}</b></p>",
            f"<p class='muted'>Distance between the two 128-d face descriptors (dlib's face ResNet, PyTorch port); "
            f"dlib's documented threshold: under {thr:g} is the same person. Maps: {E(e.method)} on the aligned chips "
            f"(explained: {E(e.similarity)}{cis}), carried onto each photo through the inverse of its alignment. "
            f"Share of the map inside the face box: A {p['energy_in_box']['query']:.0%}, B "
            f"{p['energy_in_box']['result']:.0%}.</p>",
            "<div class='legend'><span>heat map:</span><span>low</span>"
            f"<span class='bar' style='background:{_legend_css()}'></span><span>high</span></div>",
            "<div class='pair'>" + _panel("A", str(a), aimg, p["query_photo_map"], fa.box)
            + _panel("B", str(b), bimg, p["result_photo_map"], fb.box) + "</div>",
            "<p class='muted'>Aligned chips (150×150) with their maps:</p><div class='pair'>"
            f"<figure><img class='photo' alt='A chip' src='{_jpeg_uri(Image.open(out / files['a_chip']))}'>"
            "<figcaption>A chip</figcaption></figure><figure><img class='photo' alt='B chip' "
            f"src='{_jpeg_uri(Image.open(out / files['b_chip']))}'><figcaption>B chip</figcaption></figure></div>",
            "</html>"]
    (out / files["report"]).write_text("\n".join(page), encoding="utf-8")
    (out / files["json"]).write_text(json.dumps(doc, indent=1))
    return doc
