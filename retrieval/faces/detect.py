"""Faces in a photo: detect (dlib HOG, or dlib's CNN detector), align on the 5 landmarks, embed.

Each :class:`Face` carries its box in the photo's own pixels, the 150×150 aligned chip (exactly what dlib's
``get_face_chip`` gives, padding 0.25 as ``compute_face_descriptor`` uses) and the similarity transform
from chip pixels to photo pixels, so that anything drawn on the chip (an SFAM map) can be put back onto the
photo. The descriptor comes from the PyTorch port (retrieval/faces/network.py), equal to dlib's own.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from retrieval.faces.network import CHIP_PADDING, CHIP_SIZE, model_file, need_dlib

DETECTORS = ("hog", "cnn")
MAX_SIDE = 1600  # larger photos are searched for faces at this long side
SMALL_SIDE = 320  # smaller photos are upsampled once more for detection


@dataclass
class Face:
    index: int  # in the photo, largest first
    box: tuple[int, int, int, int]  # x0, y0, x1, y1 (exclusive) in the photo's own pixels, clipped to it
    landmarks: np.ndarray  # 5×2 (x, y) in photo pixels
    chip: np.ndarray = field(repr=False)  # 150×150×3 uint8 RGB, aligned
    to_photo: np.ndarray = field(repr=False)  # 2×3: chip (x, y, 1) → photo (x, y)
    score: float = 0.0  # the detector's confidence

    @property
    def area(self) -> int:
        return (self.box[2] - self.box[0]) * (self.box[3] - self.box[1])

    def box_text(self) -> str:
        return "{},{},{},{}".format(*self.box)


def chip_to_photo(rect, angle: float, rows: int, cols: int) -> np.ndarray:
    """The 2×3 similarity transform of dlib's chip extraction: chip pixel (x, y) → photo pixel.

    dlib maps the chip's corners (0, 0), (cols−1, 0), (cols−1, rows−1) onto the corners of ``rect`` rotated
    by ``angle`` about its centre (extract_image_chip's get_mapping_to_chip)."""
    l, t, r, b = rect.left(), rect.top(), rect.right(), rect.bottom()
    c = np.array([(l + r) / 2.0, (t + b) / 2.0])
    rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    src = np.array([[0.0, 0.0], [cols - 1.0, 0.0], [cols - 1.0, rows - 1.0]])
    dst = np.array([c + rot @ (np.array(p) - c) for p in ((l, t), (r, t), (r, b))])
    # least squares for the affine (exact for three points)
    a = np.hstack([src, np.ones((3, 1))])
    return np.linalg.solve(a, dst).T


def invert(m: np.ndarray) -> np.ndarray:
    """The inverse of a 2×3 affine transform."""
    full = np.vstack([m, [0.0, 0.0, 1.0]])
    return np.linalg.inv(full)[:2]


class FaceFinder:
    """dlib's detector + 5-point predictor; loaded once, reused for every photo."""

    def __init__(self, detector: str = "hog", upsample: int = 1):
        if detector not in DETECTORS:
            from retrieval.errors import RetrieveError

            raise RetrieveError(f"unknown face detector {detector!r} ({' or '.join(DETECTORS)})")
        dlib = need_dlib()
        self.dlib = dlib
        self.detector_name = detector
        self.upsample = int(upsample)
        self._cnn = None
        if detector == "cnn":
            self._cnn = dlib.cnn_face_detection_model_v1(str(model_file("cnn")))
        else:
            self._hog = dlib.get_frontal_face_detector()
        self._sp = dlib.shape_predictor(str(model_file("landmarks5")))

    def _detect(self, rgb: np.ndarray) -> list[tuple[object, float]]:
        # small photos (a passport-style 92×112 face) get one more pyramid step: dlib's detectors find faces
        # from about 80 px (HOG) / 50 px (CNN) up, and upsampling such a photo costs little
        up = self.upsample + (1 if max(rgb.shape[:2]) < SMALL_SIDE else 0)
        if self.detector_name == "cnn":
            return [(d.rect, float(d.confidence)) for d in self._cnn(rgb, up)]
        rects, scores, _ = self._hog.run(rgb, up, 0.0)
        if not len(rects) and max(rgb.shape[:2]) < SMALL_SIDE:
            # a small photo in which HOG finds nothing (a turned or tilted face) is tried with the CNN detector:
            # cheap at this size (ORL: 8 of 400 photos, all found this way)
            if self._cnn is None:
                self._cnn = self.dlib.cnn_face_detection_model_v1(str(model_file("cnn")))
            return [(d.rect, float(d.confidence)) for d in self._cnn(rgb, up)]
        return list(zip(rects, (float(s) for s in scores)))

    def faces(self, rgb: np.ndarray, max_side: int = MAX_SIDE) -> list[Face]:
        """Every face in an H×W×3 uint8 RGB photo, largest first (the index is that order). A photo larger
        than ``max_side`` is searched at that size; boxes, landmarks and transforms are in its own pixels."""
        rgb = np.ascontiguousarray(rgb, dtype=np.uint8)
        h, w = rgb.shape[:2]
        s = min(1.0, max_side / max(h, w))
        if s < 1.0:
            import cv2

            work = cv2.resize(rgb, (max(1, round(w * s)), max(1, round(h * s))), interpolation=cv2.INTER_AREA)
            found = self._faces(work)
            up = np.diag([1 / s, 1 / s, 1.0])
            for f in found:
                f.box = (int(f.box[0] / s), int(f.box[1] / s), min(w, int(np.ceil(f.box[2] / s))),
                         min(h, int(np.ceil(f.box[3] / s))))
                f.landmarks = f.landmarks / s
                f.to_photo = (up @ np.vstack([f.to_photo, [0, 0, 1.0]]))[:2]
            return found
        return self._faces(rgb)

    def _faces(self, rgb: np.ndarray) -> list[Face]:
        h, w = rgb.shape[:2]
        found = []
        for rect, score in self._detect(rgb):
            shape = self._sp(rgb, rect)
            details = self.dlib.get_face_chip_details(shape, size=CHIP_SIZE, padding=CHIP_PADDING)
            chip = np.asarray(self.dlib.extract_image_chip(rgb, details))
            box = (max(0, rect.left()), max(0, rect.top()), min(w, rect.right() + 1), min(h, rect.bottom() + 1))
            if box[2] <= box[0] or box[3] <= box[1]:
                continue
            marks = np.array([[shape.part(i).x, shape.part(i).y] for i in range(shape.num_parts)], np.float64)
            m = chip_to_photo(details.rect, details.angle, details.rows, details.cols)
            found.append(Face(0, box, marks, chip, m, score))
        found.sort(key=lambda f: -f.area)
        for i, f in enumerate(found):
            f.index = i
        return found


def warp_to_photo(chip_map: np.ndarray, to_photo: np.ndarray, photo_hw: tuple[int, int]) -> np.ndarray:
    """A map over the chip (any resolution; it covers the chip) put onto the photo's pixels through the
    alignment transform; 0 outside the chip's footprint."""
    import cv2

    ch, cw = chip_map.shape
    sx, sy = (CHIP_SIZE - 1) / max(cw - 1, 1), (CHIP_SIZE - 1) / max(ch - 1, 1)
    scale = np.array([[sx, 0, 0], [0, sy, 0], [0, 0, 1.0]])  # map pixel → chip pixel
    m = np.vstack([to_photo, [0, 0, 1.0]]) @ scale
    return cv2.warpAffine(chip_map.astype(np.float32), m[:2], (photo_hw[1], photo_hw[0]), flags=cv2.INTER_LINEAR,
                          borderMode=cv2.BORDER_CONSTANT, borderValue=0.0)
