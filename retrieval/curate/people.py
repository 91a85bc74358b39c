"""People in a faces index (``--preset faces``): its face rows grouped into persons, named, merged and split by hand.

The state lives in the index database beside the rows, SQLite and PostgreSQL alike (retrieval/index/schema.py
``people``, ``person_faces``). Those tables are optional: an index made before them reads as "no people yet", and
the first writer here creates them (IndexStore.ensure_tables).

:func:`update_people` is incremental and deterministic (faces taken in row-id order). It never moves a face that
has a person; each face without one, in turn:

1. a re-indexed photo's face (its rows are replaced, with new ids) takes the person of the old row at the same place
   of the same photo (same path, or same content for a photo moved; boxes overlapping by IoU >= 0.5), manual flag
   included: names and hand-made assignments survive a re-index exactly;
2. else it joins the existing person whose centroid it matches (clustering.assign_to_people, at the index's
   same-person threshold);
3. the rest are clustered among themselves (clustering.cluster_faces) into new, unnamed people; a face the clustering
   leaves alone is a person of one face.

Centroids (the L2-normalised mean of a person's faces in the index's space, where the dot product is the score the
faces preset ranks by) and representative faces (the face nearest the centroid) are recomputed for every person that
changed. A person left without faces is deleted unless it has a name: a named person is kept (0 photos, its last
centroid), so its name comes back on the next faces that match it (a photo re-indexed elsewhere, a folder
reconnected). Names are unique, case-insensitively, and never a bare number (that reads as a person id).
"""
from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass

import numpy as np

from retrieval.errors import IndexLocked, RetrieveError
from retrieval.names import from_db, shown

IOU_SAME_FACE = 0.5  # a re-indexed photo's face at the same place as an old row: the same face
MAX_NAME_CHARS = 200  # a person's name, at most (the web app's rule too)


@dataclass
class Person:
    id: int
    name: str | None
    faces: int
    photos: int
    face: tuple[int, str, tuple[int, int, int, int]] | None  # representative: (row id, path, box); None: no faces

    def to_dict(self) -> dict:
        return {"id": self.id, "name": self.name, "photos": self.photos, "faces": self.faces,
                "face": None if self.face is None else {"id": self.face[0], "path": self.face[1],
                                                        "box": list(self.face[2])}}


# -- helpers -------------------------------------------------------------------------------------------
def _tables():
    from retrieval.index.schema import PersonFaceRow, PersonRow

    return PersonRow.__table__, PersonFaceRow.__table__


def _box(text: str | None) -> tuple[int, int, int, int]:
    return tuple(int(v) for v in text.split(",")) if text else (0, 0, 0, 0)  # type: ignore[return-value]


def _iou(a, b) -> float:
    x0, y0, x1, y1 = max(a[0], b[0]), max(a[1], b[1]), min(a[2], b[2]), min(a[3], b[3])
    inter = max(0, x1 - x0) * max(0, y1 - y0)
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def _hint(store) -> str:
    import shlex

    return f"`retrieve people --index {shlex.quote(str(store.directory))}`"


def require_faces(store) -> None:
    """People need a faces index scored by the centred cosine; anything else is a one-line error."""
    from retrieval.presets import preset_of

    if not preset_of(store.settings).per_face:
        raise RetrieveError(f"{store.directory}: not a faces index; people need one made with `retrieve index PHOTOS "
                            "--preset faces --index NEW_DIR`")
    if store.settings.metric != "cosine":
        raise RetrieveError(f"{store.directory}: a faces index made before the centred cosine score; people need "
                            "one made anew with `retrieve index PHOTOS --preset faces --index NEW_DIR`")


def _same(store) -> float:
    """The index's same-person threshold on its score (retrieval/faces/search.py same_person)."""
    return float((store.settings.faces or {}).get("threshold", 0.5))


def _has_tables(store) -> bool:
    from retrieval.index.database import is_missing_table

    try:
        store.query("SELECT count(*) FROM people WHERE 1 = 0")
        store.query("SELECT count(*) FROM person_faces WHERE 1 = 0")
    except Exception as e:  # noqa: BLE001  (sqlite3 or SQLAlchemy: no such table = no people yet)
        if is_missing_table(e):
            return False
        raise
    return True


def _ready(store) -> None:
    """A store open to write, with the people tables (created when the index has none yet)."""
    if not store.writable:
        raise RetrieveError(f"{store.directory}: opened to read, not to write")
    store.ensure_tables(*_tables())


def _writer(store):
    """A transaction on the people tables."""
    _ready(store)
    return store.engine.begin()


def _space(store, ids) -> tuple[np.ndarray, np.ndarray]:
    """(ids sorted, their vectors in the index's space) of face rows ``ids``."""
    ids = sorted(int(i) for i in ids)
    got: dict[int, np.ndarray] = {}
    for part_ids, raw in store.vectors_of(ids):
        for i, v in zip(part_ids, store.transform(raw)):
            got[int(i)] = v
    ids = [i for i in ids if i in got]
    dim = store.vector_dim
    return np.array(ids, np.int64), (np.stack([got[i] for i in ids]) if ids else np.zeros((0, dim), np.float32))


def _summaries(store, members: dict) -> dict:
    """{person key: (centroid float32 bytes, representative row id)} of people whose faces are ``members[key]``
    (people without faces are left out)."""
    wanted = {i for rows in members.values() for i in rows}
    ids, x = _space(store, wanted)
    where = {int(i): j for j, i in enumerate(ids)}
    out = {}
    for key, rows in members.items():
        rows = sorted(int(r) for r in rows if int(r) in where)
        if not rows:
            continue
        v = x[[where[r] for r in rows]]
        c = v.mean(0, dtype=np.float64)
        c = (c / max(np.linalg.norm(c), 1e-12)).astype(np.float32)
        out[key] = (c.tobytes(), rows[int(np.argmax(v @ c))])  # argmax: the first (lowest id) of equals
    return out


def _write_summaries(conn, store, members: dict[int, list[int]], names: dict[int, str | None]) -> int:
    """Centroid and representative of each person in ``members``; those left without faces are deleted unless
    named. Returns how many were deleted."""
    from sqlalchemy import delete, update

    people, _ = _tables()
    sums = _summaries(store, members)
    gone = 0
    for pid in sorted(members):
        if pid in sums:
            centroid, face_row = sums[pid]
            conn.execute(update(people).where(people.c.id == pid).values(centroid=centroid, face_row=face_row))
        elif names.get(pid):
            conn.execute(update(people).where(people.c.id == pid).values(face_row=None))
        else:
            conn.execute(delete(people).where(people.c.id == pid))
            gone += 1
    return gone


def _members(store, pids) -> dict[int, list[int]]:
    """{person id: its face row ids that exist} for ``pids``."""
    out: dict[int, list[int]] = {int(p): [] for p in pids}
    for rid, pid in store.query("SELECT f.row_id, f.person_id FROM person_faces f JOIN images i ON i.id = f.row_id"):
        if int(pid) in out:
            out[int(pid)].append(int(rid))
    return out


def _names(store) -> dict[int, str | None]:
    return {int(i): n for i, n in store.query("SELECT id, name FROM people")}


# -- reading -------------------------------------------------------------------------------------------
def pending(store) -> int:
    """Faces waiting for :func:`update_people`: face rows without a person, plus assignments whose row is gone."""
    if not _has_tables(store):
        return store.count()
    return int(store.query("SELECT count(*) FROM images i LEFT JOIN person_faces f ON f.row_id = i.id "
                           "WHERE f.row_id IS NULL")[0][0] or 0) + \
        int(store.query("SELECT count(*) FROM person_faces f LEFT JOIN images i ON i.id = f.row_id "
                        "WHERE i.id IS NULL")[0][0] or 0)


def list_people(store) -> list[Person]:
    """Every person: most photos first, then most faces, then id; an index without people tables has none."""
    require_faces(store)
    if not _has_tables(store):
        return []
    rows = store.query("SELECT p.id, p.name, p.face_row, count(i.id), count(DISTINCT i.path), min(i.id) FROM people p "
                       "LEFT JOIN person_faces f ON f.person_id = p.id LEFT JOIN images i ON i.id = f.row_id "
                       "GROUP BY p.id, p.name, p.face_row")
    wanted = {int(r) for row in rows for r in (row[2], row[5]) if r is not None}
    faces = store.face_rows(wanted) if wanted else {}
    out = []
    for pid, name, face_row, n, photos, first in rows:
        rep = None
        if n:  # the stored representative; the first face while it is a row gone (a re-index not yet updated)
            rid = int(face_row) if face_row is not None and int(face_row) in faces else int(first)
            rep = (rid, faces[rid].path, _box(faces[rid].box)) if rid in faces else None
        out.append(Person(int(pid), name, int(n), int(photos), rep))
    out.sort(key=lambda p: (-p.photos, -p.faces, p.id))
    return out


def person_named(store, ref) -> Person:
    """The person ``ref`` names: its id, or its name (case-insensitive); unknown: a one-line error with the hint."""
    require_faces(store)
    text = str(ref).strip()
    people = list_people(store)
    if text.isdigit():
        found = [p for p in people if p.id == int(text)]
    else:
        found = [p for p in people if p.name is not None and p.name.casefold() == text.casefold()]
    if not found:
        what = f"person {text}" if text.isdigit() else f"person named {text!r}"
        raise RetrieveError(f"no {what} in {store.directory} ({_hint(store)} lists the people)")
    return found[0]


def faces_of(store, ref) -> list[dict]:
    """The faces of person ``ref``: row id (what ``move`` takes), path, face number, box, manual; in path order."""
    p = person_named(store, ref)
    rows = store.query("SELECT i.id, i.path, i.face, i.box, f.manual FROM person_faces f JOIN images i ON "
                       "i.id = f.row_id WHERE f.person_id = :p ORDER BY i.path, i.face, i.id", {"p": p.id})
    return [{"id": int(i), "path": from_db(path), "face": int(face or 0), "box": list(_box(box)),
             "manual": bool(manual)} for i, path, face, box, manual in rows]


def photos_of(store, ref) -> list[tuple[str, int, tuple[int, int, int, int], int]]:
    """(path, face number, box, row id) of each face of person ``ref``, in path order."""
    return [(f["path"], f["face"], tuple(f["box"]), f["id"]) for f in faces_of(store, ref)]


# -- writing (the caller holds the writer lock: IndexStore.open(..., writable=True)) ----------------------
def update_people(store) -> dict:
    """Give every face without a person one (see the module docstring); keeps names and manual assignments.
    Returns counts: faces considered, kept (a re-indexed photo's faces), joined (existing people), new_people,
    removed_people (unnamed and left without faces), people."""
    from sqlalchemy import delete, insert

    from retrieval.curate.clustering import assign_to_people, cluster_faces

    require_faces(store)
    _ready(store)
    people_t, faces_t = _tables()
    same = _same(store)
    faces = {int(i): (p, b, h) for i, p, b, h in store.query("SELECT id, path, box, sha256 FROM images")}
    assigned = {int(r): (int(p), bool(m), path, box, h) for r, p, m, path, box, h in
                store.query("SELECT row_id, person_id, manual, path, box, sha256 FROM person_faces")}
    names = _names(store)
    orphans = sorted((r, v) for r, v in assigned.items() if r not in faces)
    new = sorted(i for i in faces if i not in assigned)
    report = {"faces": len(new), "kept": 0, "joined": 0, "new_people": 0, "removed_people": 0}
    if not new and not orphans:
        report["people"] = len(names)
        return report

    # 1. a re-indexed photo's faces take the old rows' people: the same photo (its path, or its content when it
    # moved) and the same place in it
    old_at: dict[str, list] = defaultdict(list)
    for r, (pid, manual, path, box, sha) in orphans:
        if pid in names:
            old = [_box(box), pid, manual, False]  # (box, person, manual, taken)
            old_at["p:" + path].append(old)
            if sha:
                old_at["h:" + sha].append(old)
    carried: dict[int, tuple[int, bool]] = {}
    for rid in new:
        path, box, sha = faces[rid]
        b = _box(box)
        best = max((o for o in old_at.get("p:" + path, []) + old_at.get("h:" + sha, []) if not o[3]),
                   key=lambda o: _iou(o[0], b), default=None)
        if best is not None and _iou(best[0], b) >= IOU_SAME_FACE:
            best[3] = True
            carried[rid] = (best[1], best[2])
    rest = [rid for rid in new if rid not in carried]

    # 2. existing people by centroid, 3. the rest clustered into new people
    ids, x = _space(store, rest)
    pids = sorted(names)
    cents = {int(i): np.frombuffer(c, np.float32) for i, c in store.query("SELECT id, centroid FROM people")}
    joined: dict[int, int] = {}
    left = np.arange(len(ids))
    if pids and len(ids):
        c = np.stack([cents[p] for p in pids]) if pids else np.zeros((0, x.shape[1]), np.float32)
        a = np.asarray(assign_to_people(x, c, same))
        joined = {int(ids[j]): pids[int(a[j])] for j in range(len(ids)) if a[j] >= 0}
        left = np.array([j for j in range(len(ids)) if a[j] < 0], np.int64)
    groups: list[list[int]] = []
    if len(left):
        labels = np.asarray(cluster_faces(x[left], same)) if len(left) > 1 else np.zeros(1, np.int64)
        by_label: dict[int, list[int]] = {}
        for j, lab in zip(left, labels):
            if lab < 0:
                groups.append([int(ids[j])])
            else:
                by_label.setdefault(int(lab), []).append(int(ids[j]))
        groups += list(by_label.values())
        groups.sort(key=min)  # new people numbered in the order of their first face

    # one transaction: assignments, new people, centroids
    members = _members(store, pids)
    for rid, (pid, _) in carried.items():
        members[pid].append(rid)
    for rid, pid in joined.items():
        members[pid].append(rid)
    touched = {pid for _, (pid, *_r) in orphans} | {p for p, _ in carried.values()} | set(joined.values())
    now = time.time()
    with store.engine.begin() as conn:
        for part in _chunks([r for r, _ in orphans]):
            conn.execute(delete(faces_t).where(faces_t.c.row_id.in_(part)))
        def row(rid: int, pid: int, manual: bool = False) -> dict:
            path, box, sha = faces[rid]
            return {"row_id": rid, "person_id": pid, "manual": manual, "path": path, "box": box, "sha256": sha}

        rows = [row(rid, pid, manual) for rid, (pid, manual) in carried.items()]
        rows += [row(rid, pid) for rid, pid in joined.items()]
        placeholder = np.zeros(store.vector_dim, np.float32).tobytes()
        for g in groups:
            pid = int(conn.execute(insert(people_t).returning(people_t.c.id),
                                   [{"name": None, "centroid": placeholder, "created_at": now}]).scalar_one())
            members[pid] = list(g)
            touched.add(pid)
            rows += [row(rid, pid) for rid in g]
        for part in _chunks(rows):
            conn.execute(insert(faces_t), list(part))
        removed = _write_summaries(conn, store, {p: members[p] for p in touched if p in members}, names)
    report.update(kept=len(carried), joined=len(joined), new_people=len(groups), removed_people=removed,
                  people=len(names) + len(groups) - removed)
    return report


def _chunks(seq, n: int = 500):
    seq = list(seq)
    for i in range(0, len(seq), n):
        yield seq[i:i + n]


def _check_name(store, name: str, pid: int) -> str:
    name = " ".join(str(name).split())
    if not name:
        raise RetrieveError("a person's name cannot be empty")
    if len(name) > MAX_NAME_CHARS:
        raise RetrieveError(f"a person's name has at most {MAX_NAME_CHARS} characters (this one {len(name)})")
    if not name.isprintable():
        raise RetrieveError(f"{shown(name)}: a name cannot hold control characters")
    if name.isdigit():
        raise RetrieveError(f"{name!r}: a name cannot be a number (it would read as a person id)")
    for other in list_people(store):
        if other.id != pid and other.name is not None and other.name.casefold() == name.casefold():
            import shlex

            raise RetrieveError(f"{other.name!r} is person {other.id} already; if they are the same person: `retrieve "
                                f"people merge {other.id} {pid} --index {shlex.quote(str(store.directory))}`")
    return name


def rename(store, ref, name: str) -> Person:
    """Name person ``ref`` (names are unique, case-insensitively)."""
    from sqlalchemy import update

    p = person_named(store, ref)
    name = _check_name(store, name, p.id)
    people_t, _ = _tables()
    with _writer(store) as conn:
        conn.execute(update(people_t).where(people_t.c.id == p.id).values(name=name))
    return person_named(store, p.id)


def merge(store, a, b) -> dict:
    """Person ``b`` into person ``a``: b's faces become a's (manual), a keeps its name (b's when a has none); b is
    deleted. Returns {"person": a after, "merged": b's id, "dropped_name": b's name when it was not kept}."""
    from sqlalchemy import delete, update

    pa, pb = person_named(store, a), person_named(store, b)
    if pa.id == pb.id:
        raise RetrieveError(f"person {pa.id} cannot be merged into itself")
    people_t, faces_t = _tables()
    name = pa.name or pb.name
    with _writer(store) as conn:
        conn.execute(update(faces_t).where(faces_t.c.person_id == pb.id).values(person_id=pa.id, manual=True))
        conn.execute(delete(people_t).where(people_t.c.id == pb.id))
        conn.execute(update(people_t).where(people_t.c.id == pa.id).values(name=name))
        members = _members_in(conn, [pa.id])
        _write_summaries(conn, store, members, {pa.id: name})
    return {"person": person_named(store, pa.id), "merged": pb.id,
            "dropped_name": pb.name if pb.name and pb.name != name else None}


def _members_in(conn, pids) -> dict[int, list[int]]:
    """As _members, read inside the writing transaction (its own changes seen)."""
    from sqlalchemy import text

    out: dict[int, list[int]] = {int(p): [] for p in pids}
    for rid, pid in conn.execute(text("SELECT f.row_id, f.person_id FROM person_faces f JOIN images i ON "
                                      "i.id = f.row_id")):
        if int(pid) in out:
            out[int(pid)].append(int(rid))
    return out


def move_face(store, row_id: int, to=None) -> dict:
    """Move face row ``row_id`` to person ``to`` (an id or a name), or to a new person of its own (``to`` None):
    a manual assignment. The person it leaves is deleted when left without faces and unnamed.
    Returns {"face": row id, "from": person id, "to": Person}."""
    from sqlalchemy import insert, update

    require_faces(store)
    row = store.face_rows([int(row_id)]).get(int(row_id))
    if row is None:
        raise RetrieveError(f"no face {row_id} in {store.directory} (a face is given by its row id, as `people show` "
                            f"lists a person's faces; {_hint(store)} lists the people)")
    have = store.query("SELECT person_id FROM person_faces WHERE row_id = :r", {"r": int(row_id)}) \
        if _has_tables(store) else []
    if not have:
        raise RetrieveError(f"face {row_id} has no person yet; {_hint(store)} gives every face one")
    src = int(have[0][0])
    target = person_named(store, to) if to is not None else None
    if target is not None and target.id == src:
        raise RetrieveError(f"face {row_id} is person {src}'s already")
    people_t, faces_t = _tables()
    names = _names(store)
    with _writer(store) as conn:
        if target is None:
            dst = int(conn.execute(insert(people_t).returning(people_t.c.id),
                                   [{"name": None, "centroid": np.zeros(store.vector_dim, np.float32).tobytes(),
                                     "created_at": time.time()}]).scalar_one())
        else:
            dst = target.id
        conn.execute(update(faces_t).where(faces_t.c.row_id == int(row_id)).values(person_id=dst, manual=True))
        _write_summaries(conn, store, _members_in(conn, [src, dst]), {**names, dst: names.get(dst)})
    return {"face": int(row_id), "from": src, "to": person_named(store, dst)}


# -- the command's way in ----------------------------------------------------------------------------------
def refresh(directory) -> dict | None:
    """Update the people of the faces index at ``directory`` when faces are waiting (:func:`pending`): None when
    none are; else update_people's counts, or {"locked": why, "waiting": n} when another process is writing the
    index (the people are then read as they are)."""
    from retrieval.index.store import IndexStore

    with IndexStore.open(directory) as store:
        require_faces(store)
        waiting = pending(store)
    if not waiting:
        return None
    try:
        with IndexStore.open(directory, writable=True, what="retrieve people") as store:
            return update_people(store)
    except IndexLocked as e:
        return {"locked": str(e), "waiting": waiting}


__all__ = ["Person", "update_people", "list_people", "person_named", "faces_of", "photos_of", "rename", "merge",
           "move_face", "pending", "refresh", "require_faces"]
