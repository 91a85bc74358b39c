"""Moving the non-keepers of duplicate groups out of a collection, journaled so that nothing can be lost, and undoing it.

A batch is planned whole before any file moves: each non-keeper once (never a keeper, never a file twice), checked
against its row (same path, same sha256 as indexed), and its target under ``DEST`` keeping its path relative to the
common folder of the moved photos; a target that already exists refuses the whole batch. Then, in the index
directory's ``duplicates/`` folder, the photos' rows (every column, the embedding's bytes included: an undo puts them
back without embedding anything) and the plan (``moves-<UTC time>.json``) are written and fsynced, and an
append-only log (``moves-<UTC time>.log``) records each step as it completes. A file moves by a hard link and an
unlink within a file system (never over an existing file), else by a copy that is fsynced and checked against the
sha256 before the original goes. The rows leave the index at the end, under the index's writer lock.

Recovery reads the file system, not only the log: a move killed half-way leaves the original, a verified copy or
both, and either direction finishes from there. :func:`move_non_keepers` first completes an interrupted batch;
:func:`undo_last` reverses the latest batch that is not undone yet (complete or interrupted): each file back byte for
byte (sha256 checked), refusing when a file has reappeared at an original path, then the rows.
"""
from __future__ import annotations

import base64
import errno
import hashlib
import json
import os
import shutil
import time
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np

from retrieval.errors import RetrieveError
from retrieval.index.files import fsync_dir

FOLDER = "duplicates"  # in the index directory
COLUMNS = ("id", "path", "size", "mtime_ns", "sha256", "width", "height", "vector", "indexed_at")
FORMAT = "retrieve-duplicates-moves"
TEMP_SUFFIX = ".retrieve-move.tmp"

Progress = Callable[[int, int], None] | None


class MoveError(RetrieveError):
    """A batch cannot be moved or undone as asked (nothing was changed when it is raised before the first move)."""


# -- small parts ------------------------------------------------------------------------------------------------------
def sha256_of(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _write_durably(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def _dump(obj) -> str:
    # file names that are not UTF-8 travel as \udcXX escapes, which Python's json reads back as the same name
    return json.dumps(obj, indent=1, ensure_ascii=True)


class _Log:
    """The batch's append-only log: one event per line, fsynced as written."""

    def __init__(self, path: Path):
        self.path = path

    def events(self) -> list[list]:
        if not self.path.exists():
            return []
        out = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:  # the torn last line of a killed run: that step is not recorded
                break
        return out

    def add(self, *event) -> None:
        new = not self.path.exists()
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(list(event), ensure_ascii=True) + "\n")
            f.flush()
            os.fsync(f.fileno())
        if new:  # the log's own name durable too: a lost "undone" would read as a batch still to finish
            fsync_dir(self.path.parent)


class Batch:
    """One journaled batch: its plan (``moves-<time>.json``), its rows (``…rows.json``) and its log (``….log``)."""

    def __init__(self, plan_path: Path):
        self.plan_path = plan_path
        self.name = plan_path.name[: -len(".json")]
        self.rows_path = plan_path.with_name(self.name + ".rows.json")
        self.log = _Log(plan_path.with_name(self.name + ".log"))
        self.plan = json.loads(plan_path.read_text(encoding="utf-8"))

    @property
    def moves(self) -> list[dict]:
        return self.plan["moves"]

    def state(self) -> str:
        """moving (interrupted), moved, undoing (an undo interrupted) or undone."""
        state = "moving"
        for ev in self.log.events():
            if ev[0] in ("moved", "undoing", "undone"):
                state = ev[0]
        return state

    def done(self, kind: str) -> set[int]:
        return {ev[1] for ev in self.log.events() if ev[0] == kind}

    def rows(self) -> list[dict]:
        return json.loads(self.rows_path.read_text(encoding="utf-8"))["rows"]


def batches(index_dir: str | os.PathLike) -> list[Batch]:
    """Every journaled batch of this index, oldest first."""
    folder = Path(index_dir) / FOLDER
    if not folder.is_dir():
        return []
    return [Batch(p) for p in sorted(folder.glob("moves-*.json")) if not p.name.endswith(".rows.json")]


def pending(index_dir: str | os.PathLike) -> tuple[Batch, str] | None:
    """The interrupted batch and its state (``moving`` or ``undoing``), if any (read without the lock: for hints)."""
    for b in reversed(batches(index_dir)):
        s = b.state()
        if s in ("moving", "undoing"):
            return b, s
    return None


def _same_file(a: str, b: str) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def _transfer(src: str, dst: str, sha: str) -> None:
    """``src`` to ``dst``, never over an existing file: a hard link then an unlink within a file system, else a copy
    fsynced and checked against ``sha`` before ``src`` goes."""
    Path(dst).parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)  # refuses an existing dst (a rename would replace it)
    except FileExistsError:
        raise MoveError(f"{dst}: a file is already there; nothing is moved over a file") from None
    except OSError as e:
        if e.errno == errno.EXDEV:  # another file system
            _copy_verified(src, dst, sha)
        elif e.errno in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK, errno.ENOSYS):
            if os.path.lexists(dst):  # a file system without hard links: rename after the check
                raise MoveError(f"{dst}: a file is already there; nothing is moved over a file") from None
            os.rename(src, dst)
            fsync_dir(Path(dst).parent)
            fsync_dir(Path(src).parent)
            return
        else:
            raise
    fsync_dir(Path(dst).parent)
    os.unlink(src)
    fsync_dir(Path(src).parent)


def _copy_verified(src: str, dst: str, sha: str) -> None:
    tmp = str(Path(dst).with_name("." + Path(dst).name + TEMP_SUFFIX))
    if os.path.lexists(tmp):
        os.unlink(tmp)
    shutil.copy2(src, tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    if sha256_of(tmp) != sha:
        os.unlink(tmp)
        raise MoveError(f"{dst}: the copy does not match the original (sha256); {src} is left where it was")
    try:
        os.link(tmp, dst)
    except FileExistsError:
        os.unlink(tmp)
        raise MoveError(f"{dst}: a file is already there; nothing is moved over a file") from None
    os.unlink(tmp)


def _finish_one(src: str, dst: str, sha: str) -> str:
    """Bring one file from ``src`` to ``dst`` from whatever state a killed run left: 'moved', 'already' (it was
    there), 'changed' (``src`` no longer holds the batch's bytes: left as it is) or 'gone' (neither holds it)."""
    tmp = Path(dst).with_name("." + Path(dst).name + TEMP_SUFFIX)
    if tmp.exists():
        tmp.unlink()  # a copy never finished: the original is still at src
    s, d = os.path.lexists(src), os.path.lexists(dst)
    if s and d:
        if _same_file(src, dst) or (sha256_of(dst) == sha and sha256_of(src) == sha):
            os.unlink(src)  # linked or copied, the original not yet removed
            fsync_dir(Path(src).parent)
            return "moved"
        raise MoveError(f"{dst}: a different file is already there; nothing is moved over a file")
    if d:
        return "already"
    if not s:
        return "gone"
    if sha256_of(src) != sha:
        return "changed"
    _transfer(src, dst, sha)
    return "moved"


# -- planning and moving ------------------------------------------------------------------------------------------------
def plan_moves(store, groups: Iterable, dest_dir: str | os.PathLike) -> tuple[list[dict], list[dict], str]:
    """(moves, skipped, root): each non-keeper of ``groups`` once, checked against its row and its file; ``root`` the
    common folder of the moved photos, whose layout ``dest_dir`` keeps. Raises when a target exists."""
    keepers = {g.keeper.path for g in groups}
    seen: set[str] = set()
    wanted = []
    for g in groups:
        for m in g.members:
            if m.keeper or m.path in keepers or m.path in seen:
                continue
            seen.add(m.path)
            wanted.append((g.id, m))
    rows = store.rows_by_ids([m.row_id for _, m in wanted])
    moves, skipped = [], []
    for gid, m in wanted:
        row = rows.get(m.row_id)
        if row is None or row.path != m.path:
            skipped.append({"path": m.path, "reason": "no longer in the index"})
            continue
        if not os.path.isfile(m.path):
            skipped.append({"path": m.path, "reason": "not found"})
            continue
        sha = sha256_of(m.path)
        if sha != row.sha256:
            skipped.append({"path": m.path, "reason": "changed since it was indexed"})
            continue
        moves.append({"group": gid, "source": m.path, "sha256": sha, "size": os.path.getsize(m.path),
                      "rows": [int(m.row_id)]})
    if not moves:
        return [], skipped, ""
    dest = Path(dest_dir).expanduser().absolute()
    root = os.path.commonpath([os.path.dirname(mv["source"]) for mv in moves])
    for mv in moves:
        mv["target"] = str(dest / os.path.relpath(mv["source"], root))
        if os.path.lexists(mv["target"]):
            raise MoveError(f"{mv['target']}: a file is already there; nothing was moved (choose another --move-to "
                            "folder, or move that file away)")
    return moves, skipped, root


MOVABLE = ("exact", "near")  # the tiers whose non-keepers --move-to moves


def move_non_keepers(index_dir: str | os.PathLike, groups: Sequence, dest_dir: str | os.PathLike, *, store=None,
                     progress: Progress = None) -> dict:
    """Move the non-keepers of ``groups`` (retrieval/curate/duplicates.py) to ``dest_dir`` and take their rows out of
    the index, journaled (see the module docstring). ``store``: the index opened writable (else opened here). An
    interrupted earlier batch is completed first (under ``completed`` in the answer). Only exact copies and
    near-duplicates move: a similar shot is another photo, never moved for being like one."""
    groups = [g for g in groups if g.tier in MOVABLE]
    own = store is None
    store = store or _open_writable(index_dir)
    try:
        completed = _complete_interrupted(store, progress)
        moves, skipped, root = plan_moves(store, groups, dest_dir)
        if completed:  # the groups were found before it finished: its photos are no news
            gone = {f["source"] for f in completed["files"]}
            skipped = [s for s in skipped if s["path"] not in gone]
        answer = {"moved": 0, "bytes": 0, "dest": str(Path(dest_dir).expanduser().absolute()), "root": root,
                  "skipped": skipped, "rows_removed": 0, "batch": None, "files": [], "completed": completed}
        if not moves:
            return answer
        batch = _write_batch(store, moves, answer["dest"], root)
        answer.update(_run_forward(store, batch, progress))
        answer["batch"] = str(batch.plan_path)
        answer["skipped"] = skipped + answer["skipped"]
        return answer
    finally:
        if own:
            store.close()


def _open_writable(index_dir):
    from retrieval.index.store import IndexStore

    return IndexStore.open(index_dir, writable=True, what="retrieve duplicates")


def _write_batch(store, moves: list[dict], dest: str, root: str) -> Batch:
    folder = Path(store.directory) / FOLDER
    folder.mkdir(exist_ok=True)
    ns = time.time_ns()
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(ns // 10**9)) + f".{ns % 10**9 // 1000:06d}Z"
    name = f"moves-{stamp}"
    rows = store.rows_by_ids([i for mv in moves for i in mv["rows"]])
    saved = [{c: (base64.b64encode(bytes(getattr(r, c))).decode("ascii") if c == "vector" else getattr(r, c))
              for c in COLUMNS} for r in rows.values()]
    _write_durably(folder / f"{name}.rows.json", _dump({"columns": list(COLUMNS), "rows": saved}))
    made = set()  # the folders the batch will make (an undo removes them again when empty)
    for mv in moves:
        d = Path(mv["target"]).parent
        while not d.exists():
            made.add(str(d))
            d = d.parent
    plan = {"format": FORMAT, "version": 1, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "index": str(store.directory), "dest": dest, "root": root, "made": sorted(made), "moves": moves}
    _write_durably(folder / f"{name}.json", _dump(plan))  # the write-ahead record: before the first move
    return Batch(folder / f"{name}.json")


def _run_forward(store, batch: Batch, progress: Progress) -> dict:
    """Move (or finish moving) every file of ``batch``, then take the moved photos' rows out of the index."""
    done, passed = batch.done("move"), batch.done("skip")
    moved, skipped, files, nbytes = [], [], [], 0
    total = len(batch.moves)
    for i, mv in enumerate(batch.moves):
        if i not in done and i not in passed:
            try:
                outcome = _finish_one(mv["source"], mv["target"], mv["sha256"])
            except MoveError as e:  # a file put in the way since the plan, a copy that does not verify: left alone
                outcome = str(e)
            except OSError as e:  # the disk full, a folder not writable: the batch stays open, with the ways out
                raise MoveError(_interrupted(store, mv["source"], e, batch)) from None
            if outcome not in ("moved", "already"):
                batch.log.add("skip", i)
                skipped.append({"path": mv["source"], "reason": {"changed": "changed since it was planned",
                                                                 "gone": "gone from its folder"}.get(outcome, outcome)})
            else:
                batch.log.add("move", i)
                done.add(i)
        if i in done:
            moved.append(mv)
            files.append({"source": mv["source"], "target": mv["target"]})
            nbytes += mv["size"]
        if progress:
            progress(i + 1, total)
    ids = [r for mv in moved for r in mv["rows"]]
    removed = _remove_rows(store, ids)
    batch.log.add("moved")
    return {"moved": len(moved), "bytes": nbytes, "files": files, "skipped": skipped, "rows_removed": removed}


def _interrupted(store, path: str, e: OSError, batch: Batch) -> str:
    q = _q(store.directory)
    return (f"{path}: cannot move it ({e.strerror or e}); the batch is interrupted: `retrieve duplicates --index {q} "
            f"--undo` puts back what moved, `retrieve duplicates --index {q} --move-to {_q(batch.plan['dest'])}` "
            "finishes it")


def _remove_rows(store, ids: list[int]) -> int:
    present = list(store.rows_by_ids(ids))
    if present:
        store.faiss_index()  # loaded before the rows change (IndexStore.apply)
        store.delete_rows(present)
        store.apply(present)
        _finalise(store)
    return len(present)


def _finalise(store) -> None:
    store.update_mean()
    store.save_faiss()
    store.mark_updated()


def _complete_interrupted(store, progress: Progress) -> dict | None:
    """Finish a batch a killed run left half-moved (the re-run of ``--move-to``); an interrupted undo must be finished
    by ``--undo``."""
    for b in reversed(batches(store.directory)):
        s = b.state()
        if s == "undoing":
            raise MoveError(f"an undo of the batch {b.plan_path} was interrupted; finish it first: "
                            f"retrieve duplicates --index {_q(store.directory)} --undo")
        if s == "moving":
            return {"batch": str(b.plan_path), **_run_forward(store, b, progress)}
    return None


# -- undoing ----------------------------------------------------------------------------------------------------------
def undo_last(index_dir: str | os.PathLike, *, store=None, progress: Progress = None) -> dict:
    """Reverse the latest batch that is not undone: every moved file back to its path (sha256 checked), its rows back
    in the index as they were. ``{"batch": None}`` when no batch is left to undo. Refuses, before moving anything,
    when a file has reappeared at an original path."""
    own = store is None
    store = store or _open_writable(index_dir)
    try:
        todo = [b for b in batches(store.directory) if b.state() != "undone"]
        if not todo:
            return {"batch": None, "restored": 0, "rows_restored": 0, "lost": [], "left": 0}
        batch = todo[-1]
        _check_undo(batch)
        if batch.state() != "undoing":
            batch.log.add("undoing")
        restored, lost = [], []
        back, moved, skipped = batch.done("back"), batch.done("move"), batch.done("skip")
        for n, (i, mv) in enumerate(enumerate(batch.moves)):
            if i in back:
                restored.append(mv)
            elif i in skipped or (i not in moved and not os.path.lexists(mv["target"])):
                pass  # never moved: the photo is where it was, its rows in the index
            else:
                try:
                    outcome = _finish_one(mv["target"], mv["source"], mv["sha256"])
                except OSError as e:
                    raise MoveError(f"{mv['source']}: cannot put it back ({e.strerror or e}); the undo is interrupted: "
                                    f"once that is mended, retrieve duplicates --index {_q(store.directory)} --undo "
                                    "finishes it") from None
                if outcome in ("moved", "already"):
                    if sha256_of(mv["source"]) != mv["sha256"]:
                        raise MoveError(f"{mv['source']}: restored, but its bytes differ from the photo moved "
                                        "(sha256); the batch stays open")
                    batch.log.add("back", i)
                    restored.append(mv)
                elif outcome == "gone":
                    lost.append(mv["source"])
                else:  # the copy under DEST no longer holds the photo's bytes
                    lost.append(mv["source"])
            if progress:
                progress(n + 1, len(batch.moves))
        rows = _restore_rows(store, batch, {mv["source"] for mv in restored})
        batch.log.add("undone")
        _remove_empty_dirs(batch)
        return {"batch": str(batch.plan_path), "restored": len(restored), "rows_restored": rows, "lost": lost,
                "files": [{"source": mv["target"], "target": mv["source"]} for mv in restored],
                "left": len(todo) - 1}
    finally:
        if own:
            store.close()


def _check_undo(batch: Batch) -> None:
    """Refuse, before anything moves, when a file has reappeared at a path the batch would restore."""
    moved, back = batch.done("move"), batch.done("back")
    for i, mv in enumerate(batch.moves):
        if i in back or not os.path.lexists(mv["source"]):
            continue
        if i not in moved and not os.path.lexists(mv["target"]):
            continue  # never moved: the photo is where it was
        if i not in moved and os.path.lexists(mv["target"]) and (
                _same_file(mv["source"], mv["target"]) or sha256_of(mv["source"]) == mv["sha256"]):
            continue  # a move killed between its copy and the removal of the original
        if not os.path.lexists(mv["target"]) and sha256_of(mv["source"]) == mv["sha256"]:
            continue  # put back by hand, the same bytes: nothing to restore but its rows
        raise MoveError(f"{mv['source']}: a file has reappeared at this path; nothing was restored (move it away, "
                        f"then undo again: the photo moved from there is {mv['target']})")


def _restore_rows(store, batch: Batch, paths: set[str]) -> int:
    """The saved rows of the photos back at ``paths``, with their ids and embeddings, unless already there."""
    saved = [r for r in batch.rows() if r["path"] in paths]
    have = store.rows_by_ids([r["id"] for r in saved])
    values = [{**r, "vector": base64.b64decode(r["vector"])} for r in saved
              if r["id"] not in have and store.row_by_path(r["path"]) is None]  # (indexed again meanwhile: kept)
    if not values:
        return 0
    store.faiss_index()  # loaded before the rows change (IndexStore.apply)
    ids = store.insert_rows(values)
    kept = np.intersect1d(store.removed_ids(), ids)  # an index that cannot remove (HNSW) still holds them
    if len(kept) or store.settings.index_type == "flat":  # flat: rebuilt in id order, so equal scores rank as before
        store.rebuild_faiss()
    else:
        store.apply((), ids, np.stack([np.frombuffer(v["vector"], np.float32) for v in values]))
    _finalise(store)
    return len(values)


def _remove_empty_dirs(batch: Batch) -> None:
    """The folders the batch made (DEST and below) that are empty again, deepest first."""
    for d in sorted(batch.plan.get("made", []), key=lambda p: -len(Path(p).parts)):
        try:
            os.rmdir(d)
        except OSError:
            pass


def _q(p) -> str:
    import shlex

    return shlex.quote(str(p))
