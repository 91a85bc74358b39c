"""Index type ``sharded`` (``retrieve index PATHS --index-type sharded``): vectors in checksummed shard files and a
sharded IVF-PQ index over them, searched memory-mapped, for collections of millions of images.

**Files** (:class:`ShardedVectors`, one collection: ``DIR/shards/`` for an index). ``current.json`` names the
current generation folder ``gen-NNNNN/`` and every file in it with its size and CRC-32; the index adds the vector
space the vectors were written in (head, metric, dimension). In the generation folder:

- ``shard-NNNNN.vec`` and ``shard-NNNNN.ids``: the vectors (float16 for an index) and their int64 ids, increasing
  across shards; written once, appended to by new shards.
- ``trained-T.index``: the quantisers trained on a random sample (``sharded_factory``); ``shard-NNNNN.T.index``:
  each shard added to a copy of it, in worker processes (``python -m retrieval.index.sharded``);
  ``merged-M.index`` and ``merged-M.ivfdata``: their inverted lists merged into one on-disk file (FAISS's
  ``OnDiskInvertedLists``) that searches memory-map; only the quantisers are read into RAM.

**One crash protocol.** (1) Every file is written under a temporary name, fsynced and renamed, under a name the
committed ``current.json`` does not use (a new shard, training T, merge M or generation). (2) :meth:`commit`
writes ``current.json`` the same way, after an fsync of the generation folder: before that rename nothing of the
change counts, after it all of it does. (3) A writer, holding its owner's lock (an index's own ``DIR/lock``),
removes what ``current.json`` does not name: other generations, files of this one, temporaries. Readers read
``current.json`` once and open only what it names; sizes are compared on open (a torn file is refused, named),
CRC-32s by :meth:`check`. A damaged derived file is rebuilt by :meth:`build`; damaged vectors are written again
from their source as a new generation (for an index: from its rows, ``retrieve check --repair``).

**The index** (:class:`ShardedIndex`, the vector side of one ``sharded`` IndexStore, what the in-memory
``vectors.faiss`` is for the other types). The rows stay the truth and the collection is reconciled with them on
every open: ids in the shards without a row are filtered out of every search; rows not in the shards (committed
after them: an interrupted run, or a run in progress) are searched exactly from an in-memory tail; another vector
space (the head was re-fitted) or a missing or torn file makes the collection stale: searched exactly from the
rows, rewritten by the next writer as a new generation. A run's new rows are appended as new shards (every
``FLUSH_ROWS`` during it, so that memory stays bounded, and at its end), added to the trained index and merged;
removed rows are filtered until they exceed ``REMOVED_MAX_SHARE``, then the collection is rewritten once. Until it
holds ``TRAIN_AT`` vectors (``RETRIEVE_SHARDED_TRAIN_AT``) the shards are searched exactly from memory; then IVF-PQ
is trained, and searches take ``k × RERANK`` candidates from the memory-mapped lists and re-score them exactly
from the memory-mapped shards. The quantisers are trained again (the vector shards stay) once the collection
wants 4 × the lists. ``store.faiss_index()`` returns the :class:`ShardedIndex`: it answers ``search(q, k,
params=None)`` with FAISS's conventions and exact scores.

**Why float16 shard files** (bench/results/scale-vectors.md): half the disk of float32 SQLite blobs (2.6 vs 5.5 KB
per 1280-d vector), written faster, re-scored cosines within 1e-4 (top-10 unchanged).
"""
from __future__ import annotations

import itertools
import json
import os
import re
import shutil
import subprocess
import sys
import time
import zlib
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np

from retrieval.errors import IndexError_, RetrieveError
from retrieval.index.files import fsync, fsync_dir
from retrieval.index.vectors import REMOVED_MAX_SHARE, min_training

DIR_NAME = "shards"
POINTER = "current.json"
FORMAT = 2  # 1: current.json named the generation, and the generation's own manifest.json its files (still read)
DTYPES = ("float16", "float32")
DTYPE = "float16"  # an index's shards: half the disk of float32, re-scored cosines change by < 1e-4 (bench)
ADD_CHUNK = 65_536  # vectors added to FAISS per call (bounds a worker's memory)
TRAIN_PER_LIST = 40  # training sample per IVF list (FAISS warns below 39)
IVF_NITER = 10  # k-means iterations of the coarse quantiser (FAISS's default 25 costs 2.5x for little gain)
PQ_TRAIN = 10_000  # a product quantiser's 256 codes want ≥ 39 points each
PCA_DIM = 256  # vectors wider than this are PCA-reduced to it before IVF-PQ (see sharded_factory)
RERANK = 50  # candidates per result re-scored exactly: ×10 gave recall@10 0.88 at 1 M whitened 128-d, ×50 0.99 (bench)
TRAIN_AT = 20_000  # below this many vectors exact search over the shards is fast enough (and IVF-PQ barely trains)
TRAIN_AT_ENV = "RETRIEVE_SHARDED_TRAIN_AT"
SHARD_ROWS = 500_000  # vectors per shard (about) when the collection is (re)written from the rows
FLUSH_ROWS = 65_536  # a run writes its new vectors out as a shard every this many (bounds the tail's memory)
WORKERS = 2  # worker processes adding shards to the trained index in parallel
PARALLEL_FROM = 100_000  # vectors to add before worker processes pay for their start (else added in-process)
READER_ROWS_MAX = 200_000  # a search over stale shards reads at most this many rows into memory (1 GB at 1280-d)
_GEN = re.compile(r"^gen-(\d{5,})$")


class ShardError(IndexError_):
    """A shard file is missing, truncated or does not match its checksum."""


# -- choices --------------------------------------------------------------------------------------------
def sharded_factory(dim: int, n: int) -> str:
    """IVF-PQ for ``n`` vectors of ``dim``: about 4·√n lists (a power of two), capped so that k-means
    stays cheap (4096 lists up to 256-d, 1024 above); PQ with the most sub-quantisers (≤ 64) of ≥ 4 dimensions
    each (128-d: PQ32, 32-byte codes). Above 256-d a PCA with random rotation to ``PCA_DIM`` dimensions comes
    first (1280-d: ``PCAR256,IVF…,PQ64``, 64-byte codes): at 200 k × 1280, side by side on the same vectors,
    the same recall@10 as ``IVF1024,PQ64`` (0.785 vs 0.788 with 100 candidates re-scored, 1.0 both with 500)
    and a 3.3× faster build (bench/results/scale-vectors.md)."""
    cap = 4096 if dim <= 256 else 1024
    nlist = 1 << max(4, int(round(np.log2(max(4 * np.sqrt(max(n, 1)), 16)))))
    nlist = max(16, min(cap, nlist, max(16, n // TRAIN_PER_LIST)))
    reduced = min(dim, PCA_DIM) if dim > PCA_DIM else dim
    m = next((m for m in (64, 32, 16, 8, 4, 2) if reduced % m == 0 and reduced // m >= 4), 1)
    return (f"PCAR{reduced}," if reduced < dim else "") + f"IVF{nlist},PQ{m}"


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


def _lists(factory: str) -> int:
    """The IVF lists of a factory string, wherever IVF stands in it (``PCAR256,IVF1024,PQ64``: 1024)."""
    m = re.search(r"IVF(\d+)", factory or "")
    return int(m.group(1)) if m else 1


# -- files ----------------------------------------------------------------------------------------------
def _crc_file(path: Path, block: int = 1 << 22) -> int:
    crc = 0
    with open(path, "rb") as f:
        while b := f.read(block):
            crc = zlib.crc32(b, crc)
    return crc


def _describe(path: Path) -> dict:
    return {"file": path.name, "bytes": path.stat().st_size, "crc32": _crc_file(path)}


def _write(path: Path, fill: Callable[[Path], None]) -> None:
    """``fill(tmp)`` writes the file under a temporary name; then it is fsynced and renamed to ``path``."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        fill(tmp)
        fsync(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _write_arrays(path: Path, chunks: Iterable[np.ndarray]) -> dict:
    """Write ``chunks`` (raw bytes) to ``path`` atomically; ``{file, bytes, crc32}``."""
    got = {"bytes": 0, "crc32": 0}

    def fill(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            for c in chunks:
                b = memoryview(np.ascontiguousarray(c)).cast("B")
                f.write(b)
                got["crc32"], got["bytes"] = zlib.crc32(b, got["crc32"]), got["bytes"] + len(b)

    _write(path, fill)
    return {"file": path.name, **got}


def _write_faiss(index, path: Path) -> dict:
    import faiss

    _write(path, lambda tmp: faiss.write_index(index, str(tmp)))
    return _describe(path)


def _add_shard(trained: str, vec: str, ids: str, dtype: str, dim: int, count: int, out: str,
               threads: int) -> dict:
    """Worker: add one shard's vectors to a copy of the trained index and write it (atomically)."""
    import faiss

    faiss.omp_set_num_threads(threads)
    index = faiss.read_index(trained)
    v = np.memmap(vec, dtype=dtype, mode="r", shape=(count, dim)) if count else np.zeros((0, dim), dtype)
    i = np.fromfile(ids, dtype=np.int64, count=count)
    for s in range(0, count, ADD_CHUNK):
        index.add_with_ids(np.ascontiguousarray(v[s:s + ADD_CHUNK], np.float32), i[s:s + ADD_CHUNK])
    del v
    return _write_faiss(index, Path(out))


def _run_workers(jobs: list[tuple], workers: int, done: list[str], say) -> list[dict]:
    """Run :func:`_add_shard` jobs in up to ``workers`` child processes (``python -m retrieval.index.sharded``).

    Plain child processes, not a fork of this one (FAISS's OpenMP runtime does not survive ``fork``) and
    not multiprocessing's spawn (which re-imports the caller's main module).
    """
    root = str(Path(__file__).resolve().parents[2])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([root] + [p for p in [os.environ.get("PYTHONPATH")] if p])}
    results: list[dict | None] = [None] * len(jobs)
    running: dict[int, subprocess.Popen] = {}
    nxt = 0
    try:
        while nxt < len(jobs) or running:
            while nxt < len(jobs) and len(running) < workers:
                running[nxt] = subprocess.Popen([sys.executable, "-m", "retrieval.index.sharded", json.dumps(jobs[nxt])],
                                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True)
                nxt += 1
            i, p = next(iter(running.items()))
            for j, q in running.items():  # the first one that has finished, else wait for the oldest
                if q.poll() is not None:
                    i, p = j, q
                    break
            out, err = p.communicate()
            del running[i]
            if p.returncode != 0:
                last = (err.strip().splitlines() or [f"exit status {p.returncode}"])[-1]
                raise IndexError_(f"{jobs[i][1]}: adding the shard failed ({last})")
            results[i] = json.loads(out.strip().splitlines()[-1])
            say(done[i])
    finally:
        for p in running.values():
            p.kill()
            p.wait()
    return results  # type: ignore[return-value]


@contextmanager
def _quiet_stdout():
    """File descriptor 1 goes to /dev/null inside (C code's printf included: its buffer is flushed before
    the descriptor is given back), so that ``--json`` output stays JSON."""
    import ctypes

    try:
        libc = ctypes.CDLL(None)
        sys.stdout.flush()
        saved = os.dup(1)
    except (OSError, ValueError, AttributeError):
        yield
        return
    null = os.open(os.devnull, os.O_WRONLY)
    try:
        libc.fflush(None)
        os.dup2(null, 1)
        yield
    finally:
        libc.fflush(None)
        os.dup2(saved, 1)
        os.close(saved)
        os.close(null)


# -- the collection ---------------------------------------------------------------------------------------
class ShardedVectors:
    """``ROOT/current.json`` and the generation folder it names (see the module docstring).

    :meth:`new` starts a generation and :meth:`open` reads the committed one; :meth:`append`, :meth:`train` and
    :meth:`build` write files that count once :meth:`commit` has named them.
    """

    def __init__(self, root: str | os.PathLike, doc: dict, writable: bool = False):
        self.root, self.doc, self.writable = Path(root), doc, writable
        self._index = None
        self._maps: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    @classmethod
    def new(cls, root: str | os.PathLike, dim: int, metric: str = "ip", dtype: str = DTYPE) -> "ShardedVectors":
        """An empty collection in a new generation folder under ``root``, to write (the caller holds the writer
        lock); the committed one, if any, stays current until :meth:`commit`."""
        if metric not in ("ip", "l2"):
            raise IndexError_(f"unknown metric {metric!r} (ip or l2)")
        if dtype not in DTYPES:
            raise IndexError_(f"unknown vector type {dtype!r} ({' or '.join(DTYPES)})")
        root = Path(root)
        root.mkdir(parents=True, exist_ok=True)
        n = max([int(m.group(1)) for p in root.iterdir() if (m := _GEN.match(p.name))] + [0]) + 1
        self = cls(root, {"format": FORMAT, "generation": f"gen-{n:05d}", "dim": int(dim), "metric": metric,
                          "dtype": dtype, "factory": None, "trained": None, "shards": [], "merged": None}, True)
        self.directory.mkdir()
        return self

    @classmethod
    def open(cls, root: str | os.PathLike, writable: bool = False, check: bool = True) -> "ShardedVectors":
        """The committed collection; :class:`ShardError` when ``current.json`` is unreadable or (``check``) a file
        it names is missing or has the wrong size. ``writable``: the caller holds the writer lock; what
        ``current.json`` does not name (a killed writer's files) is removed now."""
        root = Path(root)
        path = root / POINTER
        try:
            doc = json.loads(path.read_text())
        except FileNotFoundError:
            raise IndexError_(f"{root}: no sharded vectors here ({POINTER} missing)") from None
        except (OSError, ValueError) as e:
            raise ShardError(f"{path}: unreadable ({e})") from None
        old = isinstance(doc, dict) and doc.get("format") == 1 and _GEN.match(str(doc.get("generation")))
        if old:
            try:  # format 1: the generation's manifest.json named the files; read as one document
                doc = {**json.loads((root / doc["generation"] / "manifest.json").read_text()), "format": FORMAT,
                       **{k: doc.get(k) for k in ("generation", "space", "removed")}}
            except (OSError, ValueError, TypeError) as e:
                raise ShardError(f"{root / doc['generation'] / 'manifest.json'}: unreadable ({e})") from None
        if not isinstance(doc, dict) or doc.get("format") != FORMAT or not _GEN.match(str(doc.get("generation"))):
            raise ShardError(f"{path}: not a format-{FORMAT} collection")
        self = cls(root, doc, writable)
        bad = self.check(full=False) if check else []
        if bad:
            raise ShardError(bad[0][1])
        if writable and old:  # rewritten as one document before its manifest.json goes
            self.commit()
        elif writable:
            self.clean()
        return self

    def close(self) -> None:
        self._index = None
        self._maps.clear()

    @property
    def directory(self) -> Path:
        return self.root / self.doc["generation"]

    @property
    def dim(self) -> int:
        return int(self.doc["dim"])

    @property
    def dtype(self) -> str:
        return self.doc["dtype"]

    @property
    def count(self) -> int:
        return sum(s["count"] for s in self.shards)

    @property
    def shards(self) -> list[dict]:
        return self.doc["shards"]

    def ids(self) -> np.ndarray:
        """Every stored id, increasing (read from the id files)."""
        parts = [np.fromfile(self.directory / s["ids"]["file"], np.int64) for s in self.shards]
        return np.concatenate(parts) if parts else np.zeros(0, np.int64)

    def covered(self) -> int:
        """How many of the shards (a prefix) the merged index holds."""
        m = self.doc.get("merged")
        if not m or not self.doc.get("trained"):
            return 0
        total = 0
        for k, s in enumerate(self.shards):
            if total == m["count"]:
                return k
            total += s["count"]
        return len(self.shards) if total == m["count"] else 0

    def disk_bytes(self) -> dict:
        """Bytes on disk by kind: raw vectors (+ids), per-shard indexes, the merged index."""
        out = {"vectors": 0, "shard_indexes": 0, "merged": 0, "trained": 0}
        for s in self.shards:
            out["vectors"] += s["vectors"]["bytes"] + s["ids"]["bytes"]
            out["shard_indexes"] += s["index"]["bytes"] if s.get("index") else 0
        if m := self.doc.get("merged"):
            out["merged"] = m["index"]["bytes"] + m["ivfdata"]["bytes"]
        if self.doc.get("trained"):
            out["trained"] = self.doc["trained"]["bytes"]
        return out

    # -- committing ------------------------------------------------------------------------------------------
    def _writer(self) -> None:
        if not self.writable:
            raise IndexError_(f"{self.root}: opened for reading; a writer opens it with writable=True")

    def _named(self) -> Iterator[dict]:
        m = self.doc
        yield from [m["trained"]] if m.get("trained") else []
        for s in m["shards"]:
            yield from [s["vectors"], s["ids"]] + ([s["index"]] if s.get("index") else [])
        yield from [m["merged"]["index"], m["merged"]["ivfdata"]] if m.get("merged") else []

    def commit(self, **extra) -> dict:
        """Make everything written so far count: ``current.json`` (with the owner's ``extra`` fields) names this
        generation and its files; then what it does not name is removed."""
        self._writer()
        self.doc.update(extra, count=self.count)
        fsync_dir(self.directory)  # the files it names are durably there before it names them
        _write(self.root / POINTER, lambda tmp: tmp.write_text(json.dumps(self.doc, indent=1)))
        fsync_dir(self.root)
        self.clean()
        return self.doc

    def clean(self) -> None:
        """Remove what ``current.json`` does not name: other generations, this one's other files, temporaries."""
        self._writer()
        for p in self.root.iterdir():
            if p.is_dir() and _GEN.match(p.name) and p.name != self.doc["generation"]:
                shutil.rmtree(p, ignore_errors=True)
            elif p.is_file() and p.name.startswith(".") and p.name.endswith(".tmp"):
                p.unlink(missing_ok=True)
        named = {d["file"] for d in self._named()}
        for p in self.directory.iterdir() if self.directory.is_dir() else ():
            if p.name not in named and p.is_file():
                p.unlink(missing_ok=True)

    # -- writing -----------------------------------------------------------------------------------------
    def append(self, ids: np.ndarray | None, vectors: np.ndarray | Iterable[tuple[np.ndarray, np.ndarray]]) -> dict:
        """Write one new shard: ``ids`` (increasing, above every stored id) and their vectors.

        ``vectors`` is an (n, dim) array, or ``ids`` is None and ``vectors`` yields ``(ids, vecs)``
        chunks (so a shard larger than RAM can be written). The index does not hold it until :meth:`build`.
        """
        self._writer()
        name = f"shard-{len(self.shards):05d}"
        chunks = [(np.asarray(ids), vectors)] if ids is not None else vectors
        state = {"first": None, "last": self.shards[-1]["last_id"] if self.shards else -1, "n": 0}
        id_chunks: list[np.ndarray] = []

        def vec_chunks():
            for cids, cvecs in chunks:
                cids = np.ascontiguousarray(cids, np.int64)
                cvecs = np.asarray(cvecs)
                if cvecs.ndim != 2 or cvecs.shape[1] != self.dim or len(cvecs) != len(cids):
                    raise IndexError_(f"{name}: vectors of shape {cvecs.shape} for {len(cids)} ids; "
                                      f"expected ({len(cids)}, {self.dim})")
                if len(cids) and (cids[0] <= state["last"] or np.any(np.diff(cids) <= 0)):
                    raise IndexError_(f"{name}: ids must increase and exceed the last stored id ({state['last']})")
                if len(cids):
                    state["first"] = int(cids[0]) if state["first"] is None else state["first"]
                    state["last"], state["n"] = int(cids[-1]), state["n"] + len(cids)
                id_chunks.append(cids)
                yield cvecs.astype(self.dtype, copy=False)

        vec = _write_arrays(self.directory / f"{name}.vec", vec_chunks())
        idsf = _write_arrays(self.directory / f"{name}.ids", id_chunks)
        if state["n"] == 0:
            (self.directory / vec["file"]).unlink()
            (self.directory / idsf["file"]).unlink()
            raise IndexError_(f"{name}: no vectors to write")
        entry = {"name": name, "count": state["n"], "first_id": state["first"], "last_id": state["last"],
                 "vectors": vec, "ids": idsf, "index": None}
        self.shards.append(entry)
        return entry

    # -- checking --------------------------------------------------------------------------------------------
    def _problem(self, desc: dict, what: str = "file", full: bool = True) -> str:
        """What is wrong with a file ``current.json`` names ("" when nothing): sizes, and with ``full`` CRC-32s."""
        p = self.directory / desc["file"]
        try:
            size = p.stat().st_size
        except OSError:
            return f"{p}: {what} missing"
        if size != desc["bytes"]:
            return f"{p}: {what} truncated or torn ({size} bytes, {POINTER} says {desc['bytes']})"
        if full and _crc_file(p) != desc["crc32"]:
            return f"{p}: {what} does not match its checksum (corrupted)"
        return ""

    def check(self, full: bool = True) -> list[tuple[str, str]]:
        """Problems as ``(part, message)``: ``part`` is a shard's name (``.index`` for its index), ``trained`` or
        ``merged``. ``full=False`` compares sizes only (fast); ``full=True`` also the CRC-32 checksums."""
        m = self.doc
        parts = [("trained", m["trained"], "trained index")] if m.get("trained") else []
        for s in self.shards:
            parts += [(s["name"], s["vectors"], f"vectors of ids {s['first_id']}..{s['last_id']}"),
                      (s["name"], s["ids"], f"ids {s['first_id']}..{s['last_id']}")]
            parts += [(s["name"] + ".index", s["index"], "shard index")] if s.get("index") else []
        if m.get("merged"):
            parts += [("merged", m["merged"]["index"], "merged index"),
                      ("merged", m["merged"]["ivfdata"], "merged inverted lists")]
        return [(part, msg) for part, desc, what in parts if (msg := self._problem(desc, what, full))]

    # -- building ----------------------------------------------------------------------------------------------
    def training_sample(self, m: int, seed: int = 0) -> np.ndarray:
        """At most ``m`` stored vectors drawn at random across shards (float32)."""
        ids = self.ids()
        return self.vectors_of(np.sort(np.random.default_rng(seed).choice(ids, min(m, len(ids)), replace=False)))

    def train(self, factory: str | None = None, sample_size: int | None = None, threads: int = 0,
              seed: int = 0) -> float:
        """Train the quantisers on a random sample (a new ``trained-T.index``); every shard's index is then
        rebuilt by :meth:`build`. Seconds taken."""
        self._writer()
        import faiss

        if threads:
            faiss.omp_set_num_threads(threads)
        t = time.perf_counter()
        factory = factory or sharded_factory(self.dim, self.count)
        index = faiss.index_factory(self.dim, factory,
                                    faiss.METRIC_INNER_PRODUCT if self.doc["metric"] == "ip" else faiss.METRIC_L2)
        ivf = faiss.downcast_index(faiss.extract_index_ivf(index))
        if hasattr(ivf, "do_polysemous_training"):
            ivf.do_polysemous_training = False  # FAISS's factory turns it on; it costs minutes and search never uses it
        ivf.cp.niter = IVF_NITER
        sample = self.training_sample(sample_size or max(TRAIN_PER_LIST * ivf.nlist, PQ_TRAIN), seed)
        if len(sample) < ivf.nlist:
            raise IndexError_(f"{self.directory}: {len(sample)} vectors cannot train {factory} (need ≥ {ivf.nlist})")
        index.train(sample)
        del sample
        gen = (self.doc.get("trained") or {}).get("generation", 0) + 1
        self.doc["trained"] = {**_write_faiss(index, self.directory / f"trained-{gen}.index"), "generation": gen}
        self.doc["factory"] = factory
        for s in self.shards:
            s["index"] = None
        return time.perf_counter() - t

    def build(self, workers: int = 2, threads_per_worker: int = 1, progress: Callable[[str], None] | None = None) -> dict:
        """Add every shard without a (valid) index in parallel, then merge them all on disk. Times in seconds."""
        import faiss
        from faiss.contrib.ondisk import merge_ondisk

        self._writer()
        say = progress or (lambda _m: None)
        if not self.doc.get("trained") or self._problem(self.doc["trained"]):
            self.train()
        times = {}
        t = time.perf_counter()
        todo = [s for s in self.shards if not s.get("index") or self._problem(s["index"])]
        trained = str(self.directory / self.doc["trained"]["file"])
        tgen = self.doc["trained"].get("generation", 0)
        jobs = [(trained, str(self.directory / s["vectors"]["file"]), str(self.directory / s["ids"]["file"]),
                 self.dtype, self.dim, s["count"], str(self.directory / f"{s['name']}.{tgen}.index"), threads_per_worker)
                for s in todo]
        said = [f"added {s['name']} ({s['count']} vectors)" for s in todo]
        if workers <= 1 or len(jobs) <= 1:
            results = []
            for j, m in zip(jobs, said):
                results.append(_add_shard(*j[:-1], max(threads_per_worker, workers)))
                say(m)
        else:
            results = _run_workers(jobs, workers, said, say)
        for s, r in zip(todo, results):
            s["index"] = r
        times["add"] = time.perf_counter() - t

        t = time.perf_counter()
        gen = int((self.doc.get("merged") or {}).get("generation", 0)) + 1
        ivfdata = self.directory / f"merged-{gen}.ivfdata"
        ivfdata.unlink(missing_ok=True)
        index = faiss.read_index(trained)
        with _quiet_stdout():  # FAISS prints "resizing …" there: a --json caller's stdout stays JSON
            merge_ondisk(index, [str(self.directory / s["index"]["file"]) for s in self.shards], str(ivfdata))
        fsync(ivfdata)
        self.doc["merged"] = {"generation": gen, "index": _write_faiss(index, self.directory / f"merged-{gen}.index"),
                              "ivfdata": _describe(ivfdata), "count": int(index.ntotal)}
        del index
        self._index = None
        times["merge"] = time.perf_counter() - t
        say(f"merged {self.doc['merged']['count']} vectors into {ivfdata.name}")
        return times

    # -- reading -----------------------------------------------------------------------------------------------
    def _map(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        if k not in self._maps:
            s = self.shards[k]
            ids = np.memmap(self.directory / s["ids"]["file"], dtype=np.int64, mode="r", shape=(s["count"],))
            vec = np.memmap(self.directory / s["vectors"]["file"], dtype=self.dtype, mode="r",
                            shape=(s["count"], self.dim))
            self._maps[k] = (ids, vec)
        return self._maps[k]

    def iter_chunks(self, chunk: int = 262_144) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """``(ids, vectors float32)`` in chunks of at most ``chunk`` rows, read from the files."""
        item = np.dtype(self.dtype).itemsize * self.dim
        for s in self.shards:
            for a in range(0, s["count"], chunk):
                m = min(chunk, s["count"] - a)
                ids = np.fromfile(self.directory / s["ids"]["file"], np.int64, count=m, offset=8 * a)
                vec = np.fromfile(self.directory / s["vectors"]["file"], self.dtype, count=m * self.dim,
                                  offset=item * a).reshape(m, self.dim)
                yield ids, vec.astype(np.float32)

    def vectors_of(self, ids: np.ndarray) -> np.ndarray:
        """The stored vectors (float32) of ``ids`` (each must be stored), from the memory-mapped shards."""
        ids = np.asarray(ids, np.int64)
        out = np.empty((len(ids), self.dim), np.float32)
        firsts = np.array([s["first_id"] for s in self.shards], np.int64)
        which = np.searchsorted(firsts, ids, side="right") - 1
        for k in np.unique(which):
            sel = np.flatnonzero(which == k)
            if k < 0:
                raise IndexError_(f"id {int(ids[sel[0]])} is not stored")
            sids, vec = self._map(int(k))
            rows = np.searchsorted(sids, ids[sel])
            if np.any(rows >= len(sids)) or np.any(sids[np.minimum(rows, len(sids) - 1)] != ids[sel]):
                raise IndexError_(f"an id of {ids[sel].tolist()[:5]} is not stored")
            out[sel] = vec[rows]
        return out

    def index(self, nprobe: int | None = None):
        """The merged index, its inverted lists memory-mapped from ``merged-M.ivfdata`` (loaded once)."""
        import faiss

        if self._index is None:
            m = self.doc.get("merged")
            if not m:
                raise IndexError_(f"{self.directory}: the index is not built yet (call build())")
            with _quiet_stdout():  # FAISS prints "IO_FLAG_ONDISK_SAME_DIR: updating ondisk filename ..." there
                self._index = faiss.read_index(str(self.directory / m["index"]["file"]),
                                               faiss.IO_FLAG_ONDISK_SAME_DIR | faiss.IO_FLAG_READ_ONLY)
        ivf = faiss.extract_index_ivf(self._index)
        ivf.nprobe = nprobe or max(1, min(ivf.nlist, max(16, ivf.nlist // 64)))
        return self._index

    def is_mmapped(self) -> bool:
        """True when the searched inverted lists are FAISS's on-disk (memory-mapped) lists."""
        import faiss

        inv = faiss.extract_index_ivf(self.index()).invlists
        return isinstance(faiss.downcast_InvertedLists(inv), faiss.OnDiskInvertedLists)

    def search(self, queries: np.ndarray, k: int = 10, nprobe: int | None = None,
               rerank: int = RERANK, keep: Callable[[np.ndarray], np.ndarray] | None = None
               ) -> tuple[np.ndarray, np.ndarray]:
        """Top ``k`` per query: ``k × rerank`` IVF-PQ candidates re-scored exactly from the shard files.

        Returns ``(scores, ids)``: inner products (``ip``, best first) or squared L2 distances (``l2``,
        nearest first), exact for the stored vectors; -1 ids where fewer than ``k`` were found.
        ``keep``: candidate ids → a boolean mask of those that may be returned (removed ids are not).
        """
        q = np.ascontiguousarray(np.atleast_2d(queries), np.float32)
        _, cand = self.index(nprobe).search(q, max(k, k * max(rerank, 1)))
        ip = self.doc["metric"] == "ip"
        scores = np.full((len(q), k), -np.inf if ip else np.inf, np.float32)
        ids = np.full((len(q), k), -1, np.int64)
        for i in range(len(q)):
            c = cand[i][cand[i] >= 0]
            if keep is not None and len(c):
                c = c[keep(c)]
            if not len(c):
                continue
            v = self.vectors_of(c)
            s = v @ q[i] if ip else ((v - q[i]) ** 2).sum(1)
            order = np.argsort(-s if ip else s, kind="stable")[:k]
            scores[i, :len(order)], ids[i, :len(order)] = s[order], c[order]
        return scores, ids

    def exact_search(self, queries: np.ndarray, k: int = 10, chunk: int = 262_144) -> tuple[np.ndarray, np.ndarray]:
        """Brute-force top ``k`` over every stored vector, shard files read in chunks (ground truth)."""
        import faiss

        q = np.ascontiguousarray(np.atleast_2d(queries), np.float32)
        ip = self.doc["metric"] == "ip"
        heap = faiss.ResultHeap(len(q), k, keep_max=ip)
        for ids, vec in self.iter_chunks(chunk):
            d, pos = faiss.knn(q, vec, min(k, len(vec)), faiss.METRIC_INNER_PRODUCT if ip else faiss.METRIC_L2)
            heap.add_result(d, np.where(pos >= 0, ids[pos], -1))
        heap.finalize()
        return heap.D, heap.I


# -- the index's vector layer --------------------------------------------------------------------------------
def shards_dir(index_dir: Path) -> Path:
    return Path(index_dir) / DIR_NAME


def disk_bytes(index_dir: Path) -> int:
    """Bytes of every file under ``DIR/shards`` (for ``retrieve info``'s size on disk)."""
    d = shards_dir(index_dir)
    return sum(p.stat().st_size for p in d.rglob("*") if p.is_file()) if d.is_dir() else 0


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
    ``ntotal``, ``d`` and ``search``. It writes only through :class:`ShardedVectors` (``commit``), under the
    store's writer lock.
    """

    def __init__(self, store):
        self.store = store
        self.sv: ShardedVectors | None = None  # the collection on disk (None: none yet, or stale)
        self.disk_ids = np.zeros(0, np.int64)  # ids in the shard files, increasing
        self.removed = np.zeros(0, np.int64)  # ids in the shard files whose rows are gone (sorted): never results
        self.covered = 0  # shards the merged (IVF-PQ, memory-mapped) index holds and searches; 0: exact
        self.mem = None  # IDMap2(Flat): the shards the merged index does not hold, and the tail
        self.factory = ""
        self.stale = ""  # why the collection cannot be searched ("" when it can)
        self._loaded = False

    @property
    def generation(self) -> str:
        return self.sv.doc["generation"] if self.sv is not None else ""

    # -- FAISS-like face ---------------------------------------------------------------------------
    @property
    def ntotal(self) -> int:
        """Vectors searchable or filtered: the shards' (removed ones included, like HNSW's) and the tail's."""
        self.get()
        return len(self.disk_ids) + len(self._tail_ids())

    @property
    def d(self) -> int:
        return self.store.vector_dim

    def _new_mem(self):
        import faiss

        return faiss.IndexIDMap2(faiss.IndexFlat(self.store.vector_dim, self.store.metric.faiss))

    def _tail_ids(self) -> np.ndarray:
        """Ids in memory that are in no shard (rows committed after the shards were written), increasing."""
        import faiss

        if self.mem is None or not self.mem.ntotal:
            return np.zeros(0, np.int64)
        ids = faiss.vector_to_array(self.mem.id_map)
        return np.sort(ids[~_member(self.disk_ids, ids)])

    def search(self, q: np.ndarray, k: int, params=None) -> tuple[np.ndarray, np.ndarray]:
        """Top ``k`` like FAISS's ``Index.search`` (``params.sel`` honoured), exact scores, best first."""
        import faiss

        self.get()
        q = np.ascontiguousarray(np.atleast_2d(q), np.float32)
        sel = getattr(params, "sel", None)
        heap = faiss.ResultHeap(len(q), k, keep_max=self.store.metric.similarity)  # FAISS's padding: ∓FLT_MAX, -1
        if self.mem is not None and self.mem.ntotal:
            heap.add_result(*self.mem.search(q, min(k, self.mem.ntotal), params=params))
        if self.covered:
            removed = self.removed

            def keep(c: np.ndarray) -> np.ndarray:
                ok = ~_member(removed, c)
                if sel is not None:
                    ok[ok] = np.fromiter((sel.is_member(int(i)) for i in c[ok]), bool, int(ok.sum()))
                return ok

            heap.add_result(*self.sv.search(q, k, keep=keep))
        heap.finalize()
        return heap.D, heap.I

    # -- loading and reconciling ---------------------------------------------------------------------
    def get(self) -> "ShardedIndex":
        if not self._loaded:
            self._load()
        return self

    def _metric_name(self) -> str:
        return "ip" if self.store.metric.similarity else "l2"

    def _open(self) -> tuple[ShardedVectors | None, str]:
        """``(collection, why not)``: the committed collection when it matches the vector space."""
        root = shards_dir(self.store.directory)
        try:
            sv = ShardedVectors.open(root, writable=self.store.writable)
        except IndexError_ as e:
            return None, str(e) if (root / POINTER).exists() else ""
        if sv.doc.get("space") != self.store.space():
            return None, "the shards were written in another vector space (the head was re-fitted)"
        if sv.dim != self.store.vector_dim or sv.doc["metric"] != self._metric_name():
            return None, "the shards have another dimension or metric"
        return sv, ""

    def _load(self) -> None:
        self._loaded = True
        sv, why = None, ""
        for _ in range(2):  # a writer may switch generations meanwhile: read again once
            sv, why = self._open()
            if sv is None or self._adopt(sv):
                break
            sv, why = None, "the shards changed while they were read"
        if sv is not None:
            return
        self.stale = why  # "": none written yet (not stale)
        n = self.store.count()
        if self.store.writable and why and n:
            self.rebuild()  # a writer heals at once
            return
        if why and n > READER_ROWS_MAX:  # too many to search exactly from the rows in this process's memory
            raise IndexError_(f"{shards_dir(self.store.directory)}: {why}; rewrite the shards from the rows with "
                              f"`retrieve check --repair --index {self.store.directory}`")
        self.sv, self.covered = None, 0
        self.disk_ids, self.removed = np.zeros(0, np.int64), np.zeros(0, np.int64)
        self.mem = self._new_mem()
        self._add_rows(self.store.row_ids())  # exact, from the rows

    def _adopt(self, sv: ShardedVectors) -> bool:
        """Take ``sv`` as the collection, reconciled with the rows; False when its files vanished meanwhile."""
        try:
            disk = sv.ids()
        except (OSError, ValueError):
            return False
        rows = np.sort(self.store.row_ids())
        self.sv, self.disk_ids, self.stale = sv, disk, ""
        self.removed = np.sort(disk[~_member(rows, disk)])
        covered = sv.covered()
        if covered:
            try:
                sv.index()  # the merged index opens (its lists memory-mapped)
                for k in range(covered):  # and every shard it re-scores from: mapped now, so that a long-lived
                    sv._map(k)  # searcher keeps its files when a writer later replaces this generation
            except (RuntimeError, IndexError_, OSError, ValueError):
                covered = 0  # a damaged merged index: exact until a writer builds it again
        self.covered = covered
        self.factory = sv.doc["factory"] if covered else "Flat"
        self.mem = self._new_mem()
        for k in range(covered, len(sv.shards)):  # shards the merged index does not hold (all, while exact)
            self._add_shard_to_mem(k)
        self._add_rows(rows[~_member(disk, rows)])
        return True

    def _add_shard_to_mem(self, k: int) -> None:
        ids, vec = self.sv._map(k)
        live = ~_member(self.removed, ids)
        if live.any():
            self.mem.add_with_ids(np.ascontiguousarray(vec[live], np.float32), ids[live])

    def _add_rows(self, ids: np.ndarray) -> None:
        if len(ids):
            for cids, raw in self.store.vectors_of(ids):
                self.mem.add_with_ids(self.store.transform(raw), np.ascontiguousarray(cids, np.int64))

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
    def _commit(self) -> dict:
        return self.sv.commit(space=self.store.space(), removed=int(len(self.removed)))

    def _new_collection(self) -> ShardedVectors:
        return ShardedVectors.new(shards_dir(self.store.directory), self.store.vector_dim, self._metric_name())

    def rebuild(self) -> "ShardedIndex":
        """Write the collection afresh from the rows as a new generation, train it when large enough, and commit
        it (``current.json`` switches to it, the old generation is removed)."""
        sv = self.sv = self._new_collection()
        total = 0

        def shard_of(chunk) -> int:  # consecutive row chunks, about SHARD_ROWS vectors a shard, streamed
            nonlocal total
            total += len(chunk[0])
            return (total - len(chunk[0])) // SHARD_ROWS

        rows = ((ids, self.store.transform(raw)) for ids, raw in self.store.iter_vectors())
        for _, chunks in itertools.groupby(rows, key=shard_of):
            sv.append(None, chunks)
        self.disk_ids, self.removed = sv.ids(), np.zeros(0, np.int64)
        self.mem, self.covered = self._new_mem(), 0
        self._train_and_build(reload=True)
        self.stale = ""
        self._commit()
        self._loaded = True
        return self

    def _train_and_build(self, reload: bool = False) -> None:
        """Train when due (or retrain when grown 4×), add the shards the merged index lacks, merge; then
        memory holds only the tail. While too small to train: exact, every live shard vector in memory
        (``reload``: memory was emptied, read the shards into it again)."""
        sv = self.sv
        n = sv.count
        want = sharded_factory(sv.dim, max(n, 1))
        trained = bool(sv.doc.get("trained") and sv.doc.get("factory"))
        if n >= max(train_at(), min_training(want)) and (not trained or _lists(sv.doc["factory"]) * 4 <= _lists(want)):
            sv.train(want)  # first training, or grown much larger: more lists (the shard files stay as they are)
            trained = True
        if trained and (sv.covered() < len(sv.shards) or any(not s.get("index") for s in sv.shards)):
            todo = sum(s["count"] for s in sv.shards if not s.get("index"))  # a small addition: no process starts
            sv.build(workers=min(WORKERS, os.cpu_count() or 1) if todo >= PARALLEL_FROM else 1)
        covered = sv.covered() if trained else 0
        tail = self._tail_ids()
        all_merged = covered and covered == len(sv.shards)
        if all_merged or reload or self.covered:  # memory: the tail only, or (exact) the tail and every shard again
            mem = self._new_mem()
            if len(tail):
                mem.add_with_ids(np.ascontiguousarray(self.mem.reconstruct_batch(tail), np.float32), tail)
            self.mem, self.covered = mem, covered if all_merged else 0
            for k in range(0 if all_merged else len(sv.shards)):
                self._add_shard_to_mem(k)
        self.factory = sv.doc["factory"] if all_merged else "Flat"

    def _flush(self) -> None:
        """Write the tail out as new shard(s), bring the index over them and commit (writers only)."""
        tail = self._tail_ids()
        if self.sv is None:
            if not len(tail):
                return
            self.sv = self._new_collection()
        sv = self.sv
        if len(tail) and sv.shards and tail[0] <= sv.shards[-1]["last_id"]:
            self.rebuild()  # an id below the stored ones (cannot be appended): write it all again
            return
        for a in range(0, len(tail), SHARD_ROWS):
            ids = tail[a:a + SHARD_ROWS]
            sv.append(ids, self.mem.reconstruct_batch(ids))
        if len(tail):
            self.disk_ids = np.concatenate([self.disk_ids, tail])
        self._train_and_build()
        self._commit()

    def save(self) -> dict | None:
        """Everything written and committed: the tail as new shards, trained and merged when due."""
        if not self._loaded:
            return None
        if self.stale and self.store.count():
            self.rebuild()
        else:
            self._flush()
        if self.sv is None:
            return None
        return {k: self.sv.doc.get(k) for k in ("generation", "space", "factory", "count", "removed")}


# -- check / info ------------------------------------------------------------------------------------
def check_state(store, full: bool = True) -> dict:
    """Read-only state of the sharded vectors for ``retrieve check``: ``state`` (ok, missing, stale, damaged),
    ``count``, ``ids`` (in the shards), ``problems`` (messages naming each bad file, checksums when ``full``)."""
    out = {"state": "ok", "count": 0, "ids": np.zeros(0, np.int64), "problems": []}
    root = shards_dir(store.directory)
    if not (root / POINTER).exists():
        out["state"] = "missing"
        return out
    try:
        sv = ShardedVectors.open(root, check=False)
    except IndexError_ as e:
        out["state"], out["problems"] = "damaged", [str(e)]
        return out
    bad = sv.check(full=full)
    if bad:
        out["state"], out["problems"] = "damaged", [m for _, m in bad]
        return out
    if sv.doc.get("space") != store.space():
        out["state"] = "stale"
    out["ids"] = sv.ids()
    out["count"] = len(out["ids"])
    return out


def info(store) -> dict:
    """What ``retrieve info`` says about the sharded vectors: shards, count, search, bytes on disk by kind."""
    try:
        sv = ShardedVectors.open(shards_dir(store.directory), check=False)
    except IndexError_ as e:
        missing = not (shards_dir(store.directory) / POINTER).exists()
        return {"shards": 0, "vectors": 0, "search": "none yet" if missing else f"unreadable ({e})"}
    search = (f"{sv.doc['factory']}, memory-mapped, re-scored exactly" if sv.covered()
              else f"exact until {train_at():,} vectors")
    return {"shards": len(sv.shards), "vectors": sv.count, "removed_filtered": int(sv.doc.get("removed") or 0),
            "search": search, "dtype": sv.dtype, "generation": sv.doc["generation"], "disk_bytes": sv.disk_bytes()}


if __name__ == "__main__":  # a build worker: python -m retrieval.index.sharded '[trained, vec, ids, dtype, dim, count, out, threads]'
    print(json.dumps(_add_shard(*json.loads(sys.argv[1]))))
