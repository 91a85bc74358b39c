"""A verdict in words: where a pair's score stands in *this* collection, and what verification says.

The numbers come from :mod:`retrieval.index.calibration` (score quantiles of random pairs and of nearest-neighbour
pairs, sampled when the index is built or updated). A pair is called a *match* only when something says
so: geometric verification confirmed it, or its score is both above ``MATCH_RANDOM`` % of random pairs
and at or above the ``MATCH_NN``-th percentile of nearest-neighbour scores. Otherwise the title stays
neutral ("A and B: …").
"""
from __future__ import annotations

from dataclasses import dataclass, field

MATCH_RANDOM = 99.0  # % of random pairs a match must beat
MATCH_NN = 5.0  # and the percentile of nearest-neighbour scores it must reach


def nearest_share(images: int) -> float:
    """The share (in %) of a collection's pairs that can be nearest-neighbour pairs: each of ``images`` photos has
    one nearest, so at most ``images`` of its images·(images − 1)/2 pairs, 200 / (images − 1) %. Below 201 photos
    this is more than the 1 % that ``MATCH_RANDOM`` leaves: the bar cannot be passed by all of them, and a
    near-duplicate that is not the very closest pair of a small collection stays under it (in the 11 sample photos,
    a cropped mirror image at cosine 0.90 is the second-closest of 55 pairs: 98.2 %)."""
    return 200.0 / max(images - 1, 1)


@dataclass
class Verdict:
    match: bool  # something says these two match (see the module doc)
    headline: str  # e.g. "a close match"
    text: str  # one sentence for people
    data: dict = field(default_factory=dict)  # the numbers, for JSON

    def title(self, a: str, b: str) -> str:
        """``Why B matches A`` when something says they match, else the neutral ``A and B: …``."""
        return f"Why {b} matches {a}" if self.match else f"{a} and {b}: {self.headline}"

    def to_dict(self) -> dict:
        return {"match": self.match, "headline": self.headline, "text": self.text, **self.data}


def _pct(p: float) -> str:
    if p >= 99.95:
        return "over 99.9 %"
    if p <= 0.05:
        return "none"
    return f"{p:.1f} %"


def nn_words(p: float) -> str:
    """How a score compares with the collection's nearest-neighbour scores (p = its percentile among them)."""
    if p >= 90:
        return "closer than 90 % of nearest-neighbour pairs here"
    if p >= 25:
        return "typical of a nearest neighbour here"
    if p >= MATCH_NN:
        return "at the low end of nearest-neighbour scores here"
    if p <= 0.05:
        return "weaker than every nearest-neighbour pair sampled here"
    return f"weaker than {100 - p:.0f} % of nearest-neighbour pairs here"


def make_verdict(score: float, calibration=None, verification=None) -> Verdict:
    """The verdict for one pair scored ``score`` (the search's score) in a collection (``calibration``:
    :class:`retrieval.index.calibration.Calibration` or None); ``verification``: a Verification or None."""
    data: dict = {}
    parts = []
    match = False
    if calibration is not None:
        w = calibration.where(score)
        data.update({k: round(v, 2) if isinstance(v, float) else v for k, v in w.items()})
        parts.append(f"closer than {_pct(w['random_percentile'])} of random pairs in this collection; "
                     f"{nn_words(w['nn_percentile'])}")
        match = bool(w["random_percentile"] >= MATCH_RANDOM and w["nn_percentile"] >= MATCH_NN)
    else:
        parts.append("no collection to compare the score with (give --index to see where it stands)")
    if verification is not None:
        data["inliers"] = int(verification.inliers)
        data["confirmed"] = bool(verification.confirmed)
        if verification.confirmed:
            parts.append(f"same object confirmed ({verification.inliers} matching points agree on one geometry)")
            match = True
        else:
            parts.append(f"same object not confirmed ({verification.inliers} matching points agree on one "
                         "geometry; 10 needed)")
    # the share of random pairs the closest ``images`` of them beat: under MATCH_RANDOM in a small collection
    closest = 100 - nearest_share(calibration.images) if calibration is not None else 100.0
    if verification is not None and verification.confirmed:
        headline = "the same object"
    elif calibration is None:
        headline = "no collection to compare with"
    elif match:
        headline = "a close match"
    elif data.get("nn_percentile", 0) >= MATCH_NN and closest < MATCH_RANDOM and data["random_percentile"] >= closest:
        # among the closest pairs of a collection too small for the bar: say so, instead of "somewhat similar"
        headline = "among the closest pairs of a small collection"
        parts.append(f"{calibration.images} photos are too few for a score alone to show a match")
    elif data.get("random_percentile", 0) >= 90:
        headline = "somewhat similar"
    else:
        headline = "not a close match"
    text = "; ".join(parts)
    return Verdict(match, headline, text[0].upper() + text[1:] + ".", data)
