"""The index on disk: SQLite rows (through SQLAlchemy) and a FAISS file, the row id being the FAISS id.

SQLite is the source of truth: each image row keeps its raw pooled embedding, so the FAISS file is a
derived cache. It is written to a temporary file and renamed into place, and on every open it is
reconciled with the rows (ids missing from FAISS are added, ids without a row are removed). An
interrupted run therefore never leaves an index that disagrees with itself, and a damaged FAISS file
is rebuilt rather than lost. One writer at a time holds ``DIR/lock``; readers need no lock (SQLite WAL).
"""
from __future__ import annotations

import errno
import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np
from sqlalchemy import Float, Integer, LargeBinary, String, create_engine, delete, event, func, select
from sqlalchemy.exc import DatabaseError, OperationalError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from .errors import IndexError_, IndexLocked, SettingsMismatch

SCHEMA_VERSION = 2  # 2: the `arrays` table (linear head)
DB_NAME = "index.db"
FAISS_NAME = "vectors.faiss"
LOCK_NAME = "lock"

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


class Base(DeclarativeBase):
    pass


class SettingRow(Base):
    __tablename__ = "settings"
    key: Mapped[str] = mapped_column(String, primary_key=True)
    value: Mapped[str] = mapped_column(String)


class ImageRow(Base):
    """One indexed image. ``id`` is its FAISS id; ids are never reused (AUTOINCREMENT)."""

    __tablename__ = "images"
    __table_args__ = {"sqlite_autoincrement": True}
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    path: Mapped[str] = mapped_column(String, unique=True, index=True)
    size: Mapped[int] = mapped_column(Integer)
    mtime_ns: Mapped[int] = mapped_column(Integer)
    sha256: Mapped[str] = mapped_column(String(64), index=True)
    width: Mapped[int] = mapped_column(Integer)
    height: Mapped[int] = mapped_column(Integer)
    vector: Mapped[bytes] = mapped_column(LargeBinary)  # raw pooled embedding, float32
    indexed_at: Mapped[float] = mapped_column(Float)


class ArrayRow(Base):
    """Named float64 arrays fitted on the collection (the linear head)."""

    __tablename__ = "arrays"
    name: Mapped[str] = mapped_column(String, primary_key=True)
    shape: Mapped[str] = mapped_column(String)
    data: Mapped[bytes] = mapped_column(LargeBinary)


class SkippedRow(Base):
    """A file that could not be decoded; not retried until its size or mtime changes."""

    __tablename__ = "skipped"
    path: Mapped[str] = mapped_column(String, primary_key=True)
    size: Mapped[int] = mapped_column(Integer)
    mtime_ns: Mapped[int] = mapped_column(Integer)
    reason: Mapped[str] = mapped_column(String)


@dataclass
class IndexSettings:
    """Fixed by the first run and recorded in the database, so search and explain use what indexing used."""

    model: str
    weights_id: str
    weights_source: str
    preprocess: dict
    metric: str  # "cosine" | "l2"
    dim: int
    index_type: str  # "flat" | "hnsw" | "ivfpq" | "custom"
    faiss_factory: str
    schema_version: int = SCHEMA_VERSION
    created_at: float = field(default_factory=time.time)
    explain: dict = field(default_factory=dict)  # how explanations are made; see default_explain()
    head: dict = field(default_factory=dict)  # linear head config ({} = none); see retrieval/head.py
    pooling: str = "gap"  # feature map → embedding; see retrieval/pooling.py
    search: dict = field(default_factory=dict)  # search defaults of this index, e.g. {"verify": 60}; see PRESETS

    def __post_init__(self) -> None:
        if self.metric not in ("cosine", "l2"):
            raise IndexError_(f"unknown metric {self.metric!r} (cosine or l2)")


PRESETS = {
    # What a new index is built for; every value can be overridden by its own option. Chosen by measurement
    # (bench/results/quality.md): "general" is the best of the cheap settings on faces and categories;
    # "instance" finds the same object photographed elsewhere (R@1 0.14 → 0.88 on the instance set) for
    # about 6.5x the indexing time (448 px input, SIFT keypoints extracted while indexing) and 0.4 s of
    # geometric verification per query; on faces and categories it costs a little R@1 (Caltech 0.86 → 0.84).
    "general": {"input_size": None, "resize": "squash", "pooling": "gap", "head": None, "search": {}},
    "instance": {"input_size": 448, "resize": "long", "pooling": "gem", "head": "pca-whiten:128",
                 "search": {"verify": 60}},
}


def default_explain(input_size: int) -> dict:
    """The explanation defaults recorded in a new index, chosen by measurement (bench/results/explain.md):
    SFAM with the CIS computed on μ-centred embeddings, at 448 px (twice the 224 default; an index built
    at 448 or more explains at its own size)."""
    return {"method": "sfam", "centre": True, "input_size": max(448, int(input_size))}


def default_index_dir() -> Path:
    """``$RETRIEVE_INDEX``, else the XDG data directory (``~/.local/share/retrieve``)."""
    env = os.environ.get("RETRIEVE_INDEX")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return Path(base) / "retrieve"


def trainable_factory(factory: str, n: int) -> str:
    """``factory``, or ``"Flat"`` (exact search) while an IVF type has too few vectors to train its quantiser."""
    nlist = _nlist(factory)
    if factory.startswith("IVF") and (n < IVF_MIN_TRAIN_PER_LIST * nlist or nlist < IVF_MIN_LISTS):
        return "Flat"
    return factory


def factory_for(index_type: str, dim: int, n: int) -> str:
    """The FAISS factory string (inside IDMap2) for an index type and the current collection size."""
    if index_type not in INDEX_TYPES:
        return index_type  # a user-given factory string
    if index_type == "ivfpq":
        nlist = max(1, min(IVF_MAX_LISTS, int(4 * np.sqrt(max(n, 1))), n // IVF_MIN_TRAIN_PER_LIST))
        m = next((m for m in (64, 32, 16, 8, 4, 2) if dim % m == 0 and dim // m >= 8), 1)
        return INDEX_TYPES[index_type].format(nlist=nlist, m=m)
    return INDEX_TYPES[index_type]


class WriterLock:
    """An exclusive, non-blocking advisory lock on ``DIR/lock`` naming its holder (released on exit or crash)."""

    def __init__(self, directory: Path):
        self.path = directory / LOCK_NAME
        self.fd: int | None = None

    def acquire(self, what: str) -> None:
        import fcntl

        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EAGAIN, errno.EACCES):
                os.close(fd)
                raise
            holder = os.pread(fd, 400, 0).decode("utf-8", "replace").strip() or "another process"
            os.close(fd)
            raise IndexLocked(f"index {self.path.parent} is being written by {holder}; wait for it to finish") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} ({what}, since {time.strftime('%Y-%m-%d %H:%M:%S')})".encode(), 0)
        self.fd = fd

    def release(self) -> None:
        if self.fd is not None:
            os.ftruncate(self.fd, 0)
            os.close(self.fd)  # closing drops the flock
            self.fd = None


class IndexStore:
    """One index directory: settings, rows, vectors. Use :meth:`open` or :meth:`create`."""

    def __init__(self, directory: Path, db_url: str | None = None, *, writable: bool = False):
        self.directory = Path(directory)
        self.db_url = db_url or f"sqlite:///{self.directory / DB_NAME}"
        self.writable = writable
        self.engine = create_engine(self.db_url)
        if self.engine.dialect.name == "sqlite":
            event.listen(self.engine, "connect", _sqlite_pragmas)
        self._settings: IndexSettings | None = None
        self._faiss = None
        self._lock: WriterLock | None = None

    # -- opening ------------------------------------------------------------------------------
    @classmethod
    def exists(cls, directory: Path) -> bool:
        return (Path(directory) / DB_NAME).is_file()

    @classmethod
    def open(cls, directory: str | os.PathLike, *, writable: bool = False, what: str = "retrieve") -> "IndexStore":
        directory = Path(directory).expanduser().resolve()
        if not cls.exists(directory):
            raise IndexError_(f"no index at {directory} (create one with `retrieve index PATH --index {directory}`)")
        store = cls(directory, writable=writable)
        if writable:
            store._take_lock(what)
        try:
            store.settings  # reads and validates
            if writable and store.settings.schema_version < SCHEMA_VERSION:
                store._upgrade()
        except Exception:
            store.close()
            raise
        return store

    def _upgrade(self) -> None:
        """Step-by-step schema upgrades (each step additive, in one transaction with the version bump)."""
        version = self.settings.schema_version
        if version < 2:
            Base.metadata.create_all(self.engine, tables=[ArrayRow.__table__])
        self.set_value("schema_version", SCHEMA_VERSION)
        self.settings.schema_version = SCHEMA_VERSION

    @classmethod
    def create(cls, directory: str | os.PathLike, settings: IndexSettings, what: str = "retrieve") -> "IndexStore":
        directory = Path(directory).expanduser().resolve()
        try:
            directory.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise IndexError_(f"{directory}: cannot create the index directory ({e.strerror})") from None
        store = cls(directory, writable=True)
        store._take_lock(what)
        try:
            if cls.exists(directory) and store._read_settings_or_none() is not None:
                store.close()
                return cls.open(directory, writable=True, what=what)
            Base.metadata.create_all(store.engine)
            with Session(store.engine) as s, s.begin():
                for k, v in asdict(settings).items():
                    s.merge(SettingRow(key=k, value=json.dumps(v)))
        except (OperationalError, DatabaseError) as e:
            store.close()
            raise IndexError_(f"{directory}: cannot write the index database ({_short(e)})") from None
        store._settings = settings
        return store

    def _take_lock(self, what: str) -> None:
        self._lock = WriterLock(self.directory)
        try:
            self._lock.acquire(what)
        except PermissionError:
            self._lock = None
            raise IndexError_(f"{self.directory}: index directory is not writable") from None

    def close(self) -> None:
        self.engine.dispose()
        if self._lock:
            self._lock.release()
            self._lock = None

    def __enter__(self) -> "IndexStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- settings -----------------------------------------------------------------------------
    def _read_settings_or_none(self) -> dict | None:
        try:
            with Session(self.engine) as s:
                rows = s.execute(select(SettingRow)).scalars().all()
        except OperationalError as e:
            if "no such table" in str(e):
                return None
            raise IndexError_(f"{self.directory / DB_NAME}: cannot read the index database ({_short(e)})") from None
        except DatabaseError as e:
            raise IndexError_(f"{self.directory / DB_NAME}: not a valid index database ({_short(e)}); "
                              "rebuild the index in a new directory") from None
        return {r.key: json.loads(r.value) for r in rows} if rows else None

    @property
    def settings(self) -> IndexSettings:
        if self._settings is None:
            raw = self._read_settings_or_none()
            if raw is None:
                raise IndexError_(f"{self.directory}: the index has no settings (incomplete or foreign database)")
            version = raw.get("schema_version", 0)
            if version > SCHEMA_VERSION:
                raise IndexError_(f"{self.directory}: written by a newer retrieve (schema {version}, this one "
                                  f"reads {SCHEMA_VERSION}); upgrade retrieve")
            known = {k: raw[k] for k in IndexSettings.__dataclass_fields__ if k in raw}
            try:
                self._settings = IndexSettings(**known)
            except TypeError as e:
                raise IndexError_(f"{self.directory}: index settings are incomplete ({e})") from None
        return self._settings

    def get_value(self, key: str, default=None):
        with Session(self.engine) as s:
            row = s.get(SettingRow, key)
            return json.loads(row.value) if row else default

    def set_value(self, key: str, value) -> None:
        with Session(self.engine) as s, s.begin():
            s.merge(SettingRow(key=key, value=json.dumps(value)))

    def check_compatible(self, model: str | None, metric: str | None, weights_id: str | None = None,
                         preprocess: dict | None = None) -> None:
        st = self.settings
        problems = []
        if model and model != st.model:
            problems.append(f"model {model} (index: {st.model})")
        if metric and metric != st.metric:
            problems.append(f"metric {metric} (index: {st.metric})")
        if weights_id and weights_id != st.weights_id:
            problems.append("different weights than the index was built with")
        if preprocess and preprocess != st.preprocess:
            problems.append("different preprocessing (input size) than the index was built with")
        if problems:
            raise SettingsMismatch(f"index {self.directory} was built with other settings: {'; '.join(problems)}. "
                                   "Use another --index directory, or delete this one to rebuild")

    @property
    def mean(self) -> np.ndarray:
        """μ, the mean raw embedding of the collection (zeros when empty)."""
        v = self.get_value("mean")
        return np.asarray(v, np.float32) if v is not None else np.zeros(self.settings.dim, np.float32)

    # -- rows ---------------------------------------------------------------------------------
    def session(self) -> Session:
        return Session(self.engine, expire_on_commit=False)

    def count(self) -> int:
        with Session(self.engine) as s:
            return s.scalar(select(func.count()).select_from(ImageRow)) or 0

    def rows_by_ids(self, ids: Iterable[int]) -> dict[int, ImageRow]:
        ids = [int(i) for i in ids]
        out: dict[int, ImageRow] = {}
        with self.session() as s:
            for chunk in _chunks(ids, 500):
                for r in s.execute(select(ImageRow).where(ImageRow.id.in_(chunk))).scalars():
                    out[r.id] = r
        return out

    def row_by_path(self, path: str) -> ImageRow | None:
        with self.session() as s:
            return s.execute(select(ImageRow).where(ImageRow.path == path)).scalar_one_or_none()

    def iter_vectors(self, chunk: int = 2048) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(ids, raw vectors) in chunks, in id order: streams, so memory does not grow with the index."""
        dim = self.settings.dim
        last = -1
        with Session(self.engine) as s:
            while True:
                rows = s.execute(select(ImageRow.id, ImageRow.vector).where(ImageRow.id > last)
                                 .order_by(ImageRow.id).limit(chunk)).all()
                if not rows:
                    return
                ids = np.fromiter((r[0] for r in rows), np.int64, len(rows))
                vecs = np.frombuffer(b"".join(r[1] for r in rows), np.float32).reshape(len(rows), dim)
                last = int(ids[-1])
                yield ids, vecs

    def update_mean(self) -> np.ndarray:
        total = np.zeros(self.settings.dim, np.float64)
        n = 0
        for _, vecs in self.iter_vectors():
            total += vecs.sum(0, dtype=np.float64)
            n += len(vecs)
        mean = (total / max(n, 1)).astype(np.float32)
        self.set_value("mean", [float(x) for x in mean])
        return mean

    # -- linear head ---------------------------------------------------------------------------
    @property
    def head(self):
        """The fitted :class:`retrieval.head.LinearHead`, or None (no head configured, or not fitted yet)."""
        if not hasattr(self, "_head"):
            self._head = None
            if self.settings.head:
                from .head import LinearHead

                arrays = self._arrays(["head_mean", "head_proj"])
                if len(arrays) == 2:
                    self._head = LinearHead(arrays["head_mean"], arrays["head_proj"],
                                            int(self.get_value("head_fitted_on", 0)))
        return self._head

    def _arrays(self, names: list[str]) -> dict[str, np.ndarray]:
        out = {}
        try:
            with Session(self.engine) as s:
                for r in s.execute(select(ArrayRow).where(ArrayRow.name.in_(names))).scalars():
                    out[r.name] = np.frombuffer(r.data, np.float64).reshape(json.loads(r.shape))
        except OperationalError:
            pass  # schema 1: no arrays table yet
        return out

    def fit_head(self) -> bool:
        """(Re)fit the configured head on the stored embeddings; the FAISS index must then be rebuilt."""
        from .head import fit_head

        if not self.settings.head:
            return False
        head = fit_head((v for _, v in self.iter_vectors()), self.settings.head)
        with Session(self.engine) as s, s.begin():
            s.execute(delete(ArrayRow).where(ArrayRow.name.in_(["head_mean", "head_proj"])))
            if head is not None:
                for name, arr in (("head_mean", head.mean), ("head_proj", head.proj)):
                    s.add(ArrayRow(name=name, shape=json.dumps(list(arr.shape)),
                                   data=np.ascontiguousarray(arr, np.float64).tobytes()))
                s.merge(SettingRow(key="head_fitted_on", value=json.dumps(head.fitted_on)))
        self._head = head
        return True

    def head_is_stale(self) -> bool:
        """A configured head that is missing, or was fitted on less than half of today's collection."""
        if not self.settings.head:
            return False
        head = self.head
        n = self.count()
        if head is None:
            return n >= 32
        return n >= 2 * max(head.fitted_on, 1)

    @property
    def vector_dim(self) -> int:
        """The dimension of the vectors FAISS holds (the head's output, else the backbone's)."""
        return self.head.dim if self.head is not None else self.settings.dim

    # -- vectors (FAISS) ------------------------------------------------------------------------
    def transform(self, vecs: np.ndarray) -> np.ndarray:
        """Raw pooled embeddings → the vectors FAISS holds (through the head; L2-normalised for cosine)."""
        x = np.ascontiguousarray(vecs, dtype=np.float32)
        if self.head is not None:
            x = self.head.apply(x)
        if self.settings.metric == "cosine":
            x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
        return x

    def faiss_index(self):
        """The FAISS index reconciled with the rows (loaded once per store)."""
        if self._faiss is None:
            self._faiss = self._load_faiss()
        return self._faiss

    def _new_faiss(self, n: int):
        import faiss

        st = self.settings
        metric = faiss.METRIC_INNER_PRODUCT if st.metric == "cosine" else faiss.METRIC_L2
        inner = faiss.index_factory(self.vector_dim, trainable_factory(self._factory(n), n), metric)
        if hasattr(inner, "hnsw"):
            inner.hnsw.efConstruction = HNSW_EF_CONSTRUCTION
        return faiss.IndexIDMap2(inner)

    def _load_faiss(self):
        import faiss

        path = self.directory / FAISS_NAME
        index = None
        if path.exists():
            try:
                index = faiss.read_index(str(path))
                if index.d != self.vector_dim or not isinstance(index, faiss.IndexIDMap2):
                    index = None
            except RuntimeError:
                index = None  # damaged: rebuilt from the rows below
        if index is None:
            return self.rebuild_faiss()
        return self._reconcile(index)

    def _reconcile(self, index):
        """Make ``index`` hold exactly the rows' ids; returns the index to use (rebuilt if it cannot remove)."""
        import faiss

        have = faiss.vector_to_array(index.id_map) if index.ntotal else np.zeros(0, np.int64)
        with Session(self.engine) as s:
            want = np.fromiter(s.execute(select(ImageRow.id)).scalars(), np.int64)
        extra = np.setdiff1d(have, want, assume_unique=True)
        missing = np.setdiff1d(want, have, assume_unique=True)
        if len(extra) and not self._remove_ids(index, extra):
            return self.rebuild_faiss()
        if len(missing):
            self._add_ids(index, missing)
        return index

    def _remove_ids(self, index, ids: np.ndarray) -> bool:
        """Remove ids in place; False when the index type cannot (HNSW), in which case the caller rebuilds."""
        import faiss

        try:
            index.remove_ids(faiss.IDSelectorBatch(np.ascontiguousarray(ids, np.int64)))
            return True
        except RuntimeError:
            return False

    def _add_ids(self, index, ids: np.ndarray) -> None:
        with Session(self.engine) as s:
            for chunk in _chunks([int(i) for i in ids], 1000):
                rows = s.execute(select(ImageRow.id, ImageRow.vector).where(ImageRow.id.in_(chunk))).all()
                self.add_vectors(index, np.array([r[0] for r in rows], np.int64),
                                 np.frombuffer(b"".join(r[1] for r in rows), np.float32).reshape(len(rows), -1))

    def add_vectors(self, index, ids: np.ndarray, raw: np.ndarray) -> None:
        if len(ids):
            index.add_with_ids(self.transform(raw), np.ascontiguousarray(ids, np.int64))

    def _add_all(self, index) -> None:
        for ids, vecs in self.iter_vectors():
            self.add_vectors(index, ids, vecs)

    def rebuild_faiss(self):
        """A fresh FAISS index from the rows (training IVF types on the stored vectors when enough exist)."""
        n = self.count()
        index = self._new_faiss(n)
        if not index.is_trained:
            index.train(self.transform(self._training_sample(IVF_TRAIN_PER_LIST * _nlist(self._factory(n)))))
        self._add_all(index)
        self._faiss = index
        return index

    def _training_sample(self, m: int) -> np.ndarray:
        """At most ``m`` stored embeddings drawn at random (all of them when there are fewer)."""
        with Session(self.engine) as s:
            rows = s.execute(select(ImageRow.vector).order_by(func.random()).limit(m)).scalars().all()
        if not rows:
            return np.zeros((0, self.settings.dim), np.float32)
        return np.frombuffer(b"".join(rows), np.float32).reshape(len(rows), self.settings.dim)

    def apply(self, removed: Sequence[int] = (), add_ids: Sequence[int] = (), add_raw: np.ndarray | None = None) -> None:
        """Mirror a committed change of the rows in FAISS: ``removed`` ids go, ``add_ids`` (raw vectors) come.

        Call it after the rows' transaction commits, on an index loaded before that commit. An index type
        that cannot remove (HNSW) is rebuilt from the rows, which already hold the additions.
        """
        index = self.faiss_index()
        if len(removed) and not self._remove_ids(index, np.asarray(removed, np.int64)):
            self.rebuild_faiss()
            return
        if len(add_ids):
            self.add_vectors(index, np.asarray(add_ids, np.int64), add_raw)

    def needs_retrain(self) -> bool:
        """True when an IVF index is still exact (untrained) but enough vectors now exist to train it."""
        st = self.settings
        if st.index_type != "ivfpq" and not st.faiss_factory.startswith("IVF"):
            return False
        import faiss

        inner = faiss.downcast_index(self.faiss_index().index)
        n = self.count()
        factory = self._factory(n)
        if isinstance(inner, faiss.IndexFlat):
            return trainable_factory(factory, n) != "Flat"
        want = _nlist(factory)
        try:  # trained long ago on a much smaller collection: retrain with more lists
            return faiss.extract_index_ivf(inner).nlist * 4 <= want
        except RuntimeError:
            return False

    def _factory(self, n: int) -> str:
        st = self.settings
        return factory_for(st.index_type, self.vector_dim, n) if st.index_type in INDEX_TYPES else st.faiss_factory

    def save_faiss(self) -> None:
        """Write the FAISS file atomically (temporary file, fsync, rename)."""
        import faiss

        if self._faiss is None:
            return
        path = self.directory / FAISS_NAME
        tmp = path.with_name(f".{FAISS_NAME}.{os.getpid()}.tmp")
        try:
            faiss.write_index(self._faiss, str(tmp))
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except (RuntimeError, OSError) as e:
            tmp.unlink(missing_ok=True)
            raise IndexError_(f"{path}: cannot write the vector file ({_short(e)}); the previous one is intact") from None

    def size_on_disk(self) -> int:
        return sum(p.stat().st_size for p in self.directory.iterdir() if p.is_file())


def _nlist(factory: str) -> int:
    head = factory.split(",")[0]
    digits = "".join(c for c in head[3:] if c.isdigit())
    return int(digits) if head.startswith("IVF") and digits else 1


def _chunks(seq: Sequence, n: int) -> Iterator[Sequence]:
    for i in range(0, len(seq), n):
        yield seq[i:i + n]


def _short(e: Exception) -> str:
    msg = str(getattr(e, "orig", None) or e).strip().splitlines()
    return msg[0] if msg else type(e).__name__


def _sqlite_pragmas(dbapi_conn, _record) -> None:
    cur = dbapi_conn.cursor()
    try:
        cur.execute("PRAGMA journal_mode=WAL")
    except Exception:
        pass  # read-only directory: plain rollback journal reads still work
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.execute("PRAGMA busy_timeout=10000")
    cur.close()
