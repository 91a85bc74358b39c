"""One writer at a time: an exclusive advisory lock on ``DIR/lock`` that names its holder."""
from __future__ import annotations

import errno
import os
import stat
import time
from pathlib import Path

from retrieval.errors import IndexError_, IndexLocked

LOCK_NAME = "lock"
LOCK_TRIES = 20  # a lock file replaced this many times in a row: another process is removing and making it


class WriterLock:
    """An exclusive, non-blocking ``flock`` on ``DIR/lock`` (released on exit or crash).

    The lock file is opened without following a symbolic link (``O_NOFOLLOW``) and must be a plain file
    with one name: a link planted in the index directory is refused, never truncated through.

    A lock cannot be lost to an unlink: a writer that removes its index (a failed creation, ``discard``) unlinks
    ``DIR/lock`` while holding it, and a process that opened the old file just before may then get the ``flock``
    of a file no longer at that path while a third one locks the new file. So a lock counts only when the file
    locked is still the one at the path (the same device and inode, checked after locking); else it is tried
    again on the file now there.
    """

    def __init__(self, directory: Path):
        self.path = Path(directory) / LOCK_NAME
        self.fd: int | None = None

    def acquire(self, what: str) -> None:
        for _ in range(LOCK_TRIES):
            fd = self._lock_file()
            if fd is None:  # locked a file unlinked meanwhile: lock the one at the path now
                continue
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"pid {os.getpid()} ({what}, since {time.strftime('%Y-%m-%d %H:%M:%S')})".encode(), 0)
            self.fd = fd
            return
        raise IndexLocked(f"index {self.path.parent}: its lock file keeps being replaced by another process; "
                          "wait for it to finish")

    def _lock_file(self) -> int | None:
        """A descriptor of ``DIR/lock`` holding its ``flock``; None when the file locked is no longer the one at
        the path (unlinked or replaced after it was opened)."""
        import fcntl

        flags = os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
        try:
            fd = os.open(self.path, flags, 0o644)
        except OSError as e:
            if e.errno == errno.ELOOP or (e.errno == errno.EEXIST and self.path.is_symlink()):
                raise IndexError_(f"{self.path} is a symbolic link, not a lock file; remove it "
                                  f"(rm {_quote(self.path)}) and run the command again") from None
            raise
        st = os.fstat(fd)
        if stat.S_ISREG(st.st_mode) and st.st_nlink == 0:  # unlinked since it was opened
            os.close(fd)
            return None
        if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1:
            os.close(fd)
            kind = "not a regular file" if not stat.S_ISREG(st.st_mode) else "a hard link to another file"
            raise IndexError_(f"{self.path} is {kind}, not a lock file; remove it (rm {_quote(self.path)}) "
                              "and run the command again")
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EAGAIN, errno.EACCES):
                os.close(fd)
                raise
            holder = os.pread(fd, 400, 0).decode("utf-8", "replace").strip() or "another process"
            os.close(fd)
            raise IndexLocked(f"index {self.path.parent} is being written by {holder}; wait for it to finish") from None
        try:
            now = os.stat(self.path, follow_symlinks=False)
        except FileNotFoundError:
            now = None
        if now is None or (now.st_dev, now.st_ino) != (st.st_dev, st.st_ino):
            os.close(fd)  # (drops the flock of the unlinked file)
            return None
        return fd

    def release(self) -> None:
        if self.fd is not None:
            os.ftruncate(self.fd, 0)
            os.close(self.fd)  # closing drops the flock
            self.fd = None


def _quote(path: Path) -> str:
    import shlex

    return shlex.quote(str(path))
