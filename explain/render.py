"""Turning explanations into files an auditor can open: .npy maps, overlay PNGs, a self-contained HTML report.

Colours come from matplotlib's perceptually uniform ``inferno`` colormap (its colormap registry only:
figures are composed with Pillow, which is much faster); overlays are alpha-blended onto the photo at
its own aspect ratio (never stretched).
"""
from __future__ import annotations

import base64
import html
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

from retrieval.names import shown

from .methods import MAP_LABELS, Explanation, map_size

COLORMAP = "inferno"
ALPHA = 0.5
PHOTO_MAX_SIDE = 768  # photos inlined in the report
HEAT_MAX_SIDE = 384  # heat layers inlined in the report (maps are smooth: the browser scales them up)
SAVED_MAP_SIDE = 256  # the .npy maps written: long side at most this (they come from grids of ~28 cells and are smooth;
# --full-maps: the photo's own size)


def saved_side(map_max_side: int | None) -> int | None:
    """The long side of the maps written beside a report: ``SAVED_MAP_SIDE``, or the photo's own (None) when the maps
    in memory are at the photo's own size (``--full-maps``)."""
    return None if map_max_side is None else SAVED_MAP_SIDE


def overlay(img: Image.Image, heat: np.ndarray, alpha: float = ALPHA) -> Image.Image:
    """The photo with its map (H×W in [0, 1]) blended on top; more opaque where the map is high."""
    from matplotlib import colormaps

    if heat.shape != (img.height, img.width):  # the photo was decoded at reduced size: fit the map to it
        heat = np.asarray(Image.fromarray(heat.astype(np.float32), "F").resize(img.size, Image.BILINEAR))
    rgba = colormaps[COLORMAP](np.clip(heat, 0, 1))
    base = np.asarray(img.convert("RGB"), np.float32) / 255.0
    a = alpha * (0.35 + 0.65 * np.clip(heat, 0, 1))[..., None]
    out = base * (1 - a) + rgba[..., :3] * a
    return Image.fromarray((out * 255 + 0.5).astype(np.uint8))


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: the small bitmap font
        return ImageFont.load_default()


def pair_figure(query: Image.Image, result: Image.Image, e: Explanation, title: str, path: Path,
                subtitle: str = "", height: int = 360) -> None:
    """``query | result`` side by side, each with its overlay at its own aspect ratio, a colour legend,
    the title (which leads with the search score), a subtitle (the verdict) and a line naming the map; drawn with
    Pillow (about 30x faster than a matplotlib figure). Nothing else is drawn over the heat maps: inlier lines
    and region pairs are in the report, behind toggles."""
    from matplotlib import colormaps
    from PIL import ImageDraw

    panels = []
    for img, m in ((query, e.query_map), (result, e.result_map)):
        w = max(1, round(img.width * height / img.height))
        if w > 2 * height:  # a panorama: limit the width, keep the aspect ratio
            w = 2 * height
        small = img.convert("RGB").resize((w, max(1, round(img.height * w / img.width))), Image.BILINEAR)
        panels.append(overlay(small, m))  # blended at the panel's size: a 100 MP photo costs no more
    maps_are = f"map: {MAP_LABELS.get(e.method, e.method)}"  # what the maps are: a figure travels without its report
    gap, top, bottom, legend = 16, 80 if subtitle else 62, 28, 70
    width = gap + panels[0].width + gap + panels[1].width + gap + legend
    canvas = Image.new("RGB", (width, top + height + bottom), "white")
    draw = ImageDraw.Draw(canvas)
    draw.text((gap, 10), shown(title), fill="black", font=_font(16))  # a file name in it: readable (retrieval/names.py)
    if subtitle:
        draw.text((gap, 34), subtitle, fill="#333333", font=_font(13))
    draw.text((gap, top - 26), maps_are, fill="#333333", font=_font(13))
    x = gap
    for label, img, p in (("query", query, panels[0]), ("result", result, panels[1])):
        y = top + (height - p.height) // 2
        canvas.paste(p, (x, y))
        w0, h0 = img.info.get("original_size", img.size)
        draw.text((x, top + height + 6), f"{label} ({w0}x{h0})", fill="black", font=_font(13))
        x += p.width + gap
    ramp = (np.linspace(1, 0, height)[:, None] * np.ones((1, 16)))
    bar = Image.fromarray((colormaps[COLORMAP](ramp)[..., :3] * 255).astype(np.uint8))
    canvas.paste(bar, (x, top))
    for v, label in ((1.0, "high"), (0.0, "low")):
        yy = top + round((1 - v) * (height - 1))
        draw.line([(x + 16, yy), (x + 20, yy)], fill="black")
        draw.text((x + 23, yy - 7), label, fill="black", font=_font(12))
    canvas.save(path, "PNG")


MATCH_COLOURS = ("#00e5ff", "#76ff03", "#ffea00", "#ff4081", "#ffffff")


def draw_matches(draw, verification, qo: tuple, ro: tuple, limit: int = 150) -> None:
    """Lines between inlier correspondences; ``qo``/``ro`` = (x, y, sx, sy) placing own pixels on the canvas."""
    n = len(verification.query_points)
    step = max(1, n // limit)  # a readable subset when there are very many
    for i in range(0, n, step):
        (a, b), (c, d) = verification.query_points[i], verification.result_points[i]
        p = (qo[0] + a * qo[2], qo[1] + b * qo[3])
        q = (ro[0] + c * ro[2], ro[1] + d * ro[3])
        colour = MATCH_COLOURS[(i // step) % len(MATCH_COLOURS)]
        draw.line([p, q], fill=colour, width=1)
        for x, y in (p, q):
            draw.ellipse([x - 2, y - 2, x + 2, y + 2], outline=colour)


def save_maps(out: Path, prefix: str, e: Explanation, sizes: tuple | None = None,
              max_side: int | None = SAVED_MAP_SIDE) -> dict:
    """``{prefix}query_map.npy`` and ``{prefix}result_map.npy`` (float16, values in [0, 1]) at the photo's own
    aspect, the long side at most ``max_side`` (None: the photo's own size); returns their paths and scales
    (map pixels per photo pixel, so a box in the photo maps to ``box × scale`` in the map)."""
    out_d = {}
    for name, m, size in (("query", e.query_map, sizes[0] if sizes else e.query_map.shape),
                          ("result", e.result_map, sizes[1] if sizes else e.result_map.shape)):
        target = map_size(size, max_side)
        if m.shape != target:
            m = resize_map(m, target)
        path = out / f"{prefix}{name}_map.npy"
        np.save(path, np.ascontiguousarray(m, np.float16))
        out_d[f"{name}_map"] = str(path)
        out_d[f"{name}_map_scale"] = round(target[1] / size[1], 6)
    return out_d


def resize_map(m: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of a map to (H, W), values kept in [0, 1]."""
    r = Image.fromarray(np.asarray(m, np.float32), "F").resize((size[1], size[0]), Image.BILINEAR)
    return np.clip(np.asarray(r, np.float32), 0, 1)


def _jpeg_uri(img: Image.Image, max_side: int = PHOTO_MAX_SIDE, quality: int = 82) -> str:
    im = img.convert("RGB")
    if max(im.size) > max_side:
        im = im.copy()
        im.thumbnail((max_side, max_side), Image.LANCZOS)
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=quality)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()


def _heat_uri(heat: np.ndarray, max_side: int = HEAT_MAX_SIDE) -> str:
    """The map as a colour layer (PNG with alpha: more opaque where it is high), small: it is smooth."""
    from matplotlib import colormaps

    h, w = heat.shape
    if max(h, w) > max_side:
        heat = resize_map(heat, map_size((h, w), max_side))
    heat = np.clip(heat, 0, 1)
    rgba = colormaps[COLORMAP](heat)
    rgba[..., 3] = 0.35 + 0.65 * heat
    buf = io.BytesIO()
    Image.fromarray((rgba * 255 + 0.5).astype(np.uint8), "RGBA").save(buf, "PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _legend_css() -> str:
    from matplotlib import colormaps

    stops = ", ".join("rgb({},{},{}) {}%".format(*(int(c * 255) for c in colormaps[COLORMAP](v)[:3]), int(v * 100))
                      for v in np.linspace(0, 1, 9))
    return f"linear-gradient(to right, {stops})"


@dataclass
class ReportItem:
    """One pair in a report: its labels, the two photos, the explanation and what the run said about it."""

    label: str  # e.g. "#1 result.jpg"
    query_path: str
    result_path: str
    query: Image.Image
    result: Image.Image
    explanation: Explanation
    record: dict  # explain.run.pair_record(): score, verdict, explained similarity, correspondences, channels
    verification: object = None  # retrieval.match.verify.Verification, when the result was verified
    face_boxes: tuple | None = None  # a faces index: (query box, result box) in each photo's own pixels, drawn
    chips: tuple | None = None  # and the two aligned chips with their maps (PIL images)


_E = html.escape


def _N(text: str) -> str:
    """Text holding a file name, for HTML: readable (retrieval/names.py shown) and escaped."""
    return html.escape(shown(text))

REPORT_CSS = (
    "body{font:14px/1.45 system-ui,sans-serif;margin:2em auto;max-width:1100px;padding:0 1em;color:#222}"
    "h1{font-size:1.5em}h2{font-size:1.15em;margin:0 0 .3em}section{margin:0 0 2.5em;padding-top:1em;"
    "border-top:1px solid #ddd}.lead{font-size:1.1em}.verdict{margin:.2em 0}.muted{color:#555}"
    ".note{background:#fff8e1;border-left:3px solid #ffb300;padding:.4em .8em}"
    ".pair{display:flex;gap:1em;align-items:flex-start}.pair figure{flex:1;margin:0}"
    ".stack{position:relative;display:inline-block;max-width:100%;line-height:0}"
    ".stack img.photo{display:block;max-width:100%;height:auto;border:1px solid #ccc}"
    ".stack .heat,.stack .marks{position:absolute;left:0;top:0;width:100%;height:100%}"
    ".marks text{font:bold 1px sans-serif;paint-order:stroke;stroke:#000;stroke-width:.08}"
    "figcaption{line-height:1.3;margin-top:.3em;font-size:12px;word-break:break-all}"
    ".controls{margin:.5em 0;display:flex;gap:1.5em;flex-wrap:wrap}.legend{display:flex;align-items:center;gap:.5em}"
    ".bar{width:220px;height:12px;border:1px solid #999}table{border-collapse:collapse;font-size:12px}"
    "td,th{padding:2px 8px;border-bottom:1px solid #ddd;text-align:right}th{text-align:center}"
    "code{font-size:12px}details{margin-top:.6em}img.matches{max-width:100%;border:1px solid #ccc}"
)

REPORT_JS = (
    "function upd(e){var t=e.target,s=t.closest('section');if(!s)return;"
    "if(t.classList.contains('t-op'))s.querySelectorAll('.heat').forEach(function(h){h.style.opacity=t.value/100});"
    "if(t.classList.contains('t-heat'))s.querySelectorAll('.heat').forEach(function(h){h.style.display=t.checked?'':'none'});"
    "if(t.classList.contains('t-marks'))s.querySelectorAll('.marks').forEach(function(m){m.style.display=t.checked?'':'none'})}"
    "document.addEventListener('input',upd);document.addEventListener('change',upd);"
    "document.querySelectorAll('img[data-same]').forEach(function(i){i.src=document.getElementById(i.dataset.same).src});"
)

MARK_COLOURS = ("#00e5ff", "#76ff03", "#ffea00", "#ff4081", "#ffffff", "#ff9100", "#d500f9", "#1de9b6")


def _marks_svg(size: tuple[int, int], boxes: list[tuple[int, tuple]]) -> str:
    """Numbered boxes (``(number, (x0, y0, x1, y1))`` in the photo's own pixels) as an SVG layer, hidden until
    its toggle is ticked."""
    w, h = size
    sw = max(w, h) / 250
    fs = max(w, h) / 22
    parts = [f"<svg class='marks' style='display:none' viewBox='0 0 {w} {h}' preserveAspectRatio='none'>"]
    for n, (x0, y0, x1, y1) in boxes:
        c = MARK_COLOURS[(n - 1) % len(MARK_COLOURS)]
        parts.append(f"<rect x='{x0}' y='{y0}' width='{x1 - x0}' height='{y1 - y0}' fill='none' stroke='{c}' "
                     f"stroke-width='{sw:.2f}'/><text x='{x0 + sw * 2:.1f}' y='{y0 + fs:.1f}' fill='{c}' "
                     f"style='font-size:{fs:.1f}px;stroke-width:{fs / 12:.2f}px'>{n}</text>")
    parts.append("</svg>")
    return "".join(parts)


def _face_svg(size: tuple[int, int], box) -> str:
    """The face box, always shown (a faces index's pair)."""
    w, h = size
    return (f"<svg class='face' viewBox='0 0 {w} {h}' preserveAspectRatio='none' style='position:absolute;left:0;"
            f"top:0;width:100%;height:100%'><rect x='{box[0]}' y='{box[1]}' width='{box[2] - box[0]}' "
            f"height='{box[3] - box[1]}' fill='none' stroke='#00e5ff' stroke-width='{max(w, h) / 250:.2f}'/></svg>")


class _Photos:
    """Each photo inlined once per report: the query photo of a search's report appears beside every result, and
    later appearances take its data from the first through the report's script (``data-same``)."""

    def __init__(self):
        self.seen: dict[int, str] = {}

    def img(self, label: str, img: Image.Image) -> str:
        key = id(img)
        if key in self.seen:
            return f"<img class='photo' alt='{_E(label)} photo' data-same='{self.seen[key]}'>"
        self.seen[key] = f"photo-{len(self.seen) + 1}"
        return f"<img class='photo' alt='{_E(label)} photo' id='{self.seen[key]}' src='{_jpeg_uri(img)}'>"


def _panel(label: str, path: str, img: Image.Image, heat: np.ndarray, boxes: list, face=None,
           photos: _Photos | None = None) -> str:
    w0, h0 = img.info.get("original_size", img.size)
    return (f"<figure><div class='stack'>{(photos or _Photos()).img(label, img)}"
            f"<img class='heat' alt='{_E(label)} heat map' src='{_heat_uri(heat)}' style='opacity:.6'>"
            f"{_marks_svg((w0, h0), boxes)}{_face_svg((w0, h0), face) if face is not None else ''}</div>"
            f"<figcaption>{_E(label)}: <code>{_N(path)}</code> ({w0}×{h0})"
            + (f", face box {face[0]},{face[1]}–{face[2]},{face[3]}" if face is not None else "")
            + "</figcaption></figure>")


def report_item_html(it: ReportItem, photos: _Photos | None = None) -> str:
    """One result's section: search score, verdict, both maps with their controls, region pairs, channels."""
    rec = it.record
    parts = [f"<section><h2>{_E(rec['score_short'])} · {_N(it.label)}</h2>",
             f"<p class='muted'>The score is the {_E(rec['score_is'])}.</p>",
             f"<p class='verdict'>{_E(rec['verdict']['text'])}</p>",
             f"<p class='muted'>{_E(rec['explained']['text'])}</p>"]
    corr = rec.get("correspondences") or []
    parts.append("<div class='controls'><label><input type='checkbox' class='t-heat' checked> heat maps</label>"
                 "<label>opacity <input type='range' class='t-op' min='0' max='100' value='60'></label>"
                 + ("<label><input type='checkbox' class='t-marks'> numbered region pairs</label>" if corr else "")
                 + "</div>")
    qb = [(c["rank"], tuple(c["query_box"])) for c in corr]
    rb = [(c["rank"], tuple(c["result_box"])) for c in corr]
    e = it.explanation
    fq, fr = it.face_boxes or (None, None)
    parts.append("<div class='pair'>" + _panel("query", it.query_path, it.query, e.query_map, qb, fq, photos)
                 + _panel("result", it.result_path, it.result, e.result_map, rb, fr, photos) + "</div>")
    if it.chips:
        parts.append("<p class='muted'>The aligned face chips (150×150) the network saw, with their maps:</p>"
                     "<div class='pair'>" + "".join(f"<figure><img class='chip' alt='{w} chip' src='{_jpeg_uri(c)}'>"
                                                    f"<figcaption>{w} chip</figcaption></figure>"
                                                    for w, c in zip(("query", "result"), it.chips)) + "</div>")
    if corr:
        parts.append("<p>Region pairs that carried the score (numbered on both photos when "
                     "<i>numbered region pairs</i> is ticked; boxes in each photo's own pixels):</p>"
                     "<table><tr><th>pair</th><th>share</th><th>query region</th><th>result region</th></tr>")
        parts += [f"<tr><td>{c['rank']}</td><td>{c['share']:.1%}</td><td>{_box(c['query_box'])}</td>"
                  f"<td>{_box(c['result_box'])}</td></tr>" for c in corr]
        parts.append("</table>")
    elif rec.get("correspondences_note"):
        parts.append(f"<p class='muted'>{_E(rec['correspondences_note'])}</p>")
    v = it.verification
    if v is not None:
        verdict = "confirmed" if v.confirmed else "not confirmed"
        from retrieval.match.verify import MIN_INLIERS

        parts.append(f"<p>Geometric verification: <b>{v.inliers} inliers</b> (same object {verdict}; {MIN_INLIERS} "
                     "needed) — "
                     "SIFT points that agree on one homography, joined by lines on the plain photos:</p>")
        parts.append(f"<img class='matches' alt='inlier matches' "
                     f"src='{_jpeg_uri(_matches_image(it.query, it.result, v), 1024)}'>")
    chans = rec.get("top_channels") or []
    if chans:
        parts.append(f"<details><summary>Channels behind the score ({_E(rec['channels_note'])})"
                     f"</summary><p class='muted'>Share: {_E(rec.get('channels_share_of', ''))}.</p><table><tr><th>channel</th><th>CIS</th><th>share of the evidence for</th></tr>")
        parts += [f"<tr><td>{c['channel']}</td><td>{c['cis']:+.5f}</td><td>{c['share']:.1%}</td></tr>" for c in chans]
        parts.append("</table></details>")
    parts.append("</section>")
    return "\n".join(parts)


def _box(b) -> str:
    x0, y0, x1, y1 = b
    return f"x {x0}–{x1}, y {y0}–{y1}"


def write_report(path: Path, title: str, items: Sequence[ReportItem], meta: dict, note: str | None = None) -> None:
    """One self-contained HTML file (images inlined, no external CSS or JS), results in rank order; ``note``: what to
    say once about the collection (a small one: retrieval/verdict.py collection_note)."""
    parts = [f"<!doctype html><html lang='en'><meta charset='utf-8'><title>{_N(title)}</title>",
             f"<style>{REPORT_CSS}</style>", f"<h1>{_N(title)}</h1>",
             "<p class='muted'>" + " · ".join(f"{_E(str(k))}: <code>{_E(str(v))}</code>" for k, v in meta.items()
                                             if v is not None) + "</p>"]
    if note:
        parts.append(f"<p class='note'>{_E(note[0].upper() + note[1:])}.</p>")
    parts += [
             "<div class='legend'><span>heat map:</span><span>low</span>"
             f"<span class='bar' style='background:{_legend_css()}'></span><span>high</span></div>",
             f"<p class='muted' id='map-words'>{_E(map_caption(items))} Use the controls above each pair to fade or "
             "hide them.</p>"]
    photos = _Photos()
    parts += [report_item_html(it, photos) for it in items]
    parts.append(f"<script>{REPORT_JS}</script></html>")
    path.write_text("\n".join(parts), encoding="utf-8")


def map_caption(items: Sequence[ReportItem]) -> str:
    """The report's caption: what its heat maps are (explain/methods.py describe_map, one method per report)."""
    words = {it.record.get("explained", {}).get("map") for it in items} - {None}
    if len(words) == 1:
        return words.pop()
    return "The heat maps show which regions of each photo made the two embeddings similar."


def _matches_image(query: Image.Image, result: Image.Image, v, height: int = 360) -> Image.Image:
    """The two photos side by side (no overlay) with lines between their inlier correspondences."""
    from PIL import ImageDraw

    ims = []
    for img in (query, result):
        w = max(1, round(img.width * height / img.height))
        ims.append(img.convert("RGB").resize((w, height), Image.BILINEAR))
    canvas = Image.new("RGB", (ims[0].width + 8 + ims[1].width, height), "white")
    canvas.paste(ims[0], (0, 0))
    canvas.paste(ims[1], (ims[0].width + 8, 0))
    origins = []
    for x, img, im in ((0, query, ims[0]), (ims[0].width + 8, result, ims[1])):
        w0, h0 = img.info.get("original_size", img.size)
        origins.append((x, 0, im.width / w0, im.height / h0))
    draw_matches(ImageDraw.Draw(canvas), v, origins[0], origins[1])
    return canvas
