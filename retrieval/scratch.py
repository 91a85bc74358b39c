"""Private temporary folders that a killed process does not leave behind for good.

A search that builds the visual words without the index's lock writes them under ``$TMPDIR`` (hundreds of MB at
100 k images), and ``retrieve serve`` keeps its uploads there; ``kill -9``, an out-of-memory kill or a power cut
skips their clean-up. Each folder holds an ``.owner`` file its process keeps locked (``flock``) while it lives: the
kernel drops the lock when the process dies, however it dies, so the next folder made with the same prefix removes
those whose lock it can take. A folder of this user's whose owner file was never named (killed between making it and
locking it) goes once it is an hour old; one without any (an older version's, or made where ``flock`` fails) is left
alone, as are other users' folders and symbolic links.
"""
from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path

OWNER = ".owner"
MAKING = ".owner.new"  # the owner file before it is locked and named
UNLOCKED_GRACE_S = 3600  # a folder whose owner file was never named is removed once this old


class ScratchDir:
    """A new folder ``{prefix}XXXX`` under the temporary directory, locked by this process until :meth:`close`
    (or the process's end); leftovers of dead processes with the same prefix are removed first."""

    def __init__(self, prefix: str, parent: str | Path | None = None):
        parent = Path(parent or tempfile.gettempdir())
        sweep(parent, prefix)
        self.path = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
        self._fd = None
        making = self.path / MAKING  # locked before it takes its name: a sweep never finds the owner file unlocked
        try:
            self._fd = _lock(making, create=True)
            os.replace(making, self.path / OWNER)
        except OSError:  # no flock here (some network file systems): a folder as tempfile makes it, not swept
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None
            making.unlink(missing_ok=True)
        self._open = True

    def close(self) -> None:
        if self._open:
            self._open = False
            shutil.rmtree(self.path, ignore_errors=True)  # (before the lock goes: no sweep removes it under us)
            if self._fd is not None:
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
        except FileNotFoundError:  # no owner file: its maker died before naming it (after an hour), or a folder
            # of an older version or of a file system without locks, whose owner cannot be known: left alone
            if not os.path.exists(os.path.join(e.path, MAKING)) or time.time() - st.st_mtime < UNLOCKED_GRACE_S:
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

    flags = os.O_RDWR | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    fd = os.open(path, flags | (os.O_CREAT | os.O_EXCL if create else 0), 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        raise
    return fd
