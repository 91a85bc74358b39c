"""A photo index's rows through an indexing run (the local and the Ray pipelines alike): what the run must do against
the committed rows, and each kind of change committed in one transaction and mirrored in the vectors."""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from retrieval.scan import FileEntry

from .common import IndexReport
from .plan import ChangePlan, plan_changes


@dataclass
class Decoded:
    entry: FileEntry
    sha256: str = ""
    width: int = 0
    height: int = 0
    array: np.ndarray | None = None
    error: str | None = None
    reuse: str | None = None  # "touched" | "moved" | "copied": indexed without embedding (see ChangePlan.classify)


def plan_run(store, files: list[FileEntry], trees: list[str], report: IndexReport) -> ChangePlan:
    """What this run must do (indexer/plan.py) against the committed rows; the unchanged and known-bad files are
    counted in ``report``."""
    plan = plan_changes(files, store.files(), store.skipped(), trees)
    report.unchanged += len(plan.unchanged)
    report.skipped_before += len(plan.known_bad)
    return plan


def by_path(rows) -> dict[str, list[int]]:
    """Row ids by path (a faces index has several rows per photo)."""
    out: dict[str, list[int]] = {}
    for r in rows:
        out.setdefault(r.path, []).append(r.id)
    return out


def drop_vanished(store, vanished: dict[str, list[int]], present: list[str], report: IndexReport,
                  prune_missing: bool = False) -> None:
    """Rows of photos gone from the scanned folders (``vanished``: path → row ids) leave the index, except
    those whose folder is away (retrieval/index/check.py :func:`missing_folders`: a folder gone, or one that holds
    none of its indexed photos any more, as an unmounted drive's mount point): a drive unplugged or a share
    disconnected must not empty the index. They stay, named in ``report.kept_missing``, unless ``prune_missing``."""
    from retrieval.index.check import missing_folders

    if not vanished:
        return
    groups = [] if prune_missing else missing_folders(list(vanished), present)
    away = {p for g in groups for p in g["paths"]}
    report.kept_missing = [{"folder": g["folder"], "exists": g["exists"], "photos": len(g["paths"])} for g in groups]
    gone = [i for p, ids in vanished.items() if p not in away for i in ids]
    store.delete_rows(gone)
    store.apply(gone)
    report.removed = len(vanished) - len(away)


def record_skip(store, d: Decoded, rows: dict) -> None:
    """``d``'s file could not be read: remembered (not retried until it changes); a once-good file leaves the index."""
    old = rows.get(d.entry.path)
    replaced = [old.id] if old is not None else []
    store.record_skip(d.entry.path, d.entry.size, d.entry.mtime_ns, d.error, replaced)
    store.apply(replaced)


def reuse(store, d: Decoded, plan: ChangePlan, report: IndexReport) -> bool:
    """Index ``d`` without decoding it (touched, moved or copied content). False: must be embedded after all."""
    e = d.entry
    old = plan.rows.get(e.path)  # what was at this path before, if anything
    replaced = [old.id] if old is not None else []
    if d.reuse == "touched":  # same path, same content, new mtime
        store.update_file(old.id, e.path, e.size, e.mtime_ns)
        report.unchanged += 1
        return True
    src = plan.claim_move(d.sha256)
    if src is not None:  # moved: the row follows the file, keeping its id and vector
        store.update_file(src.id, e.path, e.size, e.mtime_ns, replace=replaced)
        store.apply(replaced)
        report.moved += 1
        return True
    src = store.rows_by_ids([plan.by_hash.get(d.sha256, -1)]).get(plan.by_hash.get(d.sha256, -1))
    if src is None:  # a copy of indexed content whose row went away meanwhile
        return False
    (new_id,) = store.insert_rows([{"path": e.path, "size": e.size, "mtime_ns": e.mtime_ns, "sha256": d.sha256,
                                    "width": src.width, "height": src.height, "vector": src.vector,
                                    "indexed_at": time.time()}], replace=replaced)
    store.apply(replaced, [int(new_id)], np.frombuffer(src.vector, np.float32)[None])
    report.indexed += 1
    return True


def commit_embedded(store, batch: list[Decoded], vecs: np.ndarray, rows: dict, report: IndexReport) -> None:
    """Commit ``batch`` with its embeddings ``vecs`` in one transaction (IndexStore.insert_rows: in bulk), replacing
    the rows its paths had, and mirror it in the vectors."""
    now = time.time()
    replaced = [rows[d.entry.path].id for d in batch if rows.get(d.entry.path) is not None]
    values = [{"path": d.entry.path, "size": d.entry.size, "mtime_ns": d.entry.mtime_ns, "sha256": d.sha256,
               "width": d.width, "height": d.height, "vector": v.tobytes(), "indexed_at": now}
              for d, v in zip(batch, vecs)]
    ids = store.insert_rows(values, replace=replaced)
    store.apply(replaced, ids, vecs)
    report.indexed += len(batch)


GROUP_SECONDS = 0.25  # rows that arrive within this long of the last commit wait for the next one
GROUP_MAX_ROWS = 4096  # the most rows one commit takes (its embeddings are held in memory until then)


class Commits:
    """Embedded rows committed in groups (commit_embedded), for a driver whose rows arrive faster than it could
    commit them one ``batch_size`` at a time (the Ray engine: a cluster's embeddings, one committing process).

    A group is committed once it holds ``batch_size`` rows and ``GROUP_SECONDS`` have passed since the last commit
    ended (or at ``GROUP_MAX_ROWS``): rows that come slowly are committed every ``batch_size`` as before, rows that
    come fast go in as many per transaction as came meanwhile, so the per-commit costs (a server's fsync and round
    trips, SQLAlchemy's transaction) stop bounding the rate. Crash safety is unchanged: what is committed stays,
    and a killed run loses at most the group not yet committed, which the next run embeds again."""

    def __init__(self, store, rows: dict, report: IndexReport, batch_size: int, advance):
        self.store, self.rows, self.report, self.batch_size, self.advance = store, rows, report, batch_size, advance
        self.batch: list[Decoded] = []
        self.vecs: list[np.ndarray] = []
        self.last = float("-inf")  # the first full batch is committed at once

    def add(self, d: Decoded, vec: np.ndarray) -> None:
        self.batch.append(d)
        self.vecs.append(vec)
        n = len(self.batch)
        if n >= GROUP_MAX_ROWS or (n >= self.batch_size and time.monotonic() - self.last >= GROUP_SECONDS):
            self.flush()

    def flush(self) -> None:
        """Commit what is waiting (nothing: no transaction)."""
        if self.batch:
            commit_embedded(self.store, self.batch, np.stack(self.vecs), self.rows, self.report)
            self.advance(len(self.batch))
            self.batch, self.vecs = [], []
        self.last = time.monotonic()
