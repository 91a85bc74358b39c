"""Change detection for ``retrieve index``, pure: no model, no database, no file reads.

:func:`plan_changes` compares the files a scan found with the rows the index holds:

- **unchanged**: a row with the same path, size and mtime — nothing to do;
- **new**: no row at that path; **changed**: a row at that path, but another size or mtime;
- **known bad**: recorded as undecodable earlier and unchanged since — not retried;
- **vanished**: rows whose file is gone from the scanned trees (rows outside them are left alone).

New and changed files are then read and hashed (by the indexer, in threads); :meth:`ChangePlan.classify`
says what their content hash means — the same content at the same path (*touched*: the row only gets
the new mtime), the content of a vanished row (*moved*: the row follows the file, keeping its id and
vector), content indexed elsewhere (*copied*: its vector is reused), or new content (*embed*). Vanished
rows that no file claims as moved are **removed** (:meth:`ChangePlan.removed`).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from operator import attrgetter
from typing import Any, Iterable, Mapping, Sequence


@dataclass
class ChangePlan:
    new: list = field(default_factory=list)  # FileEntry: no row at this path
    changed: list = field(default_factory=list)  # FileEntry: a row at this path, another size or mtime
    unchanged: list = field(default_factory=list)  # FileEntry
    known_bad: list = field(default_factory=list)  # FileEntry: undecodable before, unchanged since
    todo: list = field(default_factory=list)  # FileEntry: new and changed, in scan order (to read and hash)
    vanished: dict = field(default_factory=dict)  # content hash → rows whose file left the scanned trees
    rows: dict = field(default_factory=dict)  # path → row (every row the index held)
    by_hash: dict = field(default_factory=dict)  # content hash → id of a row with that content (when todo)

    def classify(self, path: str, sha256: str) -> tuple[str, Any]:
        """What a new or changed file's content means: ``("touched", row)``, ``("moved", None)`` (claim the row
        with :meth:`claim_move`), ``("copied", row_id)`` or ``("embed", None)``. Read-only (safe in threads)."""
        old = self.rows.get(path)
        if old is not None and old.sha256 == sha256:
            return "touched", old
        if self.vanished.get(sha256):
            return "moved", None
        if sha256 in self.by_hash:
            return "copied", self.by_hash[sha256]
        return "embed", None

    def claim_move(self, sha256: str):
        """The vanished row with this content, taken (so it is not removed and not claimed twice), or None."""
        rows = self.vanished.get(sha256)
        return rows.pop() if rows else None

    def removed(self) -> list:
        """The vanished rows no file claimed: they leave the index."""
        return [r for rs in self.vanished.values() for r in rs]


def _within(path: str, trees: Sequence[str]) -> bool:
    return any(path == t or path.startswith(t.rstrip(os.sep) + os.sep) for t in trees)


def plan_changes(files: Iterable, rows: Iterable, skipped: Mapping[str, Any] | None = None,
                 trees: Sequence[str] | None = None) -> ChangePlan:
    """Compare scanned ``files`` (``path``, ``size``, ``mtime_ns``) with index ``rows`` (``id``, ``path``,
    ``size``, ``mtime_ns``, ``sha256``); see the module docstring.

    ``skipped``: path → record (``size``, ``mtime_ns``) of files found undecodable before. ``trees``: the
    scanned folders (and files); only rows under them can vanish. None: every row not among ``files``.
    """
    skipped = skipped or {}
    plan = ChangePlan()
    rows = rows if isinstance(rows, (list, tuple)) else list(rows)
    plan.rows = dict(zip(map(attrgetter("path"), rows), rows))  # (C loops: 1 M rows re-scan in seconds)
    seen = set()
    get = plan.rows.get
    for e in files:
        seen.add(e.path)
        r = get(e.path)
        if r is not None:
            if r.size == e.size and r.mtime_ns == e.mtime_ns:
                plan.unchanged.append(e)
            else:
                plan.changed.append(e)
                plan.todo.append(e)
            continue
        bad = skipped.get(e.path)
        if bad is not None and (bad.size, bad.mtime_ns) == (e.size, e.mtime_ns):
            plan.known_bad.append(e)
        else:
            plan.new.append(e)
            plan.todo.append(e)
    if len(seen) < len(plan.rows) or not plan.rows.keys() <= seen:  # some rows' files were not found
        for p, r in plan.rows.items():
            if p not in seen and (trees is None or _within(p, trees)):
                plan.vanished.setdefault(r.sha256, []).append(r)
    if plan.todo:  # only new and changed files are classified by content
        plan.by_hash = dict(zip(map(attrgetter("sha256"), rows), map(attrgetter("id"), rows)))
    return plan
