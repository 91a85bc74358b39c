"""One verdict in words for a pair, the same on every surface (``retrieve search``, the reports, ``retrieve explain``,
the web app): what geometric verification or the face test says, else where the pair's score stands in *this*
collection (retrieval/index/calibration.py: the scores of random pairs and of nearest-neighbour pairs, sampled when
the index is built or updated).

The words are a ladder in the score: for one collection, a higher score never reads weaker. A pair is a *match* --
"a close match", "the same object", "the same person", and a title "Why B matches A" -- only when something says
so: verification confirmed it, the face test passed, or its score is above 99 % of random pairs *and* above the
collection's nearest-neighbour band (closer than ``MATCH_NN`` % of its nearest-neighbour pairs: every photo has a
nearest neighbour, so being one says little). Verification that ran and did not confirm never reads as a match.

In a collection of fewer than 201 photos the random-pair bar cannot be passed by all of its nearest-neighbour pairs
(at most n of its n(n−1)/2 pairs are nearest neighbours, 200/(n−1) %): there a score alone never says "match"; the
closest pairs read "among the closest pairs here", and the collection says once, in :func:`collection_note`, that it
is too small for a score alone to show a match.
"""
from __future__ import annotations

from dataclasses import dataclass, field

MATCH_RANDOM = 99.0  # % of random pairs a match must beat
MATCH_NN = 75.0  # and the % of the collection's nearest-neighbour pairs (above the middle half of their scores)
TYPICAL_NN = 25.0  # from here on a score is typical of a nearest neighbour
SIMILAR_RANDOM = 90.0  # % of random pairs a "somewhat similar" pair beats
SMALL = 201  # fewer photos than this: a score alone cannot show a match (see the module docstring)

# The headlines, strongest first (the ladder; tests pin it)
CLOSE, CLOSEST_HERE, TYPICAL, SOMEWHAT, NOT_CLOSE = ("a close match", "among the closest pairs here",
                                                    "as close as a typical nearest neighbour here", "somewhat similar",
                                                    "not a close match")
SAME_OBJECT, NOT_CONFIRMED = "the same object", "not confirmed as the same object"
SAME_PERSON, NOT_SAME_PERSON = "the same person", "not the same person"
NO_COLLECTION = "no collection to compare with"


@dataclass
class Verdict:
    match: bool  # something says these two match (see the module docstring)
    headline: str  # one of the ladder's words
    text: str  # one sentence for people
    data: dict = field(default_factory=dict)  # the numbers, for JSON

    def title(self, a: str, b: str) -> str:
        """``Why B matches A`` when something says they match, else the neutral ``A and B: …``."""
        return f"Why {b} matches {a}" if self.match else f"{a} and {b}: {self.headline}"

    def to_dict(self) -> dict:
        return {"match": self.match, "headline": self.headline, "text": self.text, **self.data}


def small(calibration) -> bool:
    return calibration is not None and calibration.images < SMALL


def collection_note(calibration) -> str | None:
    """What to say once about a collection too small for a score alone to show a match (None otherwise)."""
    if calibration is None:
        return None
    if small(calibration):
        return (f"{calibration.images} photos are too few for a score alone to show a match: verification, or a larger "
                "collection, can")
    return None


def _pct(p: float) -> str:
    if p >= 99.95:
        return "over 99.9 %"
    if p <= 0.05:
        return "none"
    return f"{p:.1f} %"


def _nn_words(p: float) -> str:
    """How a score compares with the collection's nearest-neighbour scores (p = its percentile among them)."""
    if p >= 90:
        return "closer than 90 % of nearest-neighbour pairs here"
    if p >= MATCH_NN:
        return f"closer than {p:.0f} % of nearest-neighbour pairs here"
    if p >= TYPICAL_NN:
        return "typical of a nearest neighbour here"
    if p <= 0.05:
        return "weaker than every nearest-neighbour pair sampled here"
    return f"weaker than {100 - p:.0f} % of nearest-neighbour pairs here"


def verdict(score: float, calibration=None, verification=None, same_person: bool | None = None) -> Verdict:
    """The verdict for one pair scored ``score`` (the score that ranks it) in a collection.

    ``calibration``: :class:`retrieval.index.calibration.Calibration` or None; ``verification``: a
    :class:`retrieval.match.verify.Verification` (inliers, confirmed) or None; ``same_person``: the faces preset's
    test on this score (True/False), None for other presets."""
    data: dict = {}
    parts = []
    if same_person is not None:  # faces: the preset's test on the score decides
        data["same_person"] = bool(same_person)
        headline = SAME_PERSON if same_person else NOT_SAME_PERSON
        return Verdict(bool(same_person), headline, headline[0].upper() + headline[1:] + ".", data)
    if calibration is not None:
        w = calibration.where(score)
        data.update({k: round(v, 2) if isinstance(v, float) else v for k, v in w.items()})
        rand, nn = w["random_percentile"], w["nn_percentile"]
        parts.append(f"closer than {_pct(rand)} of random pairs in this collection; {_nn_words(nn)}")
        if nn >= MATCH_NN and (small(calibration) or rand >= MATCH_RANDOM):
            headline = CLOSEST_HERE if small(calibration) else CLOSE
        elif nn >= TYPICAL_NN:
            headline = TYPICAL
        elif rand >= SIMILAR_RANDOM:
            headline = SOMEWHAT
        else:
            headline = NOT_CLOSE
    else:
        parts.append("no collection to compare the score with (give --index to see where it stands)")
        headline = NO_COLLECTION
    match = headline == CLOSE
    if verification is not None:  # geometric verification, where it ran, decides
        data["inliers"] = int(verification.inliers)
        data["confirmed"] = bool(verification.confirmed)
        if verification.confirmed:
            parts.append(f"same object confirmed ({verification.inliers} matching points agree on one geometry)")
            headline, match = SAME_OBJECT, True
        else:
            from retrieval.match.verify import MIN_INLIERS

            parts.append(f"same object not confirmed ({verification.inliers} matching points agree on one "
                         f"geometry; {MIN_INLIERS} needed)")
            headline, match = NOT_CONFIRMED, False
    text = "; ".join(parts)
    return Verdict(match, headline, text[0].upper() + text[1:] + ".", data)
