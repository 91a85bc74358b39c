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

from .methods import Explanation

COLORMAP = "inferno"
ALPHA = 0.5


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
                verification=None, height: int = 360) -> None:
    """``query | result`` side by side, each with its overlay at its own aspect ratio, a colour legend
    and the score in the title; drawn with Pillow (about 30x faster than a matplotlib figure).

    ``verification`` (retrieval.verify.Verification): its inlier correspondences are drawn as lines
    between the two panels — "which points" beside SFAM's "which regions"."""
    from matplotlib import colormaps
    from PIL import ImageDraw

    panels = []
    for img, m in ((query, e.query_map), (result, e.result_map)):
        ov = overlay(img, m)
        w = max(1, round(ov.width * height / ov.height))
        if w > 2 * height:  # a panorama: limit the width, keep the aspect ratio
            w = 2 * height
        panels.append(ov.resize((w, max(1, round(ov.height * w / ov.width))), Image.BILINEAR))
    gap, top, bottom, legend = 16, 44, 28, 70
    width = gap + panels[0].width + gap + panels[1].width + gap + legend
    canvas = Image.new("RGB", (width, top + height + bottom), "white")
    draw = ImageDraw.Draw(canvas)
    draw.text((gap, 12), title, fill="black", font=_font(16))
    x = gap
    origins = []
    for label, img, p in (("query", query, panels[0]), ("result", result, panels[1])):
        y = top + (height - p.height) // 2
        canvas.paste(p, (x, y))
        w0, h0 = img.info.get("original_size", img.size)
        origins.append((x, y, p.width / w0, p.height / h0))
        extra = f" · {verification.inliers} inliers" if verification is not None and label == "result" else ""
        draw.text((x, top + height + 6), f"{label} ({w0}x{h0}){extra}", fill="black", font=_font(13))
        x += p.width + gap
    if verification is not None:
        draw_matches(draw, verification, origins[0], origins[1])
    ramp = (np.linspace(1, 0, height)[:, None] * np.ones((1, 16)))
    bar = Image.fromarray((colormaps[COLORMAP](ramp)[..., :3] * 255).astype(np.uint8))
    canvas.paste(bar, (x, top))
    for v in (1.0, 0.5, 0.0):
        yy = top + round((1 - v) * (height - 1))
        draw.line([(x + 16, yy), (x + 20, yy)], fill="black")
        draw.text((x + 23, yy - 7), f"{v:.1f}", fill="black", font=_font(12))
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


def score_text(e: Explanation) -> str:
    if e.metric == "cosine":
        return f"{'centred ' if 'centred' in e.similarity else ''}cosine similarity {e.score:.4f}"
    return f"squared L2 distance {e.distance:.4g}"


def _png_data_uri(img: Image.Image, max_side: int = 480) -> str:
    im = img.copy()
    im.thumbnail((max_side, max_side))
    buf = io.BytesIO()
    im.save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


@dataclass
class ReportItem:
    label: str  # e.g. "01"
    query_path: str
    result_path: str
    query: Image.Image
    result: Image.Image
    explanation: Explanation
    verification: object = None  # retrieval.verify.Verification, when the result was verified


def write_report(path: Path, title: str, items: Sequence[ReportItem], meta: dict, n_channels: int = 10) -> None:
    """One self-contained HTML file (images inlined): every pair, its score, both overlays, top channels."""
    parts = [f"<!doctype html><meta charset='utf-8'><title>{html.escape(title)}</title>",
             "<style>body{font:14px system-ui,sans-serif;margin:2em;max-width:1100px}"
             "img{max-width:100%;border:1px solid #ccc}.pair{display:flex;gap:1em}.pair div{flex:1}"
             "table{border-collapse:collapse;font-size:12px}td,th{padding:2px 8px;border-bottom:1px solid #ddd;"
             "text-align:right}section{margin-bottom:2.5em}code{font-size:12px}</style>",
             f"<h1>{html.escape(title)}</h1>",
             "<p>" + " · ".join(f"{html.escape(str(k))}: <code>{html.escape(str(v))}</code>" for k, v in meta.items())
             + "</p>",
             "<p>Heat maps: where each image's features made the two embeddings similar (SFAM: the "
             "per-channel contribution scores, CIS, weighting the image's own feature map). Bright = more.</p>"]
    for it in items:
        e = it.explanation
        parts.append(f"<section><h2>{html.escape(it.label)} · {html.escape(score_text(e))}</h2>")
        parts.append(f"<p>query: <code>{html.escape(it.query_path)}</code><br>result: "
                     f"<code>{html.escape(it.result_path)}</code></p>")
        parts.append("<div class='pair'>"
                     f"<div><img alt='query overlay' src='{_png_data_uri(overlay(it.query, e.query_map))}'></div>"
                     f"<div><img alt='result overlay' src='{_png_data_uri(overlay(it.result, e.result_map))}'></div>"
                     "</div>")
        v = it.verification
        if v is not None:
            verdict = "confirmed" if v.confirmed else "not confirmed"
            parts.append(f"<p>Geometric verification: <b>{v.inliers} inliers</b> ({verdict}) — SIFT matches that "
                         "agree on one homography, drawn as lines between the photos:</p>")
            parts.append(f"<img alt='inlier matches' src='{_png_data_uri(_matches_image(it.query, it.result, v), 960)}'>")
        chans = e.channels(n_channels)
        if chans:
            total = float(e.cis.sum())
            parts.append(f"<p>Channels that carried the match (Σ CIS = {total:.4f}; the top {len(chans)} carry "
                         f"{sum(c['share'] for c in chans):.0%} of it):</p><table><tr><th>channel</th><th>CIS</th>"
                         "<th>share</th></tr>")
            parts += [f"<tr><td>{c['channel']}</td><td>{c['cis']:.5f}</td><td>{c['share']:.1%}</td></tr>" for c in chans]
            parts.append("</table>")
        parts.append("</section>")
    path.write_text("\n".join(parts), encoding="utf-8")


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


def save_maps(out: Path, prefix: str, e: Explanation) -> dict:
    """``{prefix}query_map.npy`` and ``{prefix}result_map.npy`` (float32, image size, [0, 1])."""
    q, r = out / f"{prefix}query_map.npy", out / f"{prefix}result_map.npy"
    np.save(q, e.query_map.astype(np.float32))
    np.save(r, e.result_map.astype(np.float32))
    return {"query_map": str(q), "result_map": str(r)}
