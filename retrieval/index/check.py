"""``retrieve check``: is the index consistent with itself and with the files? ``--repair`` restores it.

The rows are the truth and the vector file a cache of them (retrieval/index/vectors.py). A vector file that
trails the rows — images committed after it was last written, removals not yet applied, a fingerprint
from before the head was re-fitted — is the normal state after an interrupted run: every open brings
it up to date in memory and the next ``retrieve index`` writes it. ``check`` reports it and exits 0.
What does not heal by itself: a damaged vector file, damaged stored embeddings, files gone from disk.
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
    vector_problems: list = field(default_factory=list)  # index type sharded: each bad shard file, in words
    repaired: list = field(default_factory=list)  # what --repair did, in words

    @property
    def consistent(self) -> bool:
        return self.faiss_file not in PROBLEM_STATES and not self.bad_embeddings and not self.missing_files

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

    def problems(self) -> list[str]:
        out = []
        if self.faiss_file in PROBLEM_STATES:
            out.append(f"vector file {self.faiss_file}")
        out += self.vector_problems
        if self.bad_embeddings:
            out.append(f"{len(self.bad_embeddings)} stored embeddings are damaged")
        out += [f"missing file: {p}" for p in self.missing_files]
        return out

    def to_dict(self) -> dict:
        d = asdict(self)
        d["consistent"] = self.consistent
        d["trailing"] = self.trailing
        d["pending"] = self.pending()
        d["problems"] = self.problems()
        return d


def check_index(directory: str | os.PathLike) -> CheckReport:
    """Read-only verification of an index directory."""
    import faiss

    with IndexStore.open(directory) as store:
        st = store.settings
        rep = CheckReport(index=str(store.directory))
        rows = store.embedding_sizes()
        rep.images = len(rows)
        ids = np.array([r[0] for r in rows], np.int64)
        rep.bad_embeddings = [int(r[0]) for r in rows if r[2] != st.dim * 4]
        rep.missing_files = [r[1] for r in rows if not os.path.isfile(r[1])]
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


def repair_index(directory: str | os.PathLike, reembed=None) -> CheckReport:
    """Restore consistency: rows with damaged embeddings are re-embedded when their file exists (``reembed(settings)``
    gives the function ``paths -> vectors`` for the index, or None: indexer/run.py repair_index passes the indexer's),
    else dropped; rows of vanished files are dropped; the FAISS file is rebuilt from the rows. Returns the report of
    the state before, with ``repaired`` filled in."""
    rep = check_index(directory)
    with IndexStore.open(directory, writable=True, what="retrieve check --repair") as store:
        drop = set(rep.missing_files)
        bad = [(r.id, r.path) for r in store.rows_by_ids(rep.bad_embeddings).values()]
        fixable = [(i, p) for i, p in bad if p not in drop and os.path.isfile(p)]
        embed = reembed(store.settings) if fixable and reembed is not None else None  # None: a faces index
        if embed is not None:
            vecs = embed([p for _, p in fixable])
            store.set_vectors([i for i, _ in fixable], vecs)
            rep.repaired.append(f"re-embedded {len(fixable)} images with damaged embeddings")
        else:
            drop |= {p for _, p in fixable}
        drop |= {p for i, p in bad if not os.path.isfile(p)}
        if drop:
            store.delete_rows([i for i, p, _ in store.embedding_sizes() if p in drop])
            rep.repaired.append(f"dropped {len(drop)} images whose files are gone or unreadable")
        if not rep.consistent or rep.trailing or drop:
            store.rebuild_faiss()
            store.update_mean()
            store.save_faiss()
            rep.repaired.append(f"rebuilt the vector file from {store.count()} stored embeddings")
    return rep
