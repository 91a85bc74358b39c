"""Issue 16's leftovers: `retrieve search` reads a plain SQLite index without SQLAlchemy (retrieval/litestore.py)
with the same answers and the same errors; the indexer commits rows in bulk; an unchanged run leaves the
vector file and the mean alone."""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from clitools import ROOT, run_process


@pytest.fixture(scope="module")
def small_index(photo_dir, tmp_path_factory):
    src = tmp_path_factory.mktemp("spphotos")
    for name in ("chelsea.jpg", "coffee.png", "astronaut.jpg", "rocket.png"):
        shutil.copy(photo_dir / name, src / name)
    shutil.copy(photo_dir / "more" / "cat_crop.jpg", src / "cat_crop.jpg")
    idx = tmp_path_factory.mktemp("sp") / "idx"
    r = run_process("index", src, "--index", idx, "--json", timeout=1200)
    assert r.returncode == 0, r.stderr
    return src, idx


def test_lite_store_answers_as_the_full_store(small_index):
    """Same settings, rows, vector file and search results (plain, --qe, --dba) through sqlite3 as through
    SQLAlchemy."""
    from retrieval.litestore import LiteStore, open_for_search
    from retrieval.search import Searcher
    from retrieval.store import IndexStore

    src, idx = small_index
    lite = open_for_search(idx)
    assert isinstance(lite, LiteStore)
    with lite, IndexStore.open(idx) as full:
        assert dataclasses.asdict(lite.settings) == dataclasses.asdict(full.settings)
        assert sorted(lite.row_ids()) == sorted(full.row_ids()) and lite.count() == full.count() == 5
        assert np.array_equal(lite.mean, full.mean) and lite.space() == full.space()
        ids = [int(i) for i in full.row_ids()]
        a, b = lite.rows_by_ids(ids), full.rows_by_ids(ids)
        cols = ("id", "path", "size", "mtime_ns", "sha256", "width", "height", "vector", "indexed_at")
        assert {i: [getattr(r, c) for c in cols] for i, r in a.items()} == \
               {i: [getattr(r, c) for c in cols] for i, r in b.items()}
        path = str(src / "coffee.png")
        assert lite.row_by_path(path).id == full.row_by_path(path).id and lite.row_by_path("/nope") is None
        raw = np.stack([np.frombuffer(b[i].vector, np.float32) for i in ids])
        for opts in ({}, {"qe": 2}):
            got = Searcher(lite, None).search_vectors(raw, 3, **opts)
            want = Searcher(full, None).search_vectors(raw, 3, **opts)
            assert [[h.to_dict() for h in hs] for hs in got] == [[h.to_dict() for h in hs] for hs in want]
        got = Searcher(lite, None, dba=2).search_vectors(raw, 3)
        want = Searcher(full, None, dba=2).search_vectors(raw, 3)
        assert [[h.to_dict() for h in hs] for hs in got] == [[h.to_dict() for h in hs] for hs in want]


WATCH = ("import sys, atexit\n"
         "atexit.register(lambda: print('sqlalchemy' in sys.modules, 'torch' in sys.modules, file=sys.stderr))\n"
         "import cli\ncli.main(sys.argv[1:], prog_name='retrieve')\n")


def _search(*args, **env):
    return subprocess.run([sys.executable, "-c", WATCH, "search", *map(str, args)], capture_output=True, text=True,
                          cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT), **env}, timeout=600)


def test_search_without_sqlalchemy_same_output(small_index):
    """`retrieve search` imports neither SQLAlchemy nor torch on a plain index with a cached graph, and answers
    as the full path does (RETRIEVE_FAST_SEARCH=0: SQLAlchemy and torch)."""
    src, idx = small_index
    fast = _search(src / "chelsea.jpg", src / "rocket.png", "--index", idx, "-k", "3", "--json")
    assert fast.returncode == 0, fast.stderr
    assert fast.stderr.strip().splitlines()[-1] == "False False", fast.stderr
    full = _search(src / "chelsea.jpg", src / "rocket.png", "--index", idx, "-k", "3", "--json",
                   RETRIEVE_FAST_SEARCH="0")
    assert full.returncode == 0, full.stderr
    assert full.stderr.strip().splitlines()[-1] == "True True", full.stderr
    a = [json.loads(x) for x in fast.stdout.splitlines()]
    b = [json.loads(x) for x in full.stdout.splitlines()]
    assert [[(h["rank"], h["id"], h["path"]) for h in q["results"]] for q in a] == \
           [[(h["rank"], h["id"], h["path"]) for h in q["results"]] for q in b]
    assert a[0]["results"][0]["path"].endswith("cat_crop.jpg")
    for qa, qb in zip(a, b):  # ONNX Runtime vs eager torch embeddings: equal to float rounding
        assert np.allclose([h["score"] for h in qa["results"]], [h["score"] for h in qb["results"]], atol=1e-4)


def test_unusual_indexes_take_the_full_path_with_its_errors(small_index, tmp_path):
    """A damaged database or a database server's record: no lite store, and the error is the full store's."""
    from retrieval.litestore import open_for_search

    src, idx = small_index
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "index.db").write_bytes(b"not a database at all" * 100)
    assert open_for_search(bad) is None
    fast = _search(src / "chelsea.jpg", "--index", bad)
    full = _search(src / "chelsea.jpg", "--index", bad, RETRIEVE_FAST_SEARCH="0")
    assert fast.returncode == full.returncode != 0
    assert fast.stderr.splitlines()[:-1] == full.stderr.splitlines()[:-1] and "index.db" in fast.stderr
    served = tmp_path / "served"
    served.mkdir()
    shutil.copy(idx / "index.db", served / "index.db")
    (served / "database.json").write_text(json.dumps({"url": "postgresql+psycopg://u@127.0.0.1:1/x"}))
    assert open_for_search(served) is None
    assert open_for_search(tmp_path / "missing") is None
