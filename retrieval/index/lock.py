"""One writer at a time: an exclusive advisory lock on ``DIR/lock`` that names its holder."""
from __future__ import annotations

import errno
import os
import stat
import time
from pathlib import Path

from retrieval.errors import IndexError_, IndexLocked

LOCK_NAME = "lock"


class WriterLock:
    """An exclusive, non-blocking ``flock`` on ``DIR/lock`` (released on exit or crash).

    The lock file is opened without following a symbolic link (``O_NOFOLLOW``) and must be a plain file
    with one name: a link planted in the index directory is refused, never truncated through.
    """

    def __init__(self, directory: Path):
        self.path = Path(directory) / LOCK_NAME
        self.fd: int | None = None

    def acquire(self, what: str) -> None:
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
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} ({what}, since {time.strftime('%Y-%m-%d %H:%M:%S')})".encode(), 0)
        self.fd = fd

    def release(self) -> None:
        if self.fd is not None:
            os.ftruncate(self.fd, 0)
            os.close(self.fd)  # closing drops the flock
            self.fd = None


def _quote(path: Path) -> str:
    import shlex

    return shlex.quote(str(path))
