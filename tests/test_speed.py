"""Issue 16's leftovers: `retrieve search` reads a plain SQLite index without SQLAlchemy (retrieval/index/store.py)
with the same answers and the same errors; the indexer commits rows in bulk; an unchanged run leaves the
vector file and the mean alone."""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from clitools import ROOT, run_process, run_watching_imports


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
    from retrieval.index.store import IndexStore
    from retrieval.match.search import Searcher

    src, idx = small_index
    lite = IndexStore.open(idx)
    assert lite._sqlite is not None  # read through sqlite3
    with lite, IndexStore(idx.resolve()) as full:  # the same rows through SQLAlchemy
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


def _search(*args, **env):
    return run_watching_imports("search", *args, **env)


def test_search_without_sqlalchemy_same_output(small_index):
    """`retrieve search` imports neither SQLAlchemy nor torch on a plain index with a cached graph, and answers
    as the full path does (RETRIEVE_FAST_SEARCH=0: SQLAlchemy and torch)."""
    src, idx = small_index
    fast = _search(src / "chelsea.jpg", src / "rocket.png", "--index", idx, "-k", "3", "--json",
                   RETRIEVE_THREADS="1")  # (a thread count set: still no torch)
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
    from retrieval.index.store import IndexStore

    src, idx = small_index
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "index.db").write_bytes(b"not a database at all" * 100)
    assert IndexStore._open_light(bad) is None
    fast = _search(src / "chelsea.jpg", "--index", bad)
    full = _search(src / "chelsea.jpg", "--index", bad, RETRIEVE_FAST_SEARCH="0")
    assert fast.returncode == full.returncode != 0
    assert fast.stderr.splitlines()[:-1] == full.stderr.splitlines()[:-1] and "index.db" in fast.stderr
    served = tmp_path / "served"
    served.mkdir()
    shutil.copy(idx / "index.db", served / "index.db")
    (served / "database.json").write_text(json.dumps({"url": "postgresql+psycopg://u@127.0.0.1:1/x"}))
    assert IndexStore._open_light(served) is None
    assert IndexStore._open_light(tmp_path / "missing") is None


def test_unchanged_run_leaves_vector_file_and_mean(small_index, lite0, tmp_path, monkeypatch):
    """An unchanged re-run neither recomputes μ nor rewrites the vector file; a run that adds a photo does both."""
    from indexer import index_paths
    from retrieval.index.store import IndexStore

    src, idx = small_index
    own = tmp_path / "idx"
    shutil.copytree(idx, own)  # the same rows (paths under src), a private vector file
    calls = []
    real = IndexStore.update_mean
    monkeypatch.setattr(IndexStore, "update_mean", lambda self: calls.append(1) or real(self))
    index_paths([src], own, backbone=lite0)  # records what the vector file holds (first run of this code)
    before = os.stat(own / "vectors.faiss")
    with IndexStore.open(own) as store:
        mean = store.mean
    calls.clear()
    report = index_paths([src], own, backbone=lite0)
    after = os.stat(own / "vectors.faiss")
    assert report.unchanged == 5 and report.indexed == report.removed == 0
    assert not calls, "an unchanged run recomputed the mean"
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns), "vector file rewritten"
    extra = tmp_path / "extra"
    extra.mkdir()
    shutil.copy(src / "chelsea.jpg", extra / "chelsea_again.jpg")  # a copy: a new row, same vector
    os.utime(src / "coffee.png")  # touched: unchanged content, the row's mtime follows
    report = index_paths([src, extra], own, backbone=lite0)
    assert report.indexed == 1 and calls, "a run that added a row kept the old mean"
    assert os.stat(own / "vectors.faiss").st_ino != after.st_ino
    with IndexStore.open(own) as store:
        assert store.count() == 6 and store.faiss_index().ntotal == 6
        assert not np.array_equal(store.mean, mean)
        v = np.concatenate([v for _, v in store.iter_vectors()]).astype(np.float64).mean(0)
        assert np.allclose(store.mean, v, atol=1e-6)


def test_commit_is_bulk_and_keeps_ids(tmp_path):
    """indexer.rows.commit_embedded: a few statements per batch (not one per row), each row with its own vector and the ids
    handed to FAISS in the batch's order; a replaced row goes, a skipped record of the path goes."""
    from sqlalchemy import event

    from indexer.common import IndexReport
    from indexer.rows import Decoded, commit_embedded
    from retrieval.scan import FileEntry
    from retrieval.index.schema import ImageRow, SkippedRow
    from retrieval.index.settings import IndexSettings
    from retrieval.index.store import IndexStore

    st = IndexSettings(model="m", weights_id="w", weights_source="", preprocess={}, metric="cosine", dim=4,
                       index_type="flat", faiss_factory="Flat")
    with IndexStore.create(tmp_path / "idx", st) as store:
        with store.session() as s, s.begin():
            s.add(ImageRow(path="/p/3.jpg", size=1, mtime_ns=1, sha256="old", width=1, height=1,
                           vector=np.zeros(4, np.float32).tobytes(), indexed_at=0.0))
            s.add(SkippedRow(path="/p/5.jpg", size=1, mtime_ns=1, reason="broken"))
        old = store.row_by_path("/p/3.jpg")
        applied = []
        store.apply = lambda removed=(), ids=(), raw=None: applied.append((list(removed), list(ids), raw))
        batch = [Decoded(FileEntry(f"/p/{i}.jpg", 10 + i, 20 + i), f"{i:064x}", 30 + i, 40 + i) for i in range(40)]
        vecs = np.arange(160, dtype=np.float32).reshape(40, 4)
        statements = []
        event.listen(store.engine, "before_cursor_execute", lambda *a: statements.append(a[2]))
        report = IndexReport()
        commit_embedded(store, batch, vecs, {"/p/3.jpg": old}, report)
        assert report.indexed == 40
        assert len(statements) <= 4, statements  # was 2 per row (a DELETE of the skipped record, an INSERT)
        (removed, ids, raw), = applied
        assert removed == [old.id] and raw is vecs and len(set(ids)) == 40
        rows = store.rows_by_ids(ids)
        for i, rid in enumerate(ids):
            r = rows[rid]
            assert (r.path, r.size, r.mtime_ns, r.width, r.height) == (f"/p/{i}.jpg", 10 + i, 20 + i, 30 + i, 40 + i)
            assert np.array_equal(np.frombuffer(r.vector, np.float32), vecs[i])
        assert "/p/5.jpg" not in store.skipped()
        assert store.count() == 40


def test_one_query_searches_on_one_faiss_thread():
    """A single query runs FAISS on one OpenMP thread; the setting is restored afterwards."""
    import faiss

    from retrieval.match.search import _one_thread_for_one_query

    n = faiss.omp_get_max_threads()
    with _one_thread_for_one_query(1):
        assert faiss.omp_get_max_threads() == 1
    assert faiss.omp_get_max_threads() == n
    with _one_thread_for_one_query(3):
        assert faiss.omp_get_max_threads() == n


def _index(*args, **env):  # args: retrieve's (a main option such as --threads first), then index's
    return run_watching_imports(*args, timeout=1200, **env)


def _vectors(idx):
    from retrieval.index.store import IndexStore

    with IndexStore.open(idx) as store:
        rows = store.rows_by_ids([int(i) for i in store.row_ids()])
        ref = store.get_value("explain_reference")
        return {r.path: np.frombuffer(r.vector, np.float32) for r in rows.values()}, ref


def _close(a, b) -> bool:  # the tolerance retrieval/models/backbone.py checks an ONNX graph against eager with
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return a.shape == b.shape and bool(np.abs(a - b).max() <= 1e-3 * np.abs(b).max() + 1e-6)


def _same_index(fast, full, n: int) -> None:
    """The two indexes hold the same ``n`` embeddings and explain reference (448 px), within the graph check's tolerance."""
    (a, ref_a), (b, ref_b) = _vectors(fast), _vectors(full)
    assert sorted(a) == sorted(b) and len(a) == n
    for p in a:
        assert _close(a[p], b[p]), p
    assert ref_a["size"] == ref_b["size"] == 448 and ref_a["sampled"] == ref_b["sampled"] == n
    assert _close(ref_a["mean"], ref_b["mean"]) and _close(ref_a["mean_tap"], ref_b["mean_tap"])


def test_index_through_cached_graphs_imports_no_torch(small_index, tmp_path):
    """`retrieve index` never imports torch for the default preset: from a cold ONNX cache the graphs (224 px, and
    the 448-px two-output graph of the explain reference) are made in a child process; a warm update (with
    --threads) needs none. Its embeddings and explain reference equal the torch path's (RETRIEVE_FAST_INDEX=0)."""
    src, _ = small_index
    bad = _index("index", src, "--index", tmp_path / "bad", "--model", "no_such_net")  # refused before any child
    assert bad.returncode == 1 and bad.stderr.startswith("Error: unknown model 'no_such_net'; known: "), bad.stderr
    assert bad.stderr.strip().splitlines()[-1].split()[1] == "False" and not (tmp_path / "bad").exists(), bad.stderr
    cold = {"XDG_CACHE_HOME": str(tmp_path / "cold-cache")}
    fast = _index("index", src, "--index", tmp_path / "fast", "--json", **cold)
    assert fast.returncode == 0, fast.stderr
    assert fast.stderr.strip().splitlines()[-1].split()[1] == "False", fast.stderr  # torch never imported here
    assert list((tmp_path / "cold-cache" / "retrieve" / "onnx").glob("*-tap-*.onnx"))  # made by the child
    full = _index("index", src, "--index", tmp_path / "full", "--json", RETRIEVE_FAST_INDEX="0")
    assert full.returncode == 0, full.stderr
    assert full.stderr.strip().splitlines()[-1].split()[1] == "True", full.stderr
    _same_index(tmp_path / "fast", tmp_path / "full", 5)
    more = tmp_path / "more"
    more.mkdir()
    shutil.copy(ROOT / "data" / "samples" / "horse.png", more / "horse.png")
    upd = _index("--threads", "1", "index", src, more, "--index", tmp_path / "fast", "--json", **cold)
    assert upd.returncode == 0, upd.stderr
    assert upd.stderr.strip().splitlines()[-1].split()[1] == "False", upd.stderr
    assert json.loads(upd.stdout.strip().splitlines()[-1])["indexed"] == 1


def test_instance_preset_indexes_photos_of_every_shape_without_torch(tmp_path, monkeypatch):
    """`retrieve index --preset instance` (448 px, aspect kept) goes through the cached graphs too: from a cold
    cache the child process checks the one graph at the common photo shapes (Preprocess.common_shapes: 4:3, 3:2,
    16:9 either way round, and the square), for the embeddings and the explain reference; the first photo of another
    shape (here 7:3) has a second child check every other shape (Preprocess.every_shape). The index run never
    imports torch, its embeddings and reference equal the torch path's, and one ONNX Runtime session serves every
    shape of a graph."""
    from conftest import skimage_photo
    from retrieval.index.store import IndexStore
    from retrieval.models.graphs import GraphRunner, Manifest
    from retrieval.models.loader import backbone_for_settings
    from retrieval.models.preprocess import Preprocess

    pre = Preprocess(size=448, resize="long")
    shapes = pre.common_shapes()
    assert len(shapes) == 7 and (448, 448) in shapes
    assert {pre.shape_for(4032, 3024), pre.shape_for(3024, 4032), pre.shape_for(6000, 4000),
            pre.shape_for(1920, 1080), pre.shape_for(1080, 1920)} <= set(shapes)
    every = pre.every_shape()
    assert len(every) == len(set(every)) == 27 and set(shapes) <= set(every) and pre.shape_for(700, 300) not in shapes
    src = tmp_path / "photos"
    src.mkdir()
    for name, size in (("chelsea", (640, 480)), ("coffee", (480, 640)), ("astronaut", (600, 600)),
                       ("rocket", (1920, 1080)), ("camera", (700, 300))):
        skimage_photo(name).resize(size).save(src / f"{name}.jpg", quality=92)
    cold = {"XDG_CACHE_HOME": str(tmp_path / "cold-cache")}
    fast = _index("index", src, "--index", tmp_path / "fast", "--preset", "instance", "--json", **cold)
    assert fast.returncode == 0, fast.stderr
    assert fast.stderr.strip().splitlines()[-1].split()[1] == "False", fast.stderr  # torch never imported here
    full = _index("index", src, "--index", tmp_path / "full", "--preset", "instance", "--json", RETRIEVE_FAST_INDEX="0",
                  **cold)
    assert full.returncode == 0, full.stderr
    assert full.stderr.strip().splitlines()[-1].split()[1] == "True", full.stderr
    _same_index(tmp_path / "fast", tmp_path / "full", 5)
    monkeypatch.setenv("XDG_CACHE_HOME", cold["XDG_CACHE_HOME"])
    with IndexStore.open(tmp_path / "fast") as store:
        settings = store.settings
    bb = backbone_for_settings(settings)
    m = Manifest.load(bb.name, bb.weights_id)
    assert all(m.graph(bb.precision, hw) is not None and m.graph(bb.precision, hw, bb.tap) is not None for hw in every)
    a, b = bb._runner((448, 320)), bb._runner((192, 448))
    assert isinstance(a, GraphRunner) and a is b


def test_a_new_instance_index_takes_its_identity_from_the_cached_graphs(tmp_path, monkeypatch):
    """Once the graphs are cached, a new instance index (GeM pooling) learns its backbone's identity from the
    manifest beside them, as a GAP index does: no child process that imports torch (6 s and ~900 MB of RSS on every
    new instance index), and the same settings the child gave."""
    from conftest import skimage_photo
    from retrieval.index.store import IndexStore
    from retrieval.models import prepare

    src = tmp_path / "photos"
    src.mkdir()
    skimage_photo("chelsea").resize((640, 480)).save(src / "chelsea.jpg", quality=92)
    cold = tmp_path / "cold-cache"
    first = _index("index", src, "--index", tmp_path / "first", "--preset", "instance", "--json",
                   XDG_CACHE_HOME=str(cold))
    assert first.returncode == 0, first.stderr
    with IndexStore.open(tmp_path / "first") as store:
        s = store.settings
    monkeypatch.setenv("XDG_CACHE_HOME", str(cold))
    monkeypatch.setattr(prepare, "run_in_child", lambda spec: pytest.fail(f"a child was started for {spec}"))
    got = prepare.new_index_identity(None, None, 448, "long", "gem", "auto", 448)
    assert got == {"model": s.model, "weights_id": s.weights_id, "weights_source": s.weights_source,
                   "preprocess": s.preprocess, "dim": s.dim, "pooling": s.pooling}
    assert prepare.new_index_identity(None, None, 448, "long", "gem:4", "auto", 448)["pooling"] == "gem:4"


def test_serve_answers_an_upload_without_torch(small_index):
    """`retrieve serve` on a plain index with cached graphs answers a search of an uploaded photo without loading
    torch (its first request imported it only to read a photo's size: seconds on the first request)."""
    import urllib.request

    from clitools import start_server, stop

    src, idx = small_index
    proc, url, token = start_server(idx, env={"RETRIEVE_THREADS": "1"})
    try:
        req = urllib.request.Request(url + "api/search?k=2", data=(src / "cat_crop.jpg").read_bytes(), method="POST",
                                     headers={"Content-Type": "image/jpeg", "Authorization": f"token {token}"})
        with urllib.request.urlopen(req, timeout=300) as r:
            assert json.loads(r.read())["results"][0]["path"].endswith("cat_crop.jpg")
        maps = Path(f"/proc/{proc.pid}/maps")
        if maps.exists():  # (Linux)
            assert "libtorch" not in maps.read_text()
    finally:
        stop(proc)
