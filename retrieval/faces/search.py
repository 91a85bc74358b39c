"""Search a faces index (``--preset faces``) by face: each face of the query photo is a query.

The query's faces are found as indexing found them (the index's detector), ``face`` picks one (0 = the
largest, the default); results name the photo and the face box, and carry the Euclidean distance between
the two 128-d descriptors with dlib's verdict: the same person below 0.6.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from retrieval.errors import RetrieveError
from retrieval.faces.detect import Face, FaceFinder
from retrieval.images import load_image


def verdict(distance: float, threshold: float) -> str:
    """dlib's rule in words: "same person (distance 0.41 < 0.6)" or "different people (distance 0.72 ≥ 0.6)"."""
    if distance < threshold:
        return f"same person (distance {distance:.2f} < {threshold:g})"
    return f"different people (distance {distance:.2f} ≥ {threshold:g})"


@dataclass
class FaceHit:
    rank: int
    id: int
    path: str
    face: int
    box: tuple[int, int, int, int]
    distance: float  # Euclidean, between descriptors
    same: bool
    verdict: str

    def to_dict(self) -> dict:
        return {"rank": self.rank, "id": self.id, "path": self.path, "face": self.face, "box": list(self.box),
                "distance": round(self.distance, 6), "same_person": self.same, "verdict": self.verdict}


@dataclass
class FaceQuery:
    query: str
    face: int | None = None
    box: tuple | None = None
    faces_in_query: int = 0
    threshold: float = 0.6
    results: list[FaceHit] = field(default_factory=list)
    error: str | None = None
    query_face: Face | None = field(default=None, repr=False)
    query_image: Image.Image | None = field(default=None, repr=False)
    vector: np.ndarray | None = field(default=None, repr=False)

    def to_dict(self) -> dict:
        d = {"query": self.query, "face": self.face, "box": list(self.box) if self.box else None,
             "faces_in_query": self.faces_in_query, "metric": "l2", "threshold": self.threshold,
             "results": [h.to_dict() for h in self.results]}
        if self.error:
            d["error"] = self.error
        return d


def parse_box(text: str) -> tuple[int, int, int, int]:
    return tuple(int(v) for v in text.split(","))  # type: ignore[return-value]


class FaceSearcher:
    """Queries a faces index with the faces of photos."""

    def __init__(self, store, backbone):
        if store.settings.preset != "faces":
            raise RetrieveError(f"{store.directory} is not a faces index (it was built without --preset faces)")
        self.store = store
        self.backbone = backbone
        cfg = store.settings.faces or {}
        self.threshold = float(cfg.get("threshold", 0.6))
        self.finder = FaceFinder(cfg.get("detector", "hog"), int(cfg.get("upsample", 1)))

    def faces_of(self, path: str) -> tuple[Image.Image, list[Face]]:
        img = load_image(path)
        return img, self.finder.faces(np.asarray(img.convert("RGB")))

    def search(self, path: str, k: int = 10, face: int | None = None, include_self: bool = False) -> FaceQuery:
        res = FaceQuery(query=path, threshold=self.threshold)
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
        res.vector = q
        res.results = self.nearest(q, k, exclude=None if include_self else (str(path), f.box))
        return res

    def nearest(self, q: np.ndarray, k: int, exclude: tuple | None = None) -> list[FaceHit]:
        index = self.store.faiss_index()
        n = self.store.count()
        if n == 0:
            return []
        want = min(n, k + 8)
        dist, ids = index.search(np.ascontiguousarray(q[None], np.float32), want)
        ids = [int(i) for i in ids[0] if i >= 0]
        rows = self.store.face_rows(ids)
        hits = []
        import os

        qpath = os.path.realpath(exclude[0]) if exclude else None
        for i in ids:
            r = rows.get(i)
            if r is None:
                continue
            box = parse_box(r.box) if r.box else (0, 0, 0, 0)
            if exclude and os.path.realpath(r.path) == qpath and _iou(box, exclude[1]) > 0.5:
                continue  # the query face itself
            d = float(np.linalg.norm(np.frombuffer(r.vector, np.float32).astype(np.float64) - q))
            hits.append(FaceHit(0, i, r.path, int(r.face or 0), box, d, d < self.threshold,
                                verdict(d, self.threshold)))
        hits.sort(key=lambda h: h.distance)
        hits = hits[:k]
        for j, h in enumerate(hits):
            h.rank = j + 1
        return hits


def _iou(a, b) -> float:
    x0, y0, x1, y1 = max(a[0], b[0]), max(a[1], b[1]), min(a[2], b[2]), min(a[3], b[3])
    inter = max(0, x1 - x0) * max(0, y1 - y0)
    ua = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / ua if ua > 0 else 0.0
