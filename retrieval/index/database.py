"""An index's rows on a PostgreSQL server (``--db postgresql+psycopg://user@host/db``) instead of SQLite.

The SQLite file in the index directory stays the embedded default. With ``--db`` the rows — settings,
images with their raw embeddings (``bytea``), skipped files, fitted arrays — live in that database, in the
same tables (retrieval/index/schema.py) with the same schema versioning; the FAISS vector file stays in the index
directory, a cache derived from the rows as always (retrieval/index/vectors.py). Several index directories, on
several machines, may use one database: each keeps its own vector file, reconciled with the rows on open.

**Which database.** The index directory records the URL it uses in ``DIR/database.json``, *without* the
password: a later ``retrieve search --index DIR`` finds the database, and the password comes from where
libpq looks for it (``PGPASSWORD``, ``~/.pgpass``, or ``--db`` given again with the password in the URL).
A ``--db`` that names another database than the recorded one, or a ``--db`` on a directory holding an
SQLite index, is refused in one line.

**Creation** is one transaction (PostgreSQL's DDL is transactional): the tables and the settings appear
together or not at all, the equivalent of SQLite's temporary file renamed into place.

**One writer at a time, across machines:** a session-level advisory lock (``pg_try_advisory_lock``) on a
dedicated connection held for the whole run. It goes with the connection, so a writer killed with ``kill -9``
(or a machine that vanishes: TCP keepalives) frees it. Readers take no lock: each query sees the last
committed state (MVCC), so searches keep answering during a run.
"""
from __future__ import annotations

import json
import os
import socket
from pathlib import Path

from retrieval.errors import IndexError_, IndexLocked

RECORD_NAME = "database.json"  # in the index directory: which database holds its rows (no password)
EXTRA = "pip install 'retrieve[postgres]' (psycopg 3)"
# The writer lock's key: one index per database, so one key. Any 64-bit number; this one spells "retrieve".
LOCK_KEY = int.from_bytes(b"retrieve", "big") & 0x7FFF_FFFF_FFFF_FFFF
_KEEPALIVE = {"keepalives": 1, "keepalives_idle": 30, "keepalives_interval": 10, "keepalives_count": 3}

_requested: str | None = None  # --db / $RETRIEVE_DB of this process


def use(url: str | None) -> None:
    """Remember the ``--db`` URL of this command (None: the directory's record, else SQLite)."""
    global _requested
    _requested = _render(normalise(url), True) if url else None


def requested() -> str | None:
    return _requested


def normalise(url: str):
    """``url`` as a SQLAlchemy URL with the psycopg 3 driver; a one-line error for anything else."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        u = make_url(str(url).strip())
    except (ArgumentError, ValueError):
        raise IndexError_(f"--db {_mask(url)}: not a database URL (postgresql+psycopg://USER@HOST[:PORT]/DB)") from None
    backend = u.drivername.split("+")[0]
    if backend == "sqlite":
        raise IndexError_("--db: an SQLite index is the default, in the index directory; leave --db out "
                          "(--db takes postgresql+psycopg://USER@HOST[:PORT]/DB)")
    if backend not in ("postgresql", "postgres"):
        raise IndexError_(f"--db {display(u)}: only PostgreSQL is supported (postgresql+psycopg://USER@HOST[:PORT]/DB)")
    if "+" in u.drivername and u.drivername.split("+", 1)[1] != "psycopg":
        raise IndexError_(f"--db {display(u)}: retrieve talks to PostgreSQL through psycopg 3; write the URL as "
                          f"{display(u.set(drivername='postgresql+psycopg'))}")
    u = u.set(drivername="postgresql+psycopg")
    if not u.database:
        raise IndexError_(f"--db {display(u)}: the URL names no database (postgresql+psycopg://USER@HOST[:PORT]/DB)")
    return u


def _render(u, with_password: bool) -> str:
    return (u if with_password else u._replace(password=None)).render_as_string(hide_password=False)


def display(url) -> str:
    """The URL without its password (what messages show and what the index directory records)."""
    from sqlalchemy.engine import make_url

    try:
        return _render(make_url(str(url)) if isinstance(url, str) else url, False)
    except Exception:
        return "(unreadable URL)"


def _mask(url) -> str:
    s = str(url)
    if "@" in s and "://" in s:  # user:password@ → user@
        scheme, rest = s.split("://", 1)
        cred, host = rest.rsplit("@", 1)
        return f"{scheme}://{cred.split(':', 1)[0]}@{host}"
    return s


# -- the directory's record ---------------------------------------------------------------------------
def recorded(directory: Path) -> str | None:
    """The database URL ``directory`` records (without password), or None (an SQLite index, or nothing yet)."""
    path = Path(directory) / RECORD_NAME
    try:
        data = json.loads(path.read_text())
        url = data["url"]
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError):
        raise IndexError_(f"{path}: unreadable (it should name the index's database); remove it and give --db URL") from None
    return str(url)


def record(directory: Path, url: str) -> None:
    """Write ``DIR/database.json`` (atomically; never the password). Call it holding the writer lock."""
    shown = display(url)
    if recorded(directory) == shown:
        return
    path = Path(directory) / RECORD_NAME
    tmp = path.with_name(f".{RECORD_NAME}.{os.getpid()}.tmp")
    with open(tmp, "w") as f:
        f.write(json.dumps({"url": shown, "password": "not stored: PGPASSWORD, ~/.pgpass or --db with the password"})
                + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def url_for(directory: Path, sqlite_file: Path | None = None) -> str | None:
    """The server URL whose database holds ``directory``'s rows, or None for the embedded SQLite file.

    ``--db`` (this process's request) must agree with what the directory records; a directory holding an
    SQLite index (``sqlite_file`` exists) takes no ``--db``.
    """
    asked = _requested
    have = recorded(directory)
    if asked is None:
        return have
    if sqlite_file is not None and sqlite_file.is_file():
        raise IndexError_(f"index {directory} keeps its rows in {sqlite_file} (SQLite), not in {display(asked)}; "
                          "leave --db out, or give another --index directory")
    if have is not None and have != display(asked):
        raise IndexError_(f"index {directory} uses the database {have}, not {display(asked)}; give --db {have} "
                          "(or leave --db out), or another --index directory")
    return asked


# -- engines -----------------------------------------------------------------------------------------
def make_engine(url: str):
    """A SQLAlchemy engine for the server (psycopg 3); a one-line error naming the extra when it is missing."""
    from sqlalchemy import create_engine

    try:
        import psycopg  # noqa: F401
    except ImportError:
        raise IndexError_(f"--db {display(url)}: PostgreSQL support is not installed; {EXTRA}") from None
    return create_engine(url, pool_pre_ping=True,
                         connect_args={"application_name": "retrieve", "connect_timeout": 10, **_KEEPALIVE})


def connection_error(url: str, e: Exception) -> IndexError_:
    """A server that cannot be reached or refuses us, in one line (with the hint that works for passwords)."""
    msg = " ".join(str(getattr(e, "orig", None) or e).split())
    msg = msg.replace("connection failed: ", "")
    hint = ""
    if "password" in msg:
        hint = "; give the password in PGPASSWORD or ~/.pgpass (retrieve never stores it)"
    return IndexError_(f"database {display(url)}: cannot connect ({msg[:300]}){hint}")


def is_missing_table(e: Exception) -> bool:
    """An error that says a table does not exist (SQLite or PostgreSQL)."""
    orig = getattr(e, "orig", None)
    return "no such table" in str(e) or getattr(orig, "sqlstate", None) == "42P01"


def table_names(engine) -> set[str]:
    from sqlalchemy import inspect

    return set(inspect(engine).get_table_names())


def create_index(engine, settings: dict) -> None:
    """The tables and the settings rows, in one transaction; refused when the database holds some of our tables
    already but no settings (not made by retrieve)."""
    from sqlalchemy import insert

    from retrieval.index.schema import Base, SettingRow

    ours = set(Base.metadata.tables)
    with engine.begin() as conn:
        there = table_names(conn) & ours
        if there:
            raise IndexError_(f"database {display(engine.url)} has tables named like retrieve's "
                              f"({', '.join(sorted(there))}) but no index settings; give --db an empty database")
        Base.metadata.create_all(conn)
        conn.execute(insert(SettingRow.__table__), [{"key": k, "value": json.dumps(v)} for k, v in settings.items()])


def drop_index(engine) -> None:
    """Remove the tables (an index created by this run that ended up holding nothing)."""
    from retrieval.index.schema import Base

    with engine.begin() as conn:
        Base.metadata.drop_all(conn)


def size(engine) -> int:
    """Bytes the index's tables take on the server (with their indexes and TOAST)."""
    from sqlalchemy import text

    from retrieval.index.schema import Base

    with engine.connect() as conn:
        return int(sum(conn.execute(text("SELECT coalesce(pg_total_relation_size(to_regclass(:t)), 0)"),
                                    {"t": t}).scalar() or 0 for t in Base.metadata.tables))


# -- bulk writes ---------------------------------------------------------------------------------------
def next_ids(conn, table: str, n: int) -> list[int]:
    """The next ``n`` values of ``table``'s id sequence, in one statement (``conn``: a SQLAlchemy connection)."""
    from sqlalchemy import text

    return sorted(int(i) for (i,) in conn.execute(
        text("SELECT nextval(pg_get_serial_sequence(:t, 'id')) FROM generate_series(1, :n)"), {"t": table, "n": n}))


def copy_rows(conn, table: str, columns: tuple[str, ...], rows: list[tuple]) -> None:
    """Write ``rows`` (tuples in the order of ``columns``) into ``table`` with one binary ``COPY … FROM STDIN``, in
    ``conn``'s transaction (a SQLAlchemy connection on psycopg 3): the server parses no SQL per row and receives
    ``bytea`` as bytes rather than hex text. Each column is sent as the type the table declares, so a 32-bit
    column gets 32-bit values."""
    raw = conn.connection.driver_connection
    types = _column_types(raw, table)
    with raw.cursor() as cur:
        with cur.copy(f"COPY {table} ({', '.join(columns)}) FROM STDIN (FORMAT BINARY)") as copy:
            copy.set_types([types[c] for c in columns])
            for r in rows:
                copy.write_row(r)


def _column_types(raw, table: str) -> dict[str, int]:
    """{column: type oid} of ``table`` (one catalogue query: a schema upgraded meanwhile is seen)."""
    with raw.cursor() as cur:
        cur.execute("SELECT attname, atttypid FROM pg_attribute WHERE attrelid = %s::regclass AND attnum > 0 "
                    "AND NOT attisdropped", (table,))
        return {name: int(oid) for name, oid in cur.fetchall()}


# -- the writer lock -----------------------------------------------------------------------------------
class AdvisoryLock:
    """One writer at a time on this database, across machines: ``pg_try_advisory_lock`` on a dedicated
    connection held until :meth:`release` (or until the process dies and the server drops the connection)."""

    def __init__(self, url: str):
        self.url = url
        self.conn = None
        self.engine = None

    def acquire(self, what: str) -> None:
        from sqlalchemy import create_engine, text
        from sqlalchemy.exc import DBAPIError
        from sqlalchemy.pool import NullPool

        make_engine(self.url)  # the extra is installed
        holder = f"pid {os.getpid()} on {socket.gethostname()} ({what})"[:63]  # application_name: 63 bytes at most
        # the server's side of the keepalives too: a writer's machine that vanishes frees the lock in about a minute
        server_keepalive = "-c tcp_keepalives_idle=30 -c tcp_keepalives_interval=10 -c tcp_keepalives_count=3"
        self.engine = create_engine(self.url, poolclass=NullPool,
                                    connect_args={"application_name": holder, "connect_timeout": 10,
                                                  "options": server_keepalive, **_KEEPALIVE})
        try:
            conn = self.engine.connect()
        except DBAPIError as e:
            self.engine.dispose()
            raise connection_error(self.url, e) from None
        try:
            got = conn.execute(text("SELECT pg_try_advisory_lock(:k)"), {"k": LOCK_KEY}).scalar()
            conn.commit()
            if not got:
                who = self._holder(conn)
                raise IndexLocked(f"index database {display(self.url)} is being written by {who}; "
                                  "wait for it to finish")
        except BaseException:
            conn.close()
            self.engine.dispose()
            raise
        self.conn = conn

    @staticmethod
    def _holder(conn) -> str:
        """Who holds the lock, as the holder named itself (its application_name) and since when."""
        from sqlalchemy import text

        row = conn.execute(text(
            "SELECT a.application_name, a.backend_start, a.client_addr FROM pg_locks l "
            "JOIN pg_stat_activity a ON a.pid = l.pid JOIN pg_database d ON d.oid = l.database "
            "WHERE l.locktype = 'advisory' AND l.granted AND d.datname = current_database() "
            "AND l.classid = :hi AND l.objid = :lo AND l.objsubid = 1"),
            {"hi": LOCK_KEY >> 32, "lo": LOCK_KEY & 0xFFFF_FFFF}).first()
        conn.commit()
        if row is None:
            return "another indexer"
        name, since, addr = row
        who = name or (f"a client at {addr}" if addr else "another indexer")
        return f"{who}, connected since {since.astimezone().strftime('%Y-%m-%d %H:%M:%S')}" if since else who

    def release(self) -> None:
        if self.conn is not None:
            try:
                from sqlalchemy import text

                self.conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": LOCK_KEY})
                self.conn.commit()
            except Exception:
                pass  # closing the connection below frees it anyway
            finally:
                self.conn.close()
                self.conn = None
        if self.engine is not None:
            self.engine.dispose()
            self.engine = None

