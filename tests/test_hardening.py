"""Issue 14: no state `check` rejects after a crash, no silent mismatch between the rows, the head and the
vector file, no option silently ignored, no accidental index, no trust in a planted lock file."""
from __future__ import annotations

import json
import os
import signal
import time

import faiss
import numpy as np
import pytest
from sqlalchemy import create_engine, delete

from clitools import run, run_json
from conftest import skimage_photo
from retrieval.index.check import check_index
from retrieval.index.schema import Base, ImageRow
from retrieval.index.settings import IndexSettings
from retrieval.index.store import IndexStore

N_PHOTOS = 9


def synthetic(directory, n: int, dim: int = 32, index_type: str = "flat", head: dict | None = None,
              factory: str = "", seed: int = 0) -> tuple[IndexStore, np.ndarray]:
    """A writable store holding ``n`` synthetic clustered vectors (no model involved)."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(20, dim)).astype(np.float32)
    vecs = (centers[rng.integers(0, 20, n)] + 0.3 * rng.normal(size=(n, dim))).astype(np.float32)
    st = IndexSettings(model="synthetic", weights_id="x", weights_source="", preprocess={"size": 224},
                       metric="cosine", dim=dim, index_type=index_type, faiss_factory=factory, head=head or {})
    store = IndexStore.create(directory, st)
    store.files = directory.parent / f"{directory.name}-files"  # the rows' files exist: check finds them
    add_rows(store, vecs, start=0)
    return store, vecs


def add_rows(store: IndexStore, vecs: np.ndarray, start: int) -> None:
    store.files.mkdir(exist_ok=True)
    for i in range(len(vecs)):
        (store.files / f"{start + i}.jpg").touch()
    with store.session() as s, s.begin():
        s.add_all(ImageRow(path=str(store.files / f"{start + i}.jpg"), size=1, mtime_ns=1, sha256=str(start + i), width=1, height=1,
                           vector=v.tobytes(), indexed_at=0.0) for i, v in enumerate(vecs))


# -- 2. head re-fit vs the vector file ---------------------------------------------------------------
def test_a_vector_file_from_before_a_head_refit_is_rebuilt_not_searched(tmp_path):
    idx = tmp_path / "idx"
    store, vecs = synthetic(idx, 100, head={"type": "pca-whiten", "dim": 8})
    store.fit_head()
    store.rebuild_faiss()
    store.save_faiss()  # a completed run
    add_rows(store, np.random.default_rng(1).normal(size=(100, 32)).astype(np.float32) * 3, start=100)
    store.fit_head()  # ... the next run commits a re-fitted head, and is killed before the vector file is rebuilt
    store.close()
    rep = check_index(idx)
    assert rep.faiss_file == "stale" and rep.consistent and rep.trailing  # self-healing, not a fault
    r = run("check", "--index", idx)
    assert r.exit_code == 0 and "pending: the vector file was made for another head" in r.stdout
    with IndexStore.open(idx) as store:
        index = store.faiss_index()
        assert index.ntotal == 200
        row = store.row_by_path(str(tmp_path / "idx-files" / "150.jpg"))
        want = store.transform(np.frombuffer(row.vector, np.float32)[None])[0]
        np.testing.assert_allclose(index.reconstruct(row.id), want, atol=1e-5)  # vectors of today's head
    run("check", "--index", idx, "--repair")  # the hint: writes the vector file
    assert not run_json("check", "--index", idx)["trailing"]


def test_fingerprint_is_written_beside_the_vector_file_and_in_the_database(tmp_path):
    store, _ = synthetic(tmp_path / "idx", 50)
    store.rebuild_faiss()
    store.save_faiss()
    meta = json.loads((tmp_path / "idx" / "vectors.faiss.json").read_text())
    assert meta["count"] == 50 and meta["head"] == "none" and meta["dim"] == 32 and meta["factory"] == "Flat"
    assert meta["bytes"] == (tmp_path / "idx" / "vectors.faiss").stat().st_size
    assert store.get_value("vector_file") == meta
    store.close()
    # a vector file that its fingerprint does not describe (another file renamed in) is rebuilt
    other, _ = synthetic(tmp_path / "other", 40, seed=3)
    other.rebuild_faiss()
    other.save_faiss()
    other.close()
    os.replace(tmp_path / "other" / "vectors.faiss", tmp_path / "idx" / "vectors.faiss")
    assert check_index(tmp_path / "idx").faiss_file == "stale"
    with IndexStore.open(tmp_path / "idx") as store:
        row = store.row_by_path(str(tmp_path / "idx-files" / "7.jpg"))
        want = store.transform(np.frombuffer(row.vector, np.float32)[None])[0]
        np.testing.assert_allclose(store.faiss_index().reconstruct(row.id), want, atol=1e-6)


def test_ctrl_c_during_finalisation_is_deferred_until_the_vector_file_is_written(photos, tmp_path, monkeypatch):
    idx = tmp_path / "idx"
    real = IndexStore.update_mean

    def ctrl_c_then_update_mean(self):
        os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C while the run finalises
        time.sleep(0.05)
        return real(self)

    monkeypatch.setattr(IndexStore, "update_mean", ctrl_c_then_update_mean)
    r = run("index", photos, "--index", idx, "--json", ok=False)
    assert r.exit_code == 130 and "Interrupted" in r.stderr and json.loads(r.stdout)["total"] == N_PHOTOS
    monkeypatch.undo()
    rep = run_json("check", "--index", idx)
    assert rep["consistent"] and not rep["trailing"] and rep["vectors"] == N_PHOTOS  # finalised all the same


# -- 3. HNSW: removals without a rebuild per batch ---------------------------------------------------------
def test_hnsw_removals_are_filtered_then_compacted_once(tmp_path, monkeypatch):
    from retrieval.match.search import Searcher
    from retrieval.index.vectors import Vectors

    store, vecs = synthetic(tmp_path / "idx", 2000, index_type="hnsw")
    store.faiss_index()
    rebuilds = []
    real = Vectors.rebuild
    monkeypatch.setattr(Vectors, "rebuild", lambda self: rebuilds.append(1) or real(self))
    removed = []
    for batch in range(10):  # a run replacing rows batch after batch
        ids = list(range(1 + batch * 5, 6 + batch * 5))
        with store.session() as s, s.begin():
            s.execute(delete(ImageRow).where(ImageRow.id.in_(ids)))
        store.apply(ids)
        removed += ids
    assert rebuilds == []  # the graph keeps them...
    searcher = Searcher(store, None)
    hits = searcher.search_vectors(vecs[:20], 10)
    assert all(len(h) == 10 and not {x.id for x in h} & set(removed) for h in hits)  # ...no search returns them
    assert not store.compact() and rebuilds == []  # 50 of 2000: below the share that warrants a rebuild
    store.save_faiss()
    store.close()
    rep = run_json("check", "--index", tmp_path / "idx")
    assert rep["consistent"] and len(rep["vectors_without_row"]) == 50
    with IndexStore.open(tmp_path / "idx", writable=True) as store:  # reopened: still filtered, still no rebuild
        assert sorted(store.removed_ids().tolist()) == removed and rebuilds == []
        hits = Searcher(store, None).search_vectors(vecs[:20], 10)
        assert all(len(h) == 10 and not {x.id for x in h} & set(removed) for h in hits)
        more = list(range(51, 301))
        with store.session() as s, s.begin():
            s.execute(delete(ImageRow).where(ImageRow.id.in_(more)))
        store.apply(more)
        assert store.compact() and rebuilds == [1]  # one rebuild for the run, at its end
        assert len(store.removed_ids()) == 0 and store.faiss_index().ntotal == 1700


# -- 4. an interrupted creation ------------------------------------------------------------------------------
def test_an_interrupted_creation_does_not_leave_a_stuck_index(photos, tmp_path):
    idx = tmp_path / "idx"
    idx.mkdir()
    engine = create_engine(f"sqlite:///{idx / 'index.db'}")  # what a kill between create_all and the
    Base.metadata.create_all(engine)  # settings commit left (before creation was atomic)
    engine.dispose()
    r = run("check", "--index", idx, ok=False)
    assert r.exit_code == 1 and len(r.stderr.strip().splitlines()) == 1
    assert "creation was interrupted" in r.stderr and f"retrieve index PHOTOS --index {idx}" in r.stderr
    assert run_json("index", photos, "--index", idx)["total"] == N_PHOTOS  # the hint, followed
    assert run_json("check", "--index", idx)["consistent"]


def test_creation_is_atomic(photos, tmp_path, monkeypatch):
    import retrieval.index.store as store_mod

    class Killed(BaseException):
        pass

    real_replace = os.replace

    def killed_at_rename(src, dst):
        if str(dst).endswith("index.db"):
            raise Killed
        return real_replace(src, dst)

    monkeypatch.setattr(store_mod.os, "replace", killed_at_rename)
    monkeypatch.setattr(IndexStore, "_abandon", lambda self: self.close())  # a kill cleans nothing up
    idx = tmp_path / "idx"
    with pytest.raises(Killed):
        run("index", photos, "--index", idx)
    monkeypatch.undo()
    assert not (idx / "index.db").exists() and list(idx.glob(".index.db.*.tmp"))  # no half-made index
    assert run_json("index", photos, "--index", idx)["total"] == N_PHOTOS
    assert not list(idx.glob(".*.tmp"))  # the next writer removed what the killed one left


# -- 5. options fixed at creation ------------------------------------------------------------------------------
def _refused(r, *words):
    assert r.exit_code == 1 and r.stderr.startswith("Error: ") and len(r.stderr.strip().splitlines()) == 1, r.stderr
    for w in words:
        assert w in r.stderr, r.stderr
    return r.stderr


def test_options_fixed_at_creation_are_refused_and_every_hint_works(photos, tmp_path):
    idx = tmp_path / "idx"
    run_json("index", photos, "--index", idx)
    before = (idx / "index.db").stat().st_mtime_ns
    bogus = tmp_path / "other-weights.pth"
    bogus.write_bytes(b"not these weights")
    cases = [
        (["--input-size", "320"], "input size 224, not 320"),
        (["--weights", bogus], f"not {bogus}"),
        (["--faiss", "IVF64,Flat"], "index type flat, not --faiss IVF64,Flat"),
        (["--index-type", "hnsw"], "index type flat, not hnsw"),
        (["--metric", "l2"], "metric cosine, not l2"),
        (["--pooling", "gem"], "pooling gap, not gem:3"),
        (["--resize", "long"], "resize squash, not long"),
        (["--head", "pca:16"], "head centre, not pca:16"),
        (["--model", "resnet18"], "model efficientnet_lite0, not resnet18"),
        (["--preset", "instance"], "input size 224, not 448 (from --preset instance)"),
    ]
    for opts, words in cases:
        err = _refused(run("index", photos, "--index", idx, *opts, ok=False), words)
        assert "fixed when the index is created" in err and "another --index directory" in err
        assert "leave " in err and "out to update this index" in err
    assert "leave --preset instance out" in err
    assert (idx / "index.db").stat().st_mtime_ns == before  # nothing changed
    # the same weights as the index's are no change at all
    with IndexStore.open(idx) as store:
        weights = store.settings.weights_source
    assert run_json("index", photos, "--index", idx, "--weights", weights)["unchanged"] == N_PHOTOS
    # hint 1: leave the options out
    assert run_json("index", photos, "--index", idx)["unchanged"] == N_PHOTOS
    # hint 2: another --index directory, same options
    other = run_json("index", photos, "--index", tmp_path / "other", "--input-size", "256", "--index-type", "hnsw")
    assert other["total"] == N_PHOTOS
    info = run_json("info", "--index", tmp_path / "other")
    assert info["input_size"] == 256 and info["index_type"] == "hnsw"


def test_a_head_change_hint_does_not_loop(photos, tmp_path):
    idx = tmp_path / "idx"
    run_json("index", photos, "--index", idx, "--head", "pca-whiten:8")
    err = _refused(run("index", photos, "--index", idx, "--head", "pca:16", ok=False), "head pca-whiten:8, not pca:16")
    assert "add --refit" in err
    assert run_json("index", photos, "--index", idx, "--refit")["total"] == N_PHOTOS  # followed: it works
    assert run_json("index", photos, "--index", idx, "--head", "pca-whiten:8", "--refit")["total"] == N_PHOTOS


# -- 6. custom factories -------------------------------------------------------------------------------------
def test_custom_factory_not_starting_with_ivf_is_exact_until_trainable(photos, tmp_path):
    idx = tmp_path / "idx"
    r = run_json("index", photos, "--index", idx, "--faiss", "OPQ8,IVF64,PQ8")
    assert r["total"] == N_PHOTOS
    (res,) = [json.loads(line) for line in run("search", photos / "chelsea.jpg", "--index", idx, "--json")
              .stdout.splitlines()]
    assert res["results"][0]["path"] == str(photos / "more" / "cat_crop.jpg") and len(res["results"]) == 8
    assert run_json("check", "--index", idx)["consistent"]


def test_custom_factory_trains_once_enough_vectors_exist(tmp_path):
    from retrieval.index.vectors import min_training, trainable_factory

    assert min_training("OPQ8,IVF64,PQ8") == 39 * 64 and trainable_factory("OPQ8,IVF64,PQ8", 100, 32) == "Flat"
    assert trainable_factory("PCA16,SQ8", 0, 32) == "Flat" and trainable_factory("PCA16,SQ8", 5, 32) == "PCA16,SQ8"
    assert trainable_factory("HNSW32", 0, 32) == "HNSW32"
    factory = "PCA16,IVF16,SQ8"  # trained three ways, and not an IVF string: cheap enough to train in a test
    assert min_training(factory) == 39 * 16
    small, vecs = synthetic(tmp_path / "idx", 300, factory=factory, index_type="custom")
    index = small.rebuild_faiss()
    assert isinstance(faiss.downcast_index(index.index), faiss.IndexFlat)  # exact meanwhile
    add_rows(small, np.repeat(vecs, 3, 0) + np.float32(0.01), start=300)
    assert small.needs_retrain()
    index = small.rebuild_faiss()
    assert not isinstance(faiss.downcast_index(index.index), faiss.IndexFlat) and not small.needs_retrain()
    from retrieval.match.search import Searcher

    hits = Searcher(small, None).search_vectors(vecs[:5], 3)
    assert all(len(h) == 3 for h in hits)
    small.close()


# -- 7. nothing created by accident ------------------------------------------------------------------------------
def test_empty_or_all_bad_folder_creates_no_index(tmp_path):
    (tmp_path / "empty").mkdir()
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "a.jpg").write_bytes(b"")
    (bad / "b.png").write_text("not a png")
    existing = tmp_path / "existing-dir"
    existing.mkdir()
    for folder, idx in ((tmp_path / "empty", tmp_path / "idx1"), (bad, tmp_path / "a" / "b" / "idx2"),
                        (bad, existing)):
        r = run("index", folder, "--index", idx, ok=False)
        assert r.exit_code == 1 and "Error: " in r.stderr and "no index was created" in r.stderr
    assert "none of the 2 images found could be indexed" in r.stderr and f"{bad / 'a.jpg'}: empty file" in r.stderr
    assert not (tmp_path / "idx1").exists() and not (tmp_path / "a").exists() and list(existing.iterdir()) == []


def test_index_option_pointing_at_a_file(photos, tmp_path):
    f = tmp_path / "notes.txt"
    f.write_text("keep me")
    for cmd in (["index", photos], ["search", photos / "chelsea.jpg"], ["check"], ["info"]):
        r = run(*cmd, "--index", f, ok=False)
        assert r.exit_code == 1 and len(r.stderr.strip().splitlines()) == 1 and "is a file, not an index" in r.stderr
        assert "create one with" not in r.stderr
    for cmd in (["index", photos], ["check"]):  # a path under a file cannot be created either
        r = run(*cmd, "--index", f / "sub", ok=False)
        assert r.exit_code == 1 and len(r.stderr.strip().splitlines()) == 1 and f"{f} is a file" in r.stderr
    assert f.read_text() == "keep me"
    assert run_json("index", photos, "--index", tmp_path / "dir")["total"] == N_PHOTOS  # the hint: a directory
    r = run("info", "--index", tmp_path / "dir" / "index.db", ok=False)
    assert r.exit_code == 1 and f"--index {tmp_path / 'dir'}" in r.stderr
    assert run_json("info", "--index", tmp_path / "dir")["images"] == N_PHOTOS  # that hint, followed


# -- 8. the lock file and temporary files -----------------------------------------------------------------------
def test_a_planted_lock_link_is_refused_not_truncated(photos, tmp_path):
    idx = tmp_path / "idx"
    run_json("index", photos, "--index", idx)
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    os.remove(idx / "lock")
    os.symlink(victim, idx / "lock")
    r = run("index", photos, "--index", idx, ok=False)
    err = _refused(r, "symbolic link", "rm ")
    assert victim.read_text() == "precious"
    os.remove(idx / "lock")  # the hint, followed
    assert run_json("index", photos, "--index", idx)["unchanged"] == N_PHOTOS
    os.remove(idx / "lock")
    os.link(victim, idx / "lock")  # a hard link is refused too
    _refused(run("index", photos, "--index", idx, ok=False), "hard link")
    assert victim.read_text() == "precious" and err


def test_temporary_files_of_a_crash_are_removed_on_the_next_writable_open(photos, tmp_path):
    idx = tmp_path / "idx"
    run_json("index", photos, "--index", idx)
    left = [idx / ".vectors.faiss.99999.tmp", idx / ".vectors.faiss.json.99999.tmp", idx / ".index.db.99999.tmp"]
    for p in left:
        p.write_bytes(b"partial")
    run_json("check", "--index", idx)
    assert all(p.exists() for p in left)  # readers leave them (a writer may be making them)
    run_json("index", photos, "--index", idx)
    assert not any(p.exists() for p in left)
