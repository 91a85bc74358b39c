"""A read-only view of a plain local SQLite index through the standard library's ``sqlite3``: no SQLAlchemy.

Importing SQLAlchemy (and declaring the ORM tables) costs about 0.45 s of a ``retrieve search`` that
otherwise needs ONNX Runtime, FAISS and one forward pass (bench/results/startup-search.md). For the common
case -- an SQLite index in its directory, opened to answer queries -- :func:`open_for_search` returns a
:class:`LiteStore` that offers what :class:`retrieval.match.search.Searcher` asks of an
:class:`~retrieval.index.store.IndexStore` (settings, the reconciled FAISS index, rows by id or path, vectors,
every row's path for the visual words, the catalogue role and ``--within``), with the same SQL and the same
arithmetic, so the answers are identical.

Anything out of the ordinary -- a ``--db`` or a recorded database server, a missing or unreadable database,
settings that do not read cleanly, an older or newer schema, an index type this module does not know -- and
it returns None: the caller then opens the full :class:`~retrieval.index.store.IndexStore`, which gives the
answer, or the error, in its own words. ``RETRIEVE_FAST_SEARCH=0`` turns it off with the torch-free backbone.
"""
from __future__ import annotations

import json
import os
import sqlite3
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np

from retrieval.metric import Metric, metric as metric_named
from retrieval.index.space import VectorSpace, as_vectors, chunks, paged_vectors, vectors_by_ids
from retrieval.index.settings import DB_NAME, SCHEMA_VERSION, IndexSettings
from retrieval.index.vectors import FAISS_NAME, Vectors

# The index types whose vector file this module reads as retrieval/index/vectors.py writes it; any other
# (a user's FAISS factory, or a layout added later) goes through the full store.
KNOWN_TYPES = ("flat", "hnsw", "ivfpq")
_ROW_COLUMNS = ("id", "path", "size", "mtime_ns", "sha256", "width", "height", "vector", "indexed_at")


class LiteRow:
    """One image row, with the attributes of :class:`retrieval.index.schema.ImageRow` a search reads."""

    __slots__ = _ROW_COLUMNS

    def __init__(self, values: Sequence):
        for k, v in zip(_ROW_COLUMNS, values):
            setattr(self, k, v)


def enabled() -> bool:
    return os.environ.get("RETRIEVE_FAST_SEARCH", "1").strip() not in ("0", "false", "no", "off")


def open_for_search(directory: str | os.PathLike) -> "LiteStore | None":
    """A :class:`LiteStore` on ``directory`` when it is a plain local SQLite index that reads cleanly, else None."""
    if not enabled():
        return None
    from retrieval.index import database

    if database.requested() is not None:  # --db / $RETRIEVE_DB: the full store checks and uses it
        return None
    p = Path(directory).expanduser()
    try:
        if not p.is_dir() or (p / database.RECORD_NAME).exists() or not (p / DB_NAME).is_file():
            return None
        p = p.resolve()
    except OSError:
        return None
    store = None
    try:
        store = LiteStore(p)
        if store._read_settings():
            return store
    except Exception:  # noqa: BLE001  (sqlite3.Error, a setting that does not parse: the full store words it)
        pass
    if store is not None:
        store.close()
    return None


def open_search_store(directory: str | os.PathLike, *, plain: bool = True):
    """The store ``retrieve search`` reads: a :class:`LiteStore` when the search is ``plain`` (no explanations,
    no face) on an index that is not a faces index -- verification, visual words, the catalogue role and
    ``--within`` included -- else the full :class:`~retrieval.index.store.IndexStore` (which imports SQLAlchemy)."""
    if plain:
        lite = open_for_search(directory)
        if lite is not None:
            if lite.settings.preset != "faces":
                return lite
            lite.close()
    from retrieval.index.store import IndexStore

    return IndexStore.open(directory)


class LiteStore(VectorSpace):
    """See the module docstring. Read-only: it never writes the database or the vector file."""

    server = False
    writable = False

    def __init__(self, directory: Path):
        self.directory = Path(directory)
        self.db_url = f"sqlite:///{self.directory / DB_NAME}"
        self._conn = None
        self._conn = sqlite3.connect(str(self.directory / DB_NAME))
        _pragmas(self._conn)
        self._settings: IndexSettings | None = None
        self._vectors = Vectors(self)

    # -- opening --------------------------------------------------------------------------------
    def _read_settings(self) -> bool:
        rows = self._conn.execute("SELECT key, value FROM settings").fetchall()
        if not rows:
            return False
        raw = {k: json.loads(v) for k, v in rows}
        if raw.get("schema_version", 0) != SCHEMA_VERSION:
            return False
        known = {k: raw[k] for k in IndexSettings.__dataclass_fields__ if k in raw}
        settings = IndexSettings(**known)
        if settings.index_type not in KNOWN_TYPES or not (self.directory / FAISS_NAME).is_file():
            return False
        self._settings = settings
        return True

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def __enter__(self) -> "LiteStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def where(self) -> str:
        return str(self.directory / DB_NAME)

    # -- settings (as IndexStore) ------------------------------------------------------------------
    @property
    def settings(self) -> IndexSettings:
        return self._settings

    @property
    def metric(self) -> Metric:
        return metric_named(self.settings.metric)

    def get_value(self, key: str, default=None):
        row = self._conn.execute("SELECT value FROM settings WHERE key = ?", (key,)).fetchone()
        return json.loads(row[0]) if row else default

    @property
    def mean(self) -> np.ndarray:
        v = self.get_value("mean")
        return np.asarray(v, np.float32) if v is not None else np.zeros(self.settings.dim, np.float32)

    # -- rows (the same queries as IndexStore) ------------------------------------------------------
    def count(self) -> int:
        return self._conn.execute("SELECT count(*) FROM images").fetchone()[0] or 0

    def row_ids(self) -> np.ndarray:
        rows = self._conn.execute("SELECT id FROM images").fetchall()
        return np.array(rows, np.int64).reshape(len(rows))

    def rows_by_ids(self, ids: Iterable[int]) -> dict[int, LiteRow]:
        ids = [int(i) for i in ids]
        out: dict[int, LiteRow] = {}
        cols = ", ".join(_ROW_COLUMNS)
        for chunk in chunks(ids, 500):
            sql = f"SELECT {cols} FROM images WHERE id IN ({', '.join('?' * len(chunk))})"
            for r in self._conn.execute(sql, chunk):
                out[r[0]] = LiteRow(r)
        return out

    def row_paths(self) -> list[tuple[int, str, str]]:
        return self._conn.execute("SELECT id, path, sha256 FROM images").fetchall()

    def row_by_path(self, path: str) -> LiteRow | None:
        rows = self._conn.execute(f"SELECT {', '.join(_ROW_COLUMNS)} FROM images WHERE path = ?", (path,)).fetchall()
        if len(rows) > 1:  # as scalar_one_or_none() (a faces index has a row per face; it never comes here)
            from retrieval.errors import IndexError_

            raise IndexError_(f"{self.where}: several rows for {path}")
        return LiteRow(rows[0]) if rows else None

    def iter_vectors(self, chunk: int = 2048) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        yield from paged_vectors(lambda last, n: self._conn.execute(
            "SELECT id, vector FROM images WHERE id > ? ORDER BY id LIMIT ?", (last, n)).fetchall(),
            self.settings.dim, chunk)

    def vectors_of(self, ids: Sequence[int], chunk: int = 1000) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        yield from vectors_by_ids(lambda part: self._conn.execute(
            f"SELECT id, vector FROM images WHERE id IN ({', '.join('?' * len(part))})", part).fetchall(), ids, chunk)

    def training_sample(self, m: int) -> np.ndarray:
        rows = [r[0] for r in self._conn.execute("SELECT vector FROM images ORDER BY random() LIMIT ?", (m,))]
        if not rows:
            return np.zeros((0, self.settings.dim), np.float32)
        return as_vectors(rows, self.settings.dim)

    # -- linear head and vector space (as IndexStore) --------------------------------------------------
    def _arrays(self, names: list[str]) -> dict[str, np.ndarray]:
        out = {}
        try:
            sql = f"SELECT name, shape, data FROM arrays WHERE name IN ({', '.join('?' * len(names))})"
            for name, shape, data in self._conn.execute(sql, names):
                out[name] = np.frombuffer(data, np.float64).reshape(json.loads(shape))
        except sqlite3.OperationalError:
            pass  # no arrays table
        return out

    # -- vectors: reconciled with the rows in memory, as the full store does for a reader ----------------
    def faiss_index(self):
        return self._vectors.get()

    def removed_ids(self) -> np.ndarray:
        self._vectors.get()
        return self._vectors.removed


def _pragmas(conn: sqlite3.Connection) -> None:
    """What retrieval/index/store.py sets on each SQLite connection."""
    try:
        conn.execute("PRAGMA journal_mode=WAL")
    except Exception:  # noqa: BLE001
        pass  # read-only directory: plain rollback journal reads still work
    conn.execute("PRAGMA synchronous=NORMAL")
    conn.execute("PRAGMA busy_timeout=10000")
