"""Search a faces index (``--preset faces``) by face: each face of the query photo is a query.

The query's faces are found as indexing found them (the index's detector), ``face`` picks one (0 = the largest, the
default); results name the photo and the face box. Scores are the index's, as for any index: the cosine of the two
descriptors measured from the mean face (retrieval/presets.py FACES; an index made before it: minus the squared
distance), and the same-person test is the preset's, on that score (:func:`same_person`).
"""
from __future__ import annotations

import os
from typing import Iterator, Sequence

import numpy as np
from PIL import Image

from retrieval.errors import RetrieveError
from retrieval.faces.detect import FaceFinder
from retrieval.images import load_image
from retrieval.match.search import Hit, QueryResult


def same_person(score: float, settings) -> bool:
    """The faces preset's test on a pair's score: at or above the index's threshold on the centred cosine; for an
    index made before (L2 distances), dlib's rule, a Euclidean distance under its threshold (0.6)."""
    threshold = float((settings.faces or {}).get("threshold", 0.5))
    if settings.metric == "l2":
        return float(np.sqrt(max(-score, 0.0))) < threshold
    return score >= threshold


def parse_box(text: str) -> tuple[int, int, int, int]:
    return tuple(int(v) for v in text.split(","))  # type: ignore[return-value]


class FaceSearcher:
    """Queries a faces index with the faces of photos."""

    def __init__(self, store, backbone):
        self.store = store
        self.backbone = backbone
        cfg = store.settings.faces or {}
        self.finder = FaceFinder(cfg.get("detector", "hog"), int(cfg.get("upsample", 1)))
        self._metric = store.metric

    def faces_of(self, path: str):
        img = load_image(path)
        return img, self.finder.faces(np.asarray(img.convert("RGB")))

    def search_paths(self, paths: Sequence[str], k: int = 10, *, face: int | None = None,
                     include_self: bool = False, on_error=None, **_options) -> Iterator[QueryResult]:
        """One result per query photo: its face ``face`` (0: the largest) against the index's faces."""
        for p in paths:
            yield self.search(p, k, face, include_self)

    def search(self, path: str, k: int = 10, face: int | None = None, include_self: bool = False) -> QueryResult:
        res = QueryResult(query=path, metric=self._metric.name)
        try:
            img, faces = self.faces_of(path)
        except RetrieveError as e:
            res.error = getattr(e, "reason", None) or str(e)
            return res
        res.faces_in_query = len(faces)
        if not faces:
            res.error = "no face found"
            return res
        n = 0 if face is None else face
        if n >= len(faces):
            res.error = (f"--face {n}: the photo has {len(faces)} face{'s' if len(faces) != 1 else ''} "
                         f"(--face 0 to {len(faces) - 1}, 0 the largest)")
            return res
        f = faces[n]
        res.face, res.box, res.query_face, res.query_image = n, f.box, f, img
        q = self.backbone.embed_images([Image.fromarray(f.chip)])[0]
        res.embedding = q
        res.results = self.nearest(q, k, exclude=None if include_self else (str(path), f.box))
        return res

    def nearest(self, q: np.ndarray, k: int, exclude: tuple | None = None) -> list[Hit]:
        """The ``k`` faces nearest the raw descriptor ``q`` (``exclude``: the query's own (path, box))."""
        n = self.store.count()
        if n == 0:
            return []
        index = self.store.faiss_index()
        qx = self.store.transform(q[None])
        raw, ids = index.search(np.ascontiguousarray(qx, np.float32), min(n, k + 8))
        ids = [int(i) for i in ids[0] if i >= 0]
        rows = self.store.face_rows(ids)
        qpath = os.path.realpath(exclude[0]) if exclude else None
        hits = []
        for i in ids:
            r = rows.get(i)
            if r is None:
                continue
            box = parse_box(r.box) if r.box else (0, 0, 0, 0)
            if exclude and os.path.realpath(r.path) == qpath and _iou(box, exclude[1]) > 0.5:
                continue  # the query face itself
            v = self.store.transform(np.frombuffer(r.vector, np.float32)[None])[0]
            score, distance = self._metric.score(self._metric.raw(v[None], qx[0])[0])
            hits.append(Hit(0, i, r.path, float(score), distance=distance, face=int(r.face or 0), box=box))
        hits.sort(key=lambda h: -h.score)
        hits = hits[:k]
        for j, h in enumerate(hits):
            h.rank = j + 1
        return hits


def _iou(a, b) -> float:
    x0, y0, x1, y1 = max(a[0], b[0]), max(a[1], b[1]), min(a[2], b[2]), min(a[3], b[3])
    inter = max(0, x1 - x0) * max(0, y1 - y0)
    ua = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / ua if ua > 0 else 0.0
