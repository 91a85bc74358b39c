"""Top-k search over an index: queries are image files (indexed or not) or folders of them."""
from __future__ import annotations

import os
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Iterable, Iterator, Sequence

import numpy as np

from retrieval.errors import ImageError
from retrieval.images import load_image
from retrieval.match.verify import decode_side, indexed_hash
from retrieval.names import json_name

if TYPE_CHECKING:  # a cached graph searches without torch (retrieval/models/graphs.py), a plain SQLite index without
    from retrieval.models.backbone import Backbone  # SQLAlchemy (retrieval/index/store.py)
    from retrieval.index.store import IndexStore

HNSW_EF_SEARCH = 64  # with efConstruction 200: recall@10 0.998, p50 0.9 ms at 1 M vectors (bench/results)
IVF_NPROBE = 32  # at least; an eighth of the lists for large indexes
DBA_MAX = 200_000  # search --dba computes an exact k-NN graph of the collection when the searcher opens
RERANK_FACTOR = 10  # compressed (PQ) indexes: fetch k×this candidates, re-score them exactly from the rows
EXPAND = 10  # spatially verified query expansion (Chum et al., "Total Recall", ICCV 2007), search --expand E: the
EXPAND_MIN = 20  # best-confirmed result (at least this many inliers) brings its own top E by visual words and by the
# embedding, each verified against the query; the confirmed join. Off by default: with ASMK* words, at the instance
# preset (K 8, W 25, C 3) it raises mAP@10 0.858 → 0.9 for 50 % more pairs a query (37.0 → 55.4; R@1 and
# photo→catalogue unchanged; bench/results/quality.md); with tf-idf words it had raised it 0.747 → 0.829


@dataclass
class Hit:
    rank: int
    id: int
    path: str
    score: float  # higher is better for both metrics (cosine similarity, or −squared L2 distance)
    distance: float | None = None  # l2 only: squared Euclidean distance
    inliers: int | None = None  # with --verify: local matches that agree on one homography
    verification: object = field(default=None, repr=False, compare=False)  # retrieval.match.verify.Verification
    face: int | None = None  # a faces index: the face's number in its photo (largest first)
    box: tuple | None = None  # and its box, x0, y0, x1, y1 in the photo's own pixels

    def to_dict(self) -> dict:
        d = {"rank": self.rank, "id": self.id, **json_name("path", self.path), "score": self.score}
        if self.distance is not None:
            d["distance"] = self.distance
        if self.inliers is not None:
            d["inliers"] = self.inliers
        if self.face is not None:
            d["face"], d["box"] = self.face, list(self.box)
        return d


@dataclass
class QueryResult:
    query: str
    metric: str
    results: list[Hit] = field(default_factory=list)
    error: str | None = None
    embedding: np.ndarray | None = field(default=None, repr=False)  # raw pooled query embedding
    face: int | None = None  # a faces index: which face of the query photo was searched for
    box: tuple | None = None
    faces_in_query: int | None = None
    query_face: object = field(default=None, repr=False)  # retrieval.faces.detect.Face
    query_image: object = field(default=None, repr=False)  # the query photo as decoded for its faces

    def to_dict(self) -> dict:
        d = {**json_name("query", self.query), "metric": self.metric, "results": [h.to_dict() for h in self.results]}
        if self.faces_in_query is not None:
            d.update({"face": self.face, "box": list(self.box) if self.box else None,
                      "faces_in_query": self.faces_in_query})
        if self.error:
            d["error"] = self.error
        return d


def expand_queries(queries: Iterable[str | os.PathLike]) -> list[str]:
    """Files stay as given (by real path); folders become every image under them, recursively, sorted.

    Walked like ``retrieve index`` walks (iteratively, links out of the folders not followed, each folder
    once), so a link cycle ends. Raises :class:`RetrieveError` naming the folders when they hold no image.
    """
    from retrieval.errors import RetrieveError
    from retrieval.scan import scan_paths

    queries = list(queries)
    paths = [e.path for e in scan_paths(queries)]
    if not paths:
        folders = [str(q) for q in queries if os.path.isdir(q)]
        raise RetrieveError(f"no images in {', '.join(folders)}" if folders else "no images among the queries")
    return paths


class Searcher:
    """Answers queries against one open index with the backbone the index was built with."""

    def __init__(self, store: IndexStore, backbone: Backbone, dba: int = 0, verifier=None,
                 within: str | os.PathLike | None = None):
        """``dba`` > 0: database-side augmentation — every stored vector is replaced, for ranking, by the
        mean of itself and its ``dba`` nearest neighbours (computed when the searcher opens: one exact
        k-NN pass over the collection). ``verifier``: a :class:`retrieval.match.verify.Verifier` for
        ``search_paths(verify=K)``. ``within``: a folder; only indexed images under it are answers
        (catalogue mode: photos queried against the catalogue part of a mixed index)."""
        self.store = store
        self.backbone = backbone
        self.metric = store.settings.metric
        self._metric = store.metric
        self.index = store.faiss_index()
        self.allowed = _within_ids(store, within) if within is not None else None  # sorted ids, or None: all
        self._selector = _Excluding(store.removed_ids(), self.allowed)  # removed rows an HNSW graph still holds
        self._words = None  # retrieval.match.words.WordIndex, loaded at the first search that uses it
        self.rerank = _tune(self.index)
        self.verifier = verifier
        import faiss

        inner = faiss.downcast_index(self.index.index) if hasattr(self.index, "index") else self.index
        self.hnsw = inner.hnsw if hasattr(inner, "hnsw") else None
        self.dba = dba
        if dba > 0 and self.index.ntotal > DBA_MAX:
            from retrieval.errors import RetrieveError

            raise RetrieveError(f"--dba needs a k-NN pass over the whole collection when the search opens; it is "
                                f"meant for up to {DBA_MAX:,} images (this index has {self.index.ntotal:,})")
        if dba > 0 and self.index.ntotal:
            self.index, self.rerank, self.hnsw = self._augmented(dba), False, None
            self._selector = _Excluding(np.zeros(0, np.int64), self.allowed)

    def _augmented(self, n: int):
        """An exact in-memory index over the DBA vectors (see ``__init__``), same ids as the stored ones."""
        import faiss

        ids, vecs = zip(*self.store.iter_vectors())
        ids, x = np.concatenate(ids), self.store.transform(np.concatenate(vecs))
        flat = faiss.IndexFlat(x.shape[1], self._metric.faiss)
        flat.add(x)
        _, nb = flat.search(x, min(n + 1, len(x)))  # each vector's neighbours, itself among them (never -1)
        xa = self._metric.normalise(x[nb].mean(1))
        out = faiss.IndexIDMap2(faiss.IndexFlat(x.shape[1], self._metric.faiss))
        out.add_with_ids(np.ascontiguousarray(xa, np.float32), ids)
        return out

    def search_vectors(self, raw: np.ndarray, k: int, exclude: Sequence[set[int]] | None = None,
                       min_score: float | None = None, qe: int = 0) -> list[list[Hit]]:
        """Top-k hits for each raw pooled embedding (rows of ``raw``), best first.

        ``qe`` > 0: average query expansion — search again with the mean of the query and its top ``qe``
        results (in the index's vector space); the hits keep their similarity to the original query.
        """
        raw = np.atleast_2d(np.asarray(raw, np.float32))
        exclude = exclude or [set() for _ in range(len(raw))]
        q = self.store.transform(raw)
        if qe <= 0 and not self.dba:
            return self._search(q, k, exclude, min_score)
        hits = self._search(q, k, exclude, None)
        if qe > 0:
            return [self._expanded(q[i], h[:qe], k, exclude[i], min_score) if h else h for i, h in enumerate(hits)]
        return [self._rescored(q[i], h, min_score) for i, h in enumerate(hits)]

    def _vectors(self, ids: Sequence[int]) -> np.ndarray:
        rows = self.store.rows_by_ids(ids)
        return self.store.transform(np.stack([np.frombuffer(rows[i].vector, np.float32) for i in ids]))

    def _expanded(self, q: np.ndarray, top: list[Hit], k: int, exclude: set[int], min_score) -> list[Hit]:
        qx = self._metric.normalise(np.vstack([q[None], self._vectors([h.id for h in top])]).mean(0, keepdims=True))
        return self._rescored(q, self._search(qx.astype(np.float32), k, [exclude], None)[0], min_score)

    def _rescored(self, q: np.ndarray, new: list[Hit], min_score) -> list[Hit]:
        """Hits ranked by an expanded query or augmented vectors keep their similarity to the query itself."""
        if not new:
            return new
        v = self._vectors([h.id for h in new])
        out = []
        for h, vec in zip(new, v):  # the score stays the similarity to the query itself
            h.score, h.distance = self._metric.score(self._metric.raw(vec, q))
            if min_score is None or h.score >= min_score:
                h.rank = len(out) + 1
                out.append(h)
        return out

    def _search(self, q: np.ndarray, k: int, exclude: Sequence[set[int]], min_score,
                selector: "_Excluding | None" = None) -> list[list[Hit]]:
        selector = self._selector if selector is None else selector  # (an _Excluding with no ids is falsy)
        n = selector.count(self.index.ntotal)
        if n <= 0 or k <= 0:
            return [[] for _ in range(len(q))]
        extra = max((len(e) for e in exclude), default=0)
        kk = min(n, (k + extra) * (RERANK_FACTOR if self.rerank else 1))
        ef = max(HNSW_EF_SEARCH, kk)  # the beam must hold at least the k asked for
        if self.hnsw is not None:
            self.hnsw.efSearch = ef
        params = selector.params(ef if self.hnsw is not None else None)
        with _one_thread_for_one_query(len(q)):
            scores, ids = self.index.search(q, kk, params=params) if params is not None else self.index.search(q, kk)
        rows = self.store.rows_by_ids({int(i) for i in ids.ravel() if i >= 0})
        if self.rerank:
            scores, ids = self._exact_scores(q, ids, rows)
        out = []
        for qi in range(len(q)):
            hits: list[Hit] = []
            for s, i in zip(scores[qi], ids[qi]):
                i = int(i)
                if i < 0 or i in exclude[qi] or i not in rows:
                    continue
                score, distance = self._metric.score(s)
                hit = Hit(len(hits) + 1, i, rows[i].path, score, distance=distance)
                if min_score is not None and hit.score < min_score:
                    break  # results are sorted: the rest score lower
                hits.append(hit)
                if len(hits) == k:
                    break
            out.append(hits)
        return out

    def search_paths(self, paths: Sequence[str], k: int = 10, *, include_self: bool = False,
                     min_score: float | None = None, qe: int = 0, verify: int = 0, words: int = 0,
                     batch_size: int = 32, workers: int = 2, on_error=None, catalogue: int = 0,
                     expand: int | None = None) -> Iterator[QueryResult]:
        """Decode (in threads) and embed (in batches) the query images; yield one result per query, in order.

        ``verify`` = K > 0: re-rank the top K by geometric verification (``self.verifier``; see
        retrieval/match/verify.py) and keep the best ``k``; hits then carry ``inliers``. ``words`` = W > 0 (with
        ``verify``): the top W of the visual-word inverted file (retrieval/match/words.py) are verified too.
        ``catalogue`` = N > 0 (with ``verify``, on an index with catalogue folders, retrieval/index/catalogue.py):
        the top N catalogue images by the global embedding and by the inverted file are verified too. With
        ``words``, a collection of at most :func:`whole_budget` images (39 at the instance preset) is verified
        whole instead. ``expand`` = E > 0 (with ``words``; None: 0, off; :data:`EXPAND` is a good E): the result
        confirmed with the most inliers (at least ``EXPAND_MIN``) brings its own top E by visual words and by the
        embedding, each verified against the query; the confirmed ones join the results.
        """
        if verify and self.verifier is None:
            from retrieval.match.verify import Verifier

            self.verifier = Verifier.for_index(self.store.settings)
        from retrieval.match.verify import one_blas_thread

        if expand is None or not (verify and words):
            expand = 0
        searchable = self._selector.count(self.index.ntotal)
        if verify and words and searchable <= whole_budget(verify, words, catalogue):
            # a collection this small is verified whole: no more pairs than the words and catalogue stages would
            # verify on a larger index, and no image left out because neither stage ranked it (with tf-idf words, a
            # 100-image catalogue in bench/catalogue.py's model: photo→catalogue R@1 0.93 → 0.95 for 100 pairs a
            # query instead of 71)
            verify, words, catalogue, expand = max(verify, searchable), 0, 0, 0
            self.words()  # (matched in the subspace of the index's visual words, as the stages would have)

        pre = self.backbone.preprocess
        metric = self.metric
        local: dict[str, object] = {}  # query path → its local features (the query is decoded once)

        embed_side = decode_side(self.store.settings)  # decoded as the indexer decodes: the same embedding

        def load(p: str):
            try:
                if not verify:
                    return pre.array(load_image(p, min_side=embed_side)), None
                from retrieval.images import decode_image, read_image_bytes

                data = read_image_bytes(p)  # read once: embedded, and its keypoints looked up or extracted
                side = self.verifier.max_side
                img = decode_image(data, p, min_side=embed_side)
                feats = self.verifier.cached(data)
                # the query's own SIFT does not need the network: extracted in a thread of its own while the
                # batch is embedded (the verification waits for it)
                local[p] = feats if feats is not None else sift.submit(
                    self._query_features, data, p, img if embed_side >= side else None, side)
                return pre.array(img), None
            except ImageError as e:
                return None, e.reason

        def features_of(p: str):
            f = local.pop(p, None)
            return f.result() if isinstance(f, Future) else f

        with ThreadPoolExecutor(max_workers=max(1, workers)) as pool, ThreadPoolExecutor(1) as sift:
            for start in range(0, len(paths), batch_size):
                chunk = list(paths[start:start + batch_size])
                loaded = list(pool.map(load, chunk))
                good = [i for i, (a, _) in enumerate(loaded) if a is not None]
                hits_for: dict[int, list[Hit]] = {}
                emb_for: dict[int, np.ndarray] = {}
                if good:
                    raw = self.backbone.embed_arrays([loaded[i][0] for i in good], batch_size)
                    excl = []
                    for i in good:
                        row = None if include_self else self.store.row_by_path(chunk[i])
                        excl.append({row.id} if row is not None else set())
                    kk = max(k, verify)
                    for i, hits, e, x in zip(good, self.search_vectors(raw, kk, excl, min_score, qe), raw,
                                             range(len(good))):
                        if verify:
                            qf = features_of(chunk[i])
                            with one_blas_thread():  # small products (the head on ~50 vectors): see its docstring
                                more = self._word_hits(qf, words, hits[:verify], excl[x], e, min_score) if words else []
                                if catalogue:
                                    more += self._catalogue_hits(qf, catalogue, hits[:verify] + more,
                                                                 excl[x], e, min_score, words > 0)
                            hits = self._verified(chunk[i], hits, k, verify, on_error, more, qf,
                                                  (expand, excl[x], e, min_score) if expand else None)
                        hits_for[i], emb_for[i] = hits, e
                for i, p in enumerate(chunk):
                    err = loaded[i][1]
                    yield QueryResult(p, metric, hits_for.get(i, []), err, emb_for.get(i))

    def _query_features(self, data: bytes, path: str, img, side: int):
        """The local features of a query (``img``: decoded at a size they can use; None: decode it at
        ``side``); None when it cannot be decoded at that size (verification then reports the error)."""
        from retrieval.images import decode_image

        try:
            return self.verifier.extract(img if img is not None else decode_image(data, path, min_side=side))
        except ImageError:
            return None

    def _verified(self, query_path: str, hits: list[Hit], k: int, depth: int, on_error, more: Sequence[Hit] = (),
                  query_features=None, expansion: tuple | None = None) -> list[Hit]:
        """The top ``depth`` re-ranked by verification, the rest behind them in order; the best ``k``.

        ``more``: candidates from the inverted file, verified with the head; one that is confirmed takes
        its place among the confirmed, one that is not is left out (it was not in the global top).
        ``expansion``: (E, the query's excluded ids, its raw embedding, min_score): verified query expansion
        (see search_paths); its candidates are treated as ``more``."""
        from retrieval.match.verify import rerank, verify_hits, weigh

        head, tail = hits[:depth], hits[depth:]  # the tail keeps its ranks, depth + 1 onwards
        extra = list(more)
        rows = self.store.rows_by_ids([h.id for h in head + extra])
        is_catalogue = self._is_catalogue()
        out = verify_hits(self.verifier, query_path, head + extra, len(head) + len(extra),
                          sha_of=lambda i: indexed_hash(rows.get(i)), on_error=on_error,
                          query_features=query_features, is_catalogue=is_catalogue)
        best = None if expansion is None else max((h for h in out if h.verification.confirmed),
                                                   key=lambda h: h.inliers, default=None)
        if best is not None and best.inliers >= EXPAND_MIN:
            n, exclude, raw, min_score = expansion
            new = self._expansion_hits(best, rows.get(best.id), n, out + tail, exclude, raw, min_score)
            if new:
                rows.update(self.store.rows_by_ids([h.id for h in new]))
                found = verify_hits(self.verifier, query_path, new, len(new),
                                    sha_of=lambda i: indexed_hash(rows.get(i)), on_error=on_error,
                                    query_features=query_features)
                extra += new
                out += [h for h in found if h.verification.confirmed]
                vs = [h.verification for h in out]  # the confirmed joined by evidence, weighed over them all
                weigh(vs, None if is_catalogue is None else [is_catalogue(h.id) for h in out])
                out = rerank(out, vs, len(out))
        if extra:
            extra_ids = {h.id for h in extra}
            out = [h for h in out if h.id not in extra_ids or h.verification.confirmed]
            taken = {h.id for h in out}
            tail = [h for h in tail if h.id not in taken]
        out = (out + tail)[:k]
        for i, h in enumerate(out):
            h.rank = i + 1
        return out

    def words(self):
        """The visual-word index of this store (retrieval/match/words.py), brought up to date with the rows on
        first use (rebuilt when its file is missing or damaged); None when too few images to train one."""
        if self._words is None:
            from retrieval.match import words

            if self.verifier is None:
                from retrieval.match.verify import Verifier

                self.verifier = Verifier.for_index(self.store.settings)
            self._sync_words()
        return self._words or None

    def _sync_words(self, whole: bool = False) -> None:
        from retrieval.match import words

        self._words = words.sync(self.store, self.verifier, whole=whole) or False
        if self._words and self._words.vocab.projection is not None:  # verification matches in its subspace
            self.verifier.projection = self._words.vocab.projection

    def _word_search(self, desc: np.ndarray, n: int, allowed, exclude) -> list[tuple[int, float]]:
        """:meth:`WordIndex.search`; a memory-mapped file found damaged as it is read is read again whole, which
        fails its checks, and made again from the rows (retrieval/match/words.py sync): never searched as it is."""
        from retrieval.match import words

        try:
            return self._words.search(desc, n, allowed, exclude)
        except words.DamagedWords:
            self._sync_words(whole=True)
            return self._words.search(desc, n, allowed, exclude) if self._words else []

    def _word_hits(self, feats, n: int, head: Sequence[Hit], exclude: set[int], raw: np.ndarray,
                   min_score) -> list[Hit]:
        """The inverted file's top ``n`` that are not in ``head`` (nor excluded, nor outside ``within``), as hits
        scored by the global similarity."""
        wi = self.words() if feats is not None else None
        if wi is None:
            return []
        have = {h.id for h in head} | set(exclude)
        found = [i for i, _ in self._word_search(feats.descriptors, n + len(have), self.allowed, have)][:n]
        removed = set(self._selector.ids.tolist())
        found = [i for i in found if i not in removed]
        return self._scored_hits(found, raw, min_score)

    def _scored_hits(self, ids: Sequence[int], raw: np.ndarray, min_score) -> list[Hit]:
        """Hits for ``ids`` (those still in the index), in that order, scored by their global similarity with the
        query's raw embedding ``raw``; those under ``min_score`` left out."""
        rows = self.store.rows_by_ids(ids) if len(ids) else {}
        ids = [i for i in ids if i in rows]
        if not ids:
            return []
        q = self.store.transform(np.atleast_2d(np.asarray(raw, np.float32)))[0]
        out = []
        for i, vec in zip(ids, self._vectors(ids)):
            score, distance = self._metric.score(self._metric.raw(vec, q))
            if min_score is None or score >= min_score:
                out.append(Hit(0, i, rows[i].path, float(score), distance=distance))
        return out

    def _expansion_hits(self, best: Hit, row, n: int, have: Sequence[Hit], exclude: set[int], raw: np.ndarray,
                        min_score) -> list[Hit]:
        """The confirmed result ``best``'s own top ``n`` by visual words and top ``n`` by the embedding that are not
        in ``have`` (nor excluded, nor outside ``within``), as hits scored by the query's global similarity."""
        try:
            feats = self.verifier.features(best.path, indexed_hash(row)) if row is not None else None
        except (ImageError, OSError):
            feats = None
        out = self._word_hits(feats, n, [*have, best], exclude, raw, min_score)
        taken = {h.id for h in [*have, best, *out]} | set(exclude)
        own = np.ascontiguousarray(self._vectors([best.id]), np.float32)  # (in the index's space already)
        return out + self._scored_hits([h.id for h in self._search(own, n, [taken], None)[0]], raw, min_score)

    def catalogue_ids(self) -> np.ndarray:
        """The sorted ids of the index's catalogue images (retrieval/index/catalogue.py), found once."""
        if not hasattr(self, "_catalogue_ids"):
            from retrieval.index import catalogue

            self._catalogue_ids = catalogue.ids(self.store)
            self._catalogue_set = frozenset(self._catalogue_ids.tolist())
        return self._catalogue_ids

    def _is_catalogue(self):
        """Whether an id is a catalogue image, for verification's evidence (retrieval.match.verify.weigh); None when
        the index records no catalogue images."""
        return self._catalogue_set.__contains__ if len(self.catalogue_ids()) else None

    def catalogue_selector(self) -> "_Excluding | None":
        """Search parameters for the catalogue images (retrieval/index/catalogue.py) that are answers; None when the
        index records no catalogue, or none of its images is in it, or ``within`` restricts the answers."""
        if not hasattr(self, "_catalogue"):
            ids = self.catalogue_ids() if self.allowed is None else np.zeros(0, np.int64)
            self._catalogue = _Excluding(self._selector.ids, ids) if len(ids) else None
        return self._catalogue

    def _catalogue_hits(self, feats, n: int, have: Sequence[Hit], exclude: set[int], raw: np.ndarray, min_score,
                        words: bool = True) -> list[Hit]:
        """The top ``n`` catalogue images by the global embedding and (``words``) the top ``n`` by the inverted
        file, those not in ``have`` nor excluded, as hits scored by the global similarity."""
        sel = self.catalogue_selector()
        if sel is None:
            return []
        taken = {h.id for h in have} | set(exclude)
        q = self.store.transform(np.atleast_2d(np.asarray(raw, np.float32)))
        out = [h for h in self._search(q, n, [taken], min_score, sel)[0]]
        wi = self.words() if words and feats is not None else None
        if wi is not None:
            taken |= {h.id for h in out}
            found = [i for i, _ in self._word_search(feats.descriptors, n + len(taken), sel.allowed, taken)][:n]
            out += self._scored_hits(found, raw, min_score)
        return out

    def _exact_scores(self, q: np.ndarray, ids: np.ndarray, rows: dict) -> tuple[np.ndarray, np.ndarray]:
        """Re-score candidates with the exact stored vectors and sort them again (best first)."""
        out_s = np.full(ids.shape, self._metric.worst, np.float32)
        for qi in range(len(q)):
            cand = [int(i) for i in ids[qi] if i >= 0 and int(i) in rows]
            if not cand:
                continue
            v = self.store.transform(np.stack([np.frombuffer(rows[i].vector, np.float32) for i in cand]))
            s = self._metric.raw(v, q[qi])
            order = self._metric.best_first(s)
            ids[qi, : len(cand)] = np.asarray(cand)[order]
            ids[qi, len(cand):] = -1
            out_s[qi, : len(cand)] = s[order]
        return out_s, ids


class _Excluding:
    """Search parameters that keep removed ids out of the results (an HNSW graph keeps them until rebuilt)
    and, with ``allowed`` (sorted ids), every id not among them (``search --within``)."""

    def __init__(self, ids: np.ndarray, allowed: np.ndarray | None = None):
        self.ids = np.ascontiguousarray(ids, np.int64)
        self.allowed = None if allowed is None else np.setdiff1d(allowed, self.ids)
        self._batch = self._not = self._in = None
        if len(self.ids):
            import faiss

            self._batch = faiss.IDSelectorBatch(self.ids)  # kept referenced: FAISS holds raw pointers
            self._not = faiss.IDSelectorNot(self._batch)
        if self.allowed is not None:
            import faiss

            self._allowed = np.ascontiguousarray(self.allowed, np.int64)
            self._not = self._in = faiss.IDSelectorBatch(self._allowed)  # removed ids are not in it

    def __len__(self) -> int:
        return len(self.ids)

    def count(self, ntotal: int) -> int:
        """How many ids a search can return."""
        return len(self.allowed) if self.allowed is not None else ntotal - len(self.ids)

    def params(self, ef_search: int | None):
        if self._not is None:
            return None
        import faiss

        p = faiss.SearchParametersHNSW() if ef_search is not None else faiss.SearchParameters()
        if ef_search is not None:
            p.efSearch = ef_search
        p.sel = self._not
        self._params = p
        return p


def whole_budget(verify: int, words: int, catalogue: int) -> int:
    """The largest collection a search with visual words verifies whole: the pairs a query verifies on a larger
    index with a catalogue (the global top K, the words' top W, the catalogue's top 2 × max(C, its default)): 39
    at the instance preset's K 8, W 25."""
    from retrieval.index.catalogue import DEPTH

    return verify + words + 2 * max(catalogue, DEPTH)


@contextmanager
def _one_thread_for_one_query(nq: int):
    """FAISS on one OpenMP thread (this thread's setting, restored after) while it answers a single query: its
    searches divide the work by query, so a second thread has nothing to do, and waking it cost 50-80 ms of a
    10 k-vector search on this busy 2-core machine against 3-20 ms alone (bench/results/startup-search.md)."""
    if nq != 1:
        yield
        return
    import faiss

    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(before)


def _within_ids(store: IndexStore, folder: str | os.PathLike) -> np.ndarray:
    """The sorted ids of the indexed images under ``folder`` (by real path); RetrieveError when none is."""
    from retrieval.errors import RetrieveError

    root = os.path.realpath(folder)
    if not os.path.isdir(root):
        raise RetrieveError(f"--within {folder}: not a folder")
    prefix = root.rstrip(os.sep) + os.sep
    ids = [i for i, path, _ in store.row_paths() if path.startswith(prefix)]
    if not ids:
        raise RetrieveError(f"--within {folder}: none of the images in index {store.directory} is under it "
                            f"(add them with `retrieve index {folder} --index {store.directory}`)")
    return np.unique(np.asarray(ids, np.int64))


def _tune(index) -> bool:
    """Set search-time parameters of approximate types (efSearch, nprobe); True when results need re-ranking."""
    import faiss

    inner = faiss.downcast_index(index.index) if hasattr(index, "index") else index
    if hasattr(inner, "hnsw"):
        inner.hnsw.efSearch = HNSW_EF_SEARCH
    try:
        ivf = faiss.extract_index_ivf(inner)
    except (RuntimeError, TypeError):
        return False
    ivf.nprobe = min(ivf.nlist, max(IVF_NPROBE, ivf.nlist // 8))
    return not isinstance(ivf, faiss.IndexIVFFlat)
