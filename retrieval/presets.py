"""What an index is built for (``retrieve index --preset``): one object per preset, which the indexer, search,
explanations and the web app ask instead of comparing names.

A preset says how a photo becomes rows (the whole photo, or each face in it), which backbone, input, pooling and
linear head a new index gets, which metric ranks, what its searches verify by default, and which searcher answers
its queries. Every option of a new index can still be given on its own (``--input-size``, ``--pooling``, …);
what an index was built with is recorded in its settings, and :func:`preset_of` gives the preset object for an
index's settings (an index made without ``--preset`` behaves as ``general`` with its own recorded options).

Chosen by measurement (docs/presets.md, bench/results/quality.md): ``general`` is the best of the cheap settings on
faces and categories; ``instance`` finds the same object photographed elsewhere (448 px aspect kept, GeM, PCA
whitening; its searches verify the global top 8 and the visual words' top 25 by geometric verification); ``faces``
detects every face, aligns it and embeds it with dlib's face network, one row per face.
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Preset:
    """One way of turning photos into an index and answering queries against it (see the module docstring)."""

    name: str
    summary: str  # one line, for --help and docs
    input_size: int | None = None  # None: the backbone's own (224 for the registry models)
    resize: str | None = None  # None: squash (the backbone's preprocessing)
    pooling: str | None = None  # None: gap
    head: str | None = None  # a linear head fitted on the collection (retrieval/index/head.py), None: none
    metric: str = "cosine"
    search: dict = field(default_factory=dict)  # search defaults recorded in a new index, e.g. {"verify": 8}
    per_face: bool = False  # one row per face (detector, alignment, the face network), not one per photo
    local: dict = field(default_factory=dict)  # a new index's local features {"side", "budget"} when its searches
                                               # verify ({}: retrieval/match/verify.py's defaults); recorded in it
    precision: str | None = None  # a new index's arithmetic when --precision is not given: None, fp32; "auto", int8
                                  # where the CPU has VNNI, else fp32 (retrieval/models/precision.py auto_precision)

    #: the backbone options a preset fills in when the caller leaves them open
    OPTIONS = ("input_size", "resize", "pooling", "head")

    def options(self) -> dict:
        """The options of a new index this preset fills in (those it leaves to the backbone are absent)."""
        return {k: getattr(self, k) for k in self.OPTIONS if getattr(self, k) is not None}

    def backbone(self, settings, input_size: int | None = None, purpose: str = "search"):
        """The network an index with ``settings`` was built with (retrieval/models/loader.py: through its cached
        graphs without torch where they serve; weights verified by their hash before they are loaded; a user's
        model needs --trust-model). ``input_size``: another input side (explanations); ``purpose``: "index" makes
        the graphs an indexing run needs first."""
        from retrieval.models.loader import backbone_for_settings

        return backbone_for_settings(settings, input_size=input_size, purpose=purpose)

    def searcher(self, store, backbone, **options):
        """What answers queries against ``store`` (retrieval/match/search.py's :class:`Searcher`)."""
        from retrieval.match.search import Searcher

        return Searcher(store, backbone, **options)

    def same_person(self, score: float, settings) -> bool | None:
        """The face test on a pair's score (None: this preset has none)."""
        return None


@dataclass(frozen=True)
class FacesPreset(Preset):
    """Faces: detect every face (dlib's HOG detector, or its CNN detector), align it on 5 landmarks, embed it with
    dlib's face ResNet (the PyTorch port, retrieval/faces/network.py), one row per face. The score is the cosine of
    two descriptors measured from a fixed mean face, never re-estimated from the collection (so a pair's score does
    not depend on what else is indexed), and "the same person" is that score at or above the threshold chosen with
    that mean: across two sets of faces, each checked on the other, its error rates are those of dlib's documented
    distance rule (bench/results/faces-metric.md)."""

    detector: str = "hog"
    upsample: int = 1

    def face_settings(self, detector: str | None = None, upsample: int | None = None) -> dict:
        """What a new faces index records about finding faces and its same-person threshold (``IndexSettings.faces``)."""
        from retrieval.faces.network import mean_face

        return {"detector": detector or self.detector, "upsample": self.upsample if upsample is None else int(upsample),
                "threshold": mean_face()[1]}

    def fixed_head(self):
        """The head a new faces index records: centring on the mean face (retrieval/index/head.py, fixed)."""
        from retrieval.faces.network import mean_face
        from retrieval.index.head import LinearHead

        return LinearHead(mean_face()[0])

    def backbone(self, settings, input_size: int | None = None, purpose: str = "search"):
        from retrieval.faces.network import load_backbone
        from retrieval.models.loading import apply_threads

        apply_threads()  # (--threads: torch's threads, as for a registry model's network)
        return load_backbone(expected_sha256=settings.weights_id if settings else None)

    def searcher(self, store, backbone, **options):
        from retrieval.faces.search import FaceSearcher

        return FaceSearcher(store, backbone)

    def same_person(self, score: float, settings) -> bool:
        from retrieval.faces.search import same_person

        return same_person(score, settings)


GENERAL = Preset("general", "what kind of thing is in the photo (fast, the default)",
                 resize="squash", pooling="gap", head="centre")
INSTANCE = Preset("instance", "the same object or product seen elsewhere (448 px aspect kept, GeM, PCA-whitening, "
                  "verification of the top 8 and the visual words' top 25 when searching)",
                  input_size=448, resize="long", pooling="gem", head="pca-whiten:128",
                  search={"verify": 8, "words": 25}, local={"side": 400, "budget": 2000}, precision="auto")
FACES = FacesPreset("faces", "one row per detected face, dlib's face network (needs pip install -e '.[faces]')",
                    head="centre", per_face=True)
PRESETS: dict[str, Preset] = {p.name: p for p in (GENERAL, INSTANCE, FACES)}


def preset_named(name: str | None) -> Preset | None:
    """The preset called ``name`` (None for None); an unknown name is a one-line error listing the known ones."""
    if name is None:
        return None
    try:
        return PRESETS[name]
    except KeyError:
        from retrieval.errors import RetrieveError

        raise RetrieveError(f"unknown preset {name!r} ({', '.join(PRESETS)})") from None


def preset_of(settings) -> Preset:
    """The preset an index was built with (its recorded name); ``general`` for an index made without one."""
    return PRESETS.get(getattr(settings, "preset", "") or "", GENERAL)
