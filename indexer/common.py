"""What every indexing pipeline shares (photos, faces, Ray): the run's report, progress, and Ctrl-C deferred until
the run is in a state it can stop in."""
from __future__ import annotations

import signal
import threading
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Callable, Protocol


class Progress(Protocol):
    def start(self, total: int) -> None: ...
    def advance(self, n: int) -> None: ...


class NoProgress:
    def start(self, total: int) -> None:
        pass

    def advance(self, n: int) -> None:
        pass


def stage_progress(progress: Progress | None, label: str) -> Callable[[int, int], None] | None:
    """A later stage of the run as ``report(done, total)`` on ``progress``: where it can show stages (``stage(label,
    total)``: the CLI's bar), a bar of its own; else None (nothing to show)."""
    stage = getattr(progress, "stage", None)
    if stage is None:
        return None
    shown = 0

    def report(done: int, total: int) -> None:
        nonlocal shown
        if not shown:
            stage(label, total)
        progress.advance(done - shown)
        shown = done

    return report


def trim_heap() -> None:
    """Give the C heap's free pages back to the system (glibc's ``malloc_trim``; nothing elsewhere). A stage's
    large temporaries (the visual words' training sample, ONNX Runtime's buffers) are freed into the heap, where
    glibc keeps them: the next stage would otherwise start from the last one's peak, and a run's peak RSS is the
    sum of its stages'."""
    import ctypes

    try:
        ctypes.CDLL(None).malloc_trim(0)
    except Exception:  # noqa: BLE001  (no glibc: musl, macOS; Windows' CDLL(None) raises TypeError)
        pass


@dataclass
class IndexReport:
    """What one run did; ``--json`` prints this."""

    index: str = ""
    indexed: int = 0  # embedded by this run (new or changed content; a faces index: photos)
    unchanged: int = 0  # already indexed, nothing to do
    moved: int = 0  # same content at a new path: vector reused
    removed: int = 0  # gone from the scanned folders
    skipped: int = 0  # could not be decoded (this run)
    skipped_before: int = 0  # recorded as undecodable by an earlier run and unchanged since: not retried
    total: int = 0  # rows in the index after the run (a faces index: faces)
    seconds: float = 0.0
    interrupted: bool = False
    skipped_files: list = field(default_factory=list)
    catalogue: list | None = None  # --catalogue: the folders and files recorded as the catalogue
    kept_missing: list = field(default_factory=list)  # folders away (unplugged?): {"folder", "exists", "photos"}

    def to_dict(self) -> dict:
        d = asdict(self)
        d["seconds"] = round(self.seconds, 3)
        if d["catalogue"] is None:
            d.pop("catalogue")
        return d


@dataclass
class FaceIndexReport(IndexReport):
    """:class:`IndexReport` of a faces index: ``indexed`` counts photos, ``faces`` their faces."""

    faces: int = 0  # faces indexed by this run
    no_face: int = 0  # photos in which this run found no face (reported, remembered, not errors)


@contextmanager
def sigint_deferred(stop: threading.Event):
    """While inside, SIGINT (Ctrl-C) only sets ``stop`` (main thread only; elsewhere nothing changes)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, lambda *_: stop.set())
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
