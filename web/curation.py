"""The web app's curation pages over the loaded index: near-duplicate groups (``retrieve duplicates``) and people in
a faces index (``retrieve people``), with what a page needs to show them (thumbnail URLs, links to the pair audit).

Bounded like the rest of the service (web/service.py): finding the duplicates reads the whole index (minutes on
100 k photos), so it runs on one background thread of lower CPU priority, one computation at a time, and its answer
is kept for the index state it was computed on (the next request after ``retrieve index`` has finished computes it
again); a request while it runs gets its progress (web/app.py answers 202). A page of groups is at most
:data:`MAX_GROUPS_PAGE` groups. Naming a person writes the index: the write takes the index's writer lock for that
one transaction (another writer at work: a 409 saying so), and writes of people go one at a time.
"""
from __future__ import annotations

import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from retrieval.errors import IndexLocked, RetrieveError
from retrieval.names import shown as readable

from .service import BadRequest, NotFound, _background, _int, _thumb_url

MAX_GROUPS_PAGE = 200  # groups per page of /api/duplicates (the page asks for 50)
MAX_NAME_BODY = 4_096  # the body of POST /api/people/{id}/name, at most (JSON {"name": …})
DUPLICATES_WAIT_S = 2.0  # how long a request waits for the groups before answering with the progress


class Locked(RetrieveError):
    """The index is being written by another retrieve (its writer lock is held): try again when it has finished."""


class _Job:
    """One computation of the duplicates for one index state: its future and its progress."""

    def __init__(self, stamp, similar: bool):
        self.stamp, self.similar = stamp, similar
        self.done = self.total = 0
        self.started: float | None = None
        self.future: Future | None = None
        self.stop = False  # set when no longer wanted (the server stops, the index changed): it ends at its next
        # progress report

    def progress(self, done: int, total: int) -> None:
        if self.stop:
            raise RetrieveError("stopped: no longer wanted (the server stops, or the index changed)")
        self.done, self.total = int(done), int(total)

    def status(self) -> dict:
        running = self.started is not None
        return {"status": "computing" if running else "waiting", "similar": self.similar, "done": self.done,
                "total": self.total, "seconds": round(time.monotonic() - self.started, 1) if running else 0.0}


class Curation:
    """Duplicates and people for one :class:`web.service.Service` (its loaded state, its thumbnails)."""

    def __init__(self, service):
        self.service = service
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="retrieve-duplicates", initializer=_background)
        self._jobs: dict[tuple, _Job] = {}  # (index state, similar) → its computation
        self._lock = threading.Lock()  # _jobs
        self._people_lock = threading.Lock()  # writes of people (clustering new faces, names): one at a time
        service.on_close.append(self.close)

    def close(self) -> None:
        """Stop: a computation waiting is cancelled, one running stops at its next progress report."""
        with self._lock:
            for job in self._jobs.values():
                job.stop = True
                job.future.cancel()
        self._pool.shutdown(wait=True)

    # -- duplicates ---------------------------------------------------------------------------
    def duplicates_job(self, similar: bool) -> _Job:
        """The computation of the current state's groups (``similar``: with the similar-shots tier): the one
        kept, the one running or waiting, else a new one. Those of older states are dropped (cancelled if they
        have not started)."""
        st = self.service.current()
        key = (st.stamp, bool(similar))
        with self._lock:
            for k in [k for k in self._jobs if k[0] != st.stamp]:  # an older state's: stopped, not kept
                old = self._jobs.pop(k)
                old.stop = True
                old.future.cancel()
            job = self._jobs.get(key)
            if job is not None and job.future.done() and _failed_unexpectedly(job.future):
                job = None  # an internal error is not kept: the next request tries again
            if job is None:
                job = _Job(st.stamp, bool(similar))
                job.future = self._pool.submit(self._find, st, job)
                self._jobs[key] = job
            return job

    def _find(self, st, job: _Job):
        from retrieval.curate.duplicates import find_duplicates

        job.started = time.monotonic()
        # the groups as ``retrieve duplicates --json`` has them, kept (the future's result) for the next requests
        return find_duplicates(st.store, similar=job.similar, progress=job.progress).to_dict()

    def duplicates_page(self, job: _Job, offset=0, limit=50) -> dict:
        """``retrieve duplicates --json``'s fields for a finished computation, with one page of its groups (from
        ``offset``, at most ``limit``), each member with its thumbnail and, but the keeper, its pair audit against
        the keeper. The computation's error (a faces index, …) is raised here."""
        offset = _int(offset, "offset", 0, 10**9, 0)
        limit = _int(limit, "limit", 1, MAX_GROUPS_PAGE, 50)
        doc = dict(job.future.result())  # kept for the next requests: the page's groups are copies
        groups = doc.get("groups", [])
        page = [{**g, "members": [dict(m) for m in g["members"]]} for g in groups[offset:offset + limit]]
        ids = [_member_id(m) for g in page for m in g["members"]]
        rows = self.service.current().store.rows_by_ids(ids) if ids else {}
        for g in page:
            keeper = _member_id(g["members"][0])
            for m in g["members"]:
                rid = _member_id(m)
                row = rows.get(rid)
                m["id"] = rid
                m["name"] = readable(Path(m["path"]).name)
                m["thumb"] = _thumb_url(rid, row.sha256 if row else "")
                if not m.get("keeper"):
                    m["pair"] = _pair_url(rid, keeper, back="duplicates")
        doc.update({"groups": page, "total_groups": len(groups), "offset": offset, "limit": limit,
                    "similar": job.similar, "status": "done",
                    "more": offset + limit < len(groups)})
        return doc

    # -- people -------------------------------------------------------------------------------
    def _faces_state(self):
        """The current state, when it is a faces index (else retrieve people's one-line error)."""
        from retrieval.curate.people import require_faces

        st = self.service.current()
        require_faces(st.store)
        return st

    def people(self) -> dict:
        """``retrieve people --json``, each person with the thumbnail of their face; faces not yet given a person are
        given one first, as ``retrieve people`` does (``updated``: what that did, None when nothing was to do;
        ``{"locked": why, …}`` while another retrieve writes the index, the people then read as they are)."""
        st = self._faces_state()
        from retrieval.curate import people as P

        with self._people_lock:
            updated = P.refresh(self.service.index_dir)
        st = self.service.current()
        found = P.list_people(st.store)
        reps = st.store.face_rows([p.face[0] for p in found if p.face])
        return {"index": str(self.service.index_dir), "faces": st.store.count(),
                "people": [self._person(p, reps) for p in found], "updated": updated}

    def person(self, ref) -> dict:
        """``retrieve people show ID --json`` (the person, their faces), each face with its photo's size, its
        thumbnails and the pair audit of that face against the person's representative face."""
        st = self._faces_state()
        from retrieval.curate import people as P


        with self._people_lock:  # as `retrieve people show`: the waiting faces given a person first
            P.refresh(self.service.index_dir)
        st = self.service.current()
        p = self._known(st, ref)
        faces = P.faces_of(st.store, p.id)
        rep = p.face[0] if p.face else None
        rows = st.store.face_rows([f["id"] for f in faces] + ([rep] if rep is not None else []))
        for f in faces:
            rid, row = f["id"], rows.get(f["id"])
            sha = row.sha256 if row else ""
            f.update({"name": readable(Path(f["path"]).name), "size": [row.height, row.width] if row else None,
                      "thumb": _thumb_url(rid, sha), "face_thumb": _thumb_url(rid, sha) + "&face=1",
                      "representative": rid == rep,
                      "pair": _pair_url(rid, rep, back=f"people?id={p.id}") if rep is not None and rid != rep else None})
        return {"person": self._person(p, rows), "faces": faces}

    def rename(self, ref, body: bytes) -> dict:
        """Name a person (``retrieve people name ID NAME``, with its rules: unique, not a number, not empty, at most
        people.MAX_NAME_CHARS printable characters): ``body`` is JSON ``{"name": "Alice"}``."""
        import json


        st = self._faces_state()
        from retrieval.curate import people as P

        p = self._known(st, ref)
        try:
            name = json.loads(body.decode("utf-8"))["name"]
        except (ValueError, KeyError, TypeError, UnicodeDecodeError):
            raise BadRequest('send JSON {"name": "…"}') from None
        if not isinstance(name, str):
            raise BadRequest("name: give a text")
        with self._people_lock, self._writer() as store:
            P.rename(store, p.id, name)
        st = self.service.current()
        p = P.person_named(st.store, p.id)
        return self._person(p, st.store.face_rows([p.face[0]] if p.face else []))

    def _known(self, st, ref):
        """The person with id ``ref``, or :class:`NotFound`."""
        from retrieval.curate.people import person_named


        pid = self._person_id(ref)
        try:
            return person_named(st.store, pid)
        except RetrieveError as e:
            raise NotFound(str(e)) from None

    def _writer(self):
        """The index opened for writing, or :class:`Locked` while another retrieve writes it."""
        from retrieval.index.store import IndexStore

        try:
            return IndexStore.open(self.service.index_dir, writable=True, what="retrieve serve: people")
        except IndexLocked as e:
            raise Locked(str(e)) from None

    def _person_id(self, ref) -> int:

        return _int(ref, "person", 1, 2**62, None)

    def _person(self, p, rows: dict) -> dict:
        """``Person.to_dict()`` (``retrieve people --json``) with the page's URL and the thumbnails of their face."""

        d = {**p.to_dict(), "url": f"/people?id={p.id}"}
        if d["face"]:
            row = rows.get(d["face"]["id"])
            sha = row.sha256 if row else ""
            d["face"].update({"name": readable(Path(d["face"]["path"]).name),
                              "thumb": _thumb_url(d["face"]["id"], sha) + "&face=1",
                              "photo": _thumb_url(d["face"]["id"], sha)})
        return d


def _member_id(m: dict) -> int:
    return int(m["row_id"] if "row_id" in m else m["id"])


def _pair_url(q: int, r: int, back: str = "") -> str:
    """The pair page of ``q`` against ``r``, its back link to ``back``. Without the page's SIFT verification: the
    groups' inliers are their own pair test's (retrieval/curate/pairtest.py), which SIFT's count would contradict
    on a mirrored copy; the page's box turns it on."""
    from urllib.parse import urlencode

    return "/pair?" + urlencode({"q": q, "r": r, "verify": "0", "from": back})


def _failed_unexpectedly(f: Future) -> bool:
    if f.cancelled():
        return True
    e = f.exception()
    return e is not None and not isinstance(e, RetrieveError)
