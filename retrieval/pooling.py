"""How a feature map ``A`` (N×C×h×w) becomes the embedding, and how the embedding splits over space.

- ``gap``: global average pooling, ``e_c = mean_s A_cs`` (the default; what SFAM's paper assumes).
- ``gem[:p]``: generalised mean (Radenović et al., TPAMI 2019), ``e_c = (mean_s A_cs^p)^(1/p)``; p = 3 by
  default. It weights strong, localised activations more than the average does, which helps when the
  object fills a small part of the photo (instance retrieval in clutter).

SFAM needs, for every channel, a spatial map whose average is that channel's pooled value, so that the
explanation map ``Σ_c CIS_c · M_c`` averages to ``Σ_c CIS_c · e_c`` whatever the pooling.
:meth:`Pooling.contributions` gives it: for GAP it is ``A`` itself; for GeM it is
``M_cs = e_c · A_cs^p / mean_s A_cs^p`` — each location's share of the p-th power mean, which reduces to
``A`` at p = 1 — so the decomposition stays exact with a non-linear pooling.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .errors import RetrieveError

GEM_EPS = 1e-6  # GeM is defined on non-negative maps; clamp so that p-th roots and shares are finite


@dataclass(frozen=True)
class Pooling:
    kind: str = "gap"
    p: float = 1.0

    def __str__(self) -> str:
        return "gap" if self.kind == "gap" else f"gem:{self.p:g}"

    def pool(self, a: torch.Tensor) -> torch.Tensor:
        """N×C×h×w → N×C."""
        if self.kind == "gap":
            return a.mean(dim=(2, 3))
        return a.clamp_min(GEM_EPS).pow(self.p).mean(dim=(2, 3)).pow(1.0 / self.p)

    def contributions(self, a: torch.Tensor) -> torch.Tensor:
        """N×C×h×w maps whose spatial mean is exactly :meth:`pool` (see the module docstring)."""
        if self.kind == "gap":
            return a
        ap = a.clamp_min(GEM_EPS).pow(self.p)
        share = ap / ap.mean(dim=(2, 3), keepdim=True)
        return share * self.pool(a)[..., None, None]


GAP = Pooling()


def parse_pooling(spec: str | None) -> Pooling:
    """``"gap"``, ``"gem"`` (p = 3) or ``"gem:P"``."""
    if spec in (None, "", "gap", "avg", "mean"):
        return GAP
    kind, _, p = str(spec).partition(":")
    if kind != "gem":
        raise RetrieveError(f"unknown pooling {spec!r} (gap, gem or gem:P)")
    try:
        pv = float(p) if p else 3.0
    except ValueError:
        raise RetrieveError(f"pooling {spec!r}: P must be a number") from None
    if not 1.0 <= pv <= 16.0:
        raise RetrieveError(f"pooling {spec!r}: P must lie between 1 and 16")
    return GAP if pv == 1.0 else Pooling("gem", pv)
