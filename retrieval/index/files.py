"""Writing an index's files so that a crash leaves the old file or the new one, never a torn one: each file is
written under a temporary name, fsynced, renamed into place, and its directory fsynced."""
from __future__ import annotations

import os
from pathlib import Path


def fsync(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def fsync_dir(directory: Path) -> None:
    """Make a rename in ``directory`` durable (where the platform allows opening a directory)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def first_line(e: Exception) -> str:
    """An exception's message in one line (a database driver's own message when SQLAlchemy wraps it)."""
    msg = str(getattr(e, "orig", None) or e).strip().splitlines()
    return msg[0] if msg else type(e).__name__
