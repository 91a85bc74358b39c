"""Finding the photos under the given paths: recursive, symlink loops broken, non-images passed over."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

from .errors import RetrieveError
from .images import is_image_path


@dataclass(frozen=True)
class FileEntry:
    path: str  # absolute
    size: int
    mtime_ns: int


def _entry(path: str) -> FileEntry | None:
    try:
        st = os.stat(path)
    except OSError:
        return None  # vanished or a dangling link: nothing to index
    return FileEntry(path, st.st_size, st.st_mtime_ns)


def check_paths(paths: Iterable[str | os.PathLike]) -> list[Path]:
    """Absolute paths; a missing one is an error for the whole command."""
    out = []
    for p in paths:
        ap = Path(os.path.abspath(os.path.expanduser(p)))
        if not ap.exists():
            raise RetrieveError(f"{p}: no such file or directory")
        out.append(ap)
    return out


def scan_paths(paths: Iterable[str | os.PathLike]) -> Iterator[FileEntry]:
    """Every image file under ``paths`` (files given directly count even without an image extension)."""
    seen_dirs: set[tuple[int, int]] = set()
    seen_files: set[str] = set()
    for root in check_paths(paths):
        if root.is_file():
            e = _entry(str(root))
            if e and e.path not in seen_files:
                seen_files.add(e.path)
                yield e
            continue
        for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
            try:
                st = os.stat(dirpath)
            except OSError:
                dirnames[:] = []
                continue
            key = (st.st_dev, st.st_ino)
            if key in seen_dirs:  # a symlink loop or a folder reached twice
                dirnames[:] = []
                continue
            seen_dirs.add(key)
            dirnames.sort()
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]
            for name in sorted(filenames):
                if name.startswith(".") or not is_image_path(name):
                    continue
                full = os.path.join(dirpath, name)
                if full in seen_files:
                    continue
                e = _entry(full)
                if e is not None and os.path.isfile(full):
                    seen_files.add(full)
                    yield e
