"""Finding the photos under the given paths: recursive, iterative, by real path, never leaving the given trees.

- Paths are real paths (``os.path.realpath``): a folder reached through a link and directly is one folder,
  and its photos are indexed once.
- The walk is iterative (an explicit stack), so a tree of any depth is walked (``os.walk`` recurses and
  raises ``RecursionError`` at about a thousand levels on Python 3.10/3.11).
- A symbolic link whose target lies outside the trees being scanned (a link to ``/``, to another disk) is
  not followed unless ``follow_links=True``; a link back into the trees is harmless (its target is walked
  at most once). Every directory is entered at most once (by device and inode), so link cycles end.
- Hidden files and folders (a leading ".") and files without an image extension are passed over; a file
  named directly counts even without an image extension. Photo formats that are found but not decoded (camera raw,
  JPEG XL: retrieval/images.py NOT_DECODED) are yielded, so that the indexer names each with its reason.
- Names are kept as the file system gives them, undecodable bytes included (retrieval/names.py).
"""
from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

from retrieval.errors import RetrieveError
from retrieval.images import is_image_path


@dataclass(frozen=True)
class FileEntry:
    path: str  # the real path (absolute, no symbolic link in it)
    size: int
    mtime_ns: int


def check_paths(paths: Iterable[str | os.PathLike]) -> list[Path]:
    """Real paths of ``paths`` (links resolved); a missing one is an error for the whole command."""
    out = []
    for p in paths:
        ap = Path(os.path.realpath(os.path.expanduser(p)))
        if not ap.exists():
            raise RetrieveError(f"{p}: no such file or directory")
        out.append(ap)
    return out


def _within(path: str, trees: Iterable[str]) -> bool:
    return any(path == t or path.startswith(t.rstrip(os.sep) + os.sep) for t in trees)


class Scan:
    """Iterating yields a :class:`FileEntry` for every image file under the paths, in a stable order.

    After (or during) the iteration, ``trees`` holds the real directories walked from (the given folders,
    plus the targets of followed links that lie outside them) and ``links_not_followed`` the links that
    point out of the trees and were left alone (only without ``follow_links``).
    """

    def __init__(self, paths: Iterable[str | os.PathLike], follow_links: bool = False):
        self.roots = check_paths(paths)
        self.follow_links = follow_links
        self.trees: list[str] = [str(r) for r in self.roots if r.is_dir()]
        self.links_not_followed: list[str] = []

    def __iter__(self) -> Iterator[FileEntry]:
        seen_dirs: set[tuple[int, int]] = set()
        seen_files: set[str] = set()
        for root in self.roots:
            if not root.is_dir():  # a file named directly
                e = _file_entry(str(root))
                if e is not None and e.path not in seen_files:
                    seen_files.add(e.path)
                    yield e
                continue
            stack = [str(root)]  # real paths of directories still to list, next one last
            while stack:
                directory = stack.pop()
                try:
                    st = os.stat(directory)
                except OSError:
                    continue
                if (st.st_dev, st.st_ino) in seen_dirs:  # reached twice (a link, a cycle, a repeated root)
                    continue
                seen_dirs.add((st.st_dev, st.st_ino))
                try:
                    with os.scandir(directory) as it:
                        entries = sorted(it, key=lambda d: d.name)
                except OSError:
                    continue  # unreadable or vanished: nothing to index there
                subdirs = []
                for d in entries:
                    if d.name.startswith("."):
                        continue
                    try:
                        is_link = d.is_symlink()
                        is_dir = d.is_dir(follow_symlinks=True)
                    except OSError:
                        continue
                    if is_link:
                        real = os.path.realpath(d.path)
                        if not _within(real, self.trees):
                            if not self.follow_links:
                                self.links_not_followed.append(d.path)
                                continue
                            if is_dir:
                                self.trees.append(real)
                    else:
                        real = d.path
                    if is_dir:
                        subdirs.append(real)
                    elif is_image_path(d.name) and real not in seen_files:
                        e = _file_entry(real)
                        if e is not None:
                            seen_files.add(real)
                            yield e
                stack.extend(reversed(subdirs))  # depth first, in name order, like os.walk


def _file_entry(path: str) -> FileEntry | None:
    try:
        st = os.stat(path)
    except OSError:
        return None  # vanished or a dangling link: nothing to index
    if not stat.S_ISREG(st.st_mode):
        return None
    return FileEntry(path, st.st_size, st.st_mtime_ns)


def scan_paths(paths: Iterable[str | os.PathLike], follow_links: bool = False) -> Scan:
    """Every image file under ``paths`` (see :class:`Scan`; iterate it, then read ``trees``)."""
    return Scan(paths, follow_links=follow_links)
