"""``retrieve check``: is the index consistent with itself and with the files? ``--repair`` restores it.

The rows are the truth and the vector file a cache of them (retrieval/index/vectors.py). A vector file that
trails the rows — images committed after it was last written, removals not yet applied, a fingerprint
from before the head was re-fitted — is the normal state after an interrupted run: every open brings
it up to date in memory and the next ``retrieve index`` writes it. ``check`` reports it and exits 0.
What does not heal by itself: a damaged vector file, damaged stored embeddings, files gone from disk.

Files gone from disk are of two kinds, told apart by their folder (:func:`missing_folders`). A file missing from a
folder that still holds others of the index's photos was deleted: ``--repair`` drops its row. Files whose folder
is gone, or whose folder holds none of its indexed photos any more (an unmounted drive leaves an empty mount
point), may come back — a drive unplugged, a share disconnected: ``--repair`` keeps their rows unless asked to
prune them (``prune_missing``), and the report names each such folder.
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field

import numpy as np

from retrieval.index.store import IndexStore
from retrieval.index.vectors import file_state

PROBLEM_STATES = ("unreadable", "wrong dimension", "damaged")  # damaged: a shard file (index type sharded)


@dataclass
class CheckReport:
    index: str
    images: int = 0
    vectors: int = 0  # in the FAISS file on disk
    faiss_file: str = "ok"  # ok | missing | stale | unreadable | wrong dimension
    rows_without_vector: list = field(default_factory=list)  # ids (committed after the file was written)
    vectors_without_row: list = field(default_factory=list)  # ids (removed since; HNSW keeps them until a rebuild)
    bad_embeddings: list = field(default_factory=list)  # ids whose stored embedding is damaged
    missing_files: list = field(default_factory=list)  # paths
    missing_folders: list = field(default_factory=list)  # MissingFolder as dicts: files kept unless pruned
    vector_problems: list = field(default_factory=list)  # index type sharded: each bad shard file, in words
    words_file: str = "none"  # the visual words (words.npz): none | ok | stale (behind the rows) | damaged
    repaired: list = field(default_factory=list)  # what --repair did, in words

    @property
    def consistent(self) -> bool:
        return (self.faiss_file not in PROBLEM_STATES and not self.bad_embeddings and not self.missing_files
                and self.words_file != "damaged")

    @property
    def trailing(self) -> bool:
        """The vector file is behind the rows (healed at the next open, written by the next run)."""
        return (self.faiss_file == "stale" or (self.faiss_file == "missing" and self.images > 0)
                or bool(self.rows_without_vector) or bool(self.vectors_without_row))

    def pending(self) -> list[str]:
        """The self-healing differences, in words."""
        out = []
        if self.faiss_file == "stale":
            out.append("the vector file was made for another head or by an interrupted run: it is rebuilt from "
                       "the rows when the index is next opened")
        elif self.faiss_file == "missing" and self.images:
            out.append("no vector file yet: it is built from the rows when the index is next opened")
        else:
            if self.rows_without_vector:
                out.append(f"{len(self.rows_without_vector)} images committed after the vector file was written")
            if self.vectors_without_row:
                out.append(f"{len(self.vectors_without_row)} removed images still in the vector file "
                           "(never returned by a search)")
        return out

    @property
    def deleted_files(self) -> list[str]:
        """The missing files that were deleted (their folder holds others of the index's photos): --repair drops
        them."""
        away = {p for g in self.missing_folders for p in g["paths"]}
        return [p for p in self.missing_files if p not in away]

    def problems(self) -> list[str]:
        """Everything that keeps the index from agreeing with itself and the files, in words."""
        return self.damage() + self.away()

    def away(self) -> list[str]:
        """Each missing folder (photos that may come back), in words; --repair keeps them."""
        return [describe_folder(g) for g in self.missing_folders]

    def damage(self) -> list[str]:
        """What --repair mends, in words: the vector file, stored embeddings, deleted files."""
        out = []
        if self.faiss_file in PROBLEM_STATES:
            out.append(f"vector file {self.faiss_file}")
        out += self.vector_problems
        if self.words_file == "damaged":
            out.append("visual-words file damaged (words.npz: it fails its checksums or does not fit together)")
        if self.bad_embeddings:
            out.append(f"{len(self.bad_embeddings)} stored embeddings are damaged")
        deleted = self.deleted_files
        out += [f"missing file: {p}" for p in deleted[:SHOWN_FILES]]
        if len(deleted) > SHOWN_FILES:
            out.append(f"… and {len(deleted) - SHOWN_FILES} more missing files (--json lists them all)")
        return out

    def to_dict(self) -> dict:
        d = asdict(self)
        d["consistent"] = self.consistent
        d["trailing"] = self.trailing
        d["pending"] = self.pending()
        d["problems"] = self.problems()
        d["deleted_files"] = self.deleted_files
        return d


SHOWN_FILES = 20  # missing files named one by one in the text report


def describe_folder(g: dict) -> str:
    """One missing folder in words: how many photos, where, and why they may come back."""
    n = g["photos"] if "photos" in g else len(g["paths"])
    photos = f"{n} photo{'s' if n != 1 else ''}"
    if g["exists"]:
        return (f"{photos} in {g['folder']}: none of the folder's indexed photos is there "
                "(the empty mount point of an unmounted drive?)")
    return f"{photos} under {g['folder']}: the folder is missing (an unmounted drive or a disconnected share?)"


def missing_folders(missing: list[str], present: list[str]) -> list[dict]:
    """The missing files whose folder is away, grouped by that folder: ``{"folder", "exists", "paths"}``.

    A missing file whose folder still holds one of the index's ``present`` files was deleted, and belongs to no
    group. Else its folder is away: the topmost folder missing on its path, under the nearest folder that exists
    (``exists`` False: /mnt/usb/photos for /mnt/usb/photos/2020/a.jpg when /mnt/usb is an empty mount point), or
    its own folder when that exists but holds none of its indexed files (``exists`` True).
    """
    occupied = {os.path.dirname(p) for p in present}
    is_dir: dict[str, bool] = {}

    def exists(d: str) -> bool:
        if d not in is_dir:
            is_dir[d] = os.path.isdir(d)
        return is_dir[d]

    groups: dict[str, dict] = {}
    for p in dict.fromkeys(missing):  # (a faces index has a row per face: each photo once)
        folder = os.path.dirname(p)
        if folder in occupied:
            continue
        if exists(folder):
            key, there = folder, True
        else:
            key = folder
            while os.path.dirname(key) != key and not exists(os.path.dirname(key)):
                key = os.path.dirname(key)
            there = False
        groups.setdefault(key, {"folder": key, "exists": there, "paths": []})["paths"].append(p)
    return sorted(groups.values(), key=lambda g: g["folder"])


def check_index(directory: str | os.PathLike) -> CheckReport:
    """Read-only verification of an index directory."""
    import faiss

    with IndexStore.open(directory) as store:
        st = store.settings
        rep = CheckReport(index=str(store.directory))
        rows = store.embedding_sizes()
        rep.images = len(rows)
        rep.words_file = _words_state(store)
        ids = np.array([r[0] for r in rows], np.int64)
        rep.bad_embeddings = [int(r[0]) for r in rows if r[2] != st.dim * 4]
        found = [os.path.isfile(r[1]) for r in rows]
        rep.missing_files = [r[1] for r, f in zip(rows, found) if not f]
        if rep.missing_files:
            rep.missing_folders = missing_folders(rep.missing_files, [r[1] for r, f in zip(rows, found) if f])
        if st.index_type == "sharded":  # shard files with checksums instead of vectors.faiss
            from retrieval.index.sharded import check_state

            sh = check_state(store, full=True)
            rep.faiss_file, rep.vectors, rep.vector_problems = sh["state"], sh["count"], sh["problems"]
            if sh["state"] == "ok":
                rep.rows_without_vector = np.setdiff1d(ids, sh["ids"]).tolist()
                rep.vectors_without_row = np.setdiff1d(sh["ids"], ids).tolist()
            return rep
        state, index, _ = file_state(store)
        rep.faiss_file = state
        if index is not None:
            rep.vectors = index.ntotal
        if state == "ok":
            have = faiss.vector_to_array(index.id_map) if index.ntotal else np.zeros(0, np.int64)
            rep.rows_without_vector = np.setdiff1d(ids, have).tolist()
            rep.vectors_without_row = np.setdiff1d(have, ids).tolist()
        return rep


def _words_state(store: IndexStore) -> str:
    """The visual-words file's state (retrieval/match/words.py file_state), read whole; ``none`` without one. A stale
    file (behind the rows, or made with other settings) is brought up to date by the next run or search."""
    from retrieval.match import words
    from retrieval.match.verify import Verifier

    if not (store.directory / words.META_NAME).exists() and not (store.directory / words.WORDS_NAME).exists():
        return "none"
    state = words.file_state(store, Verifier.for_index(store.settings))
    return "stale" if state == "missing" else state


def repair_index(directory: str | os.PathLike, reembed=None, prune_missing: bool = False) -> CheckReport:
    """Restore consistency: rows with damaged embeddings are re-embedded when their file exists (``reembed(settings)``
    gives the function ``paths -> vectors`` for the index, or None: indexer/run.py repair_index passes the indexer's),
    else dropped; rows of deleted files are dropped, rows of files whose folder is away (see the module docstring)
    only with ``prune_missing``; the FAISS file is rebuilt from the rows. Returns the report of the state before,
    with ``repaired`` filled in."""
    rep = check_index(directory)
    with IndexStore.open(directory, writable=True, what="retrieve check --repair") as store:
        deleted = set(rep.deleted_files)
        away = {p for g in rep.missing_folders for p in g["paths"]}
        drop = deleted | (away if prune_missing else set())
        bad = [(r.id, r.path) for r in store.rows_by_ids(rep.bad_embeddings).values()]
        fixable = [(i, p) for i, p in bad if p not in drop and os.path.isfile(p)]
        embed = reembed(store.settings) if fixable and reembed is not None else None  # None: a faces index
        if embed is not None:
            vecs = embed([p for _, p in fixable])
            store.set_vectors([i for i, _ in fixable], vecs)
            rep.repaired.append(f"re-embedded {len(fixable)} images with damaged embeddings")
        damaged = set() if embed is not None else {p for _, p in fixable}
        damaged |= {p for _, p in bad if p not in drop and not os.path.isfile(p)}  # unusable: no vector to search
        if deleted:
            rep.repaired.append(f"dropped {_photos(len(deleted))} whose file{'s were' if len(deleted) > 1 else ' was'} "
                                "deleted (from folders that still hold the index's other photos)")
        if prune_missing and away:
            rep.repaired.append(f"dropped {_photos(len(away))} in missing folders (--prune-missing): "
                                + ", ".join(g["folder"] for g in rep.missing_folders))
        if damaged:
            rep.repaired.append(f"dropped {_photos(len(damaged))} with damaged embeddings that could not be embedded "
                                "again now (indexing their folder again adds them back)")
        drop |= damaged
        if drop:
            store.delete_rows([i for i, p, _ in store.embedding_sizes() if p in drop])
        if rep.words_file == "damaged":
            from retrieval.match import words

            for name in (words.WORDS_NAME, words.META_NAME):
                (store.directory / name).unlink(missing_ok=True)
            words.update_index(store)  # (from the rows' local features, cached per content)
            rep.repaired.append("made the visual-words file again from the rows' local features")
        if (rep.faiss_file in PROBLEM_STATES or rep.bad_embeddings or rep.missing_files or rep.trailing
                or drop):  # (not for a damaged words file alone)
            store.rebuild_faiss()
            store.update_mean()
            store.save_faiss()
            rep.repaired.append(f"rebuilt the vector file from {store.count()} stored embeddings")
    return rep


def _photos(n: int) -> str:
    return f"{n} photo{'s' if n != 1 else ''}"
