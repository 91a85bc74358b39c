"""Vectors at scale: raw vectors in checksummed shard files, a sharded IVF-PQ index searched memory-mapped.

For a large collection (millions of vectors) neither a SQLite blob per vector nor one in-memory FAISS
index fits: the vectors live in append-only **shard files** (``shard-NNNNN.vec``: float16 or float32,
one row per vector; ``shard-NNNNN.ids``: their int64 ids, increasing across shards), and the index is
IVF-PQ built the way FAISS recommends for collections that outgrow RAM:

1. :meth:`ShardedVectors.train`: the coarse quantiser and the product quantiser are trained once on a
   random sample of the stored vectors (``trained.index``, an empty trained index).
2. :meth:`ShardedVectors.build`: every shard is added to its own copy of the trained index in
   parallel worker processes (``shard-NNNNN.index``), then the shards' inverted lists are merged into
   one on-disk file (``merged-G.ivfdata``, FAISS's ``OnDiskInvertedLists``) that searches memory-map:
   only the small quantiser is read into RAM.
3. :meth:`ShardedVectors.search`: ``k × rerank`` candidates from the compressed codes, re-scored
   exactly from the shard files (memory-mapped), best ``k`` returned with their exact scores.

**Why shard files** (bench/results/scale-vectors.md, measured side by side): float16 shard files take
half the disk of the SQLite float32 blobs small indexes keep (2.6 vs 5.5 KB per 1280-d vector), are
written faster, and change re-scored cosine scores by < 1e-4 (top-10 unchanged); a small index keeps
its blobs in SQLite (transactional and self-contained), this module is for collections of millions.

**Crash safety.** Every file is written under a temporary name, fsynced and renamed; ``manifest.json``
(written last, the same way) names the files that make up the collection with their sizes and CRC-32
checksums. A file the manifest does not name is an abandoned temporary and is removed by the next
writer. :meth:`check` compares sizes (cheap; done on open) or checksums (``full=True``); a torn or
corrupted *derived* file (a shard's index, the merged lists, the trained index) is rebuilt by
:meth:`build`; a corrupted *vector* shard is reported with its id range so its vectors can be written
again from their source (:meth:`replace_shard`). Writers must hold the directory's writer lock
(:meth:`lock`); readers never see a half-written collection.
"""
from __future__ import annotations

import json
import os
import re
import time
import zlib
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np

from retrieval.errors import IndexError_
from retrieval.index.files import fsync_dir

MANIFEST = "manifest.json"
FORMAT = 1
TRAINED = "trained.index"
DTYPES = ("float16", "float32")
ADD_CHUNK = 65_536  # vectors added to FAISS per call (bounds a worker's memory)
TRAIN_PER_LIST = 40  # training sample per IVF list (FAISS warns below 39)
IVF_NITER = 10  # k-means iterations of the coarse quantiser (FAISS's default 25 costs 2.5x for little gain)
PQ_TRAIN = 10_000  # a product quantiser's 256 codes want ≥ 39 points each
PCA_DIM = 256  # vectors wider than this are PCA-reduced to it before IVF-PQ (see sharded_factory)
RERANK = 50  # candidates per result re-scored exactly: ×10 gave recall@10 0.88 at 1 M whitened 128-d, ×50 0.99 (bench)
_NAME = re.compile(r"^(shard-\d{5}\.(vec|ids|index)|merged-\d+\.(index|ivfdata)|trained\.index)$")


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


def default_nprobe(nlist: int) -> int:
    return max(1, min(nlist, max(16, nlist // 64)))


# -- files ----------------------------------------------------------------------------------------------
def _crc_file(path: Path, block: int = 1 << 22) -> int:
    crc = 0
    with open(path, "rb") as f:
        while True:
            b = f.read(block)
            if not b:
                return crc
            crc = zlib.crc32(b, crc)


def _tmp(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def _write_arrays(path: Path, chunks: Iterable[np.ndarray]) -> dict:
    """Write ``chunks`` (raw bytes) to ``path`` atomically; ``{file, bytes, crc32}``."""
    tmp = _tmp(path)
    crc, size = 0, 0
    try:
        with open(tmp, "wb") as f:
            for c in chunks:
                b = memoryview(np.ascontiguousarray(c)).cast("B")
                f.write(b)
                crc, size = zlib.crc32(b, crc), size + len(b)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return {"file": path.name, "bytes": size, "crc32": crc}


def _write_faiss(index, path: Path) -> dict:
    import faiss

    tmp = _tmp(path)
    try:
        faiss.write_index(index, str(tmp))
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return _describe(path)


def _describe(path: Path) -> dict:
    return {"file": path.name, "bytes": path.stat().st_size, "crc32": _crc_file(path)}


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
    """Run :func:`_add_shard` jobs in up to ``workers`` child processes (``python -m retrieval.index.shards``).

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
                running[nxt] = subprocess.Popen([sys.executable, "-m", "retrieval.index.shards", json.dumps(jobs[nxt])],
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
    """Vectors in shard files plus a sharded, on-disk IVF-PQ index over them (see the module docstring)."""

    def __init__(self, directory: str | os.PathLike, manifest: dict):
        self.directory = Path(directory)
        self.manifest = manifest
        self._index = None
        self._maps: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self._lock = None

    # -- creating / opening ---------------------------------------------------------------------------
    @classmethod
    def create(cls, directory: str | os.PathLike, dim: int, metric: str = "ip", dtype: str = "float16") -> "ShardedVectors":
        if metric not in ("ip", "l2"):
            raise IndexError_(f"unknown metric {metric!r} (ip or l2)")
        if dtype not in DTYPES:
            raise IndexError_(f"unknown vector type {dtype!r} ({' or '.join(DTYPES)})")
        directory = Path(directory)
        if (directory / MANIFEST).exists():
            raise IndexError_(f"{directory}: already holds sharded vectors (open it instead)")
        directory.mkdir(parents=True, exist_ok=True)
        self = cls(directory, {"format": FORMAT, "dim": int(dim), "metric": metric, "dtype": dtype,
                               "factory": None, "trained": None, "shards": [], "merged": None})
        self._commit()
        return self

    @classmethod
    def open(cls, directory: str | os.PathLike, check: bool = True) -> "ShardedVectors":
        """Open for searching; raises :class:`ShardError` when a file is missing or has the wrong size
        (``check=False``: open anyway, to repair it with :meth:`replace_shard` and :meth:`build`)."""
        directory = Path(directory)
        try:
            manifest = json.loads((directory / MANIFEST).read_text())
        except FileNotFoundError:
            raise IndexError_(f"{directory}: no sharded vectors here ({MANIFEST} missing)") from None
        except (OSError, ValueError) as e:
            raise ShardError(f"{directory / MANIFEST}: unreadable ({e})") from None
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
            raise ShardError(f"{directory / MANIFEST}: not a format-{FORMAT} manifest")
        self = cls(directory, manifest)
        bad = self.check(full=False) if check else []
        if bad:
            raise ShardError(bad[0][1])
        return self

    def lock(self, what: str = "shards") -> "ShardedVectors":
        """Take the directory's writer lock and remove what a killed writer left (call before writing)."""
        from retrieval.index.lock import WriterLock

        if self._lock is None:
            self._lock = WriterLock(self.directory)
            self._lock.acquire(what)
            self._clean()
        return self

    def close(self) -> None:
        self._index = None
        self._maps.clear()
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- properties -----------------------------------------------------------------------------------------
    @property
    def dim(self) -> int:
        return int(self.manifest["dim"])

    @property
    def dtype(self) -> str:
        return self.manifest["dtype"]

    @property
    def count(self) -> int:
        return sum(s["count"] for s in self.manifest["shards"])

    @property
    def shards(self) -> list[dict]:
        return self.manifest["shards"]

    def disk_bytes(self) -> dict:
        """Bytes on disk by kind: raw vectors (+ids), per-shard indexes, the merged index."""
        out = {"vectors": 0, "shard_indexes": 0, "merged": 0, "trained": 0}
        for s in self.shards:
            out["vectors"] += s["vectors"]["bytes"] + s["ids"]["bytes"]
            out["shard_indexes"] += s["index"]["bytes"] if s.get("index") else 0
        m = self.manifest.get("merged")
        if m:
            out["merged"] = m["index"]["bytes"] + m["ivfdata"]["bytes"]
        if self.manifest.get("trained"):
            out["trained"] = self.manifest["trained"]["bytes"]
        return out

    # -- writing -----------------------------------------------------------------------------------------
    def _commit(self) -> None:
        path = self.directory / MANIFEST
        tmp = _tmp(path)
        tmp.write_text(json.dumps(self.manifest, indent=1))
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(self.directory)

    def _clean(self) -> list[Path]:
        """Remove temporaries and files no manifest entry names (a killed writer's leftovers)."""
        named = {MANIFEST} | set(self._named_files())
        gone = []
        for p in self.directory.iterdir():
            if p.name in named or not p.is_file():
                continue
            if (p.name.startswith(".") and p.name.endswith(".tmp")) or _NAME.match(p.name):
                p.unlink(missing_ok=True)
                gone.append(p)
        return gone

    def _named_files(self) -> Iterator[str]:
        m = self.manifest
        if m.get("trained"):
            yield m["trained"]["file"]
        for s in m["shards"]:
            yield s["vectors"]["file"]
            yield s["ids"]["file"]
            if s.get("index"):
                yield s["index"]["file"]
        if m.get("merged"):
            yield m["merged"]["index"]["file"]
            yield m["merged"]["ivfdata"]["file"]

    def append(self, ids: np.ndarray, vectors: np.ndarray | Iterable[tuple[np.ndarray, np.ndarray]]) -> dict:
        """Write one new shard: ``ids`` (increasing, above every stored id) and their vectors.

        ``vectors`` is an (n, dim) array, or ``ids`` is None and ``vectors`` yields ``(ids, vecs)``
        chunks (so a shard larger than RAM can be written). The index does not hold it until :meth:`build`.
        """
        self.lock()  # a no-op when this object already holds it
        k = len(self.shards)
        name = f"shard-{k:05d}"
        chunks = [(np.asarray(ids), vectors)] if ids is not None else vectors
        last = self.shards[-1]["last_id"] if self.shards else -1
        state = {"first": None, "last": last, "n": 0}
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
        self.manifest["merged"] = self.manifest.get("merged")  # still valid for the shards it holds
        self._commit()
        return entry

    def replace_shard(self, name: str, ids: np.ndarray, vectors: np.ndarray) -> dict:
        """Write a damaged shard's vectors again (same ids) from their source; its index is rebuilt by :meth:`build`."""
        self.lock()  # a no-op when this object already holds it
        entry = next((s for s in self.shards if s["name"] == name), None)
        if entry is None:
            raise IndexError_(f"{self.directory}: no shard named {name}")
        ids = np.ascontiguousarray(ids, np.int64)
        stored = np.fromfile(self.directory / entry["ids"]["file"], np.int64) if self._file_ok(entry["ids"]) else None
        if len(ids) != entry["count"] or ids[0] != entry["first_id"] or ids[-1] != entry["last_id"] or (
                stored is not None and not np.array_equal(stored, ids)):
            raise IndexError_(f"{name}: the replacement's ids differ from the shard's ({entry['first_id']}..{entry['last_id']})")
        vectors = np.asarray(vectors)
        if vectors.shape != (len(ids), self.dim):
            raise IndexError_(f"{name}: vectors of shape {vectors.shape}; expected ({len(ids)}, {self.dim})")
        entry["vectors"] = _write_arrays(self.directory / entry["vectors"]["file"], [vectors.astype(self.dtype)])
        entry["ids"] = _write_arrays(self.directory / entry["ids"]["file"], [ids])
        entry["index"] = None
        self._maps.pop(self.shards.index(entry), None)
        self._commit()
        return entry

    # -- checking --------------------------------------------------------------------------------------------
    def _file_ok(self, desc: dict, full: bool = True) -> bool:
        p = self.directory / desc["file"]
        try:
            if p.stat().st_size != desc["bytes"]:
                return False
        except OSError:
            return False
        return not full or _crc_file(p) == desc["crc32"]

    def check(self, full: bool = True) -> list[tuple[str, str]]:
        """Problems as ``(part, message)``: ``part`` is a shard's name, ``trained`` or ``merged``.

        ``full=False`` compares sizes only (fast); ``full=True`` also the CRC-32 checksums.
        """
        bad = []

        def one(part: str, desc: dict, what: str):
            p = self.directory / desc["file"]
            try:
                size = p.stat().st_size
            except OSError:
                bad.append((part, f"{p}: {what} missing"))
                return
            if size != desc["bytes"]:
                bad.append((part, f"{p}: {what} truncated or torn ({size} bytes, the manifest says {desc['bytes']})"))
            elif full and _crc_file(p) != desc["crc32"]:
                bad.append((part, f"{p}: {what} does not match its checksum (corrupted)"))

        if self.manifest.get("trained"):
            one("trained", self.manifest["trained"], "trained index")
        for s in self.shards:
            one(s["name"], s["vectors"], f"vectors of ids {s['first_id']}..{s['last_id']}")
            one(s["name"], s["ids"], f"ids {s['first_id']}..{s['last_id']}")
            if s.get("index"):
                one(s["name"] + ".index", s["index"], "shard index")
        m = self.manifest.get("merged")
        if m:
            one("merged", m["index"], "merged index")
            one("merged", m["ivfdata"], "merged inverted lists")
        return bad

    # -- building ----------------------------------------------------------------------------------------------
    def training_sample(self, m: int, seed: int = 0) -> np.ndarray:
        """At most ``m`` stored vectors drawn at random across shards (float32)."""
        n = self.count
        rng = np.random.default_rng(seed)
        pick = np.sort(rng.choice(n, size=min(m, n), replace=False)) if n else np.zeros(0, np.int64)
        out, start = [], 0
        for k, s in enumerate(self.shards):
            sel = pick[(pick >= start) & (pick < start + s["count"])] - start
            if len(sel):
                out.append(np.asarray(self._vectors(k)[sel], np.float32))
            start += s["count"]
        return np.concatenate(out) if out else np.zeros((0, self.dim), np.float32)

    def _metric(self):
        import faiss

        return faiss.METRIC_INNER_PRODUCT if self.manifest["metric"] == "ip" else faiss.METRIC_L2

    def train(self, factory: str | None = None, sample_size: int | None = None, threads: int = 0,
              seed: int = 0) -> float:
        """Train the quantisers on a random sample; every shard's index is then rebuilt. Seconds taken."""
        self.lock()  # a no-op when this object already holds it
        import faiss

        if threads:
            faiss.omp_set_num_threads(threads)
        t = time.perf_counter()
        factory = factory or sharded_factory(self.dim, self.count)
        index = faiss.index_factory(self.dim, factory, self._metric())
        ivf = faiss.downcast_index(faiss.extract_index_ivf(index))
        nlist = ivf.nlist
        if hasattr(ivf, "do_polysemous_training"):
            ivf.do_polysemous_training = False  # FAISS's factory turns it on; it costs minutes and search never uses it
        ivf.cp.niter = IVF_NITER
        sample = self.training_sample(sample_size or max(TRAIN_PER_LIST * nlist, PQ_TRAIN), seed)
        if len(sample) < nlist:
            raise IndexError_(f"{self.directory}: {len(sample)} vectors cannot train {factory} (need ≥ {nlist})")
        index.train(sample)
        del sample
        self.manifest["trained"] = _write_faiss(index, self.directory / TRAINED)
        self.manifest["factory"] = factory
        for s in self.shards:
            s["index"] = None
        self._commit()
        return time.perf_counter() - t

    def build(self, workers: int = 2, threads_per_worker: int = 1, progress: Callable[[str], None] | None = None) -> dict:
        """Add every shard without a (valid) index in parallel, then merge them all on disk. Times in seconds."""
        import faiss
        from faiss.contrib.ondisk import merge_ondisk

        self.lock()  # a no-op when this object already holds it
        say = progress or (lambda _m: None)
        if not self.manifest.get("trained") or not self._file_ok(self.manifest["trained"]):
            self.train()
        times = {}
        t = time.perf_counter()
        todo = [s for s in self.shards if not s.get("index") or not self._file_ok(s["index"])]
        trained = str(self.directory / TRAINED)
        jobs = [(trained, str(self.directory / s["vectors"]["file"]), str(self.directory / s["ids"]["file"]),
                 self.dtype, self.dim, s["count"], str(self.directory / f"{s['name']}.index"), threads_per_worker)
                for s in todo]
        if workers <= 1 or len(jobs) <= 1:
            results = []
            for j, s in zip(jobs, todo):
                results.append(_add_shard(*j[:-1], max(threads_per_worker, workers)))
                say(f"added {s['name']} ({s['count']} vectors)")
        else:
            results = _run_workers(jobs, workers, [f"added {s['name']} ({s['count']} vectors)" for s in todo], say)
        for s, r in zip(todo, results):
            s["index"] = r
        if todo:
            self._commit()
        times["add"] = time.perf_counter() - t

        t = time.perf_counter()
        gen = int((self.manifest.get("merged") or {}).get("generation", 0)) + 1
        ivfdata = self.directory / f"merged-{gen}.ivfdata"
        ivfdata.unlink(missing_ok=True)
        index = faiss.read_index(trained)
        with _quiet_stdout():  # FAISS prints "resizing …" there: a --json caller's stdout stays JSON
            merge_ondisk(index, [str(self.directory / s["index"]["file"]) for s in self.shards], str(ivfdata))
        with open(ivfdata, "rb") as f:
            os.fsync(f.fileno())
        merged = {"generation": gen, "index": _write_faiss(index, self.directory / f"merged-{gen}.index"),
                  "ivfdata": _describe(ivfdata), "count": int(index.ntotal)}
        del index
        old = self.manifest.get("merged")
        self.manifest["merged"] = merged
        self._commit()
        if old:
            for k in ("index", "ivfdata"):
                (self.directory / old[k]["file"]).unlink(missing_ok=True)
        self._index = None
        times["merge"] = time.perf_counter() - t
        say(f"merged {merged['count']} vectors into {ivfdata.name}")
        return times

    # -- reading -----------------------------------------------------------------------------------------------
    def _vectors(self, k: int) -> np.ndarray:
        return self._map(k)[1]

    def _map(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        if k not in self._maps:
            s = self.shards[k]
            ids = np.memmap(self.directory / s["ids"]["file"], dtype=np.int64, mode="r", shape=(s["count"],))
            vec = np.memmap(self.directory / s["vectors"]["file"], dtype=self.dtype, mode="r",
                            shape=(s["count"], self.dim))
            self._maps[k] = (ids, vec)
        return self._maps[k]

    def iter_shards(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """``(ids, vectors float32)`` per shard, read from the files (not memory-mapped: RSS stays one shard)."""
        for s in self.shards:
            ids = np.fromfile(self.directory / s["ids"]["file"], np.int64)
            vec = np.fromfile(self.directory / s["vectors"]["file"], self.dtype).reshape(-1, self.dim)
            yield ids, vec

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
        """The merged index, its inverted lists memory-mapped from ``merged-G.ivfdata`` (loaded once)."""
        import faiss

        if self._index is None:
            m = self.manifest.get("merged")
            if not m:
                raise IndexError_(f"{self.directory}: the index is not built yet (call build())")
            with _quiet_stdout():  # FAISS prints "IO_FLAG_ONDISK_SAME_DIR: updating ondisk filename ..." there
                self._index = faiss.read_index(str(self.directory / m["index"]["file"]),
                                               faiss.IO_FLAG_ONDISK_SAME_DIR | faiss.IO_FLAG_READ_ONLY)
        ivf = faiss.extract_index_ivf(self._index)
        ivf.nprobe = nprobe or default_nprobe(ivf.nlist)
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
        index = self.index(nprobe)
        kk = max(k, k * max(rerank, 1))
        _, cand = index.search(q, kk)
        ip = self.manifest["metric"] == "ip"
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
        q = np.ascontiguousarray(np.atleast_2d(queries), np.float32)
        ip = self.manifest["metric"] == "ip"
        best_s = np.full((len(q), k), -np.inf if ip else np.inf, np.float32)
        best_i = np.full((len(q), k), -1, np.int64)
        for ids, vec in self.iter_chunks(chunk):
            s = q @ vec.T if ip else ((q ** 2).sum(1)[:, None] - 2 * q @ vec.T + (vec ** 2).sum(1)[None])
            alls = np.concatenate([best_s, s.astype(np.float32)], 1)
            alli = np.concatenate([best_i, np.broadcast_to(ids, s.shape)], 1)
            key = -alls if ip else alls
            top = np.argpartition(key, k - 1, axis=1)[:, :k] if alls.shape[1] > k else np.argsort(key, 1)
            top = np.take_along_axis(top, np.argsort(np.take_along_axis(key, top, 1), 1, kind="stable"), 1)
            best_s, best_i = np.take_along_axis(alls, top, 1), np.take_along_axis(alli, top, 1)
        return best_s, best_i


if __name__ == "__main__":  # a build worker: python -m retrieval.index.shards '[trained, vec, ids, dtype, dim, count, out, threads]'
    print(json.dumps(_add_shard(*json.loads(sys.argv[1]))))
