"""``retrieve index PHOTOS --preset faces``: one row per face (detect, align on 5 landmarks, embed).

Each face's row holds the photo's path, its number in the photo (largest first) and its box in the photo's
own pixels; a photo without a face is reported ("no face found"), counted and remembered like an
undecodable file (not retried until it changes), not an error. Incremental like the general indexer:
an unchanged photo (same size and mtime) costs nothing, a changed one has its faces replaced, a photo gone
from the scanned folders takes its faces with it.
"""
from __future__ import annotations

import hashlib
import os
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterable

import numpy as np
from PIL import Image

from retrieval.errors import ImageError, RetrieveError
from retrieval.images import decode_image, read_image_bytes
from retrieval.presets import FACES, preset_of
from retrieval.scan import check_paths, scan_paths
from retrieval.index.settings import IndexSettings
from retrieval.index.store import IncompleteIndex, IndexStore, index_path
from retrieval.index.vectors import factory_for

from .common import FaceIndexReport, IndexReport, NoProgress, sigint_deferred
from .rows import drop_vanished

NO_FACE = "no face found"


def _within(path: str, trees: list[str]) -> bool:
    return any(path == t or path.startswith(t.rstrip(os.sep) + os.sep) for t in trees)


def index_faces(paths: Iterable[str | os.PathLike], index_dir, *, detector: str | None = None,
                upsample: int | None = None, batch_size: int = 32, workers: int | None = None,
                progress=None, on_skip: Callable[[str, str], None] | None = None, follow_links: bool = False,
                refused: dict | None = None, backbone=None, prune_missing: bool = False) -> IndexReport:
    """Index the faces in the photos under ``paths``; see the module docstring. ``refused``: options of the
    general indexer that were given (they do not apply to a faces index: a one-line error names them)."""
    from retrieval.faces.detect import FaceFinder

    given = [k for k, v in (refused or {}).items() if v]
    if given:
        raise RetrieveError(f"--preset faces fixes the model, metric and input itself; drop "
                            f"{', '.join('--' + g.replace('_', '-') for g in given)}")
    t0 = time.perf_counter()
    paths = list(paths)
    roots = check_paths(paths)
    progress = progress or NoProgress()
    on_skip = on_skip or (lambda p, r: None)
    index_dir = index_path(index_dir)
    scan = scan_paths(roots, follow_links=True) if follow_links else scan_paths(roots)
    files = list(scan)
    for link in getattr(scan, "links_not_followed", ()):
        on_skip(link, "a link out of the folders, not followed (retrieve index --follow-links follows it)")
    trees = [str(t) for t in getattr(scan, "trees", None) or roots]

    store = None
    if IndexStore.exists(index_dir):
        try:
            store = IndexStore.open(index_dir, writable=True, what="retrieve index")
        except IncompleteIndex:
            store = None
    settings = None
    try:
        if store is not None:
            st = store.settings
            if not preset_of(st).per_face:
                raise RetrieveError(f"{index_dir} is a {preset_of(st).name} index; --preset faces needs another "
                                    "--index directory")
            if detector is not None and detector != st.faces.get("detector"):
                raise RetrieveError(f"{index_dir} finds faces with --face-detector {st.faces.get('detector')}; "
                                    f"index with that, or into another --index directory")
            bb = backbone or FACES.backbone(st)
            detector, upsample = st.faces.get("detector", "hog"), int(st.faces.get("upsample", 1))
        else:
            if not files:
                raise RetrieveError(f"no images found in {', '.join(str(p) for p in paths)}; no index was created")
            bb = backbone or FACES.backbone(None)
            faces = FACES.face_settings(detector, upsample)
            detector, upsample = faces["detector"], faces["upsample"]
            settings = IndexSettings(model=bb.name, weights_id=bb.weights_id, weights_source=bb.weights_source,
                                     preprocess=bb.preprocess.to_dict(), metric=FACES.metric, dim=bb.feature_dim,
                                     index_type="flat", faiss_factory=factory_for("flat", bb.feature_dim, 0),
                                     explain={"method": "sfam", "input_size": bb.preprocess.size}, preset=FACES.name,
                                     head={"type": "centre", "fixed": "the mean face"}, faces=faces)
        FaceFinder(detector, upsample)  # fails here (one line) when dlib or the models are missing
        local = threading.local()  # dlib's detectors are not thread-safe: one per decoding thread

        def finder():
            if not hasattr(local, "finder"):
                local.finder = FaceFinder(detector, upsample)
            return local.finder
    except BaseException:
        if store is not None:
            store.close()
        raise

    report = FaceIndexReport(index=str(index_dir))
    sample: list = []  # chips of this run's first faces, for SFAM's μ_tap
    stop = threading.Event()
    discarded = False
    with sigint_deferred(stop):
        if store is None:
            store = IndexStore.create(index_dir, settings, what="retrieve index")
            store.set_head(FACES.fixed_head())  # the score's reference point, before any row
        new = settings is not None and not store.count()
        try:
            store.faiss_index()
            _run(store, bb, finder, files, trees, report, batch_size, workers, progress, on_skip, stop, sample,
                 prune_missing)
        except KeyboardInterrupt:
            report.interrupted = True
        finally:
            try:
                if new and not store.count():
                    store.discard()
                    discarded = True
                else:
                    if sample and not report.interrupted and not stop.is_set():
                        from retrieval.faces.network import refresh_tap_reference

                        refresh_tap_reference(store, bb, sample)  # SFAM's μ_tap (explain/faces.py)
                    if store.needs_retrain():
                        store.rebuild_faiss()
                    store.update_mean()
                    store.save_faiss()
                    store.mark_updated()
                    report.total = store.count()
            finally:
                store.close()
    report.interrupted = report.interrupted or stop.is_set()
    report.seconds = time.perf_counter() - t0
    if discarded and not report.interrupted:
        raise RetrieveError(f"no face found in any of the {len(files)} images ({report.no_face} without a face, "
                            f"{report.skipped} unreadable); no index was created")
    return report


def _run(store: IndexStore, bb, finder, files, trees, report: IndexReport, batch_size: int, workers,
         progress, on_skip, stop: threading.Event, sample: list | None = None, prune_missing: bool = False) -> None:
    rows, bad = store.files(), store.skipped()
    by_path: dict[str, list] = {}
    for r in rows:
        by_path.setdefault(r.path, []).append(r)
    seen = {e.path for e in files}
    todo = []
    for e in files:
        old = by_path.get(e.path)
        if old and all(r.size == e.size and r.mtime_ns == e.mtime_ns for r in old):
            report.unchanged += 1
            continue
        b = bad.get(e.path)
        if b is not None and b.size == e.size and b.mtime_ns == e.mtime_ns:
            report.skipped_before += 1
            continue
        todo.append(e)
    progress.start(len(todo))

    def decode(e):
        try:
            data = read_image_bytes(e.path)
            img = decode_image(data, e.path)
        except ImageError as exc:
            return e, None, None, exc.reason
        return e, hashlib.sha256(data).hexdigest(), img, None

    workers = workers or min(2, max(1, os.cpu_count() or 1))  # dlib's detector runs in these threads too
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="faces") as pool:
        def work(e):
            e, sha, img, err = decode(e)
            if err:
                return e, sha, img, err, []
            return e, sha, img, None, finder().faces(np.asarray(img))

        window: deque = deque()  # a bounded look-ahead: decoded photos are not all held at once
        it = iter(todo)
        for e in it:
            window.append(pool.submit(work, e))
            if len(window) >= 2 * workers:
                break
        while window:
            if stop.is_set():
                for f in window:
                    f.cancel()
                raise KeyboardInterrupt
            e, sha, img, err, faces = window.popleft().result()
            nxt = next(it, None)
            if nxt is not None:
                window.append(pool.submit(work, nxt))
            old_ids = [r.id for r in by_path.get(e.path, [])]
            if err or not faces:
                reason = err or NO_FACE
                store.record_skip(e.path, e.size, e.mtime_ns, reason, old_ids)
                store.apply(old_ids)
                if err:
                    report.skipped += 1
                else:
                    report.no_face += 1
                report.skipped_files.append({"path": e.path, "reason": reason})
                on_skip(e.path, reason)
                progress.advance(1)
                continue
            vecs = bb.embed_images([Image.fromarray(f.chip) for f in faces])
            if sample is not None:
                from retrieval.faces.network import REFERENCE_SAMPLE

                sample.extend(f.chip for f in faces[:max(0, REFERENCE_SAMPLE - len(sample))])
            now = time.time()
            ids = store.insert_rows([{"path": e.path, "size": e.size, "mtime_ns": e.mtime_ns, "sha256": sha,
                                      "width": img.width, "height": img.height, "vector": v.tobytes(), "indexed_at": now,
                                      "face": f.index, "box": f.box_text()} for f, v in zip(faces, vecs)],
                                    replace=old_ids)
            store.apply(old_ids, ids, vecs)
            report.indexed += 1
            report.faces += len(faces)
            progress.advance(1)
    drop_vanished(store, {p: [r.id for r in rs] for p, rs in by_path.items() if p not in seen and _within(p, trees)},
                  list(seen), report, prune_missing)
