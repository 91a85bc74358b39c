"""``retrieve index``: bring an index up to date with folders of photos, incrementally and safely.

Unchanged files (same size and mtime) cost nothing; a changed file is re-embedded only if its content
hash changed; a moved or copied file (same content hash) reuses its stored vector; files that vanished
from the scanned folders leave the index. Decoding runs in threads ahead of inference, and rows are
committed batch by batch, so an interrupted run keeps its work and the next run continues from there.
"""
from __future__ import annotations

import hashlib
import os
import signal
import threading
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Protocol

import numpy as np
from sqlalchemy import delete, select, update

from retrieval.backbone import Backbone
from retrieval.errors import ImageError, RetrieveError
from retrieval.images import decode_image
from retrieval.models import DEFAULT_MODEL, load_backbone
from retrieval.head import parse_head
from retrieval.pooling import parse_pooling
from retrieval.service import backbone_for_settings
from retrieval.calibration import refresh as refresh_calibration
from retrieval.store import (PRESETS, ImageRow, IndexSettings, IndexStore, SkippedRow, default_explain,
                             factory_for)

from retrieval.scan import FileEntry, check_paths, scan_paths


class Progress(Protocol):
    def start(self, total: int) -> None: ...
    def advance(self, n: int) -> None: ...


class _NoProgress:
    def start(self, total: int) -> None:
        pass

    def advance(self, n: int) -> None:
        pass


@dataclass
class IndexReport:
    """What one run did; ``--json`` prints this."""

    index: str = ""
    indexed: int = 0  # embedded by this run (new or changed content)
    unchanged: int = 0  # already indexed, nothing to do
    moved: int = 0  # same content at a new path: vector reused
    removed: int = 0  # gone from the scanned folders
    skipped: int = 0  # could not be decoded (this run)
    skipped_before: int = 0  # recorded as undecodable by an earlier run and unchanged since: not retried
    total: int = 0  # images in the index after the run
    seconds: float = 0.0
    interrupted: bool = False
    skipped_files: list = field(default_factory=list)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["seconds"] = round(self.seconds, 3)
        return d


@dataclass
class _Decoded:
    entry: FileEntry
    sha256: str = ""
    width: int = 0
    height: int = 0
    array: np.ndarray | None = None
    error: str | None = None
    reuse_id: int | None = None  # a row with the same content exists: reuse its vector


def index_paths(paths: Iterable[str | os.PathLike], index_dir: str | os.PathLike, *, model: str | None = None,
                weights: str | None = None, metric: str | None = None, index_type: str | None = None,
                faiss_factory: str | None = None, input_size: int | None = None, head: str | None = None,
                resize: str | None = None, pooling: str | None = None, preset: str | None = None,
                refit: bool = False, batch_size: int = 32,
                workers: int | None = None, progress: Progress | None = None,
                on_skip: Callable[[str, str], None] | None = None,
                backbone: Backbone | None = None) -> IndexReport:
    """Index (or update the index of) the images under ``paths`` into ``index_dir``; see the module docstring.

    ``model``/``metric``/``index_type``/``head`` fix the settings of a new index; for an existing index
    they must agree with the recorded ones (or be None). ``refit`` re-fits the linear head on the whole
    collection (it is also re-fitted when the collection has doubled since). ``backbone`` substitutes a
    ready-made backbone (tests).
    """
    t0 = time.perf_counter()
    search_defaults = {}
    if preset is not None:  # fills in what the caller left open
        if preset not in PRESETS:
            raise RetrieveError(f"unknown preset {preset!r} ({', '.join(PRESETS)})")
        p = PRESETS[preset]
        input_size = input_size or p["input_size"]
        resize, pooling, head = resize or p["resize"], pooling or p["pooling"], head or p["head"]
        search_defaults = dict(p["search"])
    if batch_size < 1:
        raise RetrieveError(f"--batch-size must be at least 1, got {batch_size}")
    roots = check_paths(paths)
    progress = progress or _NoProgress()
    on_skip = on_skip or (lambda p, r: None)
    index_dir = Path(index_dir).expanduser().resolve()
    what = "retrieve index"

    if IndexStore.exists(index_dir):
        store = IndexStore.open(index_dir, writable=True, what=what)
        try:
            store.check_compatible(model, metric)
            if head is not None and parse_head(head) != store.settings.head:
                raise RetrieveError(f"index {index_dir} has head {store.settings.head or 'none'}; the head is fixed "
                                    "when the index is created (use --refit to re-fit it on the collection)")
            for what_, asked, has in (("pooling", pooling and str(parse_pooling(pooling)), store.settings.pooling),
                                      ("resize", resize, store.settings.preprocess.get("resize", "squash"))):
                if asked and asked != has:
                    raise RetrieveError(f"index {index_dir} has {what_} {has}; it is fixed when the index is created "
                                        "(use another --index directory to change it)")
            if index_type and index_type != store.settings.index_type:
                raise RetrieveError(f"index {index_dir} has type {store.settings.index_type}; its type is fixed "
                                    "when it is created (use another --index directory to change it)")
            bb = backbone or backbone_for_settings(store.settings)
        except Exception:
            store.close()
            raise
    else:
        bb = backbone or load_backbone(model or DEFAULT_MODEL, weights, input_size=input_size, resize=resize,
                                       pooling=pooling)
        itype = "custom" if faiss_factory else (index_type or "flat")
        settings = IndexSettings(model=bb.name, weights_id=bb.weights_id, weights_source=bb.weights_source,
                                 preprocess=bb.preprocess.to_dict(), metric=metric or "cosine", dim=bb.feature_dim,
                                 index_type=itype, faiss_factory=faiss_factory or factory_for(itype, bb.feature_dim, 0),
                                 explain=default_explain(bb.preprocess.size), head=parse_head(head),
                                 pooling=str(bb.pooling), search=search_defaults)
        if faiss_factory:
            _check_factory(faiss_factory, bb.feature_dim)
        store = IndexStore.create(index_dir, settings, what=what)

    report = IndexReport(index=str(index_dir))
    stop = threading.Event()
    previous = None
    if threading.current_thread() is threading.main_thread():
        # Ctrl-C only sets a flag: the run stops between two items, never inside a commit or a FAISS write.
        previous = signal.signal(signal.SIGINT, lambda *_: stop.set())
    try:
        store.faiss_index()  # loaded (and reconciled) before this run changes any row
        _run(store, bb, roots, report, batch_size, workers, progress, on_skip, stop)
    except KeyboardInterrupt:
        report.interrupted = True
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)
        try:
            if not report.interrupted and (refit or store.head_is_stale()) and store.fit_head():
                store.rebuild_faiss()  # every vector changes with the head
            elif store.needs_retrain():
                store.rebuild_faiss()
            store.update_mean()
            store.save_faiss()
            if not report.interrupted:
                refresh_calibration(store)  # where scores stand in this collection (explain verdicts)
            store.set_value("updated_at", time.time())
            report.total = store.count()
        finally:
            store.close()
    report.seconds = time.perf_counter() - t0
    return report


def _check_factory(factory: str, dim: int) -> None:
    import faiss

    try:
        faiss.index_factory(dim, factory)
    except RuntimeError:
        raise RetrieveError(f"--faiss {factory!r}: not a valid FAISS factory string") from None


def _under(path: str, roots: list[Path]) -> bool:
    return any(path == str(r) or path.startswith(str(r).rstrip(os.sep) + os.sep) for r in roots)


def _run(store: IndexStore, bb: Backbone, roots: list[Path], report: IndexReport, batch_size: int,
         workers: int | None, progress: Progress, on_skip: Callable[[str, str], None],
         stop: threading.Event) -> None:
    files = {e.path: e for e in scan_paths(roots)}
    with store.session() as s:
        rows = {r.path: r for r in s.execute(select(ImageRow.id, ImageRow.path, ImageRow.size, ImageRow.mtime_ns,
                                                    ImageRow.sha256)).all()}
        bad = {r.path: r for r in s.execute(select(SkippedRow)).scalars()}

    todo: list[FileEntry] = []
    for path, e in files.items():
        r = rows.get(path)
        if r is not None and r.size == e.size and r.mtime_ns == e.mtime_ns:
            report.unchanged += 1
        elif r is None and path in bad and bad[path].size == e.size and bad[path].mtime_ns == e.mtime_ns:
            report.skipped_before += 1
        else:
            todo.append(e)
    gone: dict[str, list] = {}  # content hash → rows whose file vanished from the scanned folders
    for p, r in rows.items():
        if p not in files and _under(p, roots):
            gone.setdefault(r.sha256, []).append(r)
    by_hash: dict[str, int] = {r.sha256: r.id for r in rows.values()}
    progress.start(len(todo))

    verifier = None  # an index whose searches verify gets its keypoints while it is indexed
    if store.settings.search.get("verify"):
        from retrieval.verify import Verifier

        verifier = Verifier()

    def decode(e: FileEntry, allow_reuse: bool = True) -> _Decoded:
        d = _Decoded(e)
        try:
            data = Path(e.path).read_bytes()
        except OSError as exc:
            d.error = "no such file" if isinstance(exc, FileNotFoundError) else f"cannot read: {exc.strerror}"
            return d
        d.sha256 = hashlib.sha256(data).hexdigest()
        old = rows.get(e.path)
        if allow_reuse and old is not None and old.sha256 == d.sha256:
            d.reuse_id = old.id  # touched, same content
            return d
        if allow_reuse and (d.sha256 in gone or d.sha256 in by_hash):
            d.reuse_id = -1  # moved or copied: its vector is reused
            return d
        try:
            img = decode_image(data, e.path, min_side=max(bb.preprocess.size, verifier.max_side if verifier else 0))
        except ImageError as exc:
            d.error = exc.reason
            return d
        if verifier is not None:  # its searches verify by default: local features now, not at query time
            verifier.save(d.sha256, verifier.extract(img))
        d.width, d.height = img.size
        d.array = bb.preprocess.array(img)
        return d

    workers = workers or min(4, max(1, (os.cpu_count() or 2)))
    batch: list[_Decoded] = []

    def flush() -> None:
        _embed_and_commit(store, bb, batch, rows, report)
        progress.advance(len(batch))
        batch.clear()

    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="decode") as pool:
        window: deque[Future] = deque()
        it = iter(todo)
        for e in it:
            window.append(pool.submit(decode, e))
            if len(window) >= max(2 * batch_size, 4 * workers):
                break
        try:
            while window:
                if stop.is_set():
                    raise KeyboardInterrupt
                d = window.popleft().result()
                nxt = next(it, None)
                if nxt is not None:
                    window.append(pool.submit(decode, nxt))
                if d.reuse_id is not None and not _reuse(store, d, rows, gone, by_hash, report):
                    d = decode(d.entry, allow_reuse=False)  # the row to copy from went away meanwhile
                if d.error:
                    _record_skip(store, d, rows)
                    report.skipped += 1
                    report.skipped_files.append({"path": d.entry.path, "reason": d.error})
                    on_skip(d.entry.path, d.error)
                    progress.advance(1)
                elif d.array is None:
                    progress.advance(1)
                else:
                    batch.append(d)
                    if len(batch) >= batch_size:
                        flush()
            if batch:
                flush()
        except BaseException:
            for f in window:
                f.cancel()
            raise
    # Files that vanished from the scanned folders and did not turn up elsewhere leave the index.
    gone_ids = [r.id for rs in gone.values() for r in rs]
    _delete_rows(store, gone_ids)
    store.apply(gone_ids)
    report.removed = len(gone_ids)


def _delete_rows(store: IndexStore, ids: list[int]) -> None:
    with store.session() as s, s.begin():
        for i in range(0, len(ids), 500):
            s.execute(delete(ImageRow).where(ImageRow.id.in_(ids[i:i + 500])))


def _record_skip(store: IndexStore, d: _Decoded, rows: dict) -> None:
    with store.session() as s, s.begin():
        old = rows.get(d.entry.path)
        if old is not None:  # a once-good file is now broken: it leaves the index
            s.execute(delete(ImageRow).where(ImageRow.id == old.id))
        s.merge(SkippedRow(path=d.entry.path, size=d.entry.size, mtime_ns=d.entry.mtime_ns, reason=d.error))
    store.apply([old.id] if old is not None else [])


def _reuse(store: IndexStore, d: _Decoded, rows: dict, gone: dict, by_hash: dict, report: IndexReport) -> bool:
    """Index ``d`` without decoding it (touched, moved or copied content). False: must be embedded after all."""
    e = d.entry
    old = rows.get(e.path)  # what was at this path before, if anything
    if d.reuse_id is not None and d.reuse_id >= 0:  # same path, same content, new mtime
        with store.session() as s, s.begin():
            s.execute(update(ImageRow).where(ImageRow.id == d.reuse_id).values(size=e.size, mtime_ns=e.mtime_ns))
        report.unchanged += 1
        return True
    if gone.get(d.sha256):  # moved: the row follows the file, keeping its id and vector
        src = gone[d.sha256].pop()
        with store.session() as s, s.begin():
            if old is not None:
                s.execute(delete(ImageRow).where(ImageRow.id == old.id))
            s.execute(update(ImageRow).where(ImageRow.id == src.id).values(path=e.path, size=e.size,
                                                                            mtime_ns=e.mtime_ns))
        store.apply([old.id] if old is not None else [])
        report.moved += 1
        return True
    with store.session() as s, s.begin():  # a copy of indexed content: a new row with the same vector
        src = s.get(ImageRow, by_hash.get(d.sha256, -1))
        if src is None:
            return False
        if old is not None:
            s.execute(delete(ImageRow).where(ImageRow.id == old.id))
        row = ImageRow(path=e.path, size=e.size, mtime_ns=e.mtime_ns, sha256=d.sha256, width=src.width,
                       height=src.height, vector=src.vector, indexed_at=time.time())
        s.add(row)
        s.flush()
        new_id, vec = row.id, np.frombuffer(src.vector, np.float32)[None]
    store.apply([old.id] if old is not None else [], [new_id], vec)
    report.indexed += 1
    return True


def _embed_and_commit(store: IndexStore, bb: Backbone, batch: list[_Decoded], rows: dict,
                      report: IndexReport) -> None:
    vecs = bb.embed_arrays([d.array for d in batch], batch_size=len(batch))
    replaced = []
    now = time.time()
    with store.session() as s, s.begin():
        new_rows = []
        for d, v in zip(batch, vecs):
            old = rows.get(d.entry.path)
            if old is not None:
                s.execute(delete(ImageRow).where(ImageRow.id == old.id))
                replaced.append(old.id)
            s.execute(delete(SkippedRow).where(SkippedRow.path == d.entry.path))
            row = ImageRow(path=d.entry.path, size=d.entry.size, mtime_ns=d.entry.mtime_ns, sha256=d.sha256,
                           width=d.width, height=d.height, vector=v.tobytes(), indexed_at=now)
            s.add(row)
            new_rows.append(row)
        s.flush()
        ids = np.array([r.id for r in new_rows], np.int64)
    store.apply(replaced, ids, vecs)
    report.indexed += len(batch)
