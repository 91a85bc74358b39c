"""``retrieve index``: bring an index up to date with folders of photos, incrementally and safely.

Unchanged files (same size and mtime) cost nothing; a changed file is re-embedded only if its content
hash changed; a moved or copied file (same content hash) reuses its stored vector; files that vanished
from the scanned folders leave the index (indexer/plan.py decides which is which). Decoding runs in
threads ahead of inference, and rows are committed batch by batch, so an interrupted run keeps its work
and the next run continues from there. Ctrl-C is deferred until the run is in a state it can stop in:
between two items, and not at all during the finalisation (head fit, vector file written).
"""
from __future__ import annotations

import hashlib
import os
import threading
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterable


from retrieval.errors import ImageError, RetrieveError
from retrieval.models.registry import DEFAULT_MODEL
from retrieval.images import decode_image, read_image_bytes
from retrieval.index.head import head_text, parse_head
from retrieval.index.calibration import refresh as refresh_calibration
from retrieval.index.reference import refresh as refresh_reference
from retrieval.index.settings import IndexSettings
from retrieval.index.store import IncompleteIndex, IndexStore, default_explain, index_path
from retrieval.index.vectors import factory_for
from retrieval.match.verify import decode_side
from retrieval.presets import FACES, GENERAL, preset_named, preset_of

from retrieval.scan import FileEntry, check_paths, scan_paths

from .common import IndexReport, NoProgress, Progress, sigint_deferred, stage_progress, trim_heap
from .rows import Decoded, by_path, commit_embedded, drop_vanished, plan_run, record_skip, reuse

if TYPE_CHECKING:  # torch is imported only where the cached ONNX graphs cannot serve (retrieval/models/graphs.py)
    from retrieval.models.backbone import Backbone


@dataclass
class _Asked:
    """The options that fix a new index, as given (None: not given), with the preset's values filled in."""

    model: str | None = None
    weights: str | None = None
    metric: str | None = None
    index_type: str | None = None
    faiss_factory: str | None = None
    input_size: int | None = None
    resize: str | None = None
    pooling: str | None = None
    head: str | None = None
    preset: str | None = None
    precision: str | None = None
    from_preset: tuple = ()  # the fields the preset filled in
    search: dict = field(default_factory=dict)
    local: dict = field(default_factory=dict)  # the local features of a new index whose searches verify


def _asked(preset: str | None, **given) -> _Asked:
    a = _Asked(**given, preset=preset)
    p = preset_named(preset)
    if p is not None:  # fills in what the caller left open
        filled = []
        for name, value in p.options().items():
            if getattr(a, name) is None:
                setattr(a, name, value)
                filled.append(name)
        a.from_preset = tuple(filled)
        a.search = dict(p.search)
        a.local = dict(p.local) if p.search.get("verify") else {}
    return a


def index_paths(paths: Iterable[str | os.PathLike], index_dir: str | os.PathLike, *, model: str | None = None,
                weights: str | None = None, metric: str | None = None, index_type: str | None = None,
                faiss_factory: str | None = None, input_size: int | None = None, head: str | None = None,
                resize: str | None = None, pooling: str | None = None, preset: str | None = None,
                refit: bool = False, batch_size: int = 32, precision: str | None = None,
                workers: int | None = None, progress: Progress | None = None,
                on_skip: Callable[[str, str], None] | None = None,
                backbone: Backbone | None = None, follow_links: bool = False, engine: str = "local",
                ray_address: str | None = None, face_detector: str | None = None,
                catalogue: bool = False, prune_missing: bool = False) -> IndexReport:
    """Index (or update the index of) the images under ``paths`` into ``index_dir``; see the module docstring.

    ``model``/``weights``/``metric``/``index_type``/``faiss_factory``/``input_size``/``resize``/``pooling``/
    ``head``/``preset`` fix the settings of a new index; for an existing index they must agree with the
    recorded ones (or be None), else the run is refused before anything changes. ``refit`` re-fits the
    linear head on the whole collection (it is also re-fitted when the collection has doubled since).
    ``engine``: "local" (this process) or "ray" (embedding on a Ray cluster at ``ray_address``, or a local one;
    indexer/ray_engine.py). ``backbone`` substitutes a ready-made backbone (tests). A new index into which nothing could be
    indexed (no images, or none decodable) is not created: :class:`RetrieveError`. ``catalogue``: ``paths`` are
    the collection's catalogue (reference photos; retrieval/index/catalogue.py), recorded once they are indexed.
    ``prune_missing``: also drop the rows of photos whose folder is away (kept otherwise: :func:`.rows.drop_vanished`).
    """
    asked_preset, existing = preset_named(preset), _existing_preset(index_dir)
    per_face = (asked_preset or existing or (FACES if face_detector is not None else GENERAL)).per_face
    if catalogue:
        if per_face:
            raise RetrieveError("--catalogue does not apply to a faces index (--preset faces)")
        for p in paths:
            if not Path(p).exists():
                raise RetrieveError(f"--catalogue: {p} does not exist")
    if existing is None and asked_preset is None and face_detector is None:
        preset, asked_preset = GENERAL.name, GENERAL  # a new index without --preset: the general one
    if asked_preset is not None and existing is not None and asked_preset.per_face != existing.per_face:
        raise RetrieveError(f"{index_path(index_dir)} is a {existing.name} index; --preset {preset} needs another "
                            "--index directory")
    if per_face:
        from .faces import index_faces  # one row per face: its own pipeline (indexer/faces.py)

        return index_faces(paths, index_dir, detector=face_detector, batch_size=batch_size, workers=workers,
                           progress=progress, on_skip=on_skip, follow_links=follow_links, backbone=backbone,
                           prune_missing=prune_missing,
                           refused=dict(model=model, weights=weights, metric=metric, index_type=index_type,
                                        faiss=faiss_factory, input_size=input_size, resize=resize, pooling=pooling,
                                        head=head, refit=refit))
    t0 = time.perf_counter()
    asked = _asked(preset, model=model, weights=weights, metric=metric, index_type=index_type,
                   faiss_factory=faiss_factory, input_size=input_size, resize=resize, pooling=pooling, head=head,
                   precision=None if precision is None else _check_precision(precision))
    if batch_size < 1:
        raise RetrieveError(f"--batch-size must be at least 1, got {batch_size}")
    run_engine = _run
    if engine == "ray":
        from .ray_engine import ray_runner  # the extra's absence: RetrieveError naming it, before any change

        run_engine = ray_runner(ray_address)
    elif engine != "local":
        raise RetrieveError(f"unknown engine {engine!r} (local or ray)")
    paths = list(paths)
    roots = check_paths(paths)
    progress = progress or NoProgress()
    on_skip = on_skip or (lambda p, r: None)
    index_dir = index_path(index_dir)
    what = "retrieve index"

    scan = scan_paths(roots, follow_links=True) if follow_links else scan_paths(roots)
    files = list(scan)
    for link in getattr(scan, "links_not_followed", ()):  # said, not silently passed over
        on_skip(link, "a link out of the folders, not followed (retrieve index --follow-links follows it)")
    trees = [str(t) for t in getattr(scan, "trees", None) or roots]
    store = None
    if IndexStore.exists(index_dir):
        try:
            store = IndexStore.open(index_dir, writable=True, what=what)
        except IncompleteIndex:
            store = None  # an interrupted creation: created afresh below
    if store is not None:
        try:
            _refuse_changes(store, asked)
            bb = backbone or _index_backbone(store.settings, engine)
            bb.precision = store.settings.precision
        except BaseException:
            store.close()
            raise
        settings = None
    else:
        if not files:
            raise RetrieveError(f"no images found in {', '.join(str(p) for p in paths)}; no index was created")
        if asked.precision is None and asked_preset is not None and asked_preset.precision == "auto":
            from retrieval.models.precision import auto_precision

            asked.precision = auto_precision()  # chosen for this machine, recorded in the index
        bb = backbone or _new_index_backbone(asked, engine)
        bb.precision = asked.precision or "fp32"
        itype = "custom" if asked.faiss_factory else (asked.index_type or "flat")
        if asked.faiss_factory:
            _check_factory(asked.faiss_factory, bb.feature_dim)
        settings = IndexSettings(model=bb.name, weights_id=bb.weights_id, weights_source=bb.weights_source,
                                 preprocess=bb.preprocess.to_dict(), metric=asked.metric or "cosine",
                                 dim=bb.feature_dim, index_type=itype,
                                 faiss_factory=asked.faiss_factory or factory_for(itype, bb.feature_dim, 0),
                                 explain=default_explain(bb.preprocess.size), head=parse_head(asked.head),
                                 pooling=str(bb.pooling), search=asked.search, preset=asked.preset or "",
                                 precision=bb.precision, local=asked.local)

    report = IndexReport(index=str(index_dir))
    stop = threading.Event()
    discarded = False
    with sigint_deferred(stop):  # Ctrl-C sets ``stop``; the run stops between items, after finalising
        if store is None:
            store = IndexStore.create(index_dir, settings, what=what)
        new = settings is not None and not store.count()
        try:
            store.faiss_index()  # loaded (and reconciled) before this run changes any row
            store.defer_vectors()  # no head yet: the rows' vectors are mirrored once, through the head, at the end
            run_engine(store, bb, files, trees, report, batch_size, workers, progress, on_skip, stop,
                       prune_missing=prune_missing)
        except KeyboardInterrupt:
            report.interrupted = True
        finally:
            try:
                if new and not store.count():
                    store.discard()  # nothing could be indexed: no index, rather than an empty one
                    discarded = True
                else:
                    _finalise(store, report, refit, bb, progress)
            finally:
                store.close()
    report.interrupted = report.interrupted or stop.is_set()
    report.seconds = time.perf_counter() - t0
    if discarded and not report.interrupted:
        raise RetrieveError(f"none of the {len(files)} images found could be indexed ({report.skipped} could not "
                            "be read, see above); no index was created")
    if catalogue and report.total:
        from retrieval.index import catalogue as catalogue_role

        with IndexStore.open(index_dir, writable=True) as store:
            report.catalogue = catalogue_role.record(store, paths)
    return report


def _index_backbone(settings: IndexSettings, engine: str = "local"):
    """The backbone that embeds for an index with ``settings``: through its cached ONNX graphs without torch where
    they serve (made in a child process when missing, retrieval/models/prepare.py). Ray ships the network itself to
    its workers (the graph cache is this machine's)."""
    bb = preset_of(settings).backbone(settings, purpose="index" if engine == "local" else "search")
    if engine != "local":
        bb.manifest = None
        bb.net  # built here, pickled with the backbone
    return bb


def _new_index_backbone(a: _Asked, engine: str = "local"):
    """The backbone of a new index built with ``a``'s options, through the cached graphs where they serve."""
    from retrieval.models.prepare import new_index_identity
    from retrieval.models.registry import REGISTRY

    model = a.model or DEFAULT_MODEL
    size = a.input_size or (REGISTRY[model].preprocess.size if model in REGISTRY else 224)
    got = engine == "local" and new_index_identity(a.model, a.weights, a.input_size, a.resize, a.pooling,
                                                   a.precision or "fp32", default_explain(size)["input_size"])
    if got:
        probe = IndexSettings(model=got["model"], weights_id=got["weights_id"], weights_source=got["weights_source"],
                              preprocess=got["preprocess"], metric="cosine", dim=int(got["dim"]), index_type="flat",
                              faiss_factory="Flat", explain=default_explain(got["preprocess"]["size"]),
                              head=None, pooling=got["pooling"], precision=a.precision or "fp32")
        return _index_backbone(probe)  # the cached graphs, else the network for these settings
    from retrieval.models.loading import load_backbone

    return load_backbone(model, a.weights, input_size=a.input_size, resize=a.resize, pooling=a.pooling)


def _existing_preset(index_dir):
    """The preset of the index already in ``index_dir`` (None: no index there yet)."""
    d = index_path(index_dir)
    if not IndexStore.exists(d):
        return None
    try:
        with IndexStore.open(d) as store:
            return preset_of(store.settings)
    except IncompleteIndex:
        return None


def _finalise(store: IndexStore, report: IndexReport, refit: bool, bb: Backbone | None = None,
              progress: Progress | None = None) -> None:
    """Head fit, retraining or compaction, μ, and the vector file: one consistent state on disk. A run that
    changed nothing (indexer/unchanged.py) leaves μ and the vector file as they are. ``progress``: the visual
    words' quantisation is shown as a stage of its own (minutes at 100 k images)."""
    from .unchanged import record as record_state, unchanged

    rebuilt = True
    if not report.interrupted and (refit or store.head_is_stale()) and store.fit_head():
        store.rebuild_faiss()  # every vector changes with the head
    elif store.vectors_deferred() or store.needs_retrain():  # (deferred: interrupted, or still too few for a head)
        store.rebuild_faiss()
    else:
        rebuilt = store.compact()  # HNSW: one rebuild for the removals of the run, when they have grown too many
    if rebuilt or not unchanged(store):
        store.update_mean()
        store.save_faiss()
        record_state(store)
    trim_heap()  # (each stage below starts from the memory the run holds, not from the last one's peak)
    if store.settings.search.get("words") and not report.interrupted:  # the visual-word inverted file
        from retrieval.match.words import update_index

        update_index(store, progress=stage_progress(progress, "visual words"))
        trim_heap()
    if not report.interrupted:
        refresh_calibration(store)  # where scores stand in this collection (explain verdicts)
        if bb is not None:  # μ at the explain resolution, for the explanations' centring
            size = (store.settings.explain or {}).get("input_size") or bb.preprocess.size
            refresh_reference(store, bb, int(size), bb.tap)
    store.mark_updated()
    report.total = store.count()


def _refuse_changes(store: IndexStore, a: _Asked) -> None:
    """Every option that fixes a new index must agree with the existing index's settings (or be left out)."""
    st = store.settings
    diffs: list[str] = []

    def differs(name: str, label: str, asked, has, text=str) -> None:
        if asked is not None and asked != has:
            via = f" (from --preset {a.preset})" if name in a.from_preset else ""
            diffs.append(f"{label} {text(has)}, not {text(asked)}{via}")

    if a.model:
        m = Path(a.model).expanduser()
        differs("model", "model", str(m.resolve()) if m.is_file() else a.model, st.model)
    differs("metric", "metric", a.metric, st.metric)
    if a.weights:
        w = Path(a.weights).expanduser()
        if not w.is_file():
            raise RetrieveError(f"--weights {a.weights}: no such file")
        from retrieval.models.preprocess import file_sha256

        if file_sha256(w) != st.weights_id:
            diffs.append(f"weights {st.weights_source or st.weights_id}, not {a.weights}")
    differs("input_size", "input size", a.input_size, st.preprocess.get("size"))
    differs("resize", "resize", a.resize, st.preprocess.get("resize", "squash"))
    if a.pooling:
        from retrieval.models.pooling import parse_pooling

        differs("pooling", "pooling", str(parse_pooling(a.pooling)), st.pooling)
    differs("head", "head", parse_head(a.head) if a.head is not None else None, st.head, head_text)
    differs("index_type", "index type", a.index_type, st.index_type)
    differs("precision", "precision", a.precision, st.precision)
    if a.faiss_factory and (st.index_type != "custom" or a.faiss_factory != st.faiss_factory):
        has = f"FAISS factory {st.faiss_factory}" if st.index_type == "custom" else f"index type {st.index_type}"
        diffs.append(f"{has}, not --faiss {a.faiss_factory}")
    if diffs:
        given = "--preset " + a.preset if a.preset and not any("(from" not in d for d in diffs) else "these options"
        refit = " (add --refit to re-fit its own head on the collection)" if st.head else ""
        raise RetrieveError(f"index {store.directory} has {'; '.join(diffs)}. These are fixed when the index is "
                            f"created: leave {given} out to update this index{refit}, or give another --index "
                            "directory to build a new one")


def _check_precision(precision: str) -> str:
    from retrieval.models.precision import check_precision

    return check_precision(precision)


def _check_factory(factory: str, dim: int) -> None:
    import faiss

    try:
        faiss.index_factory(dim, factory)
    except RuntimeError:
        raise RetrieveError(f"--faiss {factory!r}: not a valid FAISS factory string") from None


def _run(store: IndexStore, bb: Backbone, files: list[FileEntry], trees: list[str], report: IndexReport,
         batch_size: int, workers: int | None, progress: Progress, on_skip: Callable[[str, str], None],
         stop: threading.Event, prune_missing: bool = False) -> None:
    plan = plan_run(store, files, trees, report)
    todo = plan.todo
    progress.start(len(todo))

    embed_side = decode_side(store.settings)  # one decode rule for every embedding (retrieval/presets.py)
    verifier = None  # an index whose searches verify gets its keypoints while it is indexed
    if store.settings.search.get("verify"):
        from retrieval.match.verify import Verifier

        verifier = Verifier.for_index(store.settings)

    def decode(e: FileEntry, allow_reuse: bool = True) -> Decoded:
        d = Decoded(e)
        try:
            data = read_image_bytes(e.path)  # refused before reading when larger than the limit
        except ImageError as exc:
            d.error = exc.reason
            return d
        d.sha256 = hashlib.sha256(data).hexdigest()
        if allow_reuse:
            kind, _ = plan.classify(e.path, d.sha256)
            if kind != "embed":
                d.reuse = kind  # touched, moved or copied: its vector is reused
                return d
        try:
            img = decode_image(data, e.path, min_side=embed_side)
        except ImageError as exc:
            d.error = exc.reason
            return d
        if verifier is not None:  # its searches verify by default: local features now, not at query time
            verifier.save(d.sha256, verifier.extract(img))
        d.width, d.height = img.info.get("original_size", img.size)  # the photo's own size, not the reduced decode's
        d.array = bb.preprocess.array(img)
        return d

    workers = workers or min(4, max(1, (os.cpu_count() or 2)))
    batch: list[Decoded] = []

    def flush() -> None:
        commit_embedded(store, batch, bb.embed_arrays([d.array for d in batch], batch_size=len(batch)), plan.rows,
                        report)
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
                if d.reuse is not None and not reuse(store, d, plan, report):
                    d = decode(d.entry, allow_reuse=False)  # the row to copy from went away meanwhile
                if d.error:
                    record_skip(store, d, plan.rows)
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
    # Files that vanished from the scanned folders and did not turn up elsewhere leave the index (not those of a
    # folder that is away, unless prune_missing).
    drop_vanished(store, by_path(plan.removed()), [e.path for e in files], report, prune_missing)


def repair_index(directory, prune_missing: bool = False):
    """``retrieve check --repair`` (retrieval/index/check.py), re-embedding damaged rows as this indexer embeds them:
    the index checked again after the repair, with what was repaired. ``prune_missing``: also drop the rows of
    files whose folder is away (``--prune-missing``; kept otherwise)."""
    from retrieval.index.check import check_index
    from retrieval.index.check import repair_index as repair

    done = repair(directory, _reembedder, prune_missing=prune_missing)
    after = check_index(directory)
    after.repaired = done.repaired
    return after


def _reembedder(settings):
    """Embeds photos as the indexer embeds them for an index with ``settings`` (None for a faces index: its rows are
    faces, dropped and found again by the next ``retrieve index``)."""
    from retrieval.images import load_image

    preset = preset_of(settings)
    if preset.per_face:
        return None
    bb = preset.backbone(settings)
    return lambda paths: bb.embed_images([load_image(p, min_side=decode_side(settings)) for p in paths])
