"""A real PostgreSQL server for the tests: ``$RETRIEVE_TEST_PG_URL`` (``.ci/run`` starts one), else a throw-away
cluster started here with Debian's initdb/pg_ctl (as the ``postgres`` user when we are root: initdb refuses
root), on 127.0.0.1 and a free port, trust authentication, removed afterwards.

:func:`server` returns ``(url, None)`` or ``(None, why)``: the tests skip with that one line.
"""
from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

ENV = "RETRIEVE_TEST_PG_URL"


def _bin_dir() -> Path | None:
    found = shutil.which("pg_ctl")
    if found and Path(found).with_name("initdb").exists():
        return Path(found).resolve().parent
    dirs = sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda d: int(Path(d).parent.name)
                  if Path(d).parent.name.isdigit() else 0)
    for d in reversed(dirs):
        if (Path(d) / "initdb").exists() and (Path(d) / "pg_ctl").exists():
            return Path(d)
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Cluster:
    """A private cluster in a temporary directory: :meth:`start`, then :meth:`stop` (removes it)."""

    def __init__(self, durable: bool = False):
        self.durable = durable  # False (tests): no fsync, faster; True (benchmarks): the server's defaults
        self.root: Path | None = None
        self.bin: Path | None = None
        self.port = 0
        self.as_user: list[str] = []

    def _run(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
        return subprocess.run(self.as_user + [str(a) for a in args], capture_output=True, text=True, timeout=timeout)

    def start(self) -> str:
        self.bin = _bin_dir()
        if self.bin is None:
            raise RuntimeError("no initdb/pg_ctl on this machine "
                               f"(apt-get install postgresql, or set {ENV})")
        self.root = Path(tempfile.mkdtemp(prefix="retrieve-pg-"))
        if os.geteuid() == 0:
            import pwd

            try:
                pw = pwd.getpwnam("postgres")
            except KeyError:
                raise RuntimeError("running as root and there is no postgres user to run initdb as") from None
            os.chown(self.root, pw.pw_uid, pw.pw_gid)
            runuser = shutil.which("runuser")
            if not runuser:
                raise RuntimeError("running as root without runuser: cannot start PostgreSQL as the postgres user")
            self.as_user = [runuser, "-u", "postgres", "--"]
        data = self.root / "data"
        r = self._run(self.bin / "initdb", "-D", data, "-U", "retrieve", "--auth=trust", "-E", "UTF8",
                      "--locale=C", "--no-sync")
        if r.returncode:
            raise RuntimeError(f"initdb failed: {(r.stderr or r.stdout).strip().splitlines()[-1:]}")
        self.port = _free_port()
        opts = f"-c listen_addresses=127.0.0.1 -p {self.port} -c unix_socket_directories={self.root}"
        if not self.durable:
            opts += " -c fsync=off -c synchronous_commit=off -c full_page_writes=off"
        r = self._run(self.bin / "pg_ctl", "-D", data, "-l", self.root / "log", "-o", opts, "-w", "-t", "60", "start")
        if r.returncode:
            log = (self.root / "log").read_text(errors="replace") if (self.root / "log").exists() else ""
            raise RuntimeError(f"pg_ctl start failed: {(log or r.stderr or r.stdout).strip().splitlines()[-1:]}")
        return f"postgresql+psycopg://retrieve@127.0.0.1:{self.port}/postgres"

    def stop(self) -> None:
        if self.root is None:
            return
        if self.bin is not None and (self.root / "data" / "postmaster.pid").exists():
            self._run(self.bin / "pg_ctl", "-D", self.root / "data", "-m", "immediate", "-w", "stop")
        shutil.rmtree(self.root, ignore_errors=True)
        self.root = None


def server() -> tuple[str | None, str | None, Cluster | None]:
    """``(url, None, cluster)`` of a server to test against, or ``(None, why, None)``."""
    try:
        import psycopg  # noqa: F401
    except ImportError:
        return None, "psycopg is not installed (pip install 'retrieve[postgres]')", None
    url = os.environ.get(ENV)
    if url:
        return url, None, None
    cluster = Cluster()
    try:
        return cluster.start(), None, cluster
    except (RuntimeError, OSError, subprocess.SubprocessError) as e:
        cluster.stop()
        return None, f"cannot start a PostgreSQL server: {e}", None


def new_database(url: str, name: str) -> str:
    """A fresh, empty database ``name`` on the server of ``url``; its URL."""
    import psycopg
    from sqlalchemy.engine import make_url

    u = make_url(url)
    with psycopg.connect(host=u.host, port=u.port, user=u.username, password=u.password,
                         dbname=u.database or "postgres", autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        conn.execute(f'CREATE DATABASE "{name}"')
    return u.set(database=name).render_as_string(hide_password=False)
