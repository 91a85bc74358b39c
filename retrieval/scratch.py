"""Private temporary folders that a killed process does not leave behind for good.

A search that builds the visual words without the index's lock writes them under ``$TMPDIR`` (hundreds of MB at
100 k images), and ``retrieve serve`` keeps its uploads there; ``kill -9``, an out-of-memory kill or a power cut
skips their clean-up. Each folder holds an ``.owner`` file its process keeps locked (``flock``) while it lives: the
kernel drops the lock when the process dies, however it dies, so the next folder made with the same prefix removes
those whose lock it can take. A folder of this user's without the file (killed between making it and locking) goes
once it is an hour old. Other users' folders are never touched.
"""
from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path

OWNER = ".owner"
UNLOCKED_GRACE_S = 3600  # a folder without its owner file is removed once this old


class ScratchDir:
    """A new folder ``{prefix}XXXX`` under the temporary directory, locked by this process until :meth:`close`
    (or the process's end); leftovers of dead processes with the same prefix are removed first."""

    def __init__(self, prefix: str, parent: str | Path | None = None):
        parent = Path(parent or tempfile.gettempdir())
        sweep(parent, prefix)
        self.path = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
        making = self.path / (OWNER + ".new")  # locked before it takes its name: a sweep never finds it unlocked
        self._fd = _lock(making, create=True)
        os.replace(making, self.path / OWNER)

    def close(self) -> None:
        if self._fd is not None:
            shutil.rmtree(self.path, ignore_errors=True)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> Path:
        return self.path

    def __exit__(self, *exc) -> None:
        self.close()


def sweep(parent: Path, prefix: str) -> int:
    """Remove the folders ``parent/{prefix}*`` of this user whose process has died; how many went."""
    gone = 0
    try:
        entries = list(os.scandir(parent))
    except OSError:
        return 0
    for e in entries:
        if not e.name.startswith(prefix):
            continue
        try:
            st = e.stat(follow_symlinks=False)
        except OSError:
            continue
        if not e.is_dir(follow_symlinks=False) or st.st_uid != os.getuid():
            continue
        try:
            fd = _lock(Path(e.path) / OWNER, create=False)
        except FileNotFoundError:  # no owner file: made and not locked yet, or its maker died in between
            if time.time() - st.st_mtime < UNLOCKED_GRACE_S:
                continue
            fd = None
        except OSError:  # locked: its process is alive (or not ours to read)
            continue
        try:
            shutil.rmtree(e.path, ignore_errors=True)
            gone += 1
        finally:
            if fd is not None:
                os.close(fd)
    return gone


def _lock(path: Path, create: bool) -> int:
    """An open descriptor of ``path`` holding its exclusive lock; OSError (BlockingIOError) when another holds it."""
    import fcntl

    fd = os.open(path, os.O_RDWR | (os.O_CREAT if create else 0), 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        raise
    return fd
