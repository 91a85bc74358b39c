"""Index type ``sharded`` (retrieval/index/sharded.py) through the CLI: ``retrieve index --index-type sharded``,
search, incremental runs, IVF-PQ trained at a few hundred vectors, ``kill -9`` while the shards are written,
``check`` finding a corrupted shard and ``--repair`` healing it.

Every search is checked against its definition: the exact cosine top-k computed here with numpy from the rows'
stored embeddings (the rows are the truth; the shards hold float16 copies, so scores agree to 1e-3).
The commands run through the CLI's entry point, forked from one warm process (tests/forkrun.py) so that a run
can be killed at a chosen moment without paying the interpreter's start-up each time.

One index goes through the stages in turn, each a module fixture that needs the one before (``built`` →
``changed`` → ``trained``), so any test, run alone, first brings the index to the stage it checks.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import time
from pathlib import Path

import numpy as np
import pytest

from clitools import ROOT, Forker, run_process
from conftest import skimage_photo

from retrieval.index.sharded import POINTER, TRAIN_AT_ENV, shards_dir
from retrieval.index.schema import ImageRow
from retrieval.index.store import IndexStore

SYNTHETIC = 700  # rows added straight to the database: enough to train PCAR256,IVF16,PQ64 (PQ ≥ 256, IVF16 ≥ 624)
TOL = 1e-3  # float16 shards against the float32 rows: cosine scores differ by < 1e-4 (bench); 1e-3 leaves room


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """A collection (data/samples and scikit-image photos), a forker, and the index built from them."""
    base = tmp_path_factory.mktemp("sharded")
    photos = base / "photos"
    photos.mkdir()
    for p in sorted((ROOT / "data" / "samples").iterdir()):
        if p.suffix.lower() in (".jpg", ".png"):
            shutil.copy(p, photos / p.name)
    for name in ("coffee", "rocket", "camera", "horse"):
        skimage_photo(name).resize((256, 192)).save(photos / f"sk_{name}.jpg", quality=90)
    for i, name in enumerate(("astronaut", "coffee", "rocket", "chelsea") * 2):  # crops: 23 photos in all
        im = skimage_photo(name)
        w, h = im.size
        im.crop((i * w // 16, i * h // 20, w // 2 + i * w // 16, h // 2 + i * h // 20)).resize((128, 96)).save(
            photos / f"crop_{i}_{name}.jpg", quality=88)
    forker = Forker(base / "children.log")
    e = {"base": base, "photos": photos, "idx": base / "idx", "log": base / "children.log", "forker": forker}
    yield e
    forker.close()


def current(idx) -> dict:
    """What ``DIR/shards/current.json`` commits: the generation, its files, the vector space, the counts."""
    return json.loads((shards_dir(idx) / POINTER).read_text())


def cli(e, *args, kill_when=None, expect=0) -> str:
    """Run ``retrieve ARGS`` (forked) and return what it printed; ``kill_when()`` true: ``kill -9`` it then."""
    log: Path = e["log"]
    pos = log.stat().st_size if log.exists() else 0
    e["forker"].start(*args)
    if kill_when is not None:
        end = time.time() + 120
        while not kill_when() and time.time() < end:
            time.sleep(0.005)
    code, _ = e["forker"].wait(kill=kill_when is not None)
    out = log.read_text()[pos:]
    assert code == expect, f"exit {code}, expected {expect}:\n{out[-3000:]}"
    return out


def definition(idx, queries, k):
    """Exact cosine top-k of each (indexed) query's own stored embedding over every row, in the index's space
    (centred on the head's mean, projected by its matrix where it has one): ids and scores."""
    with IndexStore.open(idx) as store:
        ids, vecs = zip(*store.iter_vectors())
        ids, x = np.concatenate(ids), np.concatenate(vecs).astype(np.float64)
        if store.head is not None:
            x = x - store.head.mean
            x = x if store.head.proj is None else x @ store.head.proj.T
        x = x / np.linalg.norm(x, axis=1, keepdims=True)
        by_path = {store.row_by_path(str(q)).id: str(q) for q in queries}
    out = {}
    for i, q in by_path.items():
        s = x @ x[ids == i][0]
        order = np.argsort(-s, kind="stable")[:k]
        out[q] = (ids[order].tolist(), s[order].tolist(), dict(zip(ids.tolist(), s.tolist())))
    return out


def search_json(e, queries, k) -> dict:
    out = cli(e, "search", *queries, "--index", e["idx"], "-k", k, "--include-self", "--json")
    return {d["query"]: d for d in map(json.loads, [ln for ln in out.splitlines() if ln.startswith("{")])}


def assert_exact(got: dict, want, k):
    """The returned hits are a true top-k: each hit's score is its exact score, and the k scores are the k best."""
    for q, (ids, scores, all_scores) in want.items():
        hits = got[q]["results"]
        assert len(hits) == k
        for h in hits:
            assert abs(h["score"] - all_scores[h["id"]]) < TOL, (q, h)
        np.testing.assert_allclose([h["score"] for h in hits], scores, atol=TOL)


@pytest.fixture(scope="module")
def built(env):
    """The collection indexed with ``--index-type sharded``: too few rows to train, so exact. No head: a head
    re-fitted when the collection doubles rewrites every shard, and these tests follow the shards added one run
    at a time."""
    cli(env, "index", env["photos"], "--index", env["idx"], "--index-type", "sharded", "--head", "none", "--json")
    return env


def test_index_search_equals_exact_and_info_check(built):
    e = built
    ptr = current(e["idx"])
    assert ptr["trained"] is None and ptr["merged"] is None  # exact: too few to train
    assert ptr["count"] == len(list(e["photos"].iterdir()))
    assert not (e["idx"] / "vectors.faiss").exists()  # the shards are the search structure
    queries = sorted(e["photos"].iterdir())[:6]
    k = 5
    got, want = search_json(e, queries, k), definition(e["idx"], queries, k)
    assert_exact(got, want, k)
    for q in map(str, queries):  # exact search: exactly the definition's ranking (no near ties among these)
        assert [h["id"] for h in got[q]["results"]] == want[q][0]
    info = json.loads(cli(e, "info", "--index", e["idx"], "--json"))
    sh = info["sharded_vectors"]
    assert info["index_type"] == "sharded" and sh["vectors"] == info["images"] and sh["shards"] == 1
    assert sh["disk_bytes"]["vectors"] == info["images"] * (1280 * 2 + 8)  # float16 vector + int64 id each
    rep = json.loads(cli(e, "check", "--index", e["idx"], "--json"))
    assert rep["consistent"] and not rep["trailing"] and rep["vectors"] == rep["images"]
    # the index type is fixed at creation: another one is refused before anything changes
    out = cli(e, "index", e["photos"], "--index", e["idx"], "--index-type", "flat", expect=1)
    assert "index type sharded, not flat" in out


def test_sharded_with_the_default_head_equals_exact(env):
    """The default (centre) head, fitted at 23 photos: the shards hold the centred vectors and a search is the exact
    top-k of the centred cosine."""
    e = {**env, "idx": env["base"] / "idx-head"}
    cli(e, "index", e["photos"], "--index", e["idx"], "--index-type", "sharded", "--json")
    with IndexStore.open(e["idx"]) as store:
        assert store.head is not None and store.head.proj is None and store.head.fitted_on == 23
    queries = sorted(e["photos"].iterdir())[:6]
    got, want = search_json(e, queries, 5), definition(e["idx"], queries, 5)
    assert_exact(got, want, 5)


@pytest.fixture(scope="module")
def changed(built):
    """``built``, then a photo modified, one deleted and one added, and the next run's JSON report."""
    e = built
    photos = e["photos"]
    with IndexStore.open(e["idx"]) as store:
        e["old_horse"] = store.row_by_path(str(photos / "sk_horse.jpg")).id
        e["old_rocket"] = store.row_by_path(str(photos / "sk_rocket.jpg")).id
        e["n0"] = store.count()
    skimage_photo("astronaut").resize((200, 200)).save(photos / "sk_horse.jpg", quality=90)  # modified
    os.remove(photos / "sk_rocket.jpg")  # deleted
    skimage_photo("chelsea").rotate(90, expand=True).save(photos / "new_cat.jpg", quality=90)  # new
    e["changed_report"] = json.loads(cli(e, "index", photos, "--index", e["idx"], "--json"))
    return e


def test_incremental_add_modify_delete(changed):
    e = changed
    photos = e["photos"]
    old_horse, old_rocket, n0, rep = e["old_horse"], e["old_rocket"], e["n0"], e["changed_report"]
    assert (rep["indexed"], rep["removed"], rep["total"]) == (2, 1, len(list(photos.iterdir())))
    with IndexStore.open(e["idx"]) as store:
        sh = store.faiss_index()
        # in the first shard, filtered out of searches (2 of 23: under the 10 % that triggers a rewrite)
        assert set(sh.removed.tolist()) == {old_horse, old_rocket}
        assert len(sh.disk_ids) == n0 + 2  # the first shard (both old rows still in it) + a new shard of 2
        assert len(sh.sv.shards) == 2 and sh.ntotal - len(sh.removed) == store.count()
    queries = [photos / "sk_horse.jpg", photos / "new_cat.jpg", photos / "chelsea.png"]
    got = search_json(e, queries, 4)
    assert_exact(got, definition(e["idx"], queries, 4), 4)
    returned = {h["id"] for d in got.values() for h in d["results"]}
    assert not returned & {old_horse, old_rocket}  # removed rows never come back
    assert got[str(photos / "new_cat.jpg")]["results"][1]["path"] in (str(photos / "chelsea.png"),
                                                                     str(photos / "chelsea_crop_flipped.jpg"))


def _add_synthetic_rows(e, n: int) -> None:
    """``n`` rows written straight to the database (as a second indexer would commit them): real embeddings of
    the collection plus noise, for files that exist (empty) outside the scanned folder."""
    extra = e["base"] / "synthetic"
    extra.mkdir(exist_ok=True)
    rng = np.random.default_rng(7)
    with IndexStore.open(e["idx"], writable=True) as store:
        _, real = zip(*store.iter_vectors())
        real = np.concatenate(real)
        base = real[rng.integers(0, len(real), n)]
        x = np.maximum(base + 0.35 * rng.standard_normal(base.shape).astype(np.float32) * base.std(), 0)
        with store.session() as s, s.begin():
            for i, v in enumerate(x.astype(np.float32)):
                p = extra / f"{i:04d}.jpg"
                p.touch()
                s.add(ImageRow(path=str(p), size=0, mtime_ns=0, sha256=f"{i:064d}", width=1, height=1,
                               vector=v.tobytes(), indexed_at=0.0))


@pytest.fixture(scope="module")
def trained(changed):
    """``changed`` plus SYNTHETIC rows; a run training at 300 vectors is killed once its new shard is on disk
    (``current.json`` and ``check`` right after the kill are kept), then a run completes."""
    e = changed
    _add_synthetic_rows(e, SYNTHETIC)
    with IndexStore.open(e["idx"]) as store:  # a reader sees the new rows at once: exact, from memory
        e["exact_before_training"] = store.faiss_index().ntotal - len(store.removed_ids()) == store.count()
    gen = shards_dir(e["idx"]) / current(e["idx"])["generation"]
    # the forker's children inherit its environment: train at a few hundred vectors
    e["forker"].close()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(TRAIN_AT_ENV, "300")
        e["forker"] = Forker(e["base"] / "children.log")
    # killed once the new shard is on disk, while the quantisers are trained or the shards added and merged
    cli(e, "index", e["photos"], "--index", e["idx"], "--json",
        kill_when=lambda: (gen / "shard-00002.vec").exists(), expect=-signal.SIGKILL)
    e["written_at_kill"] = (gen / "shard-00002.vec").exists()
    e["committed_at_kill"] = current(e["idx"])
    e["check_after_kill"] = json.loads(cli(e, "check", "--index", e["idx"], "--json"))
    # the next run completes: trained, every shard added and merged, the lists memory-mapped
    cli(e, "index", e["photos"], "--index", e["idx"], "--json")
    return e


def test_ivf_kill_9_while_shards_are_written_then_heals_and_recall(trained, capfd):
    e = trained
    assert e["exact_before_training"]
    killed = e["committed_at_kill"]  # the kill came after the new shard's file and before the commit: none of it counts
    assert e["written_at_kill"] and killed["merged"] is None and [s["name"] for s in killed["shards"]] == [
        "shard-00000", "shard-00001"]
    rep = e["check_after_kill"]
    assert rep["consistent"], rep  # a committed shard that is not merged yet is no damage
    ptr = current(e["idx"])
    assert ptr["factory"].startswith("PCAR256,IVF") and ptr["count"] >= SYNTHETIC  # 1280-d: PCA before IVF-PQ
    with IndexStore.open(e["idx"]) as store:
        sh = store.faiss_index()
        assert sh.covered == len(sh.sv.shards) and sh.sv.is_mmapped() and sh.mem.ntotal == 0
        assert sh.ntotal - len(sh.removed) == store.count()
        # the killed run's files were removed by the next writer: only what current.json names is there
        assert sorted(p.name for p in sh.sv.directory.iterdir()) == sorted(d["file"] for d in sh.sv._named())
    assert "IO_FLAG" not in capfd.readouterr().out  # FAISS's note on opening on-disk lists stays off stdout (--json)
    rep = json.loads(cli(e, "check", "--index", e["idx"], "--json"))
    assert rep["consistent"] and not rep["rows_without_vector"], rep  # the removed two: still filtered
    queries = sorted(map(str, e["photos"].iterdir()))  # real photos; their neighbours: mostly synthetic rows
    k = 10
    got, want = search_json(e, queries, k), definition(e["idx"], queries, k)
    recall = np.mean([len({h["id"] for h in got[q]["results"]} & set(want[q][0])) / k for q in want])
    assert recall >= 0.9, recall  # IVF-PQ candidates (×50) re-scored exactly; measured 1.0
    for q, (_, _, all_scores) in want.items():  # the scores are exact, best first
        s = [h["score"] for h in got[q]["results"]]
        assert s == sorted(s, reverse=True)
        assert all(abs(h["score"] - all_scores[h["id"]]) < TOL for h in got[q]["results"])


def test_corrupted_shard_found_by_check_and_repaired(trained):
    e = trained
    gen = shards_dir(e["idx"]) / current(e["idx"])["generation"]
    vec = gen / "shard-00000.vec"
    b = bytearray(vec.read_bytes())
    b[len(b) // 2] ^= 0x5A  # same size: only the checksum can tell
    vec.write_bytes(bytes(b))
    r = run_process("check", "--index", e["idx"])  # the installed entry point, in its own process
    assert r.returncode == 1
    assert f"{vec}: vectors of ids" in r.stdout and "does not match its checksum" in r.stdout
    assert f"run `retrieve check --repair --index {e['idx']}`" in r.stdout  # the hint, followed next
    r = run_process("check", "--index", e["idx"], "--repair")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "rebuilt the vector file" in r.stdout
    rep = json.loads(cli(e, "check", "--index", e["idx"], "--json"))
    assert rep["consistent"] and not rep["trailing"] and rep["vectors"] == rep["images"]
    new = current(e["idx"])["generation"]
    assert new != gen.name and not gen.exists()  # a new generation, the damaged one removed
    assert sorted(p.name for p in shards_dir(e["idx"]).iterdir()) == sorted([POINTER, new])


def test_a_run_writes_shards_as_it_goes_trains_compacts_and_retrains(tmp_path, monkeypatch, capfd):
    """In-process, 64-d rows committed and applied batch by batch the way the indexer does (no model): the tail
    is written out every FLUSH_ROWS, IVF-PQ is trained once there are enough, removals past 10 % rewrite the
    collection, a collection grown 4× gets more lists; every search equals the exact definition's top-k."""
    import retrieval.index.sharded as si
    from retrieval.index.settings import IndexSettings

    monkeypatch.setattr(si, "FLUSH_ROWS", 200)
    monkeypatch.setenv(TRAIN_AT_ENV, "500")
    d = 64
    settings = IndexSettings(model="test", weights_id="none", weights_source="", preprocess={"size": 224},
                             metric="cosine", dim=d, index_type="sharded", faiss_factory="sharded")
    rng = np.random.default_rng(3)
    centres = rng.standard_normal((40, d)).astype(np.float32)

    def commit(store, n):
        x = np.abs(centres[rng.integers(0, 40, n)] + 0.5 * rng.standard_normal((n, d)).astype(np.float32))
        with store.session() as s, s.begin():
            rows = [ImageRow(path=f"/x/{rng.integers(1 << 62)}.jpg", size=1, mtime_ns=1, sha256="0" * 64, width=1,
                             height=1, vector=v.tobytes(), indexed_at=0.0) for v in x]
            s.add_all(rows)
            s.flush()
            ids = np.array([r.id for r in rows], np.int64)
        store.apply([], ids, x)

    def check_search(store, k=10):
        ids, x = map(np.concatenate, zip(*store.iter_vectors()))
        x = x / np.linalg.norm(x, axis=1, keepdims=True)
        q = x[rng.integers(0, len(x), 20)]
        s, got = store.faiss_index().search(q, k)
        want = np.argsort(-(q @ x.T), axis=1, kind="stable")[:, :k]
        recall = np.mean([len(set(g) & set(ids[w])) / k for g, w in zip(got, want)])
        assert recall >= 0.95, recall
        pos = np.searchsorted(ids, got)
        np.testing.assert_allclose(s, np.einsum("qd,qkd->qk", q, x[pos]), atol=TOL)  # exact scores of those ids

    store = IndexStore.create(tmp_path / "idx", settings)
    try:
        sh = store.faiss_index()
        for _ in range(5):
            commit(store, 100)
        assert [s["count"] for s in sh.sv.shards] == [200, 200] and sh.covered == 0  # exact: 400 < 624
        check_search(store)
        for _ in range(3):
            commit(store, 100)
        assert sh.covered == len(sh.sv.shards) == 4 and sh.factory.startswith("IVF")  # trained at 800, merged
        assert sh.mem.ntotal == 0 and sh.sv.is_mmapped()
        check_search(store)
        gone = store.row_ids()[::7]  # 115 of 800: over 10 %
        with store.session() as s, s.begin():
            s.execute(ImageRow.__table__.delete().where(ImageRow.id.in_(gone.tolist())))
        store.apply(gone)
        assert set(sh.removed.tolist()) == set(gone.tolist())
        assert not set(store.faiss_index().search(np.eye(d, dtype=np.float32), 50)[1].ravel()) & set(gone.tolist())
        old_gen = sh.generation
        assert store.compact() and sh.generation != old_gen and not len(sh.removed)
        assert not (shards_dir(store.directory) / old_gen).exists() and len(sh.disk_ids) == store.count()
        check_search(store)
        lists = si._lists(sh.factory)
        for _ in range(9):  # 2 250 more: 4 × the lists are due (IVF17 → IVF73)
            commit(store, 250)
        store.save_faiss()
        assert si._lists(sh.factory) >= 4 * lists and sh.covered == len(sh.sv.shards)
        check_search(store)
    finally:
        store.close()
    with IndexStore.open(tmp_path / "idx") as reader:  # a reader reconciles the same state from disk
        r = reader.faiss_index()
        assert r.covered and r.mem.ntotal == 0 and r.ntotal == reader.count()
        check_search(reader)
    assert not capfd.readouterr().out  # FAISS's notes (resizing, on-disk file names) kept off stdout
