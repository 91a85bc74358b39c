"""The index on disk: its rows (SQLite in the index directory, or a PostgreSQL server) and its vectors, the row id
being the FAISS id. :class:`IndexStore` is the one way the rest of retrieve reads and writes an index.

The rows are the truth: each image row keeps its raw pooled embedding, so the vector file is a derived cache
(retrieval/index/vectors.py: reconciled with the rows on every open, fingerprinted, written atomically; the sharded
type keeps checksummed shard files, retrieval/index/sharded.py). An interrupted run therefore never leaves an index
that disagrees with itself, and a damaged vector file is rebuilt rather than lost. A new index's database is created
complete (tables and settings) under a temporary name and renamed into place, so a killed creation leaves no
half-made index. One writer at a time holds ``DIR/lock`` (retrieval/index/lock.py); readers need no lock (SQLite
WAL). With ``--db`` the rows live on a PostgreSQL server instead (retrieval/index/database.py: created in one
transaction, the writer lock an advisory lock on the server, the URL recorded in ``DIR/database.json``).

**Two ways to the same rows.** Every read is one SQL text with named parameters, run through SQLAlchemy (writers,
database servers) or, for a plain local SQLite index opened to read, through the standard library's ``sqlite3``:
importing SQLAlchemy and declaring the ORM tables costs about 0.45 s of a ``retrieve search`` that otherwise needs
ONNX Runtime, FAISS and one forward pass (bench/results/startup-search.md). Anything out of the ordinary on that
light path -- a ``--db``, a recorded server, a database that does not read cleanly, an older or newer schema --
and the store opens through SQLAlchemy, which gives the answer or the error in its own words.
``RETRIEVE_FAST_SEARCH=0`` turns the light path off.
"""
from __future__ import annotations

import json
import os
import threading
import time
from dataclasses import asdict
from pathlib import Path
from typing import Iterable, Iterator, NamedTuple, Sequence

import numpy as np

from retrieval.errors import IndexError_
from retrieval.index import database
from retrieval.index.files import first_line, fsync_dir
from retrieval.index.lock import LOCK_NAME, WriterLock
from retrieval.index.settings import DB_NAME, SCHEMA_VERSION, IndexSettings
from retrieval.index.space import VectorSpace, as_vectors, chunks
from retrieval.index.vectors import FAISS_NAME, META_NAME, Vectors, clean_temporaries
from retrieval.metric import Metric, metric as metric_named
from retrieval.names import from_db, to_db

DB_TEMPORARY_GLOB = f".{DB_NAME}.*.tmp*"
ROW_COLUMNS = ("id", "path", "size", "mtime_ns", "sha256", "width", "height", "vector", "indexed_at")
_COLS = ", ".join(ROW_COLUMNS)
INSERT_COLUMNS = ROW_COLUMNS + ("face", "box")  # what insert_rows writes, in this order


class IncompleteIndex(IndexError_):
    """The directory holds an empty database without settings (a creation was interrupted): no index yet."""


class FileRow(NamedTuple):
    """What an indexing run plans against (indexer/plan.py): a row's file as it was indexed."""

    id: int
    path: str
    size: int
    mtime_ns: int
    sha256: str


class Skipped(NamedTuple):
    """A file recorded as undecodable (or without a face): not retried until its size or mtime changes."""

    size: int
    mtime_ns: int
    reason: str


class Row:
    """One image row (a face's row in a faces index: ``face`` its number in the photo, ``box`` x0,y0,x1,y1)."""

    __slots__ = ROW_COLUMNS + ("face", "box")

    def __init__(self, values: Sequence, columns: Sequence[str] = ROW_COLUMNS):
        self.face = self.box = None
        for k, v in zip(columns, values):
            setattr(self, k, v)
        if "path" in columns:  # a file name that is not UTF-8 is stored escaped (retrieval/names.py)
            self.path = from_db(self.path)


def default_explain(input_size: int) -> dict:
    """The explanation defaults recorded in a new index, chosen by measurement (docs/explanations.md): SFAM with the
    CIS computed on μ-centred embeddings, at 448 px (twice the 224 default; an index built at 448 or more explains at
    its own size)."""
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


def _in(name: str, values: Sequence) -> tuple[str, dict]:
    """``IN (:name0, :name1, …)`` and its parameters: a list in SQL text that both sqlite3 and SQLAlchemy bind."""
    params = {f"{name}{i}": v for i, v in enumerate(values)}
    return "(" + ", ".join(f":{k}" for k in params) + ")", params


class IndexStore(VectorSpace):
    """One index directory: settings, rows, vectors. Use :meth:`open` or :meth:`create`."""

    def __init__(self, directory: Path, db_url: str | None = None, *, writable: bool = False, sqlite=None):
        self.directory = Path(directory)
        self._sqlite = sqlite  # a sqlite3 connection: the light read path (see the module docstring)
        self._sqlite_lock = threading.Lock()  # one query at a time on it (the web app answers in threads)
        self.db_url = db_url or (None if sqlite else database.url_for(self.directory, self.directory / DB_NAME)) \
            or f"sqlite:///{self.directory / DB_NAME}"
        self.server = not self.db_url.startswith("sqlite")  # rows on a database server (--db), not in DIR
        self.writable = writable
        self._engine = None if sqlite else self._make_engine()
        self._server_lock: database.AdvisoryLock | None = None
        self._settings: IndexSettings | None = None
        self._vectors_kept = None  # Vectors, or for index type "sharded" a ShardedIndex (see _vectors)
        self._lock: WriterLock | None = None
        self._created: list[Path] = []  # directories this store created (removed again by discard())

    def _make_engine(self):
        if self.server:
            return database.make_engine(self.db_url)
        from sqlalchemy import create_engine, event

        engine = create_engine(self.db_url)
        event.listen(engine, "connect", lambda conn, _record: _sqlite_pragmas(conn))
        return engine

    @property
    def engine(self):
        """The SQLAlchemy engine (made when first needed on the light read path)."""
        if self._engine is None:
            self._engine = self._make_engine()
        return self._engine

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
        if not writable:
            light = cls._open_light(directory)
            if light is not None:
                return light
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

    @classmethod
    def _open_light(cls, directory: str | os.PathLike) -> "IndexStore | None":
        """A reader through ``sqlite3`` when ``directory`` is a plain local SQLite index that reads cleanly in the
        current schema, else None (see the module docstring)."""
        import sqlite3

        if os.environ.get("RETRIEVE_FAST_SEARCH", "1").strip() in ("0", "false", "no", "off"):
            return None
        if database.requested() is not None:  # --db / $RETRIEVE_DB: the SQLAlchemy path checks and uses it
            return None
        p = Path(directory).expanduser()
        try:
            if not p.is_dir() or (p / database.RECORD_NAME).exists() or not (p / DB_NAME).is_file():
                return None
            p = p.resolve()
        except OSError:
            return None
        conn = None
        try:
            conn = sqlite3.connect(str(p / DB_NAME), check_same_thread=False)
            _sqlite_pragmas(conn)
            store = cls(p, sqlite=conn)
            raw = store._read_settings_or_none()
            if raw and raw.get("schema_version") == SCHEMA_VERSION:
                store._settings = IndexSettings(**{k: raw[k] for k in IndexSettings.__dataclass_fields__ if k in raw})
                return store
        except Exception:  # noqa: BLE001  (sqlite3.Error, a setting that does not parse: SQLAlchemy words it)
            pass
        if conn is not None:
            conn.close()
        return None

    def _upgrade(self) -> None:
        """Step-by-step schema upgrades (each step additive, in one transaction with the version bump)."""
        from retrieval.index.schema import ArrayRow, Base

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

    def ensure_tables(self, *tables) -> None:
        """Create optional tables (``schema.PersonRow.__table__``…) that an index made before them lacks: the upgrade
        path of tables that are additive and optional, so no schema version is bumped for them (older readers ignore
        them, readers of an index without them treat them as empty). Writers only, holding the writer lock."""
        from retrieval.index.schema import Base

        with self._begin() as c:
            Base.metadata.create_all(c, tables=list(tables), checkfirst=True)

    @classmethod
    def create(cls, directory: str | os.PathLike, settings: IndexSettings, what: str = "retrieve") -> "IndexStore":
        """A new index (or the existing one, opened for writing, when ``directory`` already holds one).

        The database is built complete — tables and settings — under a temporary name and renamed into
        place: a kill at any moment leaves either no index or a whole one. An empty database without
        settings (left by an interrupted creation of an older retrieve) is replaced.
        """
        from sqlalchemy.exc import DatabaseError, OperationalError

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
        from sqlalchemy import create_engine, insert

        from retrieval.index.schema import Base, SettingRow

        final = self.directory / DB_NAME
        tmp = self.directory / f".{DB_NAME}.{os.getpid()}.tmp"
        tmp.unlink(missing_ok=True)
        engine = create_engine(f"sqlite:///{tmp}")  # rollback journal: one file, complete once committed
        try:
            Base.metadata.create_all(engine)
            with engine.begin() as c:
                c.execute(insert(SettingRow.__table__), [{"key": k, "value": json.dumps(v)}
                                                         for k, v in asdict(settings).items()])
        finally:
            engine.dispose()
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, final)
        fsync_dir(self.directory)

    def _is_empty_shell(self) -> bool:
        """No settings and no image rows: what an interrupted creation leaves."""
        from sqlalchemy import inspect
        from sqlalchemy.exc import DatabaseError, OperationalError

        try:
            if "images" not in inspect(self.engine).get_table_names():
                return True
            return not self.count()
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
        if self._sqlite is not None:
            self._sqlite.close()
            self._sqlite = None
        if self._engine is not None:
            self._engine.dispose()
        if self._lock:
            self._lock.release()
            self._lock = None
        self._release_server_lock()

    def __enter__(self) -> "IndexStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- reading: one SQL text, two connections -------------------------------------------------------------------
    def query(self, sql: str, params: dict | None = None) -> list[tuple]:
        """The rows of one SELECT (``:name`` parameters), through sqlite3 on the light path, else SQLAlchemy."""
        if self._sqlite is not None:
            with self._sqlite_lock:
                return self._sqlite.execute(sql, params or {}).fetchall()
        from sqlalchemy import text

        with self.engine.connect() as c:
            return [tuple(r) for r in c.execute(text(sql), params or {})]

    # -- settings -----------------------------------------------------------------------------
    def _read_settings_or_none(self) -> dict | None:
        if self._sqlite is not None:
            rows = self.query("SELECT key, value FROM settings")
            return {k: json.loads(v) for k, v in rows} if rows else None
        from sqlalchemy.exc import DatabaseError, OperationalError

        try:
            rows = self.query("SELECT key, value FROM settings")
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
        return {k: json.loads(v) for k, v in rows} if rows else None

    @property
    def settings(self) -> IndexSettings:
        if self._settings is None:
            raw = self._read_settings_or_none()
            if raw is None:
                from retrieval.index.schema import Base

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
        rows = self.query("SELECT value FROM settings WHERE key = :key", {"key": key})
        return json.loads(rows[0][0]) if rows else default

    def set_value(self, key: str, value) -> None:
        self.set_values({key: value})

    def set_values(self, values: dict) -> None:
        """Settings values, replaced in one transaction."""
        from sqlalchemy import delete, insert

        from retrieval.index.schema import SettingRow

        table = SettingRow.__table__
        with self.engine.begin() as c:
            c.execute(delete(table).where(table.c.key.in_(list(values))))
            c.execute(insert(table), [{"key": k, "value": json.dumps(v)} for k, v in values.items()])

    @property
    def mean(self) -> np.ndarray:
        """μ, the mean raw embedding of the collection (zeros when empty)."""
        v = self.get_value("mean")
        return np.asarray(v, np.float32) if v is not None else np.zeros(self.settings.dim, np.float32)

    # -- rows ---------------------------------------------------------------------------------
    def count(self) -> int:
        return self.query("SELECT count(*) FROM images")[0][0] or 0

    def row_ids(self) -> np.ndarray:
        rows = self.query("SELECT id FROM images")
        return np.fromiter((r[0] for r in rows), np.int64, len(rows))

    def rows_by_ids(self, ids: Iterable[int]) -> dict[int, Row]:
        out: dict[int, Row] = {}
        for part in chunks([int(i) for i in ids], 500):
            where, params = _in("i", part)
            for r in self.query(f"SELECT {_COLS} FROM images WHERE id IN {where}", params):
                out[r[0]] = Row(r)
        return out

    def row_paths(self) -> list[tuple[int, str, str]]:
        """(id, path, sha256) of every row: what the visual words and the catalogue and ``--within`` folders
        read (retrieval/match/words.py, retrieval/index/catalogue.py)."""
        return [(i, from_db(p), h) for i, p, h in self.query("SELECT id, path, sha256 FROM images")]

    def row_hashes(self) -> dict[int, str]:
        """id → sha256 of every row: what a search compares its visual-words file with (retrieval/match/words.py
        sync), without decoding a path."""
        return dict(self.query("SELECT id, sha256 FROM images"))

    def row_by_path(self, path: str) -> Row | None:
        rows = self.query(f"SELECT {_COLS} FROM images WHERE path = :path", {"path": to_db(path)})
        if len(rows) > 1:  # a faces index has a row per face: face_rows
            raise IndexError_(f"{self.where}: several rows for {path}")
        return Row(rows[0]) if rows else None

    def face_rows(self, ids: Iterable[int]) -> dict[int, Row]:
        """Rows of a faces index by id, with their face number and box (retrieval/faces/search.py)."""
        cols = ("id", "path", "face", "box", "vector", "sha256", "width", "height")
        out: dict[int, Row] = {}
        for part in chunks([int(i) for i in ids], 500):
            where, params = _in("i", part)
            for r in self.query(f"SELECT {', '.join(cols)} FROM images WHERE id IN {where}", params):
                out[r[0]] = Row(r, cols)
        return out

    def files(self) -> list[FileRow]:
        """(id, path, size, mtime_ns, sha256) of every row: what an indexing run plans against (indexer/plan.py)."""
        return [FileRow(i, from_db(p), s, m, h)
                for i, p, s, m, h in self.query("SELECT id, path, size, mtime_ns, sha256 FROM images")]

    def page(self, offset: int, limit: int) -> tuple[int, list[tuple[int, str, str]]]:
        """(how many rows, (id, path, sha256) of ``limit`` rows from ``offset`` in path order): the web app's list."""
        rows = self.query("SELECT id, path, sha256 FROM images ORDER BY path, id LIMIT :limit OFFSET :offset",
                          {"limit": int(limit), "offset": int(offset)})
        return self.count(), [(i, from_db(p), h) for i, p, h in rows]

    def embedding_sizes(self) -> list[tuple[int, str, int]]:
        """(id, path, bytes of the stored embedding) of every row (``retrieve check``)."""
        return [(i, from_db(p), n) for i, p, n in self.query("SELECT id, path, length(vector) FROM images")]

    def skipped(self) -> dict[str, Skipped]:
        """{path: (size, mtime_ns, reason)} of the files recorded as undecodable (or without a face)."""
        return {from_db(p): Skipped(s, m, r)
                for p, s, m, r in self.query("SELECT path, size, mtime_ns, reason FROM skipped")}

    def skipped_count(self) -> int:
        return self.query("SELECT count(*) FROM skipped")[0][0] or 0

    def iter_vectors(self, chunk: int = 2048) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(ids, raw vectors) in chunks, in id order: streams, so memory does not grow with the index."""
        last = -1
        while True:
            rows = self.query("SELECT id, vector FROM images WHERE id > :last ORDER BY id LIMIT :n",
                              {"last": last, "n": chunk})
            if not rows:
                return
            ids = np.fromiter((r[0] for r in rows), np.int64, len(rows))
            last = int(ids[-1])
            yield ids, as_vectors([r[1] for r in rows], self.settings.dim)

    def vectors_of(self, ids: Sequence[int], chunk: int = 1000) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(ids, raw vectors) of the rows with these ids, in chunks."""
        for part in chunks([int(i) for i in ids], chunk):
            where, params = _in("i", part)
            rows = self.query(f"SELECT id, vector FROM images WHERE id IN {where}", params)
            if rows:
                yield (np.fromiter((r[0] for r in rows), np.int64, len(rows)),
                       as_vectors([r[1] for r in rows], self.settings.dim))

    def training_sample(self, m: int) -> np.ndarray:
        """At most ``m`` stored embeddings drawn at random (all of them when there are fewer)."""
        rows = self.query("SELECT vector FROM images ORDER BY random() LIMIT :m", {"m": int(m)})
        if not rows:
            return np.zeros((0, self.settings.dim), np.float32)
        return as_vectors([r[0] for r in rows], self.settings.dim)

    def session(self):
        """An ORM session on the rows (tests and benchmarks that write rows by hand; retrieve itself writes through
        the methods below)."""
        from sqlalchemy.orm import Session

        return Session(self.engine, expire_on_commit=False)

    # -- writing rows (one transaction each; the vector side follows through apply()) ---------------------------
    def _begin(self):
        if not self.writable:
            raise IndexError_(f"{self.directory}: opened to read, not to write")
        return self.engine.begin()

    def insert_rows(self, values: list[dict], replace: Sequence[int] = ()) -> np.ndarray:
        """Insert rows (dicts of the image columns, ``vector`` as float32 bytes; ``face``/``box`` for a faces index;
        ``id`` to put a row back under its old id) after deleting the rows ``replace`` and the skipped records of
        their paths, in one transaction. Returns the ids in the order of ``values``.

        In bulk, the same steps on either database: the new ids allocated in one statement, then every row written
        in one go with its id -- PostgreSQL's binary ``COPY`` (retrieval/index/database.py; no per-row statement, no
        text-encoded ``bytea``), one ``executemany`` of a prepared INSERT on SQLite (bench/results/scale-db.md)."""
        from sqlalchemy import delete

        from retrieval.index.schema import ImageRow, SkippedRow

        table, skipped = ImageRow.__table__, SkippedRow.__table__
        replace = [int(i) for i in replace]
        paths = sorted({to_db(v["path"]) for v in values})
        with self._begin() as c:
            for part in chunks(replace, 500):
                c.execute(delete(table).where(table.c.id.in_(part)))
            for part in chunks(paths, 500):
                c.execute(delete(skipped).where(skipped.c.path.in_(part)))
            if not values:
                return np.zeros(0, np.int64)
            given = [v.get("id") for v in values]
            fresh = iter(self._new_ids(c, sum(i is None for i in given)))
            ids = np.array([int(i) if i is not None else next(fresh) for i in given], np.int64)
            rows = [(int(i), to_db(v["path"]), *(v.get(k) for k in INSERT_COLUMNS[2:]))  # (names: retrieval/names.py)
                    for i, v in zip(ids, values)]
            if self.server:
                database.copy_rows(c, "images", INSERT_COLUMNS, rows)
            else:
                c.exec_driver_sql(f"INSERT INTO images ({', '.join(INSERT_COLUMNS)}) "
                                  f"VALUES ({', '.join('?' * len(INSERT_COLUMNS))})", rows)
        return ids

    def _new_ids(self, c, n: int) -> list[int]:
        """``n`` new row ids, never used before (AUTOINCREMENT), allocated in one statement inside the writer's
        transaction ``c``: the PostgreSQL sequence's next ``n`` values, or on SQLite the ``n`` ids after the highest
        ever given (the explicit ids then written move ``sqlite_sequence`` on, as an automatic id would)."""
        if not n:
            return []
        if self.server:
            return database.next_ids(c, "images", n)
        top = c.exec_driver_sql("SELECT max(coalesce((SELECT seq FROM sqlite_sequence WHERE name = 'images'), 0), "
                                "coalesce((SELECT max(id) FROM images), 0))").scalar()
        return list(range(int(top) + 1, int(top) + 1 + n))

    def delete_rows(self, ids: Sequence[int]) -> None:
        from sqlalchemy import delete

        from retrieval.index.schema import ImageRow

        table = ImageRow.__table__
        with self._begin() as c:
            for part in chunks([int(i) for i in ids], 500):
                c.execute(delete(table).where(table.c.id.in_(part)))

    def record_skip(self, path: str, size: int, mtime_ns: int, reason: str, replace: Sequence[int] = ()) -> None:
        """Remember that ``path`` (this size and mtime) could not be indexed, and drop its rows ``replace``."""
        from sqlalchemy import delete, insert

        from retrieval.index.schema import ImageRow, SkippedRow

        table, skipped = ImageRow.__table__, SkippedRow.__table__
        with self._begin() as c:
            for part in chunks([int(i) for i in replace], 500):
                c.execute(delete(table).where(table.c.id.in_(part)))
            c.execute(delete(skipped).where(skipped.c.path == to_db(path)))
            c.execute(insert(skipped), [{"path": to_db(path), "size": size, "mtime_ns": mtime_ns, "reason": reason}])

    def update_file(self, row_id: int, path: str, size: int, mtime_ns: int, replace: Sequence[int] = ()) -> None:
        """A row follows its file: a new path (moved) or only a new size and mtime (touched); ``replace``: the rows
        at that path before, dropped in the same transaction."""
        from sqlalchemy import delete, update

        from retrieval.index.schema import ImageRow

        table = ImageRow.__table__
        with self._begin() as c:
            for part in chunks([int(i) for i in replace], 500):
                c.execute(delete(table).where(table.c.id.in_(part)))
            c.execute(update(table).where(table.c.id == int(row_id)).values(path=to_db(path), size=size,
                                                                            mtime_ns=mtime_ns))

    def set_vectors(self, ids: Sequence[int], vectors: np.ndarray) -> None:
        """Replace the stored embeddings of rows ``ids`` (``retrieve check --repair`` re-embedding damaged ones)."""
        from sqlalchemy import update

        from retrieval.index.schema import ImageRow

        table = ImageRow.__table__
        with self._begin() as c:
            for i, v in zip(ids, vectors):
                c.execute(update(table).where(table.c.id == int(i)).values(vector=np.asarray(v, np.float32).tobytes()))

    def update_mean(self) -> np.ndarray:
        total = np.zeros(self.settings.dim, np.float64)
        n = 0
        for _, vecs in self.iter_vectors():
            total += vecs.sum(0, dtype=np.float64)
            n += len(vecs)
        mean = (total / max(n, 1)).astype(np.float32)
        self.set_value("mean", [float(x) for x in mean])
        return mean

    def mark_updated(self) -> None:
        """The end of a run that changed the index: readers (the web app) load the new state."""
        self.set_value("updated_at", time.time())

    # -- linear head ---------------------------------------------------------------------------
    def _arrays(self, names: list[str]) -> dict[str, np.ndarray]:
        where, params = _in("n", names)
        try:
            rows = self.query(f"SELECT name, shape, data FROM arrays WHERE name IN {where}", params)
        except Exception as e:  # noqa: BLE001  (schema 1: no arrays table yet)
            if "arrays" not in str(e):
                raise
            return {}
        return {name: np.frombuffer(data, np.float64).reshape(json.loads(shape)) for name, shape, data in rows}

    def fit_head(self) -> bool:
        """(Re)fit the configured head on the stored embeddings (retrieval/index/head.py); the vectors must then be
        rebuilt. False when nothing was fitted (no head configured, or a fixed one).

        The vector file's fingerprint names the head it was built with, so a run killed between this commit and the
        rebuild leaves a file that the next open rebuilds rather than searches."""
        from retrieval.index.head import fit_head

        if not self.settings.head or self.settings.head.get("fixed"):
            return False
        self.set_head(fit_head((v for _, v in self.iter_vectors()), self.settings.head))
        return True

    def set_head(self, head) -> None:
        """Store ``head`` (a :class:`~retrieval.index.head.LinearHead`, or None: none yet) in one transaction."""
        from sqlalchemy import delete, insert

        from retrieval.index.schema import ArrayRow, SettingRow

        arrays, settings = ArrayRow.__table__, SettingRow.__table__
        with self._begin() as c:
            c.execute(delete(arrays).where(arrays.c.name.in_(["head_mean", "head_proj"])))
            if head is not None:
                parts = [("head_mean", head.mean)] + ([("head_proj", head.proj)] if head.proj is not None else [])
                c.execute(insert(arrays), [{"name": name, "shape": json.dumps(list(arr.shape)),
                                            "data": np.ascontiguousarray(arr, np.float64).tobytes()}
                                           for name, arr in parts])
                c.execute(delete(settings).where(settings.c.key == "head_fitted_on"))
                c.execute(insert(settings), [{"key": "head_fitted_on", "value": json.dumps(head.fitted_on)}])
        self._head = head

    def head_is_stale(self) -> bool:
        """A configured head that is missing (and could be fitted now), or was fitted on less than half of today's
        collection."""
        from retrieval.index.head import MIN_CENTRE

        if not self.settings.head or self.settings.head.get("fixed"):
            return False
        head = self.head
        n = self.count()
        if head is None:
            return n >= MIN_CENTRE
        return n >= 2 * max(head.fitted_on, 1)

    # -- vectors --------------------------------------------------------------------------------
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

    def rebuild_faiss(self):
        """A fresh FAISS index from the rows (training types trained on the stored vectors when enough exist)."""
        return self._vectors.rebuild()

    def defer_vectors(self) -> bool:
        """While the head this index is configured with is not fitted yet, mirror no committed row in FAISS until
        :meth:`rebuild_faiss` (an index run's end fits the head and rebuilds: every vector changes with it). Not
        for index type ``sharded``, whose runs write shards as they commit. True when deferred."""
        from retrieval.index.vectors import Vectors

        if self.head is not None or not self.settings.head or self.settings.head.get("fixed"):
            return False
        if not isinstance(self._vectors, Vectors):
            return False
        self._vectors.defer()
        return True

    def vectors_deferred(self) -> bool:
        """Rows were committed while the mirror was deferred: FAISS must be rebuilt from them."""
        return bool(getattr(self._vectors, "pending", False))

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


def _sqlite_pragmas(conn) -> None:
    """WAL (readers never wait for the writer), normal sync, and a busy timeout, on every SQLite connection."""
    cur = conn.cursor()
    try:
        cur.execute("PRAGMA journal_mode=WAL")
    except Exception:  # noqa: BLE001
        pass  # read-only directory: plain rollback journal reads still work
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.execute("PRAGMA busy_timeout=10000")
    cur.close()
