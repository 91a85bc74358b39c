"""What the web app does, without the web: one loaded index and model answering searches and pair audits.

The model and the index are loaded once (:class:`Service`); every answer has the fields of the CLI's
``--json`` (``retrieve search``, ``retrieve explain --index``, ``retrieve info``), plus what a page needs
to show it (thumbnail and photo URLs, each photo's own size, the inlier points).

Only files that are in the index are ever read for a client: photos are named by their row id, never by a
path the client sends, and a row's file is served only while its real path is still the path the index
recorded (a file swapped for a symbolic link that leads elsewhere is refused). Uploads are kept in a private
temporary folder under their content hash.

While ``retrieve index`` updates the same index, answers come from the state this process loaded last; the
indexer marks each finished run (``updated_at``), and the next request after that loads the new state.
"""
from __future__ import annotations

import hashlib
import io
import os
import re
import shutil
import tempfile
import threading
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from retrieval.errors import ImageError, RetrieveError
from retrieval.names import shown as readable

MAX_UPLOAD_BYTES = 20_000_000  # an upload larger than this is refused with 413
MAX_K = 100
THUMB_SIDE = 256
VIEW_SIDE = 1024  # photos on the pair page
METHODS = ("sfam", "gradcam", "occlusion")
KEEP_UPLOADS = 200  # the most recent uploads kept on disk
KEEP_EXPLAINED = 200  # the most recent explanations kept on disk
INLIER_POINTS = 150  # inlier points sent to the page (a readable subset)
_TOKEN = re.compile(r"^[0-9a-f]{64}$")


class NotFound(RetrieveError):
    """The thing asked for is not in this index (or no longer is)."""


class BadRequest(RetrieveError):
    """The request itself is wrong (a bad parameter, a file that is not an image)."""


class TooLarge(RetrieveError):
    """An upload above the size cap."""


class NotAnImage(BadRequest):
    """An upload that is not a photo retrieve can decode."""


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
    """An index opened read-only for the web app; thread-safe (the model runs one request at a time)."""

    def __init__(self, index_dir: str | os.PathLike, cache_dir: str | os.PathLike | None = None,
                 max_upload_bytes: int = MAX_UPLOAD_BYTES):
        from retrieval.index.store import IndexStore, index_path
        from retrieval.presets import preset_of

        self.index_dir = index_path(index_dir)
        with IndexStore.open(self.index_dir) as probe:  # a clear error before anything else
            self.backbone = preset_of(probe.settings).backbone(probe.settings)
        self.cache_dir = Path(cache_dir) if cache_dir else default_cache_dir(self.index_dir)
        (self.cache_dir / "thumbs").mkdir(parents=True, exist_ok=True)
        (self.cache_dir / "explain").mkdir(parents=True, exist_ok=True)
        self.upload_dir = Path(tempfile.mkdtemp(prefix="retrieve-serve-uploads-"))
        self.max_upload_bytes = int(max_upload_bytes)
        self._model = threading.Lock()  # torch and the explainers: one request at a time
        self._state_lock = threading.Lock()
        self._uploads: OrderedDict[str, tuple[int, int]] = OrderedDict()  # token → own (H, W)
        self._explained: OrderedDict[str, dict] = OrderedDict()  # key → the explain document
        self._old: list = []
        self._render_pool = ThreadPoolExecutor(1, thread_name_prefix="retrieve-render")
        self._renders: dict[str, object] = {}  # key → the Future drawing its figure and report
        self.state = self._load()

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
        self._render_pool.shutdown(wait=True)
        for st in [*self._old, self.state]:
            st.index.close()
        shutil.rmtree(self.upload_dir, ignore_errors=True)

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
        limit = _int(limit, "limit", 1, 500, 48)
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

    def thumbnail(self, row_id, side=THUMB_SIDE) -> Path:
        """A JPEG of at most ``side`` px, cached on disk by the photo's content hash."""
        side = _int(side, "size", 32, VIEW_SIDE, THUMB_SIDE)
        row = self.row(row_id)
        out = self.cache_dir / "thumbs" / f"{row.sha256}_{side}.jpg"
        if out.is_file():
            return out
        from retrieval.images import load_image

        img = load_image(self.photo_path(row.id), min_side=None)
        _save_small(img, out, side)
        return out

    # -- uploads ------------------------------------------------------------------------------
    def add_upload(self, data: bytes, filename: str = "upload") -> dict:
        """Keep an uploaded photo (checked to be a decodable image) and return its token."""
        from retrieval.images import decode_image

        from explain.methods import own_size

        if len(data) > self.max_upload_bytes:
            raise TooLarge(f"upload too large: {len(data):,} bytes (the limit is {self.max_upload_bytes:,})")
        if not data:
            raise BadRequest("empty upload: send a photo (JPEG, PNG, WebP, …)")
        name = Path(str(filename or "upload")).name[:120] or "upload"
        try:
            img = decode_image(data, name)
        except ImageError as e:
            raise NotAnImage(f"{name}: {e.reason} (send a photo: JPEG, PNG, WebP, …)") from None
        token = hashlib.sha256(data).hexdigest()
        path = self.upload_dir / f"{token}.img"
        if not path.exists():
            path.write_bytes(data)
            _save_small(img, self.upload_dir / f"{token}_view.jpg", VIEW_SIDE)
            _save_small(img, self.upload_dir / f"{token}_thumb.jpg", THUMB_SIDE)
        self._uploads[token] = own_size(img)
        self._uploads.move_to_end(token)
        while len(self._uploads) > KEEP_UPLOADS:
            old, _ = self._uploads.popitem(last=False)
            for f in self.upload_dir.glob(f"{old}*"):
                f.unlink(missing_ok=True)
        return {"token": token, "name": name, "view": f"/upload/{token}/view.jpg",
                "thumb": f"/upload/{token}/thumb.jpg"}

    def upload_file(self, token: str, kind: str) -> Path:
        if not _TOKEN.match(token or "") or token not in self._uploads or kind not in ("view", "thumb"):
            raise NotFound("no such upload (uploads are kept while the server runs)")
        return self.upload_dir / f"{token}_{kind}.jpg"

    def _query(self, q: str) -> tuple[str, tuple[int, int], dict]:
        """A query named by the client (``upload:<token>`` or an indexed photo's id) → its file, own size and
        how the page shows it."""
        q = str(q or "")
        if q.startswith("upload:"):
            token = q[7:]
            if not _TOKEN.match(token) or token not in self._uploads:
                raise NotFound("no such upload (uploads are kept while the server runs; upload the photo again)")
            return (str(self.upload_dir / f"{token}.img"), self._uploads[token],
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
        offset = _int(offset, "offset", 0, 10_000, 0)
        qe = _int(qe, "qe", 0, 100, 0)
        st = self.current()
        faces = st.index.preset.per_face
        # as `retrieve search` without options: the index's verification depth, its visual words and, on an index
        # with a catalogue, its top catalogue candidates, verified beside the global shortlist (retrieval/index/
        # catalogue.py)
        options = {} if faces else dict(st.index.search_options(_int(verify, "verify", 0, 1000, None)), qe=qe)
        verify = options.get("verify", 0)
        path, _, shown = self._query(q)
        include_self = not str(q).isdigit()
        if faces and not include_self:  # an indexed face's tile: that face of the photo is the query
            options["face"] = st.store.face_rows([int(q)])[int(q)].face
        t0 = time.perf_counter()
        with self._model:
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
        if key in self._explained:
            self._explained.move_to_end(key)
            return self._explained[key]
        t0 = time.perf_counter()
        faces_of = {}
        if faces:  # face against face: an indexed face's tile is that face, an upload's its largest (face 0)
            faces_of = {"face_a": st.store.face_rows([int(q)])[int(q)].face if str(q).isdigit() else 0,
                        "face_b": st.store.face_rows([row.id])[row.id].face}
        with self._model:
            doc = self._explain_files(st, key, qpath, rpath, method, verify,
                                      (shown["name"], readable(Path(row.path).name)),
                                      **faces_of)
        doc["seconds"] = round(time.perf_counter() - t0, 4)
        doc["query"] = shown.get("path", shown["name"])
        doc["shown"] = {"query": shown, "result": {"id": row.id, "name": readable(Path(row.path).name),
                                                   "path": row.path,
                                                   "view": _thumb_url(row.id, row.sha256, VIEW_SIDE)}}
        doc["sizes"] = {"query": list(qsize), "result": [row.height, row.width]}  # (H, W), own pixels
        doc["key"] = key
        self._explained[key] = doc
        while len(self._explained) > KEEP_EXPLAINED:
            old, _ = self._explained.popitem(last=False)
            job = self._renders.pop(old, None)
            if job is not None:
                job.result()
            shutil.rmtree(self.cache_dir / "explain" / old, ignore_errors=True)
        return doc

    def _explain_files(self, st: Loaded, key: str, qpath: str, rpath: str, method: str, verify: bool,
                       names: tuple[str, str], face_a: int | None = None, face_b: int | None = None) -> dict:
        """What ``explain.run.explain_pair`` does, with the same document (:func:`explain.run.prepare_pair`), except
        that the figure and the report (a second or more of image encoding) are drawn in the background: the page
        shows the maps at once, and a download of either waits for it (:meth:`explained_file`)."""
        from explain.methods import own_size

        # the CLI's ``retrieve explain --index`` (explain/collection.py), the figure and report drawn afterwards
        pair = st.index.explain_pair(qpath, rpath, self.cache_dir / "explain" / key, method, verify, names=names,
                                     face_a=face_a, face_b=face_b, prepare_only=True)
        verification = pair.verification
        doc, e, qa, rb, out = pair.doc, pair.explanation, pair.query_image, pair.result_image, pair.out
        self._renders[key] = self._render_pool.submit(pair.draw)
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

    def explained_file(self, key: str, name: str) -> Path:
        """A file of an explanation this server made (only those names, only those keys)."""
        if (not re.fullmatch(r"[0-9a-f]{24}", key or "") or key not in self._explained
                or name not in ("report.html", "explain.json", "pair.png", "query_heat.png", "result_heat.png")):
            raise NotFound("no such explanation file (explanations are kept while the server runs)")
        job = self._renders.get(key)
        if job is not None and name in ("report.html", "pair.png"):
            job.result(timeout=300)  # drawn in the background; an error in it surfaces here
            self._renders.pop(key, None)
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


def _thumb_url(row_id: int, sha: str, side: int = THUMB_SIDE) -> str:
    return f"/thumb/{row_id}?size={side}&v={sha[:12]}"


def _save_small(img, out: Path, side: int) -> None:
    """A JPEG of at most ``side`` px on the long side, written atomically."""
    from PIL import Image

    im = img.convert("RGB")
    if max(im.size) > side:
        im.thumbnail((side, side), Image.LANCZOS)
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=85)
    tmp = out.with_name(out.name + f".{os.getpid()}.{threading.get_ident()}.tmp")
    tmp.write_bytes(buf.getvalue())
    os.replace(tmp, out)
