"""The catalogue role: the folders of an index that hold clean reference images (a shop's product shots).

``retrieve index CATALOGUE --preset instance --catalogue`` records CATALOGUE's real path in the index
(setting ``catalogue``; more folders add to it). A search of a mixed index (catalogue and field photos)
then verifies, beside the global top K and the inverted file's top W, the top N *catalogue* images by
the global embedding and the top N by the inverted file (``search --catalogue N``): a phone photo whose
clutter ranks other phone photos ahead of its own clean catalogue image still gets that image verified,
so "which catalogue item is this?" is answered as well from the mixed index as with ``--within``
(bench/results/quality.md, "Photo → catalogue"). The role is a property of paths, not of rows: images
added later under a catalogue folder are catalogue images, and nothing is stored per row.
"""
from __future__ import annotations

import os
from typing import TYPE_CHECKING, Iterable

import numpy as np

if TYPE_CHECKING:
    from retrieval.index.store import IndexStore

KEY = "catalogue"
DEPTH = 3  # catalogue candidates per stage (global, words) verified by default on an index with a catalogue
# (20 with tf-idf words; with ASMK* words the photo→catalogue R@1 is the same at 5 and at 3, for 4 fewer pairs a
# query: bench/results/quality.md)


def folders(store: "IndexStore") -> list[str]:
    """The catalogue folders (real paths) the index records; [] when it has none."""
    v = store.get_value(KEY)
    return [str(p) for p in v] if isinstance(v, list) else []


def default_depth(store: "IndexStore", verify: int) -> int:
    """The catalogue candidates per stage a search verifies when not told (``search`` without ``--catalogue``,
    the web app): ``DEPTH`` on an index with catalogue folders, when it verifies; else 0."""
    return DEPTH if verify and folders(store) else 0


def record(store: "IndexStore", paths: Iterable[str | os.PathLike]) -> list[str]:
    """Add ``paths`` (folders or image files, by real path) to the index's catalogue; the whole list."""
    have = folders(store)
    for p in paths:
        real = os.path.realpath(p)
        if real not in have:
            have.append(real)
    store.set_value(KEY, have)
    return have


def ids(store: "IndexStore", roots: Iterable[str] | None = None) -> np.ndarray:
    """The sorted ids of the indexed images under the catalogue folders (or equal to a catalogue file)."""
    roots = list(folders(store) if roots is None else roots)
    if not roots:
        return np.zeros(0, np.int64)
    from retrieval.names import ESCAPED, from_db, to_db

    prefixes = tuple(r.rstrip(os.sep) + os.sep for r in roots)
    exact = set(roots)
    if any(to_db(p) != p for p in prefixes + tuple(exact)):  # a folder name stored escaped (retrieval/names.py)
        found = [i for i, path, _ in store.row_paths() if path.startswith(prefixes) or path in exact]
        return np.unique(np.asarray(found, np.int64))
    # by the database, without reading every row's path (a fresh process's query on a 100 k catalogue read them
    # all); names stored escaped are decoded and compared here (no plain name starts with ESCAPED)
    where, params = [], {"esc": ESCAPED, "n_esc": len(ESCAPED)}
    for k, p in enumerate(prefixes):
        where.append(f"substr(path, 1, :n{k}) = :p{k}")
        params.update({f"n{k}": len(p), f"p{k}": p})
    for k, e in enumerate(exact):
        where.append(f"path = :e{k}")
        params[f"e{k}"] = e
    found = [i for (i,) in store.query(f"SELECT id FROM images WHERE {' OR '.join(where)}", params)]
    found += [i for i, path in store.query("SELECT id, path FROM images WHERE substr(path, 1, :n_esc) = :esc", params)
              if from_db(path).startswith(prefixes) or from_db(path) in exact]
    return np.unique(np.asarray(found, np.int64))
