"""The index on disk: SQLite rows (through SQLAlchemy) and a FAISS file, the row id being the FAISS id.

SQLite is the source of truth: each image row keeps its raw pooled embedding, so the FAISS file is a
derived cache (retrieval/index/vectors.py: reconciled with the rows on every open, fingerprinted, written
atomically). An interrupted run therefore never leaves an index that disagrees with itself, and a
damaged FAISS file is rebuilt rather than lost. A new index's database is created complete (tables and
settings) under a temporary name and renamed into place, so a killed creation leaves no half-made index.
One writer at a time holds ``DIR/lock`` (retrieval/index/lock.py); readers need no lock (SQLite WAL).
With ``--db`` the rows live on a PostgreSQL server instead (retrieval/index/database.py: created in one
transaction, the writer lock an advisory lock on the server, the URL recorded in ``DIR/database.json``).

:class:`IndexStore` is the facade the rest of retrieve uses; the pieces live in ``schema`` (tables,
settings), ``presets``, ``lock``, ``metric`` and ``vectors`` and are re-exported here.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np
from sqlalchemy import create_engine, delete, event, func, inspect, select
from sqlalchemy.exc import DatabaseError, OperationalError
from sqlalchemy.orm import Session

from retrieval.errors import IndexError_, SettingsMismatch
from retrieval.index import database
from retrieval.index.files import first_line, fsync_dir
from retrieval.index.lock import LOCK_NAME, WriterLock
from retrieval.index.schema import ArrayRow, Base, ImageRow, SettingRow
from retrieval.index.settings import DB_NAME, SCHEMA_VERSION, IndexSettings
from retrieval.index.space import VectorSpace, as_vectors, chunks, paged_vectors, vectors_by_ids
from retrieval.index.vectors import FAISS_NAME, META_NAME, Vectors, clean_temporaries
from retrieval.metric import Metric, metric as metric_named

DB_TEMPORARY_GLOB = f".{DB_NAME}.*.tmp*"


class IncompleteIndex(IndexError_):
    """The directory holds an empty database without settings (a creation was interrupted): no index yet."""


def default_explain(input_size: int) -> dict:
    """The explanation defaults recorded in a new index, chosen by measurement (bench/results/explain.md):
    SFAM with the CIS computed on μ-centred embeddings, at 448 px (twice the 224 default; an index built
    at 448 or more explains at its own size)."""
    return {"method": "sfam", "centre": True, "input_size": max(448, int(input_size))}


def index_path(directory: str | os.PathLike) -> Path:
    """``directory`` made absolute; a path that is a file, not a directory, is a one-line error."""
    p = Path(directory).expanduser()
    if p.exists() and not p.is_dir():
        if p.name in (DB_NAME, FAISS_NAME, META_NAME, LOCK_NAME) and (p.parent / DB_NAME).is_file():
            raise IndexError_(f"{p} is a file of an index; give the index directory itself: --index {p.parent}")
        raise IndexError_(f"{p} is a file, not an index directory; give --index a directory "
                          "(`retrieve index PHOTOS --index DIR` creates it)")
    above = p.absolute().parent
    while not above.exists() and above != above.parent:
        above = above.parent
    if not above.is_dir():  # a path under a file can never become a directory
        raise IndexError_(f"{above} is a file, not a directory; give --index a directory "
                          "(`retrieve index PHOTOS --index DIR` creates it)")
    return p.resolve()


class IndexStore(VectorSpace):
    """One index directory: settings, rows, vectors. Use :meth:`open` or :meth:`create`."""

    def __init__(self, directory: Path, db_url: str | None = None, *, writable: bool = False):
        self.directory = Path(directory)
        self.db_url = db_url or database.url_for(self.directory, self.directory / DB_NAME) \
            or f"sqlite:///{self.directory / DB_NAME}"
        self.server = not self.db_url.startswith("sqlite")  # rows on a database server (--db), not in DIR
        self.writable = writable
        self.engine = database.make_engine(self.db_url) if self.server else create_engine(self.db_url)
        if self.engine.dialect.name == "sqlite":
            event.listen(self.engine, "connect", _sqlite_pragmas)
        self._server_lock: database.AdvisoryLock | None = None
        self._settings: IndexSettings | None = None
        self._vectors_kept = None  # Vectors, or for index type "sharded" a ShardedIndex (see _vectors)
        self._lock: WriterLock | None = None
        self._created: list[Path] = []  # directories this store created (removed again by discard())

    # -- opening ------------------------------------------------------------------------------
    @classmethod
    def exists(cls, directory: Path) -> bool:
        """An SQLite index in ``directory``, or a database server it records or ``--db`` names."""
        return (Path(directory) / DB_NAME).is_file() or database.url_for(Path(directory), Path(directory) / DB_NAME) \
            is not None

    @property
    def where(self) -> str:
        """Where the rows live, for messages: the SQLite file, or the server URL without its password."""
        return database.display(self.db_url) if self.server else str(self.directory / DB_NAME)

    @classmethod
    def open(cls, directory: str | os.PathLike, *, writable: bool = False, what: str = "retrieve") -> "IndexStore":
        directory = index_path(directory)
        if not cls.exists(directory):
            raise IndexError_(f"no index at {directory} (create one with `retrieve index PHOTOS --index {directory}`)")
        store = cls(directory, writable=writable)
        created = []  # a server's index written from a new directory (its vector file's home): made here
        if writable and store.server:
            created = [d for d in reversed([directory, *directory.parents]) if not d.exists()]
            try:
                directory.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise IndexError_(f"{directory}: cannot create the index directory ({e.strerror})") from None
        try:
            if writable:
                store._take_lock(what)
                store._clean_temporaries()
            store.settings  # reads and validates
            if writable and store.settings.schema_version < SCHEMA_VERSION:
                store._upgrade()
            if writable and store.server:  # later commands on this directory find the database
                database.record(directory, store.db_url)
        except BaseException:
            if created and store._lock:
                (directory / LOCK_NAME).unlink(missing_ok=True)
            store.close()
            _remove_empty(created)
            raise
        return store

    def _upgrade(self) -> None:
        """Step-by-step schema upgrades (each step additive, in one transaction with the version bump)."""
        version = self.settings.schema_version
        if version < 2:
            Base.metadata.create_all(self.engine, tables=[ArrayRow.__table__])
        if version < 3:  # per-face rows: two nullable columns, path unique per (path, face) instead of alone
            with self.engine.begin() as c:
                cols = {r[1] for r in c.exec_driver_sql("PRAGMA table_info(images)")}
                for name, kind in (("face", "INTEGER"), ("box", "VARCHAR")):
                    if name not in cols:
                        c.exec_driver_sql(f"ALTER TABLE images ADD COLUMN {name} {kind}")
                c.exec_driver_sql("DROP INDEX IF EXISTS ix_images_path")
                c.exec_driver_sql("CREATE INDEX ix_images_path ON images (path)")
                c.exec_driver_sql("CREATE UNIQUE INDEX IF NOT EXISTS ux_images_path_face ON images "
                                  "(path, coalesce(face, -1))")
        self.set_value("schema_version", SCHEMA_VERSION)
        self.settings.schema_version = SCHEMA_VERSION

    @classmethod
    def create(cls, directory: str | os.PathLike, settings: IndexSettings, what: str = "retrieve") -> "IndexStore":
        """A new index (or the existing one, opened for writing, when ``directory`` already holds one).

        The database is built complete — tables and settings — under a temporary name and renamed into
        place: a kill at any moment leaves either no index or a whole one. An empty database without
        settings (left by an interrupted creation of an older retrieve) is replaced.
        """
        directory = index_path(directory)
        created = []
        for d in reversed([directory, *directory.parents]):
            if not d.exists():
                created.append(d)
        try:
            directory.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise IndexError_(f"{directory}: cannot create the index directory ({e.strerror})") from None
        store = cls(directory, writable=True)
        store._created = created
        try:
            store._take_lock(what)
            store._clean_temporaries()
            if cls.exists(directory):
                if store._read_settings_or_none() is not None:
                    store.close()
                    return cls.open(directory, writable=True, what=what)
                if store.server:  # created in one transaction: nothing half-made to clear
                    store._create_database(settings)
                    store._settings = settings
                    return store
                if not store._is_empty_shell():
                    raise IndexError_(f"{directory / DB_NAME}: a database without index settings (not made by "
                                      "retrieve?); use another --index directory")
                store.engine.dispose()
                for name in (DB_NAME, f"{DB_NAME}-wal", f"{DB_NAME}-shm", f"{DB_NAME}-journal"):
                    (directory / name).unlink(missing_ok=True)
            store._create_database(settings)
        except (OperationalError, DatabaseError) as e:
            store._abandon()
            raise IndexError_(f"{store.where}: cannot write the index database ({first_line(e)})") from None
        except BaseException:
            store._abandon()
            raise
        store._settings = settings
        return store

    def _create_database(self, settings: IndexSettings) -> None:
        if self.server:  # tables and settings in one transaction, then the directory records the database
            database.create_index(self.engine, asdict(settings))
            database.record(self.directory, self.db_url)
            return
        final = self.directory / DB_NAME
        tmp = self.directory / f".{DB_NAME}.{os.getpid()}.tmp"
        tmp.unlink(missing_ok=True)
        engine = create_engine(f"sqlite:///{tmp}")  # rollback journal: one file, complete once committed
        try:
            Base.metadata.create_all(engine)
            with Session(engine) as s, s.begin():
                for k, v in asdict(settings).items():
                    s.add(SettingRow(key=k, value=json.dumps(v)))
        finally:
            engine.dispose()
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, final)
        fsync_dir(self.directory)

    def _is_empty_shell(self) -> bool:
        """No settings and no image rows: what an interrupted creation leaves."""
        try:
            insp = inspect(self.engine)
            if "images" not in insp.get_table_names():
                return True
            with Session(self.engine) as s:
                return not s.scalar(select(func.count()).select_from(ImageRow))
        except (OperationalError, DatabaseError):
            return False

    def _take_lock(self, what: str) -> None:
        if self.server and self._server_lock is None:  # one writer per database, across machines
            lock = database.AdvisoryLock(self.db_url)
            lock.acquire(what)
            self._server_lock = lock
        self._lock = WriterLock(self.directory)
        try:
            self._lock.acquire(what)
        except PermissionError:
            self._lock = None
            self._release_server_lock()
            raise IndexError_(f"{self.directory}: index directory is not writable") from None
        except BaseException:
            self._lock = None
            self._release_server_lock()
            raise

    def _release_server_lock(self) -> None:
        if self._server_lock is not None:
            self._server_lock.release()
            self._server_lock = None

    def _clean_temporaries(self) -> None:
        """Temporary files left by a killed writer go (we hold the lock: no other writer is making one)."""
        clean_temporaries(self.directory, (DB_TEMPORARY_GLOB,))

    def _abandon(self) -> None:
        """A creation that failed: close, and remove the directories it made if they are empty."""
        created = self._created
        if self._lock and (created or not self.exists(self.directory)):  # no index here: leave no lock file
            (self.directory / LOCK_NAME).unlink(missing_ok=True)
        self.close()
        _remove_empty(created)

    def discard(self) -> None:
        """Remove the index this store created (nothing in it worth keeping), and the folders it made."""
        if self.server:
            database.drop_index(self.engine)
            (self.directory / database.RECORD_NAME).unlink(missing_ok=True)
        self.engine.dispose()
        for name in (DB_NAME, f"{DB_NAME}-wal", f"{DB_NAME}-shm", f"{DB_NAME}-journal", FAISS_NAME, META_NAME):
            (self.directory / name).unlink(missing_ok=True)
        (self.directory / LOCK_NAME).unlink(missing_ok=True)  # while still holding it
        self.close()
        _remove_empty(self._created)

    def close(self) -> None:
        self.engine.dispose()
        if self._lock:
            self._lock.release()
            self._lock = None
        self._release_server_lock()

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
            if database.is_missing_table(e):
                return None
            if self.server:
                raise database.connection_error(self.db_url, e) from None
            raise IndexError_(f"{self.directory / DB_NAME}: cannot read the index database ({first_line(e)})") from None
        except DatabaseError as e:
            if database.is_missing_table(e):
                return None
            raise IndexError_(f"{self.where}: not a valid index database ({first_line(e)}); "
                              "rebuild the index in a new directory") from None
        return {r.key: json.loads(r.value) for r in rows} if rows else None

    @property
    def settings(self) -> IndexSettings:
        if self._settings is None:
            raw = self._read_settings_or_none()
            if raw is None:
                if self.server and not database.table_names(self.engine) & set(Base.metadata.tables):
                    raise IncompleteIndex(f"no index in the database {self.where} (create one with `retrieve index "
                                          f"PHOTOS --index {self.directory} --db {self.where}`)")
                if self._is_empty_shell():
                    raise IncompleteIndex(f"no index at {self.directory}: its creation was interrupted (create it "
                                          f"with `retrieve index PHOTOS --index {self.directory}`)")
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

    @property
    def metric(self) -> Metric:
        return metric_named(self.settings.metric)

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

    def row_ids(self) -> np.ndarray:
        with Session(self.engine) as s:
            return np.fromiter(s.execute(select(ImageRow.id)).scalars(), np.int64)

    def rows_by_ids(self, ids: Iterable[int]) -> dict[int, ImageRow]:
        ids = [int(i) for i in ids]
        out: dict[int, ImageRow] = {}
        with self.session() as s:
            for chunk in chunks(ids, 500):
                for r in s.execute(select(ImageRow).where(ImageRow.id.in_(chunk))).scalars():
                    out[r.id] = r
        return out

    def row_paths(self) -> list[tuple[int, str, str]]:
        """(id, path, sha256) of every row: what the visual words and the catalogue and ``--within`` folders
        read (retrieval/match/words.py, retrieval/index/catalogue.py)."""
        with Session(self.engine) as s:
            return [(r.id, r.path, r.sha256) for r in s.execute(select(ImageRow.id, ImageRow.path, ImageRow.sha256))]

    def row_by_path(self, path: str) -> ImageRow | None:
        with self.session() as s:
            return s.execute(select(ImageRow).where(ImageRow.path == path)).scalar_one_or_none()

    def iter_vectors(self, chunk: int = 2048) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(ids, raw vectors) in chunks, in id order: streams, so memory does not grow with the index."""
        with Session(self.engine) as s:
            yield from paged_vectors(lambda last, n: s.execute(
                select(ImageRow.id, ImageRow.vector).where(ImageRow.id > last).order_by(ImageRow.id).limit(n)).all(),
                self.settings.dim, chunk)

    def vectors_of(self, ids: Sequence[int], chunk: int = 1000) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(ids, raw vectors) of the rows with these ids, in chunks."""
        with Session(self.engine) as s:
            yield from vectors_by_ids(lambda part: s.execute(
                select(ImageRow.id, ImageRow.vector).where(ImageRow.id.in_(part))).all(), ids, chunk)

    def training_sample(self, m: int) -> np.ndarray:
        """At most ``m`` stored embeddings drawn at random (all of them when there are fewer)."""
        with Session(self.engine) as s:
            rows = s.execute(select(ImageRow.vector).order_by(func.random()).limit(m)).scalars().all()
        if not rows:
            return np.zeros((0, self.settings.dim), np.float32)
        return as_vectors(rows, self.settings.dim)

    _training_sample = training_sample

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
        """(Re)fit the configured head on the stored embeddings; the FAISS index must then be rebuilt.

        The vector file's fingerprint names the head it was built with, so a run killed between this
        commit and the rebuild leaves a file that the next open rebuilds rather than searches."""
        from retrieval.index.head import fit_head

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
    def _vectors(self):
        """The vector side of this index, made on first use: ``vectors.faiss`` (retrieval/index/vectors.py), or for
        index type ``sharded`` the shard collection in ``DIR/shards`` (retrieval/index/sharded.py)."""
        if self._vectors_kept is None:
            if self.settings.index_type == "sharded":
                from retrieval.index.sharded import ShardedIndex

                self._vectors_kept = ShardedIndex(self)
            else:
                self._vectors_kept = Vectors(self)
        return self._vectors_kept

    def faiss_index(self):
        """The FAISS index reconciled with the rows (loaded once per store)."""
        return self._vectors.get()

    def removed_ids(self) -> np.ndarray:
        """Ids still in the FAISS index whose rows are gone (an HNSW graph between rebuilds): never results."""
        self._vectors.get()
        return self._vectors.removed

    def add_vectors(self, index, ids: np.ndarray, raw: np.ndarray) -> None:
        if len(ids):
            index.add_with_ids(self.transform(raw), np.ascontiguousarray(ids, np.int64))

    def rebuild_faiss(self):
        """A fresh FAISS index from the rows (training types trained on the stored vectors when enough exist)."""
        return self._vectors.rebuild()

    def apply(self, removed: Sequence[int] = (), add_ids: Sequence[int] = (), add_raw: np.ndarray | None = None) -> None:
        """Mirror a committed change of the rows in FAISS (see :meth:`retrieval.index.vectors.Vectors.apply`)."""
        self._vectors.apply(removed, add_ids, add_raw)

    def compact(self) -> bool:
        """One rebuild when too many removed ids are kept in an index that cannot remove them (HNSW)."""
        return self._vectors.compact()

    def needs_retrain(self) -> bool:
        """True when a training index type is still exact (untrained) but enough vectors now exist to train it."""
        return self._vectors.needs_retrain()

    def save_faiss(self) -> None:
        """Write the FAISS file and its fingerprint atomically; record the fingerprint in the database."""
        meta = self._vectors.save()
        if meta is not None:
            self.set_value("vector_file", meta)

    def size_on_disk(self) -> int:
        """Bytes of the index directory's files (and of the index's tables, with a database server)."""
        local = sum(p.stat().st_size for p in self.directory.iterdir() if p.is_file()) if self.directory.is_dir() else 0
        if (self.directory / "shards").is_dir():  # index type sharded: its shard collection
            from retrieval.index.sharded import disk_bytes

            local += disk_bytes(self.directory)
        return local + (database.size(self.engine) if self.server else 0)


def _remove_empty(created: Sequence[Path] | None) -> None:
    """Remove the folders a creation made (``created``, outermost first), innermost first, while empty."""
    for d in reversed(created or []):
        try:
            d.rmdir()
        except OSError:
            break


def _sqlite_pragmas(dbapi_conn, _record) -> None:
    cur = dbapi_conn.cursor()
    try:
        cur.execute("PRAGMA journal_mode=WAL")
    except Exception:
        pass  # read-only directory: plain rollback journal reads still work
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.execute("PRAGMA busy_timeout=10000")
    cur.close()
