"""How a feature map ``A`` (N×C×h×w) becomes the embedding, and how the embedding splits over space.

- ``gap``: global average pooling, ``e_c = mean_s A_cs`` (the default; what SFAM's paper assumes).
- ``gem[:p]``: generalised mean (Radenović et al., TPAMI 2019), ``e_c = (mean_s A_cs^p)^(1/p)``; p = 3 by
  default. It weights strong, localised activations more than the average does, which helps when the
  object fills a small part of the photo (instance retrieval in clutter).
- ``rmac``: regional maximum activations (Tolias et al., ICLR 2016): square regions at 3 scales (about
  40 % overlap), each max-pooled and L2-normalised, summed: ``e = Σ_R r_R / ‖r_R‖``.

SFAM needs, for every channel, a spatial map whose average is that channel's pooled value, so that the
explanation map ``Σ_c CIS_c · M_c`` averages to ``Σ_c CIS_c · e_c`` whatever the pooling.
:meth:`Pooling.contributions` gives it: for GAP it is ``A`` itself; for GeM it is
``M_cs = e_c · A_cs^p / mean_s A_cs^p`` — each location's share of the p-th power mean, which reduces to
``A`` at p = 1 — so the decomposition stays exact with a non-linear pooling. For R-MAC each region gives
its channel's value to the location of its maximum, weighted by ``1/‖r_R‖``, so again the map's mean is
``e``.
"""
from __future__ import annotations

from dataclasses import dataclass

from retrieval.errors import RetrieveError

GEM_EPS = 1e-6  # GeM is defined on non-negative maps; clamp so that p-th roots and shares are finite


@dataclass(frozen=True)
class Pooling:
    """GAP and GeM on numpy arrays and torch tensors alike (one formula: the torch-free search path and the
    explanations pool the same way); R-MAC through torch."""

    kind: str = "gap"
    p: float = 1.0

    def __str__(self) -> str:
        return self.kind if self.kind in ("gap", "rmac") else f"gem:{self.p:g}"

    def pool(self, a):
        """N×C×h×w → N×C, in ``a``'s kind of array and dtype."""
        if self.kind == "gap":
            return a.mean(axis=(2, 3))
        if self.kind == "rmac":
            return _rmac(a)
        return (a.clip(min=GEM_EPS) ** self.p).mean(axis=(2, 3)) ** (1.0 / self.p)

    def contributions(self, a):
        """N×C×h×w maps whose spatial mean is exactly :meth:`pool` (see the module docstring)."""
        if self.kind == "gap":
            return a
        if self.kind == "rmac":
            return _rmac_contributions(a)
        ap = a.clip(min=GEM_EPS) ** self.p
        share = ap / ap.mean(axis=(2, 3), keepdims=True)
        return share * self.pool(a)[..., None, None]


def _torch(a):
    import torch

    return torch.as_tensor(a)


def _rmac(a):
    out = 0
    t = _torch(a)
    for y, x, s in rmac_regions(*t.shape[-2:]):
        r = t[:, :, y:y + s, x:x + s].amax(dim=(2, 3))
        out = out + r / r.norm(dim=1, keepdim=True).clamp_min(1e-12)
    return out if t is a else out.numpy()


def _rmac_contributions(a):
    import torch

    t = _torch(a)
    n, c, h, w = t.shape
    out = torch.zeros(n, c, h * w, dtype=t.dtype, device=t.device)
    for y, x, s in rmac_regions(h, w):
        reg = t[:, :, y:y + s, x:x + s].reshape(n, c, s * s)
        val, arg = reg.max(dim=2)
        weight = val / val.norm(dim=1, keepdim=True).clamp_min(1e-12)
        flat = (y + arg // s) * w + (x + arg % s)  # the maximum's location in the whole map
        out.scatter_add_(2, flat.unsqueeze(2), weight.unsqueeze(2))
    out = (out * (h * w)).reshape(n, c, h, w)
    return out if t is a else out.numpy()


GAP = Pooling()


def rmac_regions(h: int, w: int, levels: int = 3) -> list[tuple[int, int, int]]:
    """(y, x, side) of R-MAC's square regions on an h×w map: side 2·min(h, w)/(l + 1) at level l,
    placed uniformly with about 40 % overlap."""
    out = []
    for lv in range(1, levels + 1):
        s = max(1, int(2 * min(h, w) / (lv + 1)))
        s = min(s, h, w)

        def starts(d: int) -> list[int]:
            k = max(1, round((d - s) / (0.6 * s)) + 1)
            return sorted({round(i * (d - s) / max(k - 1, 1)) for i in range(k)})

        out += [(y, x, s) for y in starts(h) for x in starts(w)]
    return list(dict.fromkeys(out))


def parse_pooling(spec: str | None) -> Pooling:
    """``"gap"``, ``"gem"`` (p = 3), ``"gem:P"`` or ``"rmac"``."""
    if spec in (None, "", "gap", "avg", "mean"):
        return GAP
    if spec == "rmac":
        return Pooling("rmac")
    kind, _, p = str(spec).partition(":")
    if kind != "gem":
        raise RetrieveError(f"unknown pooling {spec!r} (gap, gem, gem:P or rmac)")
    try:
        pv = float(p) if p else 3.0
    except ValueError:
        raise RetrieveError(f"pooling {spec!r}: P must be a number") from None
    if not 1.0 <= pv <= 16.0:
        raise RetrieveError(f"pooling {spec!r}: P must lie between 1 and 16")
    return GAP if pv == 1.0 else Pooling("gem", pv)
