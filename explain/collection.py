"""An index opened to search it and explain its answers: the one place ``retrieve search``, ``retrieve search
--explain``, ``retrieve explain --index`` and the web app get a pair's score, its verdict and its maps, so that all of
them give the same answer.

What differs between presets -- how a query photo becomes a query (the whole photo, or one of its faces), which
searcher answers it, how a pair is explained -- is the preset's (retrieval/presets.py); the score is always the
index's (explain/cis.py), the verdict always retrieval/verdict.py's.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterator, Sequence

from retrieval.errors import RetrieveError
from retrieval.verdict import verdict as make_verdict

_UNSET = object()


class Collection:
    """An index, its preset, its backbone and its calibration, opened once (read-only)."""

    def __init__(self, index_dir, backbone=None):
        """``backbone``: the index's network, already loaded (the web app loads it once for every committed state)."""
        from retrieval.index.store import IndexStore
        from retrieval.presets import preset_of

        self.store = IndexStore.open(index_dir)
        self.preset = preset_of(self.store.settings)
        self._backbone = backbone
        self._calibration = _UNSET
        self._searcher = None
        self._verifier = None
        self._explainers: dict = {}

    def close(self) -> None:
        self.store.close()

    def __enter__(self) -> "Collection":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def backbone(self):
        if self._backbone is None:
            self._backbone = self.preset.backbone(self.store.settings)
        return self._backbone

    @property
    def calibration(self):
        """Where scores stand in this collection (retrieval/index/calibration.py; None: too few photos, or faces)."""
        if self._calibration is _UNSET:
            from retrieval.index.calibration import for_search

            self._calibration = None if self.preset.per_face else for_search(self.store)
        return self._calibration

    @property
    def score_is(self) -> str:
        from .run import score_words

        return score_words(self.store)

    # -- searching -----------------------------------------------------------------------------------------------
    def search_options(self, verify: int | None = None, words: int | None = None,
                       catalogue: int | None = None) -> dict:
        """The verification depths a search uses: the index's defaults where not given (``catalogue``: its
        catalogue role's depth when it has one); a one-line error for what does not apply."""
        from retrieval.index import catalogue as cat

        st = self.store.settings
        verify = int(st.search.get("verify", 0)) if verify is None else int(verify)
        words = (int(st.search.get("words", 0)) if verify else 0) if words is None else int(words)
        if catalogue is None:
            catalogue = cat.default_depth(self.store, verify)
        elif catalogue and not verify:
            raise RetrieveError("--catalogue N goes with --verify K (K > 0)")
        elif catalogue and not cat.folders(self.store):
            raise RetrieveError(f"--catalogue: index {self.store.directory} has no catalogue (record one with "
                                f"`retrieve index CATALOGUE --index {self.store.directory} --catalogue`)")
        return {"verify": verify, "words": words, "catalogue": catalogue}

    def searcher(self, dba: int = 0, within=None):
        """The preset's searcher; the default one (no --dba, no --within) is made once (a faces searcher loads the
        face detector)."""
        if self.preset.per_face and (dba or within is not None):
            raise RetrieveError("--dba and --within do not apply to a faces index")
        if dba or within is not None:
            return self.preset.searcher(self.store, self.backbone, dba=dba, within=within)
        if self._searcher is None:
            self._searcher = self.preset.searcher(self.store, self.backbone)
        return self._searcher

    def search(self, paths: Sequence[str], k: int = 10, *, searcher=None, face: int | None = None,
               **options) -> Iterator:
        """One result per query (retrieval/match/search.py QueryResult), best first; faces: ``face`` of each photo."""
        searcher = searcher or self.searcher()
        if self.preset.per_face:
            return searcher.search_paths(paths, k, face=face, include_self=options.get("include_self", False))
        if face is not None:
            raise RetrieveError(f"--face goes with a faces index (--preset faces); {self.store.directory} is not one")
        return searcher.search_paths(paths, k, **options)

    def verdict(self, score: float, verification=None):
        """The verdict on a pair scored ``score`` in this collection (retrieval/verdict.py)."""
        return make_verdict(score, self.calibration, verification,
                            self.preset.same_person(score, self.store.settings))

    # -- explaining ----------------------------------------------------------------------------------------------
    def explainer(self, method: str | None = None, input_size: int | None = None):
        key = (method, input_size)
        if key not in self._explainers:
            if self.preset.per_face:
                from .faces import face_explainer

                if method not in (None, "sfam", "sfam-plain", "gradcam"):
                    raise RetrieveError(f"--method {method}: a faces index explains with sfam, sfam-plain or gradcam")
                self._explainers[key] = face_explainer(self.store, self.backbone, method)
            else:
                from .run import index_explainer

                self._explainers[key] = index_explainer(self.store, self.backbone, method, input_size)
        return self._explainers[key]

    def meta(self, explainer) -> dict:
        from .run import explain_meta

        return explain_meta(self.store, explainer)

    def explain_results(self, res, out: Path, method: str | None = None, full_maps: bool = False,
                        on_error=None) -> dict[int, dict]:
        """The maps and report of one query's results (``res``: a QueryResult of :meth:`search`); {rank: record}."""
        from .methods import MAP_MAX_SIDE
        from .run import explain_hits, ranking_pairs

        explainer = self.explainer(method)
        pairs = ranking_pairs(self.store, res.embedding, [h.id for h in res.results])
        max_side = None if full_maps else MAP_MAX_SIDE
        if self.preset.per_face:
            from .faces import explain_face_hits

            return explain_face_hits(self.searcher(), explainer, res, out,
                                     self.meta(explainer), pairs, self.score_is, self.verdict, on_error, max_side)
        return explain_hits(res.query, res.results, out, explainer, self.meta(explainer), on_error=on_error,
                            calibration=self.calibration, map_max_side=max_side, pairs=pairs, score_is=self.score_is)

    def verifier(self):
        """Verification as this index's searches verify (retrieval/match/words.py index_verifier), made once."""
        if self._verifier is None:
            from retrieval.match.words import index_verifier

            self._verifier = index_verifier(self.store)
        return self._verifier

    def explain_pair(self, a, b, out: Path, method: str | None = None, verify: bool = False,
                     input_size: int | None = None, full_maps: bool = False, names=None, face_a=None, face_b=None,
                     prepare_only: bool = False):
        """``retrieve explain A B --index``: A as a query, B scored as ``retrieve search A`` scores it; the document
        (``prepare_only``: the prepared pair, its figure and report not drawn yet: explain/run.py PreparedPair)."""
        from .methods import MAP_MAX_SIDE

        max_side = None if full_maps else MAP_MAX_SIDE
        if self.preset.per_face:
            from .faces import explain_face_pair

            for given, opt in ((input_size, "--input-size"), (verify, "--verify")):
                if given:
                    raise RetrieveError(f"{opt} does not apply to a faces index (the maps live on 150×150 aligned "
                                        "chips)")
            explainer = self.explainer(method)
            prepared = explain_face_pair(self.searcher(), explainer, str(a), str(b), out, self.meta(explainer),
                                         self.score_is, self.verdict, face_a, face_b, max_side)
        else:
            prepared = self._prepare_pair(a, b, out, method, verify, input_size, max_side, names, face_a, face_b)
        if prepare_only:
            return prepared
        prepared.draw()
        return prepared.doc

    def _prepare_pair(self, a, b, out: Path, method, verify: bool, input_size, max_side, names, face_a, face_b):
        from .run import index_pair, prepare_pair

        if face_a is not None or face_b is not None:
            raise RetrieveError("--face-a/--face-b go with a faces index (--index DIR built with --preset faces)")
        explainer = self.explainer(method, input_size)
        verification = None
        if verify:  # inliers counted as the index's searches count them
            v = self.verifier()
            verification = v.verify(v.features(a), v.features(b))
        pair = index_pair(self.store, self.backbone, a, b)
        return prepare_pair(a, b, out, explainer, self.meta(explainer), verification, pair, self.calibration,
                            self.score_is, max_side, names)

