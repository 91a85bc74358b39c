"""Index type ``sharded`` (``retrieve index PATHS --index-type sharded``): the search structure is a
:class:`retrieval.index.shards.ShardedVectors` collection in ``DIR/shards/`` instead of the in-memory
``vectors.faiss``.

Like ``vectors.faiss`` (retrieval/index/vectors.py) the collection is *derived* from the rows, which stay the
truth, and is reconciled with them whenever the index is opened:

- **Where.** ``DIR/shards/current.json`` names the current generation, ``DIR/shards/gen-NNNNN/`` (its
  float16 shard files, manifest with CRC-32s, trained quantisers and merged on-disk inverted lists), and
  records the vector space it was written in (head, metric, dimension: the fingerprint). A rebuild writes
  a new generation beside the old one and switches ``current.json`` (temporary, fsync, rename), so a kill
  at any moment leaves the old or the new collection, never a mix; a writer removes the generations no
  pointer names.
- **Reconciled on open.** Ids in the shards without a row (removed or replaced images) are filtered out of
  every search; rows not in the shards (committed after them: an interrupted run, or a run in progress)
  are searched exactly from an in-memory tail; a fingerprint of another vector space (the head was
  re-fitted), or a shard file that is missing or torn, makes the collection stale: searched exactly from
  the rows, rebuilt by the next writer.
- **Writing.** New rows are appended as new shards (at the end of a run, or every ``FLUSH_ROWS`` during
  one so that memory stays bounded), added to the trained index by worker processes and merged on disk;
  removed rows are filtered at search until they exceed ``REMOVED_MAX_SHARE`` of the collection, then the
  collection is rebuilt from the rows once, at the end of a run. A vector file never has to be rewritten
  whole for a new batch.
- **Exact until it trains.** Until the collection holds ``TRAIN_AT`` vectors (``RETRIEVE_SHARDED_TRAIN_AT``
  overrides it) the shards are searched exactly (loaded into an in-memory flat index); then IVF-PQ is
  trained on a sample (``sharded_factory``), every shard added and merged, and searches take ``k × 50``
  candidates from the memory-mapped lists and re-score them exactly from the memory-mapped float16 shards.
  The quantisers are trained again (the vector shards are not rewritten) when the collection has grown so
  much that it wants 4 × the lists.

``store.faiss_index()`` returns the :class:`ShardedIndex` itself: it answers ``search(q, k, params=None)``
with FAISS's conventions (inner products or squared L2 distances, best first, ``-1`` padding, ``params.sel``
honoured), exact scores, so :class:`retrieval.match.search.Searcher` needs no re-ranking of its own.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from retrieval.errors import IndexError_, RetrieveError
from retrieval.index.files import fsync, fsync_dir
from retrieval.index.shards import ShardedVectors, sharded_factory
from retrieval.index.vectors import REMOVED_MAX_SHARE, min_training


INDEX_TYPE = "sharded"
DIR_NAME = "shards"
POINTER = "current.json"
FORMAT = 1
DTYPE = "float16"  # half the disk of float32; re-scored cosines change by < 1e-4 (bench/results/scale-vectors.md)
TRAIN_AT = 20_000  # below this many vectors exact search over the shards is fast enough (and IVF-PQ barely trains)
TRAIN_AT_ENV = "RETRIEVE_SHARDED_TRAIN_AT"
SHARD_ROWS = 500_000  # vectors per shard when the collection is (re)written from the rows
FLUSH_ROWS = 65_536  # a run writes its new vectors out as a shard every this many (bounds the tail's memory)
WORKERS = 2  # worker processes adding shards to the trained index in parallel
PARALLEL_FROM = 100_000  # vectors to add before worker processes pay for their start (else added in-process)
READER_ROWS_MAX = 200_000  # a search over stale shards reads at most this many rows into memory (1 GB at 1280-d)
_GEN = re.compile(r"^gen-(\d{5,})$")


def train_at() -> int:
    """How many vectors the collection needs before IVF-PQ is trained (``RETRIEVE_SHARDED_TRAIN_AT``)."""
    raw = os.environ.get(TRAIN_AT_ENV)
    if raw is None or raw == "":
        return TRAIN_AT
    try:
        n = int(raw)
    except ValueError:
        n = 0
    if n < 1:
        raise RetrieveError(f"{TRAIN_AT_ENV}={raw!r}: not a positive whole number of vectors (unset it for "
                            f"the default, {TRAIN_AT})")
    return n


def shards_dir(index_dir: Path) -> Path:
    return Path(index_dir) / DIR_NAME


def read_pointer(index_dir: Path) -> dict | None:
    try:
        doc = json.loads((shards_dir(index_dir) / POINTER).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT or not _GEN.match(str(doc.get("generation", ""))):
        return None
    return doc


def _write_pointer(index_dir: Path, doc: dict) -> None:
    d = shards_dir(index_dir)
    path = d / POINTER
    tmp = d / f".{POINTER}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(doc, indent=1))
    fsync(tmp)
    os.replace(tmp, path)
    fsync_dir(d)


def disk_bytes(index_dir: Path) -> int:
    """Bytes of every file under ``DIR/shards`` (for ``retrieve info``'s size on disk)."""
    d = shards_dir(index_dir)
    if not d.is_dir():
        return 0
    return sum(p.stat().st_size for p in d.rglob("*") if p.is_file())


def _lists(factory: str) -> int:
    """The IVF lists of a factory string, wherever IVF stands in it (``PCAR256,IVF1024,PQ64``: 1024)."""
    m = re.search(r"IVF(\d+)", factory or "")
    return int(m.group(1)) if m else 1


def _covered(manifest: dict) -> int:
    """How many of the manifest's shards (a prefix) the merged index holds."""
    m = manifest.get("merged")
    if not m or not manifest.get("trained"):
        return 0
    total = 0
    for k, s in enumerate(manifest["shards"]):
        if total == m["count"]:
            return k
        total += s["count"]
    return len(manifest["shards"]) if total == m["count"] else 0


def _shard_ids(sv: ShardedVectors) -> np.ndarray:
    parts = [np.fromfile(sv.directory / s["ids"]["file"], np.int64) for s in sv.shards]
    return np.concatenate(parts) if parts else np.zeros(0, np.int64)


def _member(sorted_ids: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Which of ``x`` are in ``sorted_ids`` (sorted, unique): binary search, no sort of the large side."""
    if not len(sorted_ids) or not len(x):
        return np.zeros(len(x), bool)
    pos = np.minimum(np.searchsorted(sorted_ids, x), len(sorted_ids) - 1)
    return sorted_ids[pos] == x


class ShardedIndex:
    """The vectors of one ``sharded`` :class:`IndexStore`, kept equal to its rows (see the module docstring).

    Implements what the store asks of :class:`retrieval.index.vectors.Vectors` (``get``, ``apply``, ``compact``,
    ``needs_retrain``, ``rebuild``, ``save``, ``removed``) and, as the object ``get()`` returns, FAISS's
    ``ntotal``, ``d`` and ``search``.
    """

    def __init__(self, store):
        self.store = store
        self.sv = None  # the collection on disk (None: none yet, or stale)
        self.generation = ""
        self.disk_ids = np.zeros(0, np.int64)  # ids in the shard files, increasing
        self.removed = np.zeros(0, np.int64)  # ids in the shard files whose rows are gone (sorted): never results
        self.covered = 0  # shards the merged (IVF-PQ, memory-mapped) index holds and searches; 0: exact
        self.mem = None  # IDMap2(Flat): the shards the merged index does not hold, and the tail
        self.factory = ""
        self.stale = ""  # why the collection cannot be searched ("" when it can)
        self._loaded = False

    # -- FAISS-like face ---------------------------------------------------------------------------
    @property
    def ntotal(self) -> int:
        """Vectors searchable or filtered: the shards' (removed ones included, like HNSW's) and the tail's."""
        self.get()
        return len(self.disk_ids) + len(self._tail_ids())

    @property
    def d(self) -> int:
        return self.store.vector_dim

    def _metric_name(self) -> str:
        return "ip" if self.store.metric.similarity else "l2"

    def _new_mem(self):
        import faiss

        return faiss.IndexIDMap2(faiss.IndexFlat(self.store.vector_dim, self.store.metric.faiss))

    def _mem_ids(self) -> np.ndarray:
        import faiss

        if self.mem is None or not self.mem.ntotal:
            return np.zeros(0, np.int64)
        return faiss.vector_to_array(self.mem.id_map)

    def _tail_ids(self) -> np.ndarray:
        """Ids in memory that are in no shard (rows committed after the shards were written), increasing."""
        ids = self._mem_ids()
        return np.sort(ids[~_member(self.disk_ids, ids)])

    def search(self, q: np.ndarray, k: int, params=None) -> tuple[np.ndarray, np.ndarray]:
        """Top ``k`` like FAISS's ``Index.search`` (``params.sel`` honoured), exact scores, best first."""
        self.get()
        q = np.ascontiguousarray(np.atleast_2d(q), np.float32)
        sim = self.store.metric.similarity
        worst = -np.finfo(np.float32).max if sim else np.finfo(np.float32).max
        sel = getattr(params, "sel", None) if params is not None else None
        parts = []
        if self.mem is not None and self.mem.ntotal:
            kk = min(k, self.mem.ntotal)
            parts.append(self.mem.search(q, kk, params=params) if params is not None else self.mem.search(q, kk))
        if self.covered:
            removed = self.removed

            def keep(c: np.ndarray) -> np.ndarray:
                ok = ~_member(removed, c)
                if sel is not None:
                    ok[ok] = np.fromiter((sel.is_member(int(i)) for i in c[ok]), bool, int(ok.sum()))
                return ok

            s, i = self.sv.search(q, k, keep=keep)
            parts.append((np.where(i >= 0, s, worst).astype(np.float32), i))
        if not parts:
            return np.full((len(q), k), worst, np.float32), np.full((len(q), k), -1, np.int64)
        s = np.concatenate([p[0] for p in parts], 1)
        i = np.concatenate([p[1] for p in parts], 1)
        key = np.where(i >= 0, -s if sim else s, np.inf)
        order = np.argsort(key, axis=1, kind="stable")[:, :k]
        s, i = np.take_along_axis(s, order, 1), np.take_along_axis(i, order, 1)
        if s.shape[1] < k:
            pad = k - s.shape[1]
            s = np.hstack([s, np.full((len(q), pad), worst, np.float32)])
            i = np.hstack([i, np.full((len(q), pad), -1, np.int64)])
        return s, i

    # -- loading and reconciling ---------------------------------------------------------------------
    def get(self) -> "ShardedIndex":
        if not self._loaded:
            self._load()
        return self

    def _open(self) -> tuple[ShardedVectors | None, str, str]:
        """``(collection, generation, why not)``: the current collection when it matches the vector space."""

        d = shards_dir(self.store.directory)
        doc = read_pointer(self.store.directory)
        if doc is None:
            return None, "", "" if not (d / POINTER).exists() else f"{d / POINTER}: unreadable"
        gen = doc["generation"]
        if doc.get("space") != self.store.space():
            return None, gen, "the shards were written in another vector space (the head was re-fitted)"
        try:
            sv = ShardedVectors.open(d / gen, check=True)
        except IndexError_ as e:
            return None, gen, str(e)
        if sv.dim != self.store.vector_dim or sv.manifest["metric"] != self._metric_name():
            return None, gen, "the shards have another dimension or metric"
        return sv, gen, ""

    def _load(self) -> None:
        self._loaded = True
        sv, why = None, ""
        for _ in range(2):  # a writer may switch generations meanwhile: read again once
            sv, gen, why = self._open()
            if sv is None or self._adopt(sv, gen):
                break
            sv, why = None, "the shards changed while they were read"
        if sv is not None:
            self._clean_generations()
            return
        self.stale = why  # "": none written yet (not stale)
        n = self.store.count()
        if self.store.writable and why and n:
            self.rebuild()  # a writer heals at once
            return
        if why and n > READER_ROWS_MAX:  # too many to search exactly from the rows in this process's memory
            raise IndexError_(f"{shards_dir(self.store.directory)}: {why}; rewrite the shards from the rows with "
                              f"`retrieve check --repair --index {self.store.directory}`")
        self.sv, self.generation, self.covered = None, "", 0
        self.disk_ids, self.removed = np.zeros(0, np.int64), np.zeros(0, np.int64)
        self.mem = self._new_mem()
        self._add_rows(self.store.row_ids())  # exact, from the rows
        if self.store.writable:
            self._clean_generations()

    def _adopt(self, sv: ShardedVectors, gen: str) -> bool:
        """Take ``sv`` as the collection, reconciled with the rows; False when its files vanished meanwhile."""
        try:
            disk = _shard_ids(sv)
        except (OSError, ValueError):
            return False
        rows = np.sort(self.store.row_ids())
        self.sv, self.generation, self.disk_ids, self.stale = sv, gen, disk, ""
        self.removed = np.sort(disk[~_member(rows, disk)])
        covered = _covered(sv.manifest)
        if covered:
            try:
                sv.index()  # the merged index opens (its lists memory-mapped)
                for k in range(covered):  # and every shard it re-scores from: mapped now, so that a long-lived
                    sv._map(k)  # searcher keeps its files when a writer later replaces this generation
            except (RuntimeError, IndexError_, OSError, ValueError):
                covered = 0  # a damaged merged index: exact until a writer builds it again
        self.covered = covered
        self.factory = sv.manifest["factory"] if covered else "Flat"
        self.mem = self._new_mem()
        for k in range(covered, len(sv.shards)):  # shards the merged index does not hold (all, while exact)
            self._add_shard_to_mem(k)
        self._add_rows(rows[~_member(disk, rows)])
        return True

    def _add_shard_to_mem(self, k: int) -> None:
        s = self.sv.shards[k]
        ids = np.fromfile(self.sv.directory / s["ids"]["file"], np.int64)
        vec = np.fromfile(self.sv.directory / s["vectors"]["file"], self.sv.dtype).reshape(-1, self.sv.dim)
        live = ~_member(self.removed, ids)
        if live.any():
            self.mem.add_with_ids(np.ascontiguousarray(vec[live], np.float32), ids[live])

    def _add_rows(self, ids: np.ndarray) -> None:
        if len(ids):
            for cids, raw in self.store.vectors_of(ids):
                self.mem.add_with_ids(self.store.transform(raw), np.ascontiguousarray(cids, np.int64))

    def _clean_generations(self) -> None:
        """A writer removes generations no pointer names (a killed rebuild's, or the one a rebuild replaced)."""
        if not self.store.writable:
            return
        d = shards_dir(self.store.directory)
        for p in d.iterdir() if d.is_dir() else ():
            if p.is_dir() and _GEN.match(p.name) and p.name != self.generation:
                shutil.rmtree(p, ignore_errors=True)
            elif p.is_file() and p.name.startswith(f".{POINTER}.") and p.name.endswith(".tmp"):
                p.unlink(missing_ok=True)

    # -- changes -----------------------------------------------------------------------------------
    def apply(self, removed=(), add_ids=(), add_raw=None) -> None:
        """Mirror a committed change of the rows (after its transaction): removed ids are filtered (or
        leave the memory part), added ones join the tail; a writer writes the tail out every ``FLUSH_ROWS``."""
        import faiss

        self.get()
        removed = np.asarray(removed, np.int64)
        if len(removed):
            on_disk = removed[_member(self.disk_ids, removed)]
            if len(on_disk):
                self.removed = np.union1d(self.removed, on_disk)
            self.mem.remove_ids(faiss.IDSelectorBatch(np.ascontiguousarray(removed)))
        if len(add_ids):
            self.mem.add_with_ids(self.store.transform(add_raw), np.ascontiguousarray(add_ids, np.int64))
            if self.store.writable and not self.stale and len(self._tail_ids()) >= FLUSH_ROWS:
                self._flush()

    def compact(self) -> bool:
        """Rebuild from the rows when removed ids exceed ``REMOVED_MAX_SHARE`` of the shards (True when it did)."""
        self.get()
        if len(self.removed) and len(self.removed) > REMOVED_MAX_SHARE * max(len(self.disk_ids), 1):
            self.rebuild()
            return True
        return False

    def needs_retrain(self) -> bool:
        """Always False: training is part of :meth:`save` (the vector shards need no rewriting for it)."""
        return False

    # -- writing -------------------------------------------------------------------------------------
    @contextmanager
    def _writing(self):
        """The collection's own writer lock is held only while writing (the store's lock guards the index)."""
        try:
            yield
        finally:
            if self.sv is not None and self.sv._lock is not None:
                self.sv._lock.release()
                self.sv._lock = None

    def _new_generation(self) -> tuple[ShardedVectors, str]:

        d = shards_dir(self.store.directory)
        d.mkdir(parents=True, exist_ok=True)
        n = max([int(m.group(1)) for p in d.iterdir() if (m := _GEN.match(p.name))] + [0]) + 1
        gen = f"gen-{n:05d}"
        return ShardedVectors.create(d / gen, self.store.vector_dim, self._metric_name(), DTYPE), gen

    def _pointer_doc(self) -> dict:
        return {"format": FORMAT, "generation": self.generation, "space": self.store.space(),
                "dtype": DTYPE, "factory": self.factory, "count": int(len(self.disk_ids)),
                "removed": int(len(self.removed))}

    def rebuild(self) -> "ShardedIndex":
        """Write the collection afresh from the rows as a new generation, train it when large enough, switch
        ``current.json`` to it and remove the old one."""
        sv, gen = self._new_generation()
        self.sv, self.generation = sv, gen
        with self._writing():
            it = iter(self._row_chunks())
            nxt = next(it, None)
            while nxt is not None:
                def shard():
                    nonlocal nxt
                    n = 0
                    while nxt is not None and (n == 0 or n + len(nxt[0]) <= SHARD_ROWS):
                        c, n = nxt, n + len(nxt[0])
                        nxt = next(it, None)
                        yield c

                sv.append(None, shard())
            self.disk_ids = _shard_ids(sv)
            self.removed = np.zeros(0, np.int64)
            self.mem, self.covered = self._new_mem(), 0
            self._train_and_build(reload=True)
        self.stale = ""
        _write_pointer(self.store.directory, self._pointer_doc())
        self._clean_generations()  # the one it replaced, and any a killed writer left
        self._loaded = True
        return self

    def _row_chunks(self):
        for ids, raw in self.store.iter_vectors():
            yield ids, self.store.transform(raw)

    def _train_and_build(self, reload: bool = False) -> None:
        """Train when due (or retrain when grown 4×), add the shards the merged index lacks, merge; then
        memory holds only the tail. While too small to train: exact, every live shard vector in memory
        (``reload``: memory was emptied, read the shards into it again)."""

        sv = self.sv
        n = sv.count
        want = sharded_factory(sv.dim, max(n, 1))
        trained = bool(sv.manifest.get("trained") and sv.manifest.get("factory"))
        can = n >= max(train_at(), min_training(want))
        if can and (not trained or _lists(sv.manifest["factory"]) * 4 <= _lists(want)):
            sv.train(want)  # first training, or grown much larger: more lists (the shard files stay as they are)
            trained = True
        if trained and (_covered(sv.manifest) < len(sv.shards) or any(not s.get("index") for s in sv.shards)):
            todo = sum(s["count"] for s in sv.shards if not s.get("index"))  # a small addition: no process starts
            sv.build(workers=min(WORKERS, os.cpu_count() or 1) if todo >= PARALLEL_FROM else 1)
        covered = _covered(sv.manifest) if trained else 0
        tail = self._tail_ids()
        if covered and covered == len(sv.shards):  # all merged: only the tail stays in memory
            mem = self._new_mem()
            if len(tail):
                mem.add_with_ids(np.ascontiguousarray(self.mem.reconstruct_batch(tail), np.float32), tail)
            sv._index = None  # the new merged index is opened at the next search
            self.mem, self.covered, self.factory = mem, covered, sv.manifest["factory"]
        else:  # exact: memory already holds every shard vector unless it was emptied or was not exact
            if reload or self.covered:
                mem = self._new_mem()
                if len(tail):
                    mem.add_with_ids(np.ascontiguousarray(self.mem.reconstruct_batch(tail), np.float32), tail)
                self.mem, self.covered = mem, 0
                for k in range(len(sv.shards)):
                    self._add_shard_to_mem(k)
            self.factory = "Flat"

    def _flush(self) -> None:
        """Write the tail out as new shard(s) and bring the index over them (writers only)."""
        tail = self._tail_ids()
        if self.sv is None:
            if not len(tail):
                return
            self.sv, self.generation = self._new_generation()
            _write_pointer(self.store.directory, self._pointer_doc())
        sv = self.sv
        if len(tail) and sv.shards and tail[0] <= sv.shards[-1]["last_id"]:
            self.rebuild()  # an id below the stored ones (cannot be appended): write it all again
            return
        with self._writing():
            for a in range(0, len(tail), SHARD_ROWS):
                ids = tail[a:a + SHARD_ROWS]
                sv.append(ids, self.mem.reconstruct_batch(ids))
            if len(tail):
                self.disk_ids = np.concatenate([self.disk_ids, tail])
            self._train_and_build()

    def save(self) -> dict | None:
        """Everything written: the tail as new shards, trained and merged when due, ``current.json``."""
        if not self._loaded:
            return None
        if self.stale and self.store.count():
            self.rebuild()
        else:
            self._flush()
        if self.sv is None:
            return None
        doc = self._pointer_doc()
        _write_pointer(self.store.directory, doc)
        return doc


# -- check / info ------------------------------------------------------------------------------------
def check_state(store, full: bool = True) -> dict:
    """Read-only state of the sharded vectors for ``retrieve check``: ``state`` (ok, missing, stale, damaged),
    ``count``, ``ids`` (in the shards), ``problems`` (messages naming each bad file, checksums when ``full``)."""

    out = {"state": "ok", "count": 0, "ids": np.zeros(0, np.int64), "problems": []}
    doc = read_pointer(store.directory)
    if doc is None:
        exists = (shards_dir(store.directory) / POINTER).exists()
        out["state"] = "damaged" if exists else "missing"
        if exists:
            out["problems"].append(f"{shards_dir(store.directory) / POINTER}: unreadable")
        return out
    try:
        sv = ShardedVectors.open(shards_dir(store.directory) / doc["generation"], check=False)
    except IndexError_ as e:
        out["state"], out["problems"] = "damaged", [str(e)]
        return out
    bad = sv.check(full=full)
    if bad:
        out["state"], out["problems"] = "damaged", [m for _, m in bad]
        return out
    if doc.get("space") != store.space():
        out["state"] = "stale"
    out["ids"] = _shard_ids(sv)
    out["count"] = len(out["ids"])
    return out


def info(store) -> dict:
    """What ``retrieve info`` says about the sharded vectors: shards, count, search, bytes on disk by kind."""

    doc = read_pointer(store.directory)
    if doc is None:
        return {"shards": 0, "vectors": 0, "search": "none yet"}
    try:
        sv = ShardedVectors.open(shards_dir(store.directory) / doc["generation"], check=False)
    except IndexError_ as e:
        return {"shards": 0, "vectors": 0, "search": f"unreadable ({e})"}
    covered = _covered(sv.manifest)
    search = (f"{sv.manifest['factory']}, memory-mapped, re-scored exactly" if covered
              else f"exact until {train_at():,} vectors")
    return {"shards": len(sv.shards), "vectors": sv.count, "removed_filtered": int(doc.get("removed", 0)),
            "search": search, "dtype": sv.dtype, "generation": doc["generation"],
            "disk_bytes": sv.disk_bytes()}
