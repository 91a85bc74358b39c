"""The FAISS side of an index: which FAISS index a collection gets, and keeping the vector file in step.

The rows (SQLite) are the truth; ``vectors.faiss`` is a cache derived from them. On every open it is
reconciled with the rows (ids missing from it are added, ids without a row are removed), so a vector
file that trails the rows — the normal state after an interrupted run — heals itself.

**Fingerprint.** Beside the vector file, ``vectors.faiss.json`` records what it holds: the vector space
(the linear head's identity, the metric, the dimension), the factory it was built with, its vector
count and size. It is written after the vector file (both through a temporary file and a rename), and
the last one written is also recorded in the database. A vector file whose fingerprint does not match
the index's current vector space (say, the head was re-fitted and the run was killed before the vector
file was rebuilt) or does not describe that very file is rebuilt from the rows, never searched.

**Removals.** Index types that can remove ids (flat, IVF) remove them at once. HNSW cannot: removed ids
stay in the graph, are filtered out of every search (``removed``), and the graph is rebuilt once, at the
end of a run, when they exceed ``REMOVED_MAX_SHARE`` of it — not once per batch.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np

from retrieval.errors import IndexError_
from retrieval.index.files import first_line, fsync, fsync_dir


FAISS_NAME = "vectors.faiss"
META_NAME = "vectors.faiss.json"  # the vector file's fingerprint
META_FORMAT = 1
TEMPORARY_GLOBS = (f".{FAISS_NAME}.*.tmp", f".{META_NAME}.*.tmp")

INDEX_TYPES = {
    "flat": "Flat",
    "hnsw": "HNSW32",
    "ivfpq": "IVF{nlist},PQ{m}",
}
HNSW_EF_CONSTRUCTION = 200  # FAISS's default 40 gives recall@10 0.82 at 1 M vectors; 200 gives 0.998 (bench/results)
IVF_MIN_TRAIN_PER_LIST = 39  # FAISS warns below this many training points per centroid
IVF_MIN_LISTS = 16  # below this many lists (about 600 vectors) exact search is as fast: no IVF yet
IVF_MAX_LISTS = 1024  # k-means cost grows with lists × training points; 1024 keeps 1 M vectors trainable on a laptop
IVF_TRAIN_PER_LIST = 64  # training sample: this many vectors per list (FAISS wants at least 39)
REMOVED_MAX_SHARE = 0.1  # HNSW: removed ids kept (and filtered at search) up to this share, then one rebuild


# -- which FAISS index ------------------------------------------------------------------------------
def _nlist(factory: str) -> int:
    head = factory.split(",")[0]
    digits = "".join(c for c in head[3:] if c.isdigit())
    return int(digits) if head.startswith("IVF") and digits else 1


def _centroids(factory: str) -> int:
    """The most k-means centroids any part of ``factory`` trains (IVF lists, IMI cells, PQ codebooks); 0: none."""
    most = 0
    for m in re.finditer(r"IVF(\d+)", factory):
        most = max(most, int(m.group(1)))
    for m in re.finditer(r"IMI2x(\d+)", factory):
        most = max(most, 2 ** int(m.group(1)))
    for m in re.finditer(r"PQ(\d+)(?:x(\d+))?", factory):
        most = max(most, 2 ** int(m.group(2) or 8))
    return most


def min_training(factory: str, dim: int | None = None) -> int:
    """How many vectors ``factory`` needs before it can be trained (0: it needs no training).

    IVF needs ``IVF_MIN_TRAIN_PER_LIST`` points per list, a product quantiser at least one point per
    code (256 for 8 bits); other trained parts (SQ, …) are detected by building the empty index.
    """
    need = 0
    for m in re.finditer(r"IVF(\d+)", factory):
        need = max(need, IVF_MIN_TRAIN_PER_LIST * int(m.group(1)))
    for m in re.finditer(r"IMI2x(\d+)", factory):
        need = max(need, IVF_MIN_TRAIN_PER_LIST * 2 ** int(m.group(1)))
    for m in re.finditer(r"PQ(\d+)(?:x(\d+))?", factory):
        need = max(need, 2 ** int(m.group(2) or 8))
    if need == 0 and dim is not None:
        import faiss

        try:
            need = 0 if faiss.index_factory(int(dim), factory).is_trained else 1
        except RuntimeError:
            need = 0
    return need


def trainable_factory(factory: str, n: int, dim: int | None = None) -> str:
    """``factory``, or ``"Flat"`` (exact search) while it has too few vectors to be trained.

    For a factory that starts with IVF, also while it would have fewer than ``IVF_MIN_LISTS`` lists.
    """
    if factory.startswith("IVF") and _nlist(factory) < IVF_MIN_LISTS:
        return "Flat"
    if n < min_training(factory, dim):
        return "Flat"
    return factory


def training_sample_size(factory: str) -> int:
    """How many stored vectors to train ``factory`` on (at most; all of them when there are fewer)."""
    return IVF_TRAIN_PER_LIST * max(_centroids(factory), 1)


def factory_for(index_type: str, dim: int, n: int) -> str:
    """The FAISS factory string (inside IDMap2) for an index type and the current collection size."""
    if index_type not in INDEX_TYPES:
        return index_type  # a user-given factory string
    if index_type == "ivfpq":
        nlist = max(1, min(IVF_MAX_LISTS, int(4 * np.sqrt(max(n, 1))), n // IVF_MIN_TRAIN_PER_LIST))
        m = next((m for m in (64, 32, 16, 8, 4, 2) if dim % m == 0 and dim // m >= 8), 1)
        return INDEX_TYPES[index_type].format(nlist=nlist, m=m)
    return INDEX_TYPES[index_type]


# -- the fingerprint -----------------------------------------------------------------------------------
def read_meta(directory: Path) -> dict | None:
    try:
        meta = json.loads((Path(directory) / META_NAME).read_text())
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) else None


def describes(meta: dict | None, space: dict, index, path: Path) -> bool:
    """Does ``meta`` describe this vector file (count, size) in this vector space (head, metric, dim)?"""
    if meta is None:
        return False
    try:
        size = path.stat().st_size
    except OSError:
        return False
    return (all(meta.get(k) == v for k, v in space.items()) and meta.get("count") == index.ntotal
            and meta.get("bytes") == size)


def clean_temporaries(directory: Path, extra_globs: tuple[str, ...] = ()) -> list[Path]:
    """Remove temporary files a killed writer left (call it holding the writer lock)."""
    gone = []
    for pattern in TEMPORARY_GLOBS + extra_globs:
        for p in Path(directory).glob(pattern):
            try:
                if p.is_file() or p.is_symlink():
                    p.unlink()
                    gone.append(p)
            except OSError:
                pass
    return gone


def file_state(store):
    """``(state, index, meta)`` of the vector file on disk, read-only (for ``retrieve check``).

    ``state``: ``ok``, ``missing``, ``unreadable``, ``wrong dimension`` (no fingerprint says why), or
    ``stale`` (its fingerprint names another vector space, or another file: it is rebuilt when opened).
    """
    import faiss

    path = store.directory / FAISS_NAME
    if not path.exists():
        return "missing", None, None
    meta = read_meta(store.directory)
    try:
        index = faiss.read_index(str(path))
    except RuntimeError:
        return "unreadable", None, meta
    if not isinstance(index, faiss.IndexIDMap2) and index.ntotal:
        return "unreadable", None, meta
    if meta is None:  # written before fingerprints: trusted when it has no head to disagree with
        if index.d != store.vector_dim:
            return "wrong dimension", None, None
        return ("ok" if not store.settings.head else "stale"), index, None
    if not describes(meta, store.space(), index, path):
        return "stale", index, meta
    return "ok", index, meta


# -- the FAISS index of one store -------------------------------------------------------------------------
class Vectors:
    """The FAISS index of one :class:`IndexStore`, kept equal to its rows (see the module docstring)."""

    def __init__(self, store):
        self.store = store
        self.index = None
        self.factory = ""  # what the index was built with ("Flat" while an IVF type is not trainable yet)
        self.removed = np.zeros(0, np.int64)  # ids still in the index (HNSW) whose rows are gone
        self.deferred = False  # changes not mirrored until the next rebuild (:meth:`defer`)
        self.pending = False  # changes were committed while deferred: the next rebuild is due

    def defer(self) -> None:
        """Mirror no change of the rows until :meth:`rebuild`: for an index run whose vectors all change with the
        head it fits at its end (a collection without its head yet), so that the run neither holds every raw
        vector in memory (1280-d float32 until the head exists: 5 KB a row) nor adds them to FAISS for nothing."""
        self.deferred = True

    @property
    def path(self) -> Path:
        return self.store.directory / FAISS_NAME

    # -- loading --------------------------------------------------------------------------------
    def get(self):
        """The FAISS index reconciled with the rows (loaded once)."""
        if self.index is None:
            self.index = self._load()
        return self.index

    def _load(self):
        import faiss

        space = self.store.space()
        for _ in range(2):  # a writer renames the file, then its fingerprint: read both again once if they disagree
            if not self.path.exists():
                break
            meta = read_meta(self.store.directory)
            try:
                index = faiss.read_index(str(self.path))
            except RuntimeError:
                index = None  # damaged: rebuilt from the rows below
            if index is not None and isinstance(index, faiss.IndexIDMap2) and index.d == self.store.vector_dim:
                if describes(meta, space, index, self.path) or (meta is None and not self.store.settings.head):
                    self.factory = (meta or {}).get("factory") or ""
                    return self._reconcile(index)
        return self.rebuild()

    def _reconcile(self, index):
        import faiss

        have = faiss.vector_to_array(index.id_map) if index.ntotal else np.zeros(0, np.int64)
        want = self.store.row_ids()
        extra = np.setdiff1d(have, want, assume_unique=True)
        missing = np.setdiff1d(want, have, assume_unique=True)
        self.index = index
        self.removed = np.zeros(0, np.int64)
        if len(extra):
            self._remove(extra)
        if len(missing):
            self._add_ids(missing)
        return index

    # -- changing ---------------------------------------------------------------------------------
    def _remove(self, ids: np.ndarray) -> None:
        """Remove ids in place; an index type that cannot (HNSW) keeps them, filtered out of searches."""
        import faiss

        ids = np.ascontiguousarray(ids, np.int64)
        try:
            self.index.remove_ids(faiss.IDSelectorBatch(ids))
        except RuntimeError:
            self.removed = np.union1d(self.removed, ids)

    def _add_ids(self, ids: np.ndarray) -> None:
        for chunk_ids, vecs in self.store.vectors_of(ids):
            self.add(chunk_ids, vecs)

    def add(self, ids: np.ndarray, raw: np.ndarray) -> None:
        if len(ids):
            self.index.add_with_ids(self.store.transform(raw), np.ascontiguousarray(ids, np.int64))

    def apply(self, removed=(), add_ids=(), add_raw=None) -> None:
        """Mirror a committed change of the rows: ``removed`` ids go, ``add_ids`` (raw vectors) come.

        Call it after the rows' transaction commits, on an index loaded before that commit. Never
        rebuilds: an index type that cannot remove keeps the ids, filtered at search (see :meth:`compact`).
        """
        if self.deferred:
            self.pending = self.pending or bool(len(removed) or len(add_ids))
            return
        self.get()
        if len(removed):
            self._remove(np.asarray(removed, np.int64))
        if len(add_ids):
            self.add(np.asarray(add_ids, np.int64), add_raw)

    def compact(self) -> bool:
        """Rebuild when removed-but-kept ids exceed ``REMOVED_MAX_SHARE`` of the index (True when it did)."""
        if self.index is None or not len(self.removed):
            return False
        if len(self.removed) > REMOVED_MAX_SHARE * max(self.index.ntotal, 1):
            self.rebuild()
            return True
        return False

    def _new(self, factory: str):
        import faiss

        inner = faiss.index_factory(self.store.vector_dim, factory, self.store.metric.faiss)
        if hasattr(inner, "hnsw"):
            inner.hnsw.efConstruction = HNSW_EF_CONSTRUCTION
        return faiss.IndexIDMap2(inner)

    def rebuild(self):
        """A fresh FAISS index from the rows (trained on the stored vectors once enough exist to train it)."""
        n = self.store.count()
        wanted = self.store.factory(n)
        factory = trainable_factory(wanted, n, self.store.vector_dim)
        index = self._new(factory)
        if not index.is_trained:
            sample = self.store.training_sample(training_sample_size(factory))
            try:
                index.train(self.store.transform(sample))
            except RuntimeError:  # too few (or too alike) vectors for this factory: exact search until it trains
                factory = "Flat"
                index = self._new(factory)
        self.index, self.factory, self.removed = index, factory, np.zeros(0, np.int64)
        self.deferred = self.pending = False
        for ids, vecs in self.store.iter_vectors():
            self.add(ids, vecs)
        return index

    def needs_retrain(self) -> bool:
        """True when an index that trains is still exact (too few vectors until now) but can be trained now,
        or (IVF) was trained on a much smaller collection and should get more lists."""
        import faiss

        index = self.get()
        n = self.store.count()
        factory = self.store.factory(n)
        if factory == "Flat":
            return False
        inner = faiss.downcast_index(index.index)
        if isinstance(inner, faiss.IndexFlat):
            return trainable_factory(factory, n, self.store.vector_dim) != "Flat"
        if self.store.settings.index_type != "ivfpq":
            return False
        try:  # trained long ago on a much smaller collection: retrain with more lists
            return faiss.extract_index_ivf(inner).nlist * 4 <= _nlist(factory)
        except RuntimeError:
            return False

    # -- writing ------------------------------------------------------------------------------------
    def fingerprint(self) -> dict:
        return {"format": META_FORMAT, **self.store.space(), "factory": self.factory,
                "count": int(self.index.ntotal), "bytes": 0}

    def save(self) -> dict | None:
        """Write the vector file, then its fingerprint, each atomically (temporary file, fsync, rename)."""
        import faiss

        if self.index is None:
            return None
        directory = self.store.directory
        tmp = directory / f".{FAISS_NAME}.{os.getpid()}.tmp"
        tmp_meta = directory / f".{META_NAME}.{os.getpid()}.tmp"
        try:
            faiss.write_index(self.index, str(tmp))
            fsync(tmp)
            meta = self.fingerprint()
            meta["bytes"] = tmp.stat().st_size
            tmp_meta.write_text(json.dumps(meta))
            fsync(tmp_meta)
            os.replace(tmp, self.path)
            os.replace(tmp_meta, directory / META_NAME)
            fsync_dir(directory)
        except (RuntimeError, OSError) as e:
            tmp.unlink(missing_ok=True)
            tmp_meta.unlink(missing_ok=True)
            raise IndexError_(f"{self.path}: cannot write the vector file ({first_line(e)}); the previous one is intact") from None
        return meta

