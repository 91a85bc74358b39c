"""How an image becomes the network's input, without torch: :class:`Preprocess` and the small helpers the
torch-free path (the cached ONNX graphs, retrieval/models/graphs.py) shares with retrieval/models/backbone.py."""
from __future__ import annotations

import hashlib
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

from retrieval.errors import RetrieveError

STRIDE = 32  # the networks' total stride: aspect-kept inputs have sides that are multiples of it
COMMON_ASPECTS = ((1, 1), (4, 3), (3, 2), (16, 9))  # long : short of most photos (phones, cameras; either way round)
_RESAMPLE = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC, "nearest": Image.NEAREST, "lanczos": Image.LANCZOS}


@dataclass(frozen=True)
class Preprocess:
    """How an image becomes the network's input; travels with the weights and is recorded in the index.

    ``resize="squash"`` maps the whole image onto a ``size``×``size`` square (nothing is cropped away, so
    every pixel of the photo can be explained and a map is resized back to the photo's own size exactly).
    ``resize="long"`` keeps the aspect ratio: the long side becomes ``size`` and the short side the nearest
    multiple of 32 (the network's stride), so a 4:3 photo at 448 is seen at 448×320 rather than squashed.
    Nothing is cropped either way. Images of different shapes are batched separately (:func:`group_by_shape`).
    """

    size: int = 224
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    interpolation: str = "bilinear"
    resize: str = "squash"

    def __post_init__(self) -> None:
        if self.interpolation not in _RESAMPLE:
            raise RetrieveError(f"unknown interpolation {self.interpolation!r}")
        if self.resize not in ("squash", "long"):
            raise RetrieveError(f"unknown resize policy {self.resize!r} (squash or long)")
        if self.size < 32:
            raise RetrieveError(f"input size {self.size} is too small (at least 32)")

    @property
    def input_shape(self) -> tuple[int, int]:
        return (self.size, self.size)

    def common_shapes(self) -> list[tuple[int, int]]:
        """The input (h, w) of photos at the common camera aspect ratios (``COMMON_ASPECTS``, either way round):
        the square alone when squashing; with ``resize="long"`` 7 of the 27 shapes at 448 px. The graphs made
        ahead for indexing without torch (retrieval/models/prepare.py) serve these; another shape is checked by the
        full backbone when first met."""
        out: list[tuple[int, int]] = []
        for long, short in COMMON_ASPECTS:  # e.g. 4000 × 3000: exact sides, as a camera's
            for hw in (self.shape_for(1000 * long, 1000 * short), self.shape_for(1000 * short, 1000 * long)):
                if hw not in out:
                    out.append(hw)
        return out

    def every_shape(self) -> list[tuple[int, int]]:
        """Every input (h, w) :meth:`shape_for` gives: the square alone when squashing; with ``resize="long"`` the
        long side at ``size`` and the short one at each multiple of the stride up to it (27 shapes at 448 px)."""
        if self.resize == "squash":
            return [(self.size, self.size)]
        shorts = sorted({*range(STRIDE, self.size + 1, STRIDE), self.size})
        out = [(self.size, s) for s in shorts] + [(s, self.size) for s in shorts if s != self.size]
        common = self.common_shapes()
        return common + [hw for hw in out if hw not in common]

    def shape_for(self, width: int, height: int) -> tuple[int, int]:
        """The network input (h, w) for an image of ``width``×``height`` pixels."""
        if self.resize == "squash" or width == height:
            return (self.size, self.size)
        short = min(width, height) * self.size / max(width, height)
        short = int(min(self.size, max(STRIDE, STRIDE * round(short / STRIDE))))
        return (self.size, short) if height > width else (short, self.size)

    def array(self, img: Image.Image) -> np.ndarray:
        """One RGB image → normalised float32 array (3×h×w; h = w = size when squashing)."""
        h, w = self.shape_for(*img.size)
        a = np.asarray(img.resize((w, h), _RESAMPLE[self.interpolation]))
        # channel by channel into the 3×h×w result, in place: the same float32 operations in the same order as
        # ((a / 255) − mean) / std over h×w×3 and a transposed copy (bit-identical), ~10× faster (0.7 vs 8 ms
        # at 448 px here), which is most of what preprocessing cost beside the forward passes
        x = np.empty((3, h, w), np.float32)
        scale = np.float32(1.0 / 255.0)
        for c in range(3):
            np.multiply(a[:, :, c], scale, out=x[c], dtype=np.float32)
            x[c] -= np.float32(self.mean[c])
            x[c] /= np.float32(self.std[c])
        return x

    def batch(self, images: Sequence[Image.Image]):
        """A list of RGB images of one input shape → N×3×h×w tensor."""
        import torch

        return torch.from_numpy(np.stack([self.array(im) for im in images]))

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict) -> "Preprocess":
        d = dict(d)
        for k in ("mean", "std"):
            if k in d:
                d[k] = tuple(d[k])
        return cls(**d)

    def replace(self, **changes) -> "Preprocess":
        return Preprocess.from_dict({**self.to_dict(), **changes})


def group_by_shape(arrays: Sequence[np.ndarray]) -> list[list[int]]:
    """Indices of ``arrays`` grouped by shape, each group in order (one batch per input shape)."""
    groups: dict[tuple, list[int]] = {}
    for i, a in enumerate(arrays):
        groups.setdefault(tuple(a.shape), []).append(i)
    return list(groups.values())


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "retrieve"
