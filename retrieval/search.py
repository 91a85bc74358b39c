"""Top-k search over an index: queries are image files (indexed or not) or folders of them."""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Iterable, Iterator, Sequence

import numpy as np
import torch

from .backbone import Backbone
from .errors import ImageError
from .images import load_image
from .store import IndexStore

HNSW_EF_SEARCH = 64  # with efConstruction 200: recall@10 0.998, p50 0.9 ms at 1 M vectors (bench/results)
IVF_NPROBE = 32  # at least; an eighth of the lists for large indexes
RERANK_FACTOR = 10  # compressed (PQ) indexes: fetch k×this candidates, re-score them exactly from the rows


@dataclass
class Hit:
    rank: int
    id: int
    path: str
    score: float  # higher is better for both metrics (cosine similarity, or −squared L2 distance)
    distance: float | None = None  # l2 only: squared Euclidean distance

    def to_dict(self) -> dict:
        d = asdict(self)
        if self.distance is None:
            d.pop("distance")
        return d


@dataclass
class QueryResult:
    query: str
    metric: str
    results: list[Hit] = field(default_factory=list)
    error: str | None = None
    embedding: np.ndarray | None = field(default=None, repr=False)  # raw pooled query embedding

    def to_dict(self) -> dict:
        d = {"query": self.query, "metric": self.metric, "results": [h.to_dict() for h in self.results]}
        if self.error:
            d["error"] = self.error
        return d


def expand_queries(queries: Iterable[str | os.PathLike]) -> list[str]:
    """Files stay as given (made absolute); folders become every image under them, recursively, sorted."""
    from .scan import scan_paths

    return [e.path for e in scan_paths(queries)]


class Searcher:
    """Answers queries against one open index with the backbone the index was built with."""

    def __init__(self, store: IndexStore, backbone: Backbone):
        self.store = store
        self.backbone = backbone
        self.metric = store.settings.metric
        self.index = store.faiss_index()
        self.rerank = _tune(self.index)
        import faiss

        inner = faiss.downcast_index(self.index.index) if hasattr(self.index, "index") else self.index
        self.hnsw = inner.hnsw if hasattr(inner, "hnsw") else None

    def search_vectors(self, raw: np.ndarray, k: int, exclude: Sequence[set[int]] | None = None,
                       min_score: float | None = None, qe: int = 0) -> list[list[Hit]]:
        """Top-k hits for each raw pooled embedding (rows of ``raw``), best first.

        ``qe`` > 0: average query expansion — search again with the mean of the query and its top ``qe``
        results (in the index's vector space); the hits keep their similarity to the original query.
        """
        raw = np.atleast_2d(np.asarray(raw, np.float32))
        exclude = exclude or [set() for _ in range(len(raw))]
        q = self.store.transform(raw)
        hits = self._search(q, k, exclude, None if qe else min_score)
        if qe <= 0:
            return hits
        return [self._expanded(q[i], h[:qe], k, exclude[i], min_score) if h else h for i, h in enumerate(hits)]

    def _vectors(self, ids: Sequence[int]) -> np.ndarray:
        rows = self.store.rows_by_ids(ids)
        return self.store.transform(np.stack([np.frombuffer(rows[i].vector, np.float32) for i in ids]))

    def _expanded(self, q: np.ndarray, top: list[Hit], k: int, exclude: set[int], min_score) -> list[Hit]:
        qx = np.vstack([q[None], self._vectors([h.id for h in top])]).mean(0, keepdims=True)
        if self.metric == "cosine":
            qx /= max(float(np.linalg.norm(qx)), 1e-12)
        new = self._search(qx.astype(np.float32), k, [exclude], None)[0]
        if not new:
            return new
        v = self._vectors([h.id for h in new])
        out = []
        for h, vec in zip(new, v):  # the score stays the similarity to the query itself
            if self.metric == "cosine":
                h.score = float(vec @ q)
            else:
                h.distance = float(((vec - q) ** 2).sum())
                h.score = -h.distance
            if min_score is None or h.score >= min_score:
                h.rank = len(out) + 1
                out.append(h)
        return out

    def _search(self, q: np.ndarray, k: int, exclude: Sequence[set[int]], min_score) -> list[list[Hit]]:
        n = self.index.ntotal
        if n == 0 or k <= 0:
            return [[] for _ in range(len(q))]
        extra = max((len(e) for e in exclude), default=0)
        kk = min(n, (k + extra) * (RERANK_FACTOR if self.rerank else 1))
        if self.hnsw is not None:
            self.hnsw.efSearch = max(HNSW_EF_SEARCH, kk)  # the beam must hold at least the k asked for
        scores, ids = self.index.search(q, kk)
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
                s = float(s)
                if self.metric == "cosine":
                    hit = Hit(len(hits) + 1, i, rows[i].path, s)
                else:
                    hit = Hit(len(hits) + 1, i, rows[i].path, -s, distance=s)
                if min_score is not None and hit.score < min_score:
                    break  # results are sorted: the rest score lower
                hits.append(hit)
                if len(hits) == k:
                    break
            out.append(hits)
        return out

    def search_paths(self, paths: Sequence[str], k: int = 10, *, include_self: bool = False,
                     min_score: float | None = None, qe: int = 0, batch_size: int = 32,
                     workers: int = 2) -> Iterator[QueryResult]:
        """Decode (in threads) and embed (in batches) the query images; yield one result per query, in order."""
        pre = self.backbone.preprocess
        metric = self.metric

        def load(p: str):
            try:
                return pre.array(load_image(p, min_side=pre.size)), None
            except ImageError as e:
                return None, e.reason

        with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
            for start in range(0, len(paths), batch_size):
                chunk = list(paths[start:start + batch_size])
                loaded = list(pool.map(load, chunk))
                good = [i for i, (a, _) in enumerate(loaded) if a is not None]
                hits_for: dict[int, list[Hit]] = {}
                emb_for: dict[int, np.ndarray] = {}
                if good:
                    x = torch.from_numpy(np.stack([loaded[i][0] for i in good]))
                    _, pooled = self.backbone.embed(x)
                    raw = pooled.numpy()
                    excl = []
                    for i in good:
                        row = None if include_self else self.store.row_by_path(chunk[i])
                        excl.append({row.id} if row is not None else set())
                    for i, hits, e in zip(good, self.search_vectors(raw, k, excl, min_score, qe), raw):
                        hits_for[i], emb_for[i] = hits, e
                for i, p in enumerate(chunk):
                    err = loaded[i][1]
                    yield QueryResult(p, metric, hits_for.get(i, []), err, emb_for.get(i))


    def _exact_scores(self, q: np.ndarray, ids: np.ndarray, rows: dict) -> tuple[np.ndarray, np.ndarray]:
        """Re-score candidates with the exact stored vectors and sort them again (best first)."""
        out_s = np.full(ids.shape, -np.inf if self.metric == "cosine" else np.inf, np.float32)
        for qi in range(len(q)):
            cand = [int(i) for i in ids[qi] if i >= 0 and int(i) in rows]
            if not cand:
                continue
            v = self.store.transform(np.stack([np.frombuffer(rows[i].vector, np.float32) for i in cand]))
            s = v @ q[qi] if self.metric == "cosine" else ((v - q[qi]) ** 2).sum(1)
            order = np.argsort(-s if self.metric == "cosine" else s, kind="stable")
            ids[qi, : len(cand)] = np.asarray(cand)[order]
            ids[qi, len(cand):] = -1
            out_s[qi, : len(cand)] = s[order]
        return out_s, ids


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
