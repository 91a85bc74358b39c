"""What the web app does, without the web: one loaded index and model answering searches and pair audits.

The model and the index are loaded once (:class:`Service`); every answer has the fields of the CLI's
``--json`` (``retrieve search``, ``retrieve explain --index``, ``retrieve info``), plus what a page needs
to show it (thumbnail and photo URLs, each photo's own size, the inlier points).

Only files that are in the index are ever read for a client: photos are named by their row id, never by a
path the client sends, and a row's file is served only while its real path is still the path the index
recorded (a file swapped for a symbolic link that leads elsewhere is refused). Uploads are kept in a private
temporary folder under their content hash.

Bounded under load: every upload is capped in bytes (and the bytes being received at once, web/app.py), decoded
under a small semaphore (uploads and thumbnails: as many at once as inference threads, at most
``MAX_DECODES``), and kept within a byte budget (the oldest dropped first); query parameters are capped (a 400
naming the limit); searches run one at a time, beside explanations (not behind them: explanations and their
drawings run on a thread each, at a lower CPU priority), and at most ``MAX_PENDING_RENDERS`` figures wait to be
drawn. The caches are guarded by one lock.

While ``retrieve index`` updates the same index, answers come from the state this process loaded last; the
indexer marks each finished run (``updated_at``), and the next request after that loads the new state.
"""
from __future__ import annotations

import hashlib
import io
import os
import re
import shutil
import sys
import threading
import time
from collections import OrderedDict
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path

from retrieval.errors import ImageError, RetrieveError
from retrieval.names import shown as readable
from retrieval.scratch import ScratchDir

MAX_UPLOAD_BYTES = 20_000_000  # an upload larger than this is refused with 413
FORM_OVERHEAD = 64_000  # what a multipart form may add around the photo (boundaries, headers, small fields)
MAX_K = 100  # results per page (the search page offers 1..100)
MAX_DEPTH = 1_000  # offset + k: the deepest result a client may page to
MAX_QE = 100  # query expansion with the top N (the page offers 0..100)
MAX_VERIFY = 100  # results re-ranked by geometric verification (the page asks for 60; each costs a SIFT match)
MAX_IMAGES_PAGE = 500  # photos per page of /api/images (the page asks for 24)
MAX_DECODES = 4  # uploads and thumbnails decoded at once, at most (fewer with fewer inference threads)
MAX_PENDING_RENDERS = 4  # explanations whose figure and report wait to be drawn; the next explanation waits
KEEP_UPLOAD_BYTES = 200_000_000  # the kept uploads' files, at most (or two uploads of the largest size)
UPLOADS_IN_FLIGHT = 100_000_000  # upload bytes being received at once (or four of the largest size): else 503
RENDER_WAIT_S = 300  # the longest a download waits for its figure or report
BACKGROUND_NICE = 5  # the explanations' and drawings' threads: below the searches
THUMB_SIDE = 256
VIEW_SIDE = 1024  # photos on the pair page
THUMB_SIDES = (64, 128, 256, 512, VIEW_SIDE)  # the sizes a thumbnail is made and cached at
METHODS = ("sfam", "sfam-plain", "gradcam", "occlusion")  # the pair page's method switch (web/static/pair.html)
KEEP_UPLOADS = 200  # the most recent uploads kept on disk
KEEP_EXPLAINED = 200  # the most recent explanations kept on disk
INLIER_POINTS = 150  # inlier points sent to the page (a readable subset)
FACE_MARGIN = 0.25  # a face's thumbnail: its box and this share of its size around it
_TOKEN = re.compile(r"^[0-9a-f]{64}$")


class NotFound(RetrieveError):
    """The thing asked for is not in this index (or no longer is)."""


class BadRequest(RetrieveError):
    """The request itself is wrong (a bad parameter, a file that is not an image)."""


class TooLarge(RetrieveError):
    """An upload above the size cap."""


class NotAnImage(BadRequest):
    """An upload that is not a photo retrieve can decode."""


class Busy(RetrieveError):
    """The server has as much as it takes at once (uploads being received): try again in a moment."""


def decode_slots() -> int:
    """How many uploads and thumbnails are decoded at once: one per inference thread (``RETRIEVE_THREADS``, else
    the cores this process may use), at most :data:`MAX_DECODES`."""
    from retrieval.models.graphs import inference_threads

    return max(1, min(MAX_DECODES, inference_threads()))


def default_cache_dir(index_dir: Path) -> Path:
    """``$XDG_CACHE_HOME/retrieve/serve/<hash of the index path>``: thumbnails and explanations."""
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    key = hashlib.sha256(str(Path(index_dir).resolve()).encode()).hexdigest()[:16]
    return base / "retrieve" / "serve" / key


@dataclass
class Loaded:
    """One committed state of the index: the index opened as the CLI opens it (explain/collection.py: its store,
    preset, backbone, calibration and explainers) and its searcher."""

    index: object  # explain.collection.Collection
    stamp: object  # the index's ``updated_at`` when it was loaded

    @property
    def searcher(self):
        return self.index.searcher()

    @property
    def store(self):
        return self.index.store



def _int(value, name: str, lo: int, hi: int, default: int | None) -> int | None:
    if value is None or value == "":
        return default
    try:
        v = int(value)
    except (TypeError, ValueError):
        raise BadRequest(f"{name}: not a whole number ({str(value)[:40]!r})") from None
    if not lo <= v <= hi:
        raise BadRequest(f"{name}: {v} is outside {lo}..{hi}")
    return v


class Service:
    """An index opened read-only for the web app; thread-safe (searches one at a time, explanations one at a time;
    on a faces index both share one lock: its face detector is shared)."""

    def __init__(self, index_dir: str | os.PathLike, cache_dir: str | os.PathLike | None = None,
                 max_upload_bytes: int = MAX_UPLOAD_BYTES, keep_upload_bytes: int | None = None):
        from retrieval.index.store import IndexStore, index_path
        from retrieval.presets import preset_of

        self.index_dir = index_path(index_dir)
        with IndexStore.open(self.index_dir) as probe:  # a clear error before anything else
            preset = preset_of(probe.settings)
            self.backbone = preset.backbone(probe.settings)
        self.cache_dir = Path(cache_dir) if cache_dir else default_cache_dir(self.index_dir)
        (self.cache_dir / "thumbs").mkdir(parents=True, exist_ok=True)
        (self.cache_dir / "explain").mkdir(parents=True, exist_ok=True)
        self.max_upload_bytes = int(max_upload_bytes)
        self.keep_upload_bytes = int(keep_upload_bytes or max(KEEP_UPLOAD_BYTES, 2 * self.max_upload_bytes))
        self.uploads_in_flight = max(UPLOADS_IN_FLIGHT, 4 * self.max_upload_bytes)
        self._receiving = 0  # upload bytes being received now (web/app.py reserves them, on the event loop)
        self._receiving_lock = threading.Lock()  # only that count: never held across I/O
        self._search_lock = threading.Lock()
        self._explain_lock = self._search_lock if preset.per_face else threading.Lock()
        self._decodes = threading.BoundedSemaphore(decode_slots())
        self._state_lock = threading.Lock()
        self._lock = threading.Lock()  # the caches below
        self._uploads: OrderedDict[str, tuple[tuple[int, int], int]] = OrderedDict()  # token → (own (H, W), bytes)
        self._upload_bytes = 0
        self._explained: OrderedDict[str, dict] = OrderedDict()  # key → the explain document
        self._old: list = []
        # explanations and their drawings: one thread each, below the searches in the CPU's queue
        self._explain_pool = ThreadPoolExecutor(1, thread_name_prefix="retrieve-explain", initializer=_background)
        self._render_pool = ThreadPoolExecutor(1, thread_name_prefix="retrieve-render", initializer=_background)
        self._renders: dict[str, object] = {}  # key → the Future drawing its figure and report
        self.on_close: list = []  # what else to stop first (web/curation.py registers its computations here)
        self.state = self._load()
        self._upload_scratch = ScratchDir("retrieve-serve-uploads-")  # last: (a killed server's go when the next
        self.upload_dir = self._upload_scratch.path                   # one starts, retrieval/scratch.py)

    # -- the committed state ------------------------------------------------------------------
    def _load(self) -> Loaded:
        from explain.collection import Collection as Index

        index = Index(self.index_dir, backbone=self.backbone)  # the model loaded once, for every committed state
        try:
            stamp = index.store.get_value("updated_at")
            index.searcher()
            index.store.faiss_index()  # the FAISS index, loaded and reconciled now
            index.calibration  # read now, not by the first request
            return Loaded(index, stamp)
        except BaseException:
            index.close()
            raise

    def current(self) -> Loaded:
        """The last committed state: reloaded when an indexing run has finished since it was loaded."""
        st = self.state
        try:
            stamp = st.store.get_value("updated_at")
        except Exception:  # the database is busy or being replaced: keep answering from what is loaded
            return st
        if stamp == st.stamp:
            return st
        with self._state_lock:
            if self.state is st:
                try:
                    new = self._load()
                except Exception:
                    return st
                self.state = new
                self._old.append(st)  # closed later: requests in flight may still read it
                while len(self._old) > 2:
                    self._old.pop(0).index.close()
            return self.state

    def close(self) -> None:
        for stop in self.on_close:
            stop()
        self._explain_pool.shutdown(wait=True)
        self._render_pool.shutdown(wait=True)
        for st in [*self._old, self.state]:
            st.index.close()
        self._upload_scratch.close()

    # -- what is in the index -----------------------------------------------------------------
    def info(self) -> dict:
        """The fields of ``retrieve info --json`` (retrieval/index/info.py)."""
        from retrieval.index.info import index_info

        return index_info(self.current().store)

    def health(self) -> dict:
        st = self.current()
        return {"status": "ok", "index": str(self.index_dir), "images": st.store.count(),
                "model": st.store.settings.model}

    def images(self, offset=0, limit=48) -> dict:
        """One page of the indexed photos, by path."""
        offset = _int(offset, "offset", 0, 10**9, 0)
        limit = _int(limit, "limit", 1, MAX_IMAGES_PAGE, 48)
        total, rows = self.current().store.page(offset, limit)
        return {"total": total, "offset": offset, "limit": limit,
                "images": [{"id": r[0], "path": r[1], "name": readable(Path(r[1]).name),
                            "thumb": _thumb_url(r[0], r[2])}
                           for r in rows]}

    def row(self, row_id) -> object:
        rid = _int(row_id, "id", 0, 2**62, -1)
        rows = self.current().store.rows_by_ids([rid])
        if rid not in rows:
            raise NotFound(f"no photo with id {rid} in this index")
        return rows[rid]

    def photo_path(self, row_id) -> Path:
        """The file of an indexed photo, only while it is the file the index recorded (its real path)."""
        row = self.row(row_id)
        p = Path(row.path)
        try:
            real = os.path.realpath(p, strict=True)
        except OSError:
            raise NotFound(f"photo {row.id}: its file is gone ({p.name})") from None
        if real != row.path or not os.path.isfile(real):
            raise NotFound(f"photo {row.id}: {p.name} is no longer the file that was indexed")
        return p

    def thumbnail(self, row_id, side=THUMB_SIDE, face=None) -> Path:
        """A JPEG of at most ``side`` px (rounded up to one of :data:`THUMB_SIDES`, so that a photo has a few cached
        sizes, not one per pixel asked for), cached on disk by the photo's content hash. ``face`` = 1 on a faces
        index: the row's face alone (its box and a margin around it, :data:`FACE_MARGIN`), as the People page
        shows a person."""
        side = _int(side, "size", THUMB_SIDES[0], THUMB_SIDES[-1], THUMB_SIDE)
        side = next(s for s in THUMB_SIDES if s >= side)
        face = _int(face, "face", 0, 1, 0)
        row = self.row(row_id)
        crop = None
        if face:
            box = self.current().store.face_rows([row.id])[row.id].box
            if not box:
                raise BadRequest(f"face: photo {row.id} is not a face's row (a faces index has them)")
            crop = [int(round(float(v))) for v in str(box).split(",")]
        tag = "" if crop is None else "_f" + "-".join(map(str, crop))
        out = self.cache_dir / "thumbs" / f"{row.sha256}{tag}_{side}.jpg"
        if out.is_file():
            return out
        from retrieval.images import load_image

        with self._decodes:
            img = load_image(self.photo_path(row.id), min_side=None)
            if crop is not None:
                img = img.crop(_with_margin(crop, img.size))
            _save_small(img, out, side)
        return out

    # -- uploads ------------------------------------------------------------------------------
    def reserve_upload(self, n: int) -> None:
        """Count ``n`` more upload bytes being received (web/app.py, as they arrive); :class:`Busy` past the budget
        (then nothing is counted)."""
        with self._receiving_lock:
            if self._receiving + n > self.uploads_in_flight:
                raise Busy(f"busy: {self._receiving:,} bytes of uploads are being received (the limit is "
                           f"{self.uploads_in_flight:,}); try again in a moment")
            self._receiving += n

    def release_upload(self, n: int) -> None:
        with self._receiving_lock:
            self._receiving -= n

    def add_upload(self, data: bytes, filename: str = "upload") -> dict:
        """Keep an uploaded photo (checked to be a decodable image) and return its token; the oldest uploads are
        dropped while the kept ones take more than ``keep_upload_bytes``."""
        from retrieval.images import decode_image, own_size

        if len(data) > self.max_upload_bytes:
            raise TooLarge(f"upload too large: {len(data):,} bytes (the limit is {self.max_upload_bytes:,})")
        if not data:
            raise BadRequest("empty upload: send a photo (JPEG, PNG, WebP, …)")
        name = Path(str(filename or "upload")).name[:120] or "upload"
        token = hashlib.sha256(data).hexdigest()
        with self._lock:
            kept = self._uploads.get(token)
            if kept is not None:
                self._uploads.move_to_end(token)
        if kept is None:
            with self._decodes:
                try:
                    img = decode_image(data, name)
                except ImageError as e:
                    raise NotAnImage(f"{name}: {e.reason} (send a photo: JPEG, PNG, WebP, …)") from None
                _write_atomically(self.upload_dir / f"{token}.img", data)
                _save_small(img, self.upload_dir / f"{token}_view.jpg", VIEW_SIDE)
                _save_small(img, self.upload_dir / f"{token}_thumb.jpg", THUMB_SIDE)
                size = own_size(img)
            nbytes = sum(f.stat().st_size for f in self.upload_dir.glob(f"{token}*"))
            with self._lock:
                before = self._uploads.get(token)  # kept meanwhile by a request with the same photo
                self._upload_bytes += nbytes - (before[1] if before else 0)
                self._uploads[token] = (size, nbytes)
                self._uploads.move_to_end(token)
                dropped = []
                while len(self._uploads) > 1 and (len(self._uploads) > KEEP_UPLOADS
                                                  or self._upload_bytes > self.keep_upload_bytes):
                    old, (_, n) = self._uploads.popitem(last=False)
                    self._upload_bytes -= n
                    dropped.append(old)
                for old in dropped:  # under the lock: an upload added again now waits for its files to go
                    for f in self.upload_dir.glob(f"{old}*"):
                        f.unlink(missing_ok=True)
        return {"token": token, "name": name, "view": f"/upload/{token}/view.jpg",
                "thumb": f"/upload/{token}/thumb.jpg"}

    def kept_uploads(self) -> tuple[int, int]:
        """(how many uploads are kept, their bytes on disk)."""
        with self._lock:
            return len(self._uploads), self._upload_bytes

    def upload_file(self, token: str, kind: str) -> Path:
        with self._lock:
            known = token in self._uploads
        if not _TOKEN.match(token or "") or not known or kind not in ("view", "thumb"):
            raise NotFound("no such upload (uploads are kept while the server runs)")
        return self.upload_dir / f"{token}_{kind}.jpg"

    def _query(self, q: str) -> tuple[str, tuple[int, int], dict]:
        """A query named by the client (``upload:<token>`` or an indexed photo's id) → its file, own size and
        how the page shows it."""
        q = str(q or "")
        if q.startswith("upload:"):
            token = q[7:]
            with self._lock:
                kept = self._uploads.get(token) if _TOKEN.match(token) else None
                if kept is not None:
                    self._uploads.move_to_end(token)  # the most recently used is dropped last
            if kept is None:
                raise NotFound("no such upload (uploads are kept while the server runs; upload the photo again)")
            return (str(self.upload_dir / f"{token}.img"), kept[0],
                    {"query": q, "name": "uploaded photo", "view": f"/upload/{token}/view.jpg",
                     "thumb": f"/upload/{token}/thumb.jpg"})
        row = self.row(q)
        path = self.photo_path(row.id)
        return (str(path), (row.height, row.width),
                {"query": str(row.id), "id": row.id, "name": readable(path.name), "path": row.path,
                 "view": _thumb_url(row.id, row.sha256, VIEW_SIDE), "thumb": _thumb_url(row.id, row.sha256)})

    # -- search -------------------------------------------------------------------------------
    def search(self, q: str, k=10, offset=0, qe=0, verify=None) -> dict:
        """``retrieve search`` for one query (``search --json``'s fields), each hit with its verdict; a page of
        ``k`` results starting at ``offset``."""
        k = _int(k, "k", 1, MAX_K, 10)
        offset = _int(offset, "offset", 0, MAX_DEPTH - 1, 0)
        if offset + k > MAX_DEPTH:
            raise BadRequest(f"offset + k: {offset + k} is above {MAX_DEPTH} (the deepest result served)")
        qe = _int(qe, "qe", 0, MAX_QE, 0)
        verify = _int(verify, "verify", 0, MAX_VERIFY, None)
        st = self.current()
        faces = st.index.preset.per_face
        if faces and (qe or verify):  # as `retrieve search` refuses them on a faces index
            raise BadRequest("qe and verify do not apply to a faces index (it compares faces; leave them at 0)")
        # as `retrieve search` without options: the index's verification depth, its visual words and, on an index
        # with a catalogue, its top catalogue candidates, verified beside the global shortlist (retrieval/index/
        # catalogue.py)
        options = {} if faces else dict(st.index.search_options(verify), qe=qe)
        verify = options.get("verify", 0)
        path, _, shown = self._query(q)
        include_self = not str(q).isdigit()
        if faces and not include_self:  # an indexed face's tile: that face of the photo is the query
            options["face"] = st.store.face_rows([int(q)])[int(q)].face
        with self._search_lock:
            t0 = time.perf_counter()
            (res,) = list(st.index.search([path], offset + k, include_self=include_self,
                                          **options))
        if res.error:
            raise BadRequest(f"{shown['name']}: {res.error}")
        d = res.to_dict()
        d["query"] = shown.get("path", shown["name"])
        hits = {h.rank: h for h in res.results}
        page = [h for h in d["results"] if h["rank"] > offset][:k]
        rows = st.store.rows_by_ids([h["id"] for h in page])
        for h in page:
            hit = hits[h["rank"]]
            h["name"] = readable(Path(h["path"]).name)
            sha = rows[h["id"]].sha256 if h["id"] in rows else ""
            h["thumb"] = _thumb_url(h["id"], sha)
            h["verdict"] = st.index.verdict(hit.score, hit.verification).to_dict()
        d.update({"results": page, "k": k, "offset": offset, "qe": qe, "verify": verify, "shown": shown,
                  "more": len(res.results) == offset + k, "seconds": round(time.perf_counter() - t0, 4)})
        return d

    # -- explain ------------------------------------------------------------------------------
    def explain(self, q: str, r, method: str = "sfam", verify=False) -> dict:
        """``retrieve explain Q R --index I --json`` (with ``--verify`` when asked), Q a query, R an indexed
        photo; plus the page's layers (heat-map PNGs, own sizes, inlier points) and download links."""
        method = (method or "sfam").lower()
        if method not in METHODS:
            raise BadRequest(f"method: {method[:20]!r} is not one of {', '.join(METHODS)}")
        verify = str(verify).lower() in ("1", "true", "yes", "on")
        st = self.current()
        faces = st.index.preset.per_face
        if faces and verify:
            raise BadRequest("verify: a faces index compares faces, not keypoints (leave verify out)")
        qpath, qsize, shown = self._query(q)
        row = self.row(r)
        rpath = str(self.photo_path(row.id))
        key = hashlib.sha256(f"{shown['query']}|{row.id}|{row.sha256}|{method}|{verify}|{st.stamp}".encode()
                             ).hexdigest()[:24]
        doc = self._cached_explanation(key)
        if doc is not None:
            return doc
        faces_of = {}
        if faces:  # face against face: an indexed face's tile is that face, an upload's its largest (face 0)
            faces_of = {"face_a": st.store.face_rows([int(q)])[int(q)].face if str(q).isdigit() else 0,
                        "face_b": st.store.face_rows([row.id])[row.id].face}
        names = (shown["name"], readable(Path(row.path).name))
        return self._explain_pool.submit(self._explain_new, st, key, qpath, qsize, shown, row, rpath, method, verify,
                                         names, faces_of).result()

    def _explain_new(self, st: Loaded, key: str, qpath: str, qsize, shown: dict, row, rpath: str, method: str,
                     verify: bool, names: tuple[str, str], faces_of: dict) -> dict:
        """A pair not explained yet, on the explanations' thread (one at a time)."""
        with self._explain_lock:
            doc = self._cached_explanation(key)  # made meanwhile by a request for the same pair
            if doc is not None:
                return doc
            self._wait_for_renders(MAX_PENDING_RENDERS - 1)
            t0 = time.perf_counter()
            doc = self._explain_files(st, key, qpath, rpath, method, verify, names, **faces_of)
            doc["seconds"] = round(time.perf_counter() - t0, 4)
            doc["query"] = shown.get("path", shown["name"])
            doc["shown"] = {"query": shown, "result": {"id": row.id, "name": names[1],
                                                       "path": row.path, "view": _thumb_url(row.id, row.sha256, VIEW_SIDE)}}
            doc["sizes"] = {"query": list(qsize), "result": [row.height, row.width]}  # (H, W), own pixels
            doc["key"] = key
            with self._lock:
                self._explained[key] = doc
                dropped = []
                while len(self._explained) > KEEP_EXPLAINED:
                    old, _ = self._explained.popitem(last=False)
                    dropped.append((old, self._renders.pop(old, None)))
        for old, job in dropped:
            if job is not None:
                wait([job])  # its drawing writes into the folder
            shutil.rmtree(self.cache_dir / "explain" / old, ignore_errors=True)
        return doc

    def _cached_explanation(self, key: str) -> dict | None:
        with self._lock:
            doc = self._explained.get(key)
            if doc is not None:
                self._explained.move_to_end(key)
            return doc

    def _wait_for_renders(self, most: int) -> None:
        """Wait until at most ``most`` figures are still to be drawn (their pairs' images are held meanwhile)."""
        while True:
            with self._lock:
                pending = [j for j in self._renders.values() if not j.done()]
            if len(pending) <= most:
                return
            wait(pending, return_when=FIRST_COMPLETED)

    def _explain_files(self, st: Loaded, key: str, qpath: str, rpath: str, method: str, verify: bool,
                       names: tuple[str, str], face_a: int | None = None, face_b: int | None = None) -> dict:
        """What ``explain.run.explain_pair`` does, with the same document (:func:`explain.run.prepare_pair`), except
        that the figure and the report (a second or more of image encoding) are drawn in the background: the page
        shows the maps at once, and a download of either waits for it (:meth:`explained_file`)."""
        from retrieval.images import own_size

        # the CLI's ``retrieve explain --index`` (explain/collection.py), the figure and report drawn afterwards
        pair = st.index.explain_pair(qpath, rpath, self.cache_dir / "explain" / key, method, verify, names=names,
                                     face_a=face_a, face_b=face_b, prepare_only=True)
        verification = pair.verification
        doc, e, qa, rb, out = pair.doc, pair.explanation, pair.query_image, pair.result_image, pair.out
        job = self._render_pool.submit(pair.draw)
        with self._lock:
            self._renders[key] = job
        layers = {}
        for which, m in (("query", e.query_map), ("result", e.result_map)):
            _heat_png(m, own_size(qa if which == "query" else rb), out / f"{which}_heat.png")
            layers[f"{which}_heat"] = f"/explain/{key}/{which}_heat.png"
        doc["layers"] = layers
        doc["downloads"] = {"json": f"/explain/{key}/explain.json", "report": f"/explain/{key}/report.html",
                            "png": f"/explain/{key}/pair.png"}
        if verification is not None:
            import numpy as np

            n = len(verification.query_points)
            step = max(1, n // INLIER_POINTS)
            doc["inlier_points"] = {"query": np.round(verification.query_points[::step], 1).tolist(),
                                    "result": np.round(verification.result_points[::step], 1).tolist()}
        return doc

    def drawing(self, key: str, name: str) -> Future | None:
        """The background drawing that a file of an explanation waits for (None: nothing to wait for); a
        :class:`NotFound` for a file this server did not make (only those names, only those keys). The web app
        awaits it off the event loop, then asks :meth:`explained_file`."""
        with self._lock:
            known = key in self._explained
            job = self._renders.get(key)
        if (not re.fullmatch(r"[0-9a-f]{24}", key or "") or not known
                or name not in ("report.html", "explain.json", "pair.png", "query_heat.png", "result_heat.png")):
            raise NotFound("no such explanation file (explanations are kept while the server runs)")
        return job if name in ("report.html", "pair.png") else None

    def explained_file(self, key: str, name: str) -> Path:
        """A file of an explanation this server made, once drawn (waiting for its drawing if it is not yet: call
        :meth:`drawing` first where waiting must not block)."""
        job = self.drawing(key, name)
        if job is not None:
            job.result(timeout=RENDER_WAIT_S)  # an error in the drawing surfaces here
        p = self.cache_dir / "explain" / key / name
        if not p.is_file():
            raise NotFound("no such explanation file")
        return p


def _heat_png(m, size: tuple[int, int], path: Path) -> None:
    """A map as the page's colour layer: the report's colours and alpha (explain.render), at most
    ``HEAT_MAX_SIDE`` px (maps are smooth: the browser scales them up), fast PNG compression."""
    import numpy as np
    from matplotlib import colormaps
    from PIL import Image

    from explain.methods import map_size
    from explain.render import COLORMAP, HEAT_MAX_SIDE, resize_map

    target = map_size(size, HEAT_MAX_SIDE)
    heat = np.clip(resize_map(m, target) if m.shape != target else m, 0, 1)
    rgba = colormaps[COLORMAP](heat)
    rgba[..., 3] = 0.35 + 0.65 * heat
    Image.fromarray((rgba * 255 + 0.5).astype(np.uint8), "RGBA").save(path, "PNG", compress_level=1)


def _with_margin(box: list[int], size: tuple[int, int]) -> tuple[int, int, int, int]:
    """``box`` (x0, y0, x1, y1) grown by :data:`FACE_MARGIN` of its size on each side, within the photo."""
    x0, y0, x1, y1 = box
    mx, my = FACE_MARGIN * (x1 - x0), FACE_MARGIN * (y1 - y0)
    return (max(0, int(x0 - mx)), max(0, int(y0 - my)), min(size[0], int(x1 + mx)), min(size[1], int(y1 + my)))


def _thumb_url(row_id: int, sha: str, side: int = THUMB_SIDE) -> str:
    return f"/thumb/{row_id}?size={side}&v={sha[:12]}"


def _background() -> None:
    """Lower the calling thread's CPU priority (Linux: per thread), so that searches are served first while
    explanations are computed and drawn."""
    if sys.platform.startswith("linux"):
        try:
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), BACKGROUND_NICE)
        except OSError:
            pass


def _write_atomically(out: Path, data: bytes) -> None:
    tmp = out.with_name(out.name + f".{os.getpid()}.{threading.get_ident()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, out)


def _save_small(img, out: Path, side: int) -> None:
    """A JPEG of at most ``side`` px on the long side, written atomically."""
    from PIL import Image

    im = img.convert("RGB")
    if max(im.size) > side:
        im.thumbnail((side, side), Image.LANCZOS)
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=85)
    _write_atomically(out, buf.getvalue())
